"""The Python API: ``fasteval.evaluate`` and ``fasteval.compare`` for any ``nn.Module`` that maps an image
batch to logits, from a notebook or a script, with the command's planner, fast path, exact recheck and
report. The caller's module is left as it was: the runs work on a copy (device, dtype, mode and weights
untouched).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fasteval.data.preprocess import PRESETS, PreprocessSpec
from fasteval.data.samples import SampleList, discover, with_classes
from fasteval.errors import FastevalError
from fasteval.evaluation.metrics import EvalResult


# The command's option names in messages shared with it, as the API's keyword arguments.
_OPTIONS = re.compile(r"--(device|classes|batch-size|workers|precision|compile|exact|cache)\b"
                      r"(?: (\d+|cuda:\d+|cuda|cpu|auto|on|off|fp32|bf16|fp16|[A-Z][A-Z_|]*|/\S*?)(?=[\s:;,()]|$))?")


def _in_api_words(function):
    """Errors of a public function name its keyword arguments (``device='cuda:1'``), not the command's flags."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except FastevalError as exc:
            def word(m: re.Match) -> str:
                name = m.group(1).replace("-", "_")
                value = m.group(2)
                bare = value is not None and (value.isupper() or value.isdigit())  # a placeholder (FILE), a number
                return name if value is None else f"{name}={value}" if bare else f"{name}={value!r}"
            exc.args = tuple(_OPTIONS.sub(word, a) if isinstance(a, str) else a for a in exc.args)
            raise
    return wrapper


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


def _classes(classes) -> int | list[str] | None:
    """``classes=`` checked: None, a count, or a list of distinct class names."""
    if classes is None or (isinstance(classes, int) and not isinstance(classes, bool) and classes >= 1):
        return classes
    if isinstance(classes, Sequence) and not isinstance(classes, str) and classes \
            and all(isinstance(c, str) and c for c in classes) and len(set(classes)) == len(classes):
        return list(classes)
    raise FastevalError(f"classes must be a class count >= 1 or a list of distinct class names, got {classes!r}")


def _samples(data, classes) -> SampleList:
    if isinstance(data, SampleList):
        return with_classes(data, _classes(classes))
    if isinstance(data, (str, os.PathLike)):
        return discover(os.fspath(data), classes=_classes(classes))
    raise FastevalError(f"data must be a dataset path (a folder, a CSV list or WebDataset shards), not {type(data).__name__}")


def _spec(transform, samples: SampleList, quiet: bool = False) -> PreprocessSpec:
    """``None``: torchvision's ImageNet eval transform; else the caller's transform as a ``GivenTransform``
    (fasteval/data/transform_spec.py), decided by content on the first image."""
    if transform is None:
        if not quiet:
            print("fasteval: note: transform=None: torchvision's ImageNet eval transform (Resize(256) + "
                  "CenterCrop(224), ImageNet's mean and std); pass your own eval transform if the model was trained "
                  "with another", file=sys.stderr)
        return replace(PRESETS["imagenet"], source="the default: torchvision's ImageNet eval transform")
    if isinstance(transform, PreprocessSpec):
        return transform
    if not callable(transform):
        raise FastevalError(f"transform must be a torchvision transform (callable), not {type(transform).__name__}")
    from fasteval.data.transform_spec import spec_from_transform

    if not len(samples):
        raise FastevalError("the dataset has no samples")
    first = samples.paths[0]
    spec = spec_from_transform(transform, _rgb(first))
    if spec.runs_as_given:
        _check_one_output_size(transform, spec.out_hw, samples)
    return spec


def _rgb(path: str):
    from PIL import Image

    from fasteval.data.sources import open_sample

    with open_sample(path) as f, Image.open(f) as image:
        return image.convert("RGB")


