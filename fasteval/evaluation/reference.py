"""The reference evaluator: the plain PyTorch loop every tutorial writes, kept obviously right.

torchvision ImageFolder + transforms + DataLoader + PIL, eager fp32 model in eval mode under
no_grad, ``torch.max(outputs, 1)``, ``nn.CrossEntropyLoss`` and ``torch.topk``. It is the
truth the fast path is validated against, so it takes no shortcut: it syncs every batch.
"""

from __future__ import annotations

import math

import sys
import time
from collections.abc import Generator
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from fasteval.errors import FastevalError
from fasteval.procs import dataloader_batches
from fasteval.kernels.fused_metrics import decision_margin, metrics_torch
from fasteval.evaluation.metrics import TOPK, EvalResult
from fasteval.data.dataset import ImageDataset
from fasteval.data.pixels import load_rgb
from fasteval.data.preprocess import PreprocessSpec, check_batchable
from fasteval.data.samples import SampleList


def reference_dataset(samples: SampleList, spec: PreprocessSpec) -> Dataset:
    """torchvision's ImageFolder over the dataset (its labels mapped to the model's classes where ``--classes``
    names them), checked against the shared sample list; where that
    list is one contiguous block of ImageFolder's (a distributed rank's shard), the Subset of that block.
    A CSV list or tar shards have no tree for ImageFolder: the list itself, decoded as ImageFolder decodes."""
    if samples.layout != "folder":
        return ImageDataset(samples, spec.torchvision_transform())
    dataset = ImageFolder(samples.root, transform=spec.torchvision_transform(), loader=load_rgb)
    listed = dataset.samples
    if dataset.classes != samples.classes and set(dataset.classes) <= set(samples.classes):
        # --classes: the model's class names, DATA's folders among them; relabelled as a tutorial's loop over a
        # subset does, by ImageFolder's target_transform
        relabel = [samples.class_to_idx[name] for name in dataset.classes]
        dataset.target_transform = relabel.__getitem__
        listed = [(path, relabel[label]) for path, label in listed]
    block = _block(listed, samples.samples) if set(dataset.classes) <= set(samples.classes) else None
    if block is None:
        raise FastevalError(f"ImageFolder and fasteval list different samples under {samples.root}")
    return dataset if len(block) == len(dataset) else Subset(dataset, block)


def _block(full: list, part: list) -> range | None:
    """The indices of ``part`` in ``full`` where it is one contiguous block of it, else None."""
    try:
        start = full.index(part[0]) if part else 0
    except ValueError:
        return None
    return range(start, start + len(part)) if full[start:start + len(part)] == part else None


REFERENCE_SETTINGS = {"loader": "torchvision DataLoader + PIL", "precision": "fp32", "compile": False}


