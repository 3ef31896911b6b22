"""Shared fixtures: seeds, float64 defaults for oracles, and the real third-party data folder."""

from __future__ import annotations

import os
from pathlib import Path

# small BLAS calls slow down badly when BLAS threads fight torch's on a small machine
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def _realdata_dir() -> Path | None:
    env = os.environ.get("LIPVERIFY_REALDATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    candidates.append(here.parent / "shared" / "data")
    for c in candidates:
        if (c / "README.md").exists() and (c / "models").is_dir():
            return c
    return None


REALDATA = _realdata_dir()


@pytest.fixture
def realdata() -> Path:
    """Path of the third-party data folder; skips the test with a reason when it is absent."""
    if REALDATA is None:
        pytest.skip("real third-party data not found: set LIPVERIFY_REALDATA or place ../shared/data")
    return REALDATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
