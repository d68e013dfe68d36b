"""The vocabulary of BAGEL's attention mask: three per-token integer vectors and a read-only KV cache view
(docs/architecture.md#attention-mask), shared by every attention implementation (:mod:`bagel_jax.nn.attention`,
:mod:`bagel_jax.nn.blocked_attention`, :mod:`bagel_jax.nn.pallas_attention`).

``allowed[q, k] = (seg_q == seg_k) & (seg_k > 0) & (vis_k <= vis_q) & ((nblk_k == 0) | (nblk_k == nblk_q))``
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Default block sizes of "blocked": 64 x 64 measured best on CPU (bench/bench_attention.py: at 2048 / 4096
# tokens 64 x 64 beat 32 x 32, 128 x 128 and 256 x 256); on GPU / TPU larger blocks amortise the per-iteration
# loop overhead (512 x 512; not measured: no accelerator was available to this work).
CPU_BLOCK = 64
ACCELERATOR_BLOCK = 512


def default_block() -> int:
    """Default ``block_q`` / ``block_k`` of "blocked" on the current backend."""
    return CPU_BLOCK if jax.default_backend() == "cpu" else ACCELERATOR_BLOCK


class MaskVectors(NamedTuple):
    """Per-token mask vectors, each ``[batch, seq]`` int32."""

    seg: jax.Array
    vis: jax.Array
    nblk: jax.Array


class CacheView(NamedTuple):
    """A static-capacity KV cache, read-only here."""

    k: jax.Array       # [layers, batch, capacity, kv_heads, head_dim]
    v: jax.Array       # [layers, batch, capacity, kv_heads, head_dim]
    length: jax.Array  # [batch] int32 valid slots per row; slots < length are visible to every query
    layer: jax.Array | int  # which layer of the cache to read (may be traced)


def full_vectors(seg: jax.Array) -> MaskVectors:
    """Vectors of full attention within equal non-zero ``seg`` ids (``[batch, seq]``), e.g. the ViT's images."""
    seg = seg.astype(jnp.int32)
    z = jnp.zeros_like(seg)
    return MaskVectors(seg, z, z)


def chunk_vectors(q_len: jax.Array, length: int, causal: bool) -> MaskVectors:
    """Vectors of one inference chunk of ``length`` slots whose first ``q_len[b]`` tokens are real:
    causal (text) or full (image blocks); padding tokens get ``seg`` 0 (never visible)."""
    idx = jnp.arange(length, dtype=jnp.int32)[None, :]
    seg = (idx < q_len[:, None]).astype(jnp.int32)
    vis = jnp.broadcast_to(idx if causal else jnp.zeros_like(idx), seg.shape)
    return MaskVectors(seg, vis, jnp.zeros_like(seg))


def dense_mask(q: MaskVectors, k: MaskVectors) -> jax.Array:
    """Boolean mask ``[batch, q_len, k_len]`` (True = may attend). For the reference path and tests."""
    same = q.seg[:, :, None] == k.seg[:, None, :]
    valid = (k.seg > 0)[:, None, :]
    order = k.vis[:, None, :] <= q.vis[:, :, None]
    noise_ok = (k.nblk[:, None, :] == 0) | (k.nblk[:, None, :] == q.nblk[:, :, None])
    return same & valid & order & noise_ok
