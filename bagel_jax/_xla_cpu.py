"""XLA:CPU tuning, applied when ``bagel_jax`` is imported (before JAX starts its CPU backend).

XLA:CPU hands 2-D convolutions to YNNPACK by default (``individual_convolution`` in
``--xla_cpu_experimental_ynn_fusion_type``). For the FLUX VAE's 3x3 convolutions its own emitter is faster:
measured on the 2-core CPU (perf harness model, 256x256, float32, medians of 7), VAE encode 0.073-0.079 s
-> 0.050 s and decode 0.105-0.109 s -> 0.078 s, while the decoder's matmuls, reductions and every
non-convolution program are unchanged. So, when it is safe, ``-individual_convolution`` is appended to
``XLA_FLAGS``:

* only on a CPU-only installation (no ``jax_plugins`` / ``libtpu`` package: XLA_FLAGS is read by every
  XLA backend, and an accelerator plugin built from another XLA may not know the flag, which is fatal);
* only with the jaxlib this project pins (0.10.x), whose XLA has the flag;
* never when ``XLA_FLAGS`` already sets ``xla_cpu_experimental_ynn_fusion_type``, and not at all with
  ``BAGEL_JAX_XLA_CPU_TUNING=0``.

It takes effect only if JAX has not started its CPU backend yet (import ``bagel_jax`` before running any
JAX computation); otherwise it changes nothing. Convolution results differ from YNNPACK's in float rounding
only (the parity tests run with it).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

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


def apply(environ=os.environ) -> bool:
    """Append :data:`FLAG` to ``XLA_FLAGS`` when :func:`wanted`; returns whether it did."""
    if not wanted(environ):
        return False
    environ["XLA_FLAGS"] = (environ.get("XLA_FLAGS", "") + " " + FLAG).strip()
    return True
