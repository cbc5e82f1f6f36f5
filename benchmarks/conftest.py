"""Shared benchmark fixtures (the `cuda` skip lives in the top-level conftest.py)."""

import pytest
import torch


@pytest.fixture(scope="session")
def bench_dataset(tmp_path_factory) -> str:
    """256 ImageNet-like JPEGs (about 500x375, quality 90) in 8 classes, made once per session."""
    from fasteval.data.synth import synth_dataset

    return synth_dataset(tmp_path_factory.mktemp("bench") / "data", classes=8, per_class=32, seed=11)


@pytest.fixture(scope="session")
def bench_model_file(bench_dataset, tmp_path_factory) -> str:
    """A ResNet-18 sized to the bench dataset (random weights: speed does not depend on them)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-8.pt"
    torch.save(torchvision.models.resnet18(num_classes=8).state_dict(), path)
    return str(path)
