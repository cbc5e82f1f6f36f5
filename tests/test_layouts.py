"""The same images as an ImageFolder tree, a CSV list and WebDataset shards: the same samples, counts and
predictions; and each layout's bad input refused in one line naming the file and line (or shard and member)."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
from torchvision.datasets import ImageFolder

from fasteval.cli import main
from fasteval.data.samples import discover, relative_path
from fasteval.data.synth import synth_dataset

SMALL = ["--resize", "40", "--crop", "32", "--workers", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    """3 classes x 6 JPEGs, one file renamed with a comma and one moved into a nested folder (ImageFolder's
    walk orders it after the class folder's own files)."""
    root = synth_dataset(tmp_path_factory.mktemp("layouts") / "data", classes=3, per_class=6, size="72x60", seed=7)
    os.rename(os.path.join(root, "class_001", "img_00001.jpg"), os.path.join(root, "class_001", "a, b.jpg"))
    os.makedirs(os.path.join(root, "class_002", "sub"))
    os.rename(os.path.join(root, "class_002", "img_00000.jpg"), os.path.join(root, "class_002", "sub", "a.jpg"))
    return root


def write_csv(path: str, rows: list[tuple[str, str]], header=("path", "label")) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def csv_rows(root: str, absolute: bool = False) -> list[tuple[str, str]]:
    """The tree's images as CSV rows, in reverse order (the list's order must not matter)."""
    listed = ImageFolder(root)
    rows = [(p if absolute else os.path.relpath(p, root), listed.classes[t]) for p, t in listed.samples]
    return rows[::-1]


@pytest.fixture(scope="module")
def layouts(tree, tmp_path_factory) -> dict[str, str]:
    """DATA for each layout: the tree, a CSV of relative paths and one of absolute paths, both in the tree's
    folder (a file there is no class folder: ImageFolder ignores it)."""
    return {"folder": tree,
            "csv": write_csv(os.path.join(tree, "relative.csv"), csv_rows(tree)),
            "csv-absolute": write_csv(os.path.join(tree, "absolute.csv"), csv_rows(tree, absolute=True))}


def test_csv_lists_imagefolders_samples(tree, layouts):
    truth = ImageFolder(tree)
    for name in ("csv", "csv-absolute"):
        listed = discover(layouts[name])
        assert listed.layout == "csv"
        assert listed.classes == truth.classes
        assert [relative_path(listed, p) for p in listed.paths] == [os.path.relpath(p, tree) for p, _ in truth.samples]
        assert listed.labels == truth.targets
    assert "class_001/a, b.jpg" in [relative_path(listed, p) for p in listed.paths]


def test_csv_paths_outside_its_folder_are_reported_absolute(tree, tmp_path):
    listed = discover(write_csv(str(tmp_path / "elsewhere.csv"), csv_rows(tree, absolute=True)))
    assert [relative_path(listed, p) for p in listed.paths] == [p for p, _ in ImageFolder(tree).samples]


def _run(data: str, out, name: str, weights: str, *extra: str) -> tuple[dict, list[list[str]]]:
    predictions, report = out / f"{name}.csv", out / f"{name}.json"
    assert main(["eval", data, "--weights", weights, *SMALL, "--predictions", str(predictions),
                 "--json", str(report), *extra]) == 0
    with open(predictions, newline="") as f:
        rows = list(csv.reader(f))
    return json.loads(report.read_text()), rows


COUNTS = ("samples", "correct_top1", "correct_top5")


@pytest.mark.parametrize("extra", [(), ("--reference",)], ids=["fast", "reference"])
def test_csv_gives_the_trees_counts_and_predictions(layouts, weights_3cls, tmp_path, extra):
    results = {name: _run(data, tmp_path, name, weights_3cls, *extra) for name, data in layouts.items()}
    (report, rows) = results["folder"]
    assert report["samples"] == 18
    for name in ("csv", "csv-absolute"):
        other, other_rows = results[name]
        assert {k: other[k] for k in COUNTS} == {k: report[k] for k in COUNTS}
        assert other_rows == rows


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def _bad_csv_cases(tree: str) -> dict[str, tuple[list, int, str]]:
    good = csv_rows(tree)
    return {
        "missing path": ([*good[:3], ("class_000/nope.jpg", "class_000"), *good[3:]], 5, "nope.jpg not found"),
        "a folder": ([*good[:1], ("class_002/sub", "class_002")], 3, "not a regular file"),
        "empty label": ([*good[:2], (good[2][0], "")], 4, "an empty label"),
        "duplicate": ([*good, good[4]], len(good) + 2, "listed already on line 6"),
        "three fields": ([*good[:1], (good[1][0], good[1][1], "x")], 3, "3 field(s), expected 2"),
        "one field": ([*good[:6], (good[6][0],)], 8, "1 field(s), expected 2"),
    }


@pytest.mark.parametrize("case", ["missing path", "a folder", "empty label", "duplicate", "three fields", "one field"])
def test_bad_csv_is_one_line_naming_its_line(case, tree, tmp_path, capsys):
    rows, line, reason = _bad_csv_cases(tree)[case]
    data = write_csv(str(tmp_path / "bad.csv"), [(os.path.join(tree, r[0]) if r[0] else r[0], *r[1:]) for r in rows])
    assert main(["eval", data, *SMALL]) == 2
    err = _one_line(capsys)
    assert f"bad.csv line {line}:" in err and reason in err


def test_a_csv_is_told_by_its_header_not_its_name(tree, tmp_path, capsys):
    named = tmp_path / "list.txt"
    write_csv(str(named), csv_rows(tree, absolute=True))
    assert discover(str(named)).layout == "csv"
    other = write_csv(str(tmp_path / "other.csv"), csv_rows(tree, absolute=True), header=("file", "class"))
    assert main(["eval", other, *SMALL]) == 2
    assert "not a folder, nor a CSV list" in _one_line(capsys)


def test_an_image_the_reference_cannot_decode_is_named(tree, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    data = write_csv(str(tmp_path / "list.csv"), [*csv_rows(tree, absolute=True), (str(broken), "class_000")])
    assert main(["eval", data, *SMALL]) == 2
    err = _one_line(capsys)
    assert "broken.jpg" in err and "not an image" in err
