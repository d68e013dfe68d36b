"""Process-wide settings for JAX on CPU. The programs (``sample.py``, ``train.py``, ``python -m bagel_jax.app``)
switch on the XLA:CPU convolution tuning (:func:`tune_xla_cpu`), the malloc settings of :func:`tune_cpu_malloc`
and JAX's persistent compilation cache (:func:`use_compilation_cache`); the library never does by itself. The
one exception is :func:`tune_cpu_buffers`, which ``import bagel_jax`` applies on a CPU-only installation:
without it every call of a large program touches fresh pages (the train step: 0.70x the official instead of
1.1x); ``BAGEL_JAX_CPU_MALLOC=0`` or any ``MALLOC_*`` / ``GLIBC_TUNABLES`` variable of the user's leaves it out.
The convolution choice is also made per program, without global state, for the programs that need it
(:func:`program_compiler_options`).

XLA:CPU hands 2-D convolutions to YNNPACK by default (``individual_convolution`` in
``--xla_cpu_experimental_ynn_fusion_type``). For the FLUX VAE's 3x3 convolutions its own emitter is faster:
measured on the 2-core CPU (perf harness model, 256x256, float32, medians of 7), VAE encode 0.073-0.079 s
-> 0.050 s and decode 0.105-0.109 s -> 0.078 s, while the decoder's matmuls, reductions and every
non-convolution program are unchanged. So, when it is safe, ``-individual_convolution`` is appended to
``XLA_FLAGS`` by :func:`tune_xla_cpu`:

* only on a CPU-only installation (no ``jax_plugins`` / ``libtpu`` package: XLA_FLAGS is read by every
  XLA backend, and an accelerator plugin built from another XLA may not know the flag, which is fatal);
* only with the jaxlib this project pins (0.10.x), whose XLA has the flag;
* never when ``XLA_FLAGS`` already sets ``xla_cpu_experimental_ynn_fusion_type``, and not at all with
  ``BAGEL_JAX_XLA_CPU_TUNING=0``.

It takes effect only if JAX has not started its CPU backend yet (call :func:`tune_xla_cpu` before running any
JAX computation); otherwise it changes nothing. Convolution results differ from YNNPACK's in float rounding
only.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from typing import Optional

# JAX is imported where needed only: ``import bagel_jax`` imports this module (for tune_cpu_buffers)

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}=-individual_convolution"
OPT_OUT = "BAGEL_JAX_XLA_CPU_TUNING"


def cpu_only_install() -> bool:
    """No accelerator plugin (``jax_plugins`` / ``libtpu``) is installed beside JAX."""
    return not any(importlib.util.find_spec(m) is not None for m in ("jax_plugins", "libtpu"))


def wanted(environ=os.environ) -> bool:
    """Whether :data:`FLAG` should be added (see the module docstring)."""
    if environ.get(OPT_OUT, "1") == "0" or FLAG_NAME in environ.get("XLA_FLAGS", ""):
        return False
    if not cpu_only_install():
        return False
    try:
        return importlib.metadata.version("jaxlib").startswith("0.10.")
    except importlib.metadata.PackageNotFoundError:
        return False


def tune_xla_cpu(environ=os.environ) -> bool:
    """Append :data:`FLAG` to ``XLA_FLAGS`` when :func:`wanted`; returns whether it did."""
    if not wanted(environ):
        return False
    environ["XLA_FLAGS"] = (environ.get("XLA_FLAGS", "") + " " + FLAG).strip()
    return True


DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "bagel_jax", "jax")


def use_compilation_cache(path: Optional[str] = DEFAULT_COMPILATION_CACHE, force: bool = False) -> None:
    """Turn on JAX's persistent compilation cache in ``path`` (created), so that a later process skips most
    compilation. Without ``force`` a cache JAX already has (``JAX_COMPILATION_CACHE_DIR``, or set by the
    caller) is kept; ``path`` None or "" does nothing. A folder that cannot be created only warns."""
    import jax
    if not path or (jax.config.jax_compilation_cache_dir and not force):
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        warnings.warn(f"compilation cache {path} not used ({e})")
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The same choice made per program (``jax.jit(..., compiler_options=...)``, no global state): the library fusion
# types that ``-individual_convolution`` leaves of XLA:CPU's default set in the pinned jaxlib
# (tests/test_runtime.py checks that both compile the same program)
PROGRAM_YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def program_compiler_options(platform: str, environ=os.environ) -> Optional[dict]:
    """``compiler_options`` for a program bagel_jax compiles for ``platform`` (a device's ``platform``):
    on ``"cpu"``, when :func:`wanted`, 2-D convolutions compiled by XLA's own emitter instead of YNNPACK
    (the choice of :func:`tune_xla_cpu`, for this one program); None otherwise. The train step uses it
    (``bagel_jax/train/step.py``): the VAE encode of its targets runs 0.19 -> 0.12 s (two 256x256 images,
    docs/train_performance.md)."""
    if platform != "cpu" or not wanted(environ):
        return None
    return {FLAG_NAME: PROGRAM_YNN_FUSION_TYPES}


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
MALLOC_OPT_OUT = "BAGEL_JAX_CPU_MALLOC"
_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
               "GLIBC_TUNABLES")


def malloc_wanted(environ=os.environ) -> bool:
    """Whether :func:`tune_cpu_malloc` applies: Linux, a CPU-only JAX installation (:func:`cpu_only_install`),
    none of the user's ``MALLOC_*`` / ``GLIBC_TUNABLES`` variables set, and not ``BAGEL_JAX_CPU_MALLOC=0``."""
    if environ.get(MALLOC_OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if any(k in environ for k in _MALLOC_ENV):
        return False
    return cpu_only_install()


_malloc_tuned = False


def malloc_tuned() -> bool:
    """Whether :func:`tune_cpu_buffers` (``import bagel_jax``) or :func:`tune_cpu_malloc` applied in this process."""
    return _malloc_tuned


def _wanted_mallopt(environ):
    """glibc's ``mallopt`` when :func:`malloc_wanted` (None otherwise, or without glibc)."""
    if not malloc_wanted(environ):
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):     # not glibc
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge       # no public way to ask; assume started if the name moved
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True


def tune_cpu_buffers(environ=os.environ) -> bool:
    """What ``import bagel_jax`` does on a CPU-only installation (:func:`malloc_wanted`): let XLA:CPU reuse the
    temporary buffer of a large program from call to call instead of faulting in fresh pages every time,
    without the one malloc arena of :func:`tune_cpu_malloc`.

    XLA:CPU allocates a call's temporaries when the call runs; with JAX's asynchronous CPU dispatch that is on a
    worker thread, whose malloc arena serves anything over 64 MiB with ``mmap`` and unmaps it on ``free``
    (142,000 page faults per step for the perf harness's train step, 0.70x the official). Two settings move it
    into the main heap and keep it there: single-device CPU programs run on the calling thread
    (``jax_cpu_enable_async_dispatch=False``, JAX's earlier default on CPU; only before JAX's CPU backend
    starts) and the main heap neither maps large blocks with ``mmap`` nor trims below 2 GiB (``mallopt``).
    The train step: 37 page faults and 1.42 s per step instead of 142,626 and 1.84 s (alternated, one process
    each; docs/train_performance.md, seventh round). What it costs: the Python thread waits for each
    single-device CPU computation (no overlap of Python work with it), and the process keeps up to 2 GiB of
    freed memory. Compile time is unchanged (the one malloc arena of :func:`tune_cpu_malloc` makes
    compilation 10-20 % slower, which is why the import does not use it).

    Returns whether the dispatch setting was made (False after JAX's first computation, with
    ``BAGEL_JAX_CPU_MALLOC=0``, with the user's own ``MALLOC_*`` / ``GLIBC_TUNABLES``, or with an accelerator
    plugin installed)."""
    global _malloc_tuned
    mallopt = _wanted_mallopt(environ)
    if mallopt is None:
        return False
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
    if _backend_started():
        return False
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _malloc_tuned = True
    return True


def tune_cpu_malloc(environ=os.environ) -> bool:
    """Keep freed memory in the process so that XLA:CPU's per-call buffers are not fresh pages on every call.

    XLA:CPU allocates each call's temporary buffer (581 MB for the perf harness's train step) with
    ``posix_memalign`` from a worker thread. glibc serves an allocation over 64 MiB in a thread's arena with
    ``mmap`` whatever ``M_MMAP_THRESHOLD`` says, and ``free`` unmaps it, so every call touches new pages:
    142,000 page faults and 0.3-1.4 s of kernel time per step on the 2-core CPU. With one arena, no
    ``mmap`` and a 2 GiB trim threshold (``mallopt``), the buffer is reused: no page faults after the
    first step, 1.69-2.55 -> 1.56-1.71 s per step (docs/train_performance.md; in a small program the first
    calls may still fault while a thread's tcache holds the rest that ``posix_memalign`` cut off). The cost:
    the process keeps the memory it freed (up to 2 GiB of it at the top of the heap), and all threads share
    one malloc arena, which makes small inference calls 1-10 % slower and compilation 10-20 % slower
    (docs/train_performance.md, seventh round).

    Applies only when :func:`malloc_wanted`, and fully only before JAX's first computation (threads that
    already allocated keep their arenas). Returns whether it was applied. ``train.py``, ``sample.py`` and the
    app call it (a worker thread's buffers too: the app computes on its request threads); the library's
    import makes only :func:`tune_cpu_buffers`' settings."""
    global _malloc_tuned
    mallopt = _wanted_mallopt(environ)
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    _malloc_tuned = _malloc_tuned or ok
    return ok
