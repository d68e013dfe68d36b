#!/usr/bin/env python
"""BAGEL inference from the command line (JAX).

Subcommands:
  understand   answer a question about images          sample.py understand --image cat.png --question "What is this?"
  generate     text-to-image                            sample.py generate --prompt "A red cat on a blue mat"
  edit         image editing                            sample.py edit --image cat.png --prompt "Make the cat blue"
  interleave   interleaved text and images              sample.py interleave --prompt "A story in 3 pictures" --num-images 3
  chat         multi-turn conversation on stdin         sample.py chat   (type /help inside)

Outputs go to --out (created; checked writable before the model loads): PNG images, answer / thinking text
files, and for interleave and chat a Markdown transcript (transcript.md) with the images linked in order,
written as each item is produced. If a run fails midway, everything produced so far is saved and the error
is written to the transcript (exit status 1). Bad input (a flag out of range or not finite, an unreadable
image, an unwritable --out) is one line "error: ..." with exit status 2, before any compute.
Seeds are integers in [0, 2**32-1] (larger ones are refused, not reduced); row i of a batch uses seed+i.
interleave: --num-images N (N >= 0; 0 = no image, a text answer) implies --mode auto and is refused with
another mode; --mode explicit needs a <|vision_start|> marker in a prompt. In chat, a bad line (an unreadable
/image, an unknown /command, /gen or /edit without text, /edit with no image yet) prints an error and the
session goes on.

Image flags left out take ImageParams.t2i() / .edit() (bagel_jax/inference/cfg.py), the official notebook's
defaults (docs/architecture.md#default-hyperparameters): generate cfg_text_scale 4.0, cfg_img_scale 1.0, cfg_interval
0.4 1.0, renorm global; edit cfg_text_scale 4.0, cfg_img_scale 2.0, cfg_interval 0.0 1.0, renorm text_channel; both
timestep_shift 3.0, 50 timesteps, renorm_min 0.0; text greedy, at most 1000 tokens. With --think, interleave
and chat write each image's thinking text before it in the transcript.
Speculative decoding (every subcommand that decodes text: understand, chat, interleave, and generate / edit
with --think): --draft ngram (prompt lookup) or --draft-model PATH (a Hugging Face Qwen2 folder with the
target's tokenizer, or a small BAGEL folder), --speculate GAMMA or auto; greedy output is unchanged.
JAX's persistent compilation cache is on (--compilation-cache), so later runs skip most compilation.
Several devices (every subcommand): --mesh fsdp=4,tensor=2 splits the model over 8 devices.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bagel_jax", "assets", "demo")
DEMO_PATCH_AR_MODEL = DEMO_MODEL + "-patch-ar"   # the default of --image-mode patch_ar without --model-path

# the demo model fine-tuned to decide by itself when to draw: the default of `interleave --mode model`
DEMO_INTERLEAVE_MODEL = DEMO_MODEL + "-interleave"


class _DefaultPath(str):
    """--model-path's default (a path not given on the command line)."""


class CLIError(Exception):
    pass


def _hw(s: str):
    try:
        if "x" in s.lower():
            h, w = s.lower().split("x")
        else:
            h = w = s
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 1024x768) or one number, got {s!r}") from None


