"""``python -m bagel_jax.cli.merge_lora MODEL ADAPTER OUT``: fold a LoRA adapter into a model and write the result
as an official folder (``ema.safetensors``, ``ae.safetensors``, configs, tokenizer, ``inference.json`` when the
model has one) that our loader and the official code read (docs/lora.md)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax.numpy as jnp

from .. import lora as L
from ..config import ConfigError
from ..loading import INFERENCE_DEFAULTS_FILE, BagelModel, load_model, save_model
from ..models.bagel import param_shapes


def merge_folder(model_path: str, adapter: str, out: str, dtype: str = "float32") -> str:
    """Load ``model_path`` in float32, merge ``adapter`` (:func:`bagel_jax.lora.merge`) and save to ``out`` in
    ``dtype`` (float32 or bfloat16)."""
    bm = load_model(model_path, dtype=jnp.float32)
    ad, lc = L.load_adapter(adapter, bm.cfg, param_shapes(bm.model))
    merged = BagelModel(bm.cfg, bm.model, bm.vae, L.merge(bm.params, ad, lc), bm.vae_params, bm.tokenizer)
    save_model(merged, out, dtype={"float32": None, "bfloat16": jnp.bfloat16}[dtype])
    for name in (INFERENCE_DEFAULTS_FILE, "vocab.json", "merges.txt"):
        src = os.path.join(model_path, name)
        if os.path.isfile(src) and not os.path.isfile(os.path.join(out, name)):
            shutil.copyfile(src, os.path.join(out, name))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.cli.merge_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="official model folder the adapter was trained on")
    ap.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors; train.py --export)")
    ap.add_argument("out", help="output folder (an official model folder)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the written weights")
    args = ap.parse_args(argv)
    try:
        merge_folder(args.model, args.adapter, args.out, args.dtype)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.model} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
