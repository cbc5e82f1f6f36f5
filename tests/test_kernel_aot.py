"""The fused metrics kernel compiles for sm_80, sm_90 and sm_100 without a GPU (see kernel_aot.py).

The interpreter the other kernel tests run in accepts code that real code generation rejects;
this is the CUDA code generation check on a machine without a device. The launches compiled are
the ones ``metrics_triton`` makes, captured, so a changed launch or kernel is compiled as it is.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from kernel_aot import (  # noqa: E402
    CLASSES, LABELS, LOGITS, TARGETS, aot_unavailable, compile_cases, covering_cases, table)

from fasteval.kernels.fused_metrics import default_blocks  # noqa: E402

REASON = aot_unavailable()


@pytest.mark.skipif(REASON is not None, reason=f"no ahead-of-time CUDA compile here: {REASON}")
def test_every_dtype_and_block_shape_compiles_for_each_target():
    rows = compile_cases(covering_cases(), workers=2)
    print("\n" + table(rows))
    for target in TARGETS:
        mine = [r for r in rows if r["target"] == target]
        assert {r["logits"] for r in mine} == set(LOGITS) and {r["labels"] for r in mine} == set(LABELS)
        # The launches use default_blocks: every shape it picks was compiled for this target.
        assert {(r["blocks"]["BLOCK_B"], r["blocks"]["BLOCK_C"]) for r in mine} == {default_blocks(c) for c in CLASSES}
    for r in rows:
        assert 0 < r["regs"] <= 255 and r["num_warps"] > 0, r
