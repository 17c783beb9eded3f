"""The order in which the training stages' data loaders visit their samples.

:class:`EpochShuffleSampler` makes the order of each epoch a function of seed and epoch only, so a resumed run
sees the same batches as an uninterrupted one, and one process draws the same global batches as several DDP
processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import RandomSampler


class EpochShuffleSampler(RandomSampler):
    """A random order per epoch that depends only on ``(seed, epoch)``.

    The permutation is ``torch.randperm(n)`` from a generator seeded with ``seed + epoch``, exactly as
    ``DistributedSampler`` draws it. Lightning calls :meth:`set_epoch` at the start of every epoch, so a run
    resumed from a checkpoint sees the same batches as an uninterrupted one. It is a ``RandomSampler`` so that
    under DDP Lightning replaces it by ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)``, which draws
    the same permutation: the ranks' batches together then form the same global batches as one process with
    the global batch size (any other sampler class would be wrapped, changing the order).
    """

    def __init__(self, num_samples: int, seed: int = 0):
        super().__init__(range(int(num_samples)))
        self.n = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


__all__ = ["EpochShuffleSampler"]
