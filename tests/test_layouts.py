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


# -- WebDataset shards ---------------------------------------------------------------------------------------

SHARD_SIZES = (7, 2, 9)  # uneven, 18 in all: the tree's samples in order


def write_shard(path, members: list[tuple[str, bytes]]) -> str:
    """A tar as webdataset's TarWriter writes one: regular members, in the order given."""
    import io
    import tarfile

    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def tree_members(tree: str) -> list[list[tuple[str, bytes]]]:
    """The tree's samples as webdataset samples (KEY.jpg + KEY.cls), split into shards of SHARD_SIZES."""
    listed = ImageFolder(tree)
    members = []
    for i, (path, label) in enumerate(listed.samples):
        with open(path, "rb") as f:
            members.append([(f"sample{i:06d}.jpg", f.read()), (f"sample{i:06d}.cls", str(label).encode())])
    shards, start = [], 0
    for size in SHARD_SIZES:
        shards.append([m for sample in members[start:start + size] for m in sample])
        start += size
    return shards


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> str:
    """The tree as 3 shards val-000000..000002.tar in a folder of their own."""
    folder = tmp_path_factory.mktemp("shards")
    for i, members in enumerate(tree_members(tree)):
        write_shard(folder / f"val-{i:06d}.tar", members)
    return str(folder)


