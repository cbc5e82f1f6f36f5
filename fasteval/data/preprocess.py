"""The preprocessing spec: one definition of resize, crop and normalisation for every loader.

The geometry helpers reproduce torchvision's ``Resize(int)`` (shorter side to ``resize``,
longer side floored) and ``CenterCrop`` (offset rounded half to even, as Python's
``round``), so loaders that resize on their own (DALI, GPU decode) can match it exactly.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass, field, replace

from PIL import Image

from fasteval.data.sources import open_sample, sample_stat
from fasteval.errors import FastevalError

# An image above PIL's MAX_IMAGE_PIXELS (up to twice it, beyond which PIL refuses) is decoded anyway, by the
# reference as by every loader; PIL's two-line warning at each open, in every process that decodes (forked
# workers inherit this filter), would repeat what fasteval.data.probe says once per run.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side to ``resize``, then center-crop ``crop`` (or no crop), normalise."""

    name: str
    resize: int
    crop: int | None
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = field(default="", compare=False)  # where the spec comes from (a report's reason), not part of it

    @property
    def runs_as_given(self) -> bool:
        """A transform fasteval's decoders do not reproduce (fasteval/data/transform_spec.py): only its own code
        makes its pixels, in DataLoader workers."""
        return False

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """Size after the resize, floored on the long side exactly as torchvision does."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        return new_h, new_w

    def crop_offsets(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the center crop in the resized image, rounded as torchvision does."""
        rh, rw = self.resized_hw(height, width)
        if self.crop is None:
            return 0, 0
        return int(round((rh - self.crop) / 2.0)), int(round((rw - self.crop) / 2.0))

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        """Size of the model input made from an image of the given size."""
        if self.crop is not None:
            return self.crop, self.crop
        return self.resized_hw(height, width)

    def pil_geometry(self) -> list:
        """torchvision's PIL resize (+ center crop) steps, shared by every PIL-based loader."""
        from torchvision import transforms as T

        mode = getattr(T.InterpolationMode, self.interpolation.upper())
        steps = [T.Resize(self.resize, interpolation=mode, antialias=self.antialias)]
        if self.crop is not None:
            steps.append(T.CenterCrop(self.crop))
        return steps

    def tensor_steps(self) -> list:
        """The reference transform's steps after the geometry: ToTensor + Normalize."""
        from torchvision import transforms as T

        return [T.ToTensor(), T.Normalize(self.mean, self.std)]

    def torchvision_transform(self):
        """The reference transform: PIL resize + center crop + ToTensor + Normalize."""
        from torchvision import transforms as T

        return T.Compose([*self.pil_geometry(), *self.tensor_steps()])

    def describe(self) -> str:
        """The transform in one line, as a report prints it."""
        crop = f" + CenterCrop({self.crop})" if self.crop is not None else ""
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return (f"{self.name}: Resize({self.resize}, {self.interpolation}{'' if self.antialias else ', no antialias'})"
                f"{crop}, mean ({mean}), std ({std})")

    def record(self) -> dict:
        """The spec as plain data (what a checkpoint records; ``spec_from_record`` reads it back)."""
        return {"preset": self.name, "resize": self.resize, "crop": self.crop, "interpolation": self.interpolation,
                "antialias": self.antialias, "mean": list(self.mean), "std": list(self.std)}


def spec_from_record(record: dict, source: str) -> PreprocessSpec:
    """A spec from ``PreprocessSpec.record``'s form (an older record holds preset, resize and crop only: the
    rest is the preset's); ``source`` names where the record came from in the one-line error."""
    try:
        base = PRESETS.get(record["preset"], PRESETS["imagenet"])
        spec = PreprocessSpec(str(record["preset"]), int(record["resize"]),
                              None if record.get("crop") is None else int(record["crop"]),
                              interpolation=str(record.get("interpolation", base.interpolation)),
                              antialias=bool(record.get("antialias", base.antialias)),
                              mean=tuple(float(v) for v in record.get("mean", base.mean)),
                              std=tuple(float(v) for v in record.get("std", base.std)))
    except (KeyError, TypeError, ValueError) as exc:
        raise FastevalError(f"{source}: its recorded preprocessing is malformed ({exc.__class__.__name__}: "
                            f"{exc})") from None
    if (spec.resize < 1 or (spec.crop is not None and not 1 <= spec.crop <= spec.resize)
            or spec.interpolation not in INTERPOLATIONS or len(spec.mean) != 3 or len(spec.std) != 3
            or not all(v > 0 for v in spec.std)):
        raise FastevalError(f"{source}: its recorded preprocessing is not one fasteval can run: {record}")
    return spec


PRESETS = {
    # torchvision's ImageNet evaluation transform.
    "imagenet": PreprocessSpec("imagenet", resize=256, crop=224),
    # The classic Fruits-360 fine-tuning script: Resize(224) only, no crop.
    "seed": PreprocessSpec("seed", resize=224, crop=None),
}


def get_spec(preset: str = "imagenet", resize: int | None = None, crop: int | None = None,
             base: PreprocessSpec | None = None) -> PreprocessSpec:
    """A preset (or ``base``, a spec from elsewhere: a checkpoint's, a timm model's), optionally with its
    resize/crop sizes overridden."""
    if base is None and preset not in PRESETS:
        raise FastevalError(f"unknown --preset {preset!r}; choose from {', '.join(PRESETS)}")
    spec = base or PRESETS[preset]
    if resize is not None:
        if resize < 1:
            raise FastevalError(f"--resize must be positive, got {resize}")
        spec = replace(spec, resize=resize)
    if crop is not None:
        if crop < 1:
            raise FastevalError(f"--crop must be positive, got {crop}")
        spec = replace(spec, crop=crop)
    if spec.crop is not None and spec.crop > spec.resize:
        if crop is None:  # the crop is the preset's (or the checkpoint's, or timm's), not the user's
            raise FastevalError(f"--resize {spec.resize} is smaller than the crop {spec.crop} of {spec.name}: give "
                                f"--crop too (at most {spec.resize})")
        raise FastevalError(f"--crop {spec.crop} is larger than --resize {spec.resize}")
    return spec


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with open_sample(path) as f, Image.open(f) as im:
            width, height = im.size
    except Exception as exc:
        raise FastevalError(f"cannot read image {path}: {exc}") from None
    return height, width


def input_hw(spec: PreprocessSpec, first_path: str) -> tuple[int, int] | None:
    """The model input size of a run: the crop's, else the first image's output size from its header;
    None where that file is not a regular file (a FIFO would block the open) or cannot be read: left to
    the checks that report it."""
    if spec.crop is not None:
        return spec.crop, spec.crop
    try:
        if not stat.S_ISREG(sample_stat(first_path).st_mode):
            return None
        return spec.output_hw(*image_size(first_path))
    except (OSError, FastevalError):
        return None


def check_batchable(spec: PreprocessSpec, paths: list[str]) -> None:
    """Refuse a no-crop spec on images whose outputs would differ in size (they cannot be batched)."""
    if spec.crop is not None or not paths:
        return
    first = paths[0]
    expected = spec.output_hw(*image_size(first))
    for path in paths[1:]:
        got = spec.output_hw(*image_size(path))
        if got != expected:
            raise FastevalError(
                f"preset {spec.name!r} resizes without cropping, so all images must share one aspect "
                f"ratio: {path} becomes {got[1]}x{got[0]} but {first} becomes {expected[1]}x{expected[0]}; "
                f"use --preset imagenet or --crop N"
            )
