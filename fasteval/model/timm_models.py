"""timm models by name (``--arch timm:NAME``): built by timm, weights from a checkpoint file, and the
preprocessing of the model's pretrained configuration as timm's validate.py resolves it.

timm is an optional extra (``pip install 'fasteval[timm]'``): it is imported only when a ``timm:`` name is
used, so the base package neither needs it nor pays its import time. NAME is any ``timm.list_models()``
name, with or without a pretrained tag (``resnet18.a1_in1k``); the tag chooses the pretrained configuration
(its sizes, interpolation, mean and std), never weights: those come from ``--weights``. Reading the file is
``models.read_state_dict``'s (which unwraps timm's training checkpoints); this module builds, sizes the head
and loads.
"""

from __future__ import annotations

import difflib
import math
from contextlib import nullcontext

import torch
from torch import nn

from fasteval.data.preprocess import INTERPOLATIONS, PreprocessSpec
from fasteval.errors import FastevalError, first_line
from fasteval.model.init_skip import initialisers_skipped

PREFIX = "timm:"
EXTRA = "pip install 'fasteval[timm]'"


def is_timm(arch: str) -> bool:
    """Whether ``--arch`` names a timm model (``timm:NAME``)."""
    return arch.startswith(PREFIX)


def _timm(arch: str):
    """The timm package, or the one line naming the extra that installs it."""
    try:
        import timm
    except ImportError:
        raise FastevalError(f"--arch {arch}: needs timm: {EXTRA}") from None
    return timm


def _name(arch: str) -> str:
    """The timm model name of ``arch``, checked: a known architecture, and a tag it has where one is given."""
    timm = _timm(arch)
    name = arch[len(PREFIX):]
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = (f"did you mean {', '.join(PREFIX + c for c in close)}?" if close
                else "e.g. timm:resnet50, timm:convnext_tiny")
        raise FastevalError(f"unknown --arch {arch}: not a timm model (see timm.list_models(); {hint})")
    from timm.models import get_pretrained_cfg, split_model_name_tag

    try:
        get_pretrained_cfg(name)
    except RuntimeError:
        base, tag = split_model_name_tag(name)
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{base}.*")]
        raise FastevalError(f"unknown --arch {arch}: timm has no pretrained configuration {tag!r} for {base} "
                            f"(its tags: {', '.join(tags) or 'none'})") from None
    return name


def create(arch: str, num_classes: int | None = None, device: str = "cpu", initialise: bool = True,
           pretrained: bool = False) -> nn.Module:
    """The model built by ``timm.create_model`` in eval mode (``num_classes`` None: its configuration's).
    ``device="meta"``: its structure only; ``initialise=False``: values left as allocated (a checkpoint
    replaces them); ``pretrained``: timm's own download of its weights."""
    timm = _timm(arch)
    name = _name(arch)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        with torch.device(device), (nullcontext() if initialise else initialisers_skipped()):
            return timm.create_model(name, pretrained=pretrained, **kwargs).eval()
    except Exception as exc:
        what = "get timm's pretrained weights for" if pretrained else "build"
        raise FastevalError(f"cannot {what} --arch {arch}: {first_line(exc)}") from None


def _structure(arch: str) -> nn.Module:
    """The model on the meta device (shapes and configuration, no values); on the CPU where it cannot be
    built there."""
    try:
        return create(arch, device="meta")
    except FastevalError:
        return create(arch, initialise=False)


def classifier_name(model: nn.Module) -> str:
    """Qualified name of the module that produces the logits: ``model.get_classifier()`` (the first of a
    distilled model's two heads)."""
    head = model.get_classifier()
    if isinstance(head, (tuple, list)):
        head = head[0]
    for qualified, module in model.named_modules():
        if module is head:
            return qualified
    raise FastevalError(f"cannot find the classification head of {type(model).__name__}")


