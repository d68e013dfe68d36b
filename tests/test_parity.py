"""The parity verifier on a fixture folder whose ``train_forward`` mixes every sample kind the official
trainer packs (text, edit chain with an intermediate target, t2i, vlm; text first), on the tiny-a model.

There are no official goldens for such a batch, so the samples are built twice: by the trainer's dataset
classes reading parquet / JSONL files (the reference batch) and by the verifier from the manifest's sample
descriptions. Both are checked against a layout derived by hand; the losses recorded as references come
from ``train_forward`` on the reference batch in logical order (both experts on every token, the oracle of
the expert-stream path the verifier runs); the CE of each text-bearing sample equals that sample alone.
"""

import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bagel_jax.convert.safetensors_io import load_file, save_file
from bagel_jax.data import datasets, packing
from bagel_jax.parity import Fixture, cli, train_case
from bagel_jax.train.forward import TrainNoise

T2I_TF = {"max_image_size": 64, "min_image_size": 16, "image_stride": 16}
VIT_TF = {"max_image_size": 56, "min_image_size": 14, "image_stride": 14}
CKPT = ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "bagel_config.json",
        "vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json")
T_RAW = [0.3, -0.5, 1.2]     # raw timesteps of the three noised images, in batch order
INSTR = ["Make it red.", "Add a hat."]


