"""The patch-AR training layout (bagel_jax/data/patch_ar.py): its mask, written out by hand from the rule
of docs/patch-ar.md (noisy group g sees the context, <|vision_start|> and the clean groups before g; clean groups
are causal among themselves; nothing sees a noisy copy but itself), equals the one the packing's three
mask vectors give, in logical order and in the expert-stream layout; "xla" and "blocked" attention agree
on it (tolerance as tests/test_attention_impls.py: float32 summation order, 2e-5 of the output scale)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax import layout
from bagel_jax.config import load_config
from bagel_jax.data import packing, patch_ar
from bagel_jax.data.packing import Capacities, TextItem, VaeItem
from bagel_jax.data.patch_ar import PatchArItem
from bagel_jax.nn.attention import MaskVectors, attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "bagel_jax", "assets", "demo")
SPECIAL = packing.SpecialTokens(bos=1, eos=2, start_of_image=3, end_of_image=4)


@pytest.fixture(scope="module")
def cfg():
    return load_config(DEMO).replace(image_mode="patch_ar", patch_ar_groups=(1, 2))


def _img(px, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (3, px, px)).astype(np.float32)


def _expected(n_text, n_lat, k, n_after):
    """Hand-written mask of one sample ``text(n_text ids) | patch-AR image (n_lat latents, groups of k) |
    text(n_after ids)`` in logical order, with each token's role."""
    roles = [("ctx", i) for i in range(n_text + 2)] + [("soi", 0)]
    for g in range(n_lat // k):
        roles += [("noisy", g)] * k + [("clean", g)] * k
    roles += [("eoi", 0)] + [("after", i) for i in range(n_after + 2)]

    def sees(q, key):
        (rq, iq), (rk, ik) = q, key
        if rk == "noisy":                                # only its own group sees a noisy copy
            return rq == "noisy" and iq == ik
        if rk == "ctx":                                  # causal text before the image
            return rq != "ctx" or ik <= iq
        if rq == "ctx":
            return False
        if rk == "soi":
            return True
        if rk == "clean":
            return {"noisy": ik < iq, "clean": ik <= iq, "soi": False}.get(rq, True)
        if rk == "eoi":
            return rq in ("eoi", "after")
        return rq == "after" and ik <= iq                 # text after the image: causal

    return np.array([[sees(q, key) for key in roles] for q in roles]), roles


@pytest.mark.parametrize("k", [1, 2, 4])
def test_mask_equals_hand_written(cfg, k):
    n_lat = 4                                            # a 16x16 image at latent downsample 8: 2x2 latents
    item = PatchArItem(_img(16, 0), loss=True, t_raw=0.3, group=k, group_t_raw=[0.1 * g for g in range(n_lat // k)])
    sample = [TextItem([5, 6, 7]), item, TextItem([8, 9], loss=True)]
    other = [TextItem([10, 11]), VaeItem(_img(16, 1), loss=True, t_raw=0.5)]    # a second sample, whole mode
    b = packing.pack([[sample, other]], SPECIAL, cfg, Capacities(row_len=64))
    want, roles = _expected(3, n_lat, k, 2)
    n = len(roles)
    got = packing.dense_mask_np(b)[0]
    np.testing.assert_array_equal(got[:n, :n], want)
    assert not got[:n, n:].any() and not got[n:, :n].any()          # samples never see each other
    assert packing.allowed_pairs(b.seg, b.vis, b.nblk)[0] == got.sum()
    # the layout's other fields: markers, kinds, one RoPE position for the image, +1 after it
    assert b.token_ids[0, 5] == SPECIAL.start_of_image and b.token_ids[0, 6 + 2 * n_lat] == SPECIAL.end_of_image
    assert (b.kind[0, 6:6 + 2 * n_lat] == layout.KIND_VAE).all()
    assert (b.positions[0, 5:7 + 2 * n_lat] == 5).all() and b.positions[0, 7 + 2 * n_lat] == 6
    noisy = [r == "noisy" for r, _ in roles if r in ("noisy", "clean")]
    assert b.vae_mse[:2 * n_lat].tolist() == noisy
    np.testing.assert_array_equal(b.vae_src[:2 * n_lat][np.array(noisy)], b.vae_src[:2 * n_lat][~np.array(noisy)])
    t_noisy = b.vae_t_raw[:2 * n_lat][np.array(noisy)]
    np.testing.assert_allclose(t_noisy, np.repeat(item.group_t_raw, k))
    assert np.isneginf(b.vae_t_raw[:2 * n_lat][~np.array(noisy)]).all()
    # expert streams keep the mask (vis is the logical order index)
    L = b.shape[1]
    s, perm = packing.to_expert_streams(b, L - 2 * n_lat - 4)
    np.testing.assert_array_equal(packing.dense_mask_np(packing.from_expert_streams(s, perm)), packing.dense_mask_np(b))
    got_s = packing.dense_mask_np(s)[0]
    np.testing.assert_array_equal(got_s, got[np.ix_(perm[0], perm[0])])


def test_attention_impls_agree(cfg):
    rows = [[[TextItem([5, 6, 7]), PatchArItem(_img(32, 2), loss=True, t_raw=0.0, group=1, group_t_raw=[0.0] * 16),
              TextItem([8], loss=True)],
             [TextItem([9]), PatchArItem(_img(32, 3), loss=True, t_raw=0.0, group=2, group_t_raw=[0.0] * 8)]]]
    b = packing.pack(rows, SPECIAL, cfg, Capacities(row_len=160))
    vec = MaskVectors(*(jnp.asarray(getattr(b, f)) for f in ("seg", "vis", "nblk")))
    L = b.shape[1]
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (1, L, 4, 16))
    kk = jax.random.normal(ks[1], (1, L, 2, 16))
    v = jax.random.normal(ks[2], (1, L, 2, 16))
    ref = attention(q, kk, v, vec, vec, "xla")
    out = attention(q, kk, v, vec, vec, "blocked")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5 * float(jnp.abs(ref).max()))


def test_expand_items_and_token_counts(cfg):
    from bagel_jax.data import datasets
    items = [TextItem([5]), VaeItem(_img(32, 4), loss=False), VaeItem(_img(32, 5), loss=True, t_raw=0.7)]
    out = patch_ar.expand_items(items, cfg, np.random.default_rng(0))
    assert out[:2] == items[:2] and isinstance(out[2], PatchArItem) and out[2].group in (1, 2)
    assert len(out[2].group_t_raw) == 16 // out[2].group and out[2].group_t_raw[0] == 0.7
    assert datasets.item_tokens(out[2], 14, 8) == 2 * 16 + 2
    assert patch_ar.expand_items(items, cfg.replace(image_mode="whole"), np.random.default_rng(0)) == items
    with pytest.raises(packing.PackingError, match="divides 16 latent tokens"):
        patch_ar.expand_items(items, cfg.replace(patch_ar_groups=(3,)), np.random.default_rng(0))


def test_config_fields_round_trip_and_errors(cfg, tmp_path):
    import json

    from bagel_jax.config import ConfigError, config_from_folder
    from bagel_jax.loading import write_official_configs

    write_official_configs(cfg, str(tmp_path / "ar"))
    assert config_from_folder(str(tmp_path / "ar")) == cfg
    whole = cfg.replace(image_mode="whole", patch_ar_groups=(1,))
    write_official_configs(whole, str(tmp_path / "whole"))
    raw = json.loads((tmp_path / "whole" / "bagel_config.json").read_text())
    assert "image_mode" not in raw and "patch_ar_groups" not in raw     # official folders stay unchanged
    for field, value, msg in (("image_mode", "rows", "image_mode must be one of whole, patch_ar"),
                              ("patch_ar_groups", [0], "'patch_ar_groups' must be a non-empty list")):
        (tmp_path / "whole" / "bagel_config.json").write_text(json.dumps(dict(raw, **{field: value})))
        with pytest.raises(ConfigError, match=msg):
            config_from_folder(str(tmp_path / "whole"))
