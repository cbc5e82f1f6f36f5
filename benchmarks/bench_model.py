"""ResNet-18 forward on loaded tensors: eager fp32 NCHW (the reference) vs channels-last,
bf16 autocast and torch.compile.

    pytest benchmarks/bench_model.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from fasteval.model.inference import FastModel

VARIANTS = {  # name: (channels_last, precision, compile)
    "eager fp32 NCHW (reference)": (False, "fp32", False),
    "eager channels_last": (True, "fp32", False),
    "eager CL + bf16": (True, "bf16", False),
    "compiled CL fp32": (True, "fp32", True),
    "compiled CL + bf16": (True, "bf16", True),
}


def _runner(variant: str, device: torch.device, batch: int, size: int):
    channels_last, precision, compile = VARIANTS[variant]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000)
    with torch.inference_mode():
        x = torch.randn(batch, 3, size, size, device=device)
        if channels_last:
            fast = FastModel(model, device, precision, compile)
            x = x.contiguous(memory_format=torch.channels_last)
            fast.warm_up(x)
            forward = fast
        else:
            model = model.to(device).eval()
            forward = model

    def step():
        with torch.inference_mode():
            out = forward(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    step()
    return step


@pytest.mark.parametrize("variant", list(VARIANTS))
def bench_model_cpu(benchmark, variant, batch=32, size=224):
    step = _runner(variant, torch.device("cpu"), batch, size)
    benchmark.group = f"model cpu resnet18 batch {batch}"
    benchmark.extra_info["images"] = batch
    benchmark.pedantic(step, rounds=5, iterations=1)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
def bench_model_cuda(benchmark, variant, batch=256, size=224):
    step = _runner(variant, torch.device("cuda"), batch, size)
    benchmark.group = f"model cuda resnet18 batch {batch}"
    benchmark.extra_info["images"] = batch
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)
