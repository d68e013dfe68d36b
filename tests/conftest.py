import os

import jax
import pytest

# No persistent compilation cache inside the pytest process: tests call sample.main / train.py's main / load()
# here with different cache folders (and load()'s default, ~/.cache), and the results must not depend on what
# earlier runs left there. JAX decides once per process whether the cache is used, so it is switched off here,
# before anything compiles; the subprocess runs keep theirs. (The CI crashes first blamed on the cache were
# the mapping limit: see _release_compiled_programs.)
jax.config.update("jax_enable_compilation_cache", False)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_A = os.path.join(REPO, "..", "shared", "reference", "fixtures", "tiny-a")
TINY_A_TAYLORSEER = os.path.join(REPO, "..", "shared", "reference", "fixtures", "tiny-a-taylorseer")


@pytest.fixture(scope="session")
def tiny_a() -> str:
    """Path of the shared tiny-a fixture folder (skips the test when it is absent)."""
    if not os.path.isfile(os.path.join(TINY_A, "manifest.json")):
        pytest.skip(f"shared fixture folder not found at {os.path.normpath(TINY_A)} "
                    "(the parity tests need ../shared/reference/fixtures/tiny-a beside the checkout)")
    return os.path.normpath(TINY_A)


@pytest.fixture(scope="session")
def tiny_a_taylorseer() -> str:
    """Path of the shared tiny-a-taylorseer fixture folder (the official TaylorSeer run; skips when absent)."""
    if not os.path.isfile(os.path.join(TINY_A_TAYLORSEER, "manifest.json")):
        pytest.skip(f"shared fixture folder not found at {os.path.normpath(TINY_A_TAYLORSEER)}")
    return os.path.normpath(TINY_A_TAYLORSEER)


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
