"""Each benchmark function runs once on tiny inputs, so the suites in benchmarks/ cannot rot."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_smoke_{name}", os.path.join(BENCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses read their module's namespace
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


def test_kernel_benchmarks(monkeypatch):
    """Every variant's path; the compiled twin's compile is replaced by its eager arithmetic (a cold compile cost
    20 s of CI; the compiled twin is tested against the kernel in test_fused_metrics.py)."""
    from fasteval.kernels import fused_metrics

    monkeypatch.setattr(fused_metrics, "_compiled_core", lambda: fused_metrics._metrics_core)
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


def test_gpu_measure_steps_record_each_outcome(tmp_path):
    """A step that ends, fails, cannot run here, would not fit, or runs past its budget: each is recorded as such
    in the JSON on disk, what it measured before its end kept, and the run goes on."""
    import json
    import time

    mod = _module("gpu_measure")
    rec = mod.Recorder(str(tmp_path / "measure.json"), 100.0, mod.Config.dry_run(1))

    def slow(entry):
        entry["before"] = 1
        for _ in range(200):
            time.sleep(0.05)

    def skip(entry):
        raise mod.Skip("needs CUDA")

    rec.step("ok", lambda e: e.update(value=3), needs=0, budget=10)
    rec.step("error", lambda e: 1 / 0, needs=0, budget=10)
    rec.step("skip", skip, needs=0, budget=10)
    rec.step("no_room", lambda e: e.update(value=4), needs=1000, budget=10)
    rec.step("cut", slow, needs=0, budget=0.3)
    steps = json.load(open(tmp_path / "measure.json"))["steps"]
    assert {k: v["status"] for k, v in steps.items()} == {"ok": "ok", "error": "error", "skip": "skipped",
                                                         "no_room": "skipped", "cut": "cut"}
    assert steps["ok"]["value"] == 3 and "ZeroDivisionError" in steps["error"]["error"]
    assert steps["skip"]["note"] == "needs CUDA" and "needs about 1000 s" in steps["no_room"]["note"]
    assert "value" not in steps["no_room"] and steps["cut"]["before"] == 1
    _, lines = mod.summarise(steps, mod.Config())
    assert [line.split(":")[0] for line in lines] == ["NOT OK error", "NOT OK skip", "NOT OK no_room", "NOT OK cut"]


def test_gpu_measure_links_the_large_set(tmp_path):
    """The large set: exactly the count asked, in the base set's classes, each file a hard link to a base file."""
    mod = _module("gpu_measure")
    base = tmp_path / "base"
    files = []
    for c in ("a", "b"):
        (base / c).mkdir(parents=True)
        for i in range(3):
            files.append(str(base / c / f"{i}.jpg"))
            open(files[-1], "wb").write(f"{c}{i}".encode())
    assert mod.link_up(files, str(base), str(tmp_path / "large"), 14) == 14
    large = sorted((tmp_path / "large").glob("*/*.jpg"))
    assert len(large) == 14 and {p.parent.name for p in large} == {"a", "b"}
    inodes = {os.stat(f).st_ino: f for f in files}
    for p in large:
        assert os.path.basename(inodes[p.stat().st_ino]) == p.name.rsplit("_", 1)[0] + ".jpg"
    assert mod.batch_list(list(range(5)), 2) == [[0, 1], [2, 3]]
    assert mod.batch_list(list(range(3)), 5) == [[0, 1, 2, 0, 1]]


def test_gpu_measure_cpu_dry_run(tmp_path):
    """The measure's data, decode and loader steps on the CPU (``--cpu-dry-run``): the JSON holds each loader's
    cold and warm rates, and the GPU loader is recorded as skipped, with its reason."""
    import json

    from fasteval.data.loader_dali import dali_available

    mod = _module("gpu_measure")
    assert mod.main([str(tmp_path / "out"), "--cpu-dry-run", "--data", str(tmp_path / "data"),
                     "--steps", "data,decode,loaders"]) == 0
    m = json.load(open(tmp_path / "out" / "measure.json"))
    steps = m["steps"]
    assert [steps[s]["status"] for s in ("start", "data", "decode", "loaders")] == ["ok"] * 4
    assert steps["data"]["base_images"] == 24 and steps["data"]["large_images"] == 48
    assert len(list((tmp_path / "data" / "large").glob("*/*.jpg"))) == 48
    assert steps["decode"]["torchvision"]["b8_img_per_s"] > 0
    loaders = steps["loaders"]
    assert loaders["torchvision-gpu"] == {"skipped": "needs CUDA (a CPU dry run)"}
    assert loaders["pil"]["warm_img_per_s"] > 0 and loaders["pil"]["name"] == "torchvision-cpu"
    assert ("warm_img_per_s" in loaders["dali"]) == dali_available()
    assert any(line.startswith("loaders cold/warm") for line in m["summary_lines"])