def _transform(s: str):
    try:
        parts = [int(v) for v in s.split(",")]
        if len(parts) not in (3, 4):
            raise ValueError
        return parts
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MAX,MIN,STRIDE[,MAX_PIXELS], got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sample.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and run")
    g.add_argument("--model-path", default=_DefaultPath(DEMO_MODEL),
                   help="official BAGEL model folder (llm_config.json, vit_config.json, ema.safetensors, "
                        "ae.safetensors, tokenizer files). Default: the embedded demo model bagel_jax/assets/demo "
                        "(interleave --mode model: bagel_jax/assets/demo-interleave, trained to decide when to draw)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype of the model: bfloat16 as released, float32 for exact parity; "
                        "auto = bfloat16 on GPU/TPU, float32 on CPU (default auto). The VAE always runs in float32")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed in [0, 2**32-1]: initial noise, VAE posterior draws and text sampling all derive "
                        "from it, so a run is reproducible (default 0; the i-th prompt of a batch uses seed+i)")
    g.add_argument("--out", default="outputs", metavar="DIR", help="output folder, created if missing (default outputs)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars (decoded tokens, denoising steps)")
    g.add_argument("--compilation-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "bagel_jax", "jax"),
                   metavar="DIR", help="JAX persistent compilation cache folder ('' to disable)")
    g.add_argument("--vae-transform", type=_transform, default=None, metavar="MAX,MIN,STRIDE",
                   help="resize rule of input images for the VAE (default: the model folder's inference.json, else the official 1024,512,16)")
    g.add_argument("--vit-transform", type=_transform, default=None, metavar="MAX,MIN,STRIDE",
                   help="resize rule for the ViT, applied to the VAE-resized image (default: the folder's inference.json, else the official 980,224,14)")
    g.add_argument("--max-context", type=int, default=None,
                   help="most tokens one conversation may hold (default: the model's max_position_embeddings)")
    # the names of bagel_jax.nn.attention (not imported here: --help must not wait for jax)
    g.add_argument("--attention", default="auto", choices=("auto", "xla", "blocked", "pallas", "cudnn"),
                   help="attention implementation of the decoder and the ViT: auto ('blocked' when reading the KV "
                        "cache and for long sequences, 'xla' for short ones; default), xla (dense reference), blocked "
                        "(flash-style, any backend), pallas (GPU/TPU kernel), cudnn (NVIDIA GPU, bfloat16)")
    g.add_argument("--layer-loop", default="auto", choices=("auto", "scan", "unrolled"),
                   help="how the decoder and ViT layers run: auto ('unrolled' on one CPU device, else 'scan'; default), "
                        "scan (weights stacked over layers, one compiled layer body: smaller program, faster compile), "
                        "unrolled (per-layer weights, a loop unrolled at compile time: no per-layer weight copies on "
                        "XLA:CPU, e.g. 1.6x faster greedy decoding there)")
    g.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                   help="run on several devices: mesh sizes whose product is the device count (one may be -1 = the "
                        "rest), e.g. fsdp=4,tensor=2. fsdp and tensor split the weights, data replicates them; KV "
                        "caches are split over rows and kv heads; the VAE is replicated. Default: one device")
    g.add_argument("--quantize", default="none", choices=("none", "int8"),
                   help="weight storage of the decoder layers: none (as --dtype) or int8 (per-output-channel int8 "
                        "q/k/v/o and MLP weights of both experts, dequantized inside each matmul: about half the "
                        "bfloat16 bytes; embeddings and LM head unchanged; see docs/int8.md)")

    t = common.add_argument_group("text generation")
    t.add_argument("--think", action="store_true",
                   help="think mode: the official think system prompt; for images, thinking text is generated "
                        "first and conditions the image")
    t.add_argument("--max-new-tokens", type=int, default=1000,
                   help="most tokens per generated text, start token included (official max_think_token_n, default 1000)")
    t.add_argument("--max-think-tokens", type=int, default=1000, help="most tokens of thinking text (default 1000)")
    t.add_argument("--do-sample", action="store_true", help="sample text instead of greedy decoding (official default: greedy)")
    t.add_argument("--temperature", type=float, default=0.3, help="sampling temperature with --do-sample (default 0.3)")
    t.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off, default)")
    t.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off, default)")
    t.add_argument("--draft", choices=("ngram",), default=None,
                   help="speculative decoding with prompt lookup (n-gram match against the context, no model)")
    t.add_argument("--draft-model", default=None, metavar="PATH",
                   help="speculative decoding with a draft model: a Hugging Face Qwen2 folder (config.json + "
                        "model.safetensors, same tokenizer) or a small BAGEL folder")
    t.add_argument("--speculate", default=None, metavar="GAMMA",
                   help="tokens the draft proposes per target pass (an integer >= 1, or 'auto': adapted between "
                        "rounds from the acceptance rate; default 4)")

    i = common.add_argument_group("image generation (defaults depend on the subcommand, see above)")
    i.add_argument("--image-size", type=_hw, default=None, metavar="HxW",
                   help="output size H x W, multiples of 16 (default: the folder's inference.json image_size, else 1024x1024; edit: the resized input size)")
    i.add_argument("--cfg-text-scale", type=float, default=None, help="text guidance scale (default 4.0)")
    i.add_argument("--cfg-img-scale", type=float, default=None,
                   help="image guidance scale (default 1.0 = off for generate, 2.0 for edit); acts only with text CFG")
    i.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="CFG is applied at steps with LO < sigma <= HI (default 0.4 1.0; edit 0.0 1.0)")
    i.add_argument("--timestep-shift", type=float, default=None, help="schedule shift s in s*t/(1+(s-1)*t) (default 3.0)")
    i.add_argument("--num-timesteps", type=int, default=None, help="schedule length N; N-1 model evaluations (default 50)")
    i.add_argument("--cfg-renorm-min", type=float, default=None, help="lower clamp of the CFG renorm factor (default 0.0; 1.0 disables)")
    i.add_argument("--cfg-renorm-type", default=None, choices=("global", "channel", "text_channel"),
                   help="CFG renormalisation (default global; edit text_channel)")
    i.add_argument("--cfg-mode", default=None,
                   help="guidance mode, a name of bagel_jax.inference.cfg.CFG_MODES (default text_img: the official "
                        "text CFG with image CFG on top)")
    i.add_argument("--step-cache", default=None, choices=("none", "taylorseer"),
                   help="flow-step caching: taylorseer predicts some steps from earlier ones instead of running the "
                        "decoder (official parameters; about half the decoder passes, a close but not equal image); "
                        "default none")
    i.add_argument("--image-mode", default=None, choices=("whole", "patch_ar"),
                   help="generate, interleave, chat: whole (official, default) denoises the image as one block; patch_ar generates "
                        "it in groups of latent patches one after another (models trained in that mode; without "
                        "--model-path the shipped patch-AR demo model bagel_jax/assets/demo-patch-ar)")
    i.add_argument("--patch-group", type=int, default=None, metavar="K",
                   help="with --image-mode patch_ar: latent patches per step (default: the model's first "
                        "patch_ar_groups; must divide the image's patch count)")

    p = sub.add_parser("understand", parents=[common], help="answer a question about images",
                       description="Answer a question about zero or more images (greedy by default).")
    p.add_argument("--image", action="append", default=[], help="input image (repeatable, in order)")
    p.add_argument("--question", "--prompt", dest="question", action="append", required=True,
                   help="the question (repeat for a batch: each question gets the same images)")

    p = sub.add_parser("generate", parents=[common], help="text-to-image",
                       description="Generate images from text prompts (several --prompt = one batched program).")
    p.add_argument("--prompt", action="append", required=True, help="text prompt (repeatable: a batch)")

    p = sub.add_parser("edit", parents=[common], help="image editing",
                       description="Edit an image following an instruction.")
    p.add_argument("--image", action="append", required=True, help="input image (one, or one per --prompt)")
    p.add_argument("--prompt", action="append", required=True, help="editing instruction (repeatable: a batch)")

    p = sub.add_parser("interleave", parents=[common], help="interleaved text and images",
                       description="Interleaved generation; writes transcript.md with the images in order.")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable; placed after the images)")
    p.add_argument("--image", action="append", default=[], help="input image (repeatable; placed before the prompts)")
    p.add_argument("--mode", default=None, choices=("model", "explicit", "auto"),
                   help="model: the model decides where images go (<|vision_start|>); explicit: one image per "
                        "<|vision_start|> marker in the prompt; auto: --num-images rounds of text then image. "
                        "Default: explicit if the prompt has markers, auto if --num-images is given, else model")
    p.add_argument("--num-images", type=int, default=None,
                   help="number of images in auto mode (>= 0; 0 = text only); implies --mode auto")
    p.add_argument("--max-text-length", type=int, default=500, help="most tokens per text block (default 500)")
    p.add_argument("--max-interleaved-blocks", type=int, default=8, help="most text + image blocks in model mode (default 8)")

    p = sub.add_parser("chat", parents=[common], help="multi-turn conversation on stdin",
                       description="Multi-turn chat. Lines are questions; /image PATH adds an image, /gen PROMPT "
                                   "generates an image, /edit INSTRUCTION edits the latest image, /quit ends.")
    p.add_argument("--image", action="append", default=[], help="image(s) to start the conversation with")
    return ap


