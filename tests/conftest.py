"""Shared fixtures: small synthetic datasets and a small model, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernel runs on CPU tensors in Triton's interpreter. This must be
# set before the kernel module is imported (triton.jit reads it when decorating).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fasteval.data.preprocess import get_spec
from fasteval.data.synth import synth_dataset


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """A FASTEVAL_CACHE of the test session's own: what a developer's runs kept there (compile profiles,
    the route's rates, kept model checks) must not decide a test, as it cannot on a fresh CI machine."""
    old = os.environ.get("FASTEVAL_CACHE")
    os.environ["FASTEVAL_CACHE"] = str(tmp_path_factory.mktemp("fasteval-cache"))
    yield
    if old is None:
        os.environ.pop("FASTEVAL_CACHE", None)
    else:
        os.environ["FASTEVAL_CACHE"] = old


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    """3 classes x 7 fixed-size JPEGs (21 samples: not a multiple of common batch sizes)."""
    root = tmp_path_factory.mktemp("small") / "data"
    return synth_dataset(root, classes=3, per_class=7, size="72x60", seed=3)


@pytest.fixture(scope="session")
def varied_data(tmp_path_factory) -> str:
    """4 classes x 3 ImageNet-like JPEGs of varied sizes."""
    root = tmp_path_factory.mktemp("varied") / "data"
    return synth_dataset(root, classes=4, per_class=3, size="imagenet", seed=5)


@pytest.fixture(scope="session")
def small_spec():
    """A small-input spec so that the CPU tests stay fast (the geometry rules are the same)."""
    return get_spec("imagenet", resize=40, crop=32)


@pytest.fixture(scope="session")
def model_3cls():
    """A seeded ResNet-18 with a 3-class head (random weights are fine for parity tests)."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).eval()


@pytest.fixture(scope="session")
def weights_3cls(model_3cls, tmp_path_factory) -> str:
    path = os.path.join(tmp_path_factory.mktemp("weights"), "resnet18-3.pt")
    torch.save(model_3cls.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The built-in demo (dataset folder, weights file), built once in a temporary cache."""
    from fasteval import demo as demo_module

    cache = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("FASTEVAL_CACHE")
    os.environ["FASTEVAL_CACHE"] = cache
    try:
        yield demo_module.ensure_demo()
    finally:
        if old is None:
            os.environ.pop("FASTEVAL_CACHE", None)
        else:
            os.environ["FASTEVAL_CACHE"] = old


@pytest.fixture(scope="session")
def kinds_data(tmp_path_factory) -> str:
    """Every file kind ImageFolder accepts: gray/CMYK/EXIF-rotated JPEG, RGBA/palette/gray/16-bit PNG, BMP, WebP,
    TIFF, PPM, PGM."""
    import numpy as np
    from PIL import Image

    from fasteval.data.synth import make_image

    root = tmp_path_factory.mktemp("kinds") / "data"
    image = make_image(1, 0, 4, 0, (300, 260))
    files = {
        "a/rgb.jpg": image, "a/gray.jpg": image.convert("L"), "a/cmyk.jpg": image.convert("CMYK"),
        "a/rgb.png": image, "a/rgba.png": image.convert("RGBA"), "a/palette.png": image.convert("P"),
        "b/gray.png": image.convert("L"), "b/x.bmp": image, "b/x.webp": image, "b/x.tif": image,
        "b/x.ppm": image, "b/x.pgm": image.convert("L"), "b/upper.JPEG": make_image(2, 1, 4, 0, (257, 311)),
        # 16 bits per pixel: PIL (the reference) clips to 8 bits where DALI/nvJPEG would scale.
        "b/gray16.png": Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 200),
    }
    for rel, im in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=90) if rel.lower().endswith((".jpg", ".jpeg", ".webp")) else im.save(path)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": ImageFolder's PIL loader ignores it, so every loader must too
    image.save(root / "a" / "exif_rotated.jpg", quality=90, exif=exif)
    return str(root)
