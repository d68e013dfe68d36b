"""Freezing (freeze_und), bfloat16 compute with fp32 master weights, gradient accumulation (2 micro-batches)
and extra special-token CE weights in one short train.py run: frozen leaves never move, trainable ones do, the losses are finite."""

import os

import jax
import numpy as np
import pytest

from train_helpers import make_data, metrics, run_train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = make_data(str(tmp_path_factory.mktemp("syn")), num=24, bad=0)
    wd = str(tmp_path_factory.mktemp("run"))
    run_train(data, wd, 3, "train.freeze_und=true", "train.compute_dtype=bfloat16", "train.ema_decay=0.5",
              "train.accum_steps=2",
              'train.special_token_weights={"<|vision_start|>": 2.0}')
    return wd


def test_freeze_und_bf16(run):
    from bagel_jax.train.run_checkpoint import load_train_state
    from bagel_jax.train.optimizer import TrainConfig, is_trainable

    m = metrics(run)
    assert len(m) == 3 and all(np.isfinite(r["loss_ce"]) and np.isfinite(r["loss_mse"]) for r in m)
    # 2 micro-batches x 4 packs per step: each step consumed 8 packs
    assert all(r["tokens"] > 8 * 48 for r in m)
    state = load_train_state(os.path.join(run, "checkpoints"))
    tc = TrainConfig(freeze_und=True)
    ema = dict(jax.tree_util.tree_leaves_with_path(state["ema"]))
    n_frozen = n_moved = 0
    for path, p in jax.tree_util.tree_leaves_with_path(state["params"]):
        name = "/".join(k.key for k in path)
        assert np.asarray(p).dtype == np.float32, name  # fp32 master weights under bf16 compute
        if not is_trainable(name, tc):
            n_frozen += 1
            np.testing.assert_array_equal(np.asarray(p), np.asarray(ema[path]), err_msg=name)
        else:
            n_moved += not np.array_equal(np.asarray(p), np.asarray(ema[path]))
    assert n_frozen > 10 and n_moved > 10
    assert not is_trainable("language_model/embed_tokens/embedding", tc)
    assert not is_trainable("vit_pos_embed/pos_embed", tc)
