"""Shared fixtures. Reference data lives in ../shared/reference beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference data folder; tests skip without it, except under CI where they fail."""
    if not (REFERENCE_DIR / "README.md").is_file():
        message = f"reference data not found at {REFERENCE_DIR} (it sits beside the checkout, in ../shared/reference)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI is set, so this is an error")
        pytest.skip(message)
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
