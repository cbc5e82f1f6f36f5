"""``cudnn.benchmark`` for the fast model's static shape on CUDA only (fasteval/model/inference.py): on within the
fast model's calls, the caller's setting everywhere else (the reference's calls, after an error)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fasteval.model.inference as inference
from fasteval.model.inference import FastModel, cudnn_benchmark


class Spy(nn.Module):
    """Records ``torch.backends.cudnn.benchmark`` as each call sees it; raises where asked."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.seen: list[bool] = []
        self.fail = False

    def forward(self, x):
        self.seen.append(torch.backends.cudnn.benchmark)
        if self.fail:
            raise RuntimeError("boom")
        return self.conv(x).mean((2, 3))


def test_on_within_the_fast_models_calls_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # the user's setting (torch's default)
    x = torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert cudnn_benchmark(torch.device("cuda")) and not cudnn_benchmark(torch.device("cpu"))
    cpu = FastModel(Spy(), torch.device("cpu"), "fp32", compile=False)
    cpu(x)
    assert cpu.model.seen == [False]

    monkeypatch.setattr(inference, "cudnn_benchmark", lambda device: True)  # what a CUDA device gets
    fast = FastModel(Spy(), torch.device("cpu"), "fp32", compile=False)
    fast.warm_up(x)
    fast(x)
    assert fast.model.seen == [True, True] and torch.backends.cudnn.benchmark is False
    fast.model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        fast(x)
    assert torch.backends.cudnn.benchmark is False  # restored after an error too
    reference = Spy()  # the reference's model: the caller's module, called as the plain loop calls it
    reference(x)
    assert reference.seen == [False]