def _check_one_output_size(transform, out_hw: tuple[int, int], samples: SampleList, look: int = 64) -> None:
    """A transform run as given must make every image the same size (else no batch can be stacked, in the
    caller's loop either): tried on the first of the first ``look`` images whose size differs from the first's."""
    from fasteval.data.preprocess import image_size

    def size(path: str):
        try:
            return image_size(path)
        except FastevalError:
            return None  # a bad file: the header check names it

    first = size(samples.paths[0])
    other = next((p for p in samples.paths[1:look] if size(p) not in (None, first)), None)
    if other is None:
        return
    got = tuple(transform(_rgb(other)).shape[1:])
    if got != tuple(out_hw):
        raise FastevalError(f"transform: its output size follows the image's ({out_hw[0]}x{out_hw[1]} from "
                            f"{samples.paths[0]}, {got[0]}x{got[1]} from {other}), so no batch can be stacked: end "
                            f"it with a CenterCrop or a Resize to a fixed (height, width)")


def _check(model: nn.Module, batch_size: int, workers: int | None) -> None:
    if not isinstance(model, nn.Module):
        raise FastevalError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FastevalError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise FastevalError(f"workers must be an integer >= 0 or None, got {workers!r}")


def _setup(ranks, model: nn.Module, data, transform, device: str, workers: int | None, batch_size: int,
           classes=None):
    """The samples (the same on every rank), the spec, this rank's device, the workers, and a copy of the model
    (the runs move it, switch it to eval mode and convert it; the caller's module stays as it was)."""
    from fasteval.devices import resolve_device
    from fasteval.procs import usable_cores

    samples = _samples(data, classes)
    ranks.check_same_data(samples)
    ranks.check_same_model(model)
    spec = _spec(transform, samples, quiet=not ranks.is_main)
    device = resolve_device(ranks.device_name(device))
    workers = min(8, usable_cores()) if workers is None else workers
    return samples, spec, device, workers, copy.deepcopy(model)


def _report(result: EvalResult, samples: SampleList, spec: PreprocessSpec, device: torch.device, batch_size: int,
            workers: int) -> dict:
    from fasteval.output.report import build_report

    return build_report(result, _config(samples, spec, device, batch_size, workers), device, samples)


def _config(samples: SampleList, spec: PreprocessSpec, device: torch.device, batch_size: int, workers: int) -> dict:
    """The report's ``config`` for a module given from Python."""
    from fasteval.output.report import run_config

    return run_config(samples.root, "module given", None, spec, batch_size, workers, device, samples.num_classes,
                      len(samples))


def _reference(ranks, samples, model, spec, device, batch_size, workers, progress, reason: str) -> EvalResult:
    """The plain loop on this rank's shard, gathered: the whole run's result on every rank."""
    from fasteval.evaluation.plan import reference_plan
    from fasteval.evaluation.reference import evaluate_reference

    shard = ranks.shard(samples)
    result = ranks.step(evaluate_reference, shard, model, spec, batch_size=batch_size, workers=workers,
                        device=device, progress=progress and ranks.is_main)
    result.extra["plan"] = reference_plan(len(shard), batch_size, workers, reason, spec).to_json()
    return ranks.gather(result, samples, batch_size)


def _fast(ranks, samples, model, spec, device, options, progress) -> EvalResult:
    from fasteval.evaluation.fast import evaluate_fast

    result = ranks.step(evaluate_fast, ranks.shard(samples), model, spec, device=device, options=options,
                        progress=progress and ranks.is_main, scope=ranks.scope(samples))
    return ranks.gather(result, samples, options.batch_size)


def _options(precision, compile, batch_size, workers, exact, route: bool = True):
    from fasteval.evaluation.plan import FastOptions

    return FastOptions(loader="auto", precision=precision, compile=compile, batch_size=batch_size, workers=workers,
                       exact=exact, route=route)


