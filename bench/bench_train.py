"""Training forward + backward: the training path (expert streams: each expert runs once, ``Routing.split``;
attention ``--attention``, default ``auto``) against the old path (both experts on every token,
``Routing.select``, dense ``xla`` attention), on the same packed batch.

    PYTHONPATH=. python bench/bench_train.py [--tokens 1024,4096] [--hidden 512] [--layers 4] [--repeat 3]

For each pack length one pack is built by the real packing code (text with and without loss, ViT
images, clean and noised VAE images, several samples) in the logical order; the stream path runs the
same pack permuted by ``packing.to_expert_streams``. Timed: ``jax.value_and_grad`` of
``train_forward`` (the loss of the train step; no optimiser update), jitted, compile excluded; median
of ``--repeat`` runs per path, the two paths alternating so that machine load hits both alike.
The model FLOPs per step
(``bagel_jax.train.metrics.step_flops``: each real token through one expert, attention over the allowed
pairs) are the same for both paths; GFLOP/s divides them by the measured time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import mixed_pack, small_config, small_model  # noqa: E402
from bagel_jax.data import packing  # noqa: E402
from bagel_jax.train.forward import draw_noise, train_forward  # noqa: E402
from bagel_jax.train.metrics import step_flops  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,4096", help="comma-separated tokens per pack")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per path (median reported)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--ce-chunk", type=int, default=1024, help="CE tokens per chunk (train.ce_chunk_tokens)")
    ap.add_argument("--attention", default="auto", help="attention of the new path (the old path is always xla)")
    args = ap.parse_args()

    cfg = small_config(args.hidden, args.layers, vocab=args.vocab)
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    bm = small_model(cfg, dtype=dtype)
    special = bm.tokenizer.special
    print(f"config: hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}, compute {args.dtype}, "
          f"backend {jax.default_backend()} x {jax.device_count()}")
    if hasattr(os, "getloadavg"):
        print("load average before: %.2f %.2f %.2f" % os.getloadavg())

    def make(expert_split, attention):
        model = bm.model.clone(opts=dataclasses.replace(bm.model.opts, attention_impl=attention))

        def loss(params, vae_params, batch, noise):
            return train_forward(model, params, bm.vae, vae_params, batch, noise, expert_split=expert_split,
                                 ce_chunk_tokens=args.ce_chunk)[0]
        return jax.jit(jax.value_and_grad(loss))

    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        logical = mixed_pack(cfg, special, T)
        und, gen = packing.expert_counts(logical)
        U = int(und.max())
        streams, _ = packing.to_expert_streams(logical, U)
        noise = draw_noise(jax.random.PRNGKey(0), logical.arrays(), cfg)
        paths = {"select": (make(None, "xla"), {k: jnp.asarray(v) for k, v in logical.arrays().items()}),
                 "split": (make((U, T - U), args.attention), {k: jnp.asarray(v) for k, v in streams.arrays().items()})}
        compile_s, times, losses = {}, {k: [] for k in paths}, {}
        for name, (fn, batch) in paths.items():
            t = time.perf_counter()
            v, g = fn(bm.params, bm.vae_params, batch, noise)
            jax.block_until_ready(g)
            compile_s[name] = time.perf_counter() - t
            losses[name] = float(v)
        for _ in range(args.repeat):
            for name, (fn, batch) in paths.items():
                t = time.perf_counter()
                jax.block_until_ready(fn(bm.params, bm.vae_params, batch, noise))
                times[name].append(time.perf_counter() - t)
        flops = step_flops(cfg, logical.arrays())
        med = {k: float(np.median(v)) for k, v in times.items()}
        real = int((logical.seg > 0).sum())
        print(f"\n{T} tokens per pack ({real} real: {int(und[0])} und, {int(gen[0])} gen; "
              f"{int(logical.ce_valid.sum())} CE tokens); loss select {losses['select']:.6f} split {losses['split']:.6f}")
        for name in paths:
            print(f"  {name:6s}: median {med[name]:.3f} s over {args.repeat} (runs {', '.join(f'{x:.3f}' for x in times[name])}; "
                  f"first call incl. compile {compile_s[name]:.1f} s); {flops / med[name] / 1e9:.1f} model GFLOP/s")
        print(f"  speed-up split+{args.attention} vs select+xla: {med['select'] / med['split']:.2f}x")
        rows.append((T, med["select"], med["split"]))
    print(f"\n| tokens/pack | select + xla fwd+bwd (s) | split + {args.attention} fwd+bwd (s) | speed-up |\n|---|---|---|---|")
    for T, a, b in rows:
        print(f"| {T} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    if hasattr(os, "getloadavg"):
        print("load average after: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
