"""The exact-count recheck: the fast path's top-1 and top-5 counts made equal to the reference's.

A mixed-precision, compiled run with DALI's pixels gives logits within some error e of the
reference's fp32 logits. A prediction or a top-k hit can only differ where its decision
margin (kernels/fused_metrics.py) is below 2e. So, after the fast pass:

1. calibration: a few samples spread over the dataset go through the reference's own code
   (PIL, the torchvision transform, the eager fp32 model); e = the largest logit difference
   from the fast logits kept for them during the pass;
2. tau = SAFETY x 2e: a measured bound with a safety multiple, not a proof;
3. every sample whose margin is <= tau goes through the reference's code as well, batched;
4. those samples (and the calibration samples) take the reference's prediction, top-k hit,
   classes, fp32 loss, confidence and squared-probability sum; the counts are then recomputed
   from the per-sample values.

Non-finite logits have no error bound: their margin is 0 (always rechecked), and a non-finite
difference on a calibration sample makes tau infinite (every sample is rechecked).

Where the reference's logits come from is the schedule's (``resolve_recheck``, a plan decision): after the
pass (``SerialReference``, this module), or decoded during it (fasteval/evaluation/recheck_stream.py); the
gate, tau and every value written are this module's in both, so the two give the same results.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from fasteval.choices import EXACT_MODES
from fasteval.errors import FastevalError
from fasteval.data.preprocess import PreprocessSpec
from fasteval.evaluation.reference import per_sample, reference_logits, score_batch
from fasteval.data.samples import SampleList
from fasteval.procs import usable_cores

CALIBRATION_SAMPLES = 8  # reference-evaluated samples that measure the fast path's logit error
SAFETY = 3.0  # tau = SAFETY x the largest change of a logit difference seen (2 x the logit error)


def resolve_exact(mode: str) -> tuple[bool, str]:
    """Whether the recheck runs, and why. ``auto`` is on whenever the fast path is not the reference's
    own arithmetic, which it never is (channels-last and compiled kernels, mixed precision, DALI's pixels
    differ from the reference's in the last bits), so ``auto`` is ``on``; ``off`` keeps the fast values."""
    if mode not in EXACT_MODES:
        raise FastevalError(f"unknown --exact {mode!r}; choose from {', '.join(EXACT_MODES)}")
    if mode == "off":
        return False, "--exact off: counts are the fast path's own"
    return True, "the fast path's arithmetic differs from the reference's: near-ties are rechecked"


RECHECK_SCHEDULES = ("auto", "overlap", "after")  # when the recheck decodes: see resolve_recheck
# The overlapped schedule, in the plan's words (the plan adds the pool's size: recheck_pool_size's)
DURING = "near-ties decoded during the pass by PIL worker processes"


def resolve_recheck(asked: str, *, device_type: str, cpu_decoding: bool, pass_pixels: bool, sharded: bool,
                    workers: int) -> tuple[bool, str]:
    """Whether the recheck's decoding overlaps the fast pass (fasteval/evaluation/recheck_stream.py), and why.
    ``auto`` overlaps where the cores are idle during the pass: a GPU pass whose loader decodes on the GPU
    (not the CPU's PIL: ``cpu_decoding``), with worker processes to decode in, in one process. ``overlap``
    forces it (the same results; tests and measurements on the CPU), except where the recheck reads the pixels
    the pass decoded (``pass_pixels``), which the serial schedule reuses; ``after`` never. How many workers
    decode is ``recheck_pool_size``'s, from the loader's threads."""
    if asked not in RECHECK_SCHEDULES:
        raise FastevalError(f"unknown recheck schedule {asked!r}; choose from {', '.join(RECHECK_SCHEDULES)}")
    after = "after the pass"
    if pass_pixels:
        return False, f"{after}: it reads the pixels decoded for the pass"
    if asked != "auto":
        return asked == "overlap", f"{DURING} (asked)" if asked == "overlap" else f"{after} (asked)"
    if device_type != "cuda":
        return False, f"{after}: on the {device_type.upper()} the cores are the model's"
    if cpu_decoding:
        return False, f"{after}: the loader decodes with PIL on the CPU's cores"
    if sharded:
        return False, f"{after}: torchrun's ranks share the host's cores"
    if workers < 1:
        return False, f"{after}: --workers 0 leaves no worker process to decode in"
    return True, f"{DURING}, on the cores the GPU's decoding leaves idle; the model scores them after it"


# The cores torchvision's nvJPEG loader keeps busy during a GPU pass: its decode-ahead thread, and its DataLoader
# workers, which only read file bytes into pinned memory (about one core between them at the GPU's pace).
GPU_DECODE_CORES = 2


def recheck_pool_size(workers: int, loader_threads: int, cores: int | None = None) -> tuple[int, str]:
    """How many PIL worker processes decode the overlapped recheck during the pass, and why: ``workers``
    (``--workers``), at most the ``cores`` (usable) left by the loader's ``loader_threads`` (DALI's decoding
    threads, or ``GPU_DECODE_CORES`` for the nvJPEG loader) and the main thread that feeds the GPU; at least 1.
    Beside DALI, which takes all usable cores but two, that is one worker; after the pass the pool grows to
    ``--workers`` (fasteval/evaluation/recheck_stream.py)."""
    cores = usable_cores() if cores is None else cores
    left = cores - loader_threads - 1
    size = max(1, min(workers, left))
    return size, (f"{size} PIL worker process(es): {cores} usable core(s) less the loader's {loader_threads} and "
                  f"the main thread's 1 leave {max(left, 0)}; --workers {workers}")


def near_tie_tau(error: float) -> float:
    """The gate: margins at most this are rechecked, given the largest logit error seen (module docstring)."""
    return SAFETY * 2 * error


def calibration_positions(num_samples: int, count: int = CALIBRATION_SAMPLES) -> list[int]:
    """``count`` sample indices spread evenly over the dataset (every class region, first and last)."""
    if num_samples <= count:
        return list(range(num_samples))
    return sorted({round(i * (num_samples - 1) / (count - 1)) for i in range(count)})


class WholeRun:
    """The run is this one evaluator's samples (one process). A sharded run (fasteval/distributed.py)
    overrides these, so that each shard makes the one-process decisions over the whole dataset."""

    sharded = False

    def total(self, local: int) -> int:
        """The whole run's sample count, given this evaluator's."""
        return local

    def calibration(self, main: list[int]) -> tuple[list[int], int]:
        """The calibration samples among ``main`` (the fast-decoded samples, in order), and the whole run's count."""
        picked = [main[p] for p in calibration_positions(len(main))]
        return picked, len(picked)

    def max_error(self, error: float) -> float:
        """The whole run's largest logit error, given this evaluator's."""
        return error


def max_logit_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest |fast - reference| over all logits; inf where one side is not finite and they differ."""
    same = (fast == reference) | (torch.isnan(fast) & torch.isnan(reference))
    diff = torch.where(same, 0.0, (fast.double() - reference.double()).abs())
    diff = torch.where(torch.isnan(diff), math.inf, diff)
    return float(diff.max()) if diff.numel() else 0.0


def apply_reference(outputs: dict[str, torch.Tensor], samples: SampleList, indices: list[int],
                    logits: torch.Tensor):
    """Write the reference's per-sample values (``score_batch`` on its ``logits`` of the samples at
    ``indices``) into ``outputs`` in place, marking them rechecked; returns the score."""
    score = score_batch(logits, torch.tensor(samples.labels)[indices])
    for name, values in per_sample([score]).items():
        outputs[name][indices] = values
    outputs["rechecked"][indices] = True
    return score


class SerialReference:
    """The reference's logits computed when the recheck asks, after the pass: ``reference_logits``."""

    seconds_before = 0.0  # nothing ran before the pass

    def __init__(self, samples: SampleList, model: nn.Module, spec: PreprocessSpec, *, batch_size: int,
                 workers: int, device: torch.device, pixels=None) -> None:
        self.samples, self.model, self.spec = samples, model, spec
        self.run = dict(batch_size=batch_size, workers=workers, device=device, pixels=pixels)

    def calibration(self, indices: list[int]) -> torch.Tensor:
        return reference_logits(self.samples, indices, self.model, self.spec, **self.run)

    def near_ties(self, indices: list[int]) -> torch.Tensor:
        return reference_logits(self.samples, indices, self.model, self.spec, **self.run)

    def report(self) -> dict:
        return {"schedule": "after the pass"}


