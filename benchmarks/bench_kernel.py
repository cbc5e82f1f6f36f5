"""Fused metrics vs the naive PyTorch expressions (torch.max + F.cross_entropy + torch.topk).

    pytest benchmarks/bench_kernel.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fasteval.kernels.fused_metrics import metrics_torch, metrics_triton

SHAPES = [(64, 1000), (256, 1000), (1024, 1000), (64, 21843), (256, 21843), (1024, 21843)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive(logits: torch.Tensor, labels: torch.Tensor):
    """What evaluation loops write: three separate passes, sums kept on the device."""
    x = logits.float()
    _, pred = torch.max(x, 1)
    loss = F.cross_entropy(x, labels, reduction="none")
    top = torch.topk(x, min(5, x.shape[1]), dim=1).indices
    return (pred == labels).sum(), (top == labels[:, None]).any(1).sum(), loss.double().sum()


def compiled_naive(logits: torch.Tensor, labels: torch.Tensor):
    """``naive`` compiled afresh for one case's static shapes, checked to have built a graph.

    One compiled ``naive`` shared by every case recompiles for each shape and dtype and, past
    dynamo's recompile limit (8), silently runs the remaining cases eagerly (4 of the 12 here).
    So each case starts from a reset dynamo (one cache entry: no guard walk in the timing) and
    raises if dynamo built no graph.
    """
    torch._dynamo.reset()
    fn = torch.compile(naive, dynamic=False)
    graphs = counters["stats"]["unique_graphs"]
    fn(logits, labels)
    if counters["stats"]["unique_graphs"] - graphs != 1:
        raise RuntimeError("naive compiled: dynamo built no graph, the case would run eagerly")
    return fn


def _inputs(batch: int, classes: int, dtype: str, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, classes, generator=g, device=device).to(DTYPES[dtype])
    labels = torch.randint(0, classes, (batch,), generator=g, device=device)
    return logits, labels


CPU_VARIANTS = {
    "naive (reference)": naive,
    "twin eager": lambda x, y: metrics_torch(x, y),
    "twin compiled": lambda x, y: metrics_torch(x, y, compiled=True),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-C{s[1]}")
@pytest.mark.parametrize("variant", list(CPU_VARIANTS))
def bench_metrics_cpu(benchmark, variant, shape, dtype):
    logits, labels = _inputs(*shape, dtype, "cpu")
    fn = CPU_VARIANTS[variant]
    fn(logits, labels)  # compile / warm up outside the timing
    benchmark.group = f"metrics cpu B={shape[0]} C={shape[1]} {dtype}"
    benchmark(fn, logits, labels)


def _synced(fn):
    def run(x, y):
        out = fn(x, y)
        torch.cuda.synchronize()
        return out

    return run


# Each makes, from one case's inputs, the function to time.
CUDA_VARIANTS = {
    "naive eager (reference)": lambda x, y: naive,
    "naive compiled": compiled_naive,
    "fused triton": lambda x, y: metrics_triton,
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-C{s[1]}")
@pytest.mark.parametrize("variant", list(CUDA_VARIANTS))
def bench_metrics_cuda(benchmark, variant, shape, dtype):
    logits, labels = _inputs(*shape, dtype, "cuda")
    fn = _synced(CUDA_VARIANTS[variant](logits, labels))
    for _ in range(3):
        fn(logits, labels)
    benchmark.group = f"metrics cuda B={shape[0]} C={shape[1]} {dtype}"
    benchmark(fn, logits, labels)
