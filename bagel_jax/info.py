"""``python -m bagel_jax.info CONFIG_OR_MODEL_FOLDER``: parameter counts without allocating anything.

Counts come from ``jax.eval_shape`` of the model's init. The last line, ``ema_total=<N>``, is the
number of elements of the official ``ema.safetensors`` for that config (position tables included,
autoencoder excluded).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .config import ConfigError, load_config


def count(tree) -> int:
    import jax
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.info", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="an official model folder or one of our YAML configs (configs/*.yaml)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .loading import build_modules, vae_param_shapes
    from .models.bagel import key_map, param_shapes

    model, vae = build_modules(cfg)
    shapes = param_shapes(model)
    lm = shapes["language_model"]
    layers = lm["model"]["layers"]["layer"]
    und = {k: v for k, v in layers.items() if not k.endswith("_moe_gen")}
    gen = {k: v for k, v in layers.items() if k.endswith("_moe_gen")}
    rows = [
        ("llm.embed_tokens", count(lm["embed_tokens"])),
        ("llm.lm_head", count(lm.get("lm_head", {}))),
        ("llm.layers.und_expert", count(und)),
        ("llm.layers.gen_expert", count(gen)),
        ("llm.final_norms", count({k: lm[k] for k in ("norm", "norm_moe_gen") if k in lm})),
    ]
    for name in ("vit_model", "connector", "vit_pos_embed", "time_embedder", "vae2llm", "llm2vae", "latent_pos_embed"):
        if name in shapes:
            rows.append((name, count(shapes[name])))
    total = count(shapes)
    ema_total = sum(int(np.prod(_leaf(shapes, e.path).shape[1:] if e.layer is not None else _leaf(shapes, e.path).shape,
                                dtype=np.int64)) for e in key_map(cfg))
    vae_total = count(vae_param_shapes(vae))
    width = max(len(r[0]) for r in rows) + 2
    print(f"config: {args.path}")
    for name, n in rows:
        print(f"{name:<{width}}{n:>16,}")
    print(f"{'bagel total':<{width}}{total:>16,}")
    print(f"{'vae (ae.safetensors)':<{width}}{vae_total:>16,}")
    print(f"ema_total={ema_total}")
    return 0


def _leaf(tree, path):
    for p in path:
        tree = tree[p]
    return tree


if __name__ == "__main__":
    sys.exit(main())
