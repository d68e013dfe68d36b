"""The differentiable, cache-free path of the ``"blocked"`` attention (:mod:`bagel_jax.nn.blocked_attention`):
flash attention in plain JAX with a custom VJP, laid out head-major for the matmuls.

The inputs are cut once into query blocks ``[nQ, B, K, G * bq, dh]`` and key / value blocks
``[nK, B, K, bk, dh]`` (``K`` kv heads, ``G`` query heads per kv head; row ``g * bq + t`` of a query block
is head ``g`` of token ``t``), so every matmul of a block pair is a batched matmul over ``(B, K)`` on
contiguous operands, and the loops index whole blocks. (Token-major, ``[B, L, K, G, dh]`` as the model
gives them, XLA:CPU copied and transposed the query, output-gradient and key / value blocks on every
visited block pair.)

The key blocks each query block visits are given (``ids``, ``count`` of
:func:`bagel_jax.nn.blocked_attention.block_plan`); the softmax runs online in float32 and the backward
recomputes each visited pair's probabilities from the saved log-sum-exp, so memory stays O(L).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .mask import MaskVectors

_NEG = -1e30  # finite "minus infinity": fully masked rows stay NaN-free


def _q_blocks(x, bq, K):
    """``[B, L, K * G, dh] -> [L / bq, B, K, G * bq, dh]``."""
    B, L, H, dh = x.shape
    G = H // K
    return x.reshape(B, L // bq, bq, K, G, dh).transpose(1, 0, 3, 4, 2, 5).reshape(L // bq, B, K, G * bq, dh)


def _from_q_blocks(x, G):
    """Inverse of :func:`_q_blocks`: ``[nQ, B, K, G * bq, dh] -> [B, nQ * bq, K * G, dh]``."""
    nQ, B, K, M, dh = x.shape
    bq = M // G
    return x.reshape(nQ, B, K, G, bq, dh).transpose(1, 0, 4, 2, 3, 5).reshape(B, nQ * bq, K * G, dh)


def _kv_blocks(x, bk):
    """``[B, L, K, dh] -> [L / bk, B, K, bk, dh]``."""
    B, L, K, dh = x.shape
    return x.reshape(B, L // bk, bk, K, dh).transpose(1, 0, 3, 2, 4)


def _from_kv_blocks(x):
    nK, B, K, bk, dh = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, nK * bk, K, dh)


def _vec_blocks(vec: MaskVectors, block):
    """Each vector ``[B, L] -> [L / block, B, block]``."""
    return MaskVectors(*(jnp.moveaxis(a.reshape(a.shape[0], -1, block), 1, 0) for a in vec))


def _allowed(qv: MaskVectors, kv: MaskVectors):
    """``[B, 1, 1, bq, bk]`` mask of one block pair (broadcast over kv heads and query heads)."""
    a = ((qv.seg[:, :, None] == kv.seg[:, None, :]) & (kv.seg > 0)[:, None, :]
         & (kv.vis[:, None, :] <= qv.vis[:, :, None])
         & ((kv.nblk[:, None, :] == 0) | (kv.nblk[:, None, :] == qv.nblk[:, :, None])))
    return a[:, None, None]


def _scores(qb, kb, ok, scale):
    """qb ``[B, K, G * bq, dh]``, kb ``[B, K, bk, dh]``, ok ``[B, 1, 1, bq, bk]`` -> masked float32 scores
    ``[B, K, G, bq, bk]``."""
    B, K, M, _ = qb.shape
    s = jnp.einsum("bkmd,bknd->bkmn", qb, kb, preferred_element_type=jnp.float32) * scale
    return jnp.where(ok, s.reshape(B, K, M // ok.shape[3], ok.shape[3], -1), _NEG)


def _forward(q, k, v, q_vec, k_vec, ids, count, bq, bk):
    """Head-major blocked forward on block-padded inputs. Returns ``(out [B, Lq, H, dh], residuals)``."""
    B, Lq, H, dh = q.shape
    K = k.shape[2]
    G = H // K
    scale = dh ** -0.5
    f32 = jnp.float32
    qh, kh, vh = _q_blocks(q, bq, K), _kv_blocks(k, bk), _kv_blocks(v, bk)
    kvec = _vec_blocks(k_vec, bk)

    def q_block(_, xs):
        qb, qv, ids_i, n_i = xs

        def body(t, c):
            m, l, acc = c                                   # [B, K, G, bq], same, [B, K, G * bq, dh]
            j = ids_i[t]
            s = _scores(qb, kh[j], _allowed(qv, MaskVectors(*(a[j] for a in kvec))), scale)
            m_new = jnp.maximum(m, s.max(-1))
            corr = jnp.exp(m - m_new)
            # masked scores are _NEG: exp(_NEG - m) is 0 once a row has seen an allowed key; a row that has not
            # (m_new == _NEG) subtracts 0 instead, so its masked entries are exp(_NEG) = 0 too
            p = jnp.exp(s - jnp.where(m_new > 0.5 * _NEG, m_new, 0.0)[..., None])
            pv = jnp.einsum("bkmn,bknd->bkmd", p.reshape(B, K, G * bq, bk).astype(v.dtype), vh[j],
                            preferred_element_type=f32)
            return m_new, l * corr + p.sum(-1), acc * corr.reshape(B, K, G * bq, 1) + pv

        init = (jnp.full((B, K, G, bq), _NEG, f32), jnp.zeros((B, K, G, bq), f32), jnp.zeros((B, K, G * bq, dh), f32))
        m, l, acc = jax.lax.fori_loop(0, n_i, body, init)
        has = l > 0
        out = acc / jnp.where(has, l, 1.0).reshape(B, K, G * bq, 1)
        lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), 0.0)
        return None, (out.astype(q.dtype), lse)

    _, (out_h, lse) = jax.lax.scan(q_block, None, (qh, _vec_blocks(q_vec, bq), ids, count))
    return _from_q_blocks(out_h, G), (qh, kh, vh, q_vec, k_vec, ids, count, out_h, lse)


def _backward(res, do, bq, bk):
    qh, kh, vh, q_vec, k_vec, ids, count, out_h, lse = res
    nQ, B, K, M, dh = qh.shape
    G = M // bq
    scale = dh ** -0.5
    f32 = jnp.float32
    doh = _q_blocks(do, bq, K)
    delta = jnp.sum(doh.astype(f32) * out_h.astype(f32), -1).reshape(nQ, B, K, G, bq)
    kvec = _vec_blocks(k_vec, bk)

    def q_block(dkv, xs):
        qb, dob, qv, lse_i, delta_i, ids_i, n_i = xs

        def body(t, c):
            dq, dk, dv = c
            j = ids_i[t]
            kb, vb = kh[j], vh[j]
            ok = _allowed(qv, MaskVectors(*(a[j] for a in kvec)))
            p = jnp.where(ok, jnp.exp(_scores(qb, kb, ok, scale) - lse_i[..., None]), 0.0)   # [B, K, G, bq, bk]
            p2 = p.reshape(B, K, M, bk)
            dv_j = jnp.einsum("bkmn,bkmd->bknd", p2.astype(dob.dtype), dob, preferred_element_type=f32)
            dp = jnp.einsum("bkmd,bknd->bkmn", dob, vb, preferred_element_type=f32).reshape(p.shape)
            ds = (p * (dp - delta_i[..., None]) * scale).reshape(B, K, M, bk)
            dq = dq + jnp.einsum("bkmn,bknd->bkmd", ds.astype(kb.dtype), kb, preferred_element_type=f32)
            dk_j = jnp.einsum("bkmn,bkmd->bknd", ds.astype(qb.dtype), qb, preferred_element_type=f32)
            return dq, dk.at[j].add(dk_j), dv.at[j].add(dv_j)

        dq, dk, dv = jax.lax.fori_loop(0, n_i, body, (jnp.zeros((B, K, M, dh), f32),) + dkv)
        return (dk, dv), dq

    zeros = jnp.zeros(kh.shape, f32)
    xs = (qh, doh, _vec_blocks(q_vec, bq), lse, delta, ids, count)
    (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), xs)
    return (_from_q_blocks(dq, G).astype(qh.dtype), _from_kv_blocks(dk).astype(kh.dtype),
            _from_kv_blocks(dv).astype(vh.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def flash(q, k, v, q_vec: MaskVectors, k_vec: MaskVectors, ids, count, bq: int, bk: int):
    """Attention of block-padded ``q [B, Lq, H, dh]``, ``k, v [B, Lk, K, dh]`` (``Lq`` a multiple of ``bq``,
    ``Lk`` of ``bk``) visiting key blocks ``ids[i, :count[i]]`` for query block ``i``; ``[B, Lq, H, dh]``
    in ``q.dtype``, 0 for a query without an allowed key."""
    return _forward(q, k, v, q_vec, k_vec, ids, count, bq, bk)[0]


def _flash_fwd(q, k, v, q_vec, k_vec, ids, count, bq, bk):
    return _forward(q, k, v, q_vec, k_vec, ids, count, bq, bk)


def _flash_bwd(bq, bk, res, do):
    dq, dk, dv = _backward(res, do, bq, bk)
    return dq, dk, dv, None, None, None, None


flash.defvjp(_flash_fwd, _flash_bwd)
