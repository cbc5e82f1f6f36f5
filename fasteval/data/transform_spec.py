"""A user's torchvision eval transform as fasteval's ``PreprocessSpec``, where it is one.

The usual eval transform (``Resize(n)`` of the shorter side, an optional square ``CenterCrop``, ``ToTensor``
or ``ToImage`` + ``ToDtype(float32, scale=True)`` or ``PILToTensor`` + ``ConvertImageDtype(float32)``, and
``Normalize``, in torchvision's v1 or v2 form) is a spec every loader reproduces. Recognised by its steps,
then confirmed by content: fasteval's geometry and the user's must give the same pixels on the given image.
The reference's code (the recheck too) then runs the user's transform itself, so its arithmetic is the
user's to the last bit. Anything else (another step, ``Resize((h, w))``, ``max_size``) is run as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from fasteval.data.preprocess import INTERPOLATIONS, PreprocessSpec


def _steps(transform) -> list:
    inner = getattr(transform, "transforms", None)
    return list(inner) if isinstance(inner, (list, tuple)) else [transform]


def _square(size) -> int | None:
    """An int for ``n``, ``[n]`` or ``(n, n)``; None for anything else."""
    if isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)) and (len(size) == 1 or (len(size) == 2 and size[0] == size[1])):
        return int(size[0])
    return None


def spec_from_steps(transform) -> PreprocessSpec | None:
    """The spec ``transform``'s steps describe, or None where they are not Resize [+ CenterCrop] + to-float +
    Normalize (checked by name and parameters only: ``spec_from_transform`` confirms by content)."""
    steps = _steps(transform)
    names = [type(s).__name__ for s in steps]
    if len(steps) < 3 or names[0] != "Resize":
        return None
    resize = steps[0]
    size = resize.size if not isinstance(resize.size, (list, tuple)) or len(resize.size) == 1 else None
    if size is None or getattr(resize, "max_size", None) is not None:
        return None
    interpolation = getattr(resize.interpolation, "value", str(resize.interpolation)).lower()
    if interpolation not in INTERPOLATIONS:
        return None
    rest, crop = steps[1:], None
    if names[1] == "CenterCrop":
        crop = _square(steps[1].size)
        if crop is None or crop > int(_square(size)):  # a crop beyond the image pads: run as given
            return None
        rest = steps[2:]
    kinds = [type(s).__name__ for s in rest]
    if kinds == ["ToTensor", "Normalize"] or kinds == ["ToImage", "ToDtype", "Normalize"] \
            or kinds == ["PILToTensor", "ConvertImageDtype", "Normalize"]:
        normalize = rest[-1]
    else:
        return None
    if len(rest) == 3 and not _scales_to_float(rest[1]):
        return None
    return PreprocessSpec("custom", resize=int(_square(size)), crop=crop, interpolation=interpolation,
                          mean=tuple(float(v) for v in normalize.mean), std=tuple(float(v) for v in normalize.std))


def _scales_to_float(step) -> bool:
    """``ToDtype(torch.float32, scale=True)`` or ``ConvertImageDtype(torch.float32)``: uint8 / 255 as float32."""
    import torch

    dtype = getattr(step, "dtype", None)
    if isinstance(dtype, dict):  # v2's per-type form
        dtype = next(iter(dtype.values()), None) if len(set(dtype.values())) == 1 else None
    scale = getattr(step, "scale", True)
    return dtype == torch.float32 and bool(scale)


def _pil(image):
    """The kept pixels (an HWC uint8 array) as the PIL image a user's transform receives after its geometry."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(image) if isinstance(image, np.ndarray) else image


@dataclass(frozen=True)
class GivenTransform(PreprocessSpec):
    """A spec the caller's own transform defines. ``geometry`` > 0: its first ``geometry`` steps are Resize [+
    CenterCrop], which the fast path's decoders reproduce (equal on the first image), and the reference's code
    runs the caller's transform itself, so its arithmetic is the caller's to the last bit. ``geometry`` == 0:
    not reproduced; the reference's code runs it as given (``out_hw``: its output's size, the same for every
    image, or the batches could not be stacked, in the caller's loop either; ``crop`` that size where square)."""

    transform: object = field(default=None, compare=False)
    geometry: int = 0
    out_hw: tuple[int, int] | None = None  # run as given: the (height, width) of its output, every image's

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        return self.out_hw if self.out_hw is not None else super().output_hw(height, width)

    @property
    def reproduced(self) -> bool:
        return self.geometry > 0

    @property
    def runs_as_given(self) -> bool:
        return not self.reproduced

    def torchvision_transform(self):
        return self.transform

    def tensor_steps(self) -> list:
        """The caller's steps after the geometry, on the kept pixels made a PIL image again."""
        return [_pil, *_steps(self.transform)[self.geometry:]]

    def describe(self) -> str:
        if self.reproduced:
            return super().describe().replace("custom: ", "the transform given: ", 1)
        return f"custom: {self.transform!r}".replace("\n", " ")


def spec_from_transform(transform, image) -> GivenTransform:
    """``transform`` as a ``GivenTransform``: reproduced where ``spec_from_steps`` recognises it and its geometry
    gives the same pixels as fasteval's on ``image`` (a PIL image), else not (its output must then be a 3-channel
    tensor)."""
    import numpy as np
    import torch

    from fasteval.errors import FastevalError

    spec = spec_from_steps(transform)
    if spec is not None:
        geometry = 2 if spec.crop is not None else 1
        steps = _steps(transform)
        theirs, mine = image, image
        for step in steps[:geometry]:
            theirs = step(theirs)
        for step in spec.pil_geometry():
            mine = step(mine)
        if np.array_equal(np.asarray(theirs), np.asarray(mine)):
            kept = {f.name: getattr(spec, f.name) for f in fields(PreprocessSpec) if f.name != "source"}
            return GivenTransform(**kept, transform=transform, geometry=geometry,
                                  source="the transform given, recognised as " + spec.describe().split(": ", 1)[1])
    out = transform(image)
    if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != 3:
        raise FastevalError(f"transform: expected a 3-channel image tensor (C, H, W) from an image, got "
                            f"{getattr(out, 'shape', type(out).__name__)}")
    height, width = int(out.shape[1]), int(out.shape[2])
    return GivenTransform("custom", resize=min(height, width), crop=height if height == width else None,
                          transform=transform, out_hw=(height, width),
                          source="a transform fasteval does not reproduce: run as given, by the reference's code")
