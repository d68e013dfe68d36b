"""Pallas flash attention (interpret mode on CPU) against the dense reference on masks from the real packing code.

Ahead-of-time lowering for GPU and TPU at the real shapes: tests/test_gpu_lowering.py.

Interpret-mode kernels take ~10-20 s to compile on CPU, so every test jits one function that returns the output
and all three gradients, and cases share shapes where they can (the poison cases reuse one compiled program).
"""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from bagel_jax.config import config_from_folder
from bagel_jax.data import packing
from bagel_jax.data.packing import Capacities, SpecialTokens, TextItem, VaeItem, VitItem
from bagel_jax.nn.attention import MaskVectors, dense_mask
from bagel_jax.nn.pallas_attention import flash_attention

SPECIAL = SpecialTokens(bos=1, eos=2, start_of_image=3, end_of_image=4)


@pytest.fixture(scope="module")
def cfg(tiny_a):
    return config_from_folder(tiny_a)


def img(h, w, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (3, h, w)).astype(np.float32)


def text(n, seed, loss=False):
    return TextItem(list(np.random.default_rng(seed).integers(10, 100, n)), loss=loss)


def vectors(b) -> MaskVectors:
    return MaskVectors(jnp.asarray(b.seg), jnp.asarray(b.vis), jnp.asarray(b.nblk))


def reference(q, k, v, q_vec, k_vec):
    """Dense float32 softmax attention with the mask of ``dense_mask``; fully masked rows give 0."""
    G = q.shape[2] // k.shape[2]
    mask = dense_mask(q_vec, k_vec)[:, None]                               # [B, 1, Lq, Lk]
    kk, vv = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk, precision="highest") * q.shape[-1] ** -0.5
    p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1) * mask          # zero rows where nothing is allowed
    return jnp.einsum("bhqk,bkhd->bqhd", p, vv, precision="highest")


def out_and_grads(attn):
    """jit of ``(q, k, v, q_vec, k_vec, dout) -> (out, dq, dk, dv)`` for ``attn(q, k, v, q_vec, k_vec)``."""
    def f(q, k, v, q_vec, k_vec, do):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, q_vec, k_vec), q, k, v)
        return (out, *vjp(do))
    return jax.jit(f)


def flash(block_q, block_k):
    return functools.partial(flash_attention, block_q=block_q, block_k=block_k)


def random_qkvo(seed, B, Lq, Lk, H, K, dh):
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    return n(B, Lq, H, dh), n(B, Lk, K, dh), n(B, Lk, K, dh), n(B, Lq, H, dh)


def assert_close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(got).all(), what
    scale = max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got - want).max())
    # float32 parity: both sides accumulate in float32 with different summation orders
    assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def packed(cfg):
    """Three rows: three samples (ViT, text with loss, clean and noised VAE blocks), two samples padded to a
    longer row (150 tokens, not a multiple of the blocks), and an empty row (every query fully masked)."""
    s1 = [VitItem(img(28, 42, 0)), text(10, 1, True), VaeItem(img(32, 48, 2)), VaeItem(img(48, 32, 3), True, 0.3),
          text(8, 4, True)]
    s2 = [text(20, 5, True), VaeItem(img(32, 32, 6), True, -0.5), VitItem(img(28, 28, 7)), text(5, 8)]
    s3 = [text(15, 9, True), VaeItem(img(64, 48, 10), True, 0.1), VaeItem(img(32, 32, 11), True, 1.0),
          text(6, 12, True)]
    s4 = [text(30, 13, True), VaeItem(img(48, 48, 14)), text(12, 15)]
    s5 = [VitItem(img(42, 42, 16)), text(9, 17, True)]
    b = packing.pack([[s1, s2, s3], [s4, s5], []], SPECIAL, cfg, Capacities(row_len=150))
    assert b.shape == (3, 150)
    assert (b.nblk > 0).any() and (b.seg[1] == 0).any() and (b.seg[2] == 0).all()
    return b


def test_gqa_head_dim_72_self_attention_equals_dense(packed):
    """head_dim 72 (SigLIP's) is no power of two: the kernels run on zero-padded heads of 128."""
    vec = vectors(packed)
    B, L = packed.shape
    q, k, v, do = random_qkvo(0, B, L, L, 4, 2, 72)
    got = out_and_grads(flash(32, 64))(q, k, v, vec, vec, do)
    want = out_and_grads(reference)(q, k, v, vec, vec, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, name)
    # fully masked rows (padding, the empty row) return exactly 0 with exactly 0 gradient
    dead = ~np.asarray(dense_mask(vec, vec)).any(-1)                       # [B, L]
    np.testing.assert_array_equal(dead, packed.seg == 0)
    assert dead[2].all() and dead[1].any()
    assert not np.asarray(got[0])[dead].any() and not np.asarray(got[1])[dead].any()


