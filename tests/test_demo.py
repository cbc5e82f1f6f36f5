"""The built-in demo: a cached dataset and a fitted model whose accuracy means something."""

from __future__ import annotations

import os

import pytest

from fasteval import demo as demo_module
from fasteval.model.models import build_model
from fasteval.data.preprocess import PRESETS
from fasteval.evaluation.reference import evaluate_reference
from fasteval.data.samples import discover


@pytest.mark.slow
def test_demo_model_is_meaningful_and_cached(demo):
    data, weights = demo
    cache = os.path.dirname(data)
    samples = discover(data)
    assert len(samples) == demo_module.DEMO_CLASSES * demo_module.DEMO_PER_CLASS
    model = build_model(demo_module.DEMO_ARCH, weights, samples.num_classes)
    r = evaluate_reference(samples, model, PRESETS["imagenet"], batch_size=64, workers=2, progress=False)
    chance = 100.0 / samples.num_classes
    assert r.top1 >= 80.0 > 3 * chance  # fitted on a separate split, evaluated on the demo split
    assert r.loss < 1.0
    assert weights == os.path.join(cache, f"{demo_module.DEMO_ARCH}-demo.pt")
    mtime = os.stat(weights).st_mtime
    assert demo_module.ensure_demo() == (data, weights)  # cached: not rebuilt
    assert os.stat(weights).st_mtime == mtime