def _fake_wheels(folder, sizes):
    folder.mkdir()
    paths = []
    for i, size in enumerate(sizes):
        paths.append(str(folder / f"pkg{i}-1.0-py3-none-any.whl"))
        open(paths[-1], "wb").write(os.urandom(size))
    return paths


def test_dali_wheel_split_and_join_round_trip(tmp_path):
    """Wheels split into parts no larger than asked come back byte for byte, checked, with pip's command."""
    mod = _module("dali_wheel")
    wheels = _fake_wheels(tmp_path / "wheels", [5000, 1, 12345, 0])
    parts = tmp_path / "parts"
    m = mod.split(wheels, str(parts), 4096)
    assert [p["size"] for p in m["parts"]] == [4096, 4096, 4096, 4096, 17346 - 4 * 4096]
    assert sorted(os.listdir(parts)) == ["manifest.json", "part-1", "part-2", "part-3", "part-4", "part-5"]
    assert mod.check(str(parts)) == ([f"part-{i}" for i in range(1, 6)], [], [])
    rebuilt = mod.rebuild(str(parts), str(tmp_path))
    assert [open(r, "rb").read() for r in rebuilt] == [open(w, "rb").read() for w in wheels]
    cmd = mod.install_command(rebuilt, "/site")
    assert cmd[1:4] == ["-m", "pip", "install"] and "--no-deps" in cmd and cmd[cmd.index("--target") + 1] == "/site"


def test_dali_wheel_refuses_missing_or_damaged_parts(tmp_path, capsys):
    """A part lost between calls, or changed in transit, is named; nothing is installed; exit 2 (check: 1)."""
    mod = _module("dali_wheel")
    wheels = _fake_wheels(tmp_path / "wheels", [3000, 3000])
    parts = tmp_path / "parts"
    assert mod.main(["split", *wheels, str(parts), "--part-mib", str(2048 / 2**20)]) == 0
    assert mod.main(["split", *wheels, str(parts)]) == 2
    assert "is not empty" in capsys.readouterr().err
    os.remove(parts / "part-2")
    data = bytearray(open(parts / "part-3", "rb").read())
    data[7] ^= 1
    open(parts / "part-3", "wb").write(bytes(data))
    assert mod.main(["check", str(parts)]) == 1
    assert "missing: part-2; DAMAGED: part-3" in capsys.readouterr().out
    assert mod.main(["join", str(parts), str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert "missing part-2" in err and "damaged part-3" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "site").exists()


def test_gpu_measure_compares_whole_commands():
    """The whole commands: the warm fast run is the step's figure where it ran, else the cold one; the ratio is
    wall over the reference's wall, and the counts must be equal in samples, top-1 and top-5."""
    mod = _module("gpu_measure")
    counts = {"samples": 10, "correct_top1": 3, "correct_top5": 7}
    run = {"images_per_sec": 50, "exact": {"rechecked": 2, "seconds": 0.1}}
    e = {"fast_cold": dict(run, wall_s=8.0, counts=counts), "reference": dict(run, wall_s=20.0, counts=dict(counts))}
    mod.compare(e)
    assert (e["fast"]["run"], e["ratio"], e["counts_equal"]) == ("fast_cold", 0.4, True)
    e["fast_warm"] = dict(run, wall_s=5.0, counts=dict(counts, correct_top5=6))
    mod.compare(e)
    assert (e["fast"]["run"], e["ratio"], e["counts_equal"]) == ("fast_warm", 0.25, False)
    assert e["fast_cold"]["ratio"] == 0.4 and e["fast_cold"]["counts_equal"]
    lines = mod.summarise({"whole_command": dict(e, status="ok")}, mod.Config())[1]
    assert lines[0].startswith("whole command at 10 (warm; cold: 8.0 s = 0.4x): 5.0 s vs the reference's 20.0 s "
                               "= 0.25x")
    assert "counts equal: NO" in lines[0]
