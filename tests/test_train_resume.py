"""Exact resume after SIGKILL, clear errors for corrupt / missing checkpoints, state saved on failure.

All runs use the same config and shapes, so with the shared compilation cache train.py compiles once.
"""

import os
import shutil
import signal
import subprocess
import time

import pytest

from train_helpers import env, make_data, metrics, run_train, train_cmd

KEYS = ("loss_ce", "loss_mse", "grad_norm", "lr", "tokens")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("syn")), num=24, bad=1)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ref"))
    run_train(data, wd, 9)
    return wd, metrics(wd)


def test_failure_then_sigkill_then_resume_matches_uninterrupted(data, reference, tmp_path):
    _, ref = reference
    wd = str(tmp_path / "killed")
    # 1) an error after step 4: the state is checkpointed before exiting (save_every is 3)
    out = run_train(data, wd, 9, "--debug-fail-at", "4", check=False)
    assert out.returncode != 0 and "simulated failure" in out.stderr
    assert os.path.isdir(os.path.join(wd, "checkpoints", "4", "state"))
    # 2) a long run resumed from 4, killed (SIGKILL: no cleanup at all) once the step-6 checkpoint is complete
    p = subprocess.Popen(train_cmd(data, wd, 1000), env=env(1), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    ck = os.path.join(wd, "checkpoints", "6")
    t0 = time.time()
    try:
        while not (os.path.isdir(os.path.join(ck, "state")) and os.path.isdir(os.path.join(ck, "data"))):
            assert p.poll() is None, "training exited before the step-6 checkpoint"
            assert time.time() - t0 < 500, "no checkpoint within 500 s"
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    killed_at = max(m["step"] for m in metrics(wd))
    # 3) resume from the latest complete checkpoint and finish
    out = run_train(data, wd, 9)
    assert "resumed from step" in out.stdout
    got = metrics(wd)
    assert [m["step"] for m in got] == list(range(1, 10))  # lines after the restored step were replaced
    for r, g in zip(ref, got):
        for k in KEYS:
            # bit-identical on the same machine: same programs, same data, same keys
            assert r[k] == g[k], (r["step"], k, r[k], g[k], killed_at)


def test_rerun_when_done_is_a_no_op(data, reference):
    wd, ref = reference
    out = run_train(data, wd, 9)
    assert "nothing to do" in out.stdout
    assert metrics(wd) == ref


def test_one_device_steps_per_layer_and_checkpoints_stacked(data, reference, tmp_path):
    """On one CPU device the step runs on one array per layer (RunSetup.run_abstract; no per-step slices of
    stacked weights); the checkpoints keep the stacked layout that every mesh reads (the resume test above
    restores it into the per-layer state)."""
    import jax

    from bagel_jax.nn import layer_loop
    from bagel_jax.train.cli import build_parser
    from bagel_jax.train.loop import build_setup
    from bagel_jax.train.run_checkpoint import load_train_state

    su = build_setup(build_parser().parse_args(train_cmd(data, str(tmp_path), 1)[2:]))
    assert layer_loop.layout_of(su.run_abstract["params"]) == "unrolled"
    assert layer_loop.layout_of(su.abstract["params"]) == "scan"
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(load_train_state(os.path.join(reference[0], "checkpoints")))[0]]
    stacked = [p for p in paths if "['layers']" in p]
    assert {p.split("]")[0] for p in stacked} >= {"['params'", "['ema'", "['opt_state'"}
    assert not [p for p in paths if "['layers_" in p]


def _main_in_process(data, wd, steps, capsys):
    from bagel_jax.train.cli import main

    rc = main(train_cmd(data, wd, steps)[2:])
    return rc, capsys.readouterr()


def test_corrupt_checkpoint_is_a_clear_error(data, reference, tmp_path, capsys):
    wd = str(tmp_path / "corrupt")
    shutil.copytree(reference[0], wd)
    state_dir = os.path.join(wd, "checkpoints", "9", "state")
    n = 0
    for root, _, files in os.walk(state_dir):  # truncate every file of the state item
        for f in files:
            path = os.path.join(root, f)
            if os.path.getsize(path) > 0:
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 3)
                n += 1
    assert n > 0
    rc, out = _main_in_process(data, wd, 12, capsys)
    assert rc == 2, out
    assert "cannot restore checkpoint" in out.err and "checkpoints/9" in out.err
    assert max(m["step"] for m in metrics(wd)) == 9  # nothing was trained or overwritten


def test_missing_checkpoint_item_is_a_clear_error(data, reference, tmp_path, capsys):
    wd = str(tmp_path / "missing")
    shutil.copytree(reference[0], wd)
    shutil.rmtree(os.path.join(wd, "checkpoints", "9", "data"))
    rc, out = _main_in_process(data, wd, 12, capsys)
    assert rc == 2 and "incomplete" in out.err and "'data'" in out.err


def test_missing_vae_weights_is_a_clear_error(data, reference, tmp_path, capsys):
    wd = str(tmp_path / "novae")
    shutil.copytree(reference[0], wd)
    os.remove(os.path.join(wd, "ae.safetensors"))
    rc, out = _main_in_process(data, wd, 12, capsys)
    assert rc == 2 and "ae.safetensors" in out.err


def test_sigterm_checkpoints_and_stops(data, tmp_path):
    wd = str(tmp_path / "term")
    p = subprocess.Popen(train_cmd(data, wd, 1000), env=env(1), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    path = os.path.join(wd, "metrics.jsonl")
    t0 = time.time()
    try:
        while not (os.path.isfile(path) and any('"step": 4,' in line for line in open(path))):
            assert p.poll() is None and time.time() - t0 < 500
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, out   # 128 + SIGTERM: a scheduler must not read "finished"
    last = max(m["step"] for m in metrics(wd))
    assert f"checkpointed and stopping at step {last}" in out
    assert os.path.isdir(os.path.join(wd, "checkpoints", str(last), "state"))