def recheck(samples: SampleList, outputs: dict[str, torch.Tensor], calibration: list[int],
            calibration_logits: torch.Tensor | None, model: nn.Module, spec: PreprocessSpec, *, batch_size: int,
            workers: int, device: torch.device, scope: WholeRun = WholeRun(), pixels=None, source=None) -> dict:
    """Replace, in place, the fast per-sample ``outputs`` (sample order, CPU) of the calibration and
    near-tie samples by the reference's. ``calibration_logits`` are the fast logits of the
    ``calibration`` samples, kept during the pass. ``scope`` turns this evaluator's logit error into
    the whole run's (a shard may hold no calibration sample). ``pixels``: the samples decoded at start-up
    (``reference_logits``). ``source``: where the reference's logits come from (``calibration(indices)``,
    ``near_ties(indices)``, ``report()``, ``seconds_before``); ``SerialReference`` when not given. Returns the
    report of the recheck; its ``seconds`` are those on the critical path (before the pass and after it)."""
    start = time.perf_counter()
    source = source or SerialReference(samples, model, spec, batch_size=batch_size, workers=workers, device=device,
                                       pixels=pixels)
    ref_calibration = source.calibration(calibration)
    error = scope.max_error(max_logit_error(calibration_logits, ref_calibration) if calibration else 0.0)
    tau = near_tie_tau(error)
    more = near_tie_indices(outputs, calibration, tau)
    ref_more = source.near_ties(more)  # torch.empty(0) for no sample
    indices = calibration + more
    before = {key: outputs[key][indices] for key in ("predictions", "topk_hits", "losses")}  # copies
    after = before  # nothing to recheck on this shard
    if indices:
        ref_logits = torch.cat([logits for logits in (ref_calibration, ref_more) if len(logits)])
        score = apply_reference(outputs, samples, indices, ref_logits)
        after = {"predictions": score.predicted, "topk_hits": score.topk_hits, "losses": score.losses}
    loss_error = (before["losses"][:len(calibration)].double() - after["losses"][:len(calibration)].double())
    report = {
        "enabled": True,
        "tau": tau,
        "safety": SAFETY,
        "calibration_samples": len(calibration),
        "max_logit_error": error,
        "gated": len(more),
        "rechecked": len(indices),
        "changed_top1": int((before["predictions"] != after["predictions"]).sum()),
        "changed_top5": int((before["topk_hits"] != after["topk_hits"]).sum()),
        "calibration_loss_error_mean": float(loss_error.mean()) if len(loss_error) else 0.0,
        "calibration_loss_error_max": float(loss_error.abs().max()) if len(loss_error) else 0.0,
        **source.report(),
        "seconds": source.seconds_before + time.perf_counter() - start,
    }
    return report


