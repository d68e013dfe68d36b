"""Flash attention as Pallas kernels that read BAGEL's three mask vectors block by block.

Same semantics as ``bagel_jax.nn.attention.attention(..., "xla")`` without a cache (the mask rule of the
rule of docs/architecture.md#attention-mask written as ``seg``/``vis``/``nblk``, see :mod:`bagel_jax.nn.attention`):

``allowed[q, k] = (seg_q == seg_k) & (seg_k > 0) & (vis_k <= vis_q) & ((nblk_k == 0) | (nblk_k == nblk_q))``

No ``[L, L]`` mask ever exists in memory: each kernel step loads the vectors of its query block and key block
and builds that block's mask in registers. A (query block, key block) pair whose per-block summaries of the
vectors prove it fully masked is skipped (``lax.cond``), so its matmuls are not issued.

Kernels (all plain ``pl.pallas_call`` with a grid and BlockSpecs, no backend-specific primitives):

* forward, grid ``(batch, heads, q_blocks)``: loops over key blocks with a running max / sum in float32 and
  saves the log-sum-exp for the backward;
* dq, grid ``(batch, heads, q_blocks)``: loops over key blocks;
* dk/dv, grid ``(batch, kv_heads, k_blocks)``: loops over query blocks and the query heads of its group (GQA:
  query head ``h`` reads kv head ``h // (heads // kv_heads)``), so dk/dv are summed over the group in-kernel.

Block sizes are powers of two (Triton tensors) of at least 16 (Triton ``dot``); a length shorter than the
block shrinks the block to the next power of two, so the padded length then equals the block (a "full
dimension" block, which TPU tiling also accepts). Lengths are padded to the blocks (padded keys get seg 0) and
a head_dim that is no power of two (SigLIP's 72) is zero-padded to the next one (128 for 72: the scores and
outputs are unchanged, the ViT's attention matmuls cost 128/72 of the unpadded ones). Float32 operands are
multiplied at full float32 precision (``Precision.HIGHEST``: IEEE in Triton, which otherwise uses TF32).

GPU lowering goes through the Pallas Triton backend, deprecated in jax 0.11 (docs/gpu.md): while the installed
jax has it, "pallas" lowers for CUDA / ROCm; once it is gone, the GPU branch raises NotImplementedError naming
the alternatives ("cudnn", "blocked"), and the TPU (Mosaic) and interpret paths are unaffected.

Caveats (checked on CPU only: interpret mode, plus ahead-of-time lowering to Triton IR and Mosaic MLIR; the
device compilers never ran):

* The forward and dq kernels take the whole key/value length of one kv head as a block, and dk/dv the whole
  query length of the G query heads of its group. On GPU (Triton) a block is a pointer and this costs nothing;
  on TPU those blocks are copied into VMEM, which bounds the sequence length (at 32k tokens, head_dim 128,
  bf16, G = 7 the dk/dv inputs alone exceed VMEM). A TPU-sized variant would put the inner loop in the grid
  with VMEM scratch accumulators (backend-specific), as jax's TPU flash attention does.
* One ``jax.export`` for several platforms at once fails ("Compiler params for platform gpu cannot be used for
  tpu lowering"): ``lax.platform_dependent`` lowers every branch for every platform. Export per platform.
* The kernels are opaque to the SPMD partitioner: with sharded inputs call this under ``shard_map`` (batch and
  heads shard trivially; the sequence axis does not).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

try:    # deprecated in jax 0.11 (docs/gpu.md): without it "pallas" has no GPU lowering and says so
    from jax.experimental.pallas import triton as pltriton
except ImportError:
    pltriton = None

from .mask import MaskVectors

_NEG = -1e30          # finite "minus infinity": masked scores never produce inf - inf = NaN
_BIG = 2 ** 30        # larger than any seg / vis / nblk value (min over an empty set)
_F32 = jnp.float32


def _allowed(qs, qv, qn, ks, kv, kn):
    """The mask rule on broadcastable vector blocks (``[bq, 1]`` q with ``[1, bk]`` k, or the transpose)."""
    return (qs == ks) & (ks > 0) & (kv <= qv) & ((kn == 0) | (kn == qn))


def _may_attend(qs, qv, qn, ks, kv, kn):
    """Scalar bool: False only if no (query, key) pair of the two blocks is allowed.

    Sound per-block summaries: an allowed pair needs a valid key (seg > 0) and a query of the same segment
    (the valid seg ranges overlap), a key no later than some query (min vis_k <= max vis_q), and, when every
    valid key sits in a noised block, a query of an overlapping noised-block id range."""
    qok, kok = qs > 0, ks > 0
    qs_lo, qs_hi = jnp.min(jnp.where(qok, qs, _BIG)), jnp.max(qs)
    ks_lo, ks_hi = jnp.min(jnp.where(kok, ks, _BIG)), jnp.max(ks)
    seg = (ks_lo <= qs_hi) & (qs_lo <= ks_hi)
    order = jnp.min(jnp.where(kok, kv, _BIG)) <= jnp.max(jnp.where(qok, qv, -1))
    kn_lo, kn_hi = jnp.min(jnp.where(kok, kn, _BIG)), jnp.max(jnp.where(kok, kn, -1))
    qn_lo, qn_hi = jnp.min(jnp.where(qok, qn, _BIG)), jnp.max(jnp.where(qok, qn, -1))
    noise = (kn_lo == 0) | ((kn_lo <= qn_hi) & (qn_lo <= kn_hi))
    return seg & order & noise


def _precision(a, b):
    """Full float32 products for float32 operands: Triton's float32 ``dot`` otherwise rounds its inputs to TF32
    (10-bit mantissa; about 1e-3 relative error on the scores). Low-precision operands keep the default."""
    return lax.Precision.HIGHEST if a.dtype == _F32 and b.dtype == _F32 else None


def _dot_nt(a, b):
    """``a @ b.T`` with float32 accumulation: ``[m, d] x [n, d] -> [m, n]``."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a, b), preferred_element_type=_F32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a, b), preferred_element_type=_F32)