def reference_loader(samples: SampleList, spec: PreprocessSpec, batch_size: int, workers: int,
                     device: torch.device) -> DataLoader:
    """The tutorial's DataLoader over ImageFolder, in sample order."""
    return DataLoader(reference_dataset(samples, spec), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda")


class BatchScore(NamedTuple):
    correct_top1: int
    correct_top5: int
    batch_loss: float  # nn.CrossEntropyLoss's mean over the batch, as tutorials print it
    loss_sum: float  # float64 sum of the per-sample losses
    predicted: torch.Tensor  # per sample, on the CPU, like every field below
    losses: torch.Tensor
    topk_hits: torch.Tensor  # bool: the label is among torch.topk's classes
    topk_classes: torch.Tensor  # [B, 5] torch.topk's classes; -1 where there are fewer than 5
    confidences: torch.Tensor  # softmax probability of the largest logit
    margins: torch.Tensor  # the decision margin (fasteval's definition, kernels/fused_metrics.py)
    prob_sq_sums: torch.Tensor  # sum over classes of the squared softmax probabilities (the Brier score's)


_CRITERION = nn.CrossEntropyLoss()
_SUM_CRITERION = nn.CrossEntropyLoss(reduction="sum")


def score_batch(outputs: torch.Tensor, labels: torch.Tensor) -> BatchScore:
    """The reference's per-batch metrics: torch.max, torch.topk, nn.CrossEntropyLoss, read back at once.

    The confidence and the decision margin (reported per sample, not part of any metric) come
    from the kernel's PyTorch twin, the one definition of them."""
    _, predicted = torch.max(outputs, 1)
    top = torch.topk(outputs, min(TOPK, outputs.shape[1]), dim=1).indices
    hits = (top == labels[:, None]).any(dim=1)
    twin = metrics_torch(outputs, labels, topk=TOPK)
    missing = TOPK - top.shape[1]
    return BatchScore(
        correct_top1=(predicted == labels).sum().item(),
        correct_top5=hits.sum().item(),
        batch_loss=_CRITERION(outputs, labels).item(),
        loss_sum=_SUM_CRITERION(outputs.double(), labels).item(),
        predicted=predicted.cpu(),
        losses=nn.functional.cross_entropy(outputs, labels, reduction="none").cpu(),
        topk_hits=hits.cpu(),
        topk_classes=nn.functional.pad(top, (0, missing), value=-1).cpu(),
        confidences=twin.confidence.cpu(),
        margins=decision_margin(twin.margin_top1, twin.margin_topk).cpu(),
        prob_sq_sums=torch.softmax(outputs, 1).pow(2).sum(1).cpu(),
    )


# Samples per worker from which the reference's code decodes in worker processes (a worker's start-up
# costs about what decoding a few images does).
PARALLEL_FROM = 4


def scattered_batches(count: int, batch_size: int, workers: int, device: torch.device,
                      always_workers: bool = False) -> tuple[bool, int]:
    """How ``reference_logits`` decodes ``count`` samples: in workers or not, and its batch size (the rule in its
    docstring); the recheck's streamed schedule scores in the same batches (fasteval/evaluation/recheck_stream.py)."""
    if always_workers:
        return True, batch_size
    if device.type == "cpu":
        return count > batch_size, batch_size
    parallel = workers > 0 and count >= PARALLEL_FROM * workers
    return parallel, min(batch_size, math.ceil(count / workers)) if parallel else batch_size


def reference_logits(samples: SampleList, indices: list[int], model: nn.Module, spec: PreprocessSpec, *,
                     batch_size: int, workers: int, device: torch.device, always_workers: bool = False,
                     pixels=None) -> torch.Tensor:
    """Float32 logits of the samples at ``indices`` (on the CPU, in that order), computed by the
    reference's own code: PIL decode, the torchvision transform, the eager fp32 model.

    With the model on a GPU, decoding the recheck's few scattered samples one after another in this
    process bounded it (14.5 ms a sample against the reference loop's 1.5 ms with 16 workers, H200
    machine, 2026-11-28): there, from ``PARALLEL_FROM`` samples per worker up, workers decode them, in
    batches split so every worker gets a share. With the model on the CPU the cores are the model's:
    workers only for more than a batch (their start-up cost the photo tree's recheck 0.5 s more here).
    ``always_workers``: the reference's own loop (its batch size, its workers). ``pixels``: the
    samples' pixels as the reference's transform makes them before ``ToTensor``, decoded at start-up
    (fasteval/data/prefetch.py): the transform's remaining steps and the model, in this process."""
    if not indices:
        return torch.empty(0)
    if pixels is not None:
        return _logits_from_pixels(pixels, indices, model, spec, batch_size, device)
    parallel, batch = scattered_batches(len(indices), batch_size, workers, device, always_workers)
    loader = DataLoader(ImageDataset(samples.subset(indices), spec.torchvision_transform()), batch_size=batch,
                        shuffle=False, num_workers=workers if parallel else 0, pin_memory=device.type == "cuda")
    return score_images(model, (images for images, _ in dataloader_batches(loader)), device)


def score_images(model: nn.Module, batches: Generator[torch.Tensor, None, None], device: torch.device) -> torch.Tensor:
    """The reference's float32 logits of ``batches`` of images, concatenated on the CPU: the eager model in eval
    mode on ``device``, under no_grad, a batch at a time. The recheck's streamed schedule scores with it too
    (fasteval/evaluation/recheck_stream.py), so that its values are ``reference_logits``'. ``batches`` (a
    generator) is closed however the loop ends: a DataLoader's workers end with it, not with an error's
    traceback."""
    model = model.to(device).eval()
    out = []
    try:
        with torch.no_grad():
            for images in batches:
                out.append(model(images.to(device)).float().cpu())
    finally:
        batches.close()
    return torch.cat(out)


def _logits_from_pixels(pixels, indices: list[int], model: nn.Module, spec: PreprocessSpec, batch_size: int,
                        device: torch.device) -> torch.Tensor:
    """``reference_logits`` from decoded pixels: ToTensor + Normalize per sample, stacked as the
    DataLoader's collate stacks them, the eager fp32 model."""
    from torchvision import transforms as T

    transform = T.Compose(spec.tensor_steps())
    batches = (torch.stack([transform(pixels.get(i)) for i in indices[start:start + batch_size]])
               for start in range(0, len(indices), batch_size))
    return score_images(model, batches, device)


def evaluate_reference(
    samples: SampleList,
    model: nn.Module,
    spec: PreprocessSpec,
    *,
    batch_size: int = 64,
    workers: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on ``samples`` the plain way; per-sample predictions and losses are kept."""
    device = torch.device(device)
    check_batchable(spec, samples.paths)
    loader = reference_loader(samples, spec, batch_size, workers, device)
    model = model.to(device).eval()
    correct_top1 = correct_top5 = seen = 0
    loss_sum = 0.0
    batch_losses: list[float] = []
    scores: list[BatchScore] = []
    bar = tqdm(total=len(samples), unit="img", desc="reference", file=sys.stderr, disable=not progress)
    start = time.perf_counter()
    with torch.no_grad():
        for images, labels in dataloader_batches(loader):
            images, labels = images.to(device), labels.to(device)
            score = score_batch(model(images).float(), labels)
            correct_top1 += score.correct_top1
            correct_top5 += score.correct_top5
            batch_losses.append(score.batch_loss)
            loss_sum += score.loss_sum
            scores.append(score)
            seen += labels.shape[0]
            bar.update(labels.shape[0])
    seconds = time.perf_counter() - start
    bar.close()
    return EvalResult(
        samples=seen,
        correct_top1=int(correct_top1),
        correct_top5=int(correct_top5),
        loss_sum=float(loss_sum),
        batch_losses=batch_losses,
        seconds=seconds,
        **per_sample(scores),
    )


def per_sample(scores: list[BatchScore]) -> dict[str, torch.Tensor]:
    """The per-sample fields of batch scores, concatenated, under EvalResult's names (typed empty tensors
    for no batch: a distributed rank with no samples)."""
    fields = {"predictions": "predicted", "losses": "losses", "topk_hits": "topk_hits",
              "topk_classes": "topk_classes", "confidences": "confidences", "margins": "margins",
              "prob_sq_sums": "prob_sq_sums"}
    if not scores:
        return {"predictions": torch.empty(0, dtype=torch.int64), "losses": torch.empty(0),
                "topk_hits": torch.empty(0, dtype=torch.bool), "topk_classes": torch.empty((0, TOPK), dtype=torch.int64),
                "confidences": torch.empty(0), "margins": torch.empty(0), "prob_sq_sums": torch.empty(0)}
    return {name: torch.cat([getattr(s, field) for s in scores]) for name, field in fields.items()}
