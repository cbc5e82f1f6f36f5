"""The built-in demo: a cached dataset and a fitted model whose accuracy means something."""

from __future__ import annotations

import pytest

from fasteval import demo
from fasteval.models import build_model
from fasteval.preprocess import PRESETS
from fasteval.reference import evaluate_reference
from fasteval.samples import discover


@pytest.mark.slow
def test_demo_model_is_meaningful_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEVAL_CACHE", str(tmp_path))
    data, weights = demo.ensure_demo()
    samples = discover(data)
    assert len(samples) == demo.DEMO_CLASSES * demo.DEMO_PER_CLASS
    model = build_model(demo.DEMO_ARCH, weights, samples.num_classes)
    r = evaluate_reference(samples, model, PRESETS["imagenet"], batch_size=64, workers=2, progress=False)
    chance = 100.0 / samples.num_classes
    assert r.top1 >= 80.0 > 3 * chance  # fitted on a separate split, evaluated on the demo split
    assert r.loss < 1.0
    mtime = (tmp_path / f"demo-{demo.DEMO_VERSION}" / f"{demo.DEMO_ARCH}-demo.pt").stat().st_mtime
    assert demo.ensure_demo() == (data, weights)  # cached: not rebuilt
    assert (tmp_path / f"demo-{demo.DEMO_VERSION}" / f"{demo.DEMO_ARCH}-demo.pt").stat().st_mtime == mtime
