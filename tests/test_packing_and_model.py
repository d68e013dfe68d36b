"""Packing semantics, position tables, MoT routing equivalences and padding invariance on tiny-a."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from bagel_jax.convert.safetensors_io import load_file
from bagel_jax.data import packing
from bagel_jax.data.packing import Capacities, TextItem, VaeItem, VitItem
from bagel_jax.inference import blocks
from bagel_jax.inference.kv_cache import KVCache
from bagel_jax.loading import load_model
from bagel_jax.models.bagel import Bagel
from bagel_jax.models.qwen2_mot import Routing
from bagel_jax.nn.attention import MaskVectors
from bagel_jax.nn.layers import sincos_2d_table
from bagel_jax.train.forward import draw_noise, train_forward


@pytest.fixture(scope="module")
def bm(tiny_a):
    return load_model(tiny_a)


def img(h, w, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (3, h, w)).astype(np.float32)


def test_sincos_tables_equal_the_official_ones(tiny_a, bm):
    ema = load_file(f"{tiny_a}/ema.safetensors")
    D = bm.cfg.llm.hidden_size
    np.testing.assert_allclose(sincos_2d_table(D, 64), ema["latent_pos_embed.pos_embed"], atol=1e-6)
    np.testing.assert_allclose(sincos_2d_table(D, 70), ema["vit_pos_embed.pos_embed"], atol=1e-6)


def reference_mask(splits):
    """The official rule (docs/architecture.md#attention-mask) written out per (q, k) from a list of (sample, split_id, mode, length)."""
    tok = []
    for sample, split, mode, n in splits:
        tok += [(sample, split, mode)] * n
    L = len(tok)
    m = np.zeros((L, L), bool)
    for q in range(L):
        for k in range(L):
            sq, pq, mq = tok[q]
            sk, pk, mk = tok[k]
            same_sample = sq == sk
            allowed = same_sample and (k <= q or (pq == pk and mq in ("full", "noise")))
            if mk == "noise" and pk != pq:
                allowed = False
            m[q, k] = allowed
    return m


def test_mask_vectors_reproduce_the_official_rule(bm):
    sp = bm.tokenizer.special
    s1 = [VitItem(img(28, 42, 0)), TextItem([5, 6, 7]), VaeItem(img(32, 32, 1), loss=True, t_raw=0.3),
          VaeItem(img(32, 16, 2), loss=False), VitItem(img(28, 28, 3)), TextItem([8, 9], loss=True),
          VaeItem(img(16, 32, 4), loss=True, t_raw=-1.0)]
    s2 = [TextItem([10, 11, 12, 13], loss=True), VaeItem(img(16, 16, 5), loss=True, t_raw=0.1)]
    b = packing.pack([[s1, s2]], sp, bm.cfg)
    splits = [(1, 0, "full", 2 + 6), (1, 1, "causal", 5), (1, 2, "noise", 6), (1, 3, "full", 4), (1, 4, "full", 6),
              (1, 5, "causal", 4), (1, 6, "noise", 4), (2, 7, "causal", 6), (2, 8, "noise", 3)]
    ref = reference_mask(splits)
    assert b.shape == (1, ref.shape[0])
    np.testing.assert_array_equal(packing.dense_mask_np(b)[0], ref)
    # RoPE: noised targets do not advance the counter; clean images and ViT images advance by one.
    assert list(b.positions[0, :8]) == [0] * 8
    assert list(b.positions[0, 8:13]) == [1, 2, 3, 4, 5]
    assert set(b.positions[0, 13:19]) == {6}          # noised: shares the next position ...
    assert set(b.positions[0, 19:23]) == {6}          # ... with the clean image after it
    assert set(b.positions[0, 23:29]) == {7}
    assert list(b.positions[0, 29:33]) == [8, 9, 10, 11]


def test_training_losses_do_not_depend_on_padding(bm):
    sp = bm.tokenizer.special
    rows = [[[VitItem(img(28, 28, 0)), TextItem([5, 6, 7]), TextItem([8, 9, 10], loss=True)],
             [TextItem([11, 12]), VaeItem(img(32, 32, 1), loss=True, t_raw=0.2)]]]
    tight = packing.pack(rows, sp, bm.cfg)
    loose = packing.pack(rows + [[[TextItem([3, 4], loss=True)]]], sp, bm.cfg,
                         Capacities(rows=2, row_len=tight.shape[1] + 9, vit_tokens=7, latent_tokens=9,
                                    vae_images=2, vae_hw=(32, 48), ce_tokens=12))
    # the extra row adds CE tokens; give it zero weight so both batches have the same loss terms
    loose.ce_valid[loose.ce_index >= loose.shape[1]] = 0.0
    key = jax.random.PRNGKey(0)
    n_tight, n_loose = draw_noise(key, tight.arrays(), bm.cfg), draw_noise(key, loose.arrays(), bm.cfg)
    Nl = tight.vae_src.shape[0]
    h = w = 32 // 8
    # same noise for the real tokens/images; padding gets other values (they must not matter)
    n_loose = n_loose._replace(flow_noise=n_loose.flow_noise.at[:Nl].set(n_tight.flow_noise),
                               posterior_eps=n_loose.posterior_eps.at[0, :h, :w].set(n_tight.posterior_eps[0]))
    fwd = jax.jit(lambda p, vp, b, n: train_forward(bm.model, p, bm.vae, vp, b, n)[1])   # (op by op: a minute)
    f = lambda b, n: fwd(bm.params, bm.vae_params, {k: jnp.asarray(v) for k, v in b.arrays().items()}, n)
    a, c = f(tight, n_tight), f(loose, n_loose)
    # VAE latents depend on the padded size (quirk 20: conv borders + mid attention see the padding),
    # so compare MSE only through the CE (text) path and the token counts; CE must match exactly.
    np.testing.assert_allclose(float(a["ce"]), float(c["ce"]), rtol=1e-5)
    assert float(a["n_ce"]) == float(c["n_ce"]) and float(a["n_mse"]) == float(c["n_mse"])


def test_split_routing_equals_select_routing(bm):
    rng = np.random.default_rng(0)
    B, L, D = 2, 11, bm.cfg.llm.hidden_size
    x = jnp.asarray(rng.normal(size=(B, L, D)).astype(np.float32))
    pos = jnp.asarray(rng.integers(0, 20, (B, L)))
    vec = MaskVectors(jnp.ones((B, L), jnp.int32), jnp.zeros((B, L), jnp.int32), jnp.zeros((B, L), jnp.int32))
    mask = vec
    is_gen = jnp.arange(L)[None].repeat(B, 0) >= 3
    p = {"params": bm.params}
    h1, _ = bm.model.apply(p, x, pos, mask, Routing.split(3), method=Bagel.decode)
    h2, _ = bm.model.apply(p, x, pos, mask, Routing.select(), is_gen, method=Bagel.decode)
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), atol=1e-5)