def test_brace_patterns_expand_as_the_shell_does():
    from fasteval.data.layouts import expand_braces

    assert expand_braces("val-{000000..000002}.tar") == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert expand_braces("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar",
                                                   "b/x-9.tar", "b/x-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize("form", ["folder", "pattern", "list"])
def test_shards_list_the_trees_samples_in_shard_order(tree, shards, form):
    data = {"folder": shards, "pattern": os.path.join(shards, "val-{000000..000002}.tar"),
            "list": os.path.join(shards, "val-{000000,000001,000002}.tar")}[form]
    listed = discover(data)
    truth = ImageFolder(tree)
    assert listed.layout == "webdataset"
    assert listed.classes == ["0", "1", "2"]
    assert listed.labels == truth.targets
    assert [relative_path(listed, p) for p in listed.paths][:8] == [
        *(f"val-000000.tar::sample{i:06d}.jpg" for i in range(7)), "val-000001.tar::sample000007.jpg"]


def test_one_shard_is_data_too(shards):
    listed = discover(os.path.join(shards, "val-000001.tar"))
    assert [relative_path(listed, p) for p in listed.paths] == ["val-000001.tar::sample000007.jpg",
                                                                "val-000001.tar::sample000008.jpg"]


def _without_path(rows: list[list[str]]) -> list[list[str]]:
    return [row[1:] for row in rows]


# The reference builds torchvision's ImageFolder over the root: a list that is no tree needs its dataset from
# the sample list (evaluation/reference.py, the lead's file); strict, so that the fix removes these marks.

@pytest.mark.parametrize("extra", [(), ("--reference",)],
                         ids=["fast", "reference"])
def test_shards_give_the_trees_counts_and_predictions(tree, shards, weights_3cls, tmp_path, extra):
    report, rows = _run(tree, tmp_path, "folder", weights_3cls, *extra)
    other, other_rows = _run(shards, tmp_path, "shards", weights_3cls, *extra)
    assert {k: other[k] for k in COUNTS} == {k: report[k] for k in COUNTS}
    assert _without_path(other_rows) == _without_path(rows)  # the path column: SHARD::MEMBER
    assert other_rows[1][0] == "val-000000.tar::sample000000.jpg"


def _bad_shard_cases(tree: str) -> dict[str, tuple[list, str, str]]:
    """(the second shard's members, the member an error names, what it says)."""
    members = tree_members(tree)[1]
    image = members[0][1]
    return {
        "no cls": ([*members, ("extra.jpg", image)], "extra.jpg", "has no extra.cls"),
        "no image": ([*members, ("extra.cls", b"1")], "extra.cls", "has no image"),
        "cls not an integer": ([*members, ("extra.jpg", image), ("extra.cls", b"one")], "extra.cls",
                               "not a class index"),
        "cls out of range": ([*members, ("extra.jpg", image), ("extra.cls", b"-1")], "extra.cls", "out of range"),
        "damaged image": ([*members, ("extra.jpg", b"\xff\xd8\xff" + b"\x00" * 40), ("extra.cls", b"1")],
                          "extra.jpg", "damaged JPEG"),
    }


@pytest.mark.parametrize("case", ["no cls", "no image", "cls not an integer", "cls out of range", "damaged image"])
def test_bad_shard_is_one_line_naming_shard_and_member(case, tree, tmp_path, capsys):
    members, member, reason = _bad_shard_cases(tree)[case]
    good = tree_members(tree)
    write_shard(tmp_path / "val-000000.tar", good[0])
    write_shard(tmp_path / "val-000001.tar", members)
    write_shard(tmp_path / "val-000002.tar", good[2])
    assert main(["eval", str(tmp_path), *SMALL]) == 2
    err = _one_line(capsys)
    assert "val-000001.tar" in err and member in err and reason in err, err


@pytest.mark.parametrize("damage, reason", [("inside a member", "member sample000012.jpg is cut short"),
                                            ("between members", "it ends after member sample000011.cls"),
                                            ("a header", "header cut short or damaged after member sample000011.cls")])
def test_a_damaged_shard_is_named(shards, tmp_path, capsys, damage, reason):
    """tarfile stops silently at a header it cannot read, or at the file's end: the shard's end is checked."""
    import tarfile

    for name in ("val-000000.tar", "val-000001.tar", "val-000002.tar"):
        shutil.copy(os.path.join(shards, name), tmp_path / name)
    last = tmp_path / "val-000002.tar"
    with tarfile.open(last) as archive:
        member = {m.name: m for m in archive}["sample000012.jpg"]  # the third shard's third sample
    data = bytearray(last.read_bytes())
    if damage == "inside a member":
        data = data[:member.offset_data + 10]
    elif damage == "between members":
        data = data[:member.offset]
    else:
        data[member.offset:member.offset + 100] = b"x" * 100
    last.write_bytes(bytes(data))
    assert main(["eval", str(tmp_path / "val-{000000..000002}.tar"), *SMALL]) == 2
    err = _one_line(capsys)
    assert "val-000002.tar" in err and reason in err, err


@pytest.mark.parametrize("extra", [("--exact", "off"), ("--reference",)],
                         ids=["fast", "reference"])
def test_a_csv_outside_the_tree_gives_its_counts(tree, weights_3cls, tmp_path, extra):
    data = write_csv(str(tmp_path / "list.csv"), csv_rows(tree, absolute=True))
    report, rows = _run(tree, tmp_path, "folder", weights_3cls, *extra)
    other, other_rows = _run(data, tmp_path, "elsewhere", weights_3cls, *extra)
    assert {k: other[k] for k in COUNTS} == {k: report[k] for k in COUNTS}
    assert _without_path(other_rows) == _without_path(rows)
    assert other_rows[1][0] == os.path.join(tree, "class_000", "img_00000.jpg")


def test_cache_and_loaders_read_shards(tree, shards, weights_3cls, tmp_path):
    """The decoded store (--cache, keyed by each member's bytes) and the torchvision loader over shards."""
    report, rows = _run(tree, tmp_path, "folder", weights_3cls, "--exact", "off")
    for name, extra in {"cache": ("--cache", str(tmp_path / "store")), "again": ("--cache", str(tmp_path / "store")),
                        "torchvision": ("--loader", "torchvision")}.items():
        other, other_rows = _run(shards, tmp_path, name, weights_3cls, "--exact", "off", *extra)
        assert {k: other[k] for k in COUNTS} == {k: report[k] for k in COUNTS}
        assert _without_path(other_rows) == _without_path(rows)


@pytest.mark.parametrize("layout", ["csv", "shards"])
def test_dali_decodes_a_list_as_it_decodes_the_tree(tree, layouts, shards, layout, small_spec):
    """DALI's file reader for a CSV's files; tar members through its external source: the same batches."""
    import torch

    from fasteval.data.loader_dali import dali_available
    from fasteval.data.loaders import make_loader

    if not dali_available():
        pytest.skip("needs nvidia-dali")
    cpu = torch.device("cpu")
    data = layouts["csv"] if layout == "csv" else shards
    want = list(make_loader("dali", discover(tree), small_spec, batch_size=5, workers=1, device=cpu))
    loader = make_loader("dali", discover(data), small_spec, batch_size=5, workers=1, device=cpu)
    for _ in range(2):  # a second pass too: the external source starts again
        got = list(loader)
        assert [b.real for b in got] == [b.real for b in want] == [5, 5, 5, 3]
        for a, b in zip(got, want):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


# --- --classes: the model's classes where DATA holds only some ------------------------------------------------

@pytest.fixture(scope="module")
def head5(tmp_path_factory) -> tuple[str, list[str]]:
    """A resnet18 with a 5-class head and the head's class names, in an order that is not sorted: the tree's
    three classes are among them at indices 3, 0 and 4."""
    import torch
    import torchvision

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("head5") / "five.pt"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), path)
    return str(path), ["class_001", "zebra", "apple", "class_000", "class_002"]


