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


EVAL = SHARED / "eval"


@pytest.fixture(scope="session")
def eval_dir() -> Path:
    """../shared/eval: a small COCO-layout set and the official evaluators' numbers on it."""
    if not (EVAL / "expected.json").is_file():
        pytest.skip(f"evaluation reference not found at {EVAL} (../shared beside the checkout)")
    return EVAL
