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


def _run(code, mode, drop=lambda k: False, **env):
    """The last line ``code`` prints in a fresh CPU process (argv[1] = ``mode``), without XLA_FLAGS, the tuning's
    opt-out and the variables ``drop`` names; ``env`` added."""
    e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", runtime.OPT_OUT) and not drop(k)}
    e.update(env, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, mode], env=e, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def _probe(mode, **env):
    return _run(PROBE, mode, **env)


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


OPTIONS_PROBE = r"""
import collections, re, sys, jax, jax.numpy as jnp
from bagel_jax import runtime
x, w = jnp.ones((1, 64, 64, 32)), jnp.ones((3, 3, 32, 32))
def f(x, w):   # a convolution, a dot and a reduction: each kind of library fusion XLA:CPU makes
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(-1, 32) @ w.reshape(-1, 32)[:32]
    return y - y.mean(0)
opts = runtime.program_compiler_options("cpu") if sys.argv[1] == "options" else None
text = jax.jit(f, compiler_options=opts).lower(x, w).compile().as_text()
bodies, cur = {}, None
for line in text.splitlines():
    m = re.match(r"^(%[\w.\-]+) .*\{$", line)
    if m:
        cur = bodies.setdefault(m.group(1), [])
    elif cur is not None:
        cur.append(line)
kinds = collections.Counter()
for line in text.splitlines():
    if "__ynn_fusion" in line:
        body = " ".join(bodies[re.search(r"calls=(%[\w.\-]+)", line).group(1)])
        kinds["conv" if "convolution(" in body else "dot" if " dot(" in body else "reduce" if "reduce(" in body else "other"] += 1
print(sorted(kinds.items()))
"""


def _options_probe(mode, **env):
    return _run(OPTIONS_PROBE, mode, **env)


@pytest.mark.skipif(not runtime.wanted({}), reason="the tuning does not apply to this installation")
def test_program_options_make_the_flags_choice_for_one_program():
    """program_compiler_options("cpu") compiles a program as the XLA_FLAGS tuning does (the same library fusions:
    dots and reductions, no convolution), without touching XLA_FLAGS; the default keeps the convolution there."""
    tuned = _options_probe("plain", XLA_FLAGS=runtime.FLAG)
    assert tuned == _options_probe("options")
    default = _options_probe("plain")
    assert "'conv'" in default and "'conv'" not in tuned and "'dot'" in tuned and "'reduce'" in tuned
    assert runtime.program_compiler_options("gpu") is None
    assert runtime.program_compiler_options("cpu", {runtime.OPT_OUT: "0"}) is None


MALLOC_PROBE = r"""
import ctypes, resource, sys, threading
import jax
from bagel_jax import runtime          # importing bagel_jax applies tune_cpu_buffers where malloc_wanted()
where, tune = sys.argv[1].split("+") if "+" in sys.argv[1] else (sys.argv[1], "")
applied = runtime.malloc_tuned()
if tune:
    applied = runtime.tune_cpu_malloc()
sync = not jax.config.values["jax_cpu_enable_async_dispatch"]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.argtypes, libc.malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
SIZE = 96 << 20          # over glibc's 64 MiB thread-arena heaps, like XLA:CPU's step temporaries
faults = []

def calls():             # what XLA:CPU does per call: allocate, write, free
    for _ in range(3):
        p = libc.malloc(SIZE)
        r0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        ctypes.memset(p, 1, SIZE)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - r0)
        libc.free(p)

if where == "thread":    # asynchronous dispatch: a worker thread allocates
    t = threading.Thread(target=calls)
    t.start()
    t.join()
else:                    # synchronous dispatch: the calling thread allocates
    calls()
print(applied, sync, max(faults[1:]))
"""


@pytest.mark.skipif(not runtime.malloc_wanted({}), reason="the malloc settings do not apply to this installation")
def test_importing_bagel_jax_keeps_large_buffers_between_calls():
    """Without the settings a 96 MiB buffer is a fresh mapping on every call (24,576 page faults). ``import
    bagel_jax`` (runtime.tune_cpu_buffers) makes JAX's CPU dispatch synchronous, so XLA:CPU allocates on the
    calling thread, and keeps that thread's freed buffer in the heap; the user's opt-out or own malloc settings
    leave both alone. tune_cpu_malloc (the programs') also covers a worker thread's buffer. glibc itself, not an
    XLA program: XLA:CPU's ``posix_memalign`` can leave a small chunk behind the buffer that keeps it from being
    reused for the first calls of a small program (docs/train_performance.md, third round; the train step: no
    faults after its first step)."""
    def probe(mode, **env):
        applied, sync, faults = _run(MALLOC_PROBE, mode,
                                     lambda k: k.startswith("MALLOC_") or k == runtime.MALLOC_OPT_OUT, **env).split()
        return applied == "True", sync == "True", int(faults)

    applied, sync, faults = probe("main")
    assert applied and sync and faults < 2000
    applied, sync, faults = probe("main", **{runtime.MALLOC_OPT_OUT: "0"})
    assert not applied and not sync and faults > 12000
    applied, sync, faults = probe("main", MALLOC_ARENA_MAX="8")          # the user's own settings win
    assert not applied and not sync and faults > 12000
    assert probe("thread")[2] > 12000                                    # a worker thread's arena still maps
    applied, sync, faults = probe("thread+tune")
    assert applied and faults < 2000
    assert not runtime.tune_cpu_buffers({runtime.MALLOC_OPT_OUT: "0"})
    assert not runtime.malloc_wanted({"MALLOC_ARENA_MAX": "4"})
    assert not runtime.malloc_wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
