"""Shared test settings: few threads (the suite runs on 2-core machines), deterministic algorithms, fixture paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MINDVIS_LOG_DIR", str(Path(__file__).parent / ".logs"))

FIXTURES = Path(__file__).parent / "fixtures"


def parity_dir() -> Path:
    """The folder of original-implementation fixtures: ``$MINDVIS_PARITY_DIR`` or our copy of ``tiny/``."""
    return Path(os.environ.get("MINDVIS_PARITY_DIR", FIXTURES / "mindvis_tiny"))


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
