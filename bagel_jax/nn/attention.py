"""Attention with BAGEL's packed masks.

The mask of a packed BAGEL sequence reduces to three per-token integer vectors (STYLE.md):

* ``seg``  sample id (0 = padding; padding keys are never visible),
* ``vis``  the token's own order index for causal tokens, the block start for full-attention blocks,
* ``nblk`` 0, or the id of a noised VAE block that only its own tokens may see.

``allowed[q, k] = (seg_q == seg_k) & (seg_k > 0) & (vis_k <= vis_q) & ((nblk_k == 0) | (nblk_k == nblk_q))``

Physical token order is irrelevant to the mask (and RoPE positions are explicit), which lets packing
put tokens in any order (e.g. all und-expert tokens before all gen-expert tokens).

``dot_product_attention`` is the seam where cuDNN / Pallas / splash kernels plug in: a kernel can
read the three vectors instead of the dense mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MaskVectors(NamedTuple):
    """Per-token mask vectors, each ``[batch, seq]`` int32."""

    seg: jax.Array
    vis: jax.Array
    nblk: jax.Array


def dense_mask(q: MaskVectors, k: MaskVectors) -> jax.Array:
    """Boolean mask ``[batch, q_len, k_len]`` (True = may attend)."""
    same = q.seg[:, :, None] == k.seg[:, None, :]
    valid = (k.seg > 0)[:, None, :]
    order = k.vis[:, None, :] <= q.vis[:, :, None]
    noise_ok = (k.nblk[:, None, :] == 0) | (k.nblk[:, None, :] == q.nblk[:, :, None])
    return same & valid & order & noise_ok


def segment_mask(seg_q: jax.Array, seg_k: jax.Array) -> jax.Array:
    """Full attention within equal non-zero segment ids: ``[batch, q_len, k_len]``."""
    return (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k > 0)[:, None, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          implementation: str | None = None) -> jax.Array:
    """Multi-head / grouped-query attention.

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``.
      k, v: ``[batch, k_len, num_kv_heads, head_dim]``; ``num_heads % num_kv_heads == 0``
        (query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``).
      mask: ``[batch, q_len, k_len]`` bool. Rows with no allowed key produce finite garbage
        (never NaN); callers discard them.
      implementation: ``None``/"xla" (any backend) or "cudnn" (GPU, bf16/fp16).
    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in ``q.dtype``. Softmax scale ``1/sqrt(head_dim)``.
    """
    impl = None if implementation in (None, "xla") else implementation
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation=impl)


_NEG = -1e30  # finite "minus infinity": fully masked rows stay NaN-free


def _cache_block(capacity: int, preferred: int = 512) -> int:
    """Largest power of two ``<= preferred`` dividing ``capacity`` (cache buckets are multiples of 128).
    512 measured best on CPU at hidden 512 (256: 30% slower at 4k keys; 2048: no better)."""
    b = preferred
    while capacity % b:
        b //= 2
    return b


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk_mask: jax.Array, cache_k: jax.Array,
                     cache_v: jax.Array, cache_len: jax.Array, layer, block: int | None = None) -> jax.Array:
    """Attention of a query chunk over a static-capacity KV cache plus the chunk itself, reading only the
    cache blocks that hold valid slots (cost follows the history's length, not the buffer's capacity).

    The chunk is never written into the cache here (no copy of the buffer per layer); the two parts are
    merged with the usual running-max softmax (flash attention), one key block at a time, in float32.

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``; k, v: ``[batch, q_len, num_kv_heads, head_dim]`` (the chunk).
      chunk_mask: ``[batch, q_len, q_len]`` bool, query -> chunk key.
      cache_k, cache_v: ``[layers, batch, capacity, num_kv_heads, head_dim]`` (all layers; only
        ``layer``'s valid blocks are read).
      cache_len: ``[batch]`` int valid cache slots per row (slots ``< cache_len`` are visible to every query).
      layer: int (may be traced) layer index into the cache.
      block: keys per block (default: the largest power of two <= 512 dividing the capacity).
    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in ``q.dtype``. Softmax scale ``1/sqrt(head_dim)``; rows with
      no visible key give zeros.
    """
    B, Lq, H, dh = q.shape
    K = k.shape[2]
    G = H // K
    cap = cache_k.shape[2]
    block = block or _cache_block(cap)
    if cap % block:
        raise ValueError(f"cache capacity {cap} is not a multiple of the block size {block}")
    f32 = jnp.float32
    qg = q.reshape(B, Lq, K, G, dh).astype(f32) * (dh ** -0.5)

    def scores(kb, valid):  # kb [B, S, K, dh], valid [B, Lq or 1, S] -> [B, K, G, Lq, S]
        s = jnp.einsum("bqkgd,bskd->bkgqs", qg, kb.astype(f32))
        return jnp.where(valid[:, None, None], s, _NEG)

    # the chunk itself
    s = scores(k, chunk_mask)
    m = s.max(-1)
    p = jnp.exp(s - m[..., None]) * chunk_mask[:, None, None]
    l = p.sum(-1)
    acc = jnp.einsum("bkgqs,bskd->bkgqd", p, v.astype(f32))

    # valid cache blocks only: a loop with a data-dependent trip count
    def body(i, carry):
        m, l, acc = carry
        start = i * block
        kb = jax.lax.dynamic_slice(cache_k, (layer, 0, start, 0, 0), (1, B, block, K, dh))[0]
        vb = jax.lax.dynamic_slice(cache_v, (layer, 0, start, 0, 0), (1, B, block, K, dh))[0]
        valid = ((start + jnp.arange(block))[None, :] < cache_len[:, None])[:, None, :]   # [B, 1, S]
        s = scores(kb, valid)
        m_new = jnp.maximum(m, s.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None]) * valid[:, None, None]
        return m_new, l * corr + p.sum(-1), acc * corr[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p, vb.astype(f32))

    n_blocks = jnp.minimum((jnp.max(cache_len) + block - 1) // block, cap // block)
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, (m, l, acc))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]                     # [B, K, G, Lq, dh]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Lq, H, dh).astype(q.dtype)