def head_name(arch: str) -> str:
    """Qualified name of the classification head of ``timm:NAME`` (e.g. ``fc``, ``head.fc``)."""
    return classifier_name(_structure(arch))


def head_classes(model: nn.Module) -> int:
    """The class count of a built model's head."""
    head = model.get_submodule(classifier_name(model))
    return getattr(head, "out_features", None) or getattr(head, "out_channels", None) or int(model.num_classes)


def pretrained_classes(arch: str) -> int | None:
    """The class count of the weights timm's pretrained configuration names (None where it says none)."""
    _name(arch)
    return getattr(_structure(arch), "pretrained_cfg", {}).get("num_classes")


def state_classes(arch: str, state: dict[str, torch.Tensor], weights: str) -> int:
    """The class count of the head that ``state`` holds for ``timm:NAME``."""
    key = f"{head_name(arch)}.weight"
    if key not in state:
        raise FastevalError(f"--weights {weights} do not fit --arch {arch}: no classification head {key!r} "
                            f"in the checkpoint")
    return int(state[key].shape[0])


def load(arch: str, state: dict[str, torch.Tensor], num_classes: int, check_only: bool = False) -> nn.Module:
    """``timm:NAME`` with a ``num_classes`` head, loaded strictly from ``state`` (a load that does not fit
    raises torch's RuntimeError: the caller words it). ``check_only``: every key and shape checked on the
    meta device, no value read; only the returned model's structure may be used."""
    if check_only:
        model = create(arch, num_classes, device="meta")
        stand_ins = {key: torch.empty(value.shape, dtype=value.dtype, device="meta") for key, value in state.items()}
        model.load_state_dict(stand_ins, strict=True, assign=True)
        return model
    # Built on the CPU, its non-persistent buffers (Swin's relative position index) computed as timm does;
    # the initialisers skipped, since the load replaces every value they would draw.
    model = create(arch, num_classes, initialise=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


def timm_spec(arch: str) -> PreprocessSpec:
    """The eval preprocessing of ``timm:NAME`` as timm's validate.py resolves it (``resolve_data_config``
    with the model and ``use_test_size=True``) and its ``transforms_imagenet_eval`` applies it: the shorter
    side resized to ``floor(size / crop_pct)``, a center crop of the (test) input size, the configuration's
    interpolation, mean and std. Crop modes 'squash' and 'border', non-square inputs, a crop larger than
    the resize and other interpolations are refused in one line: fasteval's spec cannot express them."""
    name = _name(arch)
    from timm.data import resolve_data_config

    model = _structure(arch)
    config = resolve_data_config({}, model=model, use_test_size=True)
    channels, height, width = config["input_size"]
    crop_pct, crop_mode, interpolation = config["crop_pct"], config["crop_mode"], config["interpolation"]
    scale = math.floor(height / crop_pct)
    refused = None
    if crop_mode != "center":
        refused = (f"its crop mode {crop_mode!r} ("
                   + ("both sides resized to the same size, the aspect ratio lost" if crop_mode == "squash"
                      else "the longer side resized, the rest padded") + ")")
    elif channels != 3 or height != width:
        refused = f"its input size {channels}x{height}x{width} is not a square RGB crop"
    elif scale < height:
        refused = f"its crop_pct {crop_pct} makes the crop ({height}) larger than the resize ({scale})"
    elif interpolation not in INTERPOLATIONS:
        refused = f"its interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
    if refused:
        raise FastevalError(f"--arch {arch}: timm's pretrained configuration cannot be reproduced by fasteval's "
                            f"preprocessing (shorter-side resize + center crop): {refused}; choose the "
                            f"preprocessing with --preset (e.g. --preset imagenet --resize {max(scale, height)} "
                            f"--crop {height})")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    tagged = ".".join(p for p in (cfg.get("architecture"), cfg.get("tag")) if p) or name
    return PreprocessSpec(f"{PREFIX}{tagged}", resize=scale, crop=height, interpolation=interpolation,
                          mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]))
