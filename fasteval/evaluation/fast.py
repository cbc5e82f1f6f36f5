"""The fast evaluator: loader -> compiled channels-last mixed-precision model -> fused metrics.

The batch loop reads nothing back to the host: the loader's padding count is a host
integer, the metrics accumulate on the device, and the totals are read once at the end.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm import tqdm

from fasteval.devices import synchronize, use_device
from fasteval.errors import first_line
from fasteval.evaluation.exact import CALIBRATION_SAMPLES, WholeRun, apply_reference, recheck, resolve_exact
from fasteval.model.inference import DTYPES, FastModel, resolve_precision
from fasteval.kernels.accumulator import MetricsAccumulator
from fasteval.kernels.fused_metrics import resolve_backend
from fasteval.data.loader_torch import PixelLoader
from fasteval.data.prefetch import MAX_SAMPLES, reads_pil_pixels
from fasteval.data.loaders import Batch, batch_shape, batch_shape_reason, make_loader, needs_pil, resolve_loader
from fasteval.evaluation.metrics import TOPK, EvalResult, totals_from_samples
from fasteval.data.preprocess import PreprocessSpec, check_batchable, image_size
from fasteval.data.probe import check_headers
from fasteval.evaluation.reference import reference_logits
from fasteval.evaluation.route import Rates, Route, choose_route, load_rates, rates_key, record
from fasteval.model.compile_cache import resolve_compile_mode
from fasteval.data.samples import SampleList


@dataclass(frozen=True)
class FastOptions:
    loader: str = "auto"
    precision: str = "auto"
    compile: bool | str = True  # True/"on", False/"off", or "auto" (fasteval/model/compile_cache.py)
    batch_size: int = 64
    workers: int = 2
    metrics_backend: str = "auto"
    exact: str = "auto"
    # Let the measured costs send a run the fast path would not pay for through the reference's code
    # whole (fasteval/evaluation/route.py). The command sets it; callers timing the fast loop do not.
    route: bool = False


# With --exact on, datasets this small go through the reference's code whole: every sample would be a
# calibration sample, so the fast pass (and its setup: loader, warm-up) would be spent for nothing.
SMALL_DATASET = CALIBRATION_SAMPLES


def run_loop(batches: Iterable[Batch], forward, accumulator: MetricsAccumulator, bar=None) -> None:
    """The hot loop: no host sync (the loader's ``real`` is a host integer). Eager too, the padded last
    batch runs whole: a sample's logits depend in their last bits on the batch size the kernels see,
    and one batch shape for every sample is what makes a torchrun run equal to one process, bit for bit."""
    for images, labels, real in batches:
        accumulator.update(forward(images), labels, num_real=real)
        if bar is not None:
            bar.update(real)


class FastEvaluator:
    """Builds the loader and the compiled model once; ``run()`` evaluates (repeatable, for benches).

    Samples the fast loader would decode differently from the reference (``needs_pil``) are
    evaluated by the reference's own code, batched, at a cost in proportion to their number.
    With ``--exact`` on (the default), near-tie samples are rechecked the same way (fasteval/evaluation/exact.py).
    ``scope``: where ``samples`` are one shard of a run (fasteval/distributed.py), the run-wide decisions
    (static batch, small-dataset rule, calibration, tau) are the one-process ones over the whole run.
    """

    def __init__(self, samples: SampleList, model: torch.nn.Module, spec: PreprocessSpec, device: torch.device,
                 options: FastOptions, batch_source=make_loader, passes: int = 1,
                 scope: WholeRun | None = None, pixels=None) -> None:
        """``batch_source``: makes the batches (``make_loader``'s signature); the checkpoint sweep passes
        fasteval/data/decoded.py's store, decoded once for every checkpoint. ``passes``: how many times
        ``run()`` will be called (the sweep's checkpoints), for ``--compile auto``'s decision.
        A small run on the CPU (``prefetch.reads_pil_pixels``) reads the reference's
        own pixels (``PixelLoader``), not DALI's; ``pixels``: ``samples`` decoded so since the command
        started (fasteval/data/prefetch.py), else stopped and dropped."""
        start = time.perf_counter()
        self.passes = passes
        self.scope = scope or WholeRun()
        total = self.scope.total(len(samples))
        check_batchable(spec, samples.paths)
        check_headers(samples)  # a bad file fails here, in seconds, not after the fast pass (cached per file)
        self.input_hw = spec.output_hw(*image_size(samples.paths[0])) if len(samples) else None
        # The whole run's size, so that every torchrun rank decides as one process does. A sweep's decoded
        # store (another batch_source) holds the PIL loader's pixels then: the same bytes.
        self.pil_pixels = reads_pil_pixels(device.type, options.loader, total, self.input_hw)
        in_process = self.pil_pixels and batch_source is make_loader
        self.pixels = pixels if in_process and pixels is not None and pixels.samples is samples else None
        if pixels is not None and self.pixels is None:
            pixels.stop()
        how = ("decoded while torch imported" if self.pixels is not None else
               "decoded between the model's batches" if in_process else "decoded into the store")
        self.loader_reason = (f"{total} image(s) on the CPU (at most {MAX_SAMPLES}): PIL's pixels, the reference's, "
                              f"{how}; DALI's import and set-up would not pay") if self.pil_pixels else None
        # A static batch larger than the dataset would be mostly padding: clamp it (to the whole run's
        # size, so that every shard runs the one-process batch shape). ``options.batch_size`` stays the
        # reference's (its batch means, the recheck's batches); the fast pass runs ``batch_shape``.
        asked, options = options.batch_size, replace(options, batch_size=min(options.batch_size, total))
        shape_of = dict(device_type=device.type, input_hw=self.input_hw)
        self.batch_shape = batch_shape(total, options.batch_size, **shape_of)
        self.batch_shape_reason = batch_shape_reason(total, asked, self.batch_shape, **shape_of)
        device = use_device(device)  # work not given a device (Triton, nvJPEG, pinning) runs on it
        self.samples, self.spec, self.device, self.options = samples, spec, device, options
        self.exact, self.exact_reason = resolve_exact(options.exact)
        self.precision = resolve_precision(options.precision, device)
        half = self.precision == "fp16"
        # The torchvision loaders decode with PIL already; DALI hands those files to the reference.
        pil = needs_pil(samples) if options.loader in ("auto", "dali") and not self.pil_pixels else []
        self.rates, self.route = self._route(model, len(pil))
        # A sweep's costs are not a single run's (its setup decodes every image into a store, its passes read
        # the store): only a single pass through a loader records rates for later routes.
        self.records_rates = passes == 1 and batch_source is make_loader
        self.all_by_reference = (self.exact and total <= SMALL_DATASET) or (self.route is not None and not self.route.fast)
        if self.all_by_reference:  # the reference's code alone is exact, and here the quicker way
            self.reference_only = list(range(len(samples)))
        elif self.pil_pixels:
            self.reference_only = []
        else:  # DALI is imported only when the fast path runs
            self.reference_only = pil if resolve_loader(options.loader) == "dali" else []
        kind = "torchvision" if self.pil_pixels else options.loader
        excluded = set(self.reference_only)
        self.main = [i for i in range(len(samples)) if i not in excluded]
        # The reference's model is the caller's module as it is (eager fp32, NCHW); the fast model is a
        # copy, converted to channels-last with its head kept in fp32, so the caller's module is unchanged.
        self.reference_model = model.to(device).eval() if self.reference_only or self.exact else None
        self.model = None
        if self.main:
            fast_model = copy.deepcopy(model)
            self.logits_dtype = torch.float32 if keep_head_fp32(fast_model) or self.precision == "fp32" else \
                DTYPES[self.precision]
            self.model = FastModel(fast_model, device, self.precision, options.compile,
                                   num_samples=len(self.main) * passes)
        self.calibration, self.calibration_total = self.scope.calibration(self.main) if self.exact else ([], 0)
        self.loader = None
        self.metrics_backend = resolve_backend(options.metrics_backend, device)
        if self.main:
            part = samples if not excluded else samples.subset(self.main)
            # Built in inference mode, so that loaders that preallocate their outputs (DALI) hand out
            # inference tensors, like the warm-up example: one compiled graph serves every batch.
            with torch.inference_mode():
                if in_process:
                    self.loader = PixelLoader(samples, self.main, self.batch_shape, spec, device,
                                              pixels=self.pixels, workers=options.workers, keep=passes > 1)
                else:
                    self.loader = batch_source(kind, part, spec, batch_size=self.batch_shape,
                                              workers=options.workers, device=device, half=half)
            h, w = self.input_hw
            with torch.inference_mode():  # an inference tensor, like the loader's: no recompile on the first batch
                example = torch.zeros(self.batch_shape, 3, h, w, device=device,
                                      dtype=torch.float16 if half else torch.float32)
                example = example.contiguous(memory_format=torch.channels_last)
            self.model.warm_up(example)
            self._warm_up_metrics(example)
        self.warmup_seconds = time.perf_counter() - start

    def _route(self, model: torch.nn.Module, pil_files: int) -> tuple[Rates | None, Route | None]:
        """With ``options.route`` and ``--compile auto`` (where fasteval weighs every cost of the fast path):
        this configuration's measured rates and the route chosen from them (None, None: no route, the fast
        path). ``--compile on``/``off`` ask for the fast path itself."""
        if (not self.options.route or resolve_compile_mode(self.options.compile) != "auto" or not len(self.samples)
                or self.scope.sharded):  # every rank must take the same route: torchrun runs the fast path
            return None, None
        rates = load_rates(self.device, rates_key(model, self.device, self.precision, self.input_hw,
                                                  decoded_at_start=self.pixels is not None))
        return rates, choose_route(rates, self.device.type, len(self.samples), pil_files,
                                   min(CALIBRATION_SAMPLES, len(self.samples)), self.exact, passes=self.passes)

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

    def _fast_pass(self, outputs: dict[str, torch.Tensor], bar) -> tuple[torch.Tensor | None, int]:
        """The main samples through loader, model and metrics, into the per-sample ``outputs`` (sample
        order); returns the calibration samples' logits and the count of non-finite rows."""
        if not self.main:
            return None, 0
        position = {index: p for p, index in enumerate(self.main)}
        acc = MetricsAccumulator(len(self.main), self.device, topk=TOPK, backend=self.metrics_backend,
                                 keep_logits=[position[i] for i in self.calibration])
        run_loop(self.loader, self.model, acc, bar)
        totals = acc.result()  # the one read back of the run
        at = torch.tensor(self.main)
        for name, key in ACCUMULATED.items():
            outputs[name][at] = totals[key]
        outputs["margins"][at] = torch.minimum(totals["margin_top1"], totals["margin_topk"])
        return totals["kept_logits"], totals["nonfinite"]

    def run(self, progress: bool = True) -> EvalResult:
        desc = f"fast ({self.loader.name if self.loader else 'reference decode'})"
        bar = tqdm(total=len(self.samples), unit="img", desc=desc, file=sys.stderr, disable=not progress)
        start = time.perf_counter()
        outputs = empty_outputs(len(self.samples))  # normal tensors: the recheck writes into them
        with torch.inference_mode():
            kept, nonfinite = self._fast_pass(outputs, bar)
        pass_seconds = time.perf_counter() - start
        run = dict(batch_size=self.options.batch_size, workers=self.options.workers, device=self.device)
        pixels = self.loader.pixels if isinstance(self.loader, PixelLoader) else self.pixels
        if self.reference_only:
            # The whole dataset by the reference's code: its workers too, as the reference's loop has them.
            logits = reference_logits(self.samples, self.reference_only, self.reference_model, self.spec, **run,
                                      always_workers=self.all_by_reference, pixels=pixels)
            apply_reference(outputs, self.samples, self.reference_only, logits)
            bar.update(len(self.reference_only))
        by_reference = (len(self.reference_only), time.perf_counter() - start - pass_seconds)
        exact = {"enabled": False, "mode": self.options.exact, "reason": self.exact_reason}
        if self.all_by_reference:
            routed = self.route is not None and not self.route.fast
            reason = self.route.reason if routed else (f"{self.scope.total(len(self.samples))} samples (<= "
                                                       f"{SMALL_DATASET}, the calibration's size): every sample "
                                                       f"evaluated by the reference's code")
            exact.update(enabled=True, rechecked=len(self.samples), all_by_reference=True, reason=reason)
        elif self.exact and self.calibration_total:
            exact.update(recheck(self.samples, outputs, self.calibration, kept, self.reference_model, self.spec,
                                 **run, scope=self.scope, pixels=pixels))
            by_reference = (by_reference[0] + exact["rechecked"], by_reference[1] + exact["seconds"])
        seconds = time.perf_counter() - start
        if self.rates is not None and self.records_rates:  # this run's costs, for the next run's route
            main = len(self.main)
            record(self.rates, self.device, reference=by_reference,
                   fast=(main, pass_seconds) if main else None,
                   setup=None if self.all_by_reference else self.warmup_seconds,
                   recheck_share=exact["gated"] / main if main and "gated" in exact else None)
        bar.close()
        labels = torch.tensor(self.samples.labels, dtype=torch.int64)
        totals = totals_from_samples(labels, outputs["predictions"], outputs["topk_hits"], outputs["losses"],
                                     self.options.batch_size)
        return EvalResult(
            **totals,
            **outputs,
            seconds=seconds,
            warmup_seconds=self.warmup_seconds,
            extra={
                "loader": self.loader.name if self.loader else "none",
                "loader_reason": self.loader_reason if self.loader else None,
                "batch_shape": self.batch_shape if self.loader else None,
                "batch_shape_reason": self.batch_shape_reason if self.loader else None,
                "precision": self.precision,
                "compile": self.model.compiled if self.model else False,
                "compile_reason": self.model.compile_reason if self.model else "no fast pass",
                "metrics_backend": self.metrics_backend,
                "nonfinite_rows": nonfinite,
                "pil_fallback_files": 0 if self.all_by_reference else len(self.reference_only),
                "exact": exact,
                "route": self.route.reason if self.route else None,
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
