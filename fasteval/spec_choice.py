"""The architecture and preprocessing of an ``eval`` or ``bench`` run, and why: one place decides them.

Flags first (``--arch``; ``--preset``, then ``--resize``/``--crop`` over it); without them, what a
``fasteval train`` checkpoint records (its architecture and validation preprocessing); for a timm model,
timm's pretrained configuration as its validate.py resolves it; else torchvision's ImageNet preset, with
one note where a plain state_dict is evaluated so (it records nothing: its training may have used another).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from fasteval.data.preprocess import PRESETS, PreprocessSpec, get_spec, spec_from_record
from fasteval.errors import FastevalError

DEFAULT_ARCH = "resnet18"
DEFAULT_PRESET = "imagenet"


@dataclass(frozen=True)
class SpecChoice:
    arch: str
    spec: PreprocessSpec
    reason: str  # where the preprocessing comes from
    note: str | None = None  # one line for the user, printed once every check has passed


def choose_spec(arch: str | None, weights: str | None, preset: str | None, resize: int | None,
                crop: int | None) -> SpecChoice:
    """The run's architecture and preprocessing (module docstring). ``weights``: the (first) checkpoint."""
    from fasteval.checkpoint_record import fasteval_record

    record = fasteval_record(weights) if weights and weights != "DEFAULT" and os.path.isfile(weights) else None
    if arch is None:
        arch = record["arch"] if record and isinstance(record.get("arch"), str) else DEFAULT_ARCH
    flags = [f"--{name} {value}" for name, value in (("preset", preset), ("resize", resize), ("crop", crop))
             if value is not None]
    if preset is not None:
        base, source = PRESETS.get(preset), f"--preset {preset}"
        if base is None:
            get_spec(preset)  # the one-line error naming the presets
    elif record is not None:
        base, source = spec_from_record(record["preprocess"], f"--weights {weights}"), \
            f"recorded in --weights {weights} by fasteval train"
    elif arch.startswith("timm:"):
        from fasteval.model.timm_models import timm_spec

        base, source = timm_spec(arch), "timm's pretrained configuration of the model, as its validate.py resolves it"
    else:
        base, source = PRESETS[DEFAULT_PRESET], f"the default preset {DEFAULT_PRESET}"
    reason = source if not (resize or crop) else f"{source}, with {' '.join(f for f in flags if 'preset' not in f)}"
    spec = replace(get_spec(base.name, resize, crop, base=base), source=reason)
    note = None
    if record is not None and flags:
        recorded = spec_from_record(record["preprocess"], f"--weights {weights}").describe()
        note = f"{' '.join(flags)} over the preprocessing --weights {weights} records ({recorded})"
    if record is None and not flags and not arch.startswith("timm:") and weights and weights != "DEFAULT":
        note = (f"--weights {weights} records no preprocessing: evaluated with the default preset {DEFAULT_PRESET} "
                f"({spec.describe().split(': ', 1)[1]}); choose another with --preset seed (Resize(224) alone, "
                f"the classic fine-tuning script's), or --resize/--crop")
    return SpecChoice(arch, spec, reason, note)


def check_one_preprocessing(checkpoints: list[str], preset: str | None) -> None:
    """A sweep evaluates every checkpoint with one preprocessing: without ``--preset``, the checkpoints must
    record the same one (or all none), else each would be scored with another's transform."""
    from fasteval.checkpoint_record import fasteval_record

    if preset is not None:
        return
    first, first_spec = None, None
    for path in checkpoints:
        record = fasteval_record(path) if os.path.isfile(path) else None
        spec = spec_from_record(record["preprocess"], f"--weights {path}") if record else None
        if first is None:
            first, first_spec = path, spec
        elif spec != first_spec:
            raise FastevalError(f"the checkpoints record different preprocessing ({first}: {_said(first_spec)}; "
                                f"{path}: {_said(spec)}); a sweep evaluates every one with the same: give --preset "
                                f"(and --resize/--crop), or sweep them apart")


def _said(spec: PreprocessSpec | None) -> str:
    return spec.describe() if spec is not None else "nothing recorded: the default preset"
