"""The fast evaluator: loader -> compiled channels-last mixed-precision model -> fused metrics.

The batch loop reads nothing back to the host: the loader's padding count is a host
integer, the metrics accumulate on the device, and the totals are read once at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from .inference import FastModel, resolve_precision
from .kernels.accumulator import MetricsAccumulator
from .kernels.fused_metrics import resolve_backend
from .loader_torch import TorchvisionLoader
from .loaders import Batch, make_loader, needs_pil, resolve_loader
from .metrics import TOPK, EvalResult
from .preprocess import PreprocessSpec, check_batchable, image_size
from .samples import SampleList


@dataclass(frozen=True)
class FastOptions:
    loader: str = "auto"
    precision: str = "auto"
    compile: bool = True
    batch_size: int = 64
    workers: int = 2
    metrics_backend: str = "auto"


def run_loop(batches: Iterable[Batch], forward, accumulator: MetricsAccumulator, bar=None) -> list[int]:
    """The hot loop: no host sync. Returns the real size of each batch (host integers)."""
    sizes = []
    for images, labels, real in batches:
        accumulator.update(forward(images), labels, num_real=real)
        sizes.append(real)
        if bar is not None:
            bar.update(real)
    return sizes


class FastEvaluator:
    """Builds the loader and the compiled model once; ``run()`` evaluates (repeatable, for benches)."""

    def __init__(self, samples: SampleList, model: torch.nn.Module, spec: PreprocessSpec, device: torch.device,
                 options: FastOptions) -> None:
        start = time.perf_counter()
        # A static batch larger than the dataset would be mostly padding: clamp it.
        options = replace(options, batch_size=min(options.batch_size, len(samples)))
        check_batchable(spec, samples.paths)
        self.samples, self.spec, self.device, self.options = samples, spec, device, options
        self.precision = resolve_precision(options.precision, device)
        half = self.precision == "fp16"
        self.model = FastModel(model, device, self.precision, options.compile)
        kind = resolve_loader(options.loader)
        pil_only = needs_pil(samples) if kind == "dali" else []  # the torchvision loaders decode those with PIL
        pil_set = set(pil_only)
        main = [i for i in range(len(samples)) if i not in pil_set]
        loader_args = dict(batch_size=options.batch_size, workers=options.workers, device=device, half=half)
        # Built in inference mode, so that loaders that preallocate their outputs (DALI) hand out
        # inference tensors, like the warm-up example: one compiled graph serves every batch.
        # Files only PIL decodes as the reference does (16-bit, float) take the PIL loader.
        self.parts: list[tuple[list[int], object]] = []
        with torch.inference_mode():
            if main:
                part = samples if not pil_only else samples.subset(main)
                self.parts.append((main, make_loader(kind, part, spec, **loader_args)))
            if pil_only:
                pil_loader = TorchvisionLoader(samples.subset(pil_only), spec, options.batch_size,
                                               min(options.workers, 2), device, half)
                self.parts.append((pil_only, pil_loader))
        self.loader = self.parts[0][1]
        self.pil_fallback_files = len(pil_only)
        h, w = spec.output_hw(*image_size(samples.paths[0]))
        with torch.inference_mode():  # an inference tensor, like the loader's: no recompile on the first batch
            example = torch.zeros(options.batch_size, 3, h, w, device=device,
                                  dtype=torch.float16 if half else torch.float32)
            example = example.contiguous(memory_format=torch.channels_last)
        self.model.warm_up(example)
        self.warmup_seconds = time.perf_counter() - start

    def _run_parts(self, bar) -> tuple[dict, list[float]]:
        """Each loader's samples through the model; per-sample outputs merged back into sample order."""
        results, batch_losses = [], []
        for indices, loader in self.parts:
            acc = MetricsAccumulator(len(indices), self.device, topk=TOPK, backend=self.options.metrics_backend)
            sizes = run_loop(loader, self.model, acc, bar)
            totals = acc.result()  # the one read back of this part
            batch_losses += [float(c.double().mean()) for c in torch.split(totals["loss"], sizes) if len(c)]
            results.append((indices, totals))
        if len(results) == 1:
            return results[0][1], batch_losses
        merged = {key: sum(totals[key] for _, totals in results)
                  for key in ("correct", "correct_topk", "count", "nonfinite", "loss_sum")}
        for key in ("pred", "loss", "topk_hit"):
            merged[key] = torch.empty(len(self.samples), dtype=results[0][1][key].dtype)
            for indices, totals in results:
                merged[key][torch.tensor(indices)] = totals[key]
        return merged, batch_losses

    def run(self, progress: bool = True) -> EvalResult:
        bar = tqdm(total=len(self.samples), unit="img", desc=f"fast ({self.loader.name})", file=sys.stderr,
                   disable=not progress)
        start = time.perf_counter()
        with torch.inference_mode():
            totals, batch_losses = self._run_parts(bar)
        seconds = time.perf_counter() - start
        bar.close()
        return EvalResult(
            samples=totals["count"],
            correct_top1=totals["correct"],
            correct_top5=totals["correct_topk"],
            loss_sum=totals["loss_sum"],
            batch_losses=batch_losses,
            seconds=seconds,
            predictions=totals["pred"],
            losses=totals["loss"],
            warmup_seconds=self.warmup_seconds,
            extra={
                "loader": self.loader.name,
                "precision": self.precision,
                "compile": self.model.compiled,
                "metrics_backend": resolve_backend(self.options.metrics_backend, self.device),
                "nonfinite_rows": totals["nonfinite"],
                "pil_fallback_files": self.pil_fallback_files,
            },
        )


def evaluate_fast(samples: SampleList, model: torch.nn.Module, spec: PreprocessSpec, *,
                  device: torch.device | str = "cpu", options: FastOptions = FastOptions(),
                  progress: bool = True) -> EvalResult:
    """Evaluate once with the fast path."""
    return FastEvaluator(samples, model, spec, torch.device(device), options).run(progress)
