"""End to end on the same JPEGs: the reference loop vs the fast path (default settings).

    pytest benchmarks/bench_end_to_end.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch

from fasteval.evaluation.fast import FastEvaluator, FastOptions
from fasteval.model.models import build_model
from fasteval.data.preprocess import PRESETS
from fasteval.evaluation.reference import evaluate_reference
from fasteval.data.samples import discover


def _run(benchmark, variant, data, weights, device, batch_size, workers):
    samples = discover(data)
    model = build_model("resnet18", weights, samples.num_classes)
    if variant == "reference":
        def once():
            return evaluate_reference(samples, model, PRESETS["imagenet"], batch_size=batch_size, workers=workers,
                                      device=device, progress=False)
    else:
        evaluator = FastEvaluator(samples, model, PRESETS["imagenet"], device,
                                  FastOptions(batch_size=batch_size, workers=workers))

        def once():
            return evaluator.run(progress=False)
    once()  # warm-up (compile, pipeline and worker start) excluded
    benchmark.group = f"end to end {device.type} ({workers} workers)"
    benchmark.extra_info["images"] = len(samples)
    benchmark.pedantic(once, rounds=2, iterations=1)


@pytest.mark.parametrize("variant", ["reference", "fast"])
def bench_end_to_end_cpu(benchmark, variant, bench_dataset, bench_model_file, batch_size=64, workers=2):
    _run(benchmark, variant, bench_dataset, bench_model_file, torch.device("cpu"), batch_size, workers)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["reference", "fast"])
def bench_end_to_end_cuda(benchmark, variant, bench_dataset, bench_model_file, batch_size=256, workers=8):
    _run(benchmark, variant, bench_dataset, bench_model_file, torch.device("cuda"), batch_size, workers)
