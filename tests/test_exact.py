"""The exact-count recheck: the default fast run reports the reference's own top-1 and top-5 counts."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch

from fasteval.cli import main
from fasteval.errors import FastevalError
from fasteval.evaluation.exact import calibration_positions, max_logit_error, resolve_exact
from fasteval.evaluation.fast import FastOptions, evaluate_fast
from fasteval.model.inference import FastModel
from fasteval.data.loader_dali import dali_available
from fasteval.data.loaders import make_loader
from fasteval.evaluation.reference import evaluate_reference, reference_logits
from fasteval.data.samples import discover
from fasteval.evaluation.validate import compare

CPU = torch.device("cpu")
LOADER = "dali" if dali_available() else "torchvision"


def test_calibration_positions_spread_over_the_dataset():
    assert calibration_positions(5, 8) == [0, 1, 2, 3, 4]
    spread = calibration_positions(1000, 8)
    assert len(spread) == 8 and spread[0] == 0 and spread[-1] == 999
    assert max(b - a for a, b in zip(spread, spread[1:])) <= 1000 // 7 + 1


def test_max_logit_error_has_no_bound_for_non_finite_differences():
    a = torch.tensor([[1.0, 2.0, float("-inf"), float("nan")]])
    assert max_logit_error(a, a.clone()) == 0.0  # the same non-finite values: no error
    assert max_logit_error(a, a + torch.tensor([[0.5, -0.25, 0.0, 0.0]])) == 0.5
    assert max_logit_error(a, torch.tensor([[1.0, 2.0, 3.0, float("nan")]])) == math.inf
    assert max_logit_error(a, torch.tensor([[1.0, 2.0, float("-inf"), 4.0]])) == math.inf


def test_exact_modes():
    assert resolve_exact("auto")[0] and resolve_exact("on")[0] and not resolve_exact("off")[0]
    with pytest.raises(FastevalError, match="--exact"):
        resolve_exact("maybe")


def _fast_and_reference_logits(samples, model, spec):
    """Every sample's logits on the fast path (bf16, the fast loader) and through the reference's code."""
    loader = make_loader(LOADER, samples, spec, batch_size=8, workers=1, device=CPU)
    fast_model = FastModel(copy.deepcopy(model), CPU, "bf16", compile=False)
    with torch.inference_mode():
        fast = torch.cat([fast_model(b.images)[:b.real].float() for b in loader])
    ref = reference_logits(samples, list(range(len(samples))), model, spec, batch_size=8, workers=0, device=CPU)
    return fast, ref


def near_tie_model(samples, model, spec):
    """The model with its head's bias moved so that one sample sits between its fp32 and bf16 logits'
    decisions: the reference predicts one class, the bf16 fast path the runner-up. Returns (model, index)."""
    fast, ref = _fast_and_reference_logits(samples, model, spec)
    top2 = ref.topk(2, dim=1).indices
    first, second = top2[:, 0], top2[:, 1]
    rows = torch.arange(len(samples))
    gap_ref = ref[rows, first] - ref[rows, second]
    gap_fast = fast[rows, first] - fast[rows, second]
    index = int((gap_ref - gap_fast).abs().argmax())
    shift = float(gap_ref[index] + gap_fast[index]) / 2  # halfway between the two decisions
    tied = copy.deepcopy(model)
    with torch.no_grad():
        tied.fc.bias[second[index]] += shift
    return tied, index


@pytest.fixture(scope="module")
def near_tie(small_data, model_3cls, small_spec):
    samples = discover(small_data)
    model, index = near_tie_model(samples, model_3cls, small_spec)
    reference = evaluate_reference(samples, copy.deepcopy(model), small_spec, batch_size=8, workers=0,
                                   progress=False)
    return samples, model, index, reference


def _fast(samples, model, spec, exact, precision="bf16"):
    options = FastOptions(loader=LOADER, precision=precision, compile=False, batch_size=8, workers=1, exact=exact)
    return evaluate_fast(samples, copy.deepcopy(model), spec, device=CPU, options=options, progress=False)


def test_the_gate_catches_a_flip_made_on_purpose(near_tie, small_spec):
    samples, model, index, reference = near_tie
    unchecked = _fast(samples, model, small_spec, "off")
    # The construction works: without the recheck, the fast path flips the placed sample.
    assert int(unchecked.predictions[index]) != int(reference.predictions[index])
    assert unchecked.extra["exact"]["enabled"] is False and not unchecked.rechecked.any()

    fast = _fast(samples, model, small_spec, "auto")
    cmp = compare(samples, reference, fast)
    assert cmp["flipped"] == 0
    assert (fast.correct_top1, fast.correct_top5) == (reference.correct_top1, reference.correct_top5)
    assert torch.equal(fast.topk_hits, reference.topk_hits)
    exact = fast.extra["exact"]
    assert fast.rechecked[index] and float(unchecked.margins[index]) <= exact["tau"]
    assert exact["changed_top1"] >= 1 and exact["rechecked"] == int(fast.rechecked.sum())
    assert exact["max_logit_error"] > 0 and exact["tau"] == pytest.approx(exact["safety"] * 2 * exact["max_logit_error"])
    # Rechecked samples carry the reference's fp32 values; the others stay within bf16's error.
    again = fast.rechecked
    assert torch.equal(fast.predictions[again], reference.predictions[again])
    torch.testing.assert_close(fast.losses[again], reference.losses[again], rtol=1e-4, atol=1e-5)
    assert abs(fast.loss - reference.loss) <= 3e-3


def test_odd_formats_give_the_reference_counts_by_default(kinds_data, model_3cls, small_spec):
    """Gray/CMYK/EXIF JPEGs, RGBA/palette/16-bit PNGs, BMP, WebP, TIFF, PPM/PGM, at batch 4."""
    import torchvision

    samples = discover(kinds_data)
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=samples.num_classes).eval()
    reference = evaluate_reference(samples, copy.deepcopy(model), small_spec, batch_size=4, workers=0,
                                   progress=False)
    options = FastOptions(loader=LOADER, precision="bf16", compile=False, batch_size=4, workers=1)
    fast = evaluate_fast(samples, copy.deepcopy(model), small_spec, device=CPU, options=options, progress=False)
    assert compare(samples, reference, fast)["flipped"] == 0
    assert (fast.correct_top1, fast.correct_top5) == (reference.correct_top1, reference.correct_top5)
    assert abs(fast.loss - reference.loss) <= 3e-3
    # The mean of per-batch means follows the reference's batch boundaries in sample order, whichever
    # path computed each sample (16-bit PNGs go to the reference's decoder).
    assert len(fast.batch_losses) == len(reference.batch_losses) == math.ceil(len(samples) / 4)
    assert fast.loss_batch_mean == pytest.approx(reference.loss_batch_mean, abs=3e-3)
    if LOADER == "dali":
        assert fast.extra["pil_fallback_files"] >= 1


def test_cli_exact_option_and_prediction_columns(small_data, weights_3cls, tmp_path, capsys):
    common = [small_data, "--weights", weights_3cls, "--resize", "40", "--crop", "32", "--batch-size", "8",
              "--workers", "0", "--no-compile", "--no-progress"]
    assert main(["eval", *common, "--exact", "sometimes"]) == 2
    assert "--exact" in capsys.readouterr().err
    out = tmp_path / "p.csv"
    assert main(["eval", *common, "--predictions", str(out)]) == 0
    assert "exact counts" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "prediction", "loss", "top5", "confidence", "margin", "rechecked"]
    assert len(rows) == 21 and sum(int(r["rechecked"]) for r in rows) >= 8  # the calibration samples at least
    for r in rows:
        top = [int(c) for c in r["top5"].split()]
        assert len(top) == 3 and top[0] == int(r["prediction"])  # 3 classes: all of them, best first
        assert 0 < float(r["confidence"]) <= 1 and float(r["margin"]) >= 0


def test_metrics_fall_back_to_the_twin_when_triton_cannot_run(small_data, model_3cls, small_spec, monkeypatch,
                                                              capsys):
    """Triton builds a C launcher at run time: where it cannot, the run goes on with the PyTorch twin."""
    import fasteval.evaluation.plan
    import fasteval.kernels.fused_metrics as fm

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to build the launcher: gcc not found")

    monkeypatch.setattr(fasteval.evaluation.plan, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(fm, "metrics_triton", broken)
    samples = discover(small_data)
    fast = _fast(samples, model_3cls, small_spec, "off", precision="fp32")
    err = capsys.readouterr().err
    assert fast.extra["metrics_backend"] == "torch" and fast.samples == 21
    assert err.count("warning: the Triton metrics kernel cannot run") == 1 and "Traceback" not in err


def test_a_dataset_no_larger_than_the_calibration_goes_to_the_reference_whole(tmp_path, model_3cls, small_spec):
    from fasteval.data.synth import synth_dataset

    samples = discover(synth_dataset(tmp_path / "six", classes=3, per_class=2, size="72x60", seed=9, workers=1))
    reference = evaluate_reference(samples, copy.deepcopy(model_3cls), small_spec, batch_size=4, workers=0,
                                   progress=False)
    fast = _fast(samples, model_3cls, small_spec, "auto")
    assert fast.extra["exact"]["all_by_reference"] and fast.rechecked.all() and fast.extra["loader"] == "none"
    assert torch.equal(fast.predictions, reference.predictions)
    torch.testing.assert_close(fast.losses, reference.losses)
    assert (fast.correct_top1, fast.correct_top5) == (reference.correct_top1, reference.correct_top5)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "squeezenet1_1"])
def test_the_fast_model_keeps_its_head_in_fp32_and_leaves_the_callers_model_alone(arch):
    """bf16 logits are rounded to 8 bits of mantissa: the head runs in fp32 (where it is a Linear)."""
    import torchvision

    from fasteval.evaluation.fast import Fp32Head, keep_head_fp32

    model = torchvision.models.get_model(arch, num_classes=7).eval()
    copy_ = copy.deepcopy(model)
    wrapped = keep_head_fp32(copy_)
    assert wrapped == (arch != "squeezenet1_1")  # SqueezeNet's head is a convolution
    assert sum(isinstance(m, Fp32Head) for m in copy_.modules()) == int(wrapped)
    assert not any(isinstance(m, Fp32Head) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = copy_(x)
    assert out.dtype == (torch.float32 if wrapped else torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), model(x))  # outside autocast: the same module, the same values
