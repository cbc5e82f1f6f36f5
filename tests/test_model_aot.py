"""The fast model's compiled CUDA code, generated for an H100/H200 (sm_90) and compiled, without a GPU
(see model_aot.py): a Triton kernel that Inductor generates for fasteval's model but that does not compile
for the target, or spills, fails here rather than on the first GPU at hand."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.mark.slow
def test_compiled_model_generates_and_compiles_for_sm90_without_spills():
    import torchvision

    # Imported here: its check imports Inductor, which the other tests' process should not carry.
    from model_aot import compile_generated, generate, model_aot_unavailable, table

    reason = model_aot_unavailable()
    if reason is not None:
        pytest.skip(f"no CUDA code generation here: {reason}")
    generated = generate("sm_90")
    # The graph is the fast path's: the batch's logits, in fp32 (the head runs in fp32 under autocast).
    assert generated["logits"] == {"shape": [64, 1000], "dtype": "torch.float32", "device": "cuda"}
    assert generated["head_fp32"]
    # Convolutions are cuDNN's (one extern call each), the head one cuBLAS matmul; the rest Triton kernels.
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in torchvision.models.resnet18().modules())
    assert generated["wrapper"].count("extern_kernels.convolution(") == convs
    assert "extern_kernels.addmm(" in generated["wrapper"] or "extern_kernels.mm(" in generated["wrapper"]
    assert len(generated["kernels"]) >= 10
    rows = compile_generated("sm_90", generated["kernels"])
    print("\n" + table(rows))
    assert {r["kernel"] for r in rows} == set(generated["kernels"])
    for r in rows:
        assert "error" not in r, r
        assert r["regs"] > 0 and r["stack_bytes"] == 0 and r["spill_stores"] == r["spill_loads"] == 0, r
