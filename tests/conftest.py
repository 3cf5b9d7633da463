from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PARITY = SHARED / "parity"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not PARITY.is_dir():
        pytest.skip(f"parity data not found at {PARITY} (../shared beside the checkout)")
    return PARITY