def _img(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fx(tiny_a):
    return Fixture(tiny_a, json.load(open(os.path.join(tiny_a, "manifest.json"))), jnp.float32, "xla")


@pytest.fixture(scope="module")
def mixed(fx, tmp_path_factory):
    """(reference PackedBatch from the dataset classes, manifest case, case arrays)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(3)
    t2i_img, vlm_img, edit_imgs = _img(rng, 32, 48), _img(rng, 28, 28), [_img(rng, 32, 32) for _ in range(3)]
    for d in ("t2i", "edit", "vlm"):
        os.makedirs(root / d)
    pq.write_table(pa.table({"image": [_png(t2i_img)], "captions": [json.dumps({"a": "A blue bird."})]}),
                   root / "t2i" / "p.parquet")
    pq.write_table(pa.table({"image_list": [[_png(a) for a in edit_imgs]], "instruction_list": [[[INSTR[0]], [INSTR[1]]]]}),
                   root / "edit" / "p.parquet")
    Image.fromarray(vlm_img).save(root / "vlm" / "v.png")
    text_conv = [{"from": "human", "value": "Hello there."}, {"from": "gpt", "value": "Hi, a cat."}]
    vlm_conv = [{"from": "human", "value": "<image>What is this?"}, {"from": "gpt", "value": "A red cat."}]
    with open(root / "vlm" / "rows.jsonl", "w") as f:
        f.write(json.dumps({"conversations": text_conv}) + "\n")
        f.write(json.dumps({"image": "v.png", "conversations": vlm_conv}) + "\n")
    tok, cfg = fx.tok, fx.cfg
    t2i = datasets.T2IDataset(str(root), {"data_dir": "t2i", "image_transform_args": T2I_TF}, tok, cfg)
    edit = datasets.EditDataset(str(root), {"data_dir": "edit", "image_transform_args": T2I_TF,
                                            "vit_image_transform_args": VIT_TF}, tok, cfg)
    vlm = datasets.VLMDataset(str(root), {"data_dir": "vlm", "jsonl_path": "vlm/rows.jsonl",
                                          "image_transform_args": VIT_TF}, tok, cfg)
    # the first data seed whose edit draw is the 3-picture chain with an intermediate target
    seed = next(s for s in range(100) if len(edit.plan(0, np.random.default_rng(s))) == 8)
    plans = [vlm.plan(0, None), edit.plan(0, np.random.default_rng(seed)), t2i.plan(0, np.random.default_rng(0)),
             vlm.plan(1, None)]
    items = [datasets.plan_to_items(p, np.random.default_rng(0), datasets.Dropout(0.0, 0.0, 0.0)) for p in plans]
    noised = [it for s in items for it in s if isinstance(it, packing.VaeItem) and it.loss]
    assert len(noised) == len(T_RAW)
    for it, t in zip(noised, T_RAW):
        it.t_raw = t
    ref = packing.pack([items], fx.sp, cfg)
    n_img, (Hm, Wm) = ref.vae_images.shape[0], ref.vae_images.shape[1:3]
    ds8 = cfg.vae.downsample
    arrays = {"sample1.image0_uint8": edit_imgs[0], "sample1.image1_uint8": edit_imgs[1],
              "sample1.image2_uint8": edit_imgs[2], "sample2.image_uint8": t2i_img, "sample3.image_uint8": vlm_img,
              "packed_timesteps": ref.vae_t_raw,
              "vae_posterior_eps": rng.standard_normal((n_img, cfg.vae.z_channels, Hm // ds8, Wm // ds8)).astype(np.float32),
              "noise": rng.standard_normal((ref.vae_src.shape[0], cfg.patch_latent_dim)).astype(np.float32)}
    samples = [{"kind": "text", "conversations": text_conv}, {"kind": "edit", "instructions": INSTR},
               {"kind": "t2i", "caption": "A blue bird."}, {"kind": "vlm", "question": "What is this?", "answer": "A red cat."}]
    meta = {"file": "train_forward.safetensors",
            "params": {"samples": samples, "t2i_transform": T2I_TF, "vit_transform": VIT_TF, "ce_weight": 1.0,
                       "mse_weight": 1.0, "cond_dropout_probs": {"text": 0.0, "vit": 0.0, "vae": 0.0}},
            "arrays": {k: {"role": "output"} for k in ("mse_preds", "ce_logits", "ce_per_token", "mse_per_element",
                                                       "ce_loss", "mse_loss", "ce_loss_reweighted")}}
    return ref, meta, arrays


def _hand_layout(fx):
    """Per-token (kind, RoPE position, segment, noise block, CE label or -1, marker: 1 start / 2 end / 0)
    derived by hand from the plans:
    text [bos ids eos] causal, positions advance by its length; image blocks [start body end] at one
    position, clean ones advance it by 1, noised ones not at all and get the next noise-block id of the row."""
    enc, sp = fx.tok.encode, fx.sp
    T, V, L = packing.KIND_TEXT, packing.KIND_VIT, packing.KIND_VAE
    blocks = [  # (sample, kind, payload): text -> (ids, loss); image -> (token count, noised)
        [("text", (enc("Hello there."), False)), ("text", (enc("Hi, a cat."), True))],
        [("vae", (4, False)), ("vit", (4, False)), ("text", (enc(INSTR[0]), False)), ("vae", (4, True)),
         ("vae", (4, False)), ("vit", (4, False)), ("text", (enc(INSTR[1]), False)), ("vae", (4, True))],
        [("text", (enc("A blue bird."), False)), ("vae", (6, True))],
        [("vit", (4, False)), ("text", (enc("What is this?"), False)), ("text", (enc("A red cat."), True))]]
    rows, noise_id = [], 0
    for seg, sample in enumerate(blocks, start=1):
        r = 0
        for kind, (a, b) in sample:
            if kind == "text":
                labels = list(a) + [sp.eos] if b else [-1] * (len(a) + 1)
                rows += [(T, r + j, seg, 0, labels[j] if j <= len(a) else -1, 0) for j in range(len(a) + 2)]
                r += len(a) + 2
                continue
            noise_id += int(b)
            nb = noise_id if b else 0
            body = V if kind == "vit" else L
            rows += [(T, r, seg, nb, -1, 1)] + [(body, r, seg, nb, -1, 0)] * a + [(T, r, seg, nb, -1, 2)]
            r += 0 if b else 1
    return np.array(rows)


def _check_layout(b, hand, sp):
    kind, pos, seg, nblk, label, marker = hand.T
    np.testing.assert_array_equal(np.nonzero(b.token_ids[0] == sp.start_of_image)[0], np.nonzero(marker == 1)[0])
    np.testing.assert_array_equal(np.nonzero(b.token_ids[0] == sp.end_of_image)[0], np.nonzero(marker == 2)[0])
    np.testing.assert_array_equal(b.kind[0], kind)
    np.testing.assert_array_equal(b.positions[0], pos)
    np.testing.assert_array_equal(b.seg[0], seg)
    np.testing.assert_array_equal(b.nblk[0], nblk)
    np.testing.assert_array_equal(b.ce_index, np.nonzero(label >= 0)[0])
    np.testing.assert_array_equal(b.ce_label, label[label >= 0])
    # noised latent tokens (MSE) are exactly the body tokens of the noise blocks
    np.testing.assert_array_equal(b.vae_dest[b.vae_mse], np.nonzero((nblk > 0) & (kind == packing.KIND_VAE))[0])


def test_mixed_layout_matches_hand_derived(fx, mixed):
    ref, meta, arr = mixed
    hand = _hand_layout(fx)
    _check_layout(ref, hand, fx.sp)
    ti = train_case.inputs(fx, meta, arr)
    for k, v in ref.arrays().items():   # the verifier's batch is the dataset-built one, array for array
        np.testing.assert_array_equal(getattr(ti.packed, k), v, err_msg=k)
    # image markers: every <|vision_start|> opens a block whose <|vision_end|> closes it
    ids, kind = ref.token_ids[0], ref.kind[0]
    starts, ends = np.nonzero(ids == fx.sp.start_of_image)[0], np.nonzero(ids == fx.sp.end_of_image)[0]
    assert len(starts) == len(ends) == 8
    for s, e in zip(starts, ends):
        assert kind[s] == kind[e] == packing.KIND_TEXT and (kind[s + 1:e] != packing.KIND_TEXT).all()


def _losses(fx, b, arr, eps_rows=None, noise_rows=None):
    """``train_forward`` on a logical-order batch (no expert split: both experts on every token)."""
    batch = {k: jnp.asarray(v) for k, v in b.arrays().items()}
    eps = np.transpose(arr["vae_posterior_eps"], (0, 2, 3, 1))
    noise = TrainNoise(jnp.asarray(eps if eps_rows is None else eps[eps_rows]),
                       jnp.asarray(arr["noise"] if noise_rows is None else arr["noise"][noise_rows]))
    _, aux = train_case.jit_train_forward(fx.bm.model, fx.bm.params, fx.bm.vae, fx.bm.vae_params, batch, noise,
                                          collect=True)
    return aux


def test_verifier_runs_a_mixed_fixture_folder(fx, mixed, tiny_a, tmp_path, capsys):
    """Every case of the folder runs; the losses and layout equal the reference batch's; CE per sample alone."""
    ref, meta, arr = mixed
    aux = _losses(fx, ref, arr)
    inter = aux["intermediates"]
    m = ref.vae_mse
    expected = {"ce_loss": np.array([aux["ce"]]), "mse_loss": np.array([aux["mse"]]),
                "ce_per_token": np.asarray(inter["ce_per_token"]), "mse_preds": np.asarray(inter["mse_preds"])[m],
                "packed_label_ids": ref.ce_label, "ce_loss_indexes": ref.ce_index,
                "packed_position_ids": ref.positions[0], "mse_loss_indexes": ref.vae_dest[m]}
    assert np.isfinite(float(aux["ce"])) and np.isfinite(float(aux["mse"])) and float(aux["mse"]) > 0
    folder = tmp_path / "fx"
    os.makedirs(folder)
    for f in CKPT:
        os.symlink(os.path.join(tiny_a, f), folder / f)
    save_file({**arr, **expected}, str(folder / "train_forward.safetensors"))
    manifest = {"cases": {"train_forward": meta}}
    json.dump(manifest, open(folder / "manifest.json", "w"))
    # the verifier's case loop (cli.main minus argument parsing and loading the same checkpoint again)
    assert cli.run(fx, str(folder), manifest, list(manifest["cases"]), str(tmp_path / "out"))
    lines = [l.split() for l in capsys.readouterr().out.splitlines() if l.startswith("train_forward")]
    assert {l[1] for l in lines} == set(expected) and all(l[-1] == "PASS" for l in lines), lines
    saved = load_file(str(tmp_path / "out" / "train_forward.safetensors"))
    assert all(np.isfinite(saved[k]).all() for k in meta["arrays"])

    # the samples with CE tokens (text: sample 1, vlm: sample 4), each alone in its own row: same per-token CE
    items = train_case.inputs(fx, meta, arr).items
    b = packing.pack([[items[0]], [items[3]]], fx.sp, fx.cfg)
    got = np.asarray(_losses(fx, b, arr, eps_rows=[], noise_rows=[])["intermediates"]["ce_per_token"])
    sample_of = ref.seg[0][ref.ce_index]
    want = np.concatenate([np.asarray(inter["ce_per_token"])[sample_of == s] for s in (1, 4)])
    assert got.shape == want.shape == (int((sample_of == 1).sum() + (sample_of == 4).sum()),)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_vit_runner_runs_every_pack(fx):
    """Packs named in the params: one line of arrays per pack (``pack<j>.``), images of a pack in their own
    attention segments (an image's outputs equal those of the image packed alone)."""
    from bagel_jax.parity import encoders

    rng = np.random.default_rng(5)
    arr = {"image0_uint8": _img(rng, 28, 42), "image1_uint8": _img(rng, 14, 28)}
    meta = {"params": {"packs": [["image0_uint8", "image1_uint8"], ["image1_uint8"]]}}
    out = encoders.run_vit(fx, meta, arr)
    n0, n1 = 2 * 3, 1 * 2
    np.testing.assert_array_equal(out["pack0.vit_token_seqlens"], [n0, n1])
    np.testing.assert_array_equal(out["pack0.cu_seqlens"], [0, n0, n0 + n1])
    np.testing.assert_array_equal(out["pack0.packed_seqlens"], [n0 + 2, n1 + 2])
    np.testing.assert_array_equal(out["pack0.packed_text_indexes"], [0, n0 + 1, n0 + 2, n0 + n1 + 3])
    np.testing.assert_array_equal(out["pack0.packed_text_ids"], [fx.sp.start_of_image, fx.sp.end_of_image] * 2)
    np.testing.assert_array_equal(out["pack0.packed_vit_token_indexes"],
                                  np.r_[np.arange(1, n0 + 1), np.arange(n0 + 3, n0 + n1 + 3)])
    np.testing.assert_array_equal(out["pack0.packed_position_ids"], np.zeros(n0 + n1 + 4))
    assert out["pack0.vit_output"].shape == (n0 + n1, fx.cfg.vit.hidden_size)
    np.testing.assert_allclose(out["pack0.llm_input_embeds"][n0:], out["pack1.llm_input_embeds"], rtol=0, atol=1e-5)
    # one pack by default: every image<k>_uint8 in k order, names without a prefix
    one = encoders.run_vit(fx, {"params": {}}, arr)
    np.testing.assert_array_equal(one["vit_token_seqlens"], [n0, n1])
    np.testing.assert_allclose(one["vit_output"], out["pack0.vit_output"], rtol=0, atol=1e-6)


def test_compare_checks_shapes_before_values():
    from bagel_jax.parity.compare import ShapeMismatch, compare

    ref = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert compare("text", "logits", ref + 1e-6, ref)[3]
    assert not compare("text", "logits", ref + 1.0, ref)[3]
    with pytest.raises(ShapeMismatch, match=r"computed shape \(3, 2\), reference shape \(2, 3\)"):
        compare("text", "logits", ref.reshape(3, 2), ref)   # same size, other shape: never reshaped
    with pytest.raises(ShapeMismatch):
        compare("train_forward", "ce_loss", np.float32(1.0), np.array([1.0], np.float32))
