"""The fast evaluator: loader -> compiled channels-last mixed-precision model -> fused metrics.

The batch loop reads nothing back to the host: the loader's padding count is a host
integer, the metrics accumulate on the device, and the totals are read once at the end.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from fasteval.devices import synchronize, use_device
from fasteval.errors import first_line
from fasteval.data.batch import Batch
from fasteval.data.loader_torch import PixelLoader
from fasteval.data.loaders import make_loader
from fasteval.data.preprocess import PreprocessSpec
from fasteval.data.samples import SampleList
from fasteval.evaluation.exact import WholeRun, apply_reference, recheck
from fasteval.evaluation.metrics import TOPK, EvalResult, totals_from_samples
from fasteval.evaluation.plan import Decision, FastOptions, Plan, make_plan
from fasteval.evaluation.recheck_stream import OverlappedRecheck
from fasteval.evaluation.reference import reference_logits
from fasteval.evaluation.route import record, relax_setup
from fasteval.kernels.accumulator import MetricsAccumulator
from fasteval.kernels.fused_metrics import decision_margin
from fasteval.model.compile_cache import resolve_compile_mode
from fasteval.model.inference import DTYPES, FastModel


def run_loop(batches: Iterable[Batch], forward, accumulator: MetricsAccumulator, bar=None,
             after_batch: Callable[[], None] | None = None) -> None:
    """The hot loop: no host sync (the loader's ``real`` is a host integer). Eager too, the padded last
    batch runs whole: a sample's logits depend in their last bits on the batch size the kernels see,
    and one batch shape for every sample is what makes a torchrun run equal to one process, bit for bit.
    ``after_batch``: called after each batch's update (the overlapped recheck's watch; it syncs nothing)."""
    for images, labels, real in batches:
        accumulator.update(forward(images), labels, num_real=real)
        if after_batch is not None:
            after_batch()
        if bar is not None:
            bar.update(real)


class FastEvaluator:
    """Follows a plan (fasteval/evaluation/plan.py): builds the loader and the compiled model once; ``run()``
    evaluates (repeatable, for benches and sweeps). It decides nothing: the plan names the samples the
    fast pass reads, those the reference's code evaluates (with ``--exact``, near-ties too:
    fasteval/evaluation/exact.py), the calibration samples, the loader, the batch shape, the precision and
    whether to compile. ``executed_plan`` is the plan as it ran (the compile's outcome, the loader built)."""

    def __init__(self, samples: SampleList, model: torch.nn.Module, spec: PreprocessSpec, device: torch.device,
                 options: FastOptions, batch_source=make_loader, passes: int = 1,
                 scope: WholeRun | None = None, pixels=None, plan: Plan | None = None) -> None:
        """``batch_source``: makes the batches (``make_loader``'s signature); the checkpoint sweep passes
        fasteval/data/decoded.py's store, decoded once for every checkpoint. ``passes``: how many times
        ``run()`` will be called (the sweep's checkpoints). ``scope``: where ``samples`` are one shard of a
        run (fasteval/distributed.py). ``pixels``: ``samples`` decoded since the command started
        (fasteval/data/prefetch.py), used where the plan reads PIL's pixels, else stopped and dropped.
        ``plan``: made here from the rest when not given."""
        start = time.perf_counter()
        self.scope = scope or WholeRun()
        source = "loader" if batch_source is make_loader else "store"
        self.plan = plan = plan or make_plan(
            samples, model, spec, device, options, source=source, passes=passes, scope=self.scope,
            cached=getattr(batch_source, "cache_dir", None) is not None,
            decoded_at_start=pixels is not None and pixels.samples is samples and pixels.spec == spec)
        self.pixels = pixels if plan.decoded_at_start else None
        if pixels is not None and self.pixels is None:
            pixels.stop()
        device = use_device(device)  # work not given a device (Triton, nvJPEG, pinning) runs on it
        self.samples, self.spec, self.device, self.options = samples, spec, device, options
        self.main, self.reference_only = list(plan.main), list(plan.reference_only)
        self.calibration = list(plan.calibration_indices)
        self.metrics_backend = plan.metrics_backend.value
        # The reference's model is the caller's module as it is (eager fp32, NCHW); the fast model is a
        # copy, converted to channels-last with its head kept in fp32, so the caller's module is unchanged.
        self.reference_model = model.to(device).eval() if self.reference_only or plan.exact.value else None
        self.model = self.loader = None
        self.loader_fallback = ""  # why the plan's DALI loader was replaced by torchvision's (_make_loader)
        if self.main:
            fast_model = copy.deepcopy(model)
            precision = plan.precision.value
            self.logits_dtype = torch.float32 if keep_head_fp32(fast_model) or precision == "fp32" else \
                DTYPES[precision]
            compile_value = plan.compile.value
            self.model = FastModel(fast_model, device, precision,
                                   "auto" if compile_value == "measure" else bool(compile_value),
                                   num_samples=len(self.main) * plan.passes, reason=plan.compile.reason,
                                   key=plan.compile_key, eager_call=resolve_compile_mode(options.compile) == "off")
            half = plan.input_dtype == "fp16"  # what the loader writes (DALI: fp16 under bf16 on a GPU)
            shape = plan.batch_shape.value
            # Built in inference mode, so that loaders that preallocate their outputs (DALI) hand out
            # inference tensors, like the warm-up example: one compiled graph serves every batch.
            with torch.inference_mode():
                if plan.in_process:
                    self.loader = PixelLoader(samples, self.main, shape, spec, device, pixels=self.pixels,
                                              workers=options.workers, keep=plan.passes > 1)
                else:
                    part = samples.subset(self.main) if self.reference_only else samples
                    placed = {"placement": plan.store_placement} if plan.store_placement else {}
                    if plan.dali_settings is not None:
                        placed["dali"] = plan.dali_settings
                    self.loader = self._make_loader(batch_source, part, shape, half, placed)
            h, w = plan.input_hw
            with torch.inference_mode():  # an inference tensor, like the loader's: no recompile on the first batch
                example = torch.zeros(shape, 3, h, w, device=device, dtype=torch.float16 if half else torch.float32)
                example = example.contiguous(memory_format=torch.channels_last)
            self.model.warm_up(example)
            self._warm_up_metrics(example)
            self._warm_up_loader()
        self.warmup_seconds = time.perf_counter() - start
        self.executed_plan = self._executed()

    def _make_loader(self, batch_source, part: SampleList, shape: int, half: bool, placed: dict):
        """The plan's loader. Where DALI was chosen by ``--loader auto`` and its pipeline cannot start for a
        reason of its own (not a bad file: fasteval/data/loader_dali.py's DaliStartError), torchvision's
        loader decodes instead, with one warning line and the reason in the executed plan."""
        from fasteval.data.loader_dali import DaliStartError

        def build(kind: str, **extra):
            return batch_source(kind, part, self.spec, batch_size=shape, workers=self.options.workers,
                                device=self.device, half=half, **extra)

        try:
            return build(self.plan.loader_kind, **placed)
        except DaliStartError as exc:
            if self.plan.loader_kind != "dali" or self.options.loader != "auto":
                raise
            self.loader_fallback = f"DALI could not start ({exc}): torchvision's loader decodes instead"
            print(f"fasteval: warning: {self.loader_fallback}", file=sys.stderr)
            return build("torchvision", **{key: value for key, value in placed.items() if key != "dali"})

    def _executed(self) -> Plan:
        """The plan as it ran: the compile's outcome (decided at warm-up where the plan said ``measure``, or
        fallen back to eager), the loader that was built, the metrics backend that runs."""
        plan = self.plan
        if self.model is None:
            return plan
        loader = self.loader.name if self.loader is not None else plan.loader.value
        info = getattr(self.loader, "info", None)
        loader_reason = plan.loader.reason + (f"; {info['reason']}" if info and info.get("reason") else "")
        changes = {}
        if self.loader_fallback:
            loader_reason += f"; {self.loader_fallback}"
            changes["dali"] = Decision(None, f"no DALI pipeline: {self.loader_fallback}")
        backend = plan.metrics_backend if self.metrics_backend == plan.metrics_backend.value else \
            Decision(self.metrics_backend, "the Triton kernel could not run: its PyTorch twin")
        return plan.executed(compile=Decision(self.model.compiled, self.model.compile_reason or plan.compile.reason),
                             loader=Decision(loader, loader_reason), metrics_backend=backend, **changes)

    def load_weights(self, model: nn.Module) -> None:
        """Copy ``model``'s weights (same architecture) into the fast model and the reference's model, in
        place: the compiled graph reads the same tensors, so nothing is recompiled. The fast model's
        state has the same entries in the same order (``keep_head_fp32`` only renames the head's)."""
        source = list(model.state_dict().values())
        targets = [list(self.model.model.state_dict().values())] if self.model is not None else []
        if self.reference_model is not None:
            targets.append(list(self.reference_model.state_dict().values()))
        with torch.no_grad():
            for target in targets:
                if len(target) != len(source) or any(t.shape != s.shape for t, s in zip(target, source)):
                    raise ValueError("load_weights: the model's entries differ from the evaluator's")
                for t, s in zip(target, source):
                    t.copy_(s)

    def _warm_up_metrics(self, example: torch.Tensor) -> None:
        """Run the metrics once on the warm-up logits (Triton compiles and builds its launcher here,
        not in the timed loop); where Triton cannot run, fall back to the PyTorch twin, with one line."""
        with torch.inference_mode():
            logits = torch.zeros(example.shape[0], self.samples.num_classes, dtype=self.logits_dtype,
                                 device=self.device)
            labels = torch.zeros(logits.shape[0], dtype=torch.int64, device=self.device)
            try:
                MetricsAccumulator(logits.shape[0], self.device, topk=TOPK,
                                   backend=self.metrics_backend).update(logits, labels)
                synchronize(self.device)
            except Exception as exc:
                if self.metrics_backend != "triton" or self.options.metrics_backend == "triton":
                    raise
                print(f"fasteval: warning: the Triton metrics kernel cannot run, using its PyTorch twin: "
                      f"{first_line(exc)[:200]}", file=sys.stderr)
                self.metrics_backend = "torch"

    def _warm_up_loader(self) -> None:
        """The loader's own warm-up, where it has one: the GPU-decode loader compiles its resize kernel's variants
        here, not in the timed loop, and where Triton cannot run falls back to its per-size path, with one line
        (its name, in the executed plan, says so)."""
        warm_up = getattr(self.loader, "warm_up", None)
        if warm_up is not None:
            with torch.inference_mode():
                warm_up()

    def _fast_pass(self, outputs: dict[str, torch.Tensor], bar,
                   overlap: OverlappedRecheck | None = None) -> tuple[torch.Tensor | None, int]:
        """The main samples through loader, model and metrics, into the per-sample ``outputs`` (sample
        order); returns the calibration samples' logits and the count of non-finite rows. ``overlap``: the
        recheck that watches the pass (its near-ties decoded while it runs)."""
        if not self.main:
            return None, 0
        position = {index: p for p, index in enumerate(self.main)}
        acc = MetricsAccumulator(len(self.main), self.device, topk=TOPK, backend=self.metrics_backend,
                                 keep_logits=[position[i] for i in self.calibration])
        run_loop(self.loader, self.model, acc, bar, after_batch=overlap.watch(acc) if overlap else None)
        totals = acc.result()  # the one read back of the run
        if overlap is not None:
            overlap.pass_ended()
        at = torch.tensor(self.main)
        for name, key in ACCUMULATED.items():
            outputs[name][at] = totals[key]
        outputs["margins"][at] = decision_margin(totals["margin_top1"], totals["margin_topk"])
        return totals["kept_logits"], totals["nonfinite"]

    def _recheck_overlap(self):
        """The overlapped recheck where the plan says so (its pool, of the plan's size, lives for this run: a
        context manager), else an empty context."""
        plan = self.plan
        if not (plan.recheck_overlap and plan.exact.value and plan.calibration_total and self.main):
            return contextlib.nullcontext()
        return OverlappedRecheck(self.samples, self.reference_model, self.spec, self.main, self.calibration,
                                 batch_size=plan.reference_batch_size, workers=self.options.workers,
                                 device=self.device, pool=plan.recheck_pool)

    def run(self, progress: bool = True) -> EvalResult:
        plan = self.plan
        desc = "reference" if plan.by_reference_only else \
            f"fast ({self.loader.name if self.loader else 'reference decode'})"
        bar = tqdm(total=len(self.samples), unit="img", desc=desc, file=sys.stderr, disable=not progress)
        start = time.perf_counter()
        outputs = empty_outputs(len(self.samples))  # normal tensors: the recheck writes into them
        run = dict(batch_size=plan.reference_batch_size, workers=self.options.workers, device=self.device)
        with self._recheck_overlap() as overlap:
            if overlap is not None:
                overlap.calibrate()  # before the pass: the running tau needs the reference's calibration logits
            pass_start = time.perf_counter()
            with torch.inference_mode():
                kept, nonfinite = self._fast_pass(outputs, bar, overlap)
            pass_seconds = time.perf_counter() - pass_start
            pixels = self.loader.pixels if isinstance(self.loader, PixelLoader) else self.pixels
            if self.reference_only:
                # The whole dataset by the reference's code: its workers too, as the reference's loop has them.
                logits = reference_logits(self.samples, self.reference_only, self.reference_model, self.spec, **run,
                                          always_workers=plan.by_reference_only, pixels=pixels)
                apply_reference(outputs, self.samples, self.reference_only, logits)
                bar.update(len(self.reference_only))
            by_reference = (len(self.reference_only), time.perf_counter() - pass_start - pass_seconds)
            exact = {"enabled": False, "mode": self.options.exact, "reason": plan.exact.reason}
            if plan.by_reference_only:
                exact.update(enabled=True, rechecked=len(self.samples), all_by_reference=True,
                             reason=plan.route.reason)
            elif plan.exact.value and plan.calibration_total:
                exact.update(recheck(self.samples, outputs, self.calibration, kept, self.reference_model, self.spec,
                                     **run, scope=self.scope, pixels=pixels, source=overlap))
                if overlap is None:  # overlapped, its seconds are not the reference's cost of its samples
                    by_reference = (by_reference[0] + exact["rechecked"], by_reference[1] + exact["seconds"])
        seconds = time.perf_counter() - start
        if plan.rates is not None and plan.records_rates:  # this run's costs, for the next run's route
            main = len(self.main)
            if plan.relaxes_setup:  # the measured set-up alone sent it to the reference's code (route.py)
                relax_setup(plan.rates, self.device.type)
            record(plan.rates, self.device, reference=by_reference,
                   fast=(main, pass_seconds) if main else None,
                   setup=None if plan.by_reference_only else self.warmup_seconds,
                   recheck_share=exact["gated"] / main if main and "gated" in exact else None)
        bar.close()
        labels = torch.tensor(self.samples.labels, dtype=torch.int64)
        totals = totals_from_samples(labels, outputs["predictions"], outputs["topk_hits"], outputs["losses"],
                                     plan.reference_batch_size)
        ran = self.executed_plan
        return EvalResult(
            **totals,
            **outputs,
            seconds=seconds,
            warmup_seconds=self.warmup_seconds,
            extra={
                "plan": ran.to_json(),
                "loader": ran.loader.value,
                "loader_reason": ran.loader.reason if self.loader else None,
                "batch_shape": ran.batch_shape.value if self.loader else None,
                "batch_shape_reason": ran.batch_shape.reason if self.loader else None,
                "precision": ran.precision.value,
                "compile": ran.compile.value,
                "compile_reason": ran.compile.reason,
                "metrics_backend": ran.metrics_backend.value,
                "nonfinite_rows": nonfinite,
                "pil_fallback_files": 0 if plan.by_reference_only else len(self.reference_only),
                "exact": exact,
                "route": ran.route.reason,
                **({"decoded": dict(self.loader.info)} if hasattr(self.loader, "info") else {}),
            },
        )


class Fp32Head(nn.Module):
    """A classification head run in float32 under autocast: bf16 logits are rounded to 8 bits of
    mantissa (0.125 at a logit of 20), which alone doubled the fast path's logit error on real photos.
    The head is a sliver of the model's work, so its precision costs nothing measurable."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return self.head(features.float())


def keep_head_fp32(model: nn.Module) -> bool:
    """Wrap the model's last ``nn.Linear`` (torchvision classifiers' head) in ``Fp32Head``, in place;
    False where there is none (a convolutional head, as SqueezeNet's)."""
    name = next((n for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)
    if name is None:
        return False
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, Fp32Head(getattr(parent, child)))
    return True


def empty_outputs(num_samples: int) -> dict[str, torch.Tensor]:
    """Per-sample output buffers in sample order, under EvalResult's names (``PER_SAMPLE_FIELDS``),
    filled by the fast pass and the reference."""
    return {"predictions": torch.zeros(num_samples, dtype=torch.int64), "losses": torch.zeros(num_samples),
            "topk_hits": torch.zeros(num_samples, dtype=torch.bool),
            "topk_classes": torch.full((num_samples, TOPK), -1, dtype=torch.int64),
            "confidences": torch.zeros(num_samples), "margins": torch.zeros(num_samples),
            "rechecked": torch.zeros(num_samples, dtype=torch.bool), "prob_sq_sums": torch.zeros(num_samples)}


# The accumulator's per-sample outputs under EvalResult's names (the margin is derived from two of them).
ACCUMULATED = {"predictions": "pred", "losses": "loss", "topk_hits": "topk_hit", "topk_classes": "topk_idx",
               "confidences": "confidence", "prob_sq_sums": "prob_sq_sum"}


def evaluate_fast(samples: SampleList, model: torch.nn.Module, spec: PreprocessSpec, *,
                  device: torch.device | str = "cpu", options: FastOptions = FastOptions(),
                  progress: bool = True, batch_source=make_loader, scope: WholeRun | None = None,
                  pixels=None) -> EvalResult:
    """Evaluate once with the fast path (``scope``, ``pixels``: see FastEvaluator)."""
    return FastEvaluator(samples, model, spec, torch.device(device), options, batch_source,
                         scope=scope, pixels=pixels).run(progress)
