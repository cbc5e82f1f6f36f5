"""The exact recheck off the critical path: its decoding runs during the fast pass, with the same results.

The serial schedule (exact.py's ``SerialReference``) decodes after the pass: the calibration samples,
then the near-ties. Where the plan overlaps it (exact.py's ``resolve_recheck``: a GPU pass decoding on
the GPU leaves the CPU's cores idle):

1. before the pass, a pool of PIL workers (recheck_pool.py, started once per run, as many as
   exact.recheck_pool_size leaves cores for beside the loader) decodes the calibration samples and the
   reference's fp32 model scores them (calibrate first);
2. during the pass, every ``CHUNK_SAMPLES`` samples the chunk's margins (and the fast logits of any
   calibration sample in it) are copied back with no host sync: a non-blocking copy into pinned memory
   and an event, polled after each batch, never waited on. A chunk whose copy is done gives the logit
   error over the calibration samples seen so far; its samples within ``STREAM_SLACK`` x that running
   tau go to the pool, which decodes them while the pass goes on. Their decoded values wait in this
   process until the pass is over: at most ``STREAM_BYTES`` of them are sent (a sample's size measured on
   the calibration samples), then the watch stops. An infinite estimate (a calibration sample's non-finite
   logit) gates every sample: the budget bounds it too;
3. after the pass, exact.recheck gates with the final tau, as in the serial schedule, and asks this
   object for the reference's logits of the gated samples: batch after batch, in the very batches the serial
   schedule's ``reference_logits`` uses (``recheck_batch``: a sample's fp32 logits depend in their last bits
   on its batch's size) and by its scoring loop (reference.score_images), each batch's values taken from the
   pool (those decoded during the pass, the rest decoded now, ``AHEAD_BATCHES`` batches ahead of the model)
   and dropped once scored; the values of samples sent and not gated are dropped at once. So every value
   written equals the serial schedule's, and the decoded values held are the budget's and a few batches'.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

import torch
from torch import nn

from fasteval.data.dataset import ImageDataset
from fasteval.data.preprocess import PreprocessSpec
from fasteval.data.samples import SampleList
from fasteval.evaluation.exact import max_logit_error, near_tie_tau
from fasteval.evaluation.recheck_pool import DecodePool
from fasteval.evaluation.reference import scattered_batches, score_images
from fasteval.kernels.accumulator import MetricsAccumulator
from fasteval.kernels.fused_metrics import decision_margin

CHUNK_SAMPLES = 1024  # margins copied back per chunk: 4 batches of 256 (about 0.1 s of a 10,000 images/s pass)
# The final tau is known only after the pass (its calibration samples are spread over it): near-ties are sent
# with the running estimate x this. A sample sent and not needed costs an idle core's decode; one missed is
# decoded after the pass. Either way the results are the serial schedule's.
STREAM_SLACK = 2.0
# Decoded values the pass may leave waiting for the model: 2 GiB is 3,500 samples at 224 px (602 KB each in
# fp32), 7 % of ImageNet's validation set; what is gated beyond them is decoded after the pass.
STREAM_BYTES = 2 << 30
AHEAD_BATCHES = 2  # after the pass, batches queued to the pool ahead of the one the model scores


def recheck_batch(count: int, batch_size: int, workers: int, device: torch.device) -> int:
    """The batch size ``reference_logits`` scores ``count`` scattered samples in (its own rule)."""
    return scattered_batches(count, batch_size, workers, device)[1]


class _Done:
    """The event of a copy that has completed (the CPU's copies are synchronous)."""

    @staticmethod
    def query() -> bool:
        return True


def cuda_event():
    """An event recorded on the current stream after the copies just queued."""
    event = torch.cuda.Event()
    event.record()
    return event


@dataclass
class _Chunk:
    start: int  # positions in the pass's order
    end: int
    first: int  # kept calibration rows among them: [first, last)
    last: int
    event: object


class MarginWatch:
    """The pass's per-batch hook (``run_loop``'s ``after_batch``): every ``chunk`` samples, queue the copy of
    their margins and kept calibration logits to the host and an event, with no host sync; chunks whose event
    has passed (polled, never waited on) send their near-ties to ``submit`` as ``(sample index, margin)``, at
    most ``budget`` of them: then it stops. ``ref_calibration``: the reference's logits of the calibration
    samples (``acc``'s kept rows, in order)."""

    def __init__(self, acc: MetricsAccumulator, main: list[int], ref_calibration: torch.Tensor, submit,
                 device: torch.device, event=None, chunk: int | None = None, budget: float = math.inf) -> None:
        self.acc, self.main, self.ref_calibration, self.submit = acc, main, ref_calibration, submit
        self.pin = device.type == "cuda"
        self.event = event or (cuda_event if self.pin else _Done)
        self.chunk = chunk or CHUNK_SAMPLES
        self.keep = sorted(acc.keep_logits)
        self.calibration_positions = set(self.keep)
        self.launched = 0
        self.launches = 0
        self.pending: deque[_Chunk] = deque()  # copies queued, oldest first
        self.waiting: list[_Chunk] = []  # copied back before any calibration sample was: no estimate yet
        self.error: float | None = None  # the largest logit error over the calibration samples seen
        self.host_margins = self.host_kept = None
        self.budget, self.sent = budget, 0
        self.full = False  # the budget spent: nothing more is copied or sent

    def __call__(self) -> None:
        if self.full:
            return
        if self.acc.filled - self.launched >= self.chunk:
            self._launch(self.launched, self.acc.filled)
        while self.pending and self.pending[0].event.query():
            self._take(self.pending.popleft())

    def _launch(self, start: int, end: int) -> None:
        """Queue the copy of positions [start, end)'s margins (and kept logits) to the host."""
        acc = self.acc
        if self.host_margins is None:
            self.host_margins = torch.empty(acc.num_samples, dtype=acc.buffers["margin_top1"].dtype,
                                            pin_memory=self.pin)
            self.host_kept = torch.empty(acc.kept_logits.shape, dtype=acc.kept_logits.dtype, pin_memory=self.pin)
        margins = decision_margin(acc.buffers["margin_top1"][start:end], acc.buffers["margin_topk"][start:end])
        self.host_margins[start:end].copy_(margins, non_blocking=True)
        first, last = bisect.bisect_left(self.keep, start), bisect.bisect_left(self.keep, end)
        if last > first:
            self.host_kept[first:last].copy_(acc.kept_logits[first:last], non_blocking=True)
        self.pending.append(_Chunk(start, end, first, last, self.event()))
        self.launched = end
        self.launches += 1

    def _take(self, chunk: _Chunk) -> None:
        """A chunk copied back: update the running error, send its near-ties (once there is an estimate)."""
        if chunk.last > chunk.first:
            error = max_logit_error(self.host_kept[chunk.first:chunk.last],
                                    self.ref_calibration[chunk.first:chunk.last])
            self.error = error if self.error is None else max(self.error, error)
        self.waiting.append(chunk)
        if self.error is None:
            return
        limit = STREAM_SLACK * near_tie_tau(self.error)
        for c in self.waiting:
            margins = self.host_margins[c.start:c.end]
            near = (margins <= limit).nonzero().flatten().tolist()
            tasks = [(self.main[c.start + p], float(margins[p])) for p in near
                     if c.start + p not in self.calibration_positions]
            if len(tasks) >= self.budget - self.sent:
                tasks, self.full = tasks[:max(0, int(self.budget - self.sent))], True
            self.submit(tasks)
            self.sent += len(tasks)
            if self.full:
                break
        self.waiting.clear()


class OverlappedRecheck:
    """The overlapped schedule for one run: a context manager (the pool's life), ``calibrate()`` before the
    pass, ``watch(acc)`` for the pass's per-batch hook, ``pass_ended()``, then exact.recheck's ``source``.
    ``workers``: ``--workers`` (the serial schedule's batching rule reads it); ``pool``: the PIL worker processes
    that decode during the pass and why (the plan's, from exact.recheck_pool_size)."""

    def __init__(self, samples: SampleList, model: nn.Module, spec: PreprocessSpec, main: list[int],
                 calibration: list[int], *, batch_size: int, workers: int, device: torch.device,
                 pool: tuple[int, str]) -> None:
        start = time.perf_counter()
        self.model, self.device = model, device
        self.main, self.calibration_indices = main, calibration
        self.batch_size, self.workers = batch_size, workers
        self.dataset = ImageDataset(samples, spec.torchvision_transform())  # what reference_logits decodes with
        self.pool_size, self.pool_reason = pool
        self.pool = DecodePool(self.dataset, self.pool_size)
        self.sent: dict[int, float] = {}  # sample index -> margin, sent during the pass
        self.queued: set[int] = set()  # every sample submitted to the pool
        self.sample_bytes = 0  # one decoded sample's, measured on the calibration samples
        self.ref_calibration = torch.empty(0)
        self.stats: dict = {}
        self.pass_end = math.inf
        self.seconds_before = time.perf_counter() - start

    def __enter__(self) -> OverlappedRecheck:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.close()

    def calibrate(self) -> None:
        """The calibration samples through the reference's code, before the pass."""
        start = time.perf_counter()
        self.ref_calibration = self._logits(self.calibration_indices)
        self.seconds_before += time.perf_counter() - start

    @property
    def budget(self) -> int:
        """The samples the pass may send: ``STREAM_BYTES`` of decoded values."""
        return STREAM_BYTES // self.sample_bytes if self.sample_bytes else 0

    def watch(self, acc: MetricsAccumulator) -> MarginWatch:
        """The per-batch hook of ``acc``'s pass (its positions index ``main``)."""
        return MarginWatch(acc, self.main, self.ref_calibration, self._send, self.device, budget=self.budget)

    def _send(self, tasks: list[tuple[int, float]]) -> None:
        self.sent.update(tasks)
        self.queued.update(i for i, _ in tasks)
        self.pool.submit(tasks)

    def pass_ended(self) -> None:
        """The pass is over: its loader's cores are free, so the pool grows to ``--workers`` for the rest."""
        self.pass_end = time.monotonic()
        self.pool.grow(max(self.pool_size, self.workers))

    def calibration(self, indices: list[int]) -> torch.Tensor:
        if indices != self.calibration_indices:
            raise ValueError("the recheck's calibration samples are not those calibrated before the pass")
        return self.ref_calibration

    def near_ties(self, indices: list[int]) -> torch.Tensor:
        """The gated samples' reference logits: the pool stops what is not needed, drops what it decoded and is
        not needed, and decodes what the running estimate missed."""
        needed = set(indices)
        streamed = [i for i in indices if i in self.sent]
        # Every sample sent and not gated has a margin above the final tau, so above every gated one's.
        self.pool.set_limit(max((self.sent[i] for i in streamed), default=-math.inf))
        self.pool.keep_only(needed)
        logits = self._logits(indices)
        done = self.pool.done()
        used = [done[i] for i in streamed if i in done]
        self.stats = {
            "streamed": len(self.sent),
            "streamed_unneeded": len(self.sent) - len(streamed),
            "decoded_after_pass": len(indices) - len(streamed),
            "stream_budget": self.budget,
            "hidden_seconds": sum(d.seconds for d in used if d.finished <= self.pass_end),
            "unneeded_decode_seconds": sum(d.seconds for i, d in done.items() if i in self.sent and i not in needed),
        }
        return logits

    def _logits(self, indices: list[int]) -> torch.Tensor:
        """The reference's fp32 logits of ``indices``, in ``reference_logits``' batches and by its scoring."""
        if not indices:
            return torch.empty(0)
        size = recheck_batch(len(indices), self.batch_size, self.workers, self.device)
        return score_images(self.model, self._batches([indices[s:s + size] for s in range(0, len(indices), size)]),
                            self.device)

    def _batches(self, batches: list[list[int]]) -> Generator[torch.Tensor, None, None]:
        """Each batch's images, stacked as the DataLoader's collate stacks them: decoded by the pool (queued
        ``AHEAD_BATCHES`` ahead where not sent during the pass), taken from it (so dropped there) as the model
        needs them. A sample lost (a worker died) or failed is decoded here, where a failure raises as the
        reference's."""
        for k, batch in enumerate(batches):
            ahead = [i for b in batches[k:k + 1 + AHEAD_BATCHES] for i in b if i not in self.queued]
            self.queued.update(ahead)
            self.pool.submit([(i, -math.inf) for i in ahead])
            done = self.pool.take(batch)
            images = torch.stack([done[i].value if i in done and done[i].value is not None else self.dataset[i][0]
                                  for i in batch])
            self.sample_bytes = self.sample_bytes or images[0].nbytes
            del done
            yield images

    def report(self) -> dict:
        return {"schedule": "during the pass", "calibration_seconds": self.seconds_before,
                "pool_workers": self.pool_size, "pool_reason": self.pool_reason,
                "pool_workers_after_pass": len(self.pool.processes), **self.stats}
