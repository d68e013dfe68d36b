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

# The program: this module (parser, loading, the one-shot commands), .checks (argument checks) and .chat (interleave
# and chat). JAX-importing modules are imported inside the functions that use them, so that --help and bad
# arguments answer without loading JAX.
from ..images import ImageTransform
from . import checks
from .chat import cmd_chat, cmd_interleave, write_text
from .checks import (CLIError, DefaultPath, check_args, check_image_mode, check_model_path, check_out, image_kw,
                     mode_kw, text_kw)


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
    g.add_argument("--model-path", default=DefaultPath(checks.DEMO_MODEL),
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
    g.add_argument("--lora", default=None, metavar="ADAPTER",
                   help="apply a LoRA adapter folder (a LoRA train.py run's --export) without merging; works with "
                        "--quantize int8 (docs/lora.md)")

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
    import jax   # (see the module docstring)

    from ..runtime import use_compilation_cache

    use_compilation_cache(args.compilation_cache, force=True)
    if args.dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return args.dtype


def _load(args):
    dtype = _setup_jax(args)
    from ..inference.api import InferenceOptions, ModelOptions, load

    def tf(v):  # None: the folder's inference.json, else the official transforms
        return ImageTransform(*v) if v else None

    t0 = time.time()
    mesh = None
    if args.mesh:
        from .. import sharding as shd

        mesh = shd.make_mesh(**shd.parse_mesh(args.mesh))   # MeshError (a ValueError): exit status 2
    options = ModelOptions(dtype=dtype, attention_impl=args.attention, quantize=args.quantize,
                           layer_loop=args.layer_loop)
    inference = InferenceOptions(tf(args.vae_transform), tf(args.vit_transform), args.max_context)
    pipe = load(args.model_path, options=options, mesh=mesh, inference=inference, compilation_cache=None,
                lora=args.lora)
    where = f", mesh {dict(mesh.shape)}" if mesh is not None else ""
    where += ", int8 weights" if args.quantize == "int8" else ""
    where += f", LoRA {args.lora}" if args.lora else ""
    print(f"loaded {args.model_path} ({dtype}{where}) in {time.time() - t0:.1f}s", file=sys.stderr)
    return pipe


def _load_draft(args, pipe) -> dict:
    """The speculative-decoding keywords of every call: {} without a draft. A draft model is loaded (a
    Hugging Face Qwen2 folder, or a BAGEL folder) and checked against the target's vocabulary here."""
    if not (args.draft or args.draft_model):
        return {}
    spec = dict(speculate=4 if args.speculate is None else args.speculate)
    if args.draft:
        return dict(spec, draft=args.draft)
    from ..inference.draft_lm import load_qwen2_draft

    dtype = _setup_jax(args)
    if os.path.isfile(os.path.join(args.draft_model, "config.json")):
        draft = load_qwen2_draft(args.draft_model, dtype=dtype)
        draft.bind(pipe)                               # vocabulary check (DraftError: exit status 2)
    else:
        from ..inference.api import load

        draft = load(args.draft_model, dtype=dtype, compilation_cache=None)
        if draft.engine.cfg.llm.vocab_size != pipe.engine.cfg.llm.vocab_size or \
                draft.tokenizer.hf.get_vocab() != pipe.tokenizer.hf.get_vocab():
            raise CLIError(f"--draft-model {args.draft_model}: its vocabulary differs from the target's (a BAGEL "
                           "draft must share the target's tokenizer)")
    print(f"draft {args.draft_model} loaded", file=sys.stderr)
    return dict(spec, draft=draft)


def cmd_understand(args, pipe) -> int:
    qs = args.question
    images = args.images or None
    if len(qs) == 1:
        ans = pipe.understand(images, qs[0], think=args.think, max_new_tokens=args.max_new_tokens, seed=args.seed,
                              progress=not args.no_progress, **text_kw(args))
        answers = [ans]
    else:
        answers = pipe.understand([images] * len(qs) if images else None, qs, think=args.think,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  progress=not args.no_progress, **text_kw(args))
    for k, a in enumerate(answers):
        print(a)
        write_text(os.path.join(args.out, f"answer_{k:02d}.txt" if len(answers) > 1 else "answer.txt"), a)
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
            write_text(os.path.join(args.out, f"{stem}_{k:02d}_thinking.txt"), t)
    return paths


def cmd_generate(args, pipe) -> int:
    res = pipe.generate_image(args.prompt if len(args.prompt) > 1 else args.prompt[0], think=args.think,
                              image_size=args.image_size or pipe.default_image_size, seed=args.seed,
                              max_think_tokens=args.max_think_tokens, progress=not args.no_progress,
                              **mode_kw(args), **text_kw(args), **image_kw(args))
    _save_images(args, res, "image")
    return 0


def cmd_edit(args, pipe) -> int:
    batched = len(args.prompt) > 1
    images = args.images if len(args.images) > 1 else args.images[0]
    if batched and len(args.images) == 1:
        images = args.images * len(args.prompt)
    res = pipe.edit_image(images, args.prompt if batched else args.prompt[0], think=args.think, seed=args.seed,
                          max_think_tokens=args.max_think_tokens, progress=not args.no_progress,
                          **text_kw(args), **image_kw(args))
    _save_images(args, res, "edited")
    return 0


COMMANDS = {"understand": cmd_understand, "generate": cmd_generate, "edit": cmd_edit,
            "interleave": cmd_interleave, "chat": cmd_chat}


def main(argv=None) -> int:
    from ..runtime import tune_cpu_malloc, tune_xla_cpu

    tune_xla_cpu()   # before JAX's first computation (a no-op after it: see bagel_jax/runtime.py)
    tune_cpu_malloc()
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.command:
        ap.print_help()
        return 2
    try:
        check_image_mode(args)
        check_model_path(args)
        check_args(args)
        check_out(args.out)
        pipe = _load(args)
        args.spec = _load_draft(args, pipe)
        return COMMANDS[args.command](args, pipe)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:   # bad input: images, sizes, hyperparameters, context length
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