def _setup_jax(args):
    import jax

    from bagel_jax.runtime import use_compilation_cache

    use_compilation_cache(args.compilation_cache, force=True)
    if args.dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return args.dtype


def _load(args):
    dtype = _setup_jax(args)
    from bagel_jax.images import ImageTransform
    from bagel_jax.inference.api import load

    def tf(v):  # None: the folder's inference.json, else the official transforms
        return ImageTransform(*v) if v else None

    t0 = time.time()
    mesh = None
    if args.mesh:
        from bagel_jax import sharding as shd

        mesh = shd.make_mesh(**shd.parse_mesh(args.mesh))   # MeshError (a ValueError): exit status 2
    pipe = load(args.model_path, dtype=dtype, vae_transform=tf(args.vae_transform),
                vit_transform=tf(args.vit_transform), max_context=args.max_context, attention_impl=args.attention,
                mesh=mesh, quantize=args.quantize, layer_loop=args.layer_loop, compilation_cache=None)
    where = f", mesh {dict(mesh.shape)}" if mesh is not None else ""
    where += ", int8 weights" if args.quantize == "int8" else ""
    print(f"loaded {args.model_path} ({dtype}{where}) in {time.time() - t0:.1f}s", file=sys.stderr)
    return pipe


def _check_image_mode(args) -> None:
    """--image-mode / --patch-group: generate, interleave and chat; patch_ar defaults to the patch-AR demo model and needs a
    model trained in that mode (its config says so; checked before loading)."""
    mode = getattr(args, "image_mode", None)
    if mode in (None, "whole"):
        if getattr(args, "patch_group", None) is not None:
            raise CLIError("--patch-group is for --image-mode patch_ar")
        return
    if args.command not in ("generate", "interleave", "chat"):
        raise CLIError(f"--image-mode patch_ar is available for generate, interleave and chat, not {args.command}")
    _at_least("--patch-group", args.patch_group, 1)
    if isinstance(args.model_path, _DefaultPath):
        args.model_path = DEMO_PATCH_AR_MODEL
        if not os.path.isdir(args.model_path):
            raise CLIError(f"the patch-AR demo model ({DEMO_PATCH_AR_MODEL}) is not present in this checkout; "
                           "pass --model-path to a model trained with image_mode: patch_ar")
    _check_model_path(args)
    from bagel_jax.config import ConfigError, load_config
    try:
        have = load_config(args.model_path).image_mode
    except ConfigError as e:
        raise CLIError(str(e)) from None
    if have != "patch_ar":
        raise CLIError(f"--image-mode patch_ar: the model {args.model_path} was trained in image mode {have!r} "
                       "(no image_mode: patch_ar in its bagel_config.json)")


