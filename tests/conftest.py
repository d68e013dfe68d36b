import os

import jax
import pytest

# No persistent compilation cache inside the pytest process. Tests call sample.main / train.py's main / load()
# in this process with different cache folders, and XLA aborted the whole run (SIGABRT, no test report)
# deserializing an executable from such a cache in two CI runs. JAX decides once per process whether the
# cache is used, so it is switched off here, before anything compiles; the subprocess runs keep theirs. The
# in-memory compilation caches still reuse every program within the session.
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
