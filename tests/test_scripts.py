"""The maintenance and experiment scripts in ``scripts/`` import and explain themselves (``--help``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_help(script):
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout


def test_label_budget_draws_balanced_subsets_and_rejects_impossible_budgets(load_script):
    import numpy as np

    lb = load_script("label_budget")
    labels = np.repeat(np.arange(4), 5)
    idx = lb.balanced_subset(labels, 8, seed=0)
    assert np.bincount(labels[idx]).tolist() == [2, 2, 2, 2] and len(set(idx)) == 8
    assert (lb.balanced_subset(labels, 8, seed=0) == idx).all()
    with pytest.raises(SystemExit, match="trials per class"):
        lb.balanced_subset(labels, 24, seed=0)
    with pytest.raises(SystemExit, match="trials per class"):
        lb.balanced_subset(labels, 3, seed=0)
