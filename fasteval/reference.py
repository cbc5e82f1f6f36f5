"""The reference evaluator: the plain PyTorch loop every tutorial writes, kept obviously right.

torchvision ImageFolder + transforms + DataLoader + PIL, eager fp32 model in eval mode under
no_grad, ``torch.max(outputs, 1)``, ``nn.CrossEntropyLoss`` and ``torch.topk``. It is the
truth the fast path is validated against, so it takes no shortcut: it syncs every batch.
"""

from __future__ import annotations

import sys
import time
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from .errors import FastevalError
from .metrics import TOPK, EvalResult
from .preprocess import PreprocessSpec, check_batchable
from .samples import SampleList


def load_rgb(path: str):
    """ImageFolder's PIL loader, with an error that names the file."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except Exception as exc:
        raise FastevalError(f"cannot decode image {path}: {exc}") from None


def reference_dataset(samples: SampleList, spec: PreprocessSpec) -> ImageFolder:
    """torchvision's ImageFolder over the dataset, checked against the shared sample list."""
    dataset = ImageFolder(samples.root, transform=spec.torchvision_transform(), loader=load_rgb)
    if dataset.samples != samples.samples or dataset.classes != samples.classes:
        raise FastevalError(f"ImageFolder and fasteval list different samples under {samples.root}")
    return dataset


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
    predicted: torch.Tensor  # on the CPU
    losses: torch.Tensor  # per sample, on the CPU


_CRITERION = nn.CrossEntropyLoss()
_SUM_CRITERION = nn.CrossEntropyLoss(reduction="sum")


def score_batch(outputs: torch.Tensor, labels: torch.Tensor) -> BatchScore:
    """The reference's per-batch metrics: torch.max, torch.topk, nn.CrossEntropyLoss, read back at once."""
    _, predicted = torch.max(outputs, 1)
    top = torch.topk(outputs, min(TOPK, outputs.shape[1]), dim=1).indices
    return BatchScore(
        correct_top1=(predicted == labels).sum().item(),
        correct_top5=(top == labels[:, None]).any(dim=1).sum().item(),
        batch_loss=_CRITERION(outputs, labels).item(),
        loss_sum=_SUM_CRITERION(outputs.double(), labels).item(),
        predicted=predicted.cpu(),
        losses=nn.functional.cross_entropy(outputs, labels, reduction="none").cpu(),
    )


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
    predictions, losses = [], []
    bar = tqdm(total=len(samples), unit="img", desc="reference", file=sys.stderr, disable=not progress)
    start = time.perf_counter()
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            score = score_batch(model(images).float(), labels)
            correct_top1 += score.correct_top1
            correct_top5 += score.correct_top5
            batch_losses.append(score.batch_loss)
            loss_sum += score.loss_sum
            predictions.append(score.predicted)
            losses.append(score.losses)
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
        predictions=torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long),
        losses=torch.cat(losses) if losses else torch.empty(0),
    )
