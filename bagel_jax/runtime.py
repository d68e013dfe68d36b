"""Process-wide JAX settings that the programs (``sample.py``, ``train.py``, ``python -m bagel_jax.app``) switch on
and the library never does by itself: the XLA:CPU convolution tuning (:func:`tune_xla_cpu`) and JAX's persistent
compilation cache (:func:`use_compilation_cache`). Importing ``bagel_jax`` changes no global state.

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

import importlib.metadata
import importlib.util
import os
import warnings
from typing import Optional

import jax   # importing JAX does not start a backend, so tune_xla_cpu still works after this

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}=-individual_convolution"
OPT_OUT = "BAGEL_JAX_XLA_CPU_TUNING"


def wanted(environ=os.environ) -> bool:
    """Whether :data:`FLAG` should be added (see the module docstring)."""
    if environ.get(OPT_OUT, "1") == "0" or FLAG_NAME in environ.get("XLA_FLAGS", ""):
        return False
    if any(importlib.util.find_spec(m) is not None for m in ("jax_plugins", "libtpu")):
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
    if not path or (jax.config.jax_compilation_cache_dir and not force):
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        warnings.warn(f"compilation cache {path} not used ({e})")
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
