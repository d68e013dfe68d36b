"""bagel_jax/runtime.py: the XLA:CPU convolution tuning the programs switch on (when, and what it changes), and
that importing the library changes neither ``XLA_FLAGS`` nor the compilation cache."""

import os
import subprocess
import sys

import pytest

from bagel_jax import runtime

PROBE = r"""
import os, sys, bagel_jax, jax, jax.numpy as jnp
before = os.environ.get("XLA_FLAGS")
if sys.argv[1] == "tune":
    bagel_jax.tune_xla_cpu()
else:
    assert os.environ.get("XLA_FLAGS") == before, "import changed XLA_FLAGS"
x, w = jnp.ones((1, 64, 64, 32)), jnp.ones((3, 3, 32, 32))      # a FLUX-VAE-like 3x3 convolution
f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
root = [l for l in f.lower(x, w).compile().as_text().splitlines() if l.strip().startswith("ROOT")][-1]
print("CONV_IN_YNN" if "__ynn_fusion" in root else "CONV_NOT_IN_YNN" if "convolution(" in root else "UNKNOWN " + root)
"""


def _probe(mode, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", runtime.OPT_OUT)}
    e.update(env, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=e, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_rules():
    assert not runtime.wanted({runtime.OPT_OUT: "0"})
    assert not runtime.wanted({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"})
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    if runtime.wanted(env):
        assert runtime.tune_xla_cpu(env)
        assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + runtime.FLAG
        assert not runtime.tune_xla_cpu(env)                  # never twice


@pytest.mark.skipif(not runtime.wanted({}), reason="the tuning does not apply to this installation")
def test_tuning_takes_convolutions_off_ynnpack():
    """tune_xla_cpu() before the first computation moves 2-D convolutions off YNNPACK; opting out keeps them, and
    importing bagel_jax alone changes nothing."""
    assert _probe("tune") == "CONV_NOT_IN_YNN"
    assert _probe("tune", **{runtime.OPT_OUT: "0"}) == "CONV_IN_YNN"
    assert _probe("import") == "CONV_IN_YNN"


def test_import_changes_no_global_state():
    """Importing the package and its public API leaves XLA_FLAGS and JAX's compilation cache as they were."""
    code = ("import os, jax, bagel_jax, bagel_jax.inference.api; bagel_jax.load; "
            "print(repr(os.environ.get('XLA_FLAGS')), repr(jax.config.jax_compilation_cache_dir))")
    e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    for flags in (None, "--xla_force_host_platform_device_count=2"):
        env = dict(e, JAX_PLATFORMS="cpu", **({"XLA_FLAGS": flags} if flags else {}))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == [repr(flags), "None"]
