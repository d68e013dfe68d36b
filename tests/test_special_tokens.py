"""Special-token labels (official plan fields ``special_token_loss`` / ``special_token_label``,
docs/architecture.md#training-packing) in packing, the interleaved group and the synthetic interleave data, and
``train.special_token_weights`` on exactly those labels (loss and gradient)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.data import packing
from bagel_jax.data.datasets import Dropout, InterleavedDataset, SampleError, plan_to_items
from bagel_jax.data.packing import TextItem, VaeItem
from bagel_jax.loading import load_model
from bagel_jax.train.forward import draw_noise, train_forward
from bagel_jax.train.optimizer import TrainConfig
from bagel_jax.train.step import make_loss_fn


@pytest.fixture(scope="module")
def bm(tiny_a):
    return load_model(tiny_a)


def ce_entries(b: packing.PackedBatch) -> list:
    """``(flat index, label, special)`` of the real CE entries."""
    return [(int(i), int(lab), bool(s)) for i, lab, s, v in zip(b.ce_index, b.ce_label, b.ce_special, b.ce_valid)
            if v > 0]


def test_special_label_sits_on_the_closing_im_end(bm):
    sp = bm.tokenizer.special
    img = np.zeros((3, 32, 32), np.float32)
    sample = [TextItem([5, 6], loss=False),
              TextItem([7, 8, 9], loss=True, special_token_loss=True, special_token_label=sp.start_of_image),
              VaeItem(img, loss=True),
              TextItem([10], loss=True, special_token_loss=True, special_token_label=sp.eos)]
    b = packing.pack([[sample]], sp, bm.cfg)
    ids = b.token_ids[0]
    # text 1: positions 0..3; text 2: 4 (bos) 5 6 7 (ids) 8 (eos); image 9..; text 3 at the end
    assert list(ids[4:9]) == [sp.bos, 7, 8, 9, sp.eos]
    end3 = b.shape[1] - 1
    assert ids[end3] == sp.eos and ids[end3 - 2] == sp.bos
    want = [(4, 7, False), (5, 8, False), (6, 9, False), (7, sp.eos, False), (8, sp.start_of_image, True),
            (end3 - 2, 10, False), (end3 - 1, sp.eos, False), (end3, sp.eos, True)]
    assert ce_entries(b) == want
    # without the fields nothing changes: the old labels only
    plain = packing.pack([[[TextItem([7, 8, 9], loss=True)]]], sp, bm.cfg)
    assert ce_entries(plain) == [(0, 7, False), (1, 8, False), (2, 9, False), (3, sp.eos, False)]
    # special_token_loss works without loss (official: independent flags); a missing label is an error
    only = packing.pack([[[TextItem([7], loss=False, special_token_loss=True, special_token_label=3)]]], sp, bm.cfg)
    assert ce_entries(only) == [(2, 3, True)]
    with pytest.raises(packing.PackingError, match="special_token_label"):
        packing.pack([[[TextItem([7], special_token_loss=True)]]], sp, bm.cfg)


def test_interleaved_group_reads_the_labels(tmp_path, bm):
    from PIL import Image

    os.makedirs(tmp_path / "seq")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "seq" / "a.png")
    row = {"sequence": [{"type": "text", "text": "Draw it."},
                        {"type": "text", "text": "ok", "loss": 1, "special_token_loss": 1,
                         "special_token_label": "<|vision_start|>"},
                        {"type": "vae_image", "image": "a.png", "loss": 1},
                        {"type": "text", "text": "", "loss": 1, "special_token_loss": 1,
                         "special_token_label": "<|im_end|>"}]}
    bad = {"sequence": [{"type": "text", "text": "x", "special_token_loss": 1, "special_token_label": "<|nope|>"}]}
    with open(tmp_path / "seq" / "rows.jsonl", "w") as f:
        f.write(json.dumps(row) + "\n" + json.dumps(bad) + "\n")
    tf = dict(max_image_size=32, min_image_size=32, image_stride=16)
    ds = InterleavedDataset(str(tmp_path), dict(data_dir="seq", jsonl_path="seq/rows.jsonl",
                                                image_transform_args=tf), bm.tokenizer, bm.cfg)
    items = plan_to_items(ds.plan(0, np.random.default_rng(0)), np.random.default_rng(0), Dropout(0, 0, 0))
    sp = bm.tokenizer.special
    got = [(it.special_token_loss, it.special_token_label) for it in items if isinstance(it, TextItem)]
    assert got == [(False, None), (True, sp.start_of_image), (True, sp.eos)]
    specials = [lab for _, lab, s in ce_entries(packing.pack([[items]], sp, bm.cfg)) if s]
    assert specials == [sp.start_of_image, sp.eos]
    with pytest.raises(SampleError, match="special_token_label"):
        ds.plan(1, np.random.default_rng(0))


def test_synthetic_interleave_rows_follow_the_request():
    from bagel_jax.demo import interleave_data as I
    from bagel_jax.demo import synthetic as S

    rng = np.random.default_rng(0)
    for kind in ("draw", "words", "story") * 5:
        seq = I.row(kind, rng, lambda img: "x.png", 32)["sequence"]
        texts = [e for e in seq if e["type"] == "text"]
        labels = [e.get("special_token_label") for e in texts[1:]]
        n_images = sum(e["type"] == "vae_image" and e["loss"] for e in seq)
        assert texts[0]["loss"] == 0 and "special_token_loss" not in texts[0]
        if kind == "words":
            assert labels == [I.END] and n_images == 0
            assert not texts[0]["text"].startswith(("Draw", "Show", "Please", "Make"))
        else:
            assert labels == [I.VS] * n_images + [I.END] and texts[-1]["text"] == ""
            assert texts[0]["text"].startswith(("Draw", "Show", "Please", "Make"))
            assert (kind == "story") == (n_images > 1)
    cases = I.eval_cases()
    held = [(S.COLOURS.index(c["colour"]), S.SHAPES.index(c["shape"]), S.POSITIONS.index(c["position"]))
            for c in cases]
    assert all(S.held_out(*o) for o in held) and [c["draws"] for c in cases[:4]] == [True, False, True, False]


def _weighted_loss(bm, batch, weights):
    tc = TrainConfig()
    mask = jax.tree_util.tree_map(lambda _: True, bm.params)
    fn = make_loss_fn(bm.model, bm.vae, tc, mask, weights)
    micro = {k: jnp.asarray(v)[None] for k, v in batch.arrays().items()}
    loss, g = jax.jit(jax.value_and_grad(lambda p: fn(p, bm.vae_params, micro, jax.random.PRNGKey(0))[0]))(bm.params)
    return float(loss), g


def test_special_token_weights_scale_exactly_the_special_labels(bm):
    sp = bm.tokenizer.special
    rows = [[[TextItem([11, 12, 13], loss=True, special_token_loss=True, special_token_label=sp.start_of_image)],
             [TextItem([14, 15], loss=True, special_token_loss=True, special_token_label=sp.eos)]]]
    b = packing.pack(rows, sp, bm.cfg)
    base, g0 = _weighted_loss(bm, b, {})
    one, g1 = _weighted_loss(bm, b, {sp.start_of_image: 1.0})
    assert one == base
    jax.tree_util.tree_map(lambda a, c: np.testing.assert_array_equal(np.asarray(a), np.asarray(c)), g0, g1)
    heavy, g3 = _weighted_loss(bm, b, {sp.start_of_image: 3.0})
    assert heavy != base
    diff = max(float(jnp.abs(a - c).max()) for a, c in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g3)))
    assert diff > 1e-6
    # the same as train_forward with weight 3 on the one special <|vision_start|> entry, 1 elsewhere
    want = np.where((b.ce_special > 0) & (b.ce_label == sp.start_of_image), 3.0, 1.0).astype(np.float32)
    assert (want == 3.0).sum() == 1
    arr = {k: jnp.asarray(v) for k, v in b.arrays().items()}
    forward = jax.jit(lambda a, n, w: train_forward(bm.model, bm.params, bm.vae, bm.vae_params, a, n,
                                                    token_loss_weights=w)[0])
    noise = draw_noise(jax.random.fold_in(jax.random.PRNGKey(0), 0), arr, bm.cfg)
    ref = forward(arr, noise, jnp.asarray(want))
    np.testing.assert_allclose(heavy, float(ref), rtol=1e-6)
    # <|im_end|> weights touch only the special <|im_end|> entry, not the ordinary end-of-text labels
    want = np.where((b.ce_special > 0) & (b.ce_label == sp.eos), 3.0, 1.0).astype(np.float32)
    assert (b.ce_label[b.ce_valid > 0] == sp.eos).sum() == 3 and (want == 3.0).sum() == 1
    ref = forward(arr, noise, jnp.asarray(want))
    np.testing.assert_allclose(_weighted_loss(bm, b, {sp.eos: 3.0})[0], float(ref), rtol=1e-6)
    # a batch without special labels: weights change nothing
    plain = packing.pack([[[TextItem([11, 12, 13], loss=True)]]], sp, bm.cfg)
    assert _weighted_loss(bm, plain, {sp.eos: 5.0})[0] == _weighted_loss(bm, plain, {})[0]
