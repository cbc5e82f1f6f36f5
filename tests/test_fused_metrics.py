"""The fused metrics kernel and its PyTorch twin against the plain PyTorch expressions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fasteval import MetricsAccumulator, fused_metrics
from fasteval.kernels.fused_metrics import metrics_torch, metrics_triton, triton_usable

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_usable(torch.device(DEVICE)),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")


def run(backend: str, logits, labels, topk=5, ignore_index=-100, block_c=16, block_b=2):
    """Small column blocks for the kernel so that small C still spans several blocks."""
    if backend == "triton":
        return metrics_triton(logits, labels, topk=topk, ignore_index=ignore_index, block_b=block_b,
                              block_c=block_c)
    return metrics_torch(logits, labels, topk=topk, ignore_index=ignore_index)


BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def brute_rank(row: list[float], label: int) -> int:
    """The contract's rank, by hand: strictly greater values plus equal values at lower indices."""
    v = row[label]
    return sum(1 for j, x in enumerate(row) if x > v or (x == v and j < label))


def check(m, logits, labels, topk=5, ignore_index=-100):
    x = logits.float().cpu()
    labels = labels.long().cpu()
    valid = labels != ignore_index
    assert torch.equal(m.pred.cpu(), torch.argmax(x, 1))
    expected = F.cross_entropy(x, labels, ignore_index=ignore_index, reduction="none")
    torch.testing.assert_close(m.loss.cpu(), expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    hits = []
    for i in range(x.shape[0]):
        hits.append(bool(valid[i]) and brute_rank(x[i].tolist(), int(labels[i])) < topk)
    assert m.topk_hit.cpu().tolist() == hits
    assert m.topk_hit.dtype == torch.bool and m.pred.dtype == torch.int64 and m.loss.dtype == torch.float32
    assert int(m.correct) == int((valid & (m.pred.cpu() == labels)).sum())
    assert int(m.correct_topk) == sum(hits)
    assert int(m.count) == int(valid.sum())
    assert m.loss_sum.dtype == torch.float64 and m.correct.dim() == 0
    torch.testing.assert_close(m.loss_sum.cpu(), expected[valid].double().sum(), rtol=1e-5, atol=1e-5,
                               equal_nan=True)
    # The squared probabilities' sum against a float64 softmax (NaN where the softmax is NaN).
    psq = torch.softmax(x.double(), dim=1).pow(2).sum(dim=1)
    assert m.prob_sq_sum.dtype == torch.float32
    torch.testing.assert_close(m.prob_sq_sum.cpu().double(), psq, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 50), (1, 1), (3, 2), (5, 3), (4, 37), (6, 16), (6, 17), (2, 1000)])
