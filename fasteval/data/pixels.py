"""The reference's pixels without torch: ImageFolder's PIL decode, torchvision's PIL resize and crop.

``load_rgb`` is the reference's loader (ImageFolder's, with an error that names the file; a tar member's bytes through
fasteval/data/sources.py).
``reference_pixels`` goes on as torchvision's ``Resize(int)`` and ``CenterCrop`` do on a PIL image
(the sizes and offsets from ``PreprocessSpec``, PIL's own resampling) and returns the uint8 HWC
array that ``ToTensor`` would read: the same bytes, checked against torchvision in the tests. It
imports only PIL and NumPy, so the command can decode while torch is still importing
(fasteval/data/prefetch.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fasteval.data.preprocess import PreprocessSpec
from fasteval.data.sources import open_sample
from fasteval.errors import FastevalError

RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "nearest": Image.Resampling.NEAREST}


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's PIL loader, with an error that names the file. An image already in RGB is returned
    as decoded: ``convert("RGB")`` would return a copy of the same pixels (0.2 of the demo's 2.8 ms an
    image)."""
    try:
        with open_sample(path) as f:
            image = Image.open(f)
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:
        raise FastevalError(f"cannot decode image {path}: {_reason(path, exc)}") from None


def _reason(path: str, exc: Exception) -> str:
    """PIL's message, or what the file is where PIL cannot even identify it."""
    from PIL import UnidentifiedImageError

    from fasteval.data.probe import describe_content

    if isinstance(exc, UnidentifiedImageError):
        try:
            with open_sample(path) as f:
                return describe_content(f.read(64))
        except OSError:
            pass
    return str(exc) or type(exc).__name__


def reference_pixels(path: str, spec: PreprocessSpec) -> np.ndarray:
    """The uint8 HWC pixels the reference's transform feeds to ``ToTensor`` for this file."""
    image = load_rgb(path)
    width, height = image.size
    new_h, new_w = spec.resized_hw(height, width)
    image = image.resize((new_w, new_h), RESAMPLING[spec.interpolation])
    if spec.crop is not None:
        top, left = spec.crop_offsets(height, width)
        image = image.crop((left, top, left + spec.crop, top + spec.crop))
    return np.array(image)  # writable (ToTensor warns on a read-only array), as ToTensor copies a PIL image
