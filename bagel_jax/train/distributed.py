"""Multi-host training (``train.py --multihost``, docs/multihost.md): start JAX's distributed runtime with
checks that fail in seconds, watch the other processes, and agree on what every step needs.

* :func:`initialize`: ``jax.distributed.initialize`` from ``--coordinator-address`` / ``--num-processes``
  / ``--process-id`` (or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``; none
  given = JAX's cluster detection: TPU pods, SLURM, Open MPI...). Before it: a process id outside
  ``0..N-1``, a coordinator port that is taken (process 0) or a coordinator that never answers (the
  others) is a :class:`~bagel_jax.train.run_config.TrainSetupError`; JAX itself would abort the process
  with a stack trace or wait 5 minutes. After it: a process count other than ``--num-processes`` is one.
* :class:`Watchdog`: a heartbeat of every process in the coordinator's key-value store. A process that
  stops beating for ``--peer-timeout`` seconds (killed, hung, its host lost), or that ends with an error,
  ends the others with one ``error:`` line and exit status 1: a collective waiting for a dead peer never
  returns on CPU (gloo) and waits for JAX's own heartbeat timeout elsewhere, which then aborts with a stack
  trace. The exit skips any checkpoint (a save is a collective too); the last complete one stays latest.
* :class:`BatchSource`: the batches of the step loop. Each process builds the data rows its devices hold
  (:func:`local_rows`; the row streams of :mod:`bagel_jax.data.loader`), and all processes agree per step
  on the static shapes (the maximum of :meth:`~bagel_jax.data.loader.PackedIterator.layout_stats`), on
  stopping (a signal on any process stops all at the same step) and on the step's token and FLOP counts.
  So a step's global batch is the same for any number of processes.
* :func:`gather_data_state`: the data-iterator state of all processes, for the checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from .. import sharding as shd
from ..data.loader import PackedIterator
from ..data.prefetch import Interrupted, Prefetcher
from ..data.row_state import merge_states, state_totals
from .metrics import step_flops
from .run_config import TrainSetupError

BEAT_PREFIX = "bagel_jax/beat/"
BEAT_EVERY_S = 1.0
PEER_ERROR_GRACE_S = 5.0    # a peer that ended with an error: time for this process to end on its own


def multi() -> bool:
    return jax.process_count() > 1


def _env_int(value, name: str) -> Optional[int]:
    if value is None:
        value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TrainSetupError(f"{name}: expected an integer, got {value!r}") from None


def _host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TrainSetupError(f"--coordinator-address: expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def _check_port_free(port: int) -> None:
    """The coordinator binds ``[::]:PORT``; JAX crashes (SIGSEGV) when that port is taken."""
    for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:       # no IPv6 on this host
            continue
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gRPC: a TIME_WAIT port is free
            try:
                s.bind((addr, port))
            except OSError as e:
                raise TrainSetupError(f"--coordinator-address: port {port} is already in use on this host "
                                      f"({e.strerror}); pick a free port (every process must get the same "
                                      "address)") from None


def _wait_for_coordinator(host: str, port: int, timeout: float) -> None:
    """Until process 0's coordinator accepts connections; JAX aborts with a stack trace when it never does."""
    t_end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() > t_end:
                raise TrainSetupError(f"cannot reach the coordinator {host}:{port} within {timeout:.0f} s "
                                      f"({e.strerror or e}); is process 0 running with the same "
                                      "--coordinator-address?") from None
            time.sleep(0.2)


def initialize(args) -> None:
    """``jax.distributed.initialize`` with the checks of the module doc; starts the :class:`Watchdog`."""
    addr = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    n = _env_int(args.num_processes, "JAX_NUM_PROCESSES")
    pid = _env_int(args.process_id, "JAX_PROCESS_ID")
    if n is not None and n < 1:
        raise TrainSetupError(f"--num-processes must be >= 1, got {n}")
    if n is not None and pid is not None and not 0 <= pid < n:
        raise TrainSetupError(f"--process-id {pid} is not in 0..{n - 1} (--num-processes {n})")
    init_timeout = int(args.init_timeout)
    if addr is not None and pid is not None:
        host, port = _host_port(addr)
        if pid == 0:
            _check_port_free(port)
        else:
            _wait_for_coordinator(host, port, init_timeout)
    # JAX's own heartbeat timeout later than ours, so that the watchdog reports a lost peer first
    kw = dict(initialization_timeout=init_timeout, heartbeat_timeout_seconds=int(args.peer_timeout) + 60)
    timer = threading.Timer(init_timeout, _exit_error, args=(
        f"timed out after {init_timeout} s waiting for all processes to join at {addr or 'the coordinator'} "
        f"(--num-processes {n if n is not None else '(detected)'}: are that many started, with ids 0..N-1?)", 2))
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(addr, n, pid, **kw)
    finally:
        timer.cancel()
    if n is not None and jax.process_count() != n:
        raise TrainSetupError(f"--num-processes {n}, but the coordinator {addr} runs {jax.process_count()} "
                              "processes (every process must get the same --num-processes)")
    print(f"[train] process {jax.process_index()} of {jax.process_count()} ({jax.local_device_count()} local "
          f"devices, {jax.device_count()} in all)", flush=True)
    if jax.process_count() > 1:
        Watchdog.start(float(args.peer_timeout))


