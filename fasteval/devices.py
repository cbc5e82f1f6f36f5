"""Resolving ``--device``, making it the current device, and waiting for a device."""

from __future__ import annotations

import re

import torch

from fasteval.choices import DEVICE_PATTERN
from fasteval.errors import FastevalError


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_device(device: torch.device) -> torch.device:
    """Make a CUDA ``device`` the current one for the rest of the process; returns it with its index.

    Work that is not given a device explicitly runs on the current one: Triton launches, nvJPEG's
    stream wait, ``torch.empty(device="cuda")``, the DataLoader's pinning. ``--device cuda:1``
    without this would run those on device 0 with device-1 tensors. The CPU is returned as is.
    """
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def resolve_device(name: str = "auto", make_current: bool = False) -> torch.device:
    """``auto`` -> the first CUDA GPU if there is one, else the CPU; ``cpu``; ``cuda`` or ``cuda:N``.

    ``make_current=True`` also makes a CUDA device current (``use_device``), as a command does once.
    """
    device = _parse_device(name)
    return use_device(device) if make_current else device


def _parse_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise FastevalError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise FastevalError(f"--device {name}: CUDA is not available on this machine")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise FastevalError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
