"""Each benchmark function runs once on tiny inputs, so the suites in benchmarks/ cannot rot."""

from __future__ import annotations

import importlib.util
import os

import pytest

BENCH_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_smoke_{name}", os.path.join(BENCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeBenchmark:
    """The pytest-benchmark fixture's interface, running the function once."""

    def __init__(self):
        self.group, self.extra_info, self.calls = None, {}, 0

    def __call__(self, fn, *args, **kwargs):
        self.calls += 1
        return fn(*args, **kwargs)

    def pedantic(self, fn, args=(), kwargs=None, rounds=1, iterations=1, warmup_rounds=0):
        self.calls += 1
        return fn(*args, **(kwargs or {}))


def _run(fn, *args, **kwargs) -> FakeBenchmark:
    bench = FakeBenchmark()
    fn(bench, *args, **kwargs)
    assert bench.calls == 1 and bench.group
    return bench


def test_kernel_benchmarks():
    mod = _module("bench_kernel")
    for variant in mod.CPU_VARIANTS:
        for dtype in mod.DTYPES:
            _run(mod.bench_metrics_cpu, variant, (4, 10), dtype)


def test_loader_benchmarks(small_data):
    from fasteval.data.loader_dali import dali_available

    mod = _module("bench_loaders")
    for variant in ["reference", "torchvision"] + (["dali"] if dali_available() else []):
        bench = _run(mod.bench_loader_cpu, variant, small_data, batch_size=8, workers=1)
        assert bench.extra_info["images"] == 21


def test_model_benchmarks(monkeypatch):
    """Every variant's path, on a model a few layers deep (compiling ResNet-18 twice took 20 s of CI;
    its compiled forward is tested in test_fast.py and its CUDA code in test_model_aot.py)."""
    import torch
    import torchvision

    def tiny(num_classes):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, num_classes))

    monkeypatch.setattr(torchvision.models, "resnet18", tiny)
    mod = _module("bench_model")
    for variant in mod.VARIANTS:
        _run(mod.bench_model_cpu, variant, batch=2, size=32)


@pytest.mark.slow
def test_end_to_end_benchmarks(small_data, weights_3cls):
    mod = _module("bench_end_to_end")
    for variant in ("reference", "fast"):
        bench = _run(mod.bench_end_to_end_cpu, variant, small_data, weights_3cls, batch_size=8, workers=1)
        assert bench.extra_info["images"] == 21



def test_sweep_benchmarks(small_data, monkeypatch):
    """The commands each variant runs (the subprocesses themselves are the CLI's, tested in test_sweep.py)."""
    mod = _module("bench_sweep")
    paths = ["a.pt", "b.pt", "c.pt"]
    for variant, expected in (("separate", [[p] for p in paths]), ("sweep", [paths])):
        calls = []
        monkeypatch.setattr(mod, "_fasteval", lambda *args: calls.append(list(args)))
        bench = _run(mod.bench_sweep_cpu, variant, small_data, paths)
        assert bench.extra_info["checkpoints"] == 3
        weights = [c[c.index("--weights") + 1:] for c in calls]
        assert weights == [["a.pt"], *expected]  # the compile-cache warm-up, then the timed commands


def test_cache_benchmarks(small_data, small_spec, tmp_path, monkeypatch):
    """Each variant reads a 21-sample store as a hit; ``unverified`` skips the checksums, ``verified`` and
    ``stat-keyed`` run them."""
    mod = _module("bench_cache")
    store = mod.build_store(small_data, str(tmp_path), 1, small_spec)
    for variant in ("unverified", "verified", "stat-keyed"):
        for pages in ("warm", "cold"):
            with monkeypatch.context() as m:
                calls = []
                real = mod.decoded.checksums
                m.setattr(mod.decoded, "checksums", lambda images: calls.append(1) or real(images))
                _run(mod.bench_cache_hit, store, m, variant, pages)
                assert calls == ([] if variant == "unverified" else [1])
