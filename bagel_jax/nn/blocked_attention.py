"""The ``"blocked"`` implementation of :func:`bagel_jax.nn.attention.attention`: flash attention in
plain JAX (any backend) on BAGEL's mask vectors.

Queries and keys are cut into blocks; per-block summaries of (seg, vis, nblk) decide which key blocks a
query block must visit (:func:`block_plan`), and only those are computed (a data-dependent trip count).
The softmax runs online in float32 (running max and sum). Without a cache it is differentiable: the
head-major kernels of :mod:`bagel_jax.nn.flash_blocked` (custom VJP; the backward recomputes the
probabilities of each visited block pair from the saved log-sum-exp, so memory is O(L)). With a KV cache
it is the cached inference attention, forward only (:func:`_forward`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import flash_blocked
from .mask import CacheView, MaskVectors, default_block

_NEG = -1e30  # finite "minus infinity": fully masked rows stay NaN-free
_BIG = np.iinfo(np.int32).max


# The cache is read in blocks of ``_cache_block(capacity)`` slots up to the last full block below the
# longest row's length, then the rest in blocks of this many slots, so the slots read follow the data
# (a 17-slot prompt reads 32 slots, not a whole 256-slot block; a 130-slot one 160). Chunks of fewer than
# CACHE_TAIL_MIN_QUERIES queries (decoding) read the rest in whole blocks too: for one query a loop trip
# costs more than the slots it saves (bench/bench_inference_ops.py attention: one query against 130 valid
# slots, 5 trips of 32 were 1.3x slower than one of 256; 258 queries against 17, 3x faster).
CACHE_TAIL_BLOCK = 32
CACHE_TAIL_MIN_QUERIES = 8


def _cache_block(capacity: int, preferred: int = 512) -> int:
    """Largest power of two ``<= preferred`` dividing ``capacity`` (cache buckets are multiples of 128).
    512 measured best on CPU at hidden 512 (256: 30% slower at 4k keys; 2048: no better)."""
    b = preferred
    while capacity % b:
        b //= 2
    return b


# A cached (inference) chunk of at most this many tokens that is not a multiple of the block size is one
# block: padding it (a 258-token flow query to 320, a 326-token ViT image to 384) costs more than the blocks
# it skips. Measured on the 2-core CPU (bench/bench_inference_ops.py attention): a 258-token flow query against
# a cache 2x faster as one block; causal text of 96 tokens 2x; causal 256 / 384 (no padding) 1.3x slower.
CACHED_ONE_BLOCK_MAX = 512


def _cached_block(length: int, preferred: int) -> int:
    """Default block of a cached chunk of ``length`` tokens (see :data:`CACHED_ONE_BLOCK_MAX`)."""
    return length if length <= CACHED_ONE_BLOCK_MAX and length % preferred else preferred


def _block_size(length: int, preferred: int) -> int:
    """One block for short sequences (no padding), else ``preferred``."""
    return length if length <= preferred else preferred


def _pad_seq(x, n):
    """Pad axis 1 to ``n`` with zeros (padded tokens get seg 0: never visible, rows sliced off)."""
    if x.shape[1] == n:
        return x
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


class _Summary(NamedTuple):
    """Per-block summaries of mask vectors over the block's real tokens (seg > 0), each ``[B, n_blocks]``."""

    any: jax.Array
    seg_min: jax.Array
    seg_max: jax.Array
    vis_min: jax.Array
    vis_max: jax.Array
    clean: jax.Array      # a real token with nblk == 0
    nblk_min: jax.Array   # range of the non-zero nblk ids
    nblk_max: jax.Array


