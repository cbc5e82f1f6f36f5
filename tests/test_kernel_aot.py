"""The fused kernels (metrics, resize + crop + normalize) compile for sm_80, sm_90 and sm_100 without a GPU
(see kernel_aot.py).

The interpreter the other kernel tests run in accepts code that real code generation rejects;
this is the CUDA code generation check on a machine without a device. The launches compiled are
the ones ``metrics_triton`` and ``resize_crop_triton`` make, captured, so a changed launch or kernel is
compiled as it is. Both kernels' cases compile in the same two child processes (one start each).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from kernel_aot import (  # noqa: E402
    CLASSES, FILTERS, IMAGE_SETS, LABELS, LOGITS, OUT_DTYPES, TARGETS, aot_unavailable, compile_cases,
    covering_cases, resize_cases, resize_table, table)

from fasteval.kernels.fused_metrics import default_blocks  # noqa: E402

REASON = aot_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no ahead-of-time CUDA compile here: {REASON}")


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[dict]]:
    """Every case compiled, by kernel name."""
    rows = compile_cases(covering_cases() + resize_cases(), workers=2)
    by_kernel: dict[str, list[dict]] = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    return by_kernel


def test_every_dtype_and_block_shape_compiles_for_each_target(compiled):
    rows = compiled["_fused_metrics_kernel"]
    print("\n" + table(rows))
    for target in TARGETS:
        mine = [r for r in rows if r["target"] == target]
        assert {r["logits"] for r in mine} == set(LOGITS) and {r["labels"] for r in mine} == set(LABELS)
        # The launches use default_blocks: every shape it picks was compiled for this target.
        assert {(r["blocks"]["BLOCK_B"], r["blocks"]["BLOCK_C"]) for r in mine} == {default_blocks(c) for c in CLASSES}
    for r in rows:
        assert 0 < r["regs"] <= 255 and r["num_warps"] > 0, r


def test_resize_kernel_compiles_for_each_target_without_spills(compiled):
    """Both filters on every target; every (filter, output dtype) pair and every image set (ImageNet-like,
    large: 8 to 32 taps, and a batch of one) somewhere; the GPU block shapes, with no register spills. And
    the IEEE arithmetic its twin's bit-for-bit pixels rest on: no fused multiply-adds (the float64 filter
    weights rounded once per operation, as torch's and PIL's), no approximate division (Triton lowers a
    float32 ``/`` to PTX's div.full.f32, up to 2 ulp off: the normalisation divides by ``tl.div_rn``)."""
    rows = compiled["_resize_crop_kernel"]
    print("\n" + resize_table(rows))
    for target in TARGETS:
        assert {r["interpolation"] for r in rows if r["target"] == target} == set(FILTERS)
    assert {(r["interpolation"], r["out_dtype"]) for r in rows} == {(f, d) for f in FILTERS for d in OUT_DTYPES}
    assert {r["images"] for r in rows} == set(IMAGE_SETS)
    assert {r["blocks"]["K"] for r in rows} >= {8, 32}
    for r in rows:
        assert 0 < r["regs"] <= 255 and r["num_warps"] == 8, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["ptx_fma"] == 0 and r["ptx_inexact_div"] == 0, r
