"""Which process this is, and seeding it: what a stage needs before its trainer exists.

:func:`is_primary_process` tells global rank 0 from the launchers' environment (for work such as preparing the
output folder); :func:`seed_everything` seeds Python, numpy and torch, data-loader workers included. The data
loaders of every stage draw their order from :class:`mindvis.data.sampler.EpochShuffleSampler`.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl


def is_primary_process() -> bool:
    """True in the process that will be global rank 0 (usable before the trainer is built).

    Reads the launchers' environment: ``RANK`` (torchrun), ``SLURM_PROCID`` when Slurm launched the tasks,
    and otherwise Lightning's own ``NODE_RANK``/``LOCAL_RANK`` (set for the processes it starts).
    """
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        return int(os.environ["SLURM_PROCID"]) == 0
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return node == 0 and local == 0


def seed_everything(seed: int) -> int:
    """Seed Python, numpy and torch in this process and in data-loader workers (and set ``PL_GLOBAL_SEED``)."""
    return pl.seed_everything(int(seed), workers=True, verbose=False)


__all__ = ["is_primary_process", "seed_everything"]
