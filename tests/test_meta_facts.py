"""Answers of meta-device checks kept between runs (fasteval/model/meta_facts.py)."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fasteval.model.compile_cache as compile_cache
from fasteval.errors import FastevalError
from fasteval.memory import check_eval_memory
from fasteval.model.footprint import activation_bytes
from fasteval.model.meta_facts import facts_dir, remembered
from fasteval.model.models import check_input_fits


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compile_cache, "_UNWRITABLE", set())
    return tmp_path / "cache"


class Counter:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_an_answer_is_computed_once_per_architecture_and_shape(cache, model_3cls):
    first, again = Counter(1234), Counter(0)
    assert remembered("activation_bytes", model_3cls, {"batch_size": 4}, first) == 1234
    assert remembered("activation_bytes", model_3cls, {"batch_size": 4}, again) == 1234 and again.calls == 0
    other_shape, other_head, other_kind = Counter(5), Counter(6), Counter(7)
    assert remembered("activation_bytes", model_3cls, {"batch_size": 8}, other_shape) == 5
    assert remembered("activation_bytes", torchvision.models.resnet18(num_classes=4), {"batch_size": 4},
                      other_head) == 6
    assert remembered("input_fits", model_3cls, {"batch_size": 4}, other_kind) == 7
    assert (other_shape.calls, other_head.calls, other_kind.calls) == (1, 1, 1)
    none = Counter(None)  # "cannot be estimated" is an answer too
    remembered("activation_bytes", model_3cls, {"batch_size": 2}, none)
    assert remembered("activation_bytes", model_3cls, {"batch_size": 2}, Counter(9)) is None


def test_a_failure_is_never_kept(cache, model_3cls):
    def refuses():
        raise FastevalError("no")

    with pytest.raises(FastevalError):
        remembered("input_fits", model_3cls, {"input_hw": [8, 8]}, refuses)
    assert remembered("input_fits", model_3cls, {"input_hw": [8, 8]}, Counter(True)) is True


def test_kept_answers_equal_fresh_ones_and_a_refusal_repeats(cache, model_3cls, small_spec):
    fresh = activation_bytes(model_3cls, 4, (32, 32))
    check_eval_memory(model_3cls, "resnet18", small_spec, (40, 48), 4, 0, torch.device("cpu"))
    assert remembered("activation_bytes", model_3cls, {"batch_size": 4, "input_hw": [32, 32], "training": False},
                      Counter(-1)) == fresh
    check_input_fits(model_3cls, "resnet18", small_spec, (32, 32))
    check_input_fits(model_3cls, "resnet18", small_spec, (32, 32))  # kept: no meta forward
    vit = torchvision.models.VisionTransformer(32, 16, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8,
                                              num_classes=3).eval()
    for _ in range(2):  # a ViT at another size than its own: refused both times, nothing kept
        with pytest.raises(FastevalError, match="does not accept 48x48"):
            check_input_fits(vit, "vit_b_16", small_spec, (48, 48))


def test_an_unwritable_cache_still_answers_and_warns_once(tmp_path, monkeypatch, model_3cls, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTEVAL_CACHE", str(blocker))
    monkeypatch.setattr(compile_cache, "_UNWRITABLE", set())
    for _ in range(2):
        assert remembered("input_fits", model_3cls, {"input_hw": [32, 32]}, Counter(True)) is True
    lines = [line for line in capsys.readouterr().err.splitlines() if "cannot write the cache" in line]
    assert len(lines) == 1 and str(blocker) in lines[0] and facts_dir().startswith(str(blocker))
