"""What a user looks at after the headline number: per-class metrics, the confusion matrix,
calibration and intervals, all from a finished run's per-sample outputs.

Everything here is computed from ``EvalResult``'s per-sample tensors (predictions, top-k hits,
confidences, losses, squared-probability sums) and the sample labels, with torch ops that run
on whatever device those tensors are on, once at the end of a run: no second pass over the
logits, nothing per batch. So the figures are the same on the fast path (after the exact-count
recheck, which writes the reference's values into the per-sample outputs), on ``--reference``,
on gathered per-sample outputs of several processes, and per checkpoint.

Conventions (scikit-learn's, with ``zero_division=0``):
- precision of a class never predicted, recall of a class with no samples, and F1 when both
  are 0 are 0; F1 = 2 TP / (samples + predicted), as scikit-learn computes it;
- macro averages are over the classes that have samples or predictions (scikit-learn's default
  ``labels``, ``precision_recall_fscore_support(average="macro")``): every class of a dataset whose
  classes all have samples, and a subset's own where ``--classes`` names more); balanced accuracy is
  the mean recall over the classes that have samples (``balanced_accuracy_score``);
- the expected calibration error is torchmetrics' ``MulticlassCalibrationError(n_bins=15,
  norm="l1")``: bins ``[b_j, b_{j+1})`` on the confidence with ``b = linspace(0, 1, 16)`` in the
  confidences' dtype, so a confidence exactly on an edge falls in the bin above it, and a
  confidence of exactly 1 in a 16th bin of its own; ECE = sum over bins |hits - confidences| / N;
- the Brier score is the multiclass one: the mean over samples of sum_c (p_c - y_c)^2
  = prob_sq_sum - 2 p_label + 1, with p_label = exp(-loss); in [0, 2].
A non-finite confidence or loss (NaN logits) makes the ECE or the Brier score NaN, as it makes
the mean loss NaN. Per-class figures are fractions in [0, 1]; top-1/top-5 intervals are in
percent, like top-1 and top-5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from fasteval.evaluation.metrics import EvalResult
from fasteval.evaluation.stats import CONFIDENCE, percent_interval, wilson_interval

CALIBRATION_BINS = 15
LISTED = 5  # worst classes and most confused pairs in the report

CONVENTIONS = ("precision of a never-predicted class, recall of a class with no samples and F1 when both are 0 "
               "are 0 (scikit-learn's zero_division=0); macro averages over the classes with samples or predictions; balanced accuracy: mean "
               "recall over the classes with samples; ECE: torchmetrics' MulticlassCalibrationError(n_bins=15, "
               "norm='l1'); Brier: mean over samples of sum over classes of (p_c - y_c)^2; per-class figures are "
               "fractions, top-1/top-5 intervals percent (95 % Wilson)")


class Labelled(Protocol):
    """What the class report needs of a sample list (``SampleList`` has both)."""

    labels: Sequence[int]
    classes: Sequence[str]


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts, rows the true class and columns the prediction, on the tensors' device."""
    flat = torch.bincount(labels.long() * num_classes + predictions.long(), minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den in float64, 0 where den is 0 (scikit-learn's zero_division=0)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def calibration_bins(confidences: torch.Tensor, hits: torch.Tensor,
                     bins: int = CALIBRATION_BINS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per bin (``bins + 1`` slots, torchmetrics' bucketing): samples, summed confidences, summed hits,
    float64, over the samples whose confidence is finite."""
    edges = torch.linspace(0, 1, bins + 1, dtype=confidences.dtype, device=confidences.device)
    finite = torch.isfinite(confidences)
    slot = torch.bucketize(torch.where(finite, confidences, 0.0), edges, right=True) - 1
    weight = finite.double()
    count = torch.zeros(bins + 1, dtype=torch.float64, device=confidences.device).index_add_(0, slot, weight)
    conf = torch.zeros_like(count).index_add_(0, slot, torch.where(finite, confidences.double(), 0.0))
    acc = torch.zeros_like(count).index_add_(0, slot, hits.double() * weight)
    return count, conf, acc


def _brier(result: EvalResult) -> torch.Tensor | None:
    """Mean multiclass Brier score (float64, 0-dim), or None where the run has no squared sums."""
    if result.prob_sq_sums is None or result.losses is None:
        return None
    p_label = torch.exp(-result.losses.double())
    return (result.prob_sq_sums.double() - 2.0 * p_label + 1.0).mean()


def class_report(result: EvalResult, samples: Labelled) -> dict:
    """Per-class metrics, confusion matrix, calibration and intervals of a run (JSON-ready).

    ``result`` must hold per-sample predictions, top-k hits and confidences in sample order;
    ``samples`` gives the labels (same order) and class names."""
    predictions = result.predictions
    if predictions is None or result.topk_hits is None or result.confidences is None:
        raise ValueError("the class report needs the run's per-sample predictions, top-k hits and confidences")
    device = predictions.device
    labels = torch.as_tensor(list(samples.labels), dtype=torch.int64, device=device)
    num_classes = len(samples.classes)
    if labels.numel() != predictions.numel():
        raise ValueError(f"{labels.numel()} labels but {predictions.numel()} per-sample predictions")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes
                           or int(predictions.min()) < 0 or int(predictions.max()) >= num_classes):
        raise ValueError(f"labels and predictions must lie in [0, {num_classes})")

    matrix = confusion_matrix(labels, predictions, num_classes)
    per_class_samples = matrix.sum(dim=1)
    predicted = matrix.sum(dim=0)
    tp = matrix.diagonal()
    top5 = torch.zeros(num_classes, dtype=torch.int64, device=device).index_add_(0, labels, result.topk_hits.long())
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, per_class_samples)
    f1 = _ratio(2 * tp, per_class_samples + predicted)
    present = per_class_samples > 0
    seen = present | (predicted > 0)
    balanced = recall[present].mean() if bool(present.any()) else torch.tensor(math.nan)

    hits = predictions == labels
    count, conf_sum, acc_sum = calibration_bins(result.confidences, hits)
    n = labels.numel()
    finite = bool(torch.isfinite(result.confidences).all())
    ece = float((acc_sum - conf_sum).abs().sum() / n) if n and finite else math.nan
    brier = _brier(result)

    # One read back of everything, then plain Python.
    rows = zip(samples.classes, per_class_samples.tolist(), tp.tolist(), top5.tolist(), predicted.tolist(),
               precision.tolist(), recall.tolist(), f1.tolist())
    per_class = []
    for name, m, correct, correct5, pred, p, r, f in rows:
        low, high = wilson_interval(correct, m)
        per_class.append({"class": name, "samples": m, "correct_top1": correct, "correct_top5": correct5,
                          "predicted": pred, "precision": p, "recall": r, "f1": f, "recall_interval": [low, high]})
    cm = matrix.tolist()
    correct1, correct5 = int(hits.sum()), int(result.topk_hits.sum())
    return {
        "per_class": per_class,
        "confusion_matrix": cm,
        "macro": {"precision": float(precision[seen].mean()), "recall": float(recall[seen].mean()),
                  "f1": float(f1[seen].mean())},
        "balanced_accuracy": float(balanced),
        "worst_classes": worst_classes(per_class),
        "confused_pairs": confused_pairs(matrix, samples.classes),
        "calibration": {
            "ece": ece,
            "brier": None if brier is None else float(brier),
            "bins": CALIBRATION_BINS,
            "norm": "l1",
            "nonfinite_confidences": int((~torch.isfinite(result.confidences)).sum()),
            "reliability": _reliability(count.tolist(), conf_sum.tolist(), acc_sum.tolist()),
        },
        "intervals": {"method": "wilson", "confidence": CONFIDENCE,
                      "top1": percent_interval(correct1, n), "top5": percent_interval(correct5, n)},
        "class_metrics_conventions": CONVENTIONS,
    }


def _reliability(count: list[float], conf: list[float], acc: list[float]) -> list[dict]:
    """The reliability diagram's bins: edges, samples, mean confidence and accuracy (None when empty).
    The last slot holds the confidences of exactly 1 (torchmetrics' bucketing)."""
    bins = len(count) - 1
    out = []
    for j, (c, s, a) in enumerate(zip(count, conf, acc)):
        low, high = (j / bins, (j + 1) / bins) if j < bins else (1.0, 1.0)
        out.append({"low": low, "high": high, "samples": int(c),
                    "confidence": s / c if c else None, "accuracy": a / c if c else None})
    return out


def worst_classes(per_class: list[dict], count: int = LISTED) -> list[int]:
    """Indices of the classes with the lowest recall (classes with samples; more samples first among
    equal recalls, then the lower index)."""
    ranked = sorted((i for i, c in enumerate(per_class) if c["samples"]),
                    key=lambda i: (per_class[i]["recall"], -per_class[i]["samples"], i))
    return ranked[:count]


def confused_pairs(matrix: torch.Tensor, classes: Sequence[str], count: int = LISTED) -> list[dict]:
    """The off-diagonal cells of a confusion matrix with the most samples (true class, predicted class,
    count), largest first, ties by (true, predicted) index; cells with no samples are left out."""
    num_classes = matrix.shape[0]
    off = matrix.clone()
    off.fill_diagonal_(0)
    values, order = torch.sort(off.flatten(), descending=True, stable=True)
    pairs = []
    for n, cell in zip(values[:count].tolist(), order[:count].tolist()):
        if n:
            t, p = divmod(cell, num_classes)
            pairs.append({"true": classes[t], "predicted": classes[p], "true_index": t, "predicted_index": p,
                          "count": n})
    return pairs
