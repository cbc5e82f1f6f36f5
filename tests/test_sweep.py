"""The checkpoint sweep (eval --weights A B C): each checkpoint's result equals a separate eval, the
decoded store feeds what the loader feeds, no recompilation, the statistics against scipy, the cache."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from fasteval.cli import main
from fasteval.data import decoded
from fasteval.data.decoded import DecodedSource, choose_placement
from fasteval.data.loaders import make_loader
from fasteval.data.samples import discover
from fasteval.evaluation.sweep import expand_weights

SIZES = ["--resize", "40", "--crop", "32", "--batch-size", "4", "--workers", "0", "--compile", "off", "--no-progress"]


def _resnet(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=classes).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[str]:
    """Three random ResNet-18s saved as training scripts save them: a bare state_dict; DDP's ``module.``
    prefixes under ``state_dict`` beside the epoch; ``model_state_dict`` with an ``nn.Sequential``
    head, the epoch and the optimizer's state beside it."""
    folder = tmp_path_factory.mktemp("ckpts")
    paths = [str(folder / name) for name in ("a_plain.pt", "b_ddp.pth", "c_train.pt")]
    torch.save(_resnet(1).state_dict(), paths[0])
    ddp = {f"module.{k}": v for k, v in _resnet(2).state_dict().items()}
    torch.save({"state_dict": ddp, "epoch": 7}, paths[1])
    model = _resnet(3)
    linear = model.fc
    model.fc = nn.Sequential(linear)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "best_acc1": 0.5}, paths[2])
    return paths


