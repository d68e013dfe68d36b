"""``sample.py``'s argument checks: every flag is checked before the model loads (:class:`CLIError` or
``ValueError``: one ``error:`` line, exit status 2), and the keyword sets the commands pass to the pipeline.
JAX-importing modules are imported inside the functions that use them, so that ``--help`` and bad arguments
answer without loading JAX.
"""

from __future__ import annotations

import os

from ..config import ConfigError, load_config
from ..images import ImageTransform, load_image

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")
DEMO_PATCH_AR_MODEL = DEMO_MODEL + "-patch-ar"   # the default of --image-mode patch_ar without --model-path

# the demo model fine-tuned to decide by itself when to draw: the default of `interleave --mode model`
DEMO_INTERLEAVE_MODEL = DEMO_MODEL + "-interleave"


class DefaultPath(str):
    """--model-path's default (a path not given on the command line)."""


class CLIError(Exception):
    pass


def check_image_mode(args) -> None:
    """--image-mode / --patch-group: generate, interleave and chat; patch_ar defaults to the patch-AR demo model and needs a
    model trained in that mode (its config says so; checked before loading)."""
    mode = getattr(args, "image_mode", None)
    if mode in (None, "whole"):
        if getattr(args, "patch_group", None) is not None:
            raise CLIError("--patch-group is for --image-mode patch_ar")
        return
    if args.command not in ("generate", "interleave", "chat"):
        raise CLIError(f"--image-mode patch_ar is available for generate, interleave and chat, not {args.command}")
    at_least("--patch-group", args.patch_group, 1)
    if isinstance(args.model_path, DefaultPath):
        args.model_path = DEMO_PATCH_AR_MODEL
        if not os.path.isdir(args.model_path):
            raise CLIError(f"the patch-AR demo model ({DEMO_PATCH_AR_MODEL}) is not present in this checkout; "
                           "pass --model-path to a model trained with image_mode: patch_ar")
    check_model_path(args)
    try:
        have = load_config(args.model_path).image_mode
    except ConfigError as e:
        raise CLIError(str(e)) from None
    if have != "patch_ar":
        raise CLIError(f"--image-mode patch_ar: the model {args.model_path} was trained in image mode {have!r} "
                       "(no image_mode: patch_ar in its bagel_config.json)")


def check_model_path(args) -> None:
    if not os.path.isdir(args.model_path):
        if os.path.abspath(args.model_path) == DEMO_MODEL:
            raise CLIError(f"the embedded demo model ({DEMO_MODEL}) is not present in this checkout; "
                           "pass --model-path /path/to/an/official/BAGEL/folder")
        raise CLIError(f"model folder not found: {args.model_path}")


def at_least(flag: str, value, lo: int) -> None:
    if value is not None and value < lo:
        raise CLIError(f"{flag} must be >= {lo}, got {value}")


def check_args(args) -> None:
    """Every flag checked before the model is loaded (CLIError / ValueError: exit status 2)."""
    from ..inference.cfg import ImageParams          # (JAX: see the module docstring)
    from ..inference.context import seed_key
    from ..inference.conversation import check_interleave, sampling

    for flag in ("max_new_tokens", "max_think_tokens", "max_context", "max_text_length", "max_interleaved_blocks"):
        at_least("--" + flag.replace("_", "-"), getattr(args, flag, None), 1)
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
        ImageParams.fill(args.command == "edit" or bool(images), **image_kw(args))
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
        if args.mode == "model" and isinstance(args.model_path, DefaultPath) \
                and os.path.isdir(DEMO_INTERLEAVE_MODEL):   # an explicit --model-path is kept
            args.model_path = DEMO_INTERLEAVE_MODEL
    check_draft(args)
    args.images = [load_image(p) for p in images]   # unreadable images fail here, before any compute


def check_draft(args) -> None:
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
        at_least("--speculate", args.speculate, 1)
    decodes = args.command in ("understand", "chat") or args.think or \
        (args.command == "interleave" and args.mode != "explicit")
    if not decodes:
        raise CLIError(f"{args.command}: a draft speeds up text decoding, and this command decodes none "
                       "without --think")
    if args.draft_model and not os.path.isdir(args.draft_model):
        raise CLIError(f"--draft-model: folder not found: {args.draft_model}")


def check_out(out: str) -> None:
    """--out must be a folder we can write, before any compute (else the results would be lost)."""
    probe = os.path.join(out, f".write_test_{os.getpid()}")
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def mode_kw(args) -> dict:
    """--image-mode / --patch-group (only what was given)."""
    kw = dict(image_mode=args.image_mode, patch_group=args.patch_group)
    return {k: v for k, v in kw.items() if v is not None}


def image_kw(args) -> dict:
    kw = dict(cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale,
              cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
              timestep_shift=args.timestep_shift, num_timesteps=args.num_timesteps,
              cfg_renorm_min=args.cfg_renorm_min, cfg_renorm_type=args.cfg_renorm_type, cfg_mode=args.cfg_mode,
              step_cache=args.step_cache)
    return {k: v for k, v in kw.items() if v is not None}


def text_kw(args) -> dict:
    return dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                **getattr(args, "spec", {}))
