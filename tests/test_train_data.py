"""Training data (no compilation): synthetic data, tokenizer, official-format readers, packing iterator,
bad samples, sharding rules, optimiser config. Runs in a few seconds."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train_helpers import make_data

from bagel_jax import sharding as shd
from bagel_jax.config import ConfigError, config_from_yaml
from bagel_jax.data import packing
from bagel_jax.demo import synthetic
from bagel_jax.data.datasets import DataConfigError, Dropout, PlanEntry, plan_to_items
from bagel_jax.data.loader import DataConfig, PackedIterator
from bagel_jax.data.row_state import merge_states, state_totals
from bagel_jax.tokenizer import load_tokenizer
from bagel_jax.train import optimizer as O

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("syn")), num=24, bad=2)


@pytest.fixture(scope="module")
def cfg():
    return config_from_yaml(os.path.join(REPO, "configs", "train-tiny.yaml"))


def small_dcfg(**kw):
    base = dict(expected_num_tokens=96, max_num_tokens=128, max_num_tokens_per_sample=128, prefer_buffer_before=64,
                row_buckets=(128,), vae_images_per_pack=6, packs_per_step=2)
    base.update(kw)
    return DataConfig(**base)


def test_synthetic_files_and_held_out(data):
    import pyarrow.parquet as pq

    t = pq.read_table(os.path.join(data, "t2i", "part-00000.parquet")).to_pylist()
    assert set(t[0]) == {"image", "captions"}
    held = [(c, s, p) for c in range(8) for s in range(4) for p in range(5) if synthetic.held_out(c, s, p)]
    held_phrases = {synthetic.phrase(o) for o in held}
    for row in t[:-2]:  # the last two rows are the deliberately broken ones
        caps = json.loads(row["captions"])
        assert len(caps) >= 3
        for cap in caps.values():
            # every caption names each shape as "a {colour} {shape} on the {position}" / "in the center"
            assert " on the " in cap or " in the center" in cap
            assert not any(h in cap for h in held_phrases), cap
    ev = [json.loads(line) for line in open(os.path.join(data, "eval", "prompts.jsonl"))]
    assert len(ev) == len(held) and all(synthetic.held_out(synthetic.COLOURS.index(e["colour"]),
                                                          synthetic.SHAPES.index(e["shape"]),
                                                          synthetic.POSITIONS.index(e["position"])) for e in ev)
    e = pq.read_table(os.path.join(data, "edit", "part-00000.parquet")).to_pylist()[0]
    assert len(e["image_list"]) == len(e["instruction_list"]) + 1
    first = json.loads(open(os.path.join(data, "vlm", "train.jsonl")).readline())
    assert first["conversations"][0]["value"].startswith("<image>")


def test_synthetic_deterministic(tmp_path):
    a = synthetic.write(str(tmp_path / "a"), num=4, seed=3)
    b = synthetic.write(str(tmp_path / "b"), num=4, seed=3)
    fa = open(tmp_path / "a" / "t2i" / "part-00000.parquet", "rb").read()
    fb = open(tmp_path / "b" / "t2i" / "part-00000.parquet", "rb").read()
    assert a["eval"] == b["eval"] and fa == fb


def test_tokenizer_qwen2_format(data, cfg):
    tok = load_tokenizer(os.path.join(data, "tokenizer"))
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(data, "tokenizer", f))
    text = "a red circle on the left and a blue star in the center"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(tok.special.__dict__.values()) < cfg.llm.vocab_size
    assert tok.encode("<|im_start|>") == [tok.special.bos]


def test_iterator_deterministic_and_resumable(data, cfg):
    tok = load_tokenizer(os.path.join(data, "tokenizer"))
    a = PackedIterator(data, small_dcfg(), cfg, tok)
    batches = [a.next_batch() for _ in range(4)]
    b = PackedIterator(data, small_dcfg(), cfg, tok)
    b.next_batch()
    b.next_batch()
    state = b.get_state()
    c = PackedIterator(data, small_dcfg(), cfg, tok)
    c.set_state(json.loads(json.dumps(state)))  # the state survives JSON (it is checkpointed as JSON)
    for ref in batches[2:]:
        got = c.next_batch()
        assert ref[1] == got[1]
        for k in ref[0]:
            np.testing.assert_array_equal(ref[0][k], got[0][k], err_msg=k)
    arr, ntok = batches[0]
    assert arr["token_ids"].shape == (1, 2, 1, 128)          # [accum, packs, rows, row_len]
    assert arr["vae_images"].shape == (1, 2, 6, 64, 64, 3)
    assert ntok == int((arr["seg"] > 0).sum())


def test_bad_samples_skipped_and_counted(data, cfg, caplog):
    tok = load_tokenizer(os.path.join(data, "tokenizer"))
    it = PackedIterator(data, small_dcfg(), cfg, tok)
    with caplog.at_level("WARNING", logger="bagel_jax.data"):
        for _ in range(40):
            it.next_batch()
    skipped = state_totals(it.get_state())["skipped"]
    # each split has 2 broken rows among 26; after 40 steps every row has been visited
    assert sum(skipped.values()) >= 4 and all(v >= 1 for v in skipped.values()), skipped
    assert "skipping bad sample" in caplog.text


def _collate_split(parts, packs):
    """Collate each process's packs with the shapes the processes agree on (the maximum layout stats), as
    bagel_jax.train.distributed.BatchSource does, and join the rows: the global batch."""
    stats = np.max([it.layout_stats(p) for it, p in zip(parts, packs)], axis=0)
    arrays = [it.collate(p, stats)[0] for it, p in zip(parts, packs)]
    return {k: np.concatenate([a[k] for a in arrays], axis=1) for k in arrays[0]}


def test_row_streams_make_the_batch_independent_of_the_process_split(data, cfg):
    """2 processes building rows {0, 1} and {2, 3} give the same global batch as 1 process building all 4,
    and the iterator state moves between the splits (2 -> 1 and 1 -> 2 processes on resume)."""
    tok = load_tokenizer(os.path.join(data, "tokenizer"))
    dc = small_dcfg(packs_per_step=4)
    one = PackedIterator(data, dc, cfg, tok)
    two = [PackedIterator(data, dc, cfg, tok, rows=r) for r in ([0, 1], [2, 3])]
    for _ in range(3):
        ref, _ = one.next_batch()
        got = _collate_split(two, [it.next_packs() for it in two])
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    merged = merge_states([it.get_state() for it in two])
    assert merged == one.get_state()
    back = PackedIterator(data, dc, cfg, tok)          # 2 -> 1
    back.set_state(json.loads(json.dumps(merged)))
    split = [PackedIterator(data, dc, cfg, tok, rows=r) for r in ([0, 1], [2, 3])]   # 1 -> 2
    for it in split:
        it.set_state(one.get_state())
    ref, _ = one.next_batch()
    for got in (back.next_batch()[0], _collate_split(split, [it.next_packs() for it in split])):
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    with pytest.raises(DataConfigError, match="row streams"):
        PackedIterator(data, small_dcfg(packs_per_step=2), cfg, tok).set_state(merged)


def test_row_streams_read_an_epoch_once(data, cfg):
    """Each row stream reads its own positions of a group's epoch permutation: over an epoch the streams
    together read every row of the group exactly once (so no sample twice in a step)."""
    tok = load_tokenizer(os.path.join(data, "tokenizer"))
    it = PackedIterator(data, small_dcfg(packs_per_step=4), cfg, tok)
    n = len(it.ds["vlm_sft"])
    seen = []
    for r in range(4):
        it._use_row(r)
        seen += [it._row("vlm_sft", i) for i in range(-(-(n - r) // 4))]
    assert sorted(seen) == list(range(n))


def test_dropout_and_timesteps():
    img = np.zeros((3, 32, 32), np.float32)
    plan = [PlanEntry("text", enable_cfg=True, text=[1, 2]), PlanEntry("vit_image", enable_cfg=True, image=img),
            PlanEntry("vae_image", enable_cfg=True, image=img), PlanEntry("vae_image", loss=True, image=img)]
    items = plan_to_items(plan, np.random.default_rng(0), Dropout(1.0, 1.0, 1.0))
    # dropped text: nothing; dropped images still advance RoPE by one (official)
    assert [type(i).__name__ for i in items] == ["PositionGap", "PositionGap", "VaeItem"]
    assert items[-1].loss and np.isfinite(items[-1].t_raw)
    kept = plan_to_items(plan, np.random.default_rng(0), Dropout(0.0, 0.0, 0.0))
    assert [type(i).__name__ for i in kept] == ["TextItem", "VitItem", "VaeItem", "VaeItem"]
    draws = [plan_to_items(plan[3:], np.random.default_rng(s), Dropout())[0].t_raw for s in range(400)]
    assert abs(np.mean(draws)) < 0.15 and abs(np.std(draws) - 1) < 0.15  # raw N(0, 1)


def test_position_gap_in_packing(cfg):
    sp = packing.SpecialTokens(1, 2, 3, 4)
    b = packing.pack([[[packing.TextItem([5]), packing.PositionGap(1), packing.TextItem([6])]]], sp, cfg)
    assert list(b.positions[0]) == [0, 1, 2, 4, 5, 6]


def test_data_config_errors(data, cfg):
    with pytest.raises(DataConfigError, match="row_buckets"):
        DataConfig.from_dict(dict(max_num_tokens=512, row_buckets=[128]))
    with pytest.raises(DataConfigError, match="unknown key"):
        DataConfig.from_dict(dict(bogus=1))
    tok = load_tokenizer(os.path.join(data, "tokenizer"))
    with pytest.raises(DataConfigError, match="dataset.yaml"):
        PackedIterator(os.path.join(data, "t2i"), small_dcfg(), cfg, tok)


def test_sharding_rules():
    import jax

    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    spec = shd.spec_for("language_model/embed_tokens/embedding", (576, 64), mesh)
    assert spec == jax.sharding.PartitionSpec(None, None)  # size-1 axes are not used
    assert shd.logical_axes("language_model/model/layers/layer/q_proj_moe_gen/kernel", 3) == (None, "embed", "heads")
    assert shd.logical_axes("language_model/model/layers/layer/mlp/down_proj/kernel", 3) == (None, "mlp", "embed")
    assert shd.logical_axes("vit_pos_embed/pos_embed", 2) == (None, None)
    assert shd.parse_mesh("data=2,fsdp=2,tensor=2") == dict(data=2, fsdp=2, tensor=2)
    with pytest.raises(shd.MeshError, match="unknown axis"):
        shd.parse_mesh("model=2")
    with pytest.raises(shd.MeshError, match="needs 4 devices"):
        shd.make_mesh(2, 2, 1, devices=jax.devices()[:1])


def test_trainable_masks():
    tc = O.TrainConfig()
    assert not O.is_trainable("vit_pos_embed/pos_embed", tc)
    assert not O.is_trainable("latent_pos_embed/pos_embed", tc)
    assert O.is_trainable("language_model/model/layers/layer/q_proj/kernel", tc)
    und = O.TrainConfig(freeze_und=True)
    assert not O.is_trainable("language_model/model/layers/layer/q_proj/kernel", und)
    assert O.is_trainable("language_model/model/layers/layer/q_proj_moe_gen/kernel", und)
    assert O.is_trainable("llm2vae/kernel", und) and not O.is_trainable("vit_model/post_layernorm/scale", und)
    conn = O.TrainConfig(trainable="connector")
    assert O.is_trainable("connector/fc1/kernel", conn) and not O.is_trainable("llm2vae/kernel", conn)
    assert not O.is_trainable("vit_model/x", O.TrainConfig(freeze_vit=True))
    with pytest.raises(ConfigError, match="unknown key"):
        O.TrainConfig.from_dict(dict(learning_rate=1))
    with pytest.raises(ConfigError, match="lr_schedule"):
        O.TrainConfig.from_dict(dict(lr_schedule="linear"))


def test_lr_schedule_official_defaults():
    tc = O.TrainConfig()
    assert (tc.lr, tc.beta1, tc.beta2, tc.eps, tc.weight_decay, tc.max_grad_norm, tc.ema_decay) == \
        (1e-4, 0.9, 0.95, 1e-15, 0.0, 1.0, 0.9999)
    s = O.lr_schedule(tc, 10_000)
    assert float(s(0)) == 0.0 and abs(float(s(1000)) - 5e-5) < 1e-9 and abs(float(s(5000)) - 1e-4) < 1e-9
    c = O.lr_schedule(O.TrainConfig(lr_schedule="cosine", warmup_steps=10, total_steps=110), 0)
    assert abs(float(c(10)) - 1e-4) < 1e-9 and abs(float(c(110)) - 1e-7) < 1e-9


def test_optimizer_takes_the_steps_grad_norm():
    """make_optimizer's clip uses the norm the train step passes (``grad_norm=``) and gives optax's
    clip_by_global_norm + AdamW exactly, with and without it, clipping or not; frozen leaves get no update."""
    params = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4), "frozen": jnp.ones(3)}
    mask = {"a": True, "b": True, "frozen": False}
    tc = O.TrainConfig(warmup_steps=0)
    opt = O.make_optimizer(tc, mask, 10)
    ref = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm),
                      optax.adamw(O.lr_schedule(tc, 10), b1=tc.beta1, b2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay))
    trained = {k: params[k] for k in ("a", "b")}
    for scale in (1e-3, 10.0):                             # under and over max_grad_norm
        grads = {"a": scale * jnp.full((2, 3), 0.5), "b": scale * jnp.arange(4.0), "frozen": jnp.zeros(3)}
        want, _ = ref.update({k: grads[k] for k in ("a", "b")}, ref.init(trained), trained)
        for kw in ({}, {"grad_norm": optax.global_norm(grads)}):
            got, _ = opt.update(grads, opt.init(params), params, **kw)
            for k in ("a", "b"):
                np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
            assert not np.asarray(got["frozen"]).any()
    clip, g = O.clip_by_global_norm(1.0), {"x": jnp.array([3.0, 4.0])}   # norm 5
    want, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    np.testing.assert_array_equal(clip.update(g, clip.init(g))[0]["x"], want["x"])
    np.testing.assert_array_equal(clip.update(g, clip.init(g), grad_norm=jnp.float32(5.0))[0]["x"], want["x"])
    np.testing.assert_allclose(clip.update(g, clip.init(g), grad_norm=jnp.float32(10.0))[0]["x"], [0.3, 0.4])  # the given one


def test_interleaved_group(tmp_path, data, cfg):
    import shutil

    import yaml

    root = tmp_path / "inter"
    os.makedirs(root / "seq")
    shutil.copytree(os.path.join(data, "tokenizer"), root / "tokenizer")
    shutil.copyfile(os.path.join(data, "vlm", "images", "000000.png"), root / "seq" / "a.png")
    row = {"sequence": [{"type": "text", "text": "draw a red circle on the left", "enable_cfg": 1},
                        {"type": "vae_image", "image": "a.png", "loss": 1},
                        {"type": "vit_image", "image": "a.png"},
                        {"type": "text", "text": "it is red", "loss": 1}]}
    with open(root / "seq" / "rows.jsonl", "w") as f:
        f.write(json.dumps(row) + "\n")
        f.write(json.dumps({"sequence": [{"type": "vae_image", "image": "missing.png", "loss": 1}]}) + "\n")
    tf = dict(max_image_size=64, min_image_size=64, image_stride=16)
    yaml.safe_dump({"interleaved": dict(data_dir="seq", jsonl_path="seq/rows.jsonl", image_transform_args=tf,
                                        vit_image_transform_args=dict(max_image_size=56, min_image_size=56,
                                                                      image_stride=14))},
                   open(root / "dataset.yaml", "w"))
    tok = load_tokenizer(str(root / "tokenizer"))
    it = PackedIterator(str(root), small_dcfg(dropout_text=0.0, dropout_vit=0.0, dropout_vae=0.0), cfg, tok)
    arr, _ = it.next_batch()
    n_vit = int((arr["vit_seg"] > 0).sum())
    assert arr["vae_mse"].sum() > 0 and arr["ce_valid"].sum() > 0 and n_vit > 0 and n_vit % 16 == 0
    assert state_totals(it.get_state())["skipped"]["interleaved"] >= 1  # the row with a missing image


def test_group_weights_override_the_groups_file(data, cfg):
    tok = load_tokenizer(os.path.join(data, "tokenizer"))
    dc = DataConfig.from_dict(dict(dataclasses.asdict(small_dcfg()), group_weights={"vlm_sft": 0.0, "unified_edit": 3.0}))
    it = PackedIterator(data, dc, cfg, tok)
    want = {"t2i_pretrain": 1.0, "unified_edit": 3.0, "vlm_sft": 0.0}
    np.testing.assert_allclose(it.p, [want[n] / 4.0 for n in it.names])
    for _ in range(3):
        it.next_batch()
    assert it.state["next"]["vlm_sft"] == 0 and it.state["next"]["unified_edit"] > 0
    with pytest.raises(DataConfigError, match="not in"):
        PackedIterator(data, dataclasses.replace(dc, group_weights=(("nope", 1.0),)), cfg, tok)
    with pytest.raises(DataConfigError, match="mapping"):
        DataConfig.from_dict(dict(group_weights=[1, 2]))
    with pytest.raises(DataConfigError, match="numbers"):
        DataConfig.from_dict(dict(group_weights={"vlm_sft": "lots"}))


def test_exponent_floats_in_config_file_and_overrides(tmp_path):
    """``lr: 1e-3`` (no dot) is a string in plain YAML 1.1; configs and ``key=value`` overrides read it as a float."""
    from bagel_jax.train.run_config import load_train_config

    with open(os.path.join(REPO, "configs", "train-tiny.yaml")) as f:
        text = f.read()
    assert "\ntrain:\n" in text
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("\ntrain:\n", "\ntrain:\n  min_lr: 2e-6\n", 1))
    _, _, tc, dc = load_train_config(str(path), ["train.lr=3e-4", "train.warmup_steps=5", "data.dropout_text=1E-1"])
    assert tc.lr == pytest.approx(3e-4) and tc.min_lr == pytest.approx(2e-6) and tc.warmup_steps == 5
    assert dc.dropout_text == pytest.approx(0.1)


def test_edit_move_share(tmp_path):
    def moves(share):
        out = synthetic.write(str(tmp_path / f"m{share}"), num=40, seed=1, size=32, edit_move_share=share)
        import pyarrow.parquet as pq
        instr = pq.read_table(os.path.join(out["out"], "edit", "part-00000.parquet")).column("instruction_list").to_pylist()
        steps = [s for row in instr for s in row]
        return sum(s[0].startswith("move") for s in steps) / len(steps)
    assert moves(1.0) > 0.8 and moves(0.0) == 0.0 and moves(0.5) < moves(1.0)
    with pytest.raises(ValueError, match="edit_move_share"):
        synthetic.write(str(tmp_path / "bad"), num=2, edit_move_share=1.5)
