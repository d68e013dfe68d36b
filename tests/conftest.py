import os

import pytest

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
