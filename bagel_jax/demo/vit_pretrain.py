"""Pre-train a small SigLIP vision tower on synthetic images (the ViT stage of the demo model).

    python -m bagel_jax.demo.vit_pretrain --config configs/demo.yaml --out DIR [--size 32] [--steps 600]

The official BAGEL starts its ViT from a pre-trained SigLIP, whose patch features already say *where*
they are. A ViT trained from scratch only through the language model does not learn that: the demo
model v1 answered colour and count questions perfectly but "where is the X?" at chance, because a
patch's position reached the LLM only as a small part of its feature. This stage stands in for SigLIP
pre-training: the tower (``model.vit`` of ``--config``, the exact module BAGEL uses) is trained with
per-patch linear heads that predict, from each output token,

* the patch's own grid cell (row, column),
* the shape whose centre lies in the patch (or none), and
* that shape's colour (or none).

Scenes are drawn from the synthetic world with the held-out (colour, shape, position) combinations
excluded, rendered at ``--size`` and resized with the ViT transform of the data (``vit_side``).
Writes a Hugging Face SigLIP vision-tower folder (``DIR/model.safetensors`` with ``vision_model.*`` names
and a Conv2d patch embedding, as in SigLIP checkpoints; ``DIR/config.json``; the heads are not saved)
plus ``DIR/vit_metrics.jsonl``; load it with
``python -m bagel_jax.demo.init_folder --siglip DIR`` (or ``train.init: {siglip: DIR, ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from einops import rearrange

from ..config import ConfigError, load_config
from ..convert import keymap
from ..convert.safetensors_io import save_file
from ..images import ImageTransform, patchify
from ..models.siglip_navit import SiglipNavit, key_map
from . import synthetic as syn


def labels(objs, grid: int, max_side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch targets of a ``grid x grid`` patch layout: own cell id ``r*max_side + c``, shape
    (0 = none, 1 + index) and colour (0 = none, 1 + index) of the shape centred in the patch."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    cell = (rows * max_side + cols).reshape(-1)
    shape = np.zeros(grid * grid, np.int32)
    colour = np.zeros(grid * grid, np.int32)
    for c, s, p in objs:
        fx, fy = syn.CENTRES[syn.POSITIONS[p]]
        k = min(int(fy * grid), grid - 1) * grid + min(int(fx * grid), grid - 1)
        shape[k], colour[k] = s + 1, c + 1
    return cell.astype(np.int32), shape, colour


def make_batch(rng: np.random.Generator, batch: int, size: int, transform: ImageTransform, patch: int,
               max_side: int) -> dict:
    toks, pos, cells, shapes, colours = [], [], [], [], []
    for _ in range(batch):
        objs = syn.sample_objs(rng)   # held-out combinations excluded
        img = syn.render(objs, int(rng.integers(len(syn.BACKGROUNDS))), size)
        x = transform(img)
        grid = x.shape[1] // patch
        if x.shape[1] != x.shape[2]:
            raise ValueError(f"vit_pretrain: expected square ViT inputs, got {x.shape[1:]}")
        t, pid = patchify(x, patch, max_side)
        cell, sh, co = labels(objs, grid, max_side)
        toks.append(t)
        pos.append(pid)
        cells.append(cell)
        shapes.append(sh)
        colours.append(co)
    return dict(patches=np.stack(toks), pos=np.stack(pos).astype(np.int32), cell=np.stack(cells),
                shape=np.stack(shapes), colour=np.stack(colours))


class Probe(nn.Module):
    """The tower plus linear per-token heads (cell, shape, colour)."""

    cfg: object
    num_cells: int

    @nn.compact
    def __call__(self, patches, pos):
        seg = jnp.ones(pos.shape, jnp.int32)
        h = SiglipNavit(self.cfg, name="vit")(patches, pos, seg)
        return (nn.Dense(self.num_cells, name="cell_head")(h), nn.Dense(len(syn.SHAPES) + 1, name="shape_head")(h),
                nn.Dense(len(syn.COLOURS) + 1, name="colour_head")(h))


def make_step(model: Probe, tx):
    def loss_fn(params, b):
        cell, shape, colour = model.apply({"params": params}, b["patches"], b["pos"])
        ce = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        acc = lambda logits, y: (jnp.argmax(logits, -1) == y).mean()
        losses = dict(cell=ce(cell, b["cell"]), shape=ce(shape, b["shape"]), colour=ce(colour, b["colour"]))
        aux = dict(losses, cell_acc=acc(cell, b["cell"]), shape_acc=acc(shape, b["shape"]),
                   colour_acc=acc(colour, b["colour"]))
        return sum(losses.values()), aux

    @jax.jit
    def step(params, opt_state, b):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, b)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    return step


def hf_tensors(vit_params, cfg) -> dict[str, np.ndarray]:
    """The tower's params as a Hugging Face ``SiglipVisionModel`` state dict (Conv2d patch embedding)."""
    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), vit_params)
    tensors = keymap.params_to_tensors(key_map(cfg.vit), host)
    out = {}
    p = cfg.vit.patch_size
    for k, v in tensors.items():
        if k == "embeddings.patch_embedding.weight":   # our Linear -> HF Conv2d (inverse of train.init's)
            v = rearrange(v, "d (py px c) -> d c py px", py=p, px=p)
        out["vision_model." + k] = np.ascontiguousarray(v, np.float32)
    return out


