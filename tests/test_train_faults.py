"""Hostile input and faults in training : a data folder that yields
no sample stops with a message, bad setup input fails before any compute, a non-finite step never
reaches a checkpoint, a failed save stops the run at once, metrics.jsonl is append-only, signals exit
128 + signal after checkpointing, also while the data pipeline is stuck.

The runs share train_helpers' config and shapes, so they reuse one compiled train step (compile cache).
"""

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from train_helpers import env, make_data, metrics, train_cmd

from bagel_jax.config import config_from_yaml
from bagel_jax.data import loader as L
from bagel_jax.data.datasets import DataConfigError
from bagel_jax.data.row_state import state_totals
from bagel_jax.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("t2i_pretrain", "unified_edit", "vlm_sft")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("syn")), num=24, bad=1)


def _model_cfg():
    return config_from_yaml(os.path.join(REPO, "configs", "train-tiny.yaml"))


def _main(argv, capsys):
    """train.py's main in this process (the pytest process has no persistent compilation cache: conftest).
    Garbage of earlier tests is collected and its output dropped first: orbax's failed write tasks of an earlier
    run log "Task exception was never retrieved" tracebacks when collected, which must not land in this run's
    captured stderr."""
    import gc

    from bagel_jax.train.cli import main

    gc.collect()
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr()


