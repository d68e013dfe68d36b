"""Write the starting point of a from-scratch run as an official folder: random BAGEL weights, a
trained autoencoder and a tokenizer (then train with ``train.init: <that folder>``).

    python -m bagel_jax.demo.init_folder --config configs/demo.yaml --vae VAE_DIR --tokenizer TOK_DIR --out DIR \
        [--siglip VIT_DIR]

``VAE_DIR`` is the output of ``python -m bagel_jax.demo.vae_train`` (``ae.safetensors`` +
``vae_config.json``); its config must equal the ``model.vae`` section of ``--config``. The folder also gets
an ``inference.json`` with the synthetic world's image sizes (``--size``: VAE side, ViT side
``synthetic.vit_side``), which ``train.py --export`` passes on to the trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

from ..config import ConfigError, VAEConfig, load_config
from ..convert.official import load_params
from ..loading import INFERENCE_DEFAULTS_FILE, random_model, save_model, vae_param_shapes
from ..models import flux_vae
from ..tokenizer import load_tokenizer
from ..train.init import InitError, init_from_components
from . import synthetic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.demo.init_folder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML with the model: section")
    ap.add_argument("--vae", required=True, help="folder with ae.safetensors and vae_config.json (vae_train output)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder (vocab.json, merges.txt, tokenizer_config.json)")
    ap.add_argument("--out", required=True, help="output model folder")
    ap.add_argument("--siglip", default=None,
                    help="optional SigLIP vision tower (folder or .safetensors, vision_model.* names) for the ViT")
    ap.add_argument("--seed", type=int, default=4396, help="seed of the random BAGEL weights")
    ap.add_argument("--size", type=int, default=None,
                    help="image side in pixels of inference.json (default: the autoencoder's resolution)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        with open(os.path.join(args.vae, "vae_config.json")) as f:
            d = json.load(f)
        vcfg = VAEConfig(**dict(d, ch_mult=tuple(d["ch_mult"])))
        if vcfg != cfg.vae:
            diff = {k: (getattr(cfg.vae, k), getattr(vcfg, k)) for k in d if getattr(cfg.vae, k) != getattr(vcfg, k)}
            raise ConfigError(f"{args.config}: model.vae differs from {args.vae}/vae_config.json: {diff} "
                              "(copy the trained values into the YAML)")
        tok = load_tokenizer(args.tokenizer)
        if len(tok) > cfg.llm.vocab_size:
            raise ConfigError(f"tokenizer has {len(tok)} tokens > llm.vocab_size {cfg.llm.vocab_size}")
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = random_model(cfg, jax.random.PRNGKey(args.seed))
    # the official trainer zero-initialises the velocity head when training from scratch
    m.params["llm2vae"] = jax.tree_util.tree_map(jnp.zeros_like, m.params["llm2vae"])
    vae = flux_vae.AutoEncoder(cfg.vae)
    m.vae_params = load_params(os.path.join(args.vae, "ae.safetensors"), flux_vae.key_map(cfg.vae),
                               vae_param_shapes(vae), dtype=jnp.float32)
    if args.siglip:
        try:
            m.params, _, _ = init_from_components({"siglip": args.siglip}, cfg, m.model, vae, None, None, args.seed,
                                                  base=(m.params, m.vae_params))
        except (InitError, ValueError, OSError) as e:
            print(f"error: --siglip {args.siglip}: {e}", file=sys.stderr)
            return 2
    m.tokenizer = tok
    save_model(m, args.out)
    size = args.size or cfg.vae.resolution
    vit = synthetic.vit_side(size)
    with open(os.path.join(args.out, INFERENCE_DEFAULTS_FILE), "w") as f:
        json.dump({"image_size": [size, size],
                   "vae_transform": {"max_image_size": size, "min_image_size": size, "image_stride": 16},
                   "vit_transform": {"max_image_size": vit, "min_image_size": vit, "image_stride": 14}}, f)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