def _exit_error(msg: str, code: int = 1) -> None:
    """One ``error:`` line and exit now, from any thread, without atexit handlers (JAX's shutdown would
    wait for the lost peer) or a checkpoint."""
    os.write(2, f"error: {msg}\n".encode())
    os._exit(code)


class Watchdog:
    """Heartbeats in the coordinator's key-value store (module doc). One per process."""

    active: Optional["Watchdog"] = None

    def __init__(self, timeout: float):
        # the key-value store of jax.distributed has no public API; jax's own multihost utilities use it
        from jax._src.distributed import global_state
        self.client = global_state.client
        self.me, self.n = jax.process_index(), jax.process_count()
        self.timeout = timeout
        self.beats = 0
        self.seen: dict[int, tuple[str, float]] = {}   # peer -> (last value, when it changed)
        self.done = threading.Event()
        self.t = threading.Thread(target=self._run, name="bagel_jax-watchdog", daemon=True)

    @classmethod
    def start(cls, timeout: float) -> "Watchdog":
        cls.active = cls(timeout)
        cls.active._beat()
        cls.active.t.start()
        return cls.active

    def _beat(self, value: Optional[str] = None) -> None:
        self.beats += 1
        self.client.key_value_set(f"{BEAT_PREFIX}{self.me}", value or str(self.beats), allow_overwrite=True)

    def _run(self) -> None:
        while not self.done.wait(BEAT_EVERY_S):
            try:
                self._beat()
                values = dict(self.client.key_value_dir_get(BEAT_PREFIX))
            except Exception as e:  # the coordinator (process 0) is gone
                if self.done.is_set():
                    return
                first = (str(e).splitlines() or [""])[0][:200]
                _exit_error(f"process {self.me} of {self.n}: lost the coordinator (process 0): {first}")
            self._check(values, time.monotonic())

    def _check(self, values: dict, now: float) -> None:
        for p in range(self.n):
            if p == self.me or self.done.is_set():
                continue
            v = values.get(f"{BEAT_PREFIX}{p}", "")
            last, since = self.seen.get(p, (None, now))
            if v != last:
                self.seen[p] = (v, now)
                since = now
            grace = PEER_ERROR_GRACE_S if v != "exit 0" else self.timeout   # a finished peer: we end soon too
            if v.startswith("exit ") and now - since >= grace:
                _exit_error(f"process {self.me} of {self.n}: process {p} ended (status {v[5:]}) while this one "
                            "still runs; stopping (the latest complete checkpoint is kept)")
            if not v.startswith("exit ") and now - since > self.timeout:
                _exit_error(f"process {self.me} of {self.n}: no heartbeat from process {p} for {self.timeout:.0f} s "
                            "(killed, hung or its host lost); stopping without a checkpoint (the latest complete "
                            "one is kept)")

    @classmethod
    def finish(cls, code: int) -> None:
        """Stop beating and tell the others how this process ended (``exit 0``: they keep going)."""
        w = cls.active
        if w is None:
            return
        w.done.set()
        try:
            w._beat(f"exit {int(code)}")
        except Exception:  # the coordinator is gone already
            pass


def local_rows(mesh, num_rows: int) -> list[int]:
    """The data rows (packs of a micro step, ``data.packs_per_step``) this process's devices hold."""
    owners = row_owners(mesh, num_rows)
    rows = [r for r in range(num_rows) if jax.process_index() in owners[r]]
    if rows != list(range(rows[0], rows[-1] + 1)):   # sharding.put_batch places one block of rows per process
        raise TrainSetupError(f"--mesh {dict(mesh.shape)}: the devices of process {jax.process_index()} hold the "
                              f"data rows {rows}, not one contiguous block (order the mesh devices by process)")
    return rows


