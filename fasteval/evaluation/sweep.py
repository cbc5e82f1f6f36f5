"""Many checkpoints on one dataset: decoded once, compiled once, ranked with paired statistics.
The command is fasteval/sweep_command.py; its report, table and plot fasteval/output/sweep_report.py.

One ``FastEvaluator`` is built for the first checkpoint, its batches coming from the decoded store
(fasteval/data/decoded.py); every checkpoint's weights are then copied into its compiled model and
its reference model in place, so each pass runs the same graph on the same decoded images. Each
checkpoint's result is what ``fasteval eval`` of that checkpoint alone gives (same counts, the loss
within float tolerance). The best checkpoint is the highest top-1; ties go to the higher top-5,
then the lower mean loss, then the one given first. Each checkpoint is compared with the best by
McNemar's exact test on the paired per-sample top-1 correctness.
"""

from __future__ import annotations

import glob
import os
import time

import torch

from fasteval.errors import FastevalError
from fasteval.evaluation.metrics import EvalResult
from fasteval.evaluation.stats import mcnemar_exact

CHECKPOINT_EXTENSIONS = (".pt", ".pth")
TIE_BREAK = "highest top-1; ties: higher top-5, then lower loss, then the first given"


def expand_weights(values: list[str]) -> list[str]:
    """``--weights`` values as checkpoint paths, in the order given: a folder becomes its *.pt/*.pth
    files (sorted), a pattern that names no file its glob matches (sorted), anything else itself
    (``DEFAULT``, a path, checked when loaded)."""
    paths: list[str] = []
    for value in values:
        if os.path.isdir(value):
            found = sorted(os.path.join(value, n) for n in os.listdir(value)
                           if n.lower().endswith(CHECKPOINT_EXTENSIONS) and os.path.isfile(os.path.join(value, n)))
            if not found:
                raise FastevalError(f"--weights {value} is a folder with no *.pt or *.pth checkpoint files")
            paths.extend(found)
        elif not os.path.exists(value) and glob.has_magic(value):
            found = sorted(p for p in glob.glob(value) if os.path.isfile(p))
            if not found:
                raise FastevalError(f"--weights {value}: the pattern matches no file")
            paths.extend(found)
        else:
            paths.append(value)
    return paths


def check_checkpoints(arch: str, paths: list[str], num_classes: int) -> None:
    """Check every checkpoint before any work (mapped, not read: each is read once, in its turn): each
    must fit ``arch`` and the first checkpoint's class count (the dataset's), whatever format a training
    script saved it in."""
    from fasteval.model.models import build_model, head_name, n_classes

    head = head_name(arch)
    first = None
    for path in paths:
        model = build_model(arch, path, None, check_only=True)
        classes = model.get_submodule(head)
        classes = getattr(classes, "out_features", None) or getattr(classes, "out_channels")
        if first is None:
            first = (path, classes)
        elif classes != first[1]:
            raise FastevalError(f"--weights {path} have a {classes}-class head but the first checkpoint "
                                f"{first[0]} has {n_classes(first[1])}")
    if first is not None and first[1] != num_classes:
        raise FastevalError(f"--weights {first[0]} have a {first[1]}-class head but the dataset has "
                            f"{n_classes(num_classes)}")


def best_index(results: list[EvalResult]) -> int:
    """The best checkpoint by top-1, ties broken as ``TIE_BREAK`` says."""
    return min(range(len(results)), key=lambda i: (-results[i].correct_top1, -results[i].correct_top5,
                                                   results[i].loss_sum, i))


def paired_test(labels: torch.Tensor, result: EvalResult, best: EvalResult) -> dict:
    """McNemar's exact test of ``result`` against ``best`` on per-sample top-1 correctness."""
    this = result.predictions == labels
    other = best.predictions == labels
    only_this, only_best = int((this & ~other).sum()), int((~this & other).sum())
    return {"only_this_correct": only_this, "only_best_correct": only_best,
            "p_value": mcnemar_exact(only_this, only_best)}


def run_sweep(evaluator, models: list, progress: bool = True) -> tuple[list[EvalResult], list[float]]:
    """Every model through one evaluator (built with the first's weights), in order: ``models[i]`` for
    ``i > 0`` is called for its module (a checkpoint loaded in its turn). The results and the seconds each
    pass took (loading its weights included)."""
    results, seconds = [], []
    for i, load in enumerate(models):
        start = time.perf_counter()
        if i > 0:
            evaluator.load_weights(load())
        results.append(evaluator.run(progress))
        seconds.append(time.perf_counter() - start)
    return results, seconds
