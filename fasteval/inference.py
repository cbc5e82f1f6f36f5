"""The fast path's model: channels-last, mixed precision, ``torch.compile``d for one static shape."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

import torch
from torch import nn

from .devices import synchronize
from .errors import FastevalError, first_line

# torch.compile on a CUDA build without a GPU warns that no CUDA runtime exists: noise here.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix work at least as fast as fp32 (2x here, ../shared/FACTS.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Compute capability 8.0+ (Ampere on): bf16 tensor cores. ``torch.cuda.is_bf16_supported()``
    also counts emulation, so it says yes on Turing and Volta, where bf16 is emulated and slow."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs with native bf16 (else fp16) and on CPUs with fast bf16, else fp32."""
    if requested not in PRECISIONS:
        raise FastevalError(f"unknown --precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise FastevalError("--precision fp16 is not supported on the CPU; use bf16 or fp32")
        return requested
    if device.type == "cuda":
        return "bf16" if cuda_has_native_bf16(device) else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


class FastModel:
    """A model moved once, channels-last, run under autocast and (optionally) compiled."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str, compile: bool) -> None:
        self.device, self.precision = device, precision
        self.model = model.to(device).eval().to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.compiled = False
        self._forward = self._eager
        if compile:
            self._forward = torch.compile(self._eager, dynamic=False)
            self.compiled = True

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def _eager(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model(images)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward(images)

    def warm_up(self, example: torch.Tensor, calls: int = 2) -> float:
        """Compile and run on a batch of the static shape; seconds spent. Falls back to eager
        with a one-line warning where compiling is impossible (no C++ compiler, say)."""
        start = time.perf_counter()
        with torch.inference_mode():
            try:
                for _ in range(calls):
                    self._forward(example)
            except Exception as exc:
                if not self.compiled:
                    raise
                print(f"fasteval: warning: torch.compile failed, running eager: {first_line(exc)[:200]}",
                      file=sys.stderr)
                self._forward, self.compiled = self._eager, False
                for _ in range(calls):
                    self._forward(example)
            synchronize(self.device)
        return time.perf_counter() - start
