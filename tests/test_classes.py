"""The class report (per-class metrics, confusion matrix, calibration, intervals) against scikit-learn,
torchmetrics, scipy and float64 oracles on the same predictions, and the kernel's squared-probability sums."""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from fasteval.evaluation.classes import calibration_bins, class_report, confused_pairs, confusion_matrix
from fasteval.evaluation.metrics import EvalResult
from fasteval.kernels.fused_metrics import metrics_torch, metrics_triton, triton_usable
from fasteval.output.report import build_report, format_table, write_json

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_usable(torch.device(DEVICE)),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")


def result_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> EvalResult:
    """A run's per-sample outputs, as the fast path's twin computes them from ``logits``."""
    m = metrics_torch(logits, labels)
    return EvalResult(samples=len(labels), correct_top1=int(m.correct), correct_top5=int(m.correct_topk),
                      loss_sum=float(m.loss_sum), predictions=m.pred, losses=m.loss, topk_hits=m.topk_hit,
                      topk_classes=m.topk_idx, confidences=m.confidence, prob_sq_sums=m.prob_sq_sum)


def names(num_classes: int, labels) -> SimpleNamespace:
    return SimpleNamespace(labels=[int(v) for v in labels], classes=[f"c{i}" for i in range(num_classes)])


def adversarial_logits(seed: int = 0):
    """103 samples (a prime), 7 classes: class 6 has no samples, class 5 is never predicted, ties in
    the logits (first index wins) and hence in the confidences."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 6, (103,), generator=g)
    logits = torch.randn(103, 7, generator=g) * 2
    logits[torch.arange(103), labels] += 1.5
    logits[:, 5] = -20.0
    logits[:10] = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, -20.0, 0.0])  # tied maxima: identical confidences
    return logits, labels


def test_per_class_figures_equal_sklearn_and_torchmetrics():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    tm = pytest.importorskip("torchmetrics.classification")
    logits, labels = adversarial_logits()
    C = logits.shape[1]
    result = result_from_logits(logits, labels)
    report = class_report(result, names(C, labels))
    y, pred = labels.numpy(), result.predictions.numpy()
    assert set(pred) <= set(range(5)) | {6} and 5 not in set(pred) and 6 not in set(y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the empty class, by design of the test
        p, r, f, support = sklearn_metrics.precision_recall_fscore_support(y, pred, labels=range(C), zero_division=0)
        macro = sklearn_metrics.precision_recall_fscore_support(y, pred, zero_division=0, average="macro")
        balanced = sklearn_metrics.balanced_accuracy_score(y, pred)
    assert report["confusion_matrix"] == sklearn_metrics.confusion_matrix(y, pred, labels=range(C)).tolist()
    per = report["per_class"]
    assert [c["class"] for c in per] == [f"c{i}" for i in range(C)]
    assert [c["samples"] for c in per] == support.tolist()
    assert [c["correct_top1"] for c in per] == [int(((y == k) & (pred == k)).sum()) for k in range(C)]
    rows = logits.tolist()  # the top-5 contract by hand: rank = larger logits + equal ones at lower indices
    hit5 = [sum(1 for j, v in enumerate(row) if v > row[t] or (v == row[t] and j < t)) < 5
            for row, t in zip(rows, labels.tolist())]
    assert [c["correct_top5"] for c in per] == [sum(h for h, t in zip(hit5, y) if t == k) for k in range(C)]
    assert [c["precision"] for c in per] == pytest.approx(p.tolist(), abs=1e-12)
    assert [c["recall"] for c in per] == pytest.approx(r.tolist(), abs=1e-12)
    assert [c["f1"] for c in per] == pytest.approx(f.tolist(), abs=1e-12)
    assert per[5]["precision"] == 0.0 and per[6]["recall"] == 0.0 and per[6]["f1"] == 0.0
    assert [report["macro"][k] for k in ("precision", "recall", "f1")] == pytest.approx(list(macro[:3]), abs=1e-12)
    assert report["balanced_accuracy"] == pytest.approx(balanced, abs=1e-12)
    # --classes naming more classes than the data holds (a subset): the unseen ones change no average
    wider = class_report(result, names(C + 3, labels))
    assert wider["macro"] == report["macro"] and wider["balanced_accuracy"] == report["balanced_accuracy"]
    assert [c["samples"] for c in wider["per_class"][C:]] == [0, 0, 0]

    # torchmetrics on the same predictions (one-hot scores: its argmax is ours).
    scores = torch.nn.functional.one_hot(result.predictions, C).float()
    for metric, key in ((tm.MulticlassPrecision, "precision"), (tm.MulticlassRecall, "recall")):
        want = metric(num_classes=C, average=None)(scores, labels)
        assert [c[key] for c in per] == pytest.approx(want.tolist(), abs=1e-6)


def test_calibration_equals_torchmetrics_and_brier_a_float64_oracle():
    tm = pytest.importorskip("torchmetrics.classification")
    logits, labels = adversarial_logits(seed=1)
    C = logits.shape[1]
    result = result_from_logits(logits, labels)
    cal = class_report(result, names(C, labels))["calibration"]
    probs = torch.softmax(logits, dim=1)
    want = tm.MulticlassCalibrationError(num_classes=C, n_bins=15, norm="l1")(probs, labels)
    assert cal["ece"] == pytest.approx(float(want), rel=1e-5)
    p64 = torch.softmax(logits.double(), dim=1)
    brier = ((p64 - torch.nn.functional.one_hot(labels, C).double()) ** 2).sum(dim=1).mean()
    assert cal["brier"] == pytest.approx(float(brier), rel=1e-6)
    assert sum(b["samples"] for b in cal["reliability"]) == len(labels) and len(cal["reliability"]) == 16


def test_confidences_on_bin_edges_fall_in_the_bin_above_as_torchmetrics_puts_them():
    tm = pytest.importorskip("torchmetrics.classification")
    edges = torch.linspace(0, 1, 16)
    conf = torch.stack([edges[1], edges[1], edges[4], edges[7], edges[7], edges[14], edges[15], edges[15],
                        torch.nextafter(edges[7], torch.tensor(0.0)), torch.tensor(0.5)])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    pred = torch.tensor([0, 0, 2, 0, 2, 2, 0, 1, 1, 0])
    n, C = len(labels), 3
    result = EvalResult(samples=n, correct_top1=int((pred == labels).sum()), correct_top5=n, loss_sum=0.0,
                        predictions=pred, topk_hits=torch.ones(n, dtype=torch.bool), confidences=conf)
    cal = class_report(result, names(C, labels))["calibration"]
    count, _, _ = calibration_bins(conf, pred == labels)
    # edges[j] is in bin j ([b_j, b_j+1)); a hair below edges[7] in bin 6; exactly 1 in the 16th slot.
    expected = [0] * 16
    for j in (1, 1, 4, 7, 7, 14, 15, 15, 6, 7):
        expected[j] += 1
    assert count.tolist() == expected
    assert [b["samples"] for b in cal["reliability"]] == expected and cal["reliability"][15]["low"] == 1.0
    scores = torch.zeros(n, C)
    scores[torch.arange(n), pred] = conf  # its max (and argmax) are our confidence and prediction
    want = tm.MulticlassCalibrationError(num_classes=C, n_bins=15, norm="l1")(scores, labels)
    assert cal["ece"] == pytest.approx(float(want), rel=1e-6)
    assert cal["brier"] is None  # no squared sums in this result


def test_hand_computed_case_worst_classes_confused_pairs_intervals_and_table():
    stats = pytest.importorskip("scipy.stats")
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    pred = torch.tensor([1, 1, 0, 1, 0, 2, 2, 2, 0])
    n = len(labels)
    result = EvalResult(samples=n, correct_top1=5, correct_top5=7, loss_sum=0.0, predictions=pred,
                        topk_hits=torch.tensor([1, 1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool),
                        confidences=torch.full((n,), 0.5))
    report = class_report(result, names(3, labels))
    assert report["confusion_matrix"] == [[1, 2, 0], [1, 1, 0], [1, 0, 3]]
    assert report["worst_classes"] == [0, 1, 2]
    assert [(p["true_index"], p["predicted_index"], p["count"]) for p in report["confused_pairs"]] == \
        [(0, 1, 2), (1, 0, 1), (2, 0, 1)]
    assert [c["correct_top5"] for c in report["per_class"]] == [3, 1, 3]
    for c in report["per_class"]:
        ci = stats.binomtest(c["correct_top1"], c["samples"]).proportion_ci(0.95, method="wilson")
        assert c["recall_interval"] == pytest.approx([ci.low, ci.high], abs=1e-9)
    ci = stats.binomtest(5, n).proportion_ci(0.95, method="wilson")
    assert report["intervals"]["top1"] == pytest.approx([100 * ci.low, 100 * ci.high], abs=1e-7)
    table = format_table({**result.to_dict(), **report})
    assert "c0 -> c1  2" in table and "worst classes (recall)" in table and "balanced accuracy" in table


def test_nan_rows_make_ece_and_brier_nan_and_json_null(tmp_path):
    logits, labels = adversarial_logits(seed=2)
    logits[7, 3] = float("nan")
    result = result_from_logits(logits, labels)
    assert math.isnan(float(result.prob_sq_sums[7])) and math.isnan(float(result.confidences[7]))
    report = build_report(result, {}, None, names(7, labels))
    assert math.isnan(report["calibration"]["ece"]) and math.isnan(report["calibration"]["brier"])
    assert report["calibration"]["nonfinite_confidences"] == 1
    assert int(result.predictions[7]) == 3 and sum(map(sum, report["confusion_matrix"])) == len(labels)
    path = tmp_path / "r.json"
    write_json(report, str(path))
    loaded = json.loads(path.read_text())
    assert loaded["calibration"]["ece"] is None and loaded["per_class"][0]["class"] == "c0"


def test_refuses_mismatched_labels():
    # Predictions 0, 1, 2, 0 (one-hot logits): class 2 lies outside a 2-class dataset.
    result = result_from_logits(torch.eye(3)[[0, 1, 2, 0]], torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="4 per-sample"):
        class_report(result, names(3, [0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_report(result, names(2, [0, 1, 1, 0]))


def test_confusion_helpers_on_large_class_counts():
    g = torch.Generator().manual_seed(4)
    labels, pred = torch.randint(0, 131, (2000,), generator=g), torch.randint(0, 131, (2000,), generator=g)
    cm = confusion_matrix(labels, pred, 131)
    brute = torch.zeros(131, 131, dtype=torch.int64)
    for t, p in zip(labels.tolist(), pred.tolist()):
        brute[t, p] += 1
    assert torch.equal(cm, brute)
    pairs = confused_pairs(cm, [str(i) for i in range(131)])
    off = [(-int(brute[t, p]), t, p) for t in range(131) for p in range(131) if t != p]
    assert [(-p["count"], p["true_index"], p["predicted_index"]) for p in pairs] == sorted(off)[:5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_prob_sq_sum_wide_rows_against_float64_softmax(backend, dtype):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 1000, generator=g) * 4).to(dtype)
    logits[1, :] = -5.0
    logits[1, 999] = 30.0  # one dominant class in the last block: the sum is nearly 1
    labels = torch.tensor([0, 999, 512])
    run = metrics_triton if backend == "triton" else metrics_torch
    blocks = {"block_c": 128} if backend == "triton" else {}  # 8 column blocks
    m = run(logits.to(DEVICE), labels.to(DEVICE), **blocks)
    want = torch.softmax(logits.double(), dim=1).pow(2).sum(dim=1)
    torch.testing.assert_close(m.prob_sq_sum.cpu().double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
def test_class_report_on_cuda_tensors_equals_cpu():
    logits, labels = adversarial_logits(seed=3)
    cpu = result_from_logits(logits, labels)
    gpu = result_from_logits(logits.cuda(), labels.cuda())
    a, b = class_report(cpu, names(7, labels)), class_report(gpu, names(7, labels))
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["per_class"] == b["per_class"]
    assert a["calibration"]["ece"] == pytest.approx(b["calibration"]["ece"], rel=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_prob_sq_sum_is_nan_where_softmax_is(backend):
    inf = float("inf")
    logits = torch.tensor([[0.0, inf, 1.0], [-inf, -inf, -inf], [-inf, 2.0, 2.0], [1.0, float("nan"), 0.0]])
    labels = torch.tensor([0, 1, 0, 2])
    run = metrics_triton if backend == "triton" else metrics_torch
    m = run(logits.to(DEVICE), labels.to(DEVICE), check_labels=False)
    want = torch.softmax(logits.double(), dim=1).pow(2).sum(dim=1)  # NaN, NaN, 0.5, NaN
    assert want[2] == 0.5 and int(torch.isnan(want).sum()) == 3
    torch.testing.assert_close(m.prob_sq_sum.cpu().double(), want, equal_nan=True)
    # Per-sample Brier of the -inf label row: p_label = exp(-inf loss) = 0, so 0.5 + 1.
    brier = class_report(result_from_logits(logits[2:3], labels[2:3]), names(3, [0]))["calibration"]["brier"]
    assert brier == pytest.approx(1.5)


def test_the_recheck_writes_the_reference_squared_sums():
    from fasteval.data.samples import SampleList
    from fasteval.evaluation.exact import apply_reference
    from fasteval.evaluation.fast import empty_outputs

    samples = SampleList(root="/x", classes=["a", "b", "c"], samples=[(f"/x/{i}.jpg", i % 3) for i in range(6)])
    outputs = empty_outputs(6)
    logits = torch.randn(2, 3)
    apply_reference(outputs, samples, [1, 4], logits)
    want = torch.softmax(logits.double(), dim=1).pow(2).sum(dim=1)
    torch.testing.assert_close(outputs["prob_sq_sums"][[1, 4]].double(), want)
    assert outputs["prob_sq_sums"][[0, 2, 3, 5]].tolist() == [0.0] * 4 and outputs["rechecked"].tolist() == \
        [False, True, False, False, True, False]