def _error_line(err: str) -> str:
    """A failed run reports exactly one ``error:`` line on stderr and no traceback (the data loader's
    warnings about the synthetic data's bad rows may come too)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# -- rows 1, 2: a data folder that cannot produce a sample -------------------------------------------

def test_all_rows_bad_stops_naming_groups_and_rate_limits_warnings(tmp_path, caplog):
    from bagel_jax.demo import synthetic

    synthetic.write(str(tmp_path), num=0, bad=3)   # every row of every group is unreadable
    tok = load_tokenizer(os.path.join(tmp_path, "tokenizer"))
    it = L.PackedIterator(str(tmp_path), L.DataConfig.from_dict(dict(max_failed_draws=300)), _model_cfg(), tok)
    with caplog.at_level("WARNING", logger="bagel_jax.data"), pytest.raises(DataConfigError) as e:
        it.next_batch()
    msg = str(e.value)
    assert "no usable sample in 300 draws in a row" in msg
    for g in GROUPS:
        assert f"{g}: " in msg and "unreadable or malformed row" in msg, msg
    assert sum(state_totals(it.get_state())["skipped"].values()) == 300
    # one line per bad row for the first WARN_FIRST rows of a group, then summaries at most every 30 s
    n = len([r for r in caplog.records if r.name == "bagel_jax.data"])
    assert len(GROUPS) <= n <= len(GROUPS) * (L.WARN_FIRST + 1), n


def test_samples_too_long_stop_with_the_reason(data):
    tok = load_tokenizer(os.path.join(data, "tokenizer"))
    dc = L.DataConfig.from_dict(dict(max_num_tokens_per_sample=10, max_failed_draws=100))
    t0 = time.time()
    with pytest.raises(DataConfigError) as e:
        L.PackedIterator(data, dc, _model_cfg(), tok).next_batch()
    assert time.time() - t0 < 60
    assert "more than data.max_num_tokens_per_sample=10 tokens" in str(e.value)
    assert all(f"{g}: " in str(e.value) for g in GROUPS)


# -- row 12 (and non-finite config values): one line, exit 2, before any compute --------------------

def _bad_yaml(tmp):
    p = os.path.join(tmp, "bad.yaml")
    with open(p, "w") as f:
        f.write("model: {llm: [1, 2\n")
    return p


def _copy_data(data, tmp, edit=None):
    d = os.path.join(tmp, "data")
    shutil.copytree(data, d)
    if edit:
        edit(d)
    return d


def _write(rel, text):
    def edit(d):
        with open(os.path.join(d, rel), "w") as f:
            f.write(text)
    return edit


SETUP_CASES = {
    "missing --data": (lambda data, tmp: dict(data=os.path.join(tmp, "nope")), "--data folder not found"),
    "bad --config YAML": (lambda data, tmp: dict(config=_bad_yaml(tmp)), "not valid YAML (line 2"),
    "dataset.yaml not YAML": (lambda data, tmp: dict(data=_copy_data(data, tmp, _write("dataset.yaml", "a: [\n"))),
                              "dataset.yaml: not valid YAML"),
    "dataset.yaml unknown group": (lambda data, tmp: dict(data=_copy_data(data, tmp, _write(
        "dataset.yaml", "bogus: {data_dir: t2i, image_transform_args: {}}\n"))), "unknown dataset group 'bogus'"),
    "parquet_info.json not JSON": (lambda data, tmp: dict(data=_copy_data(data, tmp, _write(
        "edit/parquet_info.json", "{not json"))), "parquet_info.json: not valid JSON"),
    "parquet_info.json a number": (lambda data, tmp: dict(data=_copy_data(data, tmp, _write(
        "edit/parquet_info.json", "3"))), "expected a non-empty JSON object"),
    "--workdir not writable": (lambda data, tmp: dict(workdir=os.path.join(_file(tmp), "run")),
                               "--workdir"),
    "--export not writable": (lambda data, tmp: dict(extra=["--export", os.path.join(_file(tmp), "out")]),
                              "--export"),
    "train.lr=.nan": (lambda data, tmp: dict(extra=["train.lr=.nan"]), "train: lr must be a finite number"),
}


def _file(tmp):
    p = os.path.join(tmp, "a-file")
    open(p, "w").close()
    return p


@pytest.mark.parametrize("case", list(SETUP_CASES))
def test_setup_errors_are_one_line_exit_2_before_compute(case, data, tmp_path, capsys):
    make, expect = SETUP_CASES[case]
    kw = dict(data=data, workdir=str(tmp_path / "run"), config=None, extra=[])
    kw.update(make(data, str(tmp_path)))
    if "--export" not in kw["extra"]:  # a failed run leaves no (empty) export folder behind
        kw["extra"] = kw["extra"] + ["--export", str(tmp_path / "never-made" / "export")]
    argv = train_cmd(kw["data"], kw["workdir"], 3, *kw["extra"])[2:]
    if kw["config"]:
        argv[argv.index("--config") + 1] = kw["config"]
    rc, out = _main(argv, capsys)
    assert rc == 2, out
    assert expect in _error_line(out.err)
    # nothing was initialised or written: the checks come before any compute
    assert not os.path.exists(os.path.join(kw["workdir"], "ae.safetensors"))
    assert not os.path.exists(os.path.join(kw["workdir"], "checkpoints"))
    assert not os.path.exists(tmp_path / "never-made")


# -- row 18: metrics.jsonl is append-only --------------------------------------------------------------

def test_metrics_jsonl_is_appended_to_never_overwritten(tmp_path):
    from bagel_jax.train.metrics import MetricsWriter, read_metrics

    path = tmp_path / "metrics.jsonl"
    old = "".join(json.dumps(dict(step=s, loss=float(s))) + "\n" for s in range(1, 6))
    path.write_text(old + '{"step": 6, "lo')   # a run killed mid-line
    w = MetricsWriter(str(tmp_path), 0, resumed=False)   # fresh start: all checkpoints were deleted
    for s in (1, 2):
        w.write(dict(step=s, loss=10.0 + s))
    w.close()
    text = path.read_text()
    assert text.startswith(old + '{"step": 6, "lo\n')      # the old records are all still there
    assert [(r["step"], r["loss"]) for r in read_metrics(str(path))] == [(1, 11.0), (2, 12.0)]
    w = MetricsWriter(str(tmp_path), 1, resumed=True)    # resume from step 1: step 2 is redone
    w.write(dict(step=2, loss=22.0))
    w.close()
    assert path.read_text().startswith(text)
    assert [(r["step"], r["loss"]) for r in read_metrics(str(path))] == [(1, 11.0), (2, 22.0)]


# -- rows 19, 21: signals exit 128 + signal after checkpointing, also with a stuck data pipeline --------

# SIGINT after a step is slow (a training step, ~1 min): the same handler as SIGTERM; a signal after real steps
# is also tests/test_train_resume.py::test_sigterm_checkpoints_and_stops
@pytest.mark.parametrize("signame,batches,code", [("SIGTERM", 0, 143),
                                                  pytest.param("SIGINT", 1, 130, marks=pytest.mark.slow)])
def test_signal_while_data_pipeline_is_stuck(signame, batches, code, data, tmp_path, capsys, monkeypatch):
    """The loader delivers ``batches`` batches, then blocks forever: the signal must still end the run
    promptly, after checkpointing the steps done, with exit 128 + signal."""
    real = L.PackedIterator.next_batch
    served, stuck, release = [0], threading.Event(), threading.Event()

    def next_batch(self):
        if served[0] >= batches:
            stuck.set()
            release.wait(120)
        served[0] += 1
        return real(self)

    monkeypatch.setattr(L.PackedIterator, "next_batch", next_batch)
    sig = getattr(signal, signame)
    default = signal.getsignal(sig)
    wd = str(tmp_path / "run")
    sent = []

    def killer():
        # wait until the loader is stuck, the train loop holds the handler and has done its steps
        t0 = time.time()
        while time.time() - t0 < 300:
            mpath = os.path.join(wd, "metrics.jsonl")
            done = os.path.isfile(mpath) and len(metrics(wd)) >= batches
            if stuck.is_set() and signal.getsignal(sig) is not default and done:
                time.sleep(0.3)
                sent.append(time.time())
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        rc, out = _main(train_cmd(data, wd, 50)[2:], capsys)
    finally:
        release.set()
    assert sent, "the loader never got stuck"
    assert rc == code, out
    assert time.time() - sent[0] < 30, "the run did not stop promptly"
    assert f"{signame}: " in out.out
    ck = os.path.join(wd, "checkpoints")
    if batches:
        assert f"checkpointed and stopping at step {batches}" in out.out
        assert os.path.isdir(os.path.join(ck, str(batches), "state"))
    else:
        assert "nothing trained since the start" in out.out
        assert not [d for d in os.listdir(ck) if d.isdigit()] if os.path.isdir(ck) else True


# -- row 5: a non-finite step never reaches the weights or a checkpoint --------------------------------

def _finite_state(wd, step):
    from bagel_jax.train.run_checkpoint import load_train_state
    import jax

    st = load_train_state(os.path.join(wd, "checkpoints"), step)
    assert int(st["step"]) == step
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(st) if
               np.issubdtype(np.asarray(x).dtype, np.floating))
    return st


def test_nonfinite_step_stops_and_keeps_the_last_good_state(data, tmp_path, capsys):
    wd = str(tmp_path / "run")
    rc, out = _main(train_cmd(data, wd, 8, "--debug-nan-at", "5")[2:], capsys)
    assert rc == 1, out
    line = _error_line(out.err)
    assert "step 5: non-finite loss nan" in line and "train.on_nonfinite=stop" in line, line
    assert "latest checkpoint is step 4" in line
    steps = sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit())
    assert steps == [3, 4]   # save_every 3, then the last good state; never step 5
    _finite_state(wd, 4)
    rec = metrics(wd)
    assert [r["step"] for r in rec] == [1, 2, 3, 4, 5] and [r["finite"] for r in rec] == [True] * 4 + [False]


@pytest.fixture(scope="module")
def skip_run(data, tmp_path_factory):
    """4 steps with step 2 poisoned, train.on_nonfinite=skip, a checkpoint every step, --export."""
    from bagel_jax.train.cli import main

    wd = str(tmp_path_factory.mktemp("skip"))
    rc = main(train_cmd(data, wd, 4, "--debug-nan-at", "2", "train.on_nonfinite=skip", "train.save_every=1",
                        "train.keep_checkpoints=10", "--export", os.path.join(wd, "export"))[2:])
    return wd, rc


def test_nonfinite_step_skipped_when_configured(skip_run):
    import jax

    wd, rc = skip_run
    assert rc == 0
    s1, s2, s3 = (_finite_state(wd, s) for s in (1, 2, 3))
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                  (s1["params"], s1["ema"]), (s2["params"], s2["ema"]))
    assert all(jax.tree_util.tree_leaves(same))       # the skipped step changed nothing
    assert not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), s2["params"], s3["params"])))
    assert [r["finite"] for r in metrics(wd)] == [True, False, True, True]


def test_export_writes_inference_json_of_the_trained_sizes(skip_run):
    from bagel_jax.inference.api import folder_defaults

    d = folder_defaults(os.path.join(skip_run[0], "export"))
    # the synthetic data: t2i images 64 px (VAE), VLM images 56 px (ViT), one 64x64 VAE bucket
    assert d["image_size"] == (64, 64)
    assert (d["vae_transform"].max_image_size, d["vae_transform"].image_stride) == (64, 16)
    assert (d["vit_transform"].max_image_size, d["vit_transform"].image_stride) == (56, 14)


# -- row 20: a truncated checkpoint file is one clean line, in a real process -------------------------

def test_truncated_checkpoint_data_file_is_one_clean_line(data, skip_run, tmp_path):
    wd = str(tmp_path / "trunc")
    shutil.copytree(skip_run[0], wd)
    files = []
    for root, _, names in os.walk(os.path.join(wd, "checkpoints", "4", "state")):
        files += [os.path.join(root, n) for n in names if "/d/" in os.path.join(root, n) + "/" and
                  os.path.getsize(os.path.join(root, n)) > 4096]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    p = subprocess.run(train_cmd(data, wd, 6), env=env(1), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 2, p.stderr[-3000:]
    line = _error_line(p.stderr)
    assert "cannot restore checkpoint" in line and "checkpoints/4" in line
    assert "TensorStore" not in p.stderr and "'driver'" not in p.stderr and "Traceback" not in p.stderr


# -- row 7: a failed (asynchronous) save stops the run at once, the last good checkpoint kept ------------

@pytest.fixture
def small_disk(tmp_path):
    """A 10 MB tmpfs (root only): room for the frozen VAE and one checkpoint of the tiny model."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): " + r.stderr.decode(errors="replace")[:200])
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_save_failure_stops_at_once(data, small_disk, capsys):
    wd = os.path.join(small_disk, "run")
    rc, out = _main(train_cmd(data, wd, 1000)[2:], capsys)
    assert rc == 1, out
    line = _error_line(out.err)
    assert "saving checkpoint step 6" in line and "latest complete checkpoint is step 3" in line, line
    assert "Traceback" not in out.err
    assert max(r["step"] for r in metrics(wd)) < 20    # surfaced at once, not at the end of 1000 steps
    ck = os.path.join(wd, "checkpoints")
    assert os.listdir(ck) == ["3"]                      # partial step directories were removed
    _finite_state(wd, 3)                                # the last good checkpoint is intact


def test_failing_save_stops_at_once_without_root(data, tmp_path, capsys, monkeypatch):
    """Row 7 where no small disk can be mounted: orbax's save raises (no space) from step 6 on; the run stops
    at that save with one line naming the latest complete checkpoint, which is intact."""
    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def failing_save(self, step, *a, **kw):
        if step >= 6:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *a, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    wd = str(tmp_path / "run")
    rc, out = _main(train_cmd(data, wd, 1000)[2:], capsys)
    assert rc == 1, out
    line = _error_line(out.err)
    assert "saving checkpoint step 6" in line and "latest complete checkpoint is step 3" in line, line
    assert "Traceback" not in out.err
    assert max(r["step"] for r in metrics(wd)) < 20
    _finite_state(wd, 3)
