import atexit
import os
import shutil
import tempfile

import jax
import pytest

from bagel_jax import runtime

# One persistent compilation cache for the whole test session, in a fresh temporary folder (removed at exit):
# the same program compiled by two test files, by a test and a train.py / sample.py subprocess, or by the two
# pytest-xdist workers, compiles once; nothing from an earlier run is read. BAGEL_JAX_TEST_COMPILE_CACHE=DIR
# names a folder to keep and reuse instead (a developer's warm reruns). The first process to import this file
# (pytest's main process) creates the folder; xdist workers and subprocesses inherit it through the
# environment. A size limit turns on JAX's file lock, so one process never reads an entry another is still
# writing. The cache is set up here, before anything compiles: JAX fixes the folder at the first compilation,
# so the in-process sample.main / train main / load() calls that name other folders keep this one.
COMPILE_CACHE = os.environ.get("BAGEL_JAX_TEST_COMPILE_CACHE")
if not COMPILE_CACHE:
    COMPILE_CACHE = tempfile.mkdtemp(prefix="bagel_jax_test_compile_cache-")
    os.environ["BAGEL_JAX_TEST_COMPILE_CACHE"] = COMPILE_CACHE
    atexit.register(shutil.rmtree, COMPILE_CACHE, True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILE_CACHE        # train.py's --compile-cache default, subprocesses
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)
# XLA:CPU's LLVM backend at optimisation level 0 for the tests (BAGEL_JAX_TEST_XLA_OPT=2 keeps XLA's default):
# the tiny test programs spend far longer compiling than running (the tiny train step: 23 s to compile at the
# default level, 9 s at level 0, 0.8 s to run), and the matmuls and convolutions run in precompiled library
# kernels either way. HLO optimisation is unchanged; float results may differ in rounding only, and every
# comparison in the suite is against the official outputs (with tolerances) or between runs under these same
# flags (train_helpers.env passes them to subprocesses). Set before JAX starts its CPU backend, with the
# XLA:CPU tuning the command-line programs apply (bagel_jax.runtime.tune_xla_cpu).
_opt = os.environ.get("BAGEL_JAX_TEST_XLA_OPT", "0")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "") and _opt != "2":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_backend_optimization_level={_opt}").strip()
runtime.tune_xla_cpu()
jax.config.update("jax_enable_compilation_cache", True)
jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
jax.config.update("jax_compilation_cache_max_size", 16 << 30)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.jit(lambda x: x + 1)(0)   # the first compilation fixes the cache folder for this process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The official-output fixtures live in the repository (tests/fixtures/README.md says where they come from), so
# every clone runs every parity test; a missing folder is an error, never a skip.
FIXTURES = os.path.join(REPO, "tests", "fixtures")
TINY_A = os.path.join(FIXTURES, "tiny-a")
TINY_A_TAYLORSEER = os.path.join(FIXTURES, "tiny-a-taylorseer")


def _fixture_folder(path: str) -> str:
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        raise FileNotFoundError(f"fixture folder {path} has no manifest.json (it is part of the repository: "
                                "restore it with git checkout tests/fixtures)")
    return path


@pytest.fixture(scope="session")
def tiny_a() -> str:
    """Path of the tiny-a fixture: a tiny official-format checkpoint with golden outputs of the official code."""
    return _fixture_folder(TINY_A)


@pytest.fixture(scope="session")
def tiny_a_taylorseer() -> str:
    """Path of the tiny-a-taylorseer fixture (the official TaylorSeer run on the tiny-a weights)."""
    return _fixture_folder(TINY_A_TAYLORSEER)


def _process_state() -> str:
    """Resident memory, memory mappings and threads of this process (Linux; '' elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            st = dict(line.split(":", 1) for line in f if ":" in line)
        with open("/proc/self/maps") as f:
            maps = sum(1 for _ in f)
        return f"rss {int(st['VmRSS'].split()[0]) // 1024} MiB, peak {int(st['VmHWM'].split()[0]) // 1024} MiB, " \
               f"{maps} mappings, {st['Threads'].strip()} threads"
    except (OSError, KeyError, ValueError):
        return ""


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs(request):
    """Drop every compiled program and trace cache after each test file. The whole suite runs in one
    process; without this it keeps every executable of every file (memory and JIT code mappings grow for
    the whole run) and XLA crashed (SIGSEGV / SIGABRT) compiling late in the CI run. Programs shared
    between files are recompiled. ``BAGEL_JAX_TEST_MEMLOG=FILE`` appends the process state per file."""
    yield
    import gc

    log = os.environ.get("BAGEL_JAX_TEST_MEMLOG")
    before = _process_state() if log else ""
    jax.clear_caches()
    gc.collect()
    if log:
        with open(log, "a") as f:
            f.write(f"{request.module.__name__}: before {before} | after {_process_state()}\n")


# Seconds each file took (setup + calls) in the 2-worker run of scripts/test.sh on 2 cores (main 8badb42,
# 2026-12-05, docs/testing.md); files not listed count as short. The collection is ordered longest first, so
# that pytest-xdist (`--dist loadfile`, scripts/test.sh) starts the long files first and no worker is left
# with one at the end.
FILE_SECONDS = {
    "test_multihost.py": 174, "test_train_faults.py": 125, "test_train_resume.py": 121, "test_verify_cli.py": 93,
    "test_expert_streams.py": 87, "test_train_mesh.py": 69, "test_attention_impls.py": 68, "test_train_learn.py": 64,
    "test_demo_interleave.py": 61, "test_engine.py": 58, "test_speculative_paths.py": 57, "test_app_browser.py": 53,
    "test_lora.py": 52, "test_demo_patch_ar.py": 46, "test_speculative.py": 45, "test_taylorseer.py": 44,
    "test_train_init.py": 41, "test_sample_cli.py": 41, "test_patch_ar_sampler.py": 39, "test_vit_pretrain.py": 36,
    "test_speculative_draft.py": 35, "test_streaming.py": 32, "test_cached_attention.py": 28, "test_parity.py": 28,
    "test_train_freeze.py": 27, "test_layer_loop.py": 25, "test_packing_and_model.py": 24, "test_demo_model.py": 24,
    "test_gpu_check.py": 24, "test_special_tokens.py": 22, "test_runtime.py": 21, "test_cfg_plan.py": 21,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -FILE_SECONDS.get(os.path.basename(str(item.fspath)), 0))  # stable within a file
