"""Resolving ``--device``, and waiting for a device."""

from __future__ import annotations

import re

import torch

from .errors import FastevalError


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA GPU if there is one, else the CPU; ``cpu``; ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise FastevalError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise FastevalError(f"--device {name}: CUDA is not available on this machine")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise FastevalError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
