"""A/B micro-benchmarks of inference pieces on CPU, each variant jitted and run interleaved (the machine is
shared: medians of wall and process CPU time over many rounds, A and B alternating in every round).

    python bench/bench_inference_ops.py vae          # GroupNorm + swish, upsample + conv: plain forms vs ours
    python bench/bench_inference_ops.py attention    # cached attention at decode / flow-step shapes

``vae``: on 1x256x256x32 (the FLUX-layout VAE of ch 32 at its last level), the grouped-reshape GroupNorm
(``[N, H, W, G, C/G]``, two passes, a stored ``x - mean``) vs :class:`bagel_jax.models.flux_vae.GroupNorm`,
and nearest x2 (``jnp.repeat``) + 3x3 conv from 128x128 vs :class:`bagel_jax.models.flux_vae.Upsample`.

``attention``: one layer-loop (8 layers, 8 / 2 heads, head_dim 64) of cached attention, the "blocked" cached
path with the blocks of the code before data-following reads (one whole cache block of
``_cache_block(capacity)`` slots per visit, chunk blocks of 64) vs the defaults now (32-slot tail blocks, a
short unaligned chunk as one block): a decode step (1 query, 130 valid of 256 slots) and a flow step
(258 queries, a 17-token prompt in a 256-slot cache).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def _interleaved(fns: dict, args: dict, rounds: int) -> dict:
    for k, f in fns.items():
        jax.block_until_ready(f(*args[k]))
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(*args[k]))
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: (float(np.median(wall[k])), float(np.median(cpu[k]))) for k in fns}


def _report(title: str, res: dict, pairs) -> None:
    print(title)
    for k, (w, c) in res.items():
        print(f"  {k:28s} wall {1e3 * w:8.3f} ms   cpu {1e3 * c:8.3f} ms")
    for a, b in pairs:
        print(f"  ratio {a} / {b}: wall {res[a][0] / res[b][0]:.2f}x  cpu {res[a][1] / res[b][1]:.2f}x")


def bench_vae(rounds: int, only: str = "") -> None:
    from bagel_jax.models import flux_vae
    G, eps = 32, 1e-6
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 256, 256, 32)) * 2 + 0.5, jnp.float32)
    gp = {"scale": jnp.asarray(rng.normal(size=32), jnp.float32), "bias": jnp.asarray(rng.normal(size=32), jnp.float32)}

    def gn_plain(p, x):
        n, h, w, c = x.shape
        xg = x.reshape(n, h, w, G, c // G)
        mean = xg.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
        return jax.nn.swish(((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(n, h, w, c) * p["scale"] + p["bias"])

    gn = flux_vae.GroupNorm(G, eps)
    u = jnp.asarray(rng.normal(size=(1, 128, 128, 32)), jnp.float32)
    up = flux_vae.Upsample()
    upp = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 32, 32)) * 0.1, jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=32), jnp.float32)}}

    def up_plain(p, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"]

    fns = {"groupnorm+swish plain": jax.jit(gn_plain),
           "groupnorm+swish ours": jax.jit(lambda p, x: jax.nn.swish(gn.apply({"params": p}, x))),
           "upsample+conv plain": jax.jit(up_plain),
           "upsample+conv ours": jax.jit(lambda p, x: up.apply({"params": p}, x))}
    args = {"groupnorm+swish plain": (gp, x), "groupnorm+swish ours": (gp, x),
            "upsample+conv plain": (upp, u), "upsample+conv ours": (upp, u)}
    for a, b in (("groupnorm+swish plain", "groupnorm+swish ours"), ("upsample+conv plain", "upsample+conv ours")):
        err = float(jnp.abs(fns[a](*args[a]) - fns[b](*args[b])).max())
        print(f"{b}: max abs difference to the plain form {err:.2e}")
    _report("vae ops (median)", _interleaved(fns, args, rounds),
            [("groupnorm+swish plain", "groupnorm+swish ours"), ("upsample+conv plain", "upsample+conv ours")])


def bench_attention(rounds: int, only: str = "") -> None:
    from bagel_jax.nn.attention import CacheView, chunk_vectors
    from bagel_jax.nn.blocked_attention import _cache_block, blocked_attention
    H, K, dh, layers, cap = 8, 2, 64, 8, 256
    rng = np.random.default_rng(0)
    ck = jnp.asarray(rng.normal(size=(layers, 1, cap, K, dh)), jnp.float32)
    cv = jnp.asarray(rng.normal(size=(layers, 1, cap, K, dh)), jnp.float32)

    def make(Lq, length, causal, before: bool):
        r = np.random.default_rng(Lq)   # the same q, k for both variants
        q = jnp.asarray(r.normal(size=(1, Lq, H, dh)), jnp.float32)
        k = jnp.asarray(r.normal(size=(1, Lq, K, dh)), jnp.float32)
        vec = chunk_vectors(jnp.asarray([Lq], jnp.int32), Lq, causal)
        # before: every visit reads a whole _cache_block(cap) block (tail block = the big block), chunk blocks 64
        kw = dict(block_q=64, block_k=64) if before else {}

        def f(q, k, ck, cv, n):
            def layer(i, acc):
                view = CacheView(ck, cv, n, i)
                if before:
                    import bagel_jax.nn.blocked_attention as ba
                    old, ba.CACHE_TAIL_BLOCK = ba.CACHE_TAIL_BLOCK, _cache_block(cap)
                    try:
                        return acc + blocked_attention(q, k, k, vec, vec, cache=view, **kw)
                    finally:
                        ba.CACHE_TAIL_BLOCK = old
                return acc + blocked_attention(q, k, k, vec, vec, cache=view, **kw)
            return jax.lax.fori_loop(0, layers, layer, jnp.zeros_like(q))
        return jax.jit(f), (q, k, ck, cv, jnp.asarray([length], jnp.int32))

    fns, args = {}, {}
    cases = [("decode (1 q, 130 valid)", 1, 130, True), ("decode (1 q, 17 valid)", 1, 17, True),
             ("flow (258 q, 17 valid)", 258, 17, False)]
    if only:
        cases = [c for c in cases if c[0].startswith(only)]
    for name, Lq, length, causal in cases:
        for tag, before in (("before", True), ("now", False)):
            fns[f"{name} {tag}"], args[f"{name} {tag}"] = make(Lq, length, causal, before)
    names = [c[0] for c in cases]
    for name in names:
        err = float(jnp.abs(fns[f"{name} before"](*args[f"{name} before"]) - fns[f"{name} now"](*args[f"{name} now"])).max())
        print(f"{name}: max abs difference before / now {err:.2e}")
    _report("cached attention, 8 layers (median)", _interleaved(fns, args, rounds),
            [(f"{n} before", f"{n} now") for n in names])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["vae", "attention"])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--only", default="", help="attention: only the cases whose name starts with this")
    a = ap.parse_args()
    {"vae": bench_vae, "attention": bench_attention}[a.what](a.rounds, a.only)


if __name__ == "__main__":
    main()