# ----------------------------------------------------------------------------------------------- kernels

def _fwd_kernel(qs_ref, qv_ref, qn_ref, ks_ref, kv_ref, kn_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                *, scale, block_k, num_k):
    q = q_ref[...]                                                  # [bq, dh]
    qs, qv, qn = qs_ref[...], qv_ref[...], qn_ref[...]              # [bq, 1]
    bq, dh = q.shape

    def body(j, carry):
        sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        ks, kv, kn = ks_ref[:, sl], kv_ref[:, sl], kn_ref[:, sl]    # [1, bk]

        def visit(carry):
            m, l, acc = carry
            allowed = _allowed(qs, qv, qn, ks, kv, kn)              # [bq, bk]
            s = jnp.where(allowed, _dot_nt(q, k_ref[sl, :]) * scale, _NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)         # exact 0 on masked keys, even if all are
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=1, keepdims=True)
            acc = acc * corr + _dot(p.astype(v_ref.dtype), v_ref[sl, :])
            return m_new, l, acc

        return lax.cond(_may_attend(qs, qv, qn, ks, kv, kn), visit, lambda c: c, carry)

    init = (jnp.full((bq, 1), _NEG, _F32), jnp.zeros((bq, 1), _F32), jnp.zeros((bq, dh), _F32))
    m, l, acc = lax.fori_loop(0, num_k, body, init)
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / safe_l).astype(o_ref.dtype)                 # fully masked rows: acc = 0 -> exactly 0
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)


