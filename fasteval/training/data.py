"""The training batches: a plain DataLoader over the shared sample list, reseeded every epoch.

Each epoch's shuffle, and the augmentation drawn in the workers (or in this process with no
workers), come from ``epoch_seed(seed, epoch)`` alone: the same seed gives the same batches on
the CPU, and a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import DataLoader

from fasteval.data.dataset import ImageDataset


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle and augmentation (epochs count from 1)."""
    return (seed * 1_000_003 + epoch) % 2**63


def _seed_worker(worker_id: int) -> None:
    """Python's ``random`` follows the worker's torch seed (which the loader's generator fixes)."""
    random.seed(torch.initial_seed() % 2**32)


def epoch_loader(dataset: ImageDataset, batch_size: int, workers: int, seed: int, epoch: int,
                 device: torch.device) -> DataLoader:
    """One epoch's shuffled loader; with no workers the augmentation draws from this process's torch
    RNG, which is seeded here too."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    torch.manual_seed(epoch_seed(seed, epoch))
    random.seed(epoch_seed(seed, epoch))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, generator=generator,
                      worker_init_fn=_seed_worker, pin_memory=device.type == "cuda",
                      prefetch_factor=4 if workers > 0 else None)
