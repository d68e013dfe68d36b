"""Shared helpers of the tests/test_train_*.py files (run train.py in subprocesses, read metrics)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "train-tiny.yaml")
# The test session's XLA compilation cache (tests/conftest.py: a fresh folder per session, removed at exit):
# identical programs of the training tests, in-process or in train.py subprocesses, compile once.
COMPILE_CACHE = os.environ["BAGEL_JAX_TEST_COMPILE_CACHE"]
# The same overrides in every single-device test so that they share compiled programs.
COMMON = ["data.packs_per_step=4", "train.save_every=3"]


def make_data(path: str, num: int = 24, bad: int = 1, seed: int = 0) -> str:
    from bagel_jax.demo import synthetic

    if not os.path.isfile(os.path.join(path, "dataset.yaml")):
        synthetic.write(path, num=num, seed=seed, bad=bad)
    return path


def env(devices: int = 1) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    # the test process's XLA flags (tests/conftest.py) and this device count
    flags = [f for f in e.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    e["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    e["JAX_PLATFORMS"] = "cpu"
    return e


def train_cmd(data: str, workdir: str, steps: int, *extra: str, mesh: str = "data=1,fsdp=1,tensor=1") -> list[str]:
    return [sys.executable, os.path.join(REPO, "train.py"), "--config", CONFIG, "--data", data, "--workdir", workdir,
            "--steps", str(steps), "--mesh", mesh, "--compile-cache", COMPILE_CACHE, "--no-progress", *COMMON, *extra]


def run_train(data: str, workdir: str, steps: int, *extra: str, devices: int = 1, mesh: str = "data=1,fsdp=1,tensor=1",
              check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(train_cmd(data, workdir, steps, *extra, mesh=mesh), env=env(devices), capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def metrics(workdir: str) -> list[dict]:
    """The per-step records of the latest run (metrics.jsonl is append-only; see bagel_jax.train.metrics)."""
    from bagel_jax.train.metrics import read_metrics

    return read_metrics(os.path.join(workdir, "metrics.jsonl"))
