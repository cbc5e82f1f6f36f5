"""The Python API: ``fasteval.evaluate`` and ``fasteval.compare`` for any ``nn.Module`` that maps an image
batch to logits, from a notebook or a script, with the command's planner, fast path, exact recheck and
report. The caller's module is left as it was: the runs work on a copy (device, dtype, mode and weights
untouched).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fasteval.data.preprocess import PRESETS, PreprocessSpec
from fasteval.data.samples import SampleList, discover
from fasteval.errors import FastevalError
from fasteval.evaluation.metrics import EvalResult


@dataclass(frozen=True)
class Result:
    """One evaluation: the figures (``samples``, ``correct_top1``, ``correct_top5``, ``top1``, ``top5``,
    ``loss``), the per-class report (``per_class``), the per-sample tensors (``run``: predictions, losses...),
    and ``to_dict()``, the same keys as the command's ``--json``."""

    report: dict
    run: EvalResult = field(repr=False)

    samples = property(lambda self: self.report["samples"])
    correct_top1 = property(lambda self: self.report["correct_top1"])
    correct_top5 = property(lambda self: self.report["correct_top5"])
    top1 = property(lambda self: self.report["top1"])
    top5 = property(lambda self: self.report["top5"])
    loss = property(lambda self: self.report["loss"])
    per_class = property(lambda self: self.report.get("per_class"))
    plan = property(lambda self: self.report.get("plan"))

    def to_dict(self) -> dict:
        return self.report

    def __repr__(self) -> str:
        return (f"Result(samples={self.samples}, top1={self.top1:.3f} % ({self.correct_top1}), "
                f"top5={self.top5:.3f} % ({self.correct_top5}), loss={self.loss:.6f})")


def _samples(data) -> SampleList:
    if isinstance(data, SampleList):
        return data
    if isinstance(data, (str, os.PathLike)):
        return discover(os.fspath(data))
    raise FastevalError(f"data must be a dataset path (an ImageFolder root), not {type(data).__name__}")


def _spec(transform, samples: SampleList) -> PreprocessSpec:
    """``None``: torchvision's ImageNet eval transform; else the caller's transform as a ``GivenTransform``
    (fasteval/data/transform_spec.py), decided by content on the first image."""
    if transform is None:
        print("fasteval: note: transform=None: torchvision's ImageNet eval transform (Resize(256) + CenterCrop(224), "
              "ImageNet's mean and std); pass your own eval transform if the model was trained with another",
              file=sys.stderr)
        return replace(PRESETS["imagenet"], source="the default: torchvision's ImageNet eval transform")
    if isinstance(transform, PreprocessSpec):
        return transform
    if not callable(transform):
        raise FastevalError(f"transform must be a torchvision transform (callable), not {type(transform).__name__}")
    from PIL import Image

    from fasteval.data.transform_spec import spec_from_transform

    if not len(samples):
        raise FastevalError("the dataset has no samples")
    with Image.open(samples.paths[0]) as image:
        return spec_from_transform(transform, image.convert("RGB"))


def _setup(model: nn.Module, data, transform, device: str, workers: int | None, batch_size: int):
    from fasteval.devices import resolve_device
    from fasteval.procs import usable_cores

    if not isinstance(model, nn.Module):
        raise FastevalError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FastevalError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise FastevalError(f"workers must be an integer >= 0 or None, got {workers!r}")
    samples = _samples(data)
    spec = _spec(transform, samples)
    device = resolve_device(device)
    workers = min(8, usable_cores()) if workers is None else workers
    # A copy: the runs move it, switch it to eval mode and convert it; the caller's module stays as it was.
    return samples, spec, device, workers, copy.deepcopy(model)


