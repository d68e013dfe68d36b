"""Multi-host training with real processes on 127.0.0.1 (``train.py --multihost``, docs/multihost.md):
2 processes x 4 CPU devices against 1 process x 8 on the same mesh (``fsdp`` spans the processes: every
process holds half of each weight and of the optimiser state, writes its shards of the checkpoint and
builds half of the rows; the row split of ``data`` / ``tensor`` spanning them is checked below), with
checkpoints written by both, a killed peer, a resume, and process-count changes on restore.

One chain of runs (the processes are the expensive part; checkpoints every 2 steps):

1. reference: 1 x 8 devices, steps 1-7;
2. 2 x 4 from the reference's step-2 checkpoint (1 -> 2 processes), until step 5 is logged; then process 1
   is SIGKILLed: process 0 must stop by itself with one ``error:`` line within the bound, and the latest
   complete checkpoint must be step 4 (written by both processes);
3. 2 x 4 again: resumes from step 4, its step 5 is bitwise the killed run's; after step 5 process 1 alone
   gets SIGTERM: both stop at the same step S, checkpoint it together and exit 143;
4. 1 x 8 on the same folder: resumes the 2-process step-S checkpoint (2 -> 1) and trains to step 7.

Every step of 2-4 has the reference's token counts (the same samples in the same global rows) and its
losses within the tolerance of tests/test_train_mesh.py (collectives reduce in a different order).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from train_helpers import REPO, env, make_data, metrics, run_train, train_cmd

from bagel_jax import sharding as shd
from bagel_jax.train import distributed as D
from bagel_jax.train import launch_local
from bagel_jax.train.run_config import TrainSetupError

MESH = "data=1,fsdp=4,tensor=2"
# data.seed=0: all 7 steps share one padded layout, the first step's of tests/test_train_mesh.py (one program)
EXTRA = ["train.keep_checkpoints=10", "train.save_every=2", "data.seed=0"]
PEER_TIMEOUT = 10      # --peer-timeout of the 2-process runs
STOP_BOUND = 45        # seconds from the SIGKILL until the surviving process must have exited


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("syn")), num=24, bad=1)


def _start2(data, wd, steps, *extra):
    cmd = train_cmd(data, wd, steps, "--multihost", "--peer-timeout", str(PEER_TIMEOUT), *EXTRA, *extra, mesh=MESH)
    return launch_local.start(cmd, 2, 4, base_env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO)


def _records(wd):
    """Every step record of metrics.jsonl in file order (also those of a killed run that a resume replaced)."""
    out = []
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:   # a line being written
                continue
            if "step" in r and "event" not in r:
                out.append(r)
    return out


def _close(a, b, what):
    assert a["tokens"] == b["tokens"] and a["ce_tokens"] == b["ce_tokens"], (what, a["step"])
    for k in ("loss_ce", "loss_mse", "grad_norm"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=f"{what} step {a['step']} {k}")


def _checkpoints(wd):
    return sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit())


def _wait_for_step(wd, skip, step, procs):
    t0 = time.time()
    while not any(r["step"] >= step for r in _records(wd)[skip:]):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.time() - t0 < 400, f"2-process run did not reach step {step}"
        time.sleep(0.05)


def test_two_processes_match_one_and_survive_a_killed_peer(data, tmp_path):
    ref_wd, wd = str(tmp_path / "ref"), str(tmp_path / "two")
    run_train(data, ref_wd, 7, *EXTRA, devices=8, mesh=MESH, timeout=400)
    ref = {r["step"]: r for r in metrics(ref_wd)}
    assert sorted(ref) == list(range(1, 8)) and _checkpoints(ref_wd) == [2, 4, 6, 7]

    # 2: resume the 1-process step-2 checkpoint with 2 processes, SIGKILL process 1 after step 5
    shutil.copytree(ref_wd, wd)
    for s in (4, 6, 7):
        shutil.rmtree(os.path.join(wd, "checkpoints", str(s)))
    procs = _start2(data, wd, 1000)
    _wait_for_step(wd, 7, 5, procs)
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    try:
        _, err = procs[0].communicate(timeout=STOP_BOUND)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        raise AssertionError(f"process 0 still runs {STOP_BOUND} s after its peer was killed")
    procs[1].communicate()
    # gloo reports the closed connection at once (a failed collective), else the watchdog after PEER_TIMEOUT
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert procs[0].returncode == 1 and len(errors) == 1 and errors[0].startswith("error: process 0 of 2: "), \
        err[-3000:]
    assert time.time() - t_kill <= PEER_TIMEOUT + 10
    assert _checkpoints(wd) == [2, 4]       # nothing after step 4 marked complete
    killed = {r["step"]: r for r in _records(wd)[7:]}
    for s in range(3, 6):
        _close(killed[s], ref[s], "1 -> 2 processes")

    # 3: both processes again: resume from step 4, bitwise the killed run; SIGTERM to process 1 only
    n = len(_records(wd))
    procs = _start2(data, wd, 1000)
    _wait_for_step(wd, n, 5, procs)
    procs[1].send_signal(signal.SIGTERM)
    out = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [o[1][-2000:] for o in out]
    got = {r["step"]: r for r in metrics(wd)}
    stop = max(got)
    assert stop in (5, 6) and _checkpoints(wd) == [2, 4, stop], (stop, _checkpoints(wd))
    for k in ("loss", "loss_ce", "loss_mse", "grad_norm", "tokens"):
        assert got[5][k] == killed[5][k], k
    for s in range(5, stop + 1):
        _close(got[s], ref[s], "2 processes resumed")

    # 4: 2 -> 1 process: the 2-process checkpoint in one process
    run_train(data, wd, 7, *EXTRA, devices=8, mesh=MESH, timeout=400)
    got = {r["step"]: r for r in metrics(wd)}
    assert sorted(got) == list(range(1, 8))
    for s in range(stop + 1, 8):
        _close(got[s], ref[s], "2 -> 1 process")


def _one_error(p):
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1, (p.returncode, p.stderr[-2000:])
    return errors[0]


def test_bad_distributed_setup_fails_before_any_compile(data, tmp_path):
    """A taken coordinator port, a process id out of range and an unreachable coordinator: exit 2 with one
    ``error:`` line, in seconds."""
    base = train_cmd(data, str(tmp_path / "wd"), 1, "--multihost", mesh="data=1,fsdp=-1,tensor=1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cmds = {"port": base + ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                                "--process-id", "0"],
                "id": base + ["--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"]}
        free = launch_local.free_port()
        cmds["nobody"] = base + ["--coordinator-address", f"127.0.0.1:{free}", "--num-processes", "2",
                                 "--process-id", "1", "--init-timeout", "2"]
        procs = {k: subprocess.Popen(c, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k, c in cmds.items()}
        out = {}
        for k, p in procs.items():
            o, e = p.communicate(timeout=120)
            out[k] = subprocess.CompletedProcess(p.args, p.returncode, o, e)
    assert f"port {port} is already in use" in _one_error(out["port"])
    assert "--process-id 2 is not in 0..1" in _one_error(out["id"])
    assert f"cannot reach the coordinator 127.0.0.1:{free} within 2 s" in _one_error(out["nobody"])
    for p in out.values():
        assert "[train] mesh" not in p.stdout   # nothing was built


class _FakeDevice:
    """A device of process ``process_index`` (the mesh rules only read ids and process indices)."""

    def __init__(self, i, p):
        self.id, self.process_index, self.platform, self.device_kind = i, p, "cpu", "cpu"


@pytest.mark.parametrize("mesh,rows,owners", [
    ((2, 2, 2), 4, [[0], [0], [1], [1]]),                  # data spans the processes
    ((1, 8, 1), 8, [[0]] * 4 + [[1]] * 4),                 # fsdp spans them
    ((1, 2, 4), 4, [[0], [0], [1], [1]]),                  # fsdp across, tensor within
    ((1, 1, 8), 4, [[0, 1]] * 4),                          # tensor spans them: every process builds every row
])
def test_rows_follow_the_devices(mesh, rows, owners):
    """Which data rows each of 2 processes x 4 devices builds: those its devices hold (the rows of 1 x 8)."""
    m = shd.make_mesh(*mesh, devices=[_FakeDevice(i, i // 4) for i in range(8)])
    assert D.row_owners(m, rows) == owners


def test_rows_of_a_process_must_be_one_block():
    # devices of the two processes interleaved: process 0 would hold rows 0, 2, 4, 6
    m = shd.make_mesh(1, 8, 1, devices=[_FakeDevice(i, i % 2) for i in range(8)])
    with pytest.raises(TrainSetupError, match="not one contiguous block"):
        D.local_rows(m, 8)
