"""A held-out ImageFolder of real photographs in 12 formats: ``python benchmarks/photo_tree.py OUT``.

Crops of scikit-image's bundled photographs (needs ``pip install scikit-image``, not a fasteval
dependency), saved as baseline/progressive/gray/CMYK JPEG, RGB/16-bit/palette/RGBA PNG, WebP, BMP,
TIFF and PPM, spread over 10 classes: 156 files. Deterministic (seeded crops and qualities).
"""

from __future__ import annotations

import glob
import os
import sys

import numpy as np
from PIL import Image

FORMATS = ["jpg", "jpg_prog", "png", "png16", "webp", "bmp", "tif", "gray_jpg", "cmyk_jpg", "palette_png",
           "rgba_png", "ppm"]


def save(crop: Image.Image, base: str, fmt: str, rng: np.random.Generator) -> None:
    """One crop in one format (the extension follows the format)."""
    savers = {
        "jpg": lambda: crop.save(base + ".jpg", quality=int(rng.integers(60, 95))),
        "jpg_prog": lambda: crop.save(base + ".jpeg", quality=85, progressive=True),
        "png": lambda: crop.save(base + ".png"),
        "png16": lambda: Image.fromarray(np.asarray(crop.convert("L")).astype(np.uint16) * 257).save(base + ".png"),
        "webp": lambda: crop.save(base + ".webp", quality=80),
        "bmp": lambda: crop.save(base + ".bmp"),
        "tif": lambda: crop.save(base + ".tif"),
        "gray_jpg": lambda: crop.convert("L").save(base + ".jpg", quality=90),
        "cmyk_jpg": lambda: crop.convert("CMYK").save(base + ".jpg", quality=90),
        "palette_png": lambda: crop.convert("P").save(base + ".png"),
        "rgba_png": lambda: crop.convert("RGBA").save(base + ".png"),
        "ppm": lambda: crop.save(base + ".ppm"),
    }
    savers[fmt]()


def photo_tree(out: str, crops_per_photo: int = 6) -> int:
    """Write the tree under ``out``; returns the number of files."""
    import skimage

    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    sources = sorted(glob.glob(os.path.join(data, "*.png")) + glob.glob(os.path.join(data, "*.jpg")))
    rng = np.random.default_rng(0)
    written = 0
    for i, path in enumerate(sources):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        w, h = rgb.size
        if min(w, h) < 64:
            continue
        for j in range(crops_per_photo):
            cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            n = i * crops_per_photo + j
            folder = os.path.join(out, f"c{n % 10}")
            os.makedirs(folder, exist_ok=True)
            name = f"{os.path.basename(path).split('.')[0]}_{j}"
            save(rgb.crop((x0, y0, x0 + cw, y0 + ch)), os.path.join(folder, name), FORMATS[n % len(FORMATS)], rng)
            written += 1
    return written


if __name__ == "__main__":
    print(f"{photo_tree(sys.argv[1])} images in {sys.argv[1]}")