def _dq_kernel(qs_ref, qv_ref, qn_ref, ks_ref, kv_ref, kn_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, scale, block_k, num_k):
    q, do = q_ref[...], do_ref[...]                                 # [bq, dh]
    lse, delta = lse_ref[...], delta_ref[...]                       # [bq, 1] float32
    qs, qv, qn = qs_ref[...], qv_ref[...], qn_ref[...]

    def body(j, dq):
        sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        ks, kv, kn = ks_ref[:, sl], kv_ref[:, sl], kn_ref[:, sl]

        def visit(dq):
            kb, vb = k_ref[sl, :], v_ref[sl, :]
            allowed = _allowed(qs, qv, qn, ks, kv, kn)
            p = jnp.where(allowed, jnp.exp(_dot_nt(q, kb) * scale - lse), 0.0)    # [bq, bk]
            ds = p * (_dot_nt(do, vb) - delta)
            return dq + _dot(ds.astype(kb.dtype), kb)

        return lax.cond(_may_attend(qs, qv, qn, ks, kv, kn), visit, lambda c: c, dq)

    dq = lax.fori_loop(0, num_k, body, jnp.zeros(q.shape, _F32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(ks_ref, kv_ref, kn_ref, qs_ref, qv_ref, qn_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, scale, block_q, num_q, groups):
    # Transposed scores ([keys, queries]) keep every vector in the layout it is stored in: the key vectors
    # of this block as columns, the query vectors, lse and delta as lane-dense rows.
    kb, vb = k_ref[...], v_ref[...]                                 # [bk, dh]
    ks, kv, kn = ks_ref[...], kv_ref[...], kn_ref[...]              # [bk, 1]

    def body(i, carry):
        sl = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        qs, qv, qn = qs_ref[:, sl], qv_ref[:, sl], qn_ref[:, sl]    # [1, bq]

        def visit(carry):
            allowed = _allowed(qs, qv, qn, ks, kv, kn)              # [bk, bq]

            def head(g, carry):
                dk, dv = carry
                qb, dob = q_ref[g, sl, :], do_ref[g, sl, :]         # [bq, dh]
                lse, delta = lse_ref[g, :, sl], delta_ref[g, :, sl]  # [1, bq]
                pt = jnp.where(allowed, jnp.exp(_dot_nt(kb, qb) * scale - lse), 0.0)
                dv = dv + _dot(pt.astype(dob.dtype), dob)
                dst = pt * (_dot_nt(vb, dob) - delta)
                dk = dk + _dot(dst.astype(qb.dtype), qb)
                return dk, dv

            return lax.fori_loop(0, groups, head, carry)

        return lax.cond(_may_attend(qs, qv, qn, ks, kv, kn), visit, lambda c: c, carry)

    zeros = jnp.zeros(kb.shape, _F32)
    dk, dv = lax.fori_loop(0, num_q, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------- wrappers

def _pallas(kernel, *, grid, in_specs, out_specs, out_shape, interpret, name):
    """``pl.pallas_call`` with the compiler parameters of the platform it is lowered for.

    The choice is staged out with ``lax.platform_dependent`` (made at lowering time, so ahead-of-time lowering
    for another platform picks the right one): CUDA/ROCm lower through Triton (jax's default GPU lowering is
    Mosaic GPU, whose TMA copies need 16-byte strides that the ``[..., 1]`` vector blocks do not have), TPU
    through Mosaic with every grid axis parallel (no kernel accumulates across grid steps)."""
    def call(params, *args):
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                              compiler_params=params, interpret=interpret, name=name)(*args)

    if interpret:
        return functools.partial(call, None)
    triton = functools.partial(call, pltriton.CompilerParams()) if pltriton is not None else _no_triton
    tpu = functools.partial(call, pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid)))
    return lambda *args: lax.platform_dependent(*args, cuda=triton, rocm=triton, tpu=tpu,
                                                default=functools.partial(call, None))


def _no_triton(*args):
    raise NotImplementedError("attention implementation 'pallas' needs the Pallas Triton backend "
                              "(jax.experimental.pallas.triton), which this jax no longer has; on GPU use 'cudnn' "
                              "up to 16k keys or 'blocked' (docs/gpu.md)")


def _block(requested: int, length: int) -> int:
    return min(requested, max(16, pl.next_power_of_2(length)))


