"""The run's architecture and preprocessing: flags, a fasteval train checkpoint's record, the default with its
note; the record read without torch; a train checkpoint evaluated without options gives its best epoch's counts."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision

from fasteval.checkpoint_record import fasteval_record
from fasteval.cli import main
from fasteval.data.preprocess import PRESETS, spec_from_record
from fasteval.data.synth import synth_dataset
from fasteval.errors import FastevalError
from fasteval.spec_choice import choose_spec

RECORD = {"preset": "seed", "resize": 48, "crop": None, "interpolation": "bicubic", "antialias": True,
          "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A train-style checkpoint (weights under model_state_dict, arch, classes, preprocessing, tensors elsewhere),
    a plain state_dict, an old-format (non-zip) save, and a file that is not a checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    paths = {name: str(root / f"{name}.pt") for name in ("train", "plain", "legacy", "junk")}
    torch.save({"model_state_dict": state, "arch": "resnet34", "classes": ["a", "b", "c"], "preprocess": RECORD,
                "rng": {"torch": torch.get_rng_state(), "python": [1, 2]}, "epoch": 3}, paths["train"])
    torch.save(state, paths["plain"])
    torch.save({"model_state_dict": state, "preprocess": RECORD}, paths["legacy"], _use_new_zipfile_serialization=False)
    with open(paths["junk"], "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    return paths


def test_the_record_is_read_without_torch_and_only_from_a_train_checkpoint(checkpoints):
    assert fasteval_record(checkpoints["train"]) == {"arch": "resnet34", "classes": ["a", "b", "c"],
                                                      "preprocess": RECORD}
    for name in ("plain", "legacy", "junk"):
        assert fasteval_record(checkpoints[name]) is None
    assert fasteval_record("/nonexistent/x.pt") is None


CASES = [  # (arch, weights, preset, resize, crop) -> (arch, resize, crop, interpolation, where, note?)
    ((None, "train", None, None, None), ("resnet34", 48, None, "bicubic", "recorded in --weights", False)),
    (("resnet18", "train", None, None, None), ("resnet18", 48, None, "bicubic", "recorded in --weights", False)),
    ((None, "train", None, 64, None), ("resnet34", 64, None, "bicubic", "with --resize 64", True)),
    ((None, "train", "imagenet", None, None), ("resnet34", 256, 224, "bilinear", "--preset imagenet", True)),
    ((None, "plain", None, None, None), ("resnet18", 256, 224, "bilinear", "the default preset imagenet", True)),
    ((None, "plain", None, 128, 112), ("resnet18", 128, 112, "bilinear", "with --resize 128 --crop 112", False)),
    ((None, "plain", "seed", None, None), ("resnet18", 224, None, "bilinear", "--preset seed", False)),
    ((None, None, None, None, None), ("resnet18", 256, 224, "bilinear", "the default preset imagenet", False)),
    ((None, "DEFAULT", None, None, None), ("resnet18", 256, 224, "bilinear", "the default preset imagenet", False)),
]


@pytest.mark.parametrize("given,expected", CASES)
def test_choose_spec(given, expected, checkpoints):
    arch, weights, preset, resize, crop = given
    choice = choose_spec(arch, checkpoints.get(weights, weights), preset, resize, crop)
    assert (choice.arch, choice.spec.resize, choice.spec.crop, choice.spec.interpolation) == expected[:4]
    assert expected[4] in choice.reason and choice.spec.source == choice.reason
    assert (choice.note is not None) == expected[5]
    if choice.note and weights == "plain":
        assert "--preset seed" in choice.note and "imagenet" in choice.note
    elif choice.note:  # flags over a train checkpoint's record
        assert " over the preprocessing --weights " in choice.note


def test_records_old_and_malformed():
    old = spec_from_record({"preset": "seed", "resize": 224, "crop": None}, "x")
    assert old == PRESETS["seed"]
    for bad in ({"preset": "seed"}, {**RECORD, "resize": "big"}, {**RECORD, "crop": 99},
                {**RECORD, "interpolation": "lanczos"}, {**RECORD, "std": [0, 1, 1]}):
        with pytest.raises(FastevalError, match="^x: its recorded preprocessing"):
            spec_from_record(bad, "x")


def test_a_train_checkpoint_evaluates_with_its_own_preprocessing(tmp_path, capsys):
    """`fasteval train --resize 40` then `fasteval eval VAL --weights best.pt` with no option: the recorded
    preprocessing (said in the report), the counts of the best epoch's validation; a plain state_dict of the
    same weights gets the default preset and its note."""
    train = synth_dataset(tmp_path / "train", classes=3, per_class=4, size="64x64", seed=21)
    val = synth_dataset(tmp_path / "val", classes=3, per_class=4, size="64x64", seed=22)
    run = tmp_path / "run"
    common = ["--workers", "0", "--no-progress", "--batch-size", "4"]
    assert main(["train", train, val, "--out", str(run), "--resize", "40", "--epochs", "1", "--compile", "off",
                 "--precision", "fp32", "--val-batch-size", "4", *common]) == 0
    history = json.loads((run / "history.json").read_text())
    capsys.readouterr()
    out = tmp_path / "e.json"
    assert main(["eval", val, "--weights", str(run / "best.pt"), *common, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["plan"]["preprocessing"]["reason"].startswith("recorded in --weights")
    assert report["config"]["resize"] == 40 and report["config"]["crop"] is None
    assert report["correct_top1"] == history[-1]["val_correct_top1"]
    text = capsys.readouterr()
    assert "preprocessing" in text.out and "note:" not in text.err
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(run / "best.pt", weights_only=True)["model_state_dict"], plain)
    assert main(["eval", val, "--weights", str(plain), *common, "--explain"]) == 0
    err = capsys.readouterr().err
    assert f"note: --weights {plain} records no preprocessing: evaluated with the default preset imagenet" in err


def test_flags_over_a_record_are_noted_and_a_sweep_of_different_records_is_refused(checkpoints, tmp_path):
    from fasteval.spec_choice import check_one_preprocessing

    choice = choose_spec(None, checkpoints["train"], "seed", None, None)
    assert choice.note.startswith(f"--preset seed over the preprocessing --weights {checkpoints['train']} records")
    assert "Resize(48, bicubic)" in choice.note
    with pytest.raises(FastevalError, match="the checkpoints record different preprocessing"):
        check_one_preprocessing([checkpoints["plain"], checkpoints["train"]], None)
    with pytest.raises(FastevalError, match="nothing recorded: the default preset"):
        check_one_preprocessing([checkpoints["train"], checkpoints["plain"]], None)
    check_one_preprocessing([checkpoints["train"], checkpoints["train"]], None)  # the same record
    check_one_preprocessing([checkpoints["plain"], checkpoints["train"]], "imagenet")  # one preset for all


def test_a_resize_below_the_presets_crop_names_the_crop_it_came_from(checkpoints):
    with pytest.raises(FastevalError, match=r"^--resize 48 is smaller than the crop 224 of imagenet: give --crop too"):
        choose_spec(None, checkpoints["plain"], None, 48, None)
    with pytest.raises(FastevalError, match=r"^--crop 64 is larger than --resize 48$"):
        choose_spec(None, checkpoints["plain"], None, 48, 64)


def test_validate_always_runs_the_fast_path(tmp_path, capsys):
    """--validate compares the fast path with the plain loop: a run the route would send wholly to the
    reference's code (a tiny set, assumed rates) still runs the fast path there."""
    data = synth_dataset(tmp_path / "d", classes=3, per_class=4, size="64x64", seed=5)
    out = tmp_path / "v.json"
    assert main(["eval", data, "--resize", "40", "--crop", "32", "--workers", "0", "--no-progress", "--validate",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["plan"]["route"]["value"] == "fast" and report["plan"]["loader"]["value"] != "none"
    assert report["reference"]["plan"]["route"]["value"] == "reference"
