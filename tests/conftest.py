"""Shared test fixtures and paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).resolve().parents[1]
# The reference outputs as published beside the repository (CI has ../shared next to its clone).
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "official"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
