"""Start N local processes of a multi-host command on this machine (testing ``train.py --multihost``
without a cluster; docs/multihost.md)::

    python -m bagel_jax.train.launch_local --processes 2 --devices 4 -- \\
        python train.py --multihost --config configs/train-tiny.yaml --data DATA --workdir RUN --steps 10 \\
        --mesh data=2,fsdp=2,tensor=2

Each process gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT`` (a free port), ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``, ``JAX_PLATFORMS=cpu`` and ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``
(CPU devices; JAX's CPU collectives are gloo). Output lines are prefixed with ``[process i]``. The exit
status is the first non-zero status of a process (0 when all succeed); Ctrl-C is passed to every process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, devices: int, port: int, base=None) -> dict:
    """The environment of local process ``i`` of ``n`` (module doc)."""
    e = dict(os.environ if base is None else base)
    flags = [f for f in e.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    e.update(XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]), JAX_PLATFORMS="cpu",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
    return e


def start(cmd: list[str], n: int, devices: int, port=None, base_env=None, **popen) -> list[subprocess.Popen]:
    """Start ``cmd`` as processes ``0..n-1`` (``port``: the coordinator's, default a free one)."""
    port = free_port() if port is None else port
    return [subprocess.Popen(cmd, env=process_env(i, n, devices, port, base_env), **popen) for i in range(n)]


def _pump(i: int, stream, out) -> None:
    for line in stream:
        out.write(f"[process {i}] {line}")
        out.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.train.launch_local", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", "-n", type=int, default=2, help="number of processes")
    ap.add_argument("--devices", "-d", type=int, default=4, help="CPU devices per process")
    ap.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command after --")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd or args.processes < 1 or args.devices < 1:
        ap.error("need --processes >= 1, --devices >= 1 and a command after --")
    procs = start(cmd, args.processes, args.devices, args.port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                  text=True, bufsize=1)
    pumps = [threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        codes = [p.wait() for p in procs]
    for t in pumps:
        t.join(timeout=5)
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
