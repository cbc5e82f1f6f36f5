"""Shared fixtures: small synthetic datasets and a small model, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernel runs on CPU tensors in Triton's interpreter. This must be
# set before the kernel module is imported (triton.jit reads it when decorating).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fasteval.preprocess import get_spec
from fasteval.synth import synth_dataset


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
