"""Deterministic synthetic ImageFolder datasets of realistic JPEGs.

Each class has its own colour pair, stripe orientation and stripe frequency, so a
classifier can learn the classes; every image adds random blobs, a smooth random
field and pixel noise, so the JPEGs carry real texture and cost a real decode.
Each image depends only on (seed, class, index): the same arguments give the same files.
"""

from __future__ import annotations

import colorsys
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from fasteval.errors import FastevalError
from fasteval.files import check_output_folder, staged_folder
from fasteval.procs import pool_map, usable_cores

IMAGENET_LIKE = "imagenet"


def parse_size(size: str) -> tuple[int, int] | None:
    """``"imagenet"`` (varied sizes around 500x375) -> None; ``"WxH"`` -> (W, H)."""
    if size == IMAGENET_LIKE:
        return None
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise FastevalError(f"--size must be 'imagenet' or WxH like 100x100, got {size!r}") from None
    if w < 8 or h < 8:
        raise FastevalError(f"--size must be at least 8x8, got {size!r}")
    if max(w, h) > 65535:
        raise FastevalError(f"--size {size}: a JPEG holds at most 65535 pixels a side")
    if w * h > Image.MAX_IMAGE_PIXELS:  # beyond it PIL, the reference's decoder, refuses to read them back
        raise FastevalError(f"--size {size}: {w * h:,} pixels an image, more than PIL reads without treating "
                            f"it as a decompression bomb ({Image.MAX_IMAGE_PIXELS:,})")
    return w, h


def _class_style(k: int, classes: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    hue = (k * 0.618033988749895) % 1.0
    c1 = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.9)) * 255
    c2 = np.array(colorsys.hsv_to_rgb((hue + 0.45) % 1.0, 0.6, 0.35)) * 255
    angle = math.pi * ((k * 0.381966) % 1.0)
    freq = 3.0 + 2.5 * (k % 5)
    return c1, c2, angle, freq


def make_image(k: int, index: int, classes: int, seed: int, size: tuple[int, int] | None) -> Image.Image:
    """One RGB image of class ``k``."""
    rng = np.random.default_rng([seed, k, index])
    if size is None:
        w = int(rng.integers(400, 640))
        h = int(rng.integers(300, 480))
        if rng.random() < 0.2:
            w, h = h, w
    else:
        w, h = size
    c1, c2, angle, freq = _class_style(k, classes)
    angle += rng.normal(0, 0.08)
    freq *= rng.uniform(0.85, 1.15)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    scale = float(max(w, h))
    phase = rng.uniform(0, 2 * math.pi)
    s = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (x * math.cos(angle) + y * math.sin(angle)) / scale + phase)
    img = s[..., None] * c1 + (1 - s[..., None]) * c2
    coarse = rng.normal(0, 18, size=(4, 4)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)
    img += field[..., None]
    img += rng.normal(0, 10, size=img.shape).astype(np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.04, 0.12) * scale
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=colour)
    return pil


def _write_class(args: tuple) -> None:
    out, k, per_class, classes, seed, dims, quality = args
    class_dir = os.path.join(out, f"class_{k:03d}")
    os.makedirs(class_dir, exist_ok=True)
    for i in range(per_class):
        path = os.path.join(class_dir, f"img_{i:05d}.jpg")
        try:
            make_image(k, i, classes, seed, dims).save(path, "JPEG", quality=quality)
        except OSError as exc:
            raise FastevalError(f"cannot write {path}: {exc.strerror or exc}") from None


def synth_dataset(
    out: str | os.PathLike,
    classes: int = 10,
    per_class: int = 20,
    size: str = IMAGENET_LIKE,
    seed: int = 0,
    quality: int = 90,
    workers: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``classes`` x ``per_class`` JPEGs as an ImageFolder under ``out``; return ``out``.

    ``out`` must be new or empty, unless ``overwrite`` (its contents are then replaced). The
    dataset is written into a temporary folder beside ``out`` and renamed into place when
    complete, so ``out`` is never half-written. Classes are written in parallel by ``workers``
    processes (default: all cores) that exit with this one; the files do not depend on their number.
    """
    if classes < 1 or per_class < 1:
        raise FastevalError(f"--classes and --per-class must be positive, got {classes} and {per_class}")
    if not 1 <= quality <= 100:
        raise FastevalError(f"--quality must be in 1..100, got {quality}")
    dims = parse_size(size)
    out = os.fspath(out)
    check_output_folder(out, "OUT", overwrite)
    workers = min(workers or usable_cores(), classes)
    try:
        with staged_folder(out) as work:
            tasks = [(work, k, per_class, classes, seed, dims, quality) for k in range(classes)]
            if workers <= 1:
                for task in tasks:
                    _write_class(task)
            else:
                pool_map(_write_class, tasks, workers)
    except OSError as exc:  # the temporary folder beside OUT, or the rename into place
        raise FastevalError(f"OUT {out}: cannot write it: {exc.strerror or exc}") from None
    return out