def _report(result: EvalResult, samples: SampleList, spec: PreprocessSpec, device: torch.device, batch_size: int,
            workers: int) -> dict:
    from fasteval.output.report import build_report

    config = {"path": os.path.abspath(samples.root), "arch": "module given", "weights": None, "preset": spec.name,
              "resize": spec.resize, "crop": spec.crop, "preprocessing": spec.describe(),
              "batch_size": min(batch_size, len(samples)), "batch_size_requested": batch_size, "workers": workers,
              "device": str(device), "classes": samples.num_classes}
    return build_report(result, config, device, samples)


def _reference(samples, model, spec, device, batch_size, workers, progress, reason: str) -> EvalResult:
    from fasteval.evaluation.plan import reference_plan
    from fasteval.evaluation.reference import evaluate_reference

    result = evaluate_reference(samples, model, spec, batch_size=batch_size, workers=workers, device=device,
                                progress=progress)
    result.extra["plan"] = reference_plan(len(samples), batch_size, workers, reason, spec).to_json()
    return result


def _run(model, data, transform, batch_size, device, precision, compile, exact, reference, progress, workers,
         route: bool = True):
    from fasteval.evaluation.fast import evaluate_fast
    from fasteval.evaluation.plan import FastOptions

    samples, spec, device, workers, work = _setup(model, data, transform, device, workers, batch_size)
    if reference:
        result = _reference(samples, work, spec, device, batch_size, workers, progress, "reference=True")
    else:
        options = FastOptions(loader="auto", precision=precision, compile=compile, batch_size=batch_size,
                              workers=workers, exact=exact, route=route)
        result = evaluate_fast(samples, work, spec, device=device, options=options, progress=progress)
    return samples, spec, device, workers, work, result


def evaluate(model: nn.Module, data, *, transform=None, batch_size: int = 64, device: str = "auto",
             precision: str = "auto", exact: str = "auto", reference: bool = False, progress: bool = True,
             workers: int | None = None, compile: str = "auto") -> Result:
    """Evaluate ``model`` (any module mapping a float image batch to logits) on ``data`` (an ImageFolder root)
    as ``fasteval eval`` does: the plan, the fast path, the exact recheck; ``reference=True``: the plain loop.

    ``transform``: the torchvision eval transform of your own loop (v1 or v2). Resize + optional square
    CenterCrop + ToTensor (or ToImage + ToDtype(float32, scale=True)) + Normalize is reproduced by the fast
    path's decoders (confirmed equal on the first image); any other transform runs as given on PIL images in
    DataLoader workers, feeding the same fast model and recheck, exact too. ``None``: torchvision's ImageNet
    eval transform. ``compile``: as ``--compile`` (``auto`` also lets a run too small for the fast path to pay go
    wholly by the reference's code; ``on``/``off`` always take the fast path)."""
    samples, spec, device, workers, _, result = _run(model, data, transform, batch_size, device, precision, compile,
                                                     exact, reference, progress, workers)
    return Result(_report(result, samples, spec, device, batch_size, workers), result)


def compare(model: nn.Module, data, *, transform=None, batch_size: int = 64, device: str = "auto",
            precision: str = "auto", exact: str = "auto", progress: bool = True, workers: int | None = None,
            compile: str = "auto") -> dict:
    """What ``fasteval eval --validate`` does: the fast path and the plain loop on the same samples, compared
    sample by sample. Returns ``{"fast": Result, "reference": Result, "validation": {...}}`` (``validation``:
    agreement, flipped samples, the largest per-sample loss difference)."""
    from fasteval.evaluation.validate import compare as compare_runs

    samples, spec, device, workers, work, fast = _run(model, data, transform, batch_size, device, precision,
                                                      compile, exact, False, progress, workers, route=False)
    ref = _reference(samples, work, spec, device, batch_size, workers, progress, "compare's reference")
    return {"fast": Result(_report(fast, samples, spec, device, batch_size, workers), fast),
            "reference": Result(_report(ref, samples, spec, device, batch_size, workers), ref),
            "validation": compare_runs(samples, ref, fast)}