def test_random(backend, dtype, shape):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    logits = (torch.randn(shape, generator=g) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, shape[1], (shape[0],), generator=g).to(DEVICE)
    check(run(backend, logits, labels), logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_classes", [1000, 1001, 21843])
def test_real_head_widths_with_default_blocks(backend, num_classes):
    g = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(2, num_classes, generator=g).to(torch.bfloat16).to(DEVICE)
    labels = torch.tensor([0, num_classes - 1], device=DEVICE)
    m = fused_metrics(logits, labels, backend=backend)
    check(m, logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_within_and_across_blocks(backend, dtype):
    logits = torch.zeros(6, 40)
    logits[0, [5, 7]] = 3.0  # tie within one block: first index wins
    logits[1, [20, 3]] = 3.0  # tie across blocks: the earlier block wins
    logits[2, [39, 33, 16]] = 3.0  # tie in later blocks only
    logits[3] = 1.0  # every column tied
    logits[4, [10, 26]] = 2.0
    logits[4, 12] = 2.0
    logits[5, [0, 15, 16, 31, 32]] = 4.0  # ties on block boundaries
    labels = torch.tensor([7, 3, 33, 39, 26, 32])
    logits, labels = logits.to(dtype).to(DEVICE), labels.to(DEVICE)
    m = run(backend, logits, labels, topk=2)
    check(m, logits, labels, topk=2)
    assert m.pred.cpu().tolist() == [5, 3, 16, 0, 10, 0]
    # rank(label) with ties toward the lower index: row 1 label 3 is rank 0, row 2 label 33 rank 1,
    # row 3 label 39 rank 39, row 4 label 26 rank 2, row 5 label 32 rank 4.
    assert m.topk_hit.cpu().tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_ties_are_common_and_exact(backend):
    g = torch.Generator().manual_seed(7)
    logits = torch.randint(-3, 4, (16, 45), generator=g).float().to(torch.bfloat16).to(DEVICE)
    labels = torch.randint(0, 45, (16,), generator=g).to(DEVICE)
    for k in (1, 5, 20):
        check(run(backend, logits, labels, topk=k), logits, labels, topk=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_first_middle_and_last_block(backend, dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=g)
    logits[0, 2] = float("nan")
    logits[1, 20] = float("nan")
    logits[2, 39] = float("nan")
    logits[3, [30, 4, 25]] = float("nan")  # several: the first NaN index
    logits[4, :] = float("nan")
    labels = torch.tensor([2, 0, 39, 4, 11])
    logits, labels = logits.to(dtype).to(DEVICE), labels.to(DEVICE)
    m = run(backend, logits, labels)
    check(m, logits, labels)
    assert m.pred.cpu().tolist() == [2, 20, 39, 4, 0]
    assert torch.isnan(m.loss.cpu()).all()
    assert int(m.nonfinite) == 5 and int(m.correct) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_rows_and_huge_magnitudes(backend):
    logits = torch.full((5, 30), float("-inf"))
    logits[0, 17] = 1.0
    logits[1, 17] = 1.0
    logits[2] = torch.linspace(-1e4, 1e4, 30)
    logits[3] = torch.linspace(1e4, -1e4, 30)
    logits[4] = torch.linspace(-65504, 65504, 30)
    labels = torch.tensor([17, 3, 29, 29, 0])
    for dtype in DTYPES:
        x = logits.to(dtype).to(DEVICE)
        check(run(backend, x, labels.to(DEVICE)), x, labels.to(DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_and_edge_labels(backend):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 23, generator=g).to(DEVICE)
    labels = torch.tensor([0, 22, -100, 5, -100, 22, 0], device=DEVICE)
    m = run(backend, logits, labels)
    check(m, logits, labels)
    assert int(m.count) == 5
    assert m.loss.cpu()[[2, 4]].tolist() == [0.0, 0.0] and not m.topk_hit.cpu()[[2, 4]].any()
    m7 = run(backend, logits, torch.where(labels == -100, 7, labels), ignore_index=7)
    assert int(m7.count) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend):
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 45, generator=g).to(DEVICE)
    sliced = wide[:, 3:40]  # row stride 45
    assert not sliced.is_contiguous()
    labels = torch.randint(0, 37, (6,), generator=g).to(DEVICE)
    check(run(backend, sliced, labels), sliced, labels)
    transposed = torch.randn(37, 6, generator=g).to(DEVICE).t()  # column stride 6
    check(run(backend, transposed, labels), transposed, labels)
    every_other = wide[::2, :37]
    check(run(backend, every_other, labels[:3]), every_other, labels[:3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 50])
def test_topk_values_and_k_beyond_c(backend, k):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 19, generator=g).to(DEVICE)
    labels = torch.randint(0, 19, (6,), generator=g).to(DEVICE)
    labels[0] = -100
    m = run(backend, logits, labels, topk=k)
    check(m, logits, labels, topk=k)
    members = (torch.topk(logits.cpu(), min(k, 19), dim=1).indices == labels.cpu()[:, None]).any(1)
    assert m.topk_hit.cpu().tolist() == (members & (labels.cpu() != -100)).tolist()
    if k > 19:
        assert int(m.correct_topk) == 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_bad_labels_raise_with_their_count(backend, label_dtype):
    """On the CPU bad labels raise at once; on CUDA they are counted without a host sync (never read)."""
    logits = torch.randn(5, 10).to(DEVICE)
    labels = torch.tensor([0, 10, -1, -100, 99], dtype=label_dtype).to(DEVICE)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"^3 label\(s\) outside \[0, 10\)"):
            run(backend, logits, labels)
    else:
        m = run(backend, logits, labels)
        assert (int(m.bad_labels), int(m.count)) == (3, 1)
    good = torch.tensor([0, 9, 1, -100, 3], dtype=label_dtype).to(DEVICE)
    check(run(backend, logits, good), logits, good)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_are_bitwise_identical(backend):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 70, generator=g).to(torch.bfloat16).to(DEVICE)
    labels = torch.randint(0, 70, (9,), generator=g).to(DEVICE)
    first = run(backend, logits, labels)
    for _ in range(2):
        again = run(backend, logits, labels)
        for a, b in zip(first, again):
            assert torch.equal(a, b) and a.dtype == b.dtype


