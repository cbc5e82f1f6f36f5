"""The evaluation device is made current; ``auto`` precision never picks emulated bf16 (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

import fasteval.devices as devices
from fasteval.errors import FastevalError
from fasteval.model.inference import resolve_precision


@pytest.fixture
def two_gpus(monkeypatch):
    """A CUDA runtime with two devices, device 0 current; records ``set_device`` calls."""
    state = {"current": 0, "set": []}

    def set_device(device):
        index = torch.device(device).index
        state["set"].append(index)
        state["current"] = index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return state


def test_use_device_makes_the_cuda_device_current(two_gpus):
    assert devices.use_device(torch.device("cuda:1")) == torch.device("cuda:1")
    assert two_gpus["set"] == [1]
    assert devices.use_device(torch.device("cuda")) == torch.device("cuda:1")  # an index-less name: the current one
    assert devices.use_device(torch.device("cpu")) == torch.device("cpu")
    assert two_gpus["set"] == [1, 1]


def test_resolve_device_makes_current_only_when_asked(two_gpus):
    assert devices.resolve_device("cuda:1") == torch.device("cuda:1") and two_gpus["set"] == []
    assert devices.resolve_device("cuda:1", make_current=True) == torch.device("cuda:1")
    assert two_gpus["current"] == 1
    assert devices.resolve_device("auto", make_current=True) == torch.device("cuda:1")
    with pytest.raises(FastevalError, match="only 2 CUDA device"):
        devices.resolve_device("cuda:2", make_current=True)
    assert two_gpus["set"] == [1, 1]


def test_the_command_makes_its_device_current(two_gpus, monkeypatch, small_data):
    """``--device cuda:1`` reaches ``use_device`` before any model or loader is built."""
    from fasteval import cli

    class Reached(Exception):
        pass

    def use_device(device):
        raise Reached(str(device))

    monkeypatch.setattr(devices, "use_device", use_device)
    with pytest.raises(Reached, match=r"^cuda:1$"):
        cli.main(["eval", small_data, "--device", "cuda:1", "--no-progress", "--debug"])


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16"), ((10, 0), "bf16")])
def test_auto_precision_takes_bf16_only_where_it_is_native(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation: not asked
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert resolve_precision("auto", torch.device("cuda:1")) == expected
    assert asked == [torch.device("cuda:1")]  # the evaluation device's, not the current one's
    assert resolve_precision("bf16", torch.device("cuda:1")) == "bf16"  # an explicit choice is kept