def near_tie_indices(outputs: dict[str, torch.Tensor], calibration: list[int], tau: float) -> list[int]:
    """The samples the recheck gates, in sample order: margin <= ``tau``, not yet by the reference's code,
    not a calibration sample."""
    gated = (outputs["margins"] <= tau) & ~outputs["rechecked"]
    gated[calibration] = False
    return gated.nonzero().flatten().tolist()


_SUMMED = ("calibration_samples", "gated", "rechecked", "changed_top1", "changed_top5")


def merge_reports(reports: list[dict]) -> dict:
    """One report of the recheck from the reports of shards of one run (same tau, each shard's own samples):
    counts summed, the calibration loss error's mean weighted by each shard's calibration samples, its
    maximum and the seconds the largest."""
    merged = dict(reports[0])
    for key in _SUMMED:
        if key in merged:
            merged[key] = sum(r.get(key, 0) for r in reports)
    if "calibration_loss_error_mean" in merged:
        n = merged["calibration_samples"]
        merged["calibration_loss_error_mean"] = sum(r["calibration_loss_error_mean"] * r["calibration_samples"]
                                                    for r in reports) / n if n else 0.0
        merged["calibration_loss_error_max"] = max(r["calibration_loss_error_max"] for r in reports)
    if "seconds" in merged:
        merged["seconds"] = max(r["seconds"] for r in reports)
    return merged
