"""Attention with BAGEL's packed masks: one entry point, several implementations.

The mask of a packed BAGEL sequence reduces to three per-token integer vectors (STYLE.md):

* ``seg``  sample id (0 = padding; padding keys are never visible),
* ``vis``  the token's own order index for causal tokens, the block start for full-attention blocks,
* ``nblk`` 0, or the id of a noised VAE block that only its own tokens may see.

``allowed[q, k] = (seg_q == seg_k) & (seg_k > 0) & (vis_k <= vis_q) & ((nblk_k == 0) | (nblk_k == nblk_q))``

Physical token order is irrelevant to the mask (and RoPE positions are explicit), which lets packing
put tokens in any order (e.g. all und-expert tokens before all gen-expert tokens).

:func:`attention` takes q, k, v, the query and key vectors, an optional read-only KV cache and an
implementation name (the porting reference, section 5 for the decoder and 6.3 for the ViT):

* ``"xla"``: the dense reference; builds the ``[B, Lq, Lk]`` mask from the vectors (O(L^2) memory).
* ``"blocked"``: flash-style attention in plain JAX (any backend) with a custom VJP: O(L) memory, running
  max / sum in float32, and key blocks that per-block summaries of the vectors prove fully masked are
  never visited (a data-dependent trip count per query block). With a cache it is the cached inference
  attention (reads only the cache blocks that hold valid slots).
* ``"pallas"``: the Pallas flash kernel of :mod:`bagel_jax.nn.pallas_attention` (GPU / TPU; interpret
  mode on CPU). With a cache, the ``"blocked"`` cached path runs.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16/fp16). jax's API
  offers cuDNN only causal, padding (sequence lengths) and a dense mask/bias; packed BAGEL masks are
  none of the first two, so the dense mask is passed as cuDNN's bias (O(L^2) mask memory, fused
  kernel). With a cache, the ``"blocked"`` cached path runs.
* ``"auto"`` (see :func:`resolve_implementation`): ``"blocked"`` above :data:`AUTO_BLOCKED_MIN_LEN` keys
  (training; the inference engine uses :data:`INFERENCE_AUTO_BLOCKED_MIN_LEN`) and whenever a cache is read,
  ``"xla"`` below.

Every implementation returns exactly 0 (and passes 0 gradient) for a query with no allowed key and
no visible cache slot.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "blocked", "pallas", "cudnn")

# Above this many keys "auto" picks "blocked". Measured on this project's 2-core CPU, forward + backward of
# one attention at a small model's shape (bench/bench_attention.py, numbers in its docstring): on par up
# to 256 keys, "blocked" 1.2-2.8x faster at 512, 13x at 4096. Not measured on GPU / TPU.
AUTO_BLOCKED_MIN_LEN = 256

# The same switch for forward-only attention without a cache (in inference: the ViT's image blocks, one image
# per row, nothing for "blocked" to skip). Measured on the 2-core CPU (AMD EPYC, AVX2; one full-attention
# segment, float32, medians of 20): 4 heads x 64 (the perf harness's ViT) xla / blocked 3.1 / 5.6 ms at 336
# keys, 7.4 / 9.3 at 576, 12.0 / 24.7 at 784, 35 / 35 at 1024, 110 / 86 at 1600; 16 heads x 72 (SigLIP-so400m)
# 11.7 / 29.3 ms at 336, 90 / 100 at 784, 176 / 192 at 1024. Above it the dense [heads, L, L] scores also grow
# large (16 heads at 4,900 patches: 1.5 GB). :class:`bagel_jax.inference.context.Engine` sets it.
INFERENCE_AUTO_BLOCKED_MIN_LEN = 1024

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


def validate_implementation(name: Optional[str]) -> str:
    """``name`` if it is ``"auto"`` or one of :data:`IMPLEMENTATIONS` (None means ``"auto"``), else a
    ValueError listing the names."""
    name = "auto" if name is None else name
    if name != "auto" and name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r} "
                         f"(expected one of: auto, {', '.join(IMPLEMENTATIONS)})")
    return name


def resolve_implementation(name: Optional[str], seq_len: int, cached: bool = False,
                           auto_min_len: Optional[int] = None) -> str:
    """The implementation that runs for ``name`` at ``seq_len`` keys.

    ``"auto"`` (or None) gives ``"blocked"`` when a cache is read (its cost then follows the valid history,
    not the buffer's capacity) or when ``seq_len > auto_min_len`` (default :data:`AUTO_BLOCKED_MIN_LEN`),
    else ``"xla"``. Other names are returned unchanged (after validation).
    """
    name = validate_implementation(name)
    if name != "auto":
        return name
    limit = AUTO_BLOCKED_MIN_LEN if auto_min_len is None else auto_min_len
    return "blocked" if cached or seq_len > limit else "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_vec: MaskVectors, k_vec: MaskVectors,
              implementation: Optional[str] = "xla", *, cache: Optional[CacheView] = None,
              auto_min_len: Optional[int] = None) -> jax.Array:
    """Multi-head / grouped-query attention under BAGEL's mask rule.

    Args:
      q: ``[B, Lq, H, dh]``; k, v: ``[B, Lk, K, dh]`` with ``H % K == 0`` (query head ``h`` reads kv head
        ``h // (H // K)``).
      q_vec, k_vec: :class:`MaskVectors` of the queries ``[B, Lq]`` and keys ``[B, Lk]``.
      implementation: "auto", "xla", "blocked", "pallas" or "cudnn" (module docstring).
      cache: optional :class:`CacheView`; its valid slots are visible to every query, in addition to
        the keys allowed by the vectors. Never written. ``"pallas"`` and ``"cudnn"`` use the
        ``"blocked"`` cached path when a cache is given; with a cache only ``"xla"`` is differentiable.
      auto_min_len: the key count above which ``"auto"`` picks ``"blocked"`` (:func:`resolve_implementation`).
    Returns:
      ``[B, Lq, H, dh]`` in ``q.dtype``. Softmax scale ``1/sqrt(dh)``, softmax in float32. A query with no
      allowed key (and no visible cache slot) gives exactly 0.
    """
    if not (isinstance(q_vec, MaskVectors) and isinstance(k_vec, MaskVectors)):
        raise TypeError(f"attention takes MaskVectors for the queries and keys (seg, vis, nblk), got "
                        f"{type(q_vec).__name__} and {type(k_vec).__name__} (a dense mask is no longer accepted)")
    impl = resolve_implementation(implementation, k.shape[1], cached=cache is not None,
                                  auto_min_len=auto_min_len)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if impl == "xla":
        return _xla_attention(q, k, v, q_vec, k_vec, cache)
    if impl == "blocked" or cache is not None:
        return blocked_attention(q, k, v, q_vec, k_vec, cache=cache)
    if impl == "pallas":
        try:
            from .pallas_attention import flash_attention
        except ModuleNotFoundError as e:
            if e.name != __name__.rsplit(".", 1)[0] + ".pallas_attention":
                raise
            raise NotImplementedError("attention implementation 'pallas' needs bagel_jax/nn/pallas_attention.py, "
                                      "which this checkout does not have; use 'blocked' (any backend) or 'xla'") from None
        return flash_attention(q, k, v, q_vec, k_vec)
    return _cudnn_attention(q, k, v, q_vec, k_vec)


# -------------------------------------------------------------------------------------------------
# "xla": the dense reference
# -------------------------------------------------------------------------------------------------

def _dense(q, k, v, mask):
    """``mask [B, Lq, Lk]``; fully masked query rows -> 0 (jax would average them uniformly)."""
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])
    return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(q.dtype)


def _xla_attention(q, k, v, q_vec, k_vec, cache):
    mask = dense_mask(q_vec, k_vec)                                         # [B, Lq, Lk]
    if cache is None:
        return _dense(q, k, v, mask)
    # dense over [the layer's whole cache buffer (invalid slots masked) ; the chunk]
    ck = jax.lax.dynamic_index_in_dim(cache.k, cache.layer, 0, keepdims=False).astype(k.dtype)
    cv = jax.lax.dynamic_index_in_dim(cache.v, cache.layer, 0, keepdims=False).astype(v.dtype)
    B, Lq = q.shape[:2]
    cap = ck.shape[1]
    slots = jnp.arange(cap)[None, :] < cache.length[:, None]                # [B, cap]
    full = jnp.concatenate([jnp.broadcast_to(slots[:, None, :], (B, Lq, cap)), mask], axis=-1)
    return _dense(q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1), full)


# -------------------------------------------------------------------------------------------------
# "cudnn"
# -------------------------------------------------------------------------------------------------

def _cudnn_attention(q, k, v, q_vec, k_vec):
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU (backend is "
                         f"{jax.default_backend()!r}); use 'blocked' (any backend), 'pallas' or 'xla'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention implementation 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; "
                         "use 'blocked' or 'xla' for float32")
    # jax's cuDNN entry knows causal, padding lengths and a dense mask (applied as a bias); BAGEL's packed
    # masks (several samples, full-attention blocks inside causal text, noised blocks) need the dense mask.
    mask = dense_mask(q_vec, k_vec)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation="cudnn")
    return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(q.dtype)


# "blocked" lives in its own module; imported last because it builds on the types above.
from .blocked_attention import block_plan, blocked_attention  # noqa: E402,F401
