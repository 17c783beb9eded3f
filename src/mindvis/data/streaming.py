"""Statistics streamed over arrays too large to read at once (memory maps of any size).

:func:`row_blocks` cuts ``N`` rows into blocks of at most :data:`BLOCK_ROWS` rows, and :class:`RunningMoments`
merges the mean and variance of one block after another, over all values or per column.
:class:`~mindvis.data.preprocessor.FMRIPreprocessor` fits and transforms block by block with them, so its
memory use is one block plus the output.
"""

from __future__ import annotations

import math

import numpy as np

#: Rows per block when streaming over large (memory-mapped) arrays.
BLOCK_ROWS = 4096


def row_blocks(n: int, block: int | None = None):
    """``(start, stop)`` of consecutive blocks of at most ``block`` rows (default: :data:`BLOCK_ROWS`, read at
    each call) that cover ``range(n)``."""
    block = BLOCK_ROWS if block is None else block
    for start in range(0, n, block):
        yield start, min(n, start + block)


class RunningMoments:
    """Streaming mean and variance (Chan et al. pairwise merge), in float64, global or per column."""

    def __init__(self, per_column: bool):
        self.per_column = per_column
        self.count: np.ndarray | float = 0.0
        self.mean: np.ndarray | float = 0.0
        self.m2: np.ndarray | float = 0.0

    def update(self, block: np.ndarray, finite: np.ndarray | None) -> None:
        b = block.astype(np.float64, copy=False)
        if self.per_column:
            if finite is None:
                cnt = np.full(b.shape[1], b.shape[0], dtype=np.float64)
                mean = b.mean(axis=0) if b.shape[0] else np.zeros(b.shape[1])
                m2 = ((b - mean) ** 2).sum(axis=0)
            else:
                cnt = finite.sum(axis=0).astype(np.float64)
                safe = np.where(finite, b, 0.0)
                mean = safe.sum(axis=0) / np.maximum(cnt, 1)
                m2 = (np.where(finite, b - mean, 0.0) ** 2).sum(axis=0)
        else:
            vals = b if finite is None else b[finite]
            cnt = float(vals.size)
            if not cnt:
                return
            mean = float(vals.mean())
            m2 = float(((vals - mean) ** 2).sum())
        total = self.count + cnt
        delta = mean - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(total > 0, cnt / np.maximum(total, 1), 0.0) if self.per_column else (cnt / total)
        self.mean = self.mean + delta * frac
        self.m2 = self.m2 + m2 + delta**2 * self.count * frac
        self.count = total

    def result(self) -> tuple[np.ndarray | float, np.ndarray | float]:
        """(mean, population std)."""
        if self.per_column:
            var = self.m2 / np.maximum(self.count, 1)
            return np.asarray(self.mean), np.sqrt(var)
        if not self.count:
            return 0.0, 0.0
        return float(self.mean), math.sqrt(self.m2 / self.count)


__all__ = [
    "BLOCK_ROWS",
    "RunningMoments",
    "row_blocks",
]
