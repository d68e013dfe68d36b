"""Train a small FLUX-layout autoencoder on synthetic images (the first stage of the demo model).

    python -m bagel_jax.demo.vae_train --out DIR [--steps 600] [--batch 16] [--size 64] [--seed 0]

The autoencoder keeps the official FLUX layout (same module, same tensor names), only smaller
(``--ch``, ``--ch-mult``, ``--res-blocks``). Loss: L1 + L2 reconstruction of the posterior *sample*
plus a small KL term. After training, ``shift_factor`` / ``scale_factor`` are set from the latent
statistics (as FLUX does) so that scaled latents are roughly zero-mean, unit-variance for the flow
model. Writes ``DIR/ae.safetensors`` and ``DIR/vae_config.json`` (the ``vae_config`` of
``bagel_config.json``) and ``DIR/vae_metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from ..config import VAEConfig
from ..convert.official import export_params
from ..models import flux_vae
from . import synthetic as syn


def synthetic_batch(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
    """``[batch, size, size, 3]`` float32 in [-1, 1]: random training scenes of the synthetic world."""
    out = np.zeros((batch, size, size, 3), np.float32)
    for i in range(batch):
        n = int(rng.integers(1, 4))
        positions = rng.permutation(len(syn.POSITIONS))[:n]
        colours = rng.permutation(len(syn.COLOURS))[:n]
        objs = []
        for c, p in zip(colours, positions):
            s = int(rng.integers(len(syn.SHAPES)))
            while syn.held_out(int(c), s, int(p)):
                s = int(rng.integers(len(syn.SHAPES)))
            objs.append((int(c), s, int(p)))
        img = syn.render(objs, int(rng.integers(len(syn.BACKGROUNDS))), size)
        out[i] = np.asarray(img, np.float32) / 127.5 - 1.0
    return out


def make_step(vae: flux_vae.AutoEncoder, tx, kl_weight: float):
    def loss_fn(params, x, key):
        moments = vae.apply({"params": params}, x, method=flux_vae.AutoEncoder.encode_moments)
        C = vae.cfg.z_channels
        mean, logvar = moments[..., :C], jnp.clip(moments[..., C:], -30.0, 20.0)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        # decode the *unscaled* sample: scale/shift are fixed after training
        cfg = vae.cfg
        rec = vae.apply({"params": params}, (z - cfg.shift_factor) * cfg.scale_factor,
                        method=flux_vae.AutoEncoder.decode)
        l1 = jnp.mean(jnp.abs(rec - x))
        l2 = jnp.mean((rec - x) ** 2)
        kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
        return l1 + l2 + kl_weight * kl, dict(l1=l1, l2=l2, kl=kl)

    @jax.jit
    def step(params, opt_state, x, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    return step


def latent_stats(vae: flux_vae.AutoEncoder, params, images: np.ndarray) -> tuple[float, float]:
    """Mean and std of the posterior means over ``images`` (for shift_factor / scale_factor)."""
    m = jax.jit(lambda x: vae.apply({"params": params}, x, method=flux_vae.AutoEncoder.encode_moments))(images)
    mean = np.asarray(m[..., :vae.cfg.z_channels])
    return float(mean.mean()), float(mean.std())


def write_vae_config(cfg: VAEConfig, folder: str) -> None:
    """``folder/vae_config.json``: the autoencoder's config as ``init_folder`` reads it."""
    d = dataclasses.asdict(cfg)
    d["ch_mult"] = list(cfg.ch_mult)
    with open(os.path.join(folder, "vae_config.json"), "w") as f:
        json.dump(d, f, indent=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.demo.vae_train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay to 10%%)")
    ap.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the KL term")
    ap.add_argument("--ch", type=int, default=32, help="base width (a multiple of 32: GroupNorm has 32 groups)")
    ap.add_argument("--ch-mult", default="1,1,1", help="width multipliers per level; downsample = 2^(levels-1)")
    ap.add_argument("--res-blocks", type=int, default=1, help="ResNet blocks per encoder level")
    ap.add_argument("--z-channels", type=int, default=16, help="latent channels")
    ap.add_argument("--seed", type=int, default=0, help="seed for data and initialisation")
    args = ap.parse_args(argv)

    mult = tuple(int(v) for v in args.ch_mult.split(","))
    cfg = VAEConfig(ch=args.ch, ch_mult=mult, num_res_blocks=args.res_blocks, z_channels=args.z_channels,
                    downsample=2 ** (len(mult) - 1), resolution=args.size, scale_factor=1.0, shift_factor=0.0)
    cfg.validate()
    os.makedirs(args.out, exist_ok=True)
    vae = flux_vae.AutoEncoder(cfg)
    key = jax.random.PRNGKey(args.seed)
    params = jax.jit(vae.init)(key, jnp.zeros((1, args.size, args.size, 3)))["params"]
    sched = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    opt_state = tx.init(params)
    step = make_step(vae, tx, args.kl_weight)
    rng = np.random.default_rng(args.seed)
    log = open(os.path.join(args.out, "vae_metrics.jsonl"), "w")
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="vae", file=sys.stdout)
    for i in bar:
        x = jnp.asarray(synthetic_batch(rng, args.batch, args.size))
        params, opt_state, loss, aux = step(params, opt_state, x, jax.random.fold_in(key, i))
        if i % 10 == 0 or i == args.steps - 1:
            rec = {k: float(v) for k, v in aux.items()}
            rec.update(step=i, loss=float(loss), seconds=round(time.time() - t0, 1))
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(l1=f"{rec['l1']:.4f}", kl=f"{rec['kl']:.1f}")
    mu, sd = latent_stats(vae, params, synthetic_batch(np.random.default_rng(args.seed + 1), 64, args.size))
    cfg = dataclasses.replace(cfg, shift_factor=round(mu, 4), scale_factor=round(1.0 / max(sd, 1e-6), 4))
    export_params(params, flux_vae.key_map(cfg), os.path.join(args.out, "ae.safetensors"))
    write_vae_config(cfg, args.out)
    print(f"wrote {args.out}/ae.safetensors; shift_factor={cfg.shift_factor} scale_factor={cfg.scale_factor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
