"""Fused classification metrics: one pass over the logits for argmax, top-k, cross-entropy and counts.

Two implementations of one contract sit side by side:
- ``metrics_triton``: a Triton kernel (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``),
- ``metrics_torch``: its plain-PyTorch twin (the CPU path, and the kernel's executable spec).

Semantics, exactly those of PyTorch on ``logits.float()``:
- ``pred`` = ``torch.argmax``: the first index of the maximum; a NaN counts as the maximum,
  so a row holding NaN predicts its first NaN.
- ``loss`` = ``F.cross_entropy(reduction="none")``; 0 for ignored rows; NaN for rows with NaN
  or +inf (torch's log_softmax is NaN there).
- ``topk_hit``: rank(label) < k, rank = #{j: x_j > x_label} + #{j < label: x_j == x_label}
  (ties broken toward the lower index, as argmax does).
- counts over non-ignored rows; ``loss_sum`` in float64.
- ``topk_idx``: the k classes with the largest logits, in descending order, ties toward the lower
  index (as a stable descending sort); a NaN ranks as -inf there; -1 fills rows when C < k.
- ``confidence``: the softmax probability of the largest logit, exp(max - logsumexp).
- ``prob_sq_sum``: the sum over classes of the squared softmax probabilities (the multiclass Brier
  score of a row is prob_sq_sum - 2 p_label + 1); NaN where the softmax is (NaN or +inf logits, a
  row of -inf).
- ``margin_top1``: the top-1 decision margin, largest logit minus the runner-up (+inf when C = 1).
- ``margin_topk``: how far the label's logit is from changing its top-k membership: for a hit,
  x_label minus the k-th largest of the other logits; for a miss, that value minus x_label
  (+inf when C <= k, and for ignored rows). Both margins are 0 for a row whose largest logit
  or label logit is not finite (NaN, +-inf): its decision has no error bound.
  A fast, lower-precision run whose logits are within e of exact ones can only change a
  prediction or a top-k hit where a margin is below 2e: the exact-count recheck uses this.

Results are bitwise reproducible: no float atomics; per-row outputs and per-program partial
sums are reduced in a fixed order. This module is self-contained (no fasteval imports).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON = False


class BatchMetrics(NamedTuple):
    """Per-row outputs and batch totals (0-dim tensors on the logits' device)."""

    pred: torch.Tensor  # int64 [B]
    loss: torch.Tensor  # float32 [B]
    topk_hit: torch.Tensor  # bool [B]
    correct: torch.Tensor  # int64 []
    correct_topk: torch.Tensor  # int64 []
    count: torch.Tensor  # int64 []: non-ignored rows with a valid label
    loss_sum: torch.Tensor  # float64 []
    bad_labels: torch.Tensor  # int64 []: labels outside [0, C) that are not ignore_index
    nonfinite: torch.Tensor  # int64 []: counted rows whose loss is NaN or infinite
    topk_idx: torch.Tensor  # int64 [B, k]: classes by descending logit; -1 where C < k
    confidence: torch.Tensor  # float32 [B]: softmax probability of the largest logit
    margin_top1: torch.Tensor  # float32 [B]: largest logit minus the runner-up
    margin_topk: torch.Tensor  # float32 [B]: distance of the label's logit to its top-k boundary
    prob_sq_sum: torch.Tensor  # float32 [B]: sum over classes of softmax(x)_c ** 2


def decision_margin(margin_top1: torch.Tensor, margin_topk: torch.Tensor) -> torch.Tensor:
    """A row's decision margin: the nearer of its top-1 and top-k decisions. The one definition that the
    reported per-sample margin and the exact-count recheck's near-tie test both read."""
    return torch.minimum(margin_top1, margin_topk)


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, topk: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [B, C], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be 1-D of length {logits.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    if logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one row and one column, got {tuple(logits.shape)}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")


def raise_on_bad_labels(bad: int, num_classes: int) -> None:
    if bad:
        raise ValueError(f"{bad} label(s) outside [0, {num_classes}) that are not ignore_index")


def _margins(top: torch.Tensor, x_label: torch.Tensor, hit: torch.Tensor, counted: torch.Tensor,
             has_nan: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two decision margins from each row's top-(k+1) values (descending, NaN as -inf)."""
    inf = torch.full_like(x_label, float("inf"))
    bounded = torch.isfinite(top[:, 0]) & ~has_nan  # else no error bound: margin 0, always rechecked
    m1 = top[:, 0] - top[:, 1] if top.shape[1] > 1 else inf
    if top.shape[1] <= topk:  # C <= k: every label is a hit, whatever the values
        mk = inf
    else:
        mk = torch.where(hit, x_label - top[:, topk], top[:, topk - 1] - x_label)
    m1 = torch.where(bounded, m1, 0.0)
    mk = torch.where(bounded & torch.isfinite(x_label), mk, 0.0)
    return m1, torch.where(counted, mk, inf)


def _stable_topk_indices(ordered: torch.Tensor, top: torch.Tensor, k: int, cols: torch.Tensor) -> torch.Tensor:
    """The k columns with the largest values, by descending value, ties to the lower column (a stable
    descending sort's first k), without sorting whole rows: every column above the k-th value, then the
    lowest-index columns equal to it; those k are put in order by a sort of k values."""
    kth = top[:, k - 1:k]
    above = ordered > kth
    equal = ordered == kth
    room = k - above.sum(dim=1, keepdim=True)
    chosen = above | (equal & (torch.cumsum(equal, dim=1) <= room))
    picked = torch.topk(torch.where(chosen, cols, ordered.shape[1]), k, dim=1, largest=False).values
    order = torch.sort(ordered.gather(1, picked), dim=1, descending=True, stable=True).indices
    return picked.gather(1, order)


def _metrics_core(x: torch.Tensor, labels: torch.Tensor, topk: int, ignore_index: int) -> BatchMetrics:
    """The twin's arithmetic on float32 logits and int64 labels (no host sync, compilable)."""
    num_classes = x.shape[1]
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < num_classes)
    counted = valid & in_range
    safe = torch.where(counted, labels, 0)
    pred = torch.argmax(x, dim=1)
    x_label = x.gather(1, safe[:, None])
    lse = torch.logsumexp(x, dim=1)
    # A +inf logit (fp16 overflow) makes F.cross_entropy's log_softmax NaN on every column.
    has_posinf = torch.isposinf(x).any(dim=1)
    loss = torch.where(has_posinf, float("nan"), lse - x_label[:, 0])
    loss = torch.where(counted, loss, 0.0)
    cols = torch.arange(num_classes, device=x.device)
    ahead = (x > x_label) | ((x == x_label) & (cols[None, :] < safe[:, None]))
    rank = ahead.sum(dim=1)
    hit = counted & (rank < topk)
    has_nan = torch.isnan(x).any(dim=1)
    ordered = torch.where(torch.isnan(x), float("-inf"), x)
    top = torch.topk(ordered, min(topk + 1, num_classes), dim=1).values  # values: no tie question
    top_idx = _stable_topk_indices(ordered, top, min(topk, num_classes), cols)
    if num_classes < topk:
        top_idx = torch.cat([top_idx, top_idx.new_full((x.shape[0], topk - num_classes), -1)], dim=1)
    m1, mk = _margins(top, x_label[:, 0], hit, counted, has_nan, topk)
    # softmax is NaN on an all -inf row; the norm reads it once, without a squared copy
    prob_sq_sum = torch.linalg.vector_norm(torch.softmax(x, dim=1), dim=1).square()
    prob_sq_sum = torch.where(has_nan | has_posinf, float("nan"), prob_sq_sum)
    return BatchMetrics(
        pred=pred,
        loss=loss,
        topk_hit=hit,
        correct=(counted & (pred == labels)).sum(),
        correct_topk=hit.sum(),
        count=counted.sum(),
        loss_sum=loss.double().sum(),
        bad_labels=(valid & ~in_range).sum(),
        nonfinite=(counted & ~torch.isfinite(loss)).sum(),
        topk_idx=top_idx,
        confidence=torch.exp(torch.amax(x, dim=1) - lse),
        margin_top1=m1,
        margin_topk=mk,
        prob_sq_sum=prob_sq_sum,
    )


@functools.cache
def _compiled_core():
    """The twin's arithmetic through ``torch.compile``, compiled once per process."""
    return torch.compile(_metrics_core, dynamic=True)


def metrics_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    topk: int = 5,
    ignore_index: int = -100,
    compiled: bool = False,
    check_labels: bool = True,
) -> BatchMetrics:
    """The PyTorch twin: vectorised, no loop over rows; raises on bad labels when on the CPU.

    ``check_labels=False`` only counts bad labels (in ``bad_labels``), for callers that
    check once at the end of a run.

    ``compiled=True`` runs the same arithmetic through ``torch.compile`` (compiled once, with
    dynamic shapes), which fuses the row reductions into a few loops.
    """
    _check_inputs(logits, labels, topk)
    core = _compiled_core() if compiled else _metrics_core
    m = core(logits.float(), labels.long(), topk, ignore_index)
    if check_labels and logits.device.type == "cpu":
        raise_on_bad_labels(int(m.bad_labels), logits.shape[1])
    return m


if HAS_TRITON:

    @triton.jit
    def _fused_metrics_kernel(
        logits_ptr, labels_ptr, pred_ptr, loss_ptr, hit_ptr, counts_ptr, loss_part_ptr,
        topk_idx_ptr, conf_ptr, margin1_ptr, margink_ptr, psq_ptr,
        B, C, stride_b, stride_c, stride_l, ignore_index, topk, topk_out,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr, KPAD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        row_off = rows.to(tl.int64) * stride_b
        labels = tl.load(labels_ptr + rows.to(tl.int64) * stride_l, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (labels != ignore_index)
        in_range = (labels >= 0) & (labels < C)
        counted = valid & in_range
        safe = tl.where(counted, labels, 0)
        # The label's logit, read once, before the sweep (the rank needs it).
        x_label = tl.load(logits_ptr + row_off + safe * stride_c, mask=counted, other=0.0).to(tl.float32)

        big = 2147483647
        run_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_B], tl.float32)
        run_sq = tl.zeros([BLOCK_B], tl.float32)  # sum of exp(2 (x - run_max)): the squared probabilities' sum
        best_idx = tl.zeros([BLOCK_B], tl.int64)
        nan_idx = tl.full([BLOCK_B], big, tl.int64)
        rank = tl.zeros([BLOCK_B], tl.int64)
        # The row's K+1 largest values (NaN as -inf) and their columns, descending, earlier columns
        # first among equals; slots past K+1 (KPAD is a power of two) and past C stay empty.
        slot = tl.arange(0, KPAD)
        top_val = tl.full([BLOCK_B, KPAD], float("-inf"), tl.float32)
        top_idx = tl.full([BLOCK_B, KPAD], -1, tl.int64)
        for start in range(0, C, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(
                logits_ptr + row_off[:, None] + cols[None, :].to(tl.int64) * stride_c,
                mask=mask, other=float("-inf"),
            ).to(tl.float32)
            is_nan = (x != x) & mask
            xc = tl.where(is_nan, float("-inf"), x)
            # NaN, explicitly: the first NaN index wins over any number.
            nan_idx = tl.minimum(nan_idx, tl.min(tl.where(is_nan, cols[None, :].to(tl.int64), big), axis=1))
            # Argmax with first-index ties: first column equal to the block max; strict > across blocks.
            blk_max = tl.max(xc, axis=1)
            blk_idx = tl.min(tl.where(xc == blk_max[:, None], cols[None, :].to(tl.int64), big), axis=1)
            take = blk_max > run_max
            best_idx = tl.where(take, blk_idx, best_idx)
            # Online softmax: running max, rescaled running sum (guarding an all -inf prefix and +inf).
            new_max = tl.maximum(run_max, blk_max)
            shift = tl.where((new_max == float("-inf")) | (new_max == float("inf")), 0.0, new_max)
            scale = tl.exp(run_max - shift)
            e = tl.exp(xc - shift[:, None])
            run_sum = run_sum * scale + tl.sum(e, axis=1)
            run_sq = run_sq * (scale * scale) + tl.sum(e * e, axis=1)
            run_max = new_max
            # Rank of the label: strictly greater values, plus equal values at lower indices.
            ahead = (x > x_label[:, None]) | ((x == x_label[:, None]) & (cols[None, :] < safe[:, None]))
            rank += tl.sum((ahead & mask).to(tl.int64), axis=1)
            # Merge this block into the running top list: K+1 extractions of the larger head,
            # the running list winning ties (its columns are earlier).
            old_val, old_idx = top_val, top_idx
            old_free = old_idx >= 0
            blk_free = mask
            for j in tl.static_range(K + 1):
                o = tl.where(old_free, old_val, float("-inf"))
                c = tl.where(blk_free, xc, float("-inf"))
                o_max = tl.max(o, axis=1)
                c_max = tl.max(c, axis=1)
                o_has = tl.max(old_free.to(tl.int32), axis=1) > 0
                c_has = tl.max(blk_free.to(tl.int32), axis=1) > 0
                from_old = o_has & ((o_max >= c_max) | ~c_has)
                o_pos = tl.min(tl.where(old_free & (o == o_max[:, None]), slot[None, :], KPAD), axis=1)
                c_col = tl.min(tl.where(blk_free & (c == c_max[:, None]), cols[None, :].to(tl.int64), big), axis=1)
                o_col = tl.sum(tl.where(slot[None, :] == o_pos[:, None], old_idx, 0), axis=1)
                got = o_has | c_has
                val = tl.where(from_old, o_max, c_max)
                col = tl.where(got, tl.where(from_old, o_col, c_col), -1)
                old_free = old_free & ~(from_old[:, None] & (slot[None, :] == o_pos[:, None]))
                blk_free = blk_free & ~((got & ~from_old)[:, None] & (cols[None, :] == c_col[:, None]))
                top_val = tl.where(slot[None, :] == j, tl.where(got, val, float("-inf"))[:, None], top_val)
                top_idx = tl.where(slot[None, :] == j, col[:, None], top_idx)

        has_nan = nan_idx < big
        pred = tl.where(has_nan, nan_idx, best_idx)
        # An all -inf row has run_sum == 0: its logsumexp is -inf, as torch's. A +inf logit (fp16
        # overflow) makes F.cross_entropy NaN on every column: so is the loss here.
        lse = tl.where(run_sum > 0, run_max + tl.log(tl.where(run_sum > 0, run_sum, 1.0)), float("-inf"))
        loss = tl.where(has_nan | (run_max == float("inf")), float("nan"), lse - x_label)
        loss = tl.where(counted, loss, 0.0)
        hit = counted & (rank < topk)
        tl.store(pred_ptr + rows, pred, mask=row_ok)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        tl.store(hit_ptr + rows, hit.to(tl.int8), mask=row_ok)
        # The margins (see the module docstring) and the confidence, from the top list.
        v0 = tl.sum(tl.where(slot[None, :] == 0, top_val, 0.0), axis=1)
        v1 = tl.sum(tl.where(slot[None, :] == 1, top_val, 0.0), axis=1)
        v_km1 = tl.sum(tl.where(slot[None, :] == topk - 1, top_val, 0.0), axis=1)
        v_k = tl.sum(tl.where(slot[None, :] == topk, top_val, 0.0), axis=1)
        inf = float("inf")
        bounded = (v0 == v0) & (v0 != inf) & (v0 != -inf) & ~has_nan
        label_ok = (x_label != inf) & (x_label != -inf)
        m1 = tl.where(C > 1, v0 - v1, inf)
        mk = tl.where(C > topk, tl.where(hit, x_label - v_k, v_km1 - x_label), inf)
        m1 = tl.where(bounded, m1, 0.0)
        mk = tl.where(counted, tl.where(bounded & label_ok, mk, 0.0), inf)
        conf = tl.where(has_nan, float("nan"), tl.exp(run_max - lse))
        # run_sq / run_sum^2; an all -inf row gives 0/0 = NaN, as torch's softmax does.
        psq = tl.where(has_nan | (run_max == float("inf")), float("nan"), run_sq / (run_sum * run_sum))
        tl.store(psq_ptr + rows, psq, mask=row_ok)
        tl.store(margin1_ptr + rows, m1, mask=row_ok)
        tl.store(margink_ptr + rows, mk, mask=row_ok)
        tl.store(conf_ptr + rows, conf, mask=row_ok)
        out_k = slot < K
        tl.store(topk_idx_ptr + rows.to(tl.int64)[:, None] * topk_out + slot[None, :], top_idx,
                 mask=row_ok[:, None] & out_k[None, :])
        # Per-program partial sums, reduced later in a fixed order: no float atomics.
        base = counts_ptr + pid * 5
        tl.store(base + 0, tl.sum((counted & (pred == labels)).to(tl.int64), axis=0))
        tl.store(base + 1, tl.sum(hit.to(tl.int64), axis=0))
        tl.store(base + 2, tl.sum(counted.to(tl.int64), axis=0))
        tl.store(base + 3, tl.sum((valid & ~in_range).to(tl.int64), axis=0))
        loss_finite = (loss == loss) & (loss != float("inf")) & (loss != float("-inf"))
        tl.store(base + 4, tl.sum((counted & ~loss_finite).to(tl.int64), axis=0))
        tl.store(loss_part_ptr + pid, tl.sum(loss.to(tl.float64), axis=0))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_blocks(num_classes: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_C): column blocks of up to 1024 (a loop beats huge blocks), about 1K elements a
    tile (2K-element tiles spilled registers with fp32 logits at 128-512 classes on sm_80/90/100, the
    top-k state being the cost: tests/kernel_aot.py), at least 2 rows a program."""
    block_c = min(1024, max(16, _next_pow2(num_classes)))
    block_b = max(2, min(16, 1024 // block_c))
    return block_b, block_c


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def metrics_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    topk: int = 5,
    ignore_index: int = -100,
    block_b: int | None = None,
    block_c: int | None = None,
    check_labels: bool = True,
) -> BatchMetrics:
    """The fused Triton kernel: one read of each logit. Raises on bad labels only on the CPU."""
    _check_inputs(logits, labels, topk)
    if not triton_usable(logits.device):
        raise RuntimeError("the Triton kernel needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
    batch, num_classes = logits.shape
    default_b, default_c = default_blocks(num_classes)
    block_b, block_c = block_b or default_b, block_c or default_c
    programs = triton.cdiv(batch, block_b)
    device = logits.device
    listed = min(topk, num_classes)  # classes the top list must hold (plus one for the margins)
    pred = torch.empty(batch, dtype=torch.int64, device=device)
    loss = torch.empty(batch, dtype=torch.float32, device=device)
    hit = torch.empty(batch, dtype=torch.int8, device=device)
    counts = torch.empty((programs, 5), dtype=torch.int64, device=device)
    loss_part = torch.empty(programs, dtype=torch.float64, device=device)
    topk_idx = torch.full((batch, topk), -1, dtype=torch.int64, device=device)
    conf = torch.empty(batch, dtype=torch.float32, device=device)
    margin1 = torch.empty(batch, dtype=torch.float32, device=device)
    margink = torch.empty(batch, dtype=torch.float32, device=device)
    prob_sq_sum = torch.empty(batch, dtype=torch.float32, device=device)
    # Launch under the tensors' device: the current device may be another GPU.
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _fused_metrics_kernel[(programs,)](
            logits, labels, pred, loss, hit, counts, loss_part, topk_idx, conf, margin1, margink, prob_sq_sum,
            batch, num_classes, logits.stride(0), logits.stride(1), labels.stride(0), ignore_index,
            min(topk, num_classes + 1), topk,
            BLOCK_B=block_b, BLOCK_C=block_c, K=listed, KPAD=_next_pow2(listed + 1),
        )
    totals = counts.sum(dim=0)
    if check_labels and device.type == "cpu":
        raise_on_bad_labels(int(totals[3]), num_classes)
    return BatchMetrics(
        pred=pred,
        loss=loss,
        topk_hit=hit.view(torch.bool),
        correct=totals[0],
        correct_topk=totals[1],
        count=totals[2],
        loss_sum=loss_part.sum(),
        bad_labels=totals[3],
        nonfinite=totals[4],
        topk_idx=topk_idx,
        confidence=conf,
        margin_top1=margin1,
        margin_topk=margink,
        prob_sq_sum=prob_sq_sum,
    )


BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ``fused_metrics`` runs: "auto" is triton on CUDA (where triton exists), torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    return backend


def fused_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    topk: int = 5,
    ignore_index: int = -100,
    backend: str = "auto",
    check_labels: bool = True,
) -> BatchMetrics:
    """Argmax, top-k hits, per-sample cross-entropy and counts in one pass.

    ``backend``: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (the twin), or
    "auto" (triton on CUDA, torch on CPU). A label outside [0, C) that is not
    ``ignore_index`` raises ValueError at once on the CPU; on CUDA it is counted in
    ``bad_labels`` without a host sync (never read out of bounds), for the caller to check.
    ``check_labels=False`` defers the check on the CPU too (counted, not raised).
    """
    if resolve_backend(backend, logits.device) == "triton":
        return metrics_triton(logits, labels, topk=topk, ignore_index=ignore_index, check_labels=check_labels)
    return metrics_torch(logits, labels, topk=topk, ignore_index=ignore_index, check_labels=check_labels)