def _check_model_path(args) -> None:
    if not os.path.isdir(args.model_path):
        if os.path.abspath(args.model_path) == DEMO_MODEL:
            raise CLIError(f"the embedded demo model ({DEMO_MODEL}) is not present in this checkout; "
                           "pass --model-path /path/to/an/official/BAGEL/folder")
        raise CLIError(f"model folder not found: {args.model_path}")


def _at_least(flag: str, value, lo: int) -> None:
    if value is not None and value < lo:
        raise CLIError(f"{flag} must be >= {lo}, got {value}")


def _check_args(args) -> None:
    """Every flag checked before the model is loaded (CLIError / ValueError: exit status 2)."""
    from bagel_jax.images import ImageTransform, load_image
    from bagel_jax.inference.cfg import ImageParams
    from bagel_jax.inference.context import seed_key
    from bagel_jax.inference.conversation import check_interleave, sampling

    for flag in ("max_new_tokens", "max_think_tokens", "max_context", "max_text_length", "max_interleaved_blocks"):
        _at_least("--" + flag.replace("_", "-"), getattr(args, flag, None), 1)
    if args.image_size is not None and min(args.image_size) < 1:
        raise CLIError(f"--image-size must be positive, got {args.image_size[0]}x{args.image_size[1]}")
    for flag, v in (("--vae-transform", args.vae_transform), ("--vit-transform", args.vit_transform)):
        if v:
            ImageTransform.from_dict(dict(zip(("max_image_size", "min_image_size", "image_stride", "max_pixels"), v)),
                                     flag)
    sampling(args.do_sample, args.temperature, args.top_k, args.top_p)
    n_rows = max(len(getattr(args, "prompt", None) or []), len(getattr(args, "question", None) or []), 1)
    seed_key(args.seed)
    seed_key(args.seed + n_rows - 1)   # the last row's seed
    images = getattr(args, "image", None) or []
    if args.command != "understand":
        ImageParams.fill(args.command == "edit" or bool(images), **_image_kw(args))
    if args.command == "edit":
        if args.image_size is not None:
            raise CLIError("edit: the output size is the resized input size; --image-size is not used")
        if len(images) not in (1, len(args.prompt)):
            raise CLIError(f"edit: give one --image, or one per --prompt ({len(args.prompt)})")
    if args.command == "interleave":
        if not args.prompt and not args.image:
            raise CLIError("interleave: give at least one --prompt or --image")
        args.mode = args.mode or ("explicit" if any("<|vision_start|>" in p for p in args.prompt)
                                  else "auto" if args.num_images is not None else "model")
        if args.num_images is not None and args.mode != "auto":
            raise CLIError(f"interleave: --num-images is for --mode auto (the mode is {args.mode})")
        check_interleave(args.prompt, args.mode, 1 if args.num_images is None else args.num_images)
        if args.mode == "model" and isinstance(args.model_path, _DefaultPath) \
                and os.path.isdir(DEMO_INTERLEAVE_MODEL):   # an explicit --model-path is kept
            args.model_path = DEMO_INTERLEAVE_MODEL
    _check_draft(args)
    args.images = [load_image(p) for p in images]   # unreadable images fail here, before any compute