def _read_predictions(path: str) -> tuple[list[int], list[int]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [int(r["label"]) for r in rows], [int(r["prediction"]) for r in rows]


def test_expand_weights(tmp_path):
    for name in ("b.pth", "a.pt", "c.PT", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.pt").mkdir()
    folder = [str(tmp_path / n) for n in ("a.pt", "b.pth", "c.PT")]
    assert expand_weights([str(tmp_path)]) == folder
    assert expand_weights([str(tmp_path / "*.pt*"), "DEFAULT"]) == [str(tmp_path / "a.pt"), str(tmp_path / "b.pth"),
                                                                   "DEFAULT"]
    assert expand_weights(["x.pt", "y.pt"]) == ["x.pt", "y.pt"]  # checked when loaded, with the loader's message
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no \\*.pt or \\*.pth"):
        expand_weights([str(tmp_path / "empty")])
    with pytest.raises(Exception, match="matches no file"):
        expand_weights([str(tmp_path / "zz*.pt")])


@pytest.mark.slow
def test_sweep_equals_separate_evals_and_scipy(small_data, checkpoints, tmp_path, capsys):
    """Each checkpoint's row equals a separate ``fasteval eval`` of it (counts, loss); the intervals,
    the discordant counts (from the separate runs' per-sample predictions) and the p-values equal
    scipy's; the JSON keeps the order given and a single eval's keys."""
    from scipy.stats import binomtest

    out, cache = tmp_path / "sweep.json", str(tmp_path / "cache")
    assert main(["eval", small_data, "--weights", *checkpoints, "--json", str(out), "--cache", cache, *SIZES]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["decoded"]["cache"] == "written"
    cached = tmp_path / "cached.json"  # a single eval reads the sweep's cache entry
    assert main(["eval", small_data, "--weights", checkpoints[0], "--json", str(cached), "--cache", cache, *SIZES]) == 0
    cached = json.loads(cached.read_text())
    assert cached["decoded"]["cache"] == "hit" and not cached["decoded"]["decoded"]
    assert cached["correct_top1"] == report["checkpoints"][0]["correct_top1"]
    singles, correct = [], []
    for i, path in enumerate(checkpoints):
        single = tmp_path / f"{i}.json"
        preds = tmp_path / f"{i}.csv"
        assert main(["eval", small_data, "--weights", path, "--json", str(single), "--predictions", str(preds),
                     *SIZES]) == 0
        singles.append(json.loads(single.read_text()))
        labels, predictions = _read_predictions(str(preds))
        correct.append([p == y for p, y in zip(predictions, labels)])
    capsys.readouterr()
    entries = report["checkpoints"]
    assert [e["weights"] for e in entries] == checkpoints
    assert set(singles[0]) - {"decoded"} <= set(entries[0])
    n = 21
    for e, s in zip(entries, singles):
        assert (e["samples"], e["correct_top1"], e["correct_top5"]) == (s["samples"], s["correct_top1"],
                                                                       s["correct_top5"])
        assert e["loss"] == pytest.approx(s["loss"], rel=1e-4, abs=1e-5)
        assert e["loader"].startswith("decoded store") and e["decoded"]["placement"] == "host"
        for key, count in (("top1_interval", e["correct_top1"]), ("top5_interval", e["correct_top5"])):
            ci = binomtest(count, n).proportion_ci(confidence_level=0.95, method="wilson")
            assert e[key] == pytest.approx([100 * ci.low, 100 * ci.high], abs=1e-9)
    best = report["best"]
    assert best == min(range(3), key=lambda i: (-singles[i]["correct_top1"], -singles[i]["correct_top5"],
                                                singles[i]["loss"], i))
    assert [e["best"] for e in entries] == [i == best for i in range(3)]
    for i, e in enumerate(entries):
        only_this = sum(a and not b for a, b in zip(correct[i], correct[best]))
        only_best = sum(b and not a for a, b in zip(correct[i], correct[best]))
        vs = e["vs_best"]
        assert (vs["only_this_correct"], vs["only_best_correct"]) == (only_this, only_best)
        expected = binomtest(only_this, only_this + only_best, 0.5).pvalue if only_this + only_best else 1.0
        assert vs["p_value"] == pytest.approx(expected, rel=1e-9)
    assert os.path.basename(checkpoints[best]) in table and "McNemar" in table


def test_store_feeds_what_the_loader_feeds(small_data, small_spec):
    """The decoded store's batches equal the torchvision loader's bit for bit (both normalise the same
    uint8 pixels), and DALI's within float rounding (DALI normalises inside its pipeline), padded alike."""
    samples = discover(small_data)
    kinds = ["torchvision"] + (["dali"] if decoded.resolve_loader("auto") == "dali" else [])
    for kind in kinds:
        args = dict(batch_size=4, workers=0 if kind == "torchvision" else 1, device=torch.device("cpu"))
        store = DecodedSource()(kind, samples, small_spec, **args)
        loader = make_loader(kind, samples, small_spec, **args)
        batches = list(zip(store, loader))
        assert len(batches) == 6 and store.images.dtype == torch.uint8
        for (a, la, ra), (b, lb, rb) in batches:
            assert ra == rb and torch.equal(la[:ra], lb[:rb])
            if kind == "torchvision":
                assert torch.equal(a, b)
            else:
                assert torch.allclose(a[:ra], b[:rb], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_weights_copied_in_place_without_recompiling(small_data, small_spec, checkpoints, monkeypatch):
    """Three checkpoints through one compiled evaluator: dynamo compiles one frame once (a counting
    backend), each checkpoint's result equals a fresh evaluator built for it alone."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    from fasteval.evaluation.fast import FastEvaluator, FastOptions
    from fasteval.evaluation.sweep import run_sweep
    from fasteval.model import inference
    from fasteval.model.models import build_model

    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(inference.torch, "compile",  # Inductor's options go with Inductor, not the counting backend
                        lambda fn, options=None, **kw: real_compile(fn, backend=counter, **kw))
    torch._dynamo.reset()
    samples = discover(small_data)
    options = FastOptions(loader="torchvision", precision="fp32", compile="on", batch_size=4, workers=0, exact="off")
    evaluator = FastEvaluator(samples, build_model("resnet18", checkpoints[0], 3), small_spec, torch.device("cpu"),
                              options, batch_source=DecodedSource())
    assert evaluator.model.compiled
    graphs = counters["stats"]["unique_graphs"]
    results, _ = run_sweep(evaluator, [lambda p=p: build_model("resnet18", p, None) for p in checkpoints],
                           progress=False)
    assert counter.frame_count == 1 and counters["stats"]["unique_graphs"] == graphs
    assert len({tuple(r.predictions.tolist()) + (r.loss_sum,) for r in results}) == 3  # the weights did change
    monkeypatch.setattr(inference.torch, "compile", real_compile)
    for path, result in zip(checkpoints[2:], results[2:]):  # the last: the weights that were copied in
        alone = FastEvaluator(samples, build_model("resnet18", path, 3), small_spec, torch.device("cpu"),
                              FastOptions(**{**options.__dict__, "compile": "off"})).run(progress=False)
        assert torch.equal(alone.predictions, result.predictions)
        assert torch.allclose(alone.losses, result.losses, atol=1e-5)


def test_refused_before_any_work(small_data, checkpoints, tmp_path, capsys):
    """Another class count or architecture, a mode that takes one checkpoint, a bad --cache: one line,
    exit 2, no output written, nothing decoded into the cache."""
    four = tmp_path / "four.pt"
    torch.save(_resnet(4, classes=4).state_dict(), four)
    r34 = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), r34)
    truncated = tmp_path / "truncated.pt"  # a checkpoint cut short while it was being written
    truncated.write_bytes(open(checkpoints[1], "rb").read()[:100_000])
    out, cache = tmp_path / "o.json", tmp_path / "cache"
    cases = [([checkpoints[0], str(four)], [], "4-class head but the first checkpoint"),
             ([checkpoints[0], str(truncated)], [], "damaged or truncated"),
             ([checkpoints[0], str(r34)], [], "do not fit --arch resnet18"),
             (checkpoints[:2], ["--reference"], "--reference evaluates one checkpoint"),
             (checkpoints[:2], ["--predictions", str(tmp_path / "p.csv")], "--predictions evaluates one"),
             (checkpoints[:2], ["--plot", str(four)], "--plot"),
             (checkpoints[:2], ["--cache", checkpoints[2]], "is a file, not a folder"),
             ([str(tmp_path / "nothing*.pt")], [], "matches no file")]
    for weights, extra, message in cases:
        rc = main(["eval", small_data, "--json", str(out), "--cache", str(cache), *SIZES, "--weights", *weights,
                   *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and message in err[-1] and "Traceback" not in "\n".join(err), (weights, extra, err)
        assert not out.exists() and not (cache.exists() and os.listdir(cache))


def test_cache_hit_stale_and_rebuilt(small_data, small_spec, tmp_path, monkeypatch, capsys):
    """A second run reads the memory-mapped entry without decoding, and so does one after a file is
    touched (the entry is keyed by the files' bytes); a file whose bytes changed (a byte appended after
    the JPEG's end: the same pixels), a truncated or missing data file, content changed at the same
    size, a description claiming other checksums (or none, or too many), an edited key, one written by
    a previous format, a damaged one, or none after a crash between the data and their description:
    stale, rebuilt (never used), with the same pixels, and one line on stderr says why."""
    import shutil

    data = shutil.copytree(small_data, tmp_path / "data")
    samples = discover(str(data))
    cache = str(tmp_path / "cache")
    args = dict(batch_size=4, workers=0, device=torch.device("cpu"))
    first = DecodedSource(cache)("torchvision", samples, small_spec, **args)
    assert first.info["cache"] == "written" and first.info["decoded"]
    pixels = first.images.clone()

    def no_decoding(*a, **k):
        raise AssertionError("decoded although the cache holds the images")

    with monkeypatch.context() as m:
        m.setattr(decoded, "raw_loader", no_decoding)
        hit = DecodedSource(cache)("torchvision", samples, small_spec, **args)
    assert hit.info["cache"] == "hit" and not hit.info["decoded"] and torch.equal(hit.images, pixels)
    assert capsys.readouterr().err == ""
    entry = os.path.join(cache, [n for n in os.listdir(cache) if n.endswith(".u8")][0])
    meta = entry.replace(".u8", ".json")

    def stale(expected: str) -> None:
        again = DecodedSource(cache)("torchvision", discover(str(data)), small_spec, **args)
        assert again.info["cache"].startswith("stale") and expected in again.info["cache"], again.info
        assert again.info["cache"].endswith("rebuilt") and torch.equal(again.images, pixels)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is stale" in err[0] and expected in err[0] and entry in err[0], err
        assert DecodedSource(cache)("torchvision", discover(str(data)), small_spec, **args).info["cache"] == "hit"

    def edit_description(change) -> None:
        with open(meta) as f:
            description = json.load(f)
        change(description)
        with open(meta, "w") as f:
            json.dump(description, f)

    path = samples.paths[5]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert DecodedSource(cache)("torchvision", discover(str(data)), small_spec, **args).info["cache"] == "hit"
    with open(path, "ab") as f:
        f.write(b"\0")
    stale("the files (their contents)")
    with open(entry, "r+b") as f:
        f.truncate(100)
    stale("holds 100 bytes")
    os.unlink(entry)
    stale("its data file is missing")
    size = os.path.getsize(entry)
    with open(entry, "r+b") as f:  # one bit of one byte in the middle, same size
        f.seek(size // 2)
        byte = f.read(1)[0]
        f.seek(size // 2)
        f.write(bytes([byte ^ 1]))
    stale("content changed")
    edit_description(lambda d: d["checksum"]["values"].__setitem__(0, f"{int(d['checksum']['values'][0], 16) ^ 1:08x}"))
    stale("content changed")
    edit_description(lambda d: d.pop("checksum"))
    stale("no checksum")

    def previous_format(d: dict) -> None:  # what the code before the content key wrote: sizes and mtimes
        d["parts"].update(format=2, files="0" * 64)
        d["key"] = decoded._digest(d["parts"])

    edit_description(previous_format)
    stale("the cache format changed")
    edit_description(lambda d: d["checksum"]["values"].append("00000000"))
    stale("do not cover the data")
    edit_description(lambda d: d.__setitem__("key", "0" * 64))
    stale("key does not match")

    def crash(*a, **k):  # killed after the data file is renamed into place, before its description
        raise KeyboardInterrupt

    with open(samples.paths[3], "ab") as f:
        f.write(b"\0")
    with monkeypatch.context() as m:
        m.setattr("fasteval.files.atomic_write", crash)
        with pytest.raises(KeyboardInterrupt):
            DecodedSource(cache)("torchvision", discover(str(data)), small_spec, **args)
    assert not os.path.exists(meta) and os.path.getsize(entry) == pixels.numel()
    capsys.readouterr()
    stale("description is missing or damaged")
    with open(meta, "w") as f:
        f.write("{not json")
    stale("description is missing or damaged")
    other = DecodedSource(cache)("torchvision", samples.subset(list(range(10))), small_spec, **args)
    assert other.info["cache"].startswith("stale") and "sample list" in other.info["cache"]
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]


@pytest.fixture(scope="module")
def fitted_checkpoint(small_data, small_spec, tmp_path_factory) -> str:
    """A ResNet-18 whose head is the nearest class mean of its own features on ``small_data``: its
    predictions follow the pixels (a random head predicts nearly one class whatever they are), so
    damaged pixels change its counts."""
    model = _resnet(1)
    head, model.fc = model.fc, nn.Identity()
    features, labels = [], []
    with torch.no_grad():
        for images, batch_labels, real in make_loader("torchvision", discover(small_data), small_spec, batch_size=8,
                                                      workers=0, device=torch.device("cpu")):
            features.append(model(images[:real]))
            labels.append(batch_labels[:real])
    features, labels = torch.cat(features), torch.cat(labels)
    means = torch.stack([features[labels == c].mean(0) for c in range(3)])
    head.weight.data, head.bias.data = means, -0.5 * (means * means).sum(1)
    model.fc = head
    path = tmp_path_factory.mktemp("fitted") / "fitted.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_cache_damaged_content_gives_reference_counts(small_data, fitted_checkpoint, tmp_path, capsys):
    """`eval --cache` on an entry whose pixels changed at the same size (zeros over most samples: used,
    they give 7/21 right; one flipped bit in the middle): stale, rebuilt, and the counts are the
    reference loop's; then an intact entry: a hit, nothing decoded, the same counts. ``--exact off``:
    the counts are the stored pixels' own (the recheck re-evaluates some samples from the files, and
    can hide damaged pixels or not, depending on which samples it picks)."""
    cache = tmp_path / "cache"

    def run(*extra: str) -> dict:
        out = tmp_path / "out.json"
        assert main(["eval", small_data, "--weights", fitted_checkpoint, "--json", str(out), *SIZES, *extra]) == 0
        return json.loads(out.read_text())

    reference = run("--reference")
    truth = (reference["correct_top1"], reference["correct_top5"])
    assert truth == (21, 21)
    written = run("--cache", str(cache), "--exact", "off")
    assert written["decoded"]["cache"] == "written" and (written["correct_top1"], written["correct_top5"]) == truth
    entry = next(cache.glob("*.u8"))
    size = entry.stat().st_size

    def zeros(images):
        images[: size * 3 // 4] = 0

    def flip(images):
        images[size // 2] ^= 0x80

    for damage in (zeros, flip):
        images = np.memmap(entry, dtype=np.uint8, mode="r+")
        damage(images)
        images.flush()
        del images
        assert entry.stat().st_size == size
        capsys.readouterr()
        report = run("--cache", str(cache), "--exact", "off")
        assert report["decoded"]["cache"].startswith("stale: the data file's content changed"), report["decoded"]
        assert report["decoded"]["cache"].endswith("rebuilt") and report["decoded"]["decoded"]
        assert [line for line in capsys.readouterr().err.splitlines() if "is stale" in line], damage.__name__
        assert (report["correct_top1"], report["correct_top5"]) == truth, damage.__name__
        assert report["loss"] == pytest.approx(written["loss"], rel=1e-6)
    hit = run("--cache", str(cache), "--exact", "off")
    assert hit["decoded"]["cache"] == "hit" and not hit["decoded"]["decoded"]
    assert (hit["correct_top1"], hit["correct_top5"]) == truth
    assert hit["loss"] == pytest.approx(written["loss"], rel=1e-6)


def test_placement_by_size(monkeypatch):
    """Device when it fits in free GPU memory with a margin, else pinned host memory, else re-decoded
    (or read from the memory-mapped cache); on the CPU, host memory or re-decoded."""
    gib = 2**30
    monkeypatch.setattr(decoded, "available_host_memory", lambda: 32 * gib)  # half of it may hold the set
    monkeypatch.setattr(decoded, "free_device_memory", lambda device: 20 * gib)  # (20 - 2 reserved) / 2 = 9
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_placement(16 * gib, cpu, cached=False)[0] == "host"
    assert choose_placement(17 * gib, cpu, cached=False)[0] == "redecode"
    assert choose_placement(17 * gib, cpu, cached=True)[0] == "mapped"
    assert choose_placement(9 * gib, cuda, cached=False)[0] == "device"
    assert choose_placement(10 * gib, cuda, cached=False)[0] == "pinned"
    assert choose_placement(17 * gib, cuda, cached=False)[0] == "redecode"
    assert choose_placement(17 * gib, cuda, cached=True)[0] == "mapped"
    monkeypatch.setattr(decoded, "free_device_memory", lambda device: 1 * gib)
    assert choose_placement(1000, cuda, cached=False)[0] == "pinned"


@pytest.mark.slow
def test_redecode_when_nothing_holds_it(small_data, small_spec, checkpoints, tmp_path, monkeypatch, capsys):
    """Too big for memory and no cache: the plain loader, once per checkpoint, same results; the
    report says so."""
    monkeypatch.setattr(decoded, "available_host_memory", lambda: 1000)
    out = tmp_path / "r.json"
    assert main(["eval", small_data, "--weights", *checkpoints[:2], "--json", str(out), "--exact", "off",
                 "--plot", str(tmp_path), *SIZES]) == 0
    assert "decoded again for every checkpoint" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["decoded"]["placement"] == "redecode"
    assert not report["checkpoints"][0]["loader"].startswith("decoded store")
    with open(tmp_path / "checkpoints.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_best_and_paired_counts_by_hand():
    """Ties on top-1 go to top-5, then to the lower loss, then to the first given; the discordant counts
    and the exact p-value of a hand-made case (only-this 1, only-best 5: p = 2 x (1 + 6) / 2**6)."""
    from fasteval.evaluation.metrics import EvalResult
    from fasteval.evaluation.sweep import best_index, paired_test

    def result(top1, top5, loss, predictions=None):
        return EvalResult(samples=10, correct_top1=top1, correct_top5=top5, loss_sum=loss,
                          predictions=None if predictions is None else torch.tensor(predictions))

    assert best_index([result(5, 8, 3.0), result(6, 7, 9.0)]) == 1
    assert best_index([result(6, 7, 3.0), result(6, 8, 9.0)]) == 1
    assert best_index([result(6, 8, 3.0), result(6, 8, 2.0)]) == 1
    assert best_index([result(6, 8, 2.0), result(6, 8, 2.0)]) == 0
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    best = result(7, 8, 1.0, [0, 1, 2, 0, 1, 2, 0, 0])  # 7 right
    other = result(3, 8, 1.0, [0, 1, 0, 1, 2, 0, 1, 1])  # right at 0, 1 and 7 (only it: 7; only best: 2-6)
    assert paired_test(labels, other, best) == {"only_this_correct": 1, "only_best_correct": 5,
                                                "p_value": pytest.approx(2 * 7 / 64)}
    assert paired_test(labels, best, best) == {"only_this_correct": 0, "only_best_correct": 0, "p_value": 1.0}