def hf_config(cfg) -> dict:
    """``config.json`` of the tower for ``transformers.SiglipVisionModel.from_pretrained``."""
    v = cfg.vit
    return dict(architectures=["SiglipVisionModel"], model_type="siglip_vision_model", hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads, num_channels=v.num_channels, image_size=v.image_size,
                patch_size=v.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=v.layer_norm_eps,
                attention_dropout=0.0, vision_use_head=False, torch_dtype="float32")


def train(cfg, out: str, size: int = 32, steps: int = 600, batch: int = 32, lr: float = 1e-3, seed: int = 0,
          log_every: int = 50) -> dict:
    os.makedirs(out, exist_ok=True)
    side = syn.vit_side(size)
    transform = ImageTransform(side, side, cfg.vit.patch_size)
    max_side = cfg.vit_max_num_patch_per_side
    if side // cfg.vit.patch_size > max_side:
        raise ConfigError(f"ViT input {side} px needs {side // cfg.vit.patch_size} patches per side > "
                          f"vit_max_num_patch_per_side {max_side}")
    model = Probe(cfg.vit, (cfg.vit.image_size // cfg.vit.patch_size) ** 2)
    rng = np.random.default_rng(seed)
    b0 = make_batch(rng, batch, size, transform, cfg.vit.patch_size, max_side)
    params = model.init(jax.random.PRNGKey(seed), b0["patches"], b0["pos"])["params"]
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2), lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
    opt_state = tx.init(params)
    step = make_step(model, tx)
    t0 = time.time()
    last = {}
    with open(os.path.join(out, "vit_metrics.jsonl"), "w") as f:
        for i in range(1, steps + 1):
            b = b0 if i == 1 else make_batch(rng, batch, size, transform, cfg.vit.patch_size, max_side)
            params, opt_state, loss, aux = step(params, opt_state, b)
            if i % log_every == 0 or i == steps:
                last = dict(step=i, loss=float(loss), **{k: float(v) for k, v in aux.items()},
                            time=round(time.time() - t0, 1))
                f.write(json.dumps(last) + "\n")
                f.flush()
                print(f"[vit] step {i} loss {last['loss']:.4f} cell {last['cell_acc']:.3f} "
                      f"shape {last['shape_acc']:.3f} colour {last['colour_acc']:.3f}", flush=True)
    save_file(hf_tensors(params["vit"], cfg), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)
    return last


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.demo.vit_pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML with the model: section (its vit: is trained)")
    ap.add_argument("--out", required=True, help="output folder (model.safetensors, config.json, vit_metrics.jsonl)")
    ap.add_argument("--size", type=int, default=32, help="side of the rendered scenes in pixels (as the data)")
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps")
    ap.add_argument("--batch", type=int, default=32, help="images per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warmup, cosine to 10%%)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the init and the scenes")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.steps < 1 or args.batch < 1 or args.size < 1:
            raise ConfigError("--steps, --batch and --size must be positive")
        last = train(cfg, args.out, args.size, args.steps, args.batch, args.lr, args.seed)
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
