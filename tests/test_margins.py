"""The kernel's and twin's per-sample margins, top-k classes and confidence, against brute force.

The margins are what the exact-count recheck relies on: a change of every logit by at most e
can only change a prediction or a top-k hit whose margin is below 2e. That property is tested
directly, beside the definitions.
"""

from __future__ import annotations

import math

import pytest
import torch

from fasteval.kernels.fused_metrics import metrics_torch, metrics_triton, triton_usable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_usable(torch.device(DEVICE)),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
INF = math.inf


def run(backend, logits, labels, topk=5, ignore_index=-100):
    if backend == "triton":  # small blocks: several column blocks even for small C
        return metrics_triton(logits, labels, topk=topk, ignore_index=ignore_index, block_b=2, block_c=16,
                              check_labels=False)
    return metrics_torch(logits, labels, topk=topk, ignore_index=ignore_index, check_labels=False)


def brute(row: list[float], label: int, k: int, counted: bool) -> dict:
    """The contract, by hand, in Python floats."""
    has_nan = any(v != v for v in row)
    key = [-INF if v != v else v for v in row]
    order = sorted(range(len(row)), key=lambda j: (-key[j], j))  # stable descending, NaN as -inf
    top = [key[j] for j in order]
    bounded = math.isfinite(top[0]) and not has_nan
    m1 = (top[0] - top[1] if len(row) > 1 else INF) if bounded else 0.0
    if not counted:
        mk = INF
    elif not (bounded and math.isfinite(row[label])):
        mk = 0.0
    elif len(row) <= k:
        mk = INF
    else:
        x = row[label]
        rank = sum(1 for j, v in enumerate(row) if v > x or (v == x and j < label))
        others = sorted((v for j, v in enumerate(row) if j != label), reverse=True)
        mk = x - others[k - 1] if rank < k else others[k - 1] - x
    finite = [v for v in row if v == v]
    if has_nan or not finite or max(finite) == INF or max(finite) == -INF:
        conf = math.nan
    else:
        top_v = max(finite)
        conf = 1.0 / sum(math.exp(v - top_v) for v in row)
    return {"topk_idx": (order + [-1] * k)[:k], "margin_top1": m1, "margin_topk": mk, "confidence": conf}


def check(m, logits, labels, k=5, ignore_index=-100):
    x = logits.float().cpu()
    for i in range(x.shape[0]):
        label = int(labels[i])
        counted = label != ignore_index and 0 <= label < x.shape[1]
        want = brute(x[i].tolist(), label if counted else 0, k, counted)
        assert m.topk_idx[i].tolist() == want["topk_idx"], i
        for field in ("margin_top1", "margin_topk"):
            got = float(getattr(m, field)[i])
            assert got == pytest.approx(want[field], rel=1e-6, abs=1e-6), (i, field)
        conf = float(m.confidence[i])
        assert (math.isnan(conf) and math.isnan(want["confidence"])) or conf == pytest.approx(
            want["confidence"], rel=1e-5), (i, conf, want["confidence"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 50), (3, 2), (2, 1), (4, 5), (5, 6), (3, 33)])
