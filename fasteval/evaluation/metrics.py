"""Metric definitions: what top-1, top-5 and the mean loss of a run are, in one place.

Counts are exact integers; the loss is the sum of per-sample cross-entropies (float64)
divided by the number of samples. The "mean of per-batch means" that tutorial loops
print is kept beside it, because it differs whenever the last batch is short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

TOPK = 5
# EvalResult's per-sample tensors, in sample order: whatever gathers, slices or stores a run's
# per-sample outputs (shards, checkpoints, files) iterates over this one list.
PER_SAMPLE_FIELDS = ("predictions", "losses", "topk_hits", "topk_classes", "confidences", "margins", "rechecked",
                     "prob_sq_sums")


@dataclass
class EvalResult:
    """Everything one evaluation run measured."""

    samples: int
    correct_top1: int
    correct_top5: int
    loss_sum: float
    batch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    predictions: torch.Tensor | None = None  # per sample, in sample order, on the CPU (like the rest)
    losses: torch.Tensor | None = None
    warmup_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    topk_hits: torch.Tensor | None = None
    topk_classes: torch.Tensor | None = None  # [N, TOPK]; -1 where there are fewer classes
    confidences: torch.Tensor | None = None
    margins: torch.Tensor | None = None  # the decision margin: min(top-1 margin, top-k boundary margin)
    rechecked: torch.Tensor | None = None  # bool: values computed by the reference's own code
    prob_sq_sums: torch.Tensor | None = None  # sum over classes of the squared softmax probabilities (Brier)

    def per_sample(self) -> dict[str, torch.Tensor]:
        """The per-sample tensors this run holds, by field name (those left None are omitted)."""
        return {name: getattr(self, name) for name in PER_SAMPLE_FIELDS if getattr(self, name) is not None}

    @property
    def top1(self) -> float:
        """Top-1 accuracy in percent (micro: hits over samples)."""
        return 100.0 * self.correct_top1 / self.samples if self.samples else math.nan

    @property
    def top5(self) -> float:
        """Top-5 accuracy in percent; with fewer than 5 classes, every class is in the top 5."""
        return 100.0 * self.correct_top5 / self.samples if self.samples else math.nan

    @property
    def loss(self) -> float:
        """Mean cross-entropy per sample."""
        return self.loss_sum / self.samples if self.samples else math.nan

    @property
    def loss_batch_mean(self) -> float:
        """Mean of per-batch mean losses, as tutorial loops report it (biased by a short last batch)."""
        return sum(self.batch_losses) / len(self.batch_losses) if self.batch_losses else math.nan

    @property
    def images_per_sec(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "correct_top1": self.correct_top1,
            "correct_top5": self.correct_top5,
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "loss_sum": self.loss_sum,
            "loss_batch_mean": self.loss_batch_mean,
            "loss_batch_mean_differs": batch_mean_differs(self),
            "images_per_sec": self.images_per_sec,
            "seconds": self.seconds,
            "warmup_seconds": self.warmup_seconds,
            **self.extra,
        }


def totals_from_samples(labels: torch.Tensor, predictions: torch.Tensor, topk_hits: torch.Tensor,
                        losses: torch.Tensor, batch_size: int) -> dict:
    """Counts, float64 loss sum and the tutorial's per-batch means, from per-sample outputs in
    sample order: the batch means use the reference's batch boundaries, whoever computed each sample."""
    return {
        "samples": int(labels.numel()),
        "correct_top1": int((predictions == labels).sum()),
        "correct_top5": int(topk_hits.sum()),
        "loss_sum": float(losses.double().sum()),
        "batch_losses": batch_means(losses, batch_size),
    }


def batch_means(losses: torch.Tensor, batch_size: int) -> list[float]:
    """The tutorial's per-batch mean losses: ``losses`` cut into batches of ``batch_size`` in their order."""
    return [float(chunk.double().mean()) for chunk in torch.split(losses, batch_size)]


def batch_mean_differs(result: EvalResult) -> bool:
    """True when the mean of batch means is not the per-sample mean (beyond float rounding)."""
    a, b = result.loss, result.loss_batch_mean
    if math.isnan(a) or math.isnan(b):
        return False
    return abs(a - b) > 1e-6 * max(1.0, abs(a))