@needs_triton
def test_kernel_and_twin_agree_bitwise_on_predictions():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(12, 100, generator=g).to(torch.bfloat16).to(DEVICE)
    labels = torch.randint(0, 100, (12,), generator=g).to(DEVICE)
    a = run("triton", logits, labels)
    b = run("torch", logits, labels)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.topk_hit, b.topk_hit)
    assert (int(a.correct), int(a.correct_topk), int(a.count)) == (int(b.correct), int(b.correct_topk), int(b.count))


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        fused_metrics(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="cuda")
    with pytest.raises(ValueError, match="2-D"):
        fused_metrics(torch.randn(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="int64 or int32"):
        fused_metrics(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="length 2"):
        fused_metrics(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="topk"):
        fused_metrics(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), topk=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulator_with_padded_last_batch(backend):
    g = torch.Generator().manual_seed(8)
    n, batch, classes = 11, 4, 13
    logits = torch.randn(n, classes, generator=g).to(DEVICE)
    labels = torch.randint(0, classes, (n,), generator=g).to(DEVICE)
    acc = MetricsAccumulator(n, DEVICE, backend=backend)
    for start in range(0, n, batch):
        chunk, lab = logits[start:start + batch], labels[start:start + batch]
        real = chunk.shape[0]
        if real < batch:  # pad to the static shape with junk rows: they must not count
            chunk = torch.cat([chunk, torch.full((batch - real, classes), 50.0, device=DEVICE)])
            lab = torch.cat([lab, torch.zeros(batch - real, dtype=lab.dtype, device=DEVICE)])
        acc.update(chunk, lab, num_real=real)
    out = acc.result()
    whole = metrics_torch(logits.cpu(), labels.cpu())
    assert out["count"] == n
    assert (out["correct"], out["correct_topk"]) == (int(whole.correct), int(whole.correct_topk))
    assert torch.equal(out["pred"], whole.pred)
    torch.testing.assert_close(out["loss"], whole.loss, rtol=1e-6, atol=1e-6)
    # The sum is exactly that of the per-sample losses (padding excluded) up to float64 rounding; against
    # the CPU twin, a float32 step per row (the GPU's exp is not the CPU's) is allowed.
    assert out["loss_sum"] == pytest.approx(float(out["loss"].double().sum()), rel=1e-12)
    assert out["loss_sum"] == pytest.approx(float(whole.loss_sum), rel=1e-6)


def test_accumulator_refuses_missing_extra_and_bad_samples():
    acc = MetricsAccumulator(3, "cpu")
    acc.update(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2 samples were evaluated but 3"):
        acc.result()
    with pytest.raises(ValueError, match="more samples"):
        acc.update(torch.randn(2, 4), torch.tensor([0, 1]))
    deferred = MetricsAccumulator(2, "cpu")
    deferred.update(torch.randn(2, 4), torch.tensor([4, 1]))  # counted, raised at the end
    with pytest.raises(ValueError, match="1 label"):
        deferred.result()


@pytest.mark.cuda
def test_accumulator_on_cuda_defers_bad_labels_without_sync():
    acc = MetricsAccumulator(4, "cuda")
    logits = torch.randn(4, 10, device="cuda")
    labels = torch.tensor([1, 2, 3, 12], device="cuda")  # made before: a host-to-device copy syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        acc.update(logits[:2], labels[:2])
        acc.update(logits[2:], labels[2:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match="1 label"):
        acc.result()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_matches_twin_at_scale(dtype):
    """At real sizes the brute-force rank is too slow: the vectorised twin is the truth here."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for b, c in [(256, 1000), (1024, 21843), (33, 1001)]:
        logits = (torch.randn(b, c, device="cuda", generator=g) * 4).to(dtype)
        logits[3, 7] = float("nan")
        labels = torch.randint(0, c, (b,), device="cuda", generator=g)
        labels[::7] = -100
        m = fused_metrics(logits, labels, backend="triton")
        t = metrics_torch(logits, labels)
        assert torch.equal(m.pred, t.pred) and torch.equal(m.topk_hit, t.topk_hit)
        assert torch.equal(m.pred, torch.argmax(logits.float(), 1))
        expected = F.cross_entropy(logits.float(), labels, reduction="none")
        torch.testing.assert_close(m.loss, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
        for field in ("correct", "correct_topk", "count", "bad_labels", "nonfinite"):
            assert int(getattr(m, field)) == int(getattr(t, field)), field


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_counts_rows_whose_loss_is_not_finite(backend):
    logits = torch.zeros(4, 20)
    logits[0, 3] = float("-inf")  # the label's logit is -inf: loss +inf
    logits[1, 5] = float("-inf")  # -inf elsewhere: loss finite
    logits[2, 7] = float("nan")
    labels = torch.tensor([3, 0, 0, -100])
    logits[3, 1] = float("nan")  # ignored row: not counted
    m = run(backend, logits.to(DEVICE), labels.to(DEVICE))
    assert int(m.nonfinite) == 2
    assert m.loss.cpu()[0] == float("inf") and torch.isfinite(m.loss.cpu()[1])


@pytest.mark.slow
def test_compiled_twin_matches():
    g = torch.Generator().manual_seed(9)
    for dtype, shape in [(torch.float32, (6, 37)), (torch.bfloat16, (9, 20)), (torch.float16, (3, 1000))]:
        logits = torch.randint(-3, 4, shape, generator=g).to(dtype)
        logits[0, 1] = float("nan")
        labels = torch.randint(0, shape[1], (shape[0],), generator=g)
        labels[-1] = -100
        check(metrics_torch(logits, labels, compiled=True), logits, labels)
    with pytest.raises(ValueError, match="1 label"):
        metrics_torch(torch.randn(2, 5), torch.tensor([0, 5]), compiled=True)