def _check_draft(args) -> None:
    """Speculative decoding flags: one draft, a gamma only with a draft, and a command that decodes text."""
    if args.draft and args.draft_model:
        raise CLIError("give either --draft ngram or --draft-model PATH, not both")
    if not (args.draft or args.draft_model):
        if args.speculate is not None:
            raise CLIError("--speculate needs a draft (--draft ngram or --draft-model PATH)")
        return
    if args.speculate is not None and args.speculate != "auto":
        try:
            args.speculate = int(args.speculate)
        except ValueError:
            raise CLIError(f"--speculate must be an integer >= 1 or 'auto', got {args.speculate!r}") from None
        _at_least("--speculate", args.speculate, 1)
    decodes = args.command in ("understand", "chat") or args.think or \
        (args.command == "interleave" and args.mode != "explicit")
    if not decodes:
        raise CLIError(f"{args.command}: a draft speeds up text decoding, and this command decodes none "
                       "without --think")
    if args.draft_model and not os.path.isdir(args.draft_model):
        raise CLIError(f"--draft-model: folder not found: {args.draft_model}")


def _load_draft(args, pipe) -> dict:
    """The speculative-decoding keywords of every call: {} without a draft. A draft model is loaded (a
    Hugging Face Qwen2 folder, or a BAGEL folder) and checked against the target's vocabulary here."""
    if not (args.draft or args.draft_model):
        return {}
    spec = dict(speculate=4 if args.speculate is None else args.speculate)
    if args.draft:
        return dict(spec, draft=args.draft)
    from bagel_jax.inference.draft_lm import load_qwen2_draft

    dtype = _setup_jax(args)
    if os.path.isfile(os.path.join(args.draft_model, "config.json")):
        draft = load_qwen2_draft(args.draft_model, dtype=dtype)
        draft.bind(pipe)                               # vocabulary check (DraftError: exit status 2)
    else:
        from bagel_jax.inference.api import load

        draft = load(args.draft_model, dtype=dtype, compilation_cache=None)
        if draft.engine.cfg.llm.vocab_size != pipe.engine.cfg.llm.vocab_size or \
                draft.tokenizer.hf.get_vocab() != pipe.tokenizer.hf.get_vocab():
            raise CLIError(f"--draft-model {args.draft_model}: its vocabulary differs from the target's (a BAGEL "
                           "draft must share the target's tokenizer)")
    print(f"draft {args.draft_model} loaded", file=sys.stderr)
    return dict(spec, draft=draft)


