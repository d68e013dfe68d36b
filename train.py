#!/usr/bin/env python
"""Train BAGEL with JAX: ``python train.py --config configs/train-tiny.yaml --data DIR --workdir RUN --steps N``.

See ``python train.py --help`` and :mod:`bagel_jax.train.cli`.
"""

import os
import sys
import threading

from bagel_jax.runtime import tune_xla_cpu
from bagel_jax.train.cli import main


def _closed_loop(exc) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _quiet_closed_loop_hooks() -> None:
    """After a failed checkpoint restore, TensorStore's worker threads can still post to orbax's already
    closed asyncio loop (``call_soon_threadsafe``), in the moments between the run's one ``error:`` line and
    the exit; Python would print each as a traceback. Those (and only those) are dropped."""
    thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

    def on_thread(args):
        if not _closed_loop(args.exc_value):
            thread_hook(args)

    def on_unraisable(u):
        if not _closed_loop(u.exc_value):
            unraisable_hook(u)

    threading.excepthook, sys.unraisablehook = on_thread, on_unraisable


if __name__ == "__main__":
    tune_xla_cpu()   # before JAX's first computation (see bagel_jax/runtime.py)
    _quiet_closed_loop_hooks()
    code = main()
    if code == 2:
        # a setup / restore error: nothing is being written; skip the interpreter teardown, where the same
        # TensorStore threads would race the closing loop again.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