def test_equal_heads_head_dim_128_permuted_queries_and_keys_equal_dense(packed):
    """Queries are a reordered subset of the tokens and keys a reordered row (the mask ignores physical order);
    q_len 97 and k_len 150 are not multiples of the blocks."""
    rng = np.random.default_rng(1)
    B, L = packed.shape
    qi = np.stack([rng.permutation(L)[:97] for _ in range(B)])
    ki = np.stack([rng.permutation(L) for _ in range(B)])
    take = lambda x, i: jnp.asarray(np.take_along_axis(x, i, axis=1))
    q_vec = MaskVectors(*(take(x, qi) for x in (packed.seg, packed.vis, packed.nblk)))
    k_vec = MaskVectors(*(take(x, ki) for x in (packed.seg, packed.vis, packed.nblk)))
    q, k, v, do = random_qkvo(2, B, 97, L, 2, 2, 128)
    got = out_and_grads(flash(64, 32))(q, k, v, q_vec, k_vec, do)
    want = out_and_grads(reference)(q, k, v, q_vec, k_vec, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, name)


@pytest.fixture(scope="module")
def poison_layout(cfg):
    """Two rows of four 32-token blocks. Row 0: two text samples of two blocks each. Row 1: one sample of
    text (block 0), a noised VAE block (block 1: 5x6 latents + 2 markers), then two text blocks."""
    b = packing.pack([[[text(62, 0)], [text(62, 1)]],
                      [[text(30, 2), VaeItem(img(80, 96, 3), True, 0.2), text(30, 4), text(30, 5)]]],
                     SPECIAL, cfg)
    assert b.shape == (2, 128)
    assert (b.nblk[1, 32:64] == 1).all() and (b.nblk[1, :32] == 0).all() and (b.nblk[1, 64:] == 0).all()
    return b


def test_fully_masked_blocks_are_skipped(poison_layout):
    """NaN in a block that the kernels must skip leaves every value that does not read it finite and exact
    (0 * NaN = NaN: a block whose matmuls were issued would poison its rows). Skips exercised: another sample
    (seg), a later causal block (vis), a noised block seen from the text after it (nblk); in the forward, dq and
    dk/dv kernels."""
    vec = vectors(poison_layout)
    q, k, v, do = random_qkvo(3, 2, 128, 128, 4, 2, 64)
    f = out_and_grads(flash(32, 32))
    want = out_and_grads(reference)(q, k, v, vec, vec, do)
    nan = jnp.nan

    # poisoned keys/values: row 0 block 3 (sample 2's last block), row 1 block 1 (the noised block)
    kp = k.at[0, 96:].set(nan).at[1, 32:64].set(nan)
    vp = v.at[0, 96:].set(nan).at[1, 32:64].set(nan)
    out, dq, _, _ = f(q, kp, vp, vec, vec, do)
    rows = [(0, slice(0, 96)), (1, slice(0, 32)), (1, slice(64, 128))]
    for b, r in rows:
        assert_close(out[b, r], want[0][b, r], f"out row {b} {r}")
        assert_close(dq[b, r], want[1][b, r], f"dq row {b} {r}")
    assert np.isnan(np.asarray(out[0, 96:])).all()                         # the poison does reach its readers

    # poisoned queries/cotangents: row 0 block 0 (sample 1's first block), row 1 blocks 2-3 (after the noise)
    qp = q.at[0, :32].set(nan).at[1, 64:].set(nan)
    dop = do.at[0, :32].set(nan).at[1, 64:].set(nan)
    _, _, dk, dv = f(qp, k, v, vec, vec, dop)
    keys = [(0, slice(32, 128)), (1, slice(32, 64))]
    for b, r in keys:
        assert_close(dk[b, r], want[2][b, r], f"dk row {b} {r}")
        assert_close(dv[b, r], want[3][b, r], f"dv row {b} {r}")
    assert np.isnan(np.asarray(dk[0, :32])).all()


def test_rejects_bad_shapes():
    B, L = 1, 16
    vec = MaskVectors(*(jnp.ones((B, L), jnp.int32),) * 3)
    q = jnp.zeros((B, L, 3, 64))
    with pytest.raises(ValueError, match="num_kv_heads"):
        flash_attention(q, jnp.zeros((B, L, 2, 64)), jnp.zeros((B, L, 2, 64)), vec, vec)
    with pytest.raises(ValueError, match="k_vec.seg"):
        flash_attention(q, jnp.zeros((B, L + 1, 1, 64)), jnp.zeros((B, L + 1, 1, 64)), vec, vec)
    with pytest.raises(ValueError, match="block_k"):
        flash_attention(q, jnp.zeros((B, L, 1, 64)), jnp.zeros((B, L, 1, 64)), vec, vec, block_k=20)


def test_tpu_interpreter_equals_dense(poison_layout):
    """The same kernels under Pallas's TPU interpreter (TPU memory semantics simulated on CPU)."""
    from jax.experimental.pallas import tpu as pltpu
    from bagel_jax.nn.pallas_attention import _flash

    vec = vectors(poison_layout)
    q, k, v, do = random_qkvo(4, 2, 128, 128, 4, 2, 64)
    got = out_and_grads(lambda *a: _flash(*a, 32, 64, pltpu.InterpretParams()))(q, k, v, vec, vec, do)
    want = out_and_grads(reference)(q, k, v, vec, vec, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, name)
