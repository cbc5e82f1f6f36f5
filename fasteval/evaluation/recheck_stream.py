"""The exact recheck off the critical path: its decoding runs during the fast pass, with the same results.

The serial schedule (exact.py's ``SerialReference``) decodes after the pass: the calibration samples,
then the near-ties. Where the plan overlaps it (exact.py's ``resolve_recheck``: a GPU pass decoding on
the GPU leaves the CPU's cores idle):

1. before the pass, a pool of PIL workers (recheck_pool.py, started once per run) decodes the calibration
   samples and the reference's fp32 model scores them (calibrate first);
2. during the pass, every ``CHUNK_SAMPLES`` samples the chunk's margins (and the fast logits of any
   calibration sample in it) are copied back with no host sync: a non-blocking copy into pinned memory
   and an event, polled after each batch, never waited on. A chunk whose copy is done gives the logit
   error over the calibration samples seen so far; its samples within ``STREAM_SLACK`` x that running
   tau go to the pool, which decodes them while the pass goes on;
3. after the pass, exact.recheck gates with the final tau, as in the serial schedule, and asks this
   object for the reference's logits of the gated samples: those decoded during the pass, the few the
   running estimate missed decoded now by the same pool, and the model run in the very batches the serial
   schedule's ``reference_logits`` uses (``recheck_batch``: a sample's fp32 logits depend in their last
   bits on its batch's size), so every value written equals the serial schedule's.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from fasteval.data.dataset import ImageDataset
from fasteval.data.preprocess import PreprocessSpec
from fasteval.data.samples import SampleList
from fasteval.evaluation.exact import SAFETY, max_logit_error
from fasteval.evaluation.recheck_pool import DecodePool
from fasteval.evaluation.reference import scattered_batches
from fasteval.kernels.accumulator import MetricsAccumulator

CHUNK_SAMPLES = 1024  # margins copied back per chunk: 4 batches of 256 (about 0.1 s of a 10,000 images/s pass)
# The final tau is known only after the pass (its calibration samples are spread over it): near-ties are sent
# with the running estimate x this. A sample sent and not needed costs an idle core's decode; one missed is
# decoded after the pass. Either way the results are the serial schedule's.
STREAM_SLACK = 2.0


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
    has passed (polled, never waited on) send their near-ties to ``submit`` as ``(sample index, margin)``.
    ``ref_calibration``: the reference's logits of the calibration samples (``acc``'s kept rows, in order)."""

    def __init__(self, acc: MetricsAccumulator, main: list[int], ref_calibration: torch.Tensor, submit,
                 device: torch.device, event=None, chunk: int | None = None) -> None:
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

    def __call__(self) -> None:
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
        margins = torch.minimum(acc.buffers["margin_top1"][start:end], acc.buffers["margin_topk"][start:end])
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
        limit = STREAM_SLACK * SAFETY * 2 * self.error
        for c in self.waiting:
            margins = self.host_margins[c.start:c.end]
            near = (margins <= limit).nonzero().flatten().tolist()
            self.submit([(self.main[c.start + p], float(margins[p])) for p in near
                         if c.start + p not in self.calibration_positions])
        self.waiting.clear()


class OverlappedRecheck:
    """The overlapped schedule for one run: a context manager (the pool's life), ``calibrate()`` before the
    pass, ``watch(acc)`` for the pass's per-batch hook, ``pass_ended()``, then exact.recheck's ``source``."""

    def __init__(self, samples: SampleList, model: nn.Module, spec: PreprocessSpec, main: list[int],
                 calibration: list[int], *, batch_size: int, workers: int, device: torch.device) -> None:
        start = time.perf_counter()
        self.model, self.device = model, device
        self.main, self.calibration_indices = main, calibration
        self.batch_size, self.workers = batch_size, workers
        self.dataset = ImageDataset(samples, spec.torchvision_transform())  # what reference_logits decodes with
        self.pool = DecodePool(self.dataset, max(1, workers))
        self.sent: dict[int, float] = {}  # sample index -> margin, sent during the pass
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

    def watch(self, acc: MetricsAccumulator) -> MarginWatch:
        """The per-batch hook of ``acc``'s pass (its positions index ``main``)."""
        return MarginWatch(acc, self.main, self.ref_calibration, self._send, self.device)

    def _send(self, tasks: list[tuple[int, float]]) -> None:
        self.sent.update(tasks)
        self.pool.submit(tasks)

    def pass_ended(self) -> None:
        self.pass_end = time.monotonic()

    def calibration(self, indices: list[int]) -> torch.Tensor:
        if indices != self.calibration_indices:
            raise ValueError("the recheck's calibration samples are not those calibrated before the pass")
        return self.ref_calibration

    def near_ties(self, indices: list[int]) -> torch.Tensor:
        """The gated samples' reference logits: the pool stops what is not needed and decodes what the
        running estimate missed."""
        needed = set(indices)
        streamed = [i for i in indices if i in self.sent]
        # Every sample sent and not gated has a margin above the final tau, so above every gated one's.
        self.pool.set_limit(max((self.sent[i] for i in streamed), default=-math.inf))
        logits = self._logits(indices)
        done = self.pool.done()
        used = [done[i] for i in streamed if i in done]
        self.stats = {
            "streamed": len(self.sent),
            "streamed_unneeded": len(self.sent) - len(streamed),
            "decoded_after_pass": len(indices) - len(streamed),
            "hidden_seconds": sum(d.seconds for d in used if d.finished <= self.pass_end),
            "unneeded_decode_seconds": sum(d.seconds for i, d in done.items() if i in self.sent and i not in needed),
        }
        return logits

    def _logits(self, indices: list[int]) -> torch.Tensor:
        """The reference's fp32 logits of ``indices``, decoded by the pool (sent now where not sent before),
        scored in ``reference_logits``'s batches."""
        if not indices:
            return torch.empty(0)
        self.pool.submit([(i, -math.inf) for i in indices if i not in self.sent])
        done = self.pool.wait(indices)
        images = {i: d.value for i, d in done.items() if d.value is not None}
        for i in indices:  # lost (a worker died) or failed: decoded here, where a failure raises as the reference's
            if i not in images:
                images[i] = self.dataset[i][0]
        batch = recheck_batch(len(indices), self.batch_size, self.workers, self.device)
        model = self.model.to(self.device).eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(indices), batch):
                stacked = torch.stack([images[i] for i in indices[start:start + batch]])
                out.append(model(stacked.to(self.device)).float().cpu())
        return torch.cat(out)

    def report(self) -> dict:
        return {"schedule": "during the pass", "calibration_seconds": self.seconds_before, **self.stats}
