"""Model construction: any torchvision classifier by name, with weights from a checkpoint file.

Checkpoints are read with ``torch.load(weights_only=True)``, so a file can never run code.
The number of classes is read from the checkpoint's classification head.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from .errors import FastevalError, first_line

CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")


def classification_models() -> list[str]:
    """Names accepted by ``--arch``: torchvision's image classification models."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_arch(arch: str) -> None:
    if arch not in classification_models():
        raise FastevalError(
            f"unknown --arch {arch!r}: not a torchvision classification model (e.g. resnet18, resnet50, "
            f"vit_b_16, efficientnet_b0; see torchvision.models.list_models())"
        )


def _construct(arch: str, num_classes: int, device: str | torch.device = "cpu") -> nn.Module:
    import torchvision

    kwargs = {"num_classes": num_classes}
    if arch in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    with torch.device(device):
        return torchvision.models.get_model(arch, weights=None, **kwargs)


def head_name(arch: str) -> str:
    """Qualified name of the module that produces the logits (e.g. ``fc``, ``classifier.1``)."""
    probe = _construct(arch, num_classes=1000, device="meta")
    name = None
    for qualified, module in probe.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == 1000:
            name = qualified
        elif isinstance(module, nn.Conv2d) and module.out_channels == 1000:
            name = qualified
    if name is None:
        raise FastevalError(f"cannot find the classification head of --arch {arch}")
    return name


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A bare state_dict from a checkpoint file, unwrapped and with DDP/compile prefixes removed."""
    if not os.path.isfile(path):
        raise FastevalError(f"--weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FastevalError(f"cannot load --weights {path}: {first_line(exc)}") from None
    if isinstance(obj, dict):
        for key in CHECKPOINT_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FastevalError(
            f"--weights {path} holds no state_dict (expected a dict of tensors, or one under "
            f"{', '.join(repr(k) for k in CHECKPOINT_KEYS)})"
        )
    cleaned = {}
    for key, value in obj.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIPPED_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        cleaned[key] = value
    return cleaned


def _unwrap_sequential_head(state: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """Map ``head.N.weight``/``head.N.bias`` (a head saved as ``nn.Sequential(nn.Linear)``) to ``head.*``."""
    if f"{head}.weight" in state:
        return state
    pattern = re.compile(rf"^{re.escape(head)}\.(\d+)\.(weight|bias)$")
    indices = {m.group(1) for k in state if (m := pattern.match(k))}
    if len(indices) != 1:
        return state
    (index,) = indices
    return {
        (f"{head}.{m.group(2)}" if (m := pattern.match(k)) else k): v for k, v in state.items()
    }


def build_model(arch: str, weights: str | None = None, num_classes: int | None = None) -> nn.Module:
    """A torchvision classifier in eval mode on the CPU.

    ``weights``: None (random init, head sized to ``num_classes``), ``"DEFAULT"`` (torchvision's
    pretrained weights) or a checkpoint path. The head's size must equal ``num_classes``
    when both are known.
    """
    _check_arch(arch)
    if weights is None:
        if num_classes is None:
            raise FastevalError("num_classes is needed to build a model without --weights")
        return _construct(arch, num_classes).eval()
    if weights == "DEFAULT":
        import torchvision

        try:
            model = torchvision.models.get_model(arch, weights="DEFAULT")
        except Exception as exc:
            raise FastevalError(f"cannot get torchvision's pretrained weights for {arch}: {exc}") from None
        head_classes = _head_classes(model, head_name(arch))
        _check_classes(head_classes, num_classes, "torchvision's DEFAULT weights")
        return model.eval()
    head = head_name(arch)
    state = _unwrap_sequential_head(read_state_dict(weights), head)
    key = f"{head}.weight"
    if key not in state:
        raise FastevalError(
            f"--weights {weights} do not fit --arch {arch}: no classification head {key!r} in the checkpoint"
        )
    head_classes = int(state[key].shape[0])
    _check_classes(head_classes, num_classes, f"--weights {weights}")
    model = _construct(arch, head_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        if len(detail) > 300:
            detail = detail[:300] + "..."
        raise FastevalError(f"--weights {weights} do not fit --arch {arch}: {detail}") from None
    return model.eval()


def _head_classes(model: nn.Module, head: str) -> int:
    module = model.get_submodule(head)
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _check_classes(head_classes: int, num_classes: int | None, what: str) -> None:
    if num_classes is not None and head_classes != num_classes:
        raise FastevalError(
            f"{what} have a {head_classes}-class head but the dataset has {num_classes} classes"
        )