def row_owners(mesh, num_rows: int) -> list[list[int]]:
    """For each data row, the processes whose devices hold it (several when the batch is replicated over an
    axis that spans processes, e.g. ``tensor``)."""
    sharding = shd.batch_sharding(mesh, 2)
    owners: list[set] = [set() for _ in range(num_rows)]
    for dev, idx in sharding.devices_indices_map((1, num_rows)).items():
        for r in range(num_rows)[idx[1]]:
            owners[r].add(dev.process_index)
    return [sorted(o) for o in owners]


def allgather(x: np.ndarray) -> np.ndarray:
    """``[processes, ...]`` of a host array (float64 / int64 go through as int32 pairs: JAX runs 32-bit)."""
    x = np.ascontiguousarray(x)
    wide = x.dtype.itemsize == 8
    out = np.asarray(multihost_utils.process_allgather(x.view(np.int32) if wide else x))
    return out.view(x.dtype) if wide else out


def gather_data_state(state: dict) -> dict:
    """The data-iterator state of every process's rows (:func:`bagel_jax.data.row_state.merge_states`)."""
    if not multi():
        return state
    b = np.frombuffer(json.dumps(state).encode(), np.uint8)
    n = allgather(np.array([b.size], np.int32))[:, 0]
    buf = np.zeros(int(n.max()), np.int32)
    buf[:b.size] = b
    rows = allgather(buf)
    return merge_states([json.loads(bytes(rows[p, :n[p]].astype(np.uint8))) for p in range(len(n))])


class BatchSource:
    """The step loop's batches: ``next()`` gives ``(batch, ntok, flops, dstate, totals)`` or None to stop.
    ``batch``: this process's rows ``[accum, rows, ...]`` (:func:`bagel_jax.sharding.put_batch` assembles
    the global batch); ``ntok`` / ``flops`` / ``totals`` (data counters, as :func:`state_totals`): of the
    whole step; ``dstate``: this process's iterator state after the batch (:func:`gather_data_state`)."""

    def __init__(self, it: PackedIterator, cfg, mesh, depth: int):
        self.it, self.cfg, self.multi = it, cfg, multi()
        self.stop_signal = 0
        owners = row_owners(mesh, it.num_shards)
        # rows whose counts this process reports (each row by one process)
        self.primary = [i for i, r in enumerate(it.rows) if owners[r][0] == jax.process_index()]
        self.pre = Prefetcher(it, depth, produce=it.next_packs if self.multi else it.next_batch)

    def next(self, stop: Callable[[], int]):
        """``stop()``: the signal number that asks this process to stop, or 0; a stop on any process sets
        :attr:`stop_signal` and returns None on all."""
        if not self.multi:
            if stop():
                return None
            try:
                (batch, ntok), dstate = self.pre.next(interrupted=stop)
            except Interrupted:
                return None
            return batch, ntok, step_flops(self.cfg, batch), dstate, state_totals(dstate)
        # all processes run the same gathers in the same order (a stop ends the step after the first on
        # all); a signal while the data source is stuck waits for it (a second signal exits at once)
        packs, dstate = self.pre.next()
        agreed = allgather(np.concatenate([[int(stop())], self.it.layout_stats(packs)]).astype(np.int64))
        if agreed[:, 0].any():
            self.stop_signal = int(agreed[:, 0].max())
            return None
        batch, _ = self.it.collate(packs, agreed[:, 1:].max(0))
        mine = {k: v[:, self.primary] for k, v in batch.items()}
        tot = state_totals({"rows": [dstate["rows"][self.it.rows[i]] for i in self.primary]})
        local = np.array([(mine["seg"] > 0).sum(), step_flops(self.cfg, mine) if self.primary else 0.0,
                          sum(tot["skipped"].values()), tot["too_long"], tot["dropped"], tot["packs"]], np.float64)
        g = allgather(local).sum(0)
        totals = dict(skipped={"all": int(g[2])}, too_long=int(g[3]), dropped=int(g[4]), packs=int(g[5]))
        return batch, int(g[0]), float(g[1]), dstate, totals

    def close(self, timeout: float = 1.0) -> None:
        self.pre.close(timeout=timeout)
