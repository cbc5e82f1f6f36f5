"""Validation of the fast path against the reference: metric deltas, agreement and the flips."""

from __future__ import annotations

import math

from fasteval.evaluation.metrics import EvalResult
from fasteval.data.samples import SampleList, relative_path


def compare(samples: SampleList, reference: EvalResult, fast: EvalResult, max_flips: int = 20) -> dict:
    """Per-sample comparison of two runs over the same sample list (same order)."""
    if reference.samples != fast.samples or reference.predictions is None or fast.predictions is None:
        raise ValueError(f"the runs saw {reference.samples} and {fast.samples} samples: not comparable")
    ref_pred, fast_pred = reference.predictions.cpu(), fast.predictions.cpu()
    same = ref_pred == fast_pred
    flips = []
    for i in (~same).nonzero().flatten().tolist():
        path, label = samples.samples[i]
        flips.append({"path": relative_path(samples, path), "label": label,
                      "reference": int(ref_pred[i]), "fast": int(fast_pred[i])})
    loss_diff = (reference.losses.double() - fast.losses.cpu().double()).abs()
    return {
        "samples": reference.samples,
        "agreement": float(same.double().mean()) if len(same) else math.nan,
        "flipped": len(flips),
        "delta_top1": fast.top1 - reference.top1,
        "delta_top5": fast.top5 - reference.top5,
        "delta_loss": fast.loss - reference.loss,
        "max_sample_loss_diff": float(loss_diff.max()) if len(loss_diff) else math.nan,
        "flips": flips[:max_flips],
    }


def format_comparison(cmp: dict) -> str:
    lines = [
        "validation: fast vs reference",
        "-----------------------------",
        f"samples           {cmp['samples']}",
        f"agreement (top-1) {100 * cmp['agreement']:.3f} %  ({cmp['flipped']} flipped)",
        f"|delta top-1|     {abs(cmp['delta_top1']):.4f} pp",
        f"|delta top-5|     {abs(cmp['delta_top5']):.4f} pp",
        f"|delta loss|      {abs(cmp['delta_loss']):.6f}",
        f"max |loss diff|   {cmp['max_sample_loss_diff']:.6f} (one sample)",
    ]
    for flip in cmp["flips"]:
        lines.append(f"  flip {flip['path']}: label {flip['label']}, reference {flip['reference']}, "
                     f"fast {flip['fast']}")
    if cmp["flipped"] > len(cmp["flips"]):
        lines.append(f"  ... {cmp['flipped'] - len(cmp['flips'])} more")
    return "\n".join(lines)