@_in_api_words
def evaluate(model: nn.Module, data, *, transform=None, batch_size: int = 64, device: str = "auto",
             precision: str = "auto", exact: str = "auto", reference: bool = False, progress: bool = True,
             workers: int | None = None, compile: str = "auto", classes: int | Sequence[str] | None = None) -> Result:
    """Evaluate ``model`` (any module mapping a float image batch to logits) on ``data`` (an ImageFolder root)
    as ``fasteval eval`` does: the plan, the fast path, the exact recheck; ``reference=True``: the plain loop.

    ``transform``: the torchvision eval transform of your own loop (v1 or v2). Resize + optional square
    CenterCrop + ToTensor (or ToImage + ToDtype(float32, scale=True)) + Normalize is reproduced by the fast
    path's decoders (confirmed equal on the first image); any other transform runs as given on PIL images in
    DataLoader workers, feeding the same fast model and recheck, exact too. ``None``: torchvision's ImageNet
    eval transform. ``classes``: the model's classes where ``data`` holds only some of them, as ``--classes``
    (a count, or the names in the head's order). ``compile``: as ``--compile`` (``auto`` also lets a run too small for the fast path to pay go
    wholly by the reference's code; ``on``/``off`` always take the fast path)."""
    from fasteval.distributed import library_ranks

    _check(model, batch_size, workers)
    with library_ranks(device) as ranks:
        samples, spec, device, workers, work = ranks.step(_setup, ranks, model, data, transform, device, workers,
                                                          batch_size, classes)
        if reference:
            result = _reference(ranks, samples, work, spec, device, batch_size, workers, progress, "reference=True")
        else:
            result = _fast(ranks, samples, work, spec, device,
                           _options(precision, compile, batch_size, workers, exact), progress)
    return Result(_report(result, samples, spec, device, batch_size, workers), result)


@_in_api_words
def compare(model: nn.Module, data, *, transform=None, batch_size: int = 64, device: str = "auto",
            precision: str = "auto", exact: str = "auto", progress: bool = True, workers: int | None = None,
            compile: str = "auto", classes: int | Sequence[str] | None = None) -> dict:
    """What ``fasteval eval --validate`` does: the fast path and the plain loop on the same samples, compared
    sample by sample. Returns ``{"fast": Result, "reference": Result, "validation": {...}}`` (``validation``:
    agreement, flipped samples, the largest per-sample loss difference)."""
    from fasteval.distributed import library_ranks
    from fasteval.evaluation.validate import compare as compare_runs

    _check(model, batch_size, workers)
    with library_ranks(device) as ranks:
        samples, spec, device, workers, work = ranks.step(_setup, ranks, model, data, transform, device, workers,
                                                          batch_size, classes)
        fast = _fast(ranks, samples, work, spec, device,
                     _options(precision, compile, batch_size, workers, exact, route=False), progress)
        ref = _reference(ranks, samples, work, spec, device, batch_size, workers, progress, "compare's reference")
    return {"fast": Result(_report(fast, samples, spec, device, batch_size, workers), fast),
            "reference": Result(_report(ref, samples, spec, device, batch_size, workers), ref),
            "validation": compare_runs(samples, ref, fast)}


@dataclass(frozen=True)
class SweepResult:
    """Several models of one architecture on one dataset: ``results`` (one ``Result`` per model, in the order
    given), ``names``, ``best`` (the index of the best: highest top-1; ties: higher top-5, then lower loss, then
    the first given), each model's paired test against the best in its ``Result.report["vs_best"]``, and
    ``to_dict()``, the same keys as a checkpoint sweep's ``--json``."""

    report: dict
    results: tuple[Result, ...] = field(repr=False)

    names = property(lambda self: [entry["weights"] for entry in self.report["checkpoints"]])
    best = property(lambda self: self.report["best"])

    def to_dict(self) -> dict:
        return self.report

    def __repr__(self) -> str:
        rows = ", ".join(f"{name}: {r.top1:.3f} %" for name, r in zip(self.names, self.results))
        return f"SweepResult(best={self.names[self.best]!r}; top-1 {rows})"


def _named_models(models) -> tuple[list[str], list]:
    """``models`` (a sequence, or a mapping from names) as names and entries: each an ``nn.Module`` or a
    state_dict for a copy of the first (which must be a module)."""
    if isinstance(models, nn.Module) or not isinstance(models, (Mapping, Sequence)) or isinstance(models, str):
        raise FastevalError("models must be a list of torch.nn.Module (or state_dicts after the first module), "
                            "or a dict from names to them")
    names, entries = (list(map(str, models)), list(models.values())) if isinstance(models, Mapping) else \
        ([f"model {i + 1}" for i in range(len(models))], list(models))
    if not entries:
        raise FastevalError("models is empty: give at least one model")
    if len(set(names)) != len(names):
        raise FastevalError("models: two models have the same name")
    if not isinstance(entries[0], nn.Module):
        raise FastevalError(f"models: the first ({names[0]}) must be a torch.nn.Module, not {type(entries[0]).__name__}")
    return names, entries