def _check_out(out: str) -> None:
    """--out must be a folder we can write, before any compute (else the results would be lost)."""
    probe = os.path.join(out, f".write_test_{os.getpid()}")
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _mode_kw(args) -> dict:
    """--image-mode / --patch-group (only what was given)."""
    kw = dict(image_mode=args.image_mode, patch_group=args.patch_group)
    return {k: v for k, v in kw.items() if v is not None}


def _image_kw(args) -> dict:
    kw = dict(cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale,
              cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
              timestep_shift=args.timestep_shift, num_timesteps=args.num_timesteps,
              cfg_renorm_min=args.cfg_renorm_min, cfg_renorm_type=args.cfg_renorm_type, cfg_mode=args.cfg_mode,
              step_cache=args.step_cache)
    return {k: v for k, v in kw.items() if v is not None}


def _text_kw(args) -> dict:
    return dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                **getattr(args, "spec", {}))


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def cmd_understand(args, pipe) -> int:
    qs = args.question
    images = args.images or None
    if len(qs) == 1:
        ans = pipe.understand(images, qs[0], think=args.think, max_new_tokens=args.max_new_tokens, seed=args.seed,
                              progress=not args.no_progress, **_text_kw(args))
        answers = [ans]
    else:
        answers = pipe.understand([images] * len(qs) if images else None, qs, think=args.think,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  progress=not args.no_progress, **_text_kw(args))
    for k, a in enumerate(answers):
        print(a)
        _write(os.path.join(args.out, f"answer_{k:02d}.txt" if len(answers) > 1 else "answer.txt"), a)
    return 0


def _save_images(args, res, stem: str) -> list:
    paths = []
    for k, im in enumerate(res.images):
        p = os.path.join(args.out, f"{stem}_{k:02d}.png")
        im.save(p)
        paths.append(p)
        print(p)
    if res.thinking:
        for k, t in enumerate(res.thinking):
            _write(os.path.join(args.out, f"{stem}_{k:02d}_thinking.txt"), t)
    return paths


def cmd_generate(args, pipe) -> int:
    res = pipe.generate_image(args.prompt if len(args.prompt) > 1 else args.prompt[0], think=args.think,
                              image_size=args.image_size or pipe.default_image_size, seed=args.seed,
                              max_think_tokens=args.max_think_tokens, progress=not args.no_progress,
                              **_mode_kw(args), **_text_kw(args), **_image_kw(args))
    _save_images(args, res, "image")
    return 0


def cmd_edit(args, pipe) -> int:
    batched = len(args.prompt) > 1
    images = args.images if len(args.images) > 1 else args.images[0]
    if batched and len(args.images) == 1:
        images = args.images * len(args.prompt)
    res = pipe.edit_image(images, args.prompt if batched else args.prompt[0], think=args.think, seed=args.seed,
                          max_think_tokens=args.max_think_tokens, progress=not args.no_progress,
                          **_text_kw(args), **_image_kw(args))
    _save_images(args, res, "edited")
    return 0


