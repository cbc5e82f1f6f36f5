"""The fast evaluator against the reference loop, its no-sync loop, static shapes and fallbacks."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fasteval import MetricsAccumulator
from fasteval.cli import main
from fasteval.errors import FastevalError
from fasteval.evaluation.fast import FastEvaluator, FastOptions, evaluate_fast, run_loop
from fasteval.model.inference import FastModel, resolve_precision
from fasteval.data.batch import Batch
from fasteval.data.loaders import make_loader
from fasteval.model.models import build_model
from fasteval.data.preprocess import PRESETS, get_spec
from fasteval.evaluation.reference import evaluate_reference
from fasteval.data.samples import discover
from fasteval.evaluation.validate import compare

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo_reference(demo):
    data, weights = demo
    samples = discover(data)
    model = build_model("resnet18", weights, samples.num_classes)
    return samples, weights, evaluate_reference(samples, model, PRESETS["imagenet"], batch_size=64, workers=2,
                                                progress=False)


def _fast(samples, weights, **options):
    model = build_model("resnet18", weights, samples.num_classes)
    return evaluate_fast(samples, model, PRESETS["imagenet"], device=CPU, options=FastOptions(**options),
                         progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_fp32_matches_reference_on_demo(demo_reference, loader):
    from fasteval.data.loader_dali import dali_available

    if loader == "dali" and not dali_available():
        pytest.skip("DALI not installed")
    samples, weights, ref = demo_reference
    fast = _fast(samples, weights, loader=loader, precision="fp32", compile=False, batch_size=64, workers=2)
    cmp = compare(samples, ref, fast)
    assert fast.samples == ref.samples == len(samples)
    assert cmp["agreement"] >= 0.99
    assert abs(cmp["delta_top1"]) <= 1.0 and abs(cmp["delta_top5"]) <= 1.0
    assert abs(cmp["delta_loss"]) <= 1e-3
    # 240 images on the CPU: the PIL loader's small run reads the reference's pixels in-process
    assert fast.extra["loader"].startswith({"dali": "dali", "torchvision": "pil-cpu"}[loader])
    assert fast.extra["precision"] == "fp32"


@pytest.mark.slow
def test_bf16_compiled_is_bounded_and_compiles_once(demo_reference):
    import torch._dynamo

    samples, weights, ref = demo_reference
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast = _fast(samples, weights, precision="bf16", compile=True, batch_size=64, workers=2)
    # 240 samples in batches of 64: the short last batch is padded, so one graph serves every batch.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert fast.extra["compile"] is True and fast.extra["precision"] == "bf16"
    assert fast.warmup_seconds > 0
    cmp = compare(samples, ref, fast)
    assert cmp["agreement"] >= 0.97
    assert abs(cmp["delta_top1"]) <= 2.0
    assert abs(cmp["delta_loss"]) <= 0.05 * max(ref.loss, 0.1)
    # Inductor rounds where eager autocast rounds (inference.COMPILE_OPTIONS): the compiled logits are eager's,
    # bit for bit, so every per-sample value, the logit error and the recheck are the eager run's.
    eager = _fast(samples, weights, precision="bf16", compile=False, batch_size=64, workers=2)
    assert eager.extra["compile"] is False
    for name in ("predictions", "losses", "topk_classes", "confidences", "margins", "rechecked"):
        assert torch.equal(getattr(fast, name), getattr(eager, name)), name
    assert fast.extra["exact"]["max_logit_error"] == eager.extra["exact"]["max_logit_error"]


def test_small_dataset_counts_equal_reference(small_data, weights_3cls, small_spec):
    samples = discover(small_data)
    ref = evaluate_reference(samples, build_model("resnet18", weights_3cls, 3), small_spec, batch_size=4, workers=0,
                             progress=False)
    model = build_model("resnet18", weights_3cls, 3)
    fast = evaluate_fast(samples, model, small_spec, options=FastOptions(precision="fp32", compile=False,
                                                                         batch_size=4, workers=1), progress=False)
    assert fast.samples == 21 and len(fast.predictions) == 21
    assert compare(samples, ref, fast)["agreement"] >= 20 / 21
    assert fast.loss == pytest.approx(ref.loss, rel=1e-3)
    # The fast path reports the tutorial figure too, over the same batches.
    assert len(fast.batch_losses) == len(ref.batch_losses) == 6


class _NoHostReads:
    """Make every way of reading a tensor back to the host raise inside the batch loop."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __enter__(self):
        def boom(*args, **kwargs):
            raise AssertionError("host read inside the batch loop")

        for name in self.NAMES:
            self.monkeypatch.setattr(torch.Tensor, name, boom)

    def __exit__(self, *exc):
        self.monkeypatch.undo()


