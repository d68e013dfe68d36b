"""Attention with BAGEL's packed masks: one entry point, several implementations.

The mask of a packed BAGEL sequence reduces to three per-token integer vectors (STYLE.md):

* ``seg``  sample id (0 = padding; padding keys are never visible),
* ``vis``  the token's own order index for causal tokens, the block start for full-attention blocks,
* ``nblk`` 0, or the id of a noised VAE block that only its own tokens may see.

``allowed[q, k] = (seg_q == seg_k) & (seg_k > 0) & (vis_k <= vis_q) & ((nblk_k == 0) | (nblk_k == nblk_q))``

Physical token order is irrelevant to the mask (and RoPE positions are explicit), which lets packing
put tokens in any order (e.g. all und-expert tokens before all gen-expert tokens).

:func:`attention` takes q, k, v, the query and key vectors, an optional read-only KV cache and an
implementation name (docs/architecture.md#attention-mask; the decoder's and the ViT's attention):

* ``"xla"``: the dense reference; builds the ``[B, Lq, Lk]`` mask from the vectors (O(L^2) memory).
* ``"blocked"``: flash-style attention in plain JAX (any backend) with a custom VJP: O(L) memory, running
  max / sum in float32, and key blocks that per-block summaries of the vectors prove fully masked are
  never visited (a data-dependent trip count per query block). With a cache it is the cached inference
  attention (reads only the cache blocks that hold valid slots).
* ``"pallas"``: the Pallas flash kernel of :mod:`bagel_jax.nn.pallas_attention` (GPU / TPU; interpret
  mode on CPU). With a cache, the ``"blocked"`` cached path runs.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA GPU, bf16/fp16). jax's API
  offers cuDNN only causal, padding (sequence lengths) and a dense mask/bias; packed BAGEL masks are
  none of the first two, so the dense ``[B, 1, Lq, Lk]`` mask is passed as cuDNN's bias (O(L^2) mask
  memory, fused kernel), and more than :data:`CUDNN_MAX_KEYS` keys are refused. With a cache, the
  ``"blocked"`` cached path runs.
* ``"auto"`` (see :func:`resolve_implementation`): ``"blocked"`` whenever a cache is read and above
  :func:`default_auto_min_len` keys (per backend and for training / inference), ``"xla"`` below.

Every implementation returns exactly 0 (and passes 0 gradient) for a query with no allowed key and
no visible cache slot.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import custom_batching

from .blocked_attention import blocked_attention
from .mask import CacheView, MaskVectors, chunk_vectors, dense_mask, default_block, full_vectors

# The public names of the attention entry; the mask vocabulary is defined in :mod:`bagel_jax.nn.mask`.
__all__ = ["IMPLEMENTATIONS", "AUTO_BLOCKED_MIN_LEN", "INFERENCE_AUTO_BLOCKED_MIN_LEN", "ACCELERATOR_AUTO_BLOCKED_MIN_LEN",
           "CUDNN_MAX_KEYS", "CacheView", "MaskVectors", "attention", "blocked_attention", "chunk_vectors",
           "default_auto_min_len", "default_block", "dense_mask", "full_vectors", "resolve_implementation",
           "validate_implementation"]

IMPLEMENTATIONS = ("xla", "blocked", "pallas", "cudnn")

# Above this many keys "auto" picks "blocked" (XLA:CPU, training). Measured on this project's 2-core CPU, forward +
# backward of one attention at a small model's shape (bench/bench_attention.py, numbers in its docstring): on par
# up to 256 keys, "blocked" 1.2-2.8x faster at 512, 13x at 4096.
AUTO_BLOCKED_MIN_LEN = 256

# The same switch for forward-only attention without a cache on XLA:CPU (in inference: the ViT's image blocks, one
# image per row, nothing for "blocked" to skip). Measured on the 2-core CPU (AMD EPYC, AVX2; one full-attention
# segment, float32, medians of 20): 4 heads x 64 (the perf harness's ViT) xla / blocked 3.1 / 5.6 ms at 336
# keys, 7.4 / 9.3 at 576, 12.0 / 24.7 at 784, 35 / 35 at 1024, 110 / 86 at 1600; 16 heads x 72 (SigLIP-so400m)
# 11.7 / 29.3 ms at 336, 90 / 100 at 784, 176 / 192 at 1024. Above it the dense [heads, L, L] scores also grow
# large (16 heads at 4,900 patches: 1.5 GB). :class:`bagel_jax.inference.engine.Engine` sets it on CPU.
INFERENCE_AUTO_BLOCKED_MIN_LEN = 1024

# The switch on GPU / TPU (training and inference). The one measurement on an accelerator (one H200, the
# 1.5B-class MoT train step at 8,192 tokens per pack, bench/gpu_train.py, docs/gpu.md): "xla" 0.876 s/step,
# "blocked" 0.982 s; "pallas" and "cudnn" did not run then. So dense stays the choice up to 8,192 keys and
# "blocked" (O(L) memory, no [L, L] tensor) runs above, e.g. at 32k tokens per pack where the dense scores alone
# would take 12 heads x 32k x 32k x 4 bytes = 48 GiB per layer. To be re-measured per device (bench/gpu_check.py).
ACCELERATOR_AUTO_BLOCKED_MIN_LEN = 8192

# cuDNN reads the packed mask as a dense [B, 1, Lq, Lk] bias: above this many keys (32k tokens: 2 GiB of bf16
# bias per call, saved for the backward of every layer) "cudnn" refuses and "pallas" or "blocked" should run.
CUDNN_MAX_KEYS = 16384


def default_auto_min_len(backend: Optional[str] = None, inference: bool = False) -> int:
    """The key count above which ``"auto"`` picks ``"blocked"`` on ``backend`` (default: jax's default backend):
    :data:`AUTO_BLOCKED_MIN_LEN` (training) / :data:`INFERENCE_AUTO_BLOCKED_MIN_LEN` (forward-only inference) on
    CPU, :data:`ACCELERATOR_AUTO_BLOCKED_MIN_LEN` on GPU and TPU."""
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu":
        return INFERENCE_AUTO_BLOCKED_MIN_LEN if inference else AUTO_BLOCKED_MIN_LEN
    return ACCELERATOR_AUTO_BLOCKED_MIN_LEN

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
    not the buffer's capacity) or when ``seq_len > auto_min_len`` (None: :func:`default_auto_min_len` of the
    default backend, training), else ``"xla"``. Other names are returned unchanged (after validation).
    """
    name = validate_implementation(name)
    if name != "auto":
        return name
    limit = default_auto_min_len() if auto_min_len is None else auto_min_len
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
    return cudnn_packed(q, k, v, q_vec, k_vec)


def cudnn_packed(q, k, v, q_vec, k_vec, sdpa_impl: str = "cudnn"):
    """``"cudnn"`` without the backend check: BAGEL's packed mask as cuDNN's dense bias, fully masked rows 0.

    ``sdpa_impl`` is the ``implementation`` handed to ``jax.nn.dot_product_attention``; tests run this wrapper's
    shape logic (padding, the batch merge under ``vmap``, gradients) with ``"xla"`` on CPU and lower it with
    ``"cudnn"`` for CUDA ahead of time."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention implementation 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; "
                         "use 'blocked' or 'xla' for float32")
    Lq, Lk = q.shape[1], k.shape[1]
    if Lk > CUDNN_MAX_KEYS:
        raise ValueError(f"attention implementation 'cudnn' builds a dense [{Lq}, {Lk}] mask; above "
                         f"{CUDNN_MAX_KEYS} keys use 'pallas' or 'blocked' (no [L, L] tensor)")
    # cuDNN's bias path with a backward needs even lengths: padded keys get seg 0, padded queries are dropped
    Lqp, Lkp = Lq + Lq % 2, Lk + Lk % 2
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    q, q_vec = pad(q, Lqp), MaskVectors(*(pad(x.astype(jnp.int32), Lqp) for x in q_vec))
    k, v, k_vec = pad(k, Lkp), pad(v, Lkp), MaskVectors(*(pad(x.astype(jnp.int32), Lkp) for x in k_vec))
    out = _packed_sdpa(sdpa_impl)(q, k, v, *q_vec, *k_vec)
    seen = dense_mask(q_vec, k_vec).any(-1)                                  # [B, Lq]: rows with a visible key
    return jnp.where(seen[:, :, None, None], out, 0).astype(q.dtype)[:, :Lq]


def _merge_batch(axis_size, in_batched, args):
    """custom_vmap helper: every argument with the mapped axis folded into its batch axis (``[V, B, ...] ->
    [V * B, ...]``; unmapped arguments are broadcast first)."""
    merged = []
    for x, batched in zip(args, in_batched):
        x = x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
        merged.append(x.reshape((-1,) + x.shape[2:]))
    return merged


@functools.lru_cache(maxsize=None)
def _packed_sdpa(sdpa_impl: str):
    """``(q, k, v, q_seg, q_vis, q_nblk, k_seg, k_vis, k_nblk) -> out`` through ``jax.nn.dot_product_attention``
    with the dense mask of the vectors, safe under ``vmap``.

    jax's cuDNN primitive cannot be batched with a bias of one head: its batching rule reshapes the mapped bias
    ``[V, B, 1, Lq, Lk]`` to ``[V * B, heads, Lq, Lk]`` and fails (the train step maps the model over its
    data-parallel group). Here the forward and the backward are each a ``custom_vmap`` whose rule folds the mapped
    axis into the batch (a plain reshape of q, k, v and the vectors) and calls itself again, so the primitive
    never sees ``vmap``; a ``custom_vjp`` ties them (``custom_vmap`` alone has no reverse mode). The backward
    recomputes the forward once (cuDNN's forward statistics stay inside ``jax.vjp``): about 2 of the 7 attention
    matmuls of a step more."""
    def sdpa(q, k, v, *vecs):
        mask = dense_mask(MaskVectors(*vecs[:3]), MaskVectors(*vecs[3:]))
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=sdpa_impl)

    @custom_batching.custom_vmap
    def forward(q, k, v, *vecs):
        return sdpa(q, k, v, *vecs)

    @forward.def_vmap
    def _forward_vmap(axis_size, in_batched, *args):
        out = forward(*_merge_batch(axis_size, in_batched, args))
        return out.reshape((axis_size, -1) + out.shape[1:]), True

    @custom_batching.custom_vmap
    def backward(q, k, v, *rest):
        *vecs, g = rest
        return jax.vjp(lambda q, k, v: sdpa(q, k, v, *vecs), q, k, v)[1](g)

    @backward.def_vmap
    def _backward_vmap(axis_size, in_batched, *args):
        grads = backward(*_merge_batch(axis_size, in_batched, args))
        return tuple(x.reshape((axis_size, -1) + x.shape[1:]) for x in grads), (True,) * 3

    @jax.custom_vjp
    def packed(q, k, v, *vecs):
        return forward(q, k, v, *vecs)

    def packed_fwd(q, k, v, *vecs):
        return forward(q, k, v, *vecs), (q, k, v, vecs)

    def packed_bwd(res, g):
        q, k, v, vecs = res
        return (*backward(q, k, v, *vecs, g), *(None for _ in vecs))

    packed.defvjp(packed_fwd, packed_bwd)
    return packed