def _pad_to(x, length, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


class _Layout:
    """Padded, head-major operands shared by the forward and backward passes."""

    def __init__(self, q, k, v, q_vec, k_vec, block_q, block_k):
        B, Lq, H, dh = q.shape
        Lk, K = k.shape[1], k.shape[2]
        self.B, self.Lq, self.Lk, self.H, self.K, self.G, self.dh = B, Lq, Lk, H, K, H // K, dh
        self.bq, self.bk = _block(block_q, Lq), _block(block_k, Lk)
        self.Lqp = pl.cdiv(Lq, self.bq) * self.bq
        self.Lkp = pl.cdiv(Lk, self.bk) * self.bk
        # Triton tensors have power-of-two sizes: a head_dim such as SigLIP's 72 is padded with zeros (q.k and
        # p @ v are unchanged, the padded output columns are sliced off); the softmax scale keeps the real dh.
        self.dhp = pl.next_power_of_2(dh)
        self.q = self.pad_heads(q, self.Lqp)                       # [B, H, Lqp, dhp]
        self.k = self.pad_heads(k, self.Lkp)                       # [B, K, Lkp, dhp]
        self.v = self.pad_heads(v, self.Lkp)
        # padded keys get seg 0 (never visible); padded query rows see nothing and are sliced off
        qv = [_pad_to(x.astype(jnp.int32), self.Lqp, 1) for x in q_vec]   # 3 x [B, Lqp]
        kv = [_pad_to(x.astype(jnp.int32), self.Lkp, 1) for x in k_vec]   # 3 x [B, Lkp]
        self.q_cols = [x[:, :, None] for x in qv]                  # [B, Lqp, 1]
        self.q_rows = [x[:, None, :] for x in qv]                  # [B, 1, Lqp]
        self.k_cols = [x[:, :, None] for x in kv]                  # [B, Lkp, 1]
        self.k_rows = [x[:, None, :] for x in kv]                  # [B, 1, Lkp]

    def pad_heads(self, x, length):
        """``[B, L, heads, dh] -> [B, heads, length, dhp]`` with zeros in the padding."""
        return _pad_to(_pad_to(x.transpose(0, 2, 1, 3), length, 2), self.dhp, 3)

    def heads_out(self, x, length):
        """``[B, heads, padded, dhp] -> [B, length, heads, dh]``."""
        return x[:, :, :length, :self.dh].transpose(0, 2, 1, 3)


def _forward(t: _Layout, interpret):
    G, bq, bk, dh = t.G, t.bq, t.bk, t.dhp
    grid = (t.B, t.H, t.Lqp // bq)
    qcol = pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0))
    krow = pl.BlockSpec((None, 1, t.Lkp), lambda b, h, i: (b, 0, 0))
    qblk = pl.BlockSpec((None, None, bq, dh), lambda b, h, i: (b, h, i, 0))
    kall = pl.BlockSpec((None, None, t.Lkp, dh), lambda b, h, i: (b, h // G, 0, 0))
    lse_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    kernel = functools.partial(_fwd_kernel, scale=t.dh ** -0.5, block_k=bk, num_k=t.Lkp // bk)
    o, lse = _pallas(
        kernel, grid=grid,
        in_specs=[qcol] * 3 + [krow] * 3 + [qblk, kall, kall],
        out_specs=[qblk, lse_spec],
        out_shape=[jax.ShapeDtypeStruct(t.q.shape, t.q.dtype),
                   jax.ShapeDtypeStruct((t.B, t.H, t.Lqp, 1), _F32)],
        interpret=interpret, name="bagel_flash_fwd",
    )(*t.q_cols, *t.k_rows, t.q, t.k, t.v)
    return o, lse                                                  # [B, H, Lqp, dh], [B, H, Lqp, 1]


def _backward(t: _Layout, o, lse, do, interpret):
    G, bq, bk, dh, B, H, K = t.G, t.bq, t.bk, t.dhp, t.B, t.H, t.K
    scale = t.dh ** -0.5
    delta = jnp.sum(o.astype(_F32) * do.astype(_F32), axis=-1, keepdims=True)   # [B, H, Lqp, 1]

    qcol = pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0))
    krow = pl.BlockSpec((None, 1, t.Lkp), lambda b, h, i: (b, 0, 0))
    qblk = pl.BlockSpec((None, None, bq, dh), lambda b, h, i: (b, h, i, 0))
    kall = pl.BlockSpec((None, None, t.Lkp, dh), lambda b, h, i: (b, h // G, 0, 0))
    stat = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    dq = _pallas(
        functools.partial(_dq_kernel, scale=scale, block_k=bk, num_k=t.Lkp // bk),
        grid=(B, H, t.Lqp // bq),
        in_specs=[qcol] * 3 + [krow] * 3 + [qblk, kall, kall, qblk, stat, stat],
        out_specs=qblk,
        out_shape=jax.ShapeDtypeStruct(t.q.shape, t.q.dtype),
        interpret=interpret, name="bagel_flash_dq",
    )(*t.q_cols, *t.k_rows, t.q, t.k, t.v, do, lse, delta)

    # the G query heads of kv head kh are heads kh*G .. kh*G+G-1: one block of G along the head axis
    kcol = pl.BlockSpec((None, bk, 1), lambda b, kh, j: (b, j, 0))
    qrow = pl.BlockSpec((None, 1, t.Lqp), lambda b, kh, j: (b, 0, 0))
    kblk = pl.BlockSpec((None, None, bk, dh), lambda b, kh, j: (b, kh, j, 0))
    qgrp = pl.BlockSpec((None, G, t.Lqp, dh), lambda b, kh, j: (b, kh, 0, 0))
    sgrp = pl.BlockSpec((None, None, G, 1, t.Lqp), lambda b, kh, j: (b, kh, 0, 0, 0))
    as_rows = lambda x: x.reshape(B, K, G, 1, t.Lqp)               # [B, H, Lqp, 1] -> [B, K, G, 1, Lqp]
    dk, dv = _pallas(
        functools.partial(_dkdv_kernel, scale=scale, block_q=bq, num_q=t.Lqp // bq, groups=G),
        grid=(B, K, t.Lkp // bk),
        in_specs=[kcol] * 3 + [qrow] * 3 + [kblk, kblk, qgrp, qgrp, sgrp, sgrp],
        out_specs=[kblk, kblk],
        out_shape=[jax.ShapeDtypeStruct(t.k.shape, t.k.dtype), jax.ShapeDtypeStruct(t.v.shape, t.v.dtype)],
        interpret=interpret, name="bagel_flash_dkdv",
    )(*t.k_cols, *t.q_rows, t.k, t.v, t.q, do, as_rows(lse), as_rows(delta))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, q_vec, k_vec, block_q, block_k, interpret):
    return _flash_fwd(q, k, v, q_vec, k_vec, block_q, block_k, interpret)[0]


def _flash_fwd(q, k, v, q_vec, k_vec, block_q, block_k, interpret):
    t = _Layout(q, k, v, q_vec, k_vec, block_q, block_k)
    o, lse = _forward(t, interpret)
    return t.heads_out(o, t.Lq), (q, k, v, q_vec, k_vec, o, lse)


def _flash_bwd(block_q, block_k, interpret, res, g):
    q, k, v, q_vec, k_vec, o, lse = res
    t = _Layout(q, k, v, q_vec, k_vec, block_q, block_k)
    do = t.pad_heads(g.astype(q.dtype), t.Lqp)                     # [B, H, Lqp, dhp]
    dq, dk, dv = _backward(t, o, lse, do, interpret)
    return t.heads_out(dq, t.Lq), t.heads_out(dk, t.Lk), t.heads_out(dv, t.Lk), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_vec: MaskVectors, k_vec: MaskVectors, *,
                    block_q: int = 128, block_k: int = 128, interpret: bool | None = None) -> jax.Array:
    """Flash attention over packed BAGEL masks given as mask vectors (Pallas forward and backward kernels).

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``.
      k, v: ``[batch, k_len, num_kv_heads, head_dim]``; ``num_heads % num_kv_heads == 0`` (query head ``h``
        reads kv head ``h // (num_heads // num_kv_heads)``).
      q_vec, k_vec: :class:`MaskVectors` of the queries / keys, each field ``[batch, q_len]`` / ``[batch, k_len]``
        int32.
      block_q, block_k: rows / keys per block (powers of two >= 16 for the GPU backend; multiples of 128, or
        at least the padded length, for TPU tiling). Lengths are padded internally to the block.
      interpret: run the kernels in the Pallas interpreter; ``None`` = interpret on CPU, compiled elsewhere.
    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in ``q.dtype``. Softmax scale ``1/sqrt(head_dim)``, softmax in
      float32; a query row with no allowed key returns exactly 0 and gets 0 gradient. Differentiable in
      ``q``, ``k``, ``v`` (float32 accumulation in every kernel).
    """
    B, Lq, H, dh = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[3] != dh:
        raise ValueError(f"k and v must be [batch, k_len, kv_heads, {dh}] with batch {B}; got {k.shape}, {v.shape}")
    if H % k.shape[2]:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {k.shape[2]}")
    for name, vec, L in (("q_vec", q_vec, Lq), ("k_vec", k_vec, k.shape[1])):
        for field, x in zip(MaskVectors._fields, vec):
            if x.shape != (B, L):
                raise ValueError(f"{name}.{field} must be [{B}, {L}]; got {x.shape}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b < 8 or b % 8:
            raise ValueError(f"{name} must be a multiple of 8; got {b}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _flash(q, k, v, MaskVectors(*q_vec), MaskVectors(*k_vec), int(block_q), int(block_k), bool(interpret))
