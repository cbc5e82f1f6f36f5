"""Answers of meta-device checks kept between runs (fasteval/model/meta_facts.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

import fasteval.model.compile_cache as compile_cache
from fasteval.errors import FastevalError
from fasteval.memory import check_eval_memory
from fasteval.model.footprint import activation_bytes
from fasteval.model.meta_facts import facts_dir, remembered
from fasteval.model.models import build_model, check_input_fits


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
    assert remembered("activation_bytes", model_3cls, {"batch_size": 4}, again) == 1234
    assert again.calls == 0
    other_shape, other_head, other_kind = Counter(5), Counter(6), Counter(True)
    assert remembered("activation_bytes", model_3cls, {"batch_size": 8}, other_shape) == 5
    assert remembered("activation_bytes", torchvision.models.resnet18(num_classes=4), {"batch_size": 4},
                      other_head) == 6
    assert remembered("input_fits", model_3cls, {"batch_size": 4}, other_kind) is True
    assert (other_shape.calls, other_head.calls, other_kind.calls) == (1, 1, 1)


def test_a_failure_or_no_answer_is_never_kept(cache, model_3cls):
    def refuses():
        raise FastevalError("no")

    with pytest.raises(FastevalError):
        remembered("input_fits", model_3cls, {"input_hw": [8, 8]}, refuses)
    assert remembered("input_fits", model_3cls, {"input_hw": [8, 8]}, Counter(True)) is True
    none, later = Counter(None), Counter(77)  # "the model cannot run on the meta device": asked again next time
    assert remembered("activation_bytes", model_3cls, {"batch_size": 2}, none) is None
    assert remembered("activation_bytes", model_3cls, {"batch_size": 2}, later) == 77
    assert later.calls == 1


@pytest.mark.parametrize("content", ["null", "[]", '"x"', "{", '{"key": 5}', "VALUE"])
def test_a_damaged_or_foreign_file_is_recomputed(cache, model_3cls, content):
    """Whatever a kept file holds (not JSON, JSON that is not an object, another key, a value of the wrong
    form), the check runs again and its answer replaces the file."""
    shapes = {"batch_size": 4}
    remembered("activation_bytes", model_3cls, shapes, Counter(1234))
    (path,) = list((cache / "meta").iterdir())
    if content == "VALUE":
        for wrong in ("abc", [1], -5, 1.5, True):
            stored = json.loads(path.read_text())
            path.write_text(json.dumps({**stored, "value": wrong}))
            again = Counter(99)
            assert remembered("activation_bytes", model_3cls, shapes, again) == 99
            assert again.calls == 1
        return
    path.write_text(content)
    again = Counter(99)
    assert remembered("activation_bytes", model_3cls, shapes, again) == 99 and again.calls == 1
    assert json.loads(path.read_text())["value"] == 99


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


def test_a_checkpoint_of_an_architecture_built_only_on_the_cpu_loads(tmp_path):
    """RegNet computes on tensors while it is built, which the meta device cannot: finding its head and
    loading a checkpoint into it build it on the CPU instead (they failed before)."""
    torch.manual_seed(0)
    source = torchvision.models.regnet_x_400mf(num_classes=3).eval()
    path = tmp_path / "regnet.pt"
    torch.save(source.state_dict(), path)
    model = build_model("regnet_x_400mf", str(path), 3)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(model(x), source(x))
