"""bagel_jax/_xla_cpu.py: the XLA:CPU convolution tuning applied at import (when, and what it changes)."""

import os
import subprocess
import sys

import pytest

from bagel_jax import _xla_cpu

PROBE = r"""
import bagel_jax, jax, jax.numpy as jnp
x, w = jnp.ones((1, 64, 64, 32)), jnp.ones((3, 3, 32, 32))      # a FLUX-VAE-like 3x3 convolution
f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
root = [l for l in f.lower(x, w).compile().as_text().splitlines() if l.strip().startswith("ROOT")][-1]
print("CONV_IN_YNN" if "__ynn_fusion" in root else "CONV_NOT_IN_YNN" if "convolution(" in root else "UNKNOWN " + root)
"""


def _probe(**env):
    e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", _xla_cpu.OPT_OUT)}
    e.update(env, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_rules():
    assert not _xla_cpu.wanted({_xla_cpu.OPT_OUT: "0"})
    assert not _xla_cpu.wanted({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"})
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    if _xla_cpu.wanted(env):
        assert _xla_cpu.apply(env)
        assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + _xla_cpu.FLAG
        assert not _xla_cpu.apply(env)                  # never twice


@pytest.mark.skipif(not _xla_cpu.wanted({}), reason="the tuning does not apply to this installation")
def test_import_takes_convolutions_off_ynnpack():
    """Importing bagel_jax before the first computation moves 2-D convolutions off YNNPACK; opting out keeps them."""
    assert _probe() == "CONV_NOT_IN_YNN"
    assert _probe(**{_xla_cpu.OPT_OUT: "0"}) == "CONV_IN_YNN"
