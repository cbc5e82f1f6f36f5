"""Choosing a loader for the fast path, and what every loader yields.

Every loader is fed the one sample list, yields batches of the static batch size (the last
one padded; its ``real`` rows are the samples), images already normalised, channels-last,
on the evaluation device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .errors import FastevalError
from .preprocess import PreprocessSpec
from .samples import SampleList

LOADERS = ("auto", "dali", "torchvision")


class Batch(NamedTuple):
    images: torch.Tensor  # [B, 3, H, W] float, channels-last, on the device
    labels: torch.Tensor  # [B] int64, on the device
    real: int  # the first `real` rows are samples; the rest is padding


def find_undecodable(paths: list[str]) -> tuple[str | None, str]:
    """The first file PIL cannot decode (to name it when a batched decoder fails), or (None, "")."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as image:
                image.convert("RGB")
        except Exception as exc:
            return path, str(exc) or type(exc).__name__
    return None, ""


JPEG_EXTENSIONS = (".jpg", ".jpeg")


def needs_pil(samples: SampleList) -> list[int]:
    """Indices of files only PIL decodes as the reference does: 16-bit or float images (PNG, TIFF,
    PGM), which PIL clips to 8 bits where DALI scales. JPEGs are never read here, and other files
    only by their header, so the check is cheap."""
    from PIL import Image

    found = []
    for index, path in enumerate(samples.paths):
        if path.lower().endswith(JPEG_EXTENSIONS):
            continue
        try:
            with Image.open(path) as image:
                mode = image.mode
        except Exception:
            continue  # unreadable: the loader names it when it fails
        if mode.startswith(("I", "F")):
            found.append(index)
    return found


def resolve_loader(kind: str) -> str:
    """``auto`` -> ``dali`` where DALI is installed, else ``torchvision``; checks the name."""
    from .loader_dali import dali_available

    if kind not in LOADERS:
        raise FastevalError(f"unknown --loader {kind!r}; choose from {', '.join(LOADERS)}")
    if kind == "auto":
        return "dali" if dali_available() else "torchvision"
    if kind == "dali" and not dali_available():
        raise FastevalError("--loader dali: nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
    return kind


def make_loader(kind: str, samples: SampleList, spec: PreprocessSpec, *, batch_size: int, workers: int,
                device: torch.device, half: bool = False):
    """A loader by name: ``dali`` (GPU mixed decoding on CUDA, CPU pipeline otherwise),
    ``torchvision`` (nvJPEG via torchvision.io on CUDA, PIL DataLoader on the CPU), or
    ``auto``: DALI where it is installed, else torchvision."""
    from .loader_dali import DaliLoader
    from .loader_torch import GpuDecodeLoader, TorchvisionLoader

    if resolve_loader(kind) == "dali":
        return DaliLoader(samples, spec, batch_size, workers, device, half)
    if device.type == "cuda":
        return GpuDecodeLoader(samples, spec, batch_size, workers, device, half)
    return TorchvisionLoader(samples, spec, batch_size, workers, device, half)
