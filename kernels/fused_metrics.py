"""Fused classification metrics: one pass over the logits for argmax, top-k, cross-entropy and counts.

Two implementations of one contract sit side by side:
- ``metrics_triton``: a Triton kernel (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``),
- ``metrics_torch``: its plain-PyTorch twin (the CPU path, and the kernel's executable spec).

Semantics, exactly those of PyTorch on ``logits.float()``:
- ``pred`` = ``torch.argmax``: the first index of the maximum; a NaN counts as the maximum,
  so a row holding NaN predicts its first NaN.
- ``loss`` = ``F.cross_entropy(reduction="none")``; 0 for ignored rows; NaN for rows with NaN.
- ``topk_hit``: rank(label) < k, rank = #{j: x_j > x_label} + #{j < label: x_j == x_label}
  (ties broken toward the lower index, as argmax does).
- counts over non-ignored rows; ``loss_sum`` in float64.

Results are bitwise reproducible: no float atomics; per-row outputs and per-program partial
sums are reduced in a fixed order. This module is self-contained (no fasteval imports).
"""

from __future__ import annotations

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


def _metrics_core(x: torch.Tensor, labels: torch.Tensor, topk: int, ignore_index: int) -> BatchMetrics:
    """The twin's arithmetic on float32 logits and int64 labels (no host sync, compilable)."""
    num_classes = x.shape[1]
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < num_classes)
    counted = valid & in_range
    safe = torch.where(counted, labels, 0)
    pred = torch.argmax(x, dim=1)
    x_label = x.gather(1, safe[:, None])
    loss = torch.logsumexp(x, dim=1) - x_label[:, 0]
    loss = torch.where(counted, loss, 0.0)
    cols = torch.arange(num_classes, device=x.device)
    ahead = (x > x_label) | ((x == x_label) & (cols[None, :] < safe[:, None]))
    rank = ahead.sum(dim=1)
    hit = counted & (rank < topk)
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
        B, C, stride_b, stride_c, ignore_index, topk,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        row_off = rows.to(tl.int64) * stride_b
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (labels != ignore_index)
        in_range = (labels >= 0) & (labels < C)
        counted = valid & in_range
        safe = tl.where(counted, labels, 0)
        # The label's logit, read once, before the sweep (the rank needs it).
        x_label = tl.load(logits_ptr + row_off + safe * stride_c, mask=counted, other=0.0).to(tl.float32)

        big = 2147483647
        run_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_B], tl.float32)
        best_idx = tl.zeros([BLOCK_B], tl.int64)
        nan_idx = tl.full([BLOCK_B], big, tl.int64)
        rank = tl.zeros([BLOCK_B], tl.int64)
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
            # Online softmax: running max, rescaled running sum (guarding an all -inf prefix).
            new_max = tl.maximum(run_max, blk_max)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(xc - shift[:, None]), axis=1)
            run_max = new_max
            # Rank of the label: strictly greater values, plus equal values at lower indices.
            ahead = (x > x_label[:, None]) | ((x == x_label[:, None]) & (cols[None, :] < safe[:, None]))
            rank += tl.sum((ahead & mask).to(tl.int64), axis=1)

        has_nan = nan_idx < big
        pred = tl.where(has_nan, nan_idx, best_idx)
        # An all -inf row has run_sum == 0: its logsumexp is -inf, as torch's.
        lse = tl.where(run_sum > 0, run_max + tl.log(tl.where(run_sum > 0, run_sum, 1.0)), float("-inf"))
        loss = tl.where(has_nan, float("nan"), lse - x_label)
        loss = tl.where(counted, loss, 0.0)
        hit = counted & (rank < topk)
        tl.store(pred_ptr + rows, pred, mask=row_ok)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        tl.store(hit_ptr + rows, hit.to(tl.int8), mask=row_ok)
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
    """(BLOCK_B, BLOCK_C): column blocks of up to 1024 (a loop beats huge blocks), ~2K elements a tile."""
    block_c = min(1024, max(16, _next_pow2(num_classes)))
    block_b = max(1, min(16, 2048 // block_c))
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
    pred = torch.empty(batch, dtype=torch.int64, device=device)
    loss = torch.empty(batch, dtype=torch.float32, device=device)
    hit = torch.empty(batch, dtype=torch.int8, device=device)
    counts = torch.empty((programs, 5), dtype=torch.int64, device=device)
    loss_part = torch.empty(programs, dtype=torch.float64, device=device)
    _fused_metrics_kernel[(programs,)](
        logits, labels, pred, loss, hit, counts, loss_part,
        batch, num_classes, logits.stride(0), logits.stride(1), ignore_index, min(topk, num_classes + 1),
        BLOCK_B=block_b, BLOCK_C=block_c,
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