def test_batch_loop_never_reads_back_to_the_host(small_data, weights_3cls, small_spec, monkeypatch):
    samples = discover(small_data)
    loader = make_loader("torchvision", samples, small_spec, batch_size=4, workers=0, device=CPU)
    batches = list(loader)  # decoded up front: the loop under test is model + metrics only
    model = FastModel(build_model("resnet18", weights_3cls, 3), CPU, "fp32", compile=False)
    acc = MetricsAccumulator(len(samples), CPU)
    with torch.inference_mode(), _NoHostReads(monkeypatch):
        run_loop(batches, model, acc)
    assert [b.real for b in batches] == [4, 4, 4, 4, 4, 1]
    assert acc.result()["count"] == 21


@pytest.mark.cuda
def test_cuda_batch_loop_has_no_sync(small_data, weights_3cls, small_spec):
    device = torch.device("cuda")
    samples = discover(small_data)
    batches = list(make_loader("torchvision", samples, small_spec, batch_size=4, workers=0, device=device))
    model = FastModel(build_model("resnet18", weights_3cls, 3), device, "bf16", compile=False)
    acc = MetricsAccumulator(len(samples), device)
    with torch.inference_mode():
        model(batches[0].images)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_loop(batches, model, acc)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert acc.result()["count"] == 21


@pytest.mark.cuda
def test_cuda_fast_path_matches_reference(demo_reference):
    samples, weights, ref = demo_reference
    model = build_model("resnet18", weights, samples.num_classes)
    for loader in ("auto", "torchvision"):
        fast = evaluate_fast(samples, model, PRESETS["imagenet"], device="cuda",
                             options=FastOptions(loader=loader, precision="bf16", batch_size=64, workers=4),
                             progress=False)
        cmp = compare(samples, ref, fast)
        assert fast.samples == len(samples) and cmp["agreement"] >= 0.97, cmp


def test_compile_failure_falls_back_to_eager(small_data, weights_3cls, small_spec, monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    samples = discover(small_data)
    ev = FastEvaluator(samples, build_model("resnet18", weights_3cls, 3), small_spec, CPU,
                       FastOptions(precision="fp32", compile=True, batch_size=8, workers=0))
    result = ev.run(progress=False)
    assert result.extra["compile"] is False and result.samples == 21
    err = capsys.readouterr().err
    assert "warning: torch.compile failed, running eager: InvalidCxxCompiler" in err
    assert len([line for line in err.splitlines() if "warning" in line]) == 1


def test_every_file_kind_matches_reference_through_the_evaluator(kinds_data, monkeypatch):
    """DALI (named: a run this small reads PIL's pixels by default, tests/test_prefetch.py) hands the
    files it would decode differently to the reference's code."""
    import torchvision

    from fasteval.data.loader_dali import dali_available

    if not dali_available():
        pytest.skip("DALI not installed")
    samples, spec = discover(kinds_data), get_spec("imagenet", resize=160, crop=128)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2).eval()
    ref = evaluate_reference(samples, net, spec, batch_size=4, workers=0, progress=False)
    ev = FastEvaluator(samples, net, spec, CPU, FastOptions(precision="fp32", compile=False, batch_size=4,
                                                            workers=1, loader="dali"))
    fast = ev.run(progress=False)
    assert fast.extra["pil_fallback_files"] == 1  # the 16-bit PNG
    cmp = compare(samples, ref, fast)
    assert fast.samples == 15 and cmp["agreement"] == 1.0
    assert cmp["max_sample_loss_diff"] < 5e-3
    assert fast.loss_sum == pytest.approx(ref.loss_sum, rel=1e-3)
    # Without the PIL fallback, the 16-bit file would be decoded differently from the reference.
    import fasteval.evaluation.plan

    monkeypatch.setattr(fasteval.evaluation.plan, "needs_pil", lambda samples: [])
    unsplit = FastEvaluator(samples, net, spec, CPU, FastOptions(loader="dali", precision="fp32", compile=False,
                                                                 batch_size=4, workers=1, exact="off")
                            ).run(progress=False)
    gray16 = next(i for i, p in enumerate(samples.paths) if p.endswith("gray16.png"))
    assert abs(float(unsplit.losses[gray16]) - float(ref.losses[gray16])) > 5e-3


