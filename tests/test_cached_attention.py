"""Blocked cache attention (reads only the valid cache blocks) == dense attention over cache + chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.nn.attention import cached_attention, dot_product_attention


def _dense_reference(q, k, v, chunk_mask, cache_k, cache_v, cache_len, layer):
    """Concatenate the layer's whole cache buffer with the chunk and mask the invalid slots."""
    cap = cache_k.shape[2]
    B, Lq = q.shape[:2]
    keys = jnp.concatenate([cache_k[layer], k], axis=1)
    values = jnp.concatenate([cache_v[layer], v], axis=1)
    slots = jnp.arange(cap)[None, :] < cache_len[:, None]
    mask = jnp.concatenate([jnp.broadcast_to(slots[:, None], (B, Lq, cap)), chunk_mask], axis=-1)
    return dot_product_attention(q, keys, values, mask)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [None, 32])
def test_cached_attention_matches_dense(causal, block):
    rng = np.random.default_rng(0)
    layers, B, cap, H, K, dh, Lq = 3, 4, 384, 4, 2, 16, 8
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q, k, v = f(B, Lq, H, dh), f(B, Lq, K, dh), f(B, Lq, K, dh)
    # garbage beyond each row's length must not leak into the result
    cache_k, cache_v = f(layers, B, cap, K, dh) * 3, f(layers, B, cap, K, dh)
    cache_len = jnp.asarray([0, 1, 200, 384 - Lq], jnp.int32)       # empty, tiny, mid-block, almost full
    q_len = jnp.asarray([Lq, 3, 5, Lq], jnp.int32)
    valid = jnp.arange(Lq)[None, :] < q_len[:, None]
    chunk_mask = jnp.broadcast_to(valid[:, None, :], (B, Lq, Lq))
    if causal:
        chunk_mask = chunk_mask & jnp.tril(jnp.ones((Lq, Lq), bool))[None]
    for layer in range(layers):
        got = jax.jit(cached_attention, static_argnames="block")(q, k, v, chunk_mask, cache_k, cache_v, cache_len,
                                                                  layer, block=block)
        want = _dense_reference(q, k, v, chunk_mask, cache_k, cache_v, cache_len, layer)
        for b in range(B):   # padding queries (>= q_len) are discarded by callers
            n = int(q_len[b])
            np.testing.assert_allclose(np.asarray(got[b, :n]), np.asarray(want[b, :n]), atol=2e-6, rtol=1e-5)


def test_cached_attention_reads_only_valid_blocks():
    """NaNs planted in cache blocks beyond every row's length are never touched."""
    layers, B, cap, H, K, dh, Lq = 1, 2, 512, 2, 1, 8, 4
    rng = np.random.default_rng(1)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    cache_k, cache_v = np.array(f(layers, B, cap, K, dh)), np.array(f(layers, B, cap, K, dh))
    cache_k[:, :, 256:] = np.nan
    cache_v[:, :, 256:] = np.nan
    cache_len = jnp.asarray([100, 250], jnp.int32)
    mask = jnp.ones((B, Lq, Lq), bool)
    out = cached_attention(f(B, Lq, H, dh), f(B, Lq, K, dh), f(B, Lq, K, dh), mask, jnp.asarray(cache_k),
                           jnp.asarray(cache_v), cache_len, 0, block=128)
    assert np.isfinite(np.asarray(out)).all()


def test_cached_attention_fully_masked_row_is_finite():
    B, cap, H, K, dh, Lq = 1, 128, 2, 2, 8, 4
    z = jnp.zeros((B, Lq, H, dh))
    out = cached_attention(z, z[:, :, :K], z[:, :, :K], jnp.zeros((B, Lq, Lq), bool), jnp.ones((1, B, cap, K, dh)),
                           jnp.ones((1, B, cap, K, dh)), jnp.zeros((B,), jnp.int32), 0)
    assert np.isfinite(np.asarray(out)).all()