def test_chunked_text_prefill_equals_one_chunk(bm):
    ids = np.array([[513, 40, 41, 42, 43, 44, 45, 514]])
    cap = 32
    full = KVCache.empty(bm.cfg.llm, 1, cap)
    h_full, c_full, _ = blocks.text_chunk(bm.model, bm.params, full, jnp.asarray(ids), jnp.arange(8)[None],
                                          jnp.array([8]))
    c = KVCache.empty(bm.cfg.llm, 1, cap)
    h_a, c, _ = blocks.text_chunk(bm.model, bm.params, c, jnp.asarray(ids[:, :5]), jnp.arange(5)[None], jnp.array([5]))
    h_b, c, _ = blocks.text_chunk(bm.model, bm.params, c, jnp.asarray(ids[:, 5:]), jnp.arange(5, 8)[None],
                                  jnp.array([3]))
    np.testing.assert_allclose(np.concatenate([h_a, h_b], 1), np.asarray(h_full), atol=1e-5)
    assert int(c.length[0]) == 8
    np.testing.assert_allclose(np.asarray(c.k[:, :, :8]), np.asarray(c_full.k[:, :, :8]), atol=1e-5)


def test_packing_errors(bm):
    sp = bm.tokenizer.special
    with pytest.raises(packing.PackingError, match="multiple of 16"):
        packing.pack([[[VaeItem(img(20, 32, 0))]]], sp, bm.cfg)
    with pytest.raises(packing.PackingError, match="capacity"):
        packing.pack([[[TextItem([1, 2, 3])]]], sp, bm.cfg, Capacities(row_len=3))