class Transcript:
    """``transcript.md`` in --out, rewritten after every item so that nothing produced is lost; each image
    is saved as ``image_NN.png`` the moment it exists. Items: ``(role, kind, value)``, kind "text",
    "think", "image" (PIL) or "input" (the path of an input image)."""

    def __init__(self, out: str, items=()):
        self.out, self.n = out, 0
        self.path = os.path.join(out, "transcript.md")
        self.lines = ["# BAGEL transcript", ""]
        _write(self.path, "\n".join(self.lines))
        for item in items:
            self.add(*item)

    def add(self, role: str, kind: str, value) -> None:
        if kind == "image":
            self.n += 1
            name = f"image_{self.n:02d}.png"
            value.save(os.path.join(self.out, name))
            line = f"**{role}:** ![image {self.n}]({name})"
        elif kind == "input":
            line = f"**{role}:** ![input]({value})"
        elif kind == "think":
            line = f"**{role} (thinking):** {value}"
        else:
            line = f"**{role}:** {value}"
        self.lines += [line, ""]
        _write(self.path, "\n".join(self.lines))

    def error(self, e: BaseException) -> None:
        self.add("error", "text", f"`{type(e).__name__}: {e}`")


class Printer:
    """Prints streamed text as it arrives (``[thinking] `` before thinking text), one line per block."""

    def __init__(self):
        self.kind = None

    def piece(self, kind: str, text: str) -> None:
        if kind != self.kind:
            self.end()
            print("[thinking] " if kind == "think" else "", end="")
            self.kind = kind
        print(text, end="", flush=True)

    def end(self) -> None:
        if self.kind is not None:
            print(flush=True)
        self.kind = None


STREAM_CHUNK = 8   # tokens per compiled decoding call while printing text as it arrives


def streamed(fn, *a, printer: Printer, **kw):
    """Run ``fn(*a, **kw)`` streamed (bagel_jax.inference.streaming): text pieces are printed as they are
    decoded; returns ``(result, printed)`` with ``printed`` whether any text piece came."""
    from bagel_jax.inference import streaming

    s, printed = streaming.stream(fn, *a, chunk=STREAM_CHUNK, **kw), False
    for ev in s:
        if ev.kind in ("text", "think") and ev.row == 0:
            printer.piece(ev.kind, ev.value)
            printed = True
        elif ev.kind == "image":
            printer.end()
    printer.end()
    return s.result, printed


def cmd_interleave(args, pipe) -> int:
    from bagel_jax.inference import streaming

    shown = [("user", "input", os.path.abspath(p)) for p in args.image] + \
            ([("user", "text", p) for p in args.prompt] if args.mode != "explicit" else [])
    tr = Transcript(args.out, shown)
    printer = Printer()

    def on_item(item):   # text was printed piece by piece; the transcript gets whole items, images at once
        kind, v = item
        tr.add("assistant", kind, v)
        if kind == "image":
            printer.end()
            print(f"[image {tr.n}]", flush=True)

    def run():
        return pipe.interleave(list(args.images) + list(args.prompt), mode=args.mode,
                               num_images=1 if args.num_images is None else args.num_images,
                               image_size=args.image_size or pipe.default_image_size,
                               max_text_length=args.max_text_length, max_interleaved_blocks=args.max_interleaved_blocks,
                               think=args.think, max_think_tokens=args.max_think_tokens, seed=args.seed,
                               progress=False, on_item=streaming.item_hook(on_item), **_image_kw(args),
                               **_mode_kw(args),
                               **_text_kw(args))

    res, _ = streamed(run, printer=printer)
    print(tr.path)
    if res.error is not None:
        tr.error(res.error)
        print(f"error: generation stopped early: {type(res.error).__name__}: {res.error} "
              f"(partial output saved to {tr.path})", file=sys.stderr)
        return 1
    return 0