def _plain_subset_loop(tree: str, weights: str, names: list[str]) -> tuple[int, int, list[int]]:
    """A tutorial's loop over a subset: ImageFolder with a target_transform to the head's indices, eager fp32."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from fasteval.data.preprocess import get_spec

    spec = get_spec("imagenet", resize=40, crop=32)
    folder = ImageFolder(tree)
    relabel = [names.index(c) for c in folder.classes]
    data = ImageFolder(tree, transform=transforms.Compose([transforms.Resize(40), transforms.CenterCrop(32),
                                                           transforms.ToTensor(),
                                                           transforms.Normalize(spec.mean, spec.std)]),
                       target_transform=relabel.__getitem__)
    model = torchvision.models.resnet18(num_classes=5)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    top1 = top5 = 0
    predictions = []
    with torch.no_grad():
        for images, labels in DataLoader(data, batch_size=7):
            logits = model(images)
            predicted = logits.argmax(1)
            predictions += predicted.tolist()
            top1 += int((predicted == labels).sum())
            top5 += int((logits.topk(5, 1).indices == labels[:, None]).any(1).sum())
    return top1, top5, predictions


@pytest.mark.parametrize("extra", [("--compile", "off"), ("--reference",)], ids=["fast", "reference"])
def test_classes_file_evaluates_a_subset_against_the_heads_names(tree, layouts, head5, tmp_path, extra):
    weights, names = head5
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n\n")
    top1, top5, predictions = _plain_subset_loop(tree, weights, names)
    for name in ("folder", "csv"):
        report, rows = _run(layouts[name], tmp_path, name, weights, "--classes", str(tmp_path / "names.txt"), *extra)
        assert (report["correct_top1"], report["correct_top5"], report["samples"]) == (top1, top5, 18), name
        assert [c["class"] for c in report["per_class"]] == names
        assert [c["samples"] for c in report["per_class"]] == [6, 0, 0, 6, 6]
        assert rows[0][1:3] == ["label", "prediction"]  # the head's indices
        assert [int(r[1]) for r in rows[1:]] == [3] * 6 + [0] * 6 + [4] * 6, name
        assert [int(r[2]) for r in rows[1:]] == predictions, name


def test_classes_count_lets_a_shard_with_fewer_classes_meet_its_head(tree, shards, head5, tmp_path, capsys):
    weights, _ = head5
    one = os.path.join(shards, "val-000001.tar")  # two samples of class 1: "2 classes" by its own count
    assert main(["eval", one, "--weights", weights, *SMALL]) == 2
    assert "5-class head but the dataset has 2 classes; where DATA holds only some" in _one_line(capsys)
    report, _ = _run(one, tmp_path, "one", weights, "--classes", "5")
    assert report["samples"] == 2 and report["config"]["classes"] == 5
    assert [c["class"] for c in report["per_class"]] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("case", ["count below a label", "count on a folder", "name missing", "repeated name",
                                  "empty file", "no file"])
def test_bad_classes_are_one_line(case, tree, shards, head5, tmp_path, capsys):
    weights, names = head5
    listing = tmp_path / "names.txt"
    data, value, message = {
        "count below a label": (shards, "2", "val-000002.tar::sample000012.jpg: class index 2 is outside --classes "
                                             "(2 classes)"),
        "count on a folder": (tree, "5", "--classes 5: DATA's classes are named (3 of them), not numbered"),
        "name missing": (tree, "class_001\nclass_000\n", "DATA's class class_002 is not among --classes' 2 names"),
        "repeated name": (tree, "a\nclass_000\na\n", "line 3: a is on line 1 too"),
        "empty file": (tree, "\n\n", "is empty: expected one class name per line"),
        "no file": (tree, None, "cannot read it"),
    }[case]
    if value is not None and not value.isdigit():
        listing.write_text(value)
        value = str(listing)
    elif value is None:
        value = str(tmp_path / "missing.txt")
    assert main(["eval", data, "--weights", weights, *SMALL, "--classes", value]) == 2
    assert message in _one_line(capsys)