def _summaries(vec: MaskVectors, block: int) -> _Summary:
    B, L = vec.seg.shape
    seg, vis, nb = (a.reshape(B, L // block, block) for a in vec)
    real = seg > 0
    noised = real & (nb > 0)
    lo = lambda x, m: jnp.where(m, x, _BIG).min(-1)
    hi = lambda x, m: jnp.where(m, x, -_BIG).max(-1)
    return _Summary(real.any(-1), lo(seg, real), hi(seg, real), lo(vis, real), hi(vis, real),
                    (real & (nb == 0)).any(-1), lo(nb, noised), hi(nb, noised))


def block_plan(q_vec: MaskVectors, k_vec: MaskVectors, block_q: int, block_k: int):
    """Which key blocks each query block must visit.

    A block pair is skipped when the summaries prove every (query, key) pair of it masked, in some row
    of the batch: no real key or query, disjoint sample-id ranges, every key later than every query
    (``min vis_k > max vis_q``), or only noised keys whose ids no query shares. The decision is taken
    over the whole batch (a pair is visited if any row needs it); the vectors must be padded to the blocks.

    Returns:
      ``(needed [nQ, nK] bool, ids [nQ, nK] int32, count [nQ] int32)``: the needed key block ids of query
      block ``i`` are ``ids[i, :count[i]]`` (ascending).
    """
    qs, ks = _summaries(q_vec, block_q), _summaries(k_vec, block_k)
    Q = lambda a: a[:, :, None]
    K = lambda a: a[:, None, :]
    need = (Q(qs.any) & K(ks.any)
            & (Q(qs.seg_min) <= K(ks.seg_max)) & (K(ks.seg_min) <= Q(qs.seg_max))
            & (K(ks.vis_min) <= Q(qs.vis_max))
            & (K(ks.clean) | ((K(ks.nblk_min) <= Q(qs.nblk_max)) & (Q(qs.nblk_min) <= K(ks.nblk_max)))))
    need = need.any(0)                                                       # [nQ, nK]
    ids = jnp.argsort((~need).astype(jnp.int32), axis=-1, stable=True).astype(jnp.int32)
    return need, ids, need.sum(-1).astype(jnp.int32)


def _allowed(qv: MaskVectors, kv: MaskVectors) -> jax.Array:
    """``[B, bq, bk]`` mask of one block pair."""
    return ((qv.seg[:, :, None] == kv.seg[:, None, :]) & (kv.seg > 0)[:, None, :]
            & (kv.vis[:, None, :] <= qv.vis[:, :, None])
            & ((kv.nblk[:, None, :] == 0) | (kv.nblk[:, None, :] == qv.nblk[:, :, None])))


def _scores(qb, kb, allowed, scale):
    """qb ``[B, bq, K, G, dh]``, kb ``[B, bk, K, dh]``, allowed ``[B, bq or 1, bk]`` -> ``[B, K, G, bq, bk]`` f32."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    return jnp.where(allowed[:, None, None], s, _NEG)


def _online_update(carry, qb, kb, vb, allowed, scale):
    """One key block of the running-max softmax (flash attention); float32 state."""
    m, l, acc = carry                                     # [B, K, G, bq], same, [B, K, G, bq, dh]
    s = _scores(qb, kb, allowed, scale)
    m_new = jnp.maximum(m, s.max(-1))
    corr = jnp.exp(m - m_new)
    # masked scores are _NEG: exp(_NEG - m) is exactly 0 once a row has seen an allowed key; a row that has
    # not (m_new == _NEG) subtracts 0 instead, so its masked entries are exp(_NEG) = 0 too (no second select)
    p = jnp.exp(s - jnp.where(m_new > 0.5 * _NEG, m_new, 0.0)[..., None])
    pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv


def _slice_vec(vec: MaskVectors, start, size) -> MaskVectors:
    return MaskVectors(*(jax.lax.dynamic_slice_in_dim(a, start, size, axis=1) for a in vec))


def _to_blocks(x, block):
    """``[B, L, ...] -> [L / block, B, block, ...]`` (scan over the leading axis)."""
    B, L = x.shape[:2]
    return jnp.moveaxis(x.reshape((B, L // block, block) + x.shape[2:]), 1, 0)


def _from_blocks(x):
    n, B, block = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape((B, n * block) + x.shape[3:])


def _forward(q, k, v, q_vec, k_vec, bq, bk, cache=None, bc=None):
    """Blocked forward on block-padded inputs.

    q ``[B, Lq, H, dh]`` (Lq a multiple of bq), k, v ``[B, Lk, K, dh]`` (Lk a multiple of bk).
    Returns ``(out [B, Lq, H, dh] q.dtype, lse [B, K, G, Lq] f32, visited)``: ``lse`` is the log-sum-exp
    of each query's allowed scores (0 where there is none); ``visited`` counts the key blocks computed.
    """
    B, Lq, H, dh = q.shape
    K = k.shape[2]
    G = H // K
    scale = dh ** -0.5
    _, ids, count = block_plan(q_vec, k_vec, bq, bk)
    if cache is not None:
        cap = cache.k.shape[2]
        bc = bc or _cache_block(cap)
        if cap % bc:
            raise ValueError(f"cache capacity {cap} is not a multiple of the cache block size {bc}")
        bt = _cache_block(cap, min(CACHE_TAIL_BLOCK, bc)) if Lq >= CACHE_TAIL_MIN_QUERIES else bc
        longest = jnp.minimum(jnp.max(cache.length), cap)
        # A big block that is the whole cache has a slice that does not depend on the loop trip: XLA hoists its
        # scores out of the (nearly always zero-trip) loop and computes them on every call (a 258-query flow
        # step against a 17-slot prompt scored all 256 slots in every layer). Such a cache is read in tail
        # blocks only (the same blocks as before for every cache that is not full, so results are unchanged).
        n_big = longest // bc if bc < cap else None           # full big blocks, then the rest in tail blocks
        n_tail = (longest - (0 if n_big is None else n_big * bc) + bt - 1) // bt   # (ends <= capacity)

    def q_block(visited, xs):
        qb, qv, ids_i, n_i = xs
        qb = qb.reshape(B, bq, K, G, dh)
        f32 = jnp.float32
        carry = (jnp.full((B, K, G, bq), _NEG, f32), jnp.zeros((B, K, G, bq), f32), jnp.zeros((B, K, G, bq, dh), f32))
        # ``visited`` is counted inside the loop bodies: it proves how many key blocks were computed
        if cache is not None:
            def cache_reader(size, first):
                def cache_body(t, c):
                    state, n = c
                    start = first + t * size
                    kb = jax.lax.dynamic_slice(cache.k, (cache.layer, 0, start, 0, 0), (1, B, size, K, dh))[0]
                    vb = jax.lax.dynamic_slice(cache.v, (cache.layer, 0, start, 0, 0), (1, B, size, K, dh))[0]
                    ok = ((start + jnp.arange(size))[None, :] < cache.length[:, None])[:, None, :]   # [B, 1, size]
                    return _online_update(state, qb, kb.astype(k.dtype), vb.astype(v.dtype), ok, scale), n + 1
                return cache_body
            first = 0
            if n_big is not None:
                carry, visited = jax.lax.fori_loop(0, n_big, cache_reader(bc, 0), (carry, visited))
                first = n_big * bc
            carry, visited = jax.lax.fori_loop(0, n_tail, cache_reader(bt, first), (carry, visited))

        def body(t, c):
            state, n = c
            start = ids_i[t] * bk
            kb = jax.lax.dynamic_slice_in_dim(k, start, bk, axis=1)
            vb = jax.lax.dynamic_slice_in_dim(v, start, bk, axis=1)
            return _online_update(state, qb, kb, vb, _allowed(qv, _slice_vec(k_vec, start, bk)), scale), n + 1

        # data-dependent trip count: only the key blocks the plan marks as needed
        (m, l, acc), visited = jax.lax.fori_loop(0, n_i, body, (carry, visited))
        has = l > 0
        out = acc / jnp.where(has, l, 1.0)[..., None]                         # [B, K, G, bq, dh]
        lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), 0.0)
        out = out.transpose(0, 3, 1, 2, 4).reshape(B, bq, H, dh).astype(q.dtype)
        return visited, (out, lse)

    qv_blocks = MaskVectors(*(_to_blocks(a, bq) for a in q_vec))
    visited, (out, lse) = jax.lax.scan(q_block, jnp.zeros((), jnp.int32), (_to_blocks(q, bq), qv_blocks, ids, count))
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, Lq)                         # [nQ, B, K, G, bq] -> [B, K, G, Lq]
    return _from_blocks(out), lse, visited


def _pad_inputs(q, k, v, q_vec, k_vec, block_q, block_k):
    Lq, Lk = q.shape[1], k.shape[1]
    bq, bk = _block_size(Lq, block_q), _block_size(Lk, block_k)
    nq, nk = -(-Lq // bq) * bq, -(-Lk // bk) * bk
    q_vec = MaskVectors(*(_pad_seq(a.astype(jnp.int32), nq) for a in q_vec))
    k_vec = MaskVectors(*(_pad_seq(a.astype(jnp.int32), nk) for a in k_vec))
    return _pad_seq(q, nq), _pad_seq(k, nk), _pad_seq(v, nk), q_vec, k_vec, bq, bk


def blocked_attention(q, k, v, q_vec: MaskVectors, k_vec: MaskVectors, *, cache: Optional[CacheView] = None,
                      block_q: Optional[int] = None, block_k: Optional[int] = None, block_cache: Optional[int] = None,
                      return_visited: bool = False):
    """The ``"blocked"`` implementation (see :func:`attention` for shapes and semantics).

    ``block_q`` / ``block_k``: queries / keys per block (default :func:`default_block`, with a cache
    :func:`_cached_block`; a sequence shorter than the block is one block, longer ones are padded to a
    multiple internally). Differentiable (custom VJP) without a cache; with
    a cache, forward only: the cache is read in blocks of ``block_cache`` slots (default: the largest power of
    two <= 512 dividing its capacity; none when that is the whole capacity) up to the last full block below
    the longest row's valid length, then
    in blocks of :data:`CACHE_TAIL_BLOCK` slots up to that length (whole blocks for fewer than
    :data:`CACHE_TAIL_MIN_QUERIES` queries). ``return_visited`` (tests, no cache gradient) also
    returns the number of key blocks computed (cache blocks included).
    """
    Lq = q.shape[1]
    pick = (lambda n: _cached_block(n, default_block())) if cache is not None else (lambda n: default_block())
    block_q, block_k = block_q or pick(Lq), block_k or pick(k.shape[1])
    q_p, k_p, v_p, qv, kv, bq, bk = _pad_inputs(q, k, v, q_vec, k_vec, block_q, block_k)
    if cache is None and not return_visited:
        _, ids, count = block_plan(qv, kv, bq, bk)
        return flash_blocked.flash(q_p, k_p, v_p, qv, kv, ids, count, bq, bk)[:, :Lq]
    out, _, visited = _forward(q_p, k_p, v_p, qv, kv, bq, bk, cache, block_cache)
    return (out[:, :Lq], visited) if return_visited else out[:, :Lq]
