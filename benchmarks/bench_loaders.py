"""Loaders at equal batch size and workers: the reference DataLoader (PIL) vs DALI, and on CUDA
DALI mixed vs torchvision's nvJPEG decoding vs the CPU.

    pytest benchmarks/bench_loaders.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from fasteval.data.loader_dali import dali_available
from fasteval.data.loaders import make_loader
from fasteval.data.preprocess import PRESETS
from fasteval.evaluation.reference import reference_dataset
from fasteval.data.samples import discover

needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI not installed")


def _consume(loader, device: torch.device) -> int:
    n = 0
    for batch in loader:
        n += batch.real if hasattr(batch, "real") else batch[0].shape[0]  # padding is not an image
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def _loader(variant: str, data: str, device: torch.device, batch_size: int, workers: int):
    samples, spec = discover(data), PRESETS["imagenet"]
    if variant == "reference":
        return DataLoader(reference_dataset(samples, spec), batch_size=batch_size, num_workers=workers)
    return make_loader(variant, samples, spec, batch_size=batch_size, workers=workers, device=device)


def _run(benchmark, group: str, variant: str, data: str, device: torch.device, batch_size: int, workers: int):
    loader = _loader(variant, data, device, batch_size, workers)
    images = _consume(loader, device)  # warm-up pass (pipeline start, worker start)
    benchmark.group = group
    benchmark.extra_info["images"] = images
    benchmark.pedantic(_consume, args=(loader, device), rounds=3, iterations=1)


@pytest.mark.parametrize("variant", ["reference", pytest.param("dali", marks=needs_dali), "torchvision"])
def bench_loader_cpu(benchmark, variant, bench_dataset, batch_size=64, workers=2):
    _run(benchmark, f"loaders cpu ({workers} workers)", variant, bench_dataset, torch.device("cpu"),
         batch_size, workers)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["reference", pytest.param("dali", marks=needs_dali), "torchvision"])
def bench_loader_cuda(benchmark, variant, bench_dataset, batch_size=64, workers=8):
    _run(benchmark, f"loaders cuda ({workers} workers)", variant, bench_dataset, torch.device("cuda"),
         batch_size, workers)
