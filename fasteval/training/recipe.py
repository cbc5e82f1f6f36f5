"""The fine-tuning recipe: its defaults, the training transforms and the model with its replaced head.

The defaults are the classic Fruits-360 fine-tuning script's: ResNet-18 with its head replaced by
``nn.Sequential(nn.Linear(features, classes))``, AdamW, ``StepLR(step_size=4, gamma=0.6)``, batch 32
(shuffled) for training and 16 for validation, 2 DataLoader workers, and its augmentation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from fasteval.data.preprocess import PreprocessSpec
from fasteval.errors import FastevalError


@dataclass(frozen=True)
class Recipe:
    """Every value of the training recipe (each one a ``fasteval train`` flag)."""

    arch: str = "resnet18"
    weights: str | None = None
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-2  # AdamW's own default
    batch_size: int = 32
    val_batch_size: int = 16
    step_size: int = 4
    gamma: float = 0.6
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


SCALE = (0.64, 1.0)
RATIO = (0.75, 1.33)
BRIGHTNESS, CONTRAST, SATURATION = (0.7, 1.3), (0.8, 1.2), (0.9, 1.1)
ROTATION = 20


def train_transform(spec: PreprocessSpec, crop_hw: tuple[int, int]):
    """The recipe's augmentation (torchvision v1 transforms): Resize(spec.resize), RandomResizedCrop to
    the validation input size ``crop_hw``, flip, colour jitter, rotation, then the spec's normalisation."""
    from torchvision import transforms as T

    mode = getattr(T.InterpolationMode, spec.interpolation.upper())
    return T.Compose([
        T.Resize(spec.resize, interpolation=mode, antialias=spec.antialias),
        T.RandomResizedCrop(crop_hw, scale=SCALE, ratio=RATIO, interpolation=mode, antialias=spec.antialias),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST, saturation=SATURATION),
        T.RandomRotation(ROTATION),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def training_model(arch: str, weights: str | None, num_classes: int) -> nn.Module:
    """``arch`` from ``weights`` (a checkpoint, ``DEFAULT`` or None: random init), its classification
    head replaced by the recipe's ``nn.Sequential(nn.Linear(features, num_classes))``. A head that
    already has ``num_classes`` outputs keeps its weights inside the Sequential."""
    from fasteval.model.models import build_model, head_name

    model = build_model(arch, weights, num_classes if weights is None else None)
    name = head_name(arch)
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise FastevalError(f"--arch {arch}: its head {name!r} is not a Linear layer; fasteval train replaces "
                            f"Linear heads only")
    if head.out_features != num_classes:
        head = nn.Linear(head.in_features, num_classes)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Sequential(head))
    return model


def check_last_batch(model: nn.Module, arch: str, num_samples: int, batch_size: int, hw: tuple[int, int]) -> None:
    """Refuse, before any work, a training set whose last batch holds one sample where the model cannot
    train on one (BatchNorm needs more than one value per channel: a 1x1 feature map at small inputs).
    Checked on the meta device: shapes only, the model's own tensors untouched."""
    if (num_samples % batch_size or batch_size) != 1:  # the last batch's size
        return
    from torch.func import functional_call

    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    was_training = model.training
    model.train()
    try:
        functional_call(model, meta, (torch.zeros(1, 3, *hw, device="meta"),))
    except ValueError as exc:
        raise FastevalError(f"the last training batch would hold 1 sample ({num_samples} samples, --batch-size "
                            f"{batch_size}) and --arch {arch} cannot train on one sample at {hw[0]}x{hw[1]} "
                            f"({str(exc).splitlines()[0]}); choose another --batch-size") from None
    finally:
        model.train(was_training)


def optimizer_and_scheduler(model: nn.Module, recipe: Recipe):
    """AdamW over every parameter and StepLR stepped once per epoch, as the classic script has them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
    return optimizer, scheduler
