"""On synthetic data a tiny model's CE and MSE fall clearly; the exported EMA folder loads through our
loader and equals the trained EMA params."""

import os

import jax
import numpy as np
import pytest

from train_helpers import make_data, metrics, run_train

STEPS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = make_data(str(tmp_path_factory.mktemp("syn")), num=24, bad=1)
    wd = str(tmp_path_factory.mktemp("run"))
    export = os.path.join(wd, "export")
    run_train(data, wd, STEPS, "--export", export, "train.save_every=1000")
    return wd, export


def test_losses_fall(trained):
    m = metrics(trained[0])
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    first = lambda k: np.mean([r[k] for r in m[:5]])
    last = lambda k: np.mean([r[k] for r in m[-10:]])
    # observed on CPU (first 5 vs last 10 of 40 steps): CE ~7.1 -> ~1.6, MSE ~2.1 -> ~1.2 (at 30 steps
    # already 2.8 / 1.25, both inside these bounds)
    assert last("loss_ce") < 0.5 * first("loss_ce"), (first("loss_ce"), last("loss_ce"))
    assert last("loss_mse") < 0.8 * first("loss_mse"), (first("loss_mse"), last("loss_mse"))
    assert all(np.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 for r in m)
    assert m[-1]["data_skipped"] >= 1  # the broken rows were skipped and counted


def test_export_loads_and_equals_ema(trained):
    from bagel_jax.loading import load_model
    from bagel_jax.train.run_checkpoint import load_train_state

    wd, export = trained
    for f in ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "vocab.json"):
        assert os.path.isfile(os.path.join(export, f)), f
    bm = load_model(export)
    assert bm.tokenizer is not None
    state = load_train_state(os.path.join(wd, "checkpoints"))
    assert int(state["step"]) == STEPS
    flat_ema = jax.tree_util.tree_leaves_with_path(state["ema"])
    flat_loaded = dict(jax.tree_util.tree_leaves_with_path(bm.params))
    assert len(flat_ema) == len(flat_loaded)
    moved = 0
    for path, ema in flat_ema:
        np.testing.assert_array_equal(np.asarray(flat_loaded[path]), np.asarray(ema), err_msg=str(path))
        params = state["params"]
        for k in path:
            params = params[k.key]
        moved += not np.array_equal(np.asarray(params), np.asarray(ema))
    assert moved > 0  # the EMA is not the raw params