CHAT_USAGE = ("text = ask; /image PATH = add an image; /gen PROMPT = generate an image; "
              "/edit INSTRUCTION = edit the latest image; /help; /quit")


def _chat_turn(args, conv, tr, line: str) -> bool:
    """One chat line; False ends the session. Bad input (an unreadable image, a command without its
    argument, /edit with no image) prints an error and the session goes on."""
    prog = not args.no_progress
    if not line.startswith("/"):
        tr.add("user", "text", line)
        ans, printed = streamed(conv.ask, line, printer=Printer())   # printed as it is decoded
        tr.add("assistant", "text", ans)
        if not printed:
            print(ans)
        return True
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/help":
        print(CHAT_USAGE)
    elif cmd not in ("/image", "/gen", "/edit"):
        print(f"error: unknown command {cmd} (usage: {CHAT_USAGE})", file=sys.stderr)
    elif not arg:
        print(f"error: {cmd} needs {'a path' if cmd == '/image' else 'a prompt'} (usage: {CHAT_USAGE})",
              file=sys.stderr)
    elif cmd == "/image":
        conv.add_image(arg)
        tr.add("user", "text", f"[image {arg}]")
    elif cmd == "/edit" and not conv.has_image:
        print("error: /edit: there is no image in the conversation yet; add one with /image PATH or make one "
              "with /gen PROMPT", file=sys.stderr)
    else:
        tr.add("user", "text", arg)
        img, printed = streamed(conv.edit if cmd == "/edit" else conv.generate_image, arg, think=args.think,
                                progress=prog, printer=Printer())
        if conv.last_thinking is not None:     # --think: the thinking text came before the image
            tr.add("assistant", "think", conv.last_thinking)
            if not printed:
                print(f"[thinking] {conv.last_thinking}")
        tr.add("assistant", "image", img)
        print(f"[image {tr.n}]")
    return True


def cmd_chat(args, pipe) -> int:
    defaults = dict(max_new_tokens=args.max_new_tokens, max_think_tokens=args.max_think_tokens, **_text_kw(args))
    defaults.update(_image_kw(args), **_mode_kw(args))
    if args.image_size:
        defaults["image_size"] = args.image_size
    conv = pipe.conversation(think="gen" if args.think else None, seed=args.seed, **defaults)
    tr = Transcript(args.out)
    error = None
    try:
        for path, im in zip(args.image, args.images):
            conv.add_image(im)
            tr.add("user", "text", f"[image {path}]")
        while True:
            if sys.stdin.isatty():
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if not _chat_turn(args, conv, tr, line):
                    break
            except ValueError as e:   # bad input in this turn (image, context length, ...): say so, go on
                print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
                tr.error(e)
    except KeyboardInterrupt:
        pass
    except Exception as e:   # keep what was produced (the transcript is already written up to here)
        error = e
    print(tr.path)
    if error is not None:
        print(f"error: {type(error).__name__}: {error} (conversation so far saved to {tr.path})", file=sys.stderr)
        try:
            tr.error(error)
        except OSError:   # the failure may be the disk itself
            pass
        return 1
    return 0


COMMANDS = {"understand": cmd_understand, "generate": cmd_generate, "edit": cmd_edit,
            "interleave": cmd_interleave, "chat": cmd_chat}


def main(argv=None) -> int:
    from bagel_jax.runtime import tune_xla_cpu   # (--help must not wait for jax)

    tune_xla_cpu()   # before JAX's first computation (a no-op after it: see bagel_jax/runtime.py)
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.command:
        ap.print_help()
        return 2
    try:
        _check_image_mode(args)
        _check_model_path(args)
        _check_args(args)
        _check_out(args.out)
        pipe = _load(args)
        args.spec = _load_draft(args, pipe)
        return COMMANDS[args.command](args, pipe)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:   # bad input: images, sizes, hyperparameters, context length
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
