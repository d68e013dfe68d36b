"""Cached attention: "blocked" (reads only the valid cache blocks) and "xla" (dense over the whole buffer)
== a numpy softmax over [valid cache slots ; chunk]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.nn.attention import CacheView, attention, blocked_attention, chunk_vectors, dense_mask
from bagel_jax.nn.blocked_attention import CACHE_TAIL_BLOCK, CACHE_TAIL_MIN_QUERIES


def _numpy_reference(q, k, v, vec, cache_k, cache_v, cache_len, layer):
    """Softmax of each query over the layer's valid cache slots and its allowed chunk keys (float64)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    ck, cv = np.asarray(cache_k[layer], np.float64), np.asarray(cache_v[layer], np.float64)
    B, Lq, H, dh = q.shape
    G = H // k.shape[2]
    chunk = np.asarray(dense_mask(vec, vec))
    out = np.zeros(q.shape)
    for b in range(B):
        n = int(cache_len[b])
        keys, vals = np.concatenate([ck[b, :n], k[b]]), np.concatenate([cv[b, :n], v[b]])
        for i in range(Lq):
            ok = np.concatenate([np.ones(n, bool), chunk[b, i]])
            if not ok.any():
                continue
            for h in range(H):
                s = keys[ok, h // G] @ q[b, i, h] / np.sqrt(dh)
                p = np.exp(s - s.max())
                out[b, i, h] = p @ vals[ok, h // G] / p.sum()
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl,block", [("blocked", None), ("blocked", 32), ("xla", None)])
@pytest.mark.parametrize("Lq", [8, 70])   # 70: one chunk block of a length that is no multiple of 64
def test_cached_attention_matches_reference(causal, impl, block, Lq):
    rng = np.random.default_rng(0)
    layers, B, cap, H, K, dh = 3, 4, 384, 4, 2, 16
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q, k, v = f(B, Lq, H, dh), f(B, Lq, K, dh), f(B, Lq, K, dh)
    # garbage beyond each row's length must not leak into the result
    cache_k, cache_v = f(layers, B, cap, K, dh) * 3, f(layers, B, cap, K, dh)
    # empty, tiny, mid-block (1 full 128-slot block + 3 tail blocks of 32), almost full
    cache_len = jnp.asarray([0, 1, 200, 384 - Lq], jnp.int32)
    q_len = jnp.asarray([Lq, 3, 5, Lq], jnp.int32)
    vec = chunk_vectors(q_len, Lq, causal)

    @jax.jit
    def run(q, k, v, vec, ck, cv, n, layer):
        view = CacheView(ck, cv, n, layer)
        if impl == "blocked":
            return blocked_attention(q, k, v, vec, vec, cache=view, block_cache=block)
        return attention(q, k, v, vec, vec, impl, cache=view)

    for layer in range(layers):
        got = run(q, k, v, vec, cache_k, cache_v, cache_len, layer)
        want = _numpy_reference(q, k, v, vec, cache_k, cache_v, cache_len, layer)
        for b in range(B):   # padding queries (>= q_len) are discarded by callers
            n = int(q_len[b])
            np.testing.assert_allclose(np.asarray(got[b, :n]), want[b, :n], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("cap,block,Lq,lengths,valid_end,blocks", [
    (512, 128, 8, [100, 250], 256, 1 + 4),   # one full 128-slot block, then 122 slots in 4 tail blocks of 32
    (256, None, 8, [17, 3], 32, 1),          # a 17-token prompt in a 256-slot cache: one 32-slot tail block
    (256, None, 8, [0, 0], 0, 0),            # empty cache: nothing read
    (512, None, 1, [17, 3], 512, 1),         # one query (decoding): one whole 512-slot block, no tail blocks
])
def test_cached_attention_reads_only_valid_blocks(cap, block, Lq, lengths, valid_end, blocks):
    """The cache is read up to the longest row's length rounded up to a tail block (CACHE_TAIL_BLOCK; whole
    cache blocks for fewer than CACHE_TAIL_MIN_QUERIES queries): NaNs planted beyond that are never touched,
    and the number of blocks visited is the full cache blocks plus the tail blocks plus the chunk's one."""
    assert (CACHE_TAIL_BLOCK, CACHE_TAIL_MIN_QUERIES) == (32, 8)
    layers, B, H, K, dh = 1, 2, 2, 1, 8
    rng = np.random.default_rng(1)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    cache_k, cache_v = np.array(f(layers, B, cap, K, dh)), np.array(f(layers, B, cap, K, dh))
    cache_k[:, :, valid_end:] = np.nan
    cache_v[:, :, valid_end:] = np.nan
    vec = chunk_vectors(jnp.full((B,), Lq, jnp.int32), Lq, False)
    out, visited = blocked_attention(f(B, Lq, H, dh), f(B, Lq, K, dh), f(B, Lq, K, dh), vec, vec,
                                     cache=CacheView(jnp.asarray(cache_k), jnp.asarray(cache_v),
                                                     jnp.asarray(lengths, jnp.int32), 0),
                                     block_cache=block, return_visited=True)
    assert np.isfinite(np.asarray(out)).all()
    assert int(visited) == blocks + 1


@pytest.mark.parametrize("impl", ["blocked", "xla"])
def test_cached_attention_fully_masked_row_is_zero(impl):
    """No visible cache slot and no allowed chunk key: exactly 0 (not NaN, not an average)."""
    B, cap, H, K, dh, Lq = 1, 128, 2, 2, 8, 4
    z = jnp.ones((B, Lq, H, dh))
    vec = chunk_vectors(jnp.zeros((B,), jnp.int32), Lq, True)
    view = CacheView(jnp.ones((1, B, cap, K, dh)), jnp.ones((1, B, cap, K, dh)), jnp.zeros((B,), jnp.int32), 0)
    out = attention(z, z[:, :, :K], z[:, :, :K], vec, vec, impl, cache=view)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_flow_query_never_scores_the_whole_cache_buffer():
    """A 258-query chunk against a 256-slot cache holding 17 valid slots reads one 32-slot tail block. A big
    block as large as the capacity made XLA hoist that block's scores out of its (zero-trip) loop, so every
    layer scored all 256 slots anyway: no compiled op may produce a [258 x 256] score array."""
    import re

    B, cap, H, K, dh, Lq = 1, 256, 4, 2, 16, 258
    f = lambda *s: jnp.zeros(s, jnp.float32)
    vec = chunk_vectors(jnp.full((B,), Lq, jnp.int32), Lq, False)

    def run(q, k, v, ck, cv, n):
        return blocked_attention(q, k, v, vec, vec, cache=CacheView(ck, cv, n, 0))

    args = (f(B, Lq, H, dh), f(B, Lq, K, dh), f(B, Lq, K, dh), f(1, B, cap, K, dh), f(1, B, cap, K, dh),
            jnp.full((B,), 17, jnp.int32))
    hlo = jax.jit(run).lower(*args).compile().as_text()
    shapes = re.findall(r"= f32\[([0-9,]+)\]", hlo)
    scores = [s for s in shapes if {"256", str(Lq)} <= set(s.split(",")) or
              {"256", str(Lq * H // K)} <= set(s.split(","))]
    assert not scores, scores
