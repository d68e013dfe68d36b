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
