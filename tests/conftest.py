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
