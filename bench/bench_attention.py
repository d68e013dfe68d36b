"""CPU timing of one attention, forward + backward: "xla" (dense) vs "blocked" (flash, block skipping).

Shape of a small model (hidden 512, 8 query heads, 2 kv heads, head_dim 64, batch 1). The pack holds
samples of up to 1024 tokens, each causal text with a 256-token full-attention image block in the middle
(so "blocked" skips the blocks of other samples and above the diagonal).

    python bench/bench_attention.py                     # lengths 256..4096, median of 5 runs
    python bench/bench_attention.py --blocks 128,128 256,256 512,512 --lengths 2048

Measured on the project's 2-core CPU, shared with four other jobs (load average ~5, so +-30%), median
seconds of jitted forward + backward (jax.grad of a random projection of the output), blocks 64 x 64:

    packed (default)                        --full (one image, nothing to skip)
    length    xla    blocked                length    xla    blocked
      128   0.006    0.005                    256   0.023    0.023
      256   0.018    0.013                    512   0.125    0.106
      512   0.086    0.031                   1024   0.443    0.373
      768   0.221    0.102                   2048   1.425    0.960
     1024   0.406    0.220
     1536   1.041    0.153
     2048   2.721    0.411
     4096  11.118    0.864

"blocked" is on par up to 256 keys and ahead from 512 on (even with nothing to skip: XLA's dense CPU
attention materialises [heads, L, L] float32 scores and their gradient), so "auto" picks "blocked" above
256 keys (AUTO_BLOCKED_MIN_LEN). Block sizes (--blocks, packed, same machine, noisier runs): at 2048 tokens
32 x 32 0.61 s, 64 x 64 0.56 s, 64 x 128 0.50 s, 128 x 128 0.69 s, 256 x 256 0.62 s; at 4096 tokens
32 x 32 1.08 s, 64 x 64 0.89 s, 64 x 128 1.39 s, 128 x 128 1.90 s -> default 64 x 64 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.nn.attention import MaskVectors, attention, blocked_attention


def pack_vectors(L: int, sample: int = 1024, image: int = 256, full: bool = False) -> MaskVectors:
    seg = np.zeros(L, np.int32)
    vis = np.zeros(L, np.int32)
    if full:   # one image of L tokens (the ViT): nothing to skip
        seg[:] = 1
        z = np.zeros_like(seg)
        return MaskVectors(*(jnp.asarray(x[None]) for x in (seg, z, z)))
    for s, start in enumerate(range(0, L, sample)):
        n = min(sample, L - start)
        seg[start:start + n] = s + 1
        vis[start:start + n] = np.arange(n)
        if n > 2 * image:
            a = n // 2 - image // 2
            vis[start + a:start + a + image] = a
    z = np.zeros_like(seg)
    return MaskVectors(*(jnp.asarray(x[None]) for x in (seg, vis, z)))


def timed(fn, *args, repeat=5):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--blocks", nargs="*", default=[], help="BQ,BK pairs to time with 'blocked' (default: defaults)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--full", action="store_true", help="full attention over the whole length (no block to skip)")
    args = ap.parse_args()
    key = jax.random.PRNGKey(0)
    for L in args.lengths:
        vec = pack_vectors(L, full=args.full)
        kq, kk, kv, kw = jax.random.split(key, 4)
        q = jax.random.normal(kq, (1, L, args.heads, args.head_dim))
        k = jax.random.normal(kk, (1, L, args.kv_heads, args.head_dim))
        v = jax.random.normal(kv, (1, L, args.kv_heads, args.head_dim))
        w = jax.random.normal(kw, q.shape)

        def fb(fn):
            return jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), (0, 1, 2)))

        row = {"xla": timed(fb(lambda q, k, v: attention(q, k, v, vec, vec, "xla")), q, k, v, repeat=args.repeat)}
        for b in args.blocks or ["default"]:
            kw_ = {} if b == "default" else dict(zip(("block_q", "block_k"), map(int, b.split(","))))
            fn = fb(lambda q, k, v, kw_=kw_: blocked_attention(q, k, v, vec, vec, **kw_))
            row[f"blocked {b}"] = timed(fn, q, k, v, repeat=args.repeat)
        print(f"L={L:5d} " + "  ".join(f"{n}: {t:.3f}s" for n, t in row.items()), flush=True)


if __name__ == "__main__":
    main()
