"""Choosing a loader for the fast path, and the shape of its batches (what each loader yields:
fasteval/data/batch.py)."""

from __future__ import annotations

import math

import torch

from fasteval.choices import CPU_BATCH_PIXELS_PER_CORE, LOADERS
from fasteval.errors import FastevalError
from fasteval.procs import usable_cores
from fasteval.data.preprocess import PreprocessSpec
from fasteval.data.samples import SampleList



def batch_cap(batch_size: int, device_type: str, input_hw: tuple[int, int] | None, cores: int | None = None) -> int:
    """The most samples the fast path puts in a batch: ``--batch-size``, and on the CPU at most
    ``CPU_BATCH_PIXELS_PER_CORE`` of input per usable core (at least one image). The cores are this
    process's affinity, the same for a torchrun rank as for one process on that machine (not its threads,
    which torchrun sets to 1), so the ranks keep the one-process shape."""
    if device_type != "cpu" or not input_hw:
        return batch_size
    pixels = CPU_BATCH_PIXELS_PER_CORE * (cores or usable_cores())
    return max(1, min(batch_size, pixels // (input_hw[0] * input_hw[1])))


def batch_shape(total: int, batch_size: int, device_type: str = "cuda",
                input_hw: tuple[int, int] | None = None, cores: int | None = None) -> int:
    """The fast path's one static batch size for ``total`` samples, decided from the whole run's count,
    so every torchrun rank runs the one-process shape. The last batch is padded to it.

    On the CPU, as many batches as ``batch_cap`` needs, made as equal as they can be: a padding row costs
    as much as a sample there, so 241 images at a cap of 20 compute 13 batches of 19 (247 rows), not 260.
    On a GPU, ``batch_size`` (clamped to the run): the padding costs at most one batch's GPU time
    (DALI decodes its repeated last sample; the torchvision loaders pad on the device), tens of
    milliseconds, while each new shape is a new compile (compiled artifacts are keyed by shape), and equal
    batches would give nearly every dataset size its own shape (ImageNet's 50,000 at 512: 511)."""
    cap = batch_cap(batch_size, device_type, input_hw, cores)
    if total <= 0:
        return cap
    if device_type != "cpu":
        return min(cap, total)
    return math.ceil(total / math.ceil(total / cap))


def batch_shape_reason(total: int, batch_size: int, shape: int, device_type: str = "cuda",
                       input_hw: tuple[int, int] | None = None, cores: int | None = None) -> str | None:
    """One line on ``batch_shape``'s choice for ``total`` samples and the requested ``batch_size``, where
    it differs from that size clamped to the run (else None)."""
    clamped = min(batch_size, total)
    if shape == clamped:
        return None
    batches = math.ceil(total / shape)
    cap = batch_cap(clamped, device_type, input_hw, cores)
    why = (f"on the CPU at most {cap} image(s) of {input_hw[0]}x{input_hw[1]} a batch on these cores (its "
           f"activations stay in cache), " if cap < clamped else "")
    padding, before = batches * shape - total, math.ceil(total / clamped) * clamped - total
    return (f"{batches} batch(es) of {shape}: {why}as equal as --batch-size {batch_size} allows, "
            f"{padding} padding row(s) in one process" +
            (f" (batches of {clamped} would pad {before})" if before != padding else ""))


def needs_pil(samples: SampleList) -> list[int]:
    """Indices of the files DALI would not decode exactly as PIL (the reference) does, decided by
    content (magic bytes and header, never the name): 16-bit or float samples, PNM with another
    maxval than 255, palette TIFF, formats DALI lacks (GIF, ICO, AVIF... under an image extension),
    multi-frame or truncated files, images over PIL's decompression-bomb limit, and files PIL
    cannot open (so that PIL raises the reference's own error). Also files whose name is not
    UTF-8, which DALI cannot be given. Only headers are read."""
    from fasteval.data.probe import probe_all

    return [i for i, p in enumerate(probe_all(samples.paths)) if not (p.dali_safe and _utf8(p.path))]


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def resolve_loader(kind: str) -> str:
    """``auto`` -> ``dali`` where DALI is installed, else ``torchvision``; checks the name."""
    from fasteval.data.loader_dali import dali_available

    if kind not in LOADERS:
        raise FastevalError(f"unknown --loader {kind!r}; choose from {', '.join(LOADERS)}")
    if kind == "auto":
        return "dali" if dali_available() else "torchvision"
    if kind == "dali" and not dali_available():
        raise FastevalError("--loader dali: nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
    return kind


def make_loader(kind: str, samples: SampleList, spec: PreprocessSpec, *, batch_size: int, workers: int,
                device: torch.device, half: bool = False, dali=None):
    """A loader by name: ``dali`` (GPU mixed decoding on CUDA, CPU pipeline otherwise),
    ``torchvision`` (nvJPEG via torchvision.io on CUDA, PIL DataLoader on the CPU), or
    ``auto``: DALI where it is installed, else torchvision."""
    from fasteval.data.loader_dali import DaliLoader
    from fasteval.data.loader_torch import GpuDecodeLoader, TorchvisionLoader, TransformLoader

    if spec.runs_as_given:  # only the caller's transform makes its pixels
        return TransformLoader(samples, spec, batch_size, workers, device, half)

    if resolve_loader(kind) == "dali":
        return DaliLoader(samples, spec, batch_size, workers, device, half, settings=dali)
    if device.type == "cuda":
        return GpuDecodeLoader(samples, spec, batch_size, workers, device, half)
    return TorchvisionLoader(samples, spec, batch_size, workers, device, half)
