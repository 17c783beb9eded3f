"""The masking noise of masked brain modeling: a function of seed, epoch and sample index.

:func:`masking_noise` hashes ``(seed, epoch, index, patch)`` into the uniform noise that picks the masked
patches, so a sample is masked the same way in an epoch whatever the batch, process or worker that handles it,
and results do not depend on the number of processes or workers. Validation uses the fixed key
:data:`VALIDATION_NOISE_KEY` in place of the epoch.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

#: The masking-noise "epoch" used for validation: the same masks every epoch.
VALIDATION_NOISE_KEY = 2**31 - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def masking_noise(seed: int, epoch: int, indices: np.ndarray | Tensor, num_patches: int) -> np.ndarray:
    """Uniform noise in [0, 1) for the masks of samples ``indices`` in ``epoch``: ``[B, L]`` float64.

    A counter-based hash (splitmix64) of ``(seed, epoch, index, patch)``: the same sample gets the same mask
    in the same epoch whatever the batch, process or worker that handles it.
    """
    idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64).astype(
        np.uint64
    )
    with np.errstate(over="ignore"):
        key = _splitmix64(np.asarray([seed], dtype=np.uint64))
        key = _splitmix64(key ^ np.asarray([epoch], dtype=np.uint64))
        per_sample = _splitmix64(key ^ idx)  # [B]
        counter = per_sample[:, None] + np.arange(num_patches, dtype=np.uint64)[None, :] * _GOLDEN
        bits = _splitmix64(counter)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # 53-bit mantissa


__all__ = [
    "VALIDATION_NOISE_KEY",
    "masking_noise",
]
