"""The sequence layout (bagel_jax.layout) against a layout derived by hand from the official rules
(docs/architecture.md: sequence layout, attention mask, inference contexts, training packing), and training packing / the inference Context against the same rules."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax import layout
from bagel_jax.config import load_config
from bagel_jax.data import datasets, packing
from bagel_jax.images import ImageTransform
from bagel_jax.inference import blocks
from bagel_jax.inference.context import Context
from bagel_jax.inference.engine import Engine, InferenceOptions
from bagel_jax.inference.kv_cache import KVCache
from bagel_jax.loading import BagelModel

SP = packing.SpecialTokens(bos=1, eos=2, start_of_image=3, end_of_image=4)
T, V, G = layout.KIND_TEXT, layout.KIND_VIT, layout.KIND_VAE

# One sample (tiny-a: latent_downsample 16, ViT patch 14):
#   text [11, 12, 13] | clean VAE 32x32 (2x2 latents) | ViT 28x42 (2x3 patches) | dropped image (RoPE +1)
#   | noised VAE 16x32 (1x2 latents) | text [14]
# fields: token ids, kinds, RoPE positions, vis, nblk (seg = 1 everywhere) of each block, by hand.
HAND = [
    ([1, 11, 12, 13, 2], [T, T, T, T, T], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0] * 5),
    ([3, 0, 0, 0, 0, 4], [T, G, G, G, G, T], [5] * 6, [5] * 6, [0] * 6),
    ([3, 0, 0, 0, 0, 0, 0, 4], [T, V, V, V, V, V, V, T], [6] * 8, [11] * 8, [0] * 8),
    ([3, 0, 0, 4], [T, G, G, T], [8] * 4, [19] * 4, [1] * 4),
    ([1, 14, 2], [T, T, T], [8, 9, 10], [23, 24, 25], [0] * 3),
]
HAND_COLS = [np.concatenate([np.asarray(b[i]) for b in HAND]) for i in range(5)]


def _img(h, w, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (3, h, w)).astype(np.float32)


def _items():
    return [packing.TextItem([11, 12, 13], loss=True), packing.VaeItem(_img(32, 32)), packing.VitItem(_img(28, 42)),
            packing.PositionGap(1), packing.VaeItem(_img(16, 32), loss=True, t_raw=0.5), packing.TextItem([14])]


def test_blocks_follow_the_hand_derived_layout():
    blocks = [layout.text_block(3), layout.vae_block(32, 32, 16), layout.vit_block(28, 42, 14), 1,
              layout.vae_block(16, 32, 16, noised=True), layout.text_block(1)]
    bodies = {0: [11, 12, 13], 5: [14]}
    assert [b.kind for b in blocks if b != 1] == ["text", "vae", "vit", "noised_vae", "text"]
    assert [b.length for b in blocks if b != 1] == [5, 6, 8, 4, 3]
    assert [b.rope_advance for b in blocks if b != 1] == [5, 1, 1, 0, 3]
    r, start, noise, hand = 0, 0, 0, iter(HAND)
    for i, b in enumerate(blocks):
        if b == 1:
            r += 1
            continue
        ids, kinds, pos, vis, nblk = next(hand)
        noise += b.kind == layout.NOISED_VAE
        assert b.token_ids(SP, bodies.get(i)) == ids
        assert b.token_kinds() == kinds
        assert b.positions(r) == pos
        assert b.masks(start, 1, noise if b.kind == layout.NOISED_VAE else 0) == ([1] * b.length, vis, nblk)
        r, start = r + b.rope_advance, start + b.length
    assert (r, start) == (11, 26)


def test_layout_rules_reject_bad_blocks():
    with pytest.raises(ValueError, match="unknown block kind"):
        layout.Block("audio", 3)
    with pytest.raises(ValueError, match="noise_id"):
        layout.vae_block(16, 16, 16).masks(0, 1, noise_id=1)
    with pytest.raises(ValueError, match="noise_id"):
        layout.vae_block(16, 16, 16, noised=True).masks(0, 1)
    with pytest.raises(ValueError, match="2 ids"):
        layout.text_block(3).token_ids(SP, [5, 6])


def test_packing_and_datasets_agree_with_the_hand_layout(tiny_a):
    cfg = load_config(tiny_a)
    b = packing.pack([[_items()]], SP, cfg)
    for name, want in zip(("token_ids", "kind", "positions", "vis", "nblk"), HAND_COLS):
        np.testing.assert_array_equal(getattr(b, name)[0], want, err_msg=name)
    np.testing.assert_array_equal(b.seg[0], np.ones(26))
    # image bodies land right after their start marker
    np.testing.assert_array_equal(b.vae_dest, [6, 7, 8, 9, 20, 21])
    np.testing.assert_array_equal(b.vit_dest, np.arange(12, 18))
    # CE on <|im_start|> + ids of the loss text, labels ids + <|im_end|>
    np.testing.assert_array_equal(b.ce_index, [0, 1, 2, 3])
    np.testing.assert_array_equal(b.ce_label, [11, 12, 13, 2])
    lens = [datasets.item_tokens(it, cfg.vit.patch_size, cfg.latent_downsample) for it in _items()]
    assert lens == [5, 6, 8, 0, 4, 3]


def _record_device_calls(monkeypatch, calls):
    """Replace the model calls of the Context by stubs that record what the Context sends (the
    bookkeeping is host-side; test_engine covers the model itself) and advance the cache as the real ones."""
    def grown(cache, q_len):
        return KVCache(cache.k, cache.v, cache.length + jnp.asarray(q_len, jnp.int32))

    def text_chunk(model, params, cache, ids, positions, q_len, update=True, collect=False):
        calls.append(("text", np.asarray(ids), np.asarray(positions), np.asarray(q_len)))
        return None, grown(cache, q_len), {}

    def vae_encode_tokens(vae, vae_params, image, eps, p):
        _, H, W, _ = image.shape
        return jnp.zeros((1, (H // 16) * (W // 16), 8), jnp.float32)     # tiny-a: 16 px per latent token

    def latent_prefill(model, params, cache, x0, lat_pos, n_tokens, rope, markers, hidden=True):
        calls.append(("vae", np.asarray(n_tokens), np.asarray(rope), np.asarray(markers)))
        return None, grown(cache, np.asarray(n_tokens) + 2)

    def vit_chunk(model, params, cache, patches, vit_pos, n_tokens, rope, markers, collect=False, hidden=True):
        calls.append(("vit", np.asarray(n_tokens), np.asarray(rope), np.asarray(markers)))
        return None, grown(cache, np.asarray(n_tokens) + 2), {}

    for name, fn in dict(text_chunk=text_chunk, vae_encode_tokens=vae_encode_tokens, latent_prefill=latent_prefill,
                         vit_chunk=vit_chunk).items():
        monkeypatch.setattr(blocks, name, fn)


def test_context_agrees_with_packing(tiny_a, monkeypatch):
    """The Context's KV slots, RoPE counters, text ids and markers equal the packed layout of the same
    blocks: text, image (VAE then ViT), text."""
    cfg = load_config(tiny_a)
    # no weights (the model calls are stubs) and a stand-in tokenizer: one id per character
    tok = types.SimpleNamespace(encode=lambda text: [100 + ord(ch) for ch in text], special=SP)
    bm = BagelModel(cfg, None, None, {}, {}, tok)
    eng = Engine(bm, InferenceOptions(ImageTransform(256, 32, 16), ImageTransform(256, 28, 14), cache_dtype=jnp.float32))
    calls = []
    _record_device_calls(monkeypatch, calls)
    img = (np.random.RandomState(0).rand(32, 48, 3) * 255).astype(np.uint8)
    pre = eng.preprocess(img)
    steps = [Context.new(eng, track_cfg=False)]
    for step in (lambda c: c.add_text("a red square"), lambda c: c.add_image(img), lambda c: c.add_text("ok")):
        steps.append(step(steps[-1]))

    ids = [eng.tok.encode(t) for t in ("a red square", "ok")]
    items = [packing.TextItem(ids[0]), packing.VaeItem(pre["vae"]), packing.VitItem(pre["vit"]),
             packing.TextItem(ids[1])]
    b = packing.pack([[items]], SP, cfg)
    n_vae = (pre["hw"][0] // 16) * (pre["hw"][1] // 16)
    n_vit = (pre["vit"].shape[1] // 14) * (pre["vit"].shape[2] // 14)
    n = [len(ids[0]) + 2, n_vae + 2, n_vit + 2, len(ids[1]) + 2]
    starts = np.cumsum([0] + n)
    assert starts[-1] == b.shape[1]
    # after each call (the image call adds two blocks) the Context holds the packed row's first tokens
    for c, at in zip(steps, (0, 1, 3, 4)):
        assert int(c.gen.length[0]) == starts[at]
        assert int(c.gen.rope[0]) == (b.positions[0, starts[at]] if at < 4 else b.positions[0, -1] + 1)
    # what went to the device: text ids and positions, image sizes, positions and markers
    kinds = [c[0] for c in calls]
    assert kinds == ["text", "vae", "vit", "text"]
    for call, at in ((calls[0], 0), (calls[3], 3)):
        L = int(call[3][0])
        assert L == n[at]
        np.testing.assert_array_equal(call[1][0, :L], b.token_ids[0, starts[at]:starts[at + 1]])
        np.testing.assert_array_equal(call[2][0, :L], b.positions[0, starts[at]:starts[at + 1]])
    for call, at in ((calls[1], 1), (calls[2], 2)):
        assert int(call[1][0]) + 2 == n[at]
        assert int(call[2][0]) == b.positions[0, starts[at]]
        np.testing.assert_array_equal(call[3], b.token_ids[0, [starts[at], starts[at + 1] - 1]])
