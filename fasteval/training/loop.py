"""The epoch loop: train on shuffled, augmented batches; validate through the fast evaluator.

Training metrics are exact and read once per epoch: the fused metrics' accumulator takes the
detached training-mode logits of every batch on the device (no ``.item()``, no host sync in the
batch loop), and gives at the epoch's end the per-sample mean loss, the exact top-1 count and the
per-sample losses from which the tutorial's mean of per-batch means is computed beside it.
Validation runs the one ``FastEvaluator`` built at the start (loader, fast model, warm-up) on the
live weights, copied in place, so nothing is rebuilt or recompiled; its counts are exact as in
``fasteval eval`` (the recheck).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fasteval.data.dataset import ImageDataset
from fasteval.data.loader_torch import to_device
from fasteval.data.preprocess import PreprocessSpec
from fasteval.data.samples import SampleList
from fasteval.evaluation.fast import FastEvaluator, FastOptions
from fasteval.evaluation.plan import Plan, make_plan
from fasteval.evaluation.metrics import TOPK, EvalResult, batch_means
from fasteval.kernels.accumulator import MetricsAccumulator
from fasteval.kernels.fused_metrics import resolve_backend
from fasteval.memory import check_train_memory
from fasteval.model.inference import DTYPES
from fasteval.model.models import check_input_fits
from fasteval.procs import dataloader_batches
from fasteval.training import state
from fasteval.training.data import epoch_loader
from fasteval.training.history import best_epoch, epoch_record, format_epoch, write_history
from fasteval.training.recipe import (Recipe, check_last_batch, optimizer_and_scheduler, train_transform,
                                      training_model)


@dataclass(frozen=True)
class RunOptions:
    """How the run executes (not part of the recipe): device, precision, loaders, output folder."""

    out: str
    device: torch.device
    precision: str = "fp32"  # "fp32" or "bf16": the training forward's autocast, and validation's
    loader: str = "auto"
    compile: str = "auto"
    exact: str = "auto"
    workers: int = 2
    progress: bool = True


class Trainer:
    """One training run: the model, optimizer, scheduler and history, fresh or from ``last.pt``."""

    def __init__(self, train_samples: SampleList, val_samples: SampleList, spec: PreprocessSpec, recipe: Recipe,
                 options: RunOptions, resume: dict | None = None) -> None:
        self.train_samples, self.val_samples, self.spec = train_samples, val_samples, spec
        self.recipe, self.options, self.device = recipe, options, options.device
        torch.manual_seed(recipe.seed)  # the random head (and a random init) are the seed's
        weights = None if resume is not None else recipe.weights
        self.model = training_model(recipe.arch, weights, train_samples.num_classes).to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer, self.scheduler = optimizer_and_scheduler(self.model, recipe)
        self.history: list[dict] = []
        self.start_epoch = 0
        if resume is not None:
            self.model.load_state_dict(resume["model_state_dict"])
            self.optimizer.load_state_dict(resume["optimizer_state_dict"])
            _match_layouts(self.optimizer)
            self.scheduler.load_state_dict(resume["scheduler_state_dict"])
            self.history, self.start_epoch = list(resume["history"]), int(resume["epoch"])
            state.set_rng_state(resume["rng"])
        first_hw = _first_size(val_samples)
        crop_hw = spec.output_hw(*first_hw)
        # Before any work, as eval checks them: memory first (the input-size check may run one real forward).
        check_train_memory(self.model, recipe.arch, spec, first_hw, min(recipe.batch_size, len(train_samples)),
                           min(recipe.val_batch_size, len(val_samples)), options.workers, self.device)
        check_input_fits(self.model, recipe.arch, spec, crop_hw)
        check_last_batch(self.model, recipe.arch, len(train_samples), recipe.batch_size, crop_hw)
        self.dataset = ImageDataset(train_samples, train_transform(spec, crop_hw))
        self.metrics_backend = resolve_backend("auto", self.device)
        self.evaluator: FastEvaluator | None = None
        self.validation: dict = {}  # how the last validation ran (loader, precision, compile, exact counts)

    def _validation_options(self) -> tuple[FastOptions, int]:
        """The validation's fast-path options and its number of passes: one per remaining epoch (so that
        ``--compile auto`` weighs all of them against one compile)."""
        o = self.options
        fast = FastOptions(loader=o.loader, precision=o.precision, compile=o.compile,
                           batch_size=self.recipe.val_batch_size, workers=o.workers, exact=o.exact)
        return fast, max(1, self.recipe.epochs - self.start_epoch)

    def validation_plan(self) -> Plan:
        """The plan every epoch's validation follows (``train --explain`` prints it)."""
        fast, passes = self._validation_options()
        return make_plan(self.val_samples, self.model, self.spec, self.device, fast, passes=passes)

    def build_evaluator(self) -> FastEvaluator:
        """The validation evaluator, built once, on a copy of the model (its reference model is that copy
        itself, switched to eval mode: the training model's mode is never touched)."""
        fast, passes = self._validation_options()
        self.evaluator = FastEvaluator(self.val_samples, copy.deepcopy(self.model).eval(), self.spec, self.device,
                                       fast, passes=passes)
        return self.evaluator

    def _autocast(self):
        if self.options.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.options.precision])

    def batches(self, epoch: int):
        """Host batches (images, labels) of one epoch, in its seeded order and augmentation."""
        return epoch_loader(self.dataset, self.recipe.batch_size, self.options.workers, self.recipe.seed, epoch,
                            self.device)

    def train_epoch(self, epoch: int) -> EvalResult:
        """One pass over the training set; the metrics are read back once, after the last batch."""
        acc = MetricsAccumulator(len(self.train_samples), self.device, topk=TOPK, backend=self.metrics_backend,
                                 per_sample=("loss",))  # the batch means need the losses; nothing else is read
        bar = tqdm(total=len(self.train_samples), unit="img", desc=f"train {epoch}", file=sys.stderr,
                   disable=not self.options.progress)
        self.model.train()
        start = time.perf_counter()
        self.train_steps(self.batches(epoch), acc, bar)
        totals = acc.result()  # the epoch's one read back
        bar.close()
        # In arrival (shuffled) order: the batch means come from them; they are not kept as sample-order outputs.
        losses = totals["loss"]
        return EvalResult(samples=totals["count"], correct_top1=totals["correct"], correct_top5=totals["correct_topk"],
                          loss_sum=totals["loss_sum"], seconds=time.perf_counter() - start,
                          batch_losses=batch_means(losses, self.recipe.batch_size))

    def train_steps(self, batches, acc: MetricsAccumulator, bar=None) -> None:
        """The hot loop: forward under autocast, backward, step, metrics into the accumulator; nothing
        is read back to the host (tests/test_train.py checks it in CUDA's sync-debug mode)."""
        for images, labels in dataloader_batches(batches):  # its workers end with an error too
            images = to_device(images, self.device).contiguous(memory_format=torch.channels_last)
            labels = to_device(labels, self.device)
            with self._autocast():
                logits = self.model(images)
            logits = logits.float()  # one fp32 copy for the loss and the metrics (defined on logits.float())
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            acc.update(logits.detach(), labels)
            if bar is not None:
                bar.update(labels.shape[0])

    def validate(self) -> EvalResult:
        """The fast evaluator on the live weights."""
        evaluator = self.evaluator or self.build_evaluator()
        evaluator.load_weights(self.model)  # in place: the compiled graph is reused as it is
        result = evaluator.run(progress=self.options.progress)
        self.validation = {k: result.extra.get(k) for k in ("plan", "loader", "precision", "compile",
                                                             "compile_reason", "metrics_backend", "exact")}
        return result

    def run(self) -> list[dict]:
        """Train from the epoch after ``start_epoch`` to ``recipe.epochs``; each finished epoch's files are
        written before the next starts. Returns the whole history."""
        if self.evaluator is None:
            self.build_evaluator()
        for epoch in range(self.start_epoch + 1, self.recipe.epochs + 1):
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            train = self.train_epoch(epoch)
            self.scheduler.step()
            val = self.validate()
            record = epoch_record(epoch, train, val, lr, time.perf_counter() - start)
            self.history.append(record)
            best = best_epoch(self.history)  # ties go to the earlier epoch
            with state.signals_held():
                self.write_epoch(epoch, val, best["epoch"])
            print(format_epoch(record, self.recipe.epochs), flush=True)
        return self.history

    def write_epoch(self, epoch: int, val: EvalResult, best: int) -> None:
        """best.pt (and the best epoch's per-sample predictions and class report) when this epoch is the
        new best, then last.pt, history.json and the curves."""
        from fasteval.evaluation.classes import class_report
        from fasteval.output.curves import plot_curves
        from fasteval.output.report import write_json, write_predictions

        out = self.options.out
        ckpt = state.checkpoint(self.model, self.optimizer, self.scheduler, epoch, self.recipe.to_dict(),
                                self.train_samples.classes, self.history, self.spec)
        if best == epoch:  # the weights and what they are; the optimizer's state (2x the model's size) is last.pt's
            state.save({k: v for k, v in ckpt.items() if k not in state.RESUME_ONLY}, os.path.join(out, state.BEST))
            write_predictions(os.path.join(out, state.PREDICTIONS), self.val_samples, val)
            write_json({"epoch": epoch, **class_report(val, self.val_samples)}, os.path.join(out, state.CLASSES))
        state.save(ckpt, os.path.join(out, state.LAST))
        write_history(self.history, os.path.join(out, state.HISTORY))
        try:
            plot_curves(self.history, os.path.join(out, state.CURVES), best)
        except ImportError:  # matplotlib is an optional extra: the curves are skipped, said once
            if epoch == self.start_epoch + 1:
                print("fasteval: warning: no matplotlib, so no curves.png (pip install 'fasteval[plot]')",
                      file=sys.stderr)


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Loaded optimizer state in its parameters' layout (channels-last): elementwise updates mixing
    layouts give the same values but take slow paths."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.dim() == 4 and \
                        p.is_contiguous(memory_format=torch.channels_last):
                    optimizer.state[p][key] = value.contiguous(memory_format=torch.channels_last)


def _first_size(samples: SampleList) -> tuple[int, int]:
    from fasteval.data.preprocess import image_size

    return image_size(samples.paths[0])