def test_evaluator_is_repeatable(small_data, weights_3cls, small_spec):
    ev = FastEvaluator(discover(small_data), build_model("resnet18", weights_3cls, 3), small_spec, CPU,
                       FastOptions(precision="fp32", compile=False, batch_size=8, workers=1))
    a, b = ev.run(progress=False), ev.run(progress=False)
    assert torch.equal(a.predictions, b.predictions) and a.loss_sum == b.loss_sum


def test_precision_choices():
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("auto", CPU) in ("bf16", "fp32")
    with pytest.raises(FastevalError, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(FastevalError, match="unknown --precision 'int8'"):
        resolve_precision("int8", CPU)


def test_cli_fast_eval_predictions_and_validate(small_data, weights_3cls, tmp_path, capsys):
    out, preds = tmp_path / "r.json", tmp_path / "p.csv"
    rc = main(["eval", small_data, "--weights", weights_3cls, "--validate", "--no-compile", "--precision", "fp32",
               "--resize", "40", "--crop", "32", "--batch-size", "4", "--workers", "1", "--no-progress",
               "--json", str(out), "--predictions", str(preds)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "validation: fast vs reference" in printed and "agreement" in printed
    report = json.loads(out.read_text())
    assert report["samples"] == 21 and report["loader"] == "pil-cpu, 1 thread(s) between batches"  # --validate: not at start-up
    assert report["precision"] == "fp32" and report["compile"] is False and "warmup_seconds" in report
    assert report["reference"]["samples"] == 21 and 0.9 <= report["validation"]["agreement"] <= 1.0
    rows = list(csv.DictReader(preds.open()))
    samples = discover(small_data)
    assert [r["path"] for r in rows] == [p[len(small_data) + 1:] for p in samples.paths]
    assert [int(r["label"]) for r in rows] == samples.labels
    assert sum(float(r["loss"]) for r in rows) == pytest.approx(report["loss_sum"], rel=1e-5)


def test_static_batch_padding_keeps_shapes(small_data, small_spec):
    loader = make_loader("torchvision", discover(small_data), small_spec, batch_size=8, workers=0, device=CPU)
    shapes = {tuple(b.images.shape) for b in loader}
    assert shapes == {(8, 3, 32, 32)}
    assert isinstance(next(iter(loader)), Batch)


def test_equal_batches_compute_no_padding_and_keep_the_reference_figures(small_data, weights_3cls, small_spec):
    samples = discover(small_data)  # 21 samples: --batch-size 8 makes 8+8+5, the fast path 7+7+7
    options = FastOptions(precision="fp32", compile=False, batch_size=8, workers=0, exact="off")
    ev = FastEvaluator(samples, build_model("resnet18", weights_3cls, 3), small_spec, CPU, options)
    assert ev.plan.batch_shape.value == 7 and [b.real for b in ev.loader] == [7, 7, 7]
    assert {tuple(b.images.shape) for b in ev.loader} == {(7, 3, 32, 32)}
    fast = ev.run(progress=False)
    ref = evaluate_reference(samples, build_model("resnet18", weights_3cls, 3), small_spec, batch_size=8,
                             workers=0, progress=False)
    assert fast.extra["batch_shape"] == 7
    assert fast.extra["batch_shape_reason"] == ("3 batch(es) of 7: as equal as --batch-size 8 allows, 0 padding "
                                                "row(s) in one process (batches of 8 would pad 3)")
    # The tutorial's figure is over --batch-size's batches (8, 8, 5), whatever shape the fast path ran.
    assert len(fast.batch_losses) == len(ref.batch_losses) == 3
    assert fast.batch_losses == pytest.approx(ref.batch_losses, rel=1e-4)  # 8, 8, 5, not 7, 7, 7
    assert fast.loss_batch_mean == pytest.approx(ref.loss_batch_mean, rel=1e-4)
    assert compare(samples, ref, fast)["agreement"] >= 20 / 21 and fast.loss == pytest.approx(ref.loss, rel=1e-3)


def test_unusable_spec_for_fast_path(small_data):
    with pytest.raises(FastevalError):
        get_spec("imagenet", crop=0)


def test_both_paths_refuse_a_no_crop_preset_on_mixed_aspect_ratios(varied_data, capsys):
    samples = discover(varied_data)
    model = build_model("resnet18", None, samples.num_classes)
    with pytest.raises(FastevalError, match="share one aspect ratio"):
        evaluate_reference(samples, model, PRESETS["seed"], workers=0, progress=False)
    with pytest.raises(FastevalError, match="share one aspect ratio"):
        evaluate_fast(samples, model, PRESETS["seed"], options=FastOptions(compile=False), progress=False)
    assert main(["eval", varied_data, "--preset", "seed", "--no-progress"]) == 2
    assert "share one aspect ratio" in capsys.readouterr().err
