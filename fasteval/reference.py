"""The reference evaluator: the plain PyTorch loop every tutorial writes, kept obviously right.

torchvision ImageFolder + transforms + DataLoader + PIL, eager fp32 model in eval mode under
no_grad, ``torch.max(outputs, 1)``, ``nn.CrossEntropyLoss`` and ``torch.topk``. It is the
truth the fast path is validated against, so it takes no shortcut: it syncs every batch.
"""

from __future__ import annotations

import sys
import time

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
    loader = DataLoader(
        reference_dataset(samples, spec),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    model = model.to(device).eval()
    criterion = nn.CrossEntropyLoss()
    sum_criterion = nn.CrossEntropyLoss(reduction="sum")
    correct_top1 = correct_top5 = seen = 0
    loss_sum = 0.0
    batch_losses: list[float] = []
    predictions, losses = [], []
    bar = tqdm(total=len(samples), unit="img", desc="reference", file=sys.stderr, disable=not progress)
    start = time.perf_counter()
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            outputs = model(images).float()
            _, predicted = torch.max(outputs, 1)
            k = min(TOPK, outputs.shape[1])
            top = torch.topk(outputs, k, dim=1).indices
            correct_top1 += (predicted == labels).sum().item()
            correct_top5 += (top == labels[:, None]).any(dim=1).sum().item()
            batch_losses.append(criterion(outputs, labels).item())
            loss_sum += sum_criterion(outputs.double(), labels).item()
            predictions.append(predicted.cpu())
            losses.append(nn.functional.cross_entropy(outputs, labels, reduction="none").cpu())
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
