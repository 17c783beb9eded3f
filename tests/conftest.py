"""Shared test settings: few threads (the suite runs on 2-core machines), deterministic algorithms, fixture paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MINDVIS_LOG_DIR", str(Path(__file__).parent / ".logs"))

FIXTURES = Path(__file__).parent / "fixtures"
#: The test suite's demo preset (``mindvis demo --preset tests/fixtures/demo-smoke.yaml``): every step, tiny.
SMOKE_PRESET = str(FIXTURES / "demo-smoke.yaml")


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


@pytest.fixture
def one_thread():
    """One torch thread for a test: tiny models train as fast on one, and do not stall when the cores are busy."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch thread for a whole test module (bit-exact comparisons, and no oversubscription)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def quiet_cli_logging():
    """``mindvis.cli`` installs one stderr handler per process; drop it after each test."""
    import logging

    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_mindvis", False)]:
        root.removeHandler(h)


@pytest.fixture
def load_script():
    """Import ``scripts/<name>.py`` as a module without running its ``main``."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"mindvis_script_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