def _loaders(names: list[str], entries: list) -> list:
    """For each entry, a call returning its module, every one checked first to have the first's state entries
    (names and shapes): the sweep copies each model's weights into one compiled graph."""
    first = entries[0]
    shapes = {k: tuple(v.shape) for k, v in first.state_dict().items()}
    loads = []
    for name, entry in zip(names, entries):
        if isinstance(entry, nn.Module):
            state = entry.state_dict()
        elif isinstance(entry, Mapping):
            state = entry
        else:
            raise FastevalError(f"models: {name} is a {type(entry).__name__}, not a torch.nn.Module or a state_dict")
        theirs = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
        if theirs != shapes:
            key = next((k for k in list(shapes) + list(theirs) if shapes.get(k) != theirs.get(k)), "?")
            raise FastevalError(f"models: {name} is not the same architecture as {names[0]} (state entry {key}: "
                                f"{theirs.get(key, 'missing')} against {shapes.get(key, 'missing')}); a sweep runs "
                                f"one compiled graph: evaluate other architectures with evaluate()")
        if isinstance(entry, nn.Module):
            loads.append(lambda entry=entry: entry)
        else:
            loads.append(lambda entry=entry: _with_state(first, entry))
    return loads


def _with_state(module: nn.Module, state: Mapping) -> nn.Module:
    copied = copy.deepcopy(module)
    copied.load_state_dict(state)
    return copied


@_in_api_words
def sweep(models, data, *, transform=None, batch_size: int = 64, device: str = "auto", precision: str = "auto",
          exact: str = "auto", progress: bool = True, workers: int | None = None, compile: str = "auto",
          cache: str | None = None, classes: int | Sequence[str] | None = None) -> SweepResult:
    """What ``fasteval eval DATA --weights A B C`` does, for modules: several models of one architecture (a
    run's checkpoints, loaded by you) on ``data``, the images decoded once (kept in memory, or in ``cache``, a
    folder for ``--cache``'s files), the model compiled once; each result is what ``evaluate()`` of that model
    alone gives. ``models``: a list of modules (or of state_dicts after the first module), or a dict from names
    to them. One process: under torchrun, evaluate each model with ``evaluate()`` instead."""
    from fasteval.data.decoded import DecodedSource, check_cache_dir
    from fasteval.distributed import Ranks, detect_launch
    from fasteval.evaluation.fast import FastEvaluator
    from fasteval.evaluation.sweep import run_sweep
    from fasteval.output.sweep_report import build_sweep_report

    names, entries = _named_models(models)
    _check(entries[0], batch_size, workers)
    launch = detect_launch()
    if launch is not None and launch.world_size > 1:
        raise FastevalError("sweep() runs in one process: under torchrun, evaluate each model with evaluate()")
    if cache is not None:
        check_cache_dir(cache)
    loads = _loaders(names, entries)
    start = time.perf_counter()
    samples, spec, device, workers, work = _setup(Ranks(), entries[0], data, transform, device, workers, batch_size,
                                                  classes)
    source = DecodedSource(cache)
    evaluator = FastEvaluator(samples, work, spec, device, _options(precision, compile, batch_size, workers, exact),
                              batch_source=source, passes=len(loads))
    setup = time.perf_counter() - start
    runs, seconds = run_sweep(evaluator, loads, progress)
    config = _config(samples, spec, device, batch_size, workers)
    decoded = dict(source.info) if source.info else {"placement": "none", "reason": "every sample by the reference's "
                                                                                     "code", "cache": "off"}
    report = build_sweep_report(names, runs, seconds, torch.tensor(samples.labels), config, device, decoded, setup,
                                samples)
    report["plan"] = evaluator.executed_plan.to_json()
    return SweepResult(report, tuple(Result(entry, run) for entry, run in zip(report["checkpoints"], runs)))
