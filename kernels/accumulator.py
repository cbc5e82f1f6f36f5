"""A device-side accumulator of fused metrics over a whole run: no host sync until ``result()``.

It keeps the running counts and loss sum, and every per-sample output of the fused metrics
(predictions, losses, top-k hits and classes, confidences, decision margins, squared-probability
sums) for the whole
dataset, on the logits' device. Batches may be padded to a static shape: rows past
``num_real`` are marked ignored, so padding never counts.
"""

from __future__ import annotations

import bisect

import torch

from .fused_metrics import fused_metrics, raise_on_bad_labels

_CORRECT, _CORRECT_TOPK, _COUNT, _BAD, _NONFINITE = range(5)
# BatchMetrics fields kept per sample; ``result()`` returns them under these names.
PER_SAMPLE = ("pred", "loss", "topk_hit", "topk_idx", "confidence", "margin_top1", "margin_topk", "prob_sq_sum")


class MetricsAccumulator:
    """Running totals and per-sample buffers for ``num_samples`` samples, in arrival order.

    ``update`` never reads a value back to the host, on any device; bad labels are counted
    and raised by ``result()``. ``keep_logits`` lists sample positions (arrival order) whose
    float32 logit rows are copied aside on the device (``kept_logits``, in sorted position
    order), e.g. to compare them with another run. ``per_sample``: the per-sample outputs kept (all
    of ``PER_SAMPLE`` by default; a training epoch needs only the losses).
    """

    def __init__(self, num_samples: int, device: torch.device | str, *, topk: int = 5,
                 ignore_index: int = -100, backend: str = "auto", keep_logits: list[int] = (),
                 per_sample: tuple[str, ...] = PER_SAMPLE) -> None:
        self.num_samples = num_samples
        self.per_sample = per_sample  # the per-sample outputs kept (a subset of PER_SAMPLE)
        self.topk = topk
        self.ignore_index = ignore_index
        self.backend = backend
        self.num_classes: int | None = None
        self.device = torch.device(device)
        self.buffers: dict[str, torch.Tensor] = {}  # per-sample outputs, allocated by the first batch
        self.keep_logits = sorted(keep_logits)
        self.kept_logits: torch.Tensor | None = None
        self.counts = torch.zeros(5, dtype=torch.int64, device=self.device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.filled = 0  # a host integer: how many samples have been written

    def update(self, logits: torch.Tensor, labels: torch.Tensor, num_real: int | None = None) -> None:
        """Add a batch whose first ``num_real`` rows are real samples (default: all rows)."""
        n = logits.shape[0] if num_real is None else num_real
        if not 0 <= n <= logits.shape[0]:
            raise ValueError(f"num_real={n} outside [0, {logits.shape[0]}]")
        if self.filled + n > self.num_samples:
            raise ValueError(f"more samples than the {self.num_samples} announced")
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
        if n < labels.shape[0]:
            labels = labels.clone()
            labels[n:] = self.ignore_index
        m = fused_metrics(logits, labels, topk=self.topk, ignore_index=self.ignore_index, backend=self.backend,
                          check_labels=False)
        if not self.buffers:
            self.buffers = {name: torch.empty((self.num_samples, *getattr(m, name).shape[1:]),
                                              dtype=getattr(m, name).dtype, device=self.device)
                            for name in self.per_sample}
            self.kept_logits = torch.empty((len(self.keep_logits), logits.shape[1]), device=self.device)
        window = slice(self.filled, self.filled + n)
        for name in self.per_sample:
            self.buffers[name][window] = getattr(m, name)[:n]
        first = bisect.bisect_left(self.keep_logits, self.filled)
        last = bisect.bisect_left(self.keep_logits, self.filled + n)
        for slot in range(first, last):  # host-side positions, device-side row copies: no sync
            self.kept_logits[slot] = logits[self.keep_logits[slot] - self.filled]
        self.counts += torch.stack([m.correct, m.correct_topk, m.count, m.bad_labels, m.nonfinite])
        self.loss_sum += m.loss_sum
        self.filled += n

    def result(self) -> dict:
        """Read everything back once; raises ValueError for bad labels or missing samples."""
        counts = self.counts.cpu().tolist()
        raise_on_bad_labels(counts[_BAD], self.num_classes or 0)
        if self.filled != self.num_samples:
            raise ValueError(f"{self.filled} samples were evaluated but {self.num_samples} were announced")
        return {
            "correct": counts[_CORRECT],
            "correct_topk": counts[_CORRECT_TOPK],
            "count": counts[_COUNT],
            "nonfinite": counts[_NONFINITE],
            "loss_sum": float(self.loss_sum.cpu()),
            **{name: buffer.cpu() for name, buffer in self.buffers.items()},
            "kept_logits": None if self.kept_logits is None else self.kept_logits.cpu(),
        }