def test_random_rows_match_brute_force(backend, dtype, shape):
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    logits = (torch.randn(shape, generator=g) * 3).to(dtype)
    labels = torch.randint(0, shape[1], (shape[0],), generator=g)
    check(run(backend, logits.to(DEVICE), labels.to(DEVICE)), logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_nan_inf_ignored_rows_and_k_beyond_c(backend):
    logits = torch.zeros(9, 40)
    logits[0, [5, 21]] = 3.0  # a top-1 tie across blocks: margin 0
    logits[1, :8] = torch.arange(8.0)  # label 3 at the top-5 boundary with a tie below it
    logits[1, 30] = 3.0
    logits[2, 7] = float("nan")  # NaN: no bound, margins 0, confidence NaN
    logits[3, 9] = float("inf")  # fp16 overflow: no bound
    logits[4] = float("-inf")  # all -inf
    logits[5, 2] = float("-inf")  # the label's logit is -inf: top-k margin 0
    logits[6, 11] = 2.0  # ignored row: top-k margin inf, top-1 margin still defined
    logits[7] = torch.linspace(-3, 3, 40)  # clean row
    logits[8] = torch.linspace(3, -3, 40)
    labels = torch.tensor([5, 3, 1, 9, 0, 2, -100, 39, 4])
    m = run(backend, logits.to(DEVICE), labels.to(DEVICE))
    check(m, logits, labels)
    assert m.margin_top1[0] == 0 and m.margin_top1[2] == 0 and m.margin_topk[2] == 0
    assert m.margin_top1[3] == 0 and m.margin_topk[5] == 0 and m.margin_topk[6] == INF
    for k in (1, 39, 50):  # k = 1, one below C, beyond C
        check(run(backend, logits.to(DEVICE), labels.to(DEVICE), topk=k), logits, labels, k=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_heavy_ties(backend):
    g = torch.Generator().manual_seed(11)
    logits = torch.randint(-2, 3, (10, 37), generator=g).float().to(torch.bfloat16)
    labels = torch.randint(0, 37, (10,), generator=g)
    m = run(backend, logits.to(DEVICE), labels.to(DEVICE))
    check(m, logits, labels)
    assert (m.margin_top1.cpu() == 0).sum() >= 5  # integer logits: most rows are tied at the top


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_labels_and_logits(backend):
    """The kernel reads labels through their stride (``targets[:, 0]``, ``labels[::2]``)."""
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(6, 45, generator=g)[:, 3:40]
    targets = torch.randint(0, 37, (6, 3), generator=g)
    for labels in (targets[:, 0], targets[:, 2], torch.randint(0, 37, (12,), generator=g)[::2]):
        assert not labels.is_contiguous()
        m = run(backend, logits.to(DEVICE), labels.to(DEVICE))
        t = metrics_torch(logits, labels.contiguous())
        assert torch.equal(m.pred.cpu(), t.pred) and torch.equal(m.topk_hit.cpu(), t.topk_hit)
        torch.testing.assert_close(m.loss.cpu(), torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
        check(m, logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_logits_give_torch_losses(backend):
    """+inf (fp16 overflow): F.cross_entropy is NaN for every label of the row (never -inf)."""
    logits = torch.zeros(3, 20)
    logits[0, 4] = float("inf")
    logits[1, 4] = float("inf")
    logits[2, [4, 9]] = float("inf")
    labels = torch.tensor([0, 4, 1])
    m = run(backend, logits.to(DEVICE), labels.to(DEVICE))
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(m.loss.cpu(), expected, equal_nan=True)
    assert torch.isnan(m.loss.cpu()).all() and math.isnan(float(m.loss_sum)) and int(m.nonfinite) == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.02, 0.2])
def test_a_change_within_e_only_flips_rows_with_margin_below_2e(backend, scale):
    """The recheck's premise: perturb every logit by at most e; every changed prediction or top-5
    hit is on a row whose margin (of the perturbed logits) is <= 2e."""
    g = torch.Generator().manual_seed(13)
    exact = torch.randn(64, 30, generator=g)
    noise = (torch.rand(64, 30, generator=g) * 2 - 1) * scale
    e = float(noise.abs().max())
    labels = torch.randint(0, 30, (64,), generator=g)
    fast = run(backend, (exact + noise).to(DEVICE), labels.to(DEVICE))
    truth = metrics_torch(exact, labels)
    flipped = fast.pred.cpu() != truth.pred
    hit_changed = fast.topk_hit.cpu() != truth.topk_hit
    assert flipped.any() or hit_changed.any() or scale < 0.1  # at the larger scale, something does change
    assert (fast.margin_top1.cpu()[flipped] <= 2 * e).all()
    assert (fast.margin_topk.cpu()[hit_changed] <= 2 * e).all()
