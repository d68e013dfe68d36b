"""A/B of the perf harness's train step between checkouts and/or variants, one step per arm in turn.

    python bench/train_ab.py [--rounds 10] [--pin 1] ROOT[:VARIANT[:XLA_FLAGS]] ROOT[:VARIANT] ...

Each arm is a worker process that imports ``bagel_jax`` and ``bench/train_breakdown.py`` from its ROOT (a
checkout or ``git worktree``), builds the step of ``bench/train_breakdown.py`` (the ``../shared/perf`` train
case: its model, its 1,023-token pack, one device; VARIANT one of that script's ``VARIANTS``, default
``base``), compiles it, and then runs one step per request. Steps alternate between the arms (the order
reversed every round), so a change in the machine's load hits every arm alike. Prints per arm the median and
minimum wall and process-CPU seconds per step and the 1-min load average seen. ``--pin CPUS`` runs every
worker under ``taskset -c CPUS``: with one CPU, XLA runs one thread and the CPU time is the step's work,
little affected by other processes (the 2-thread wall time is what the harness measures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

WORKER = r'''
import json, os, sys, time
root = os.environ["AB_ROOT"]
sys.path.insert(0, os.path.join(root, "bench")); sys.path.insert(0, root)
sys.argv = ["train_breakdown"]
import train_breakdown as tb
if os.environ.get("AB_TUNE_MALLOC") == "1":
    from bagel_jax import runtime; runtime.tune_cpu_malloc()
import jax
from bagel_jax import sharding as shd
from bagel_jax.loading import random_model
from bagel_jax.tokenizer import load_tokenizer
cfg = tb.perf_config()
bm = random_model(cfg, jax.random.PRNGKey(0))
b = tb.perf_pack(load_tokenizer(tb.TINY_A).special, cfg, repeats=int(os.environ["AB_REPEATS"]))
arrays = {k: v.reshape((1, 1) + v.shape) for k, v in b.arrays().items()}
v = tb.Variant(os.environ["AB_VARIANT"], bm, arrays, shd.make_mesh(**shd.parse_mesh("data=1,fsdp=1,tensor=1")))
t = time.perf_counter(); v.run(); first = time.perf_counter() - t
print(json.dumps(dict(first=first, loss=float(v.metrics["loss"]), ce=float(v.metrics["loss_ce"]))), flush=True)
for _ in sys.stdin:
    c = time.process_time(); wall = v.run(); cpu = time.process_time() - c
    print(json.dumps(dict(wall=wall, cpu=cpu)), flush=True)
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arms", nargs="+", help="ROOT[:VARIANT[:extra XLA_FLAGS]]")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1, help="the pack holds this many copies of the harness samples")
    ap.add_argument("--tune-malloc", action="store_true",
                    help="every worker calls bagel_jax.runtime.tune_cpu_malloc() first, as train.py does")
    ap.add_argument("--untuned-malloc", action="store_true",
                    help="workers run with BAGEL_JAX_CPU_MALLOC=0: nothing of bagel_jax.runtime.tune_cpu_buffers "
                         "(what importing bagel_jax does on CPU)")
    ap.add_argument("--pin", default="", help="taskset -c CPUS for every worker")
    a = ap.parse_args()
    procs = []
    for arm in a.arms:
        root, _, rest = arm.partition(":")
        var, _, flags = rest.partition(":")
        env = dict(os.environ, AB_ROOT=os.path.abspath(root), AB_VARIANT=var or "base", AB_REPEATS=str(a.repeats),
                   AB_TUNE_MALLOC="1" if a.tune_malloc else "0",
                   **({"BAGEL_JAX_CPU_MALLOC": "0"} if a.untuned_malloc else {}),
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        cmd = (["taskset", "-c", a.pin] if a.pin else []) + [sys.executable, "-c", WORKER]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                      cwd=os.path.abspath(root)))
    for arm, p in zip(a.arms, procs):
        r = json.loads(p.stdout.readline())
        print(f"{arm}: first call {r['first']:.1f} s, loss {r['loss']:.6f}, ce {r['ce']:.6f}", flush=True)
    res, loads = {arm: [] for arm in a.arms}, []
    for i in range(a.rounds):
        order = list(zip(a.arms, procs))
        for arm, p in (order[::-1] if i % 2 else order):
            p.stdin.write("step\n")
            p.stdin.flush()
            res[arm].append(json.loads(p.stdout.readline()))
        loads.append(os.getloadavg()[0])
    for p in procs:
        p.stdin.close()
        p.wait()
    print(f"1-min load during the rounds: {min(loads):.2f} .. {max(loads):.2f} (median {np.median(loads):.2f})")
    first = None
    for arm in a.arms:
        w = np.array([r["wall"] for r in res[arm]])
        c = np.array([r["cpu"] for r in res[arm]])
        first = first or float(np.median(w))
        print(f"{arm}: wall median {np.median(w):.3f} s, min {w.min():.3f}; cpu median {np.median(c):.3f} s, "
              f"min {c.min():.3f}; {first / np.median(w):.3f}x the first arm; walls {' '.join(f'{x:.2f}' for x in w)}")


if __name__ == "__main__":
    main()
