"""The entry of ``train.py`` (and the ``bagel-train`` command): the XLA:CPU tuning, quiet TensorStore threads after a
failed restore, then :func:`bagel_jax.train.cli.main` (the arguments and exit statuses are described there)."""

from __future__ import annotations

import os
import sys
import threading

from ..runtime import tune_cpu_malloc, tune_xla_cpu
from ..train.cli import main as train_main


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


def main(argv=None) -> int:
    tune_xla_cpu()   # before JAX's first computation (see bagel_jax/runtime.py)
    tune_cpu_malloc()
    _quiet_closed_loop_hooks()
    code = train_main(argv)
    if code == 2:
        # a setup / restore error: nothing is being written; skip the interpreter teardown, where the same
        # TensorStore threads would race the closing loop again.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
