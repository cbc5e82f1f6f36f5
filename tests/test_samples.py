"""The sample list equals torchvision's ImageFolder on awkward trees."""

from __future__ import annotations

import os

import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from fasteval.errors import FastevalError
from fasteval.data.samples import discover


def _img(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = {"png": "PNG", "bmp": "BMP", "webp": "WEBP"}.get(path.rsplit(".", 1)[-1].lower(), "JPEG")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, fmt)


def _touch(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("not an image")


@pytest.fixture
def awkward_tree(tmp_path) -> str:
    root = str(tmp_path / "tree")
    # Class names that sort differently by case: ImageFolder sorts by code point (upper case first).
    for rel in ["b/x.JPG", "b/y.jpeg", "b/nested/deeper/z.Png", "b/nested/a.jpg", "b/B.jpg", "b/a.JPEG",
                "Banana/1.webp", "Banana/0.bmp", "apple/img.jpg", "Apple/IMG.JPG", "_under/q.png",
                "Zeta/sub/k.jpg"]:
        _img(os.path.join(root, rel))
    for rel in ["b/notes.txt", "b/nested/meta.json", "b/noext", "apple/thumbs.db", "Apple/x.jpg.bak"]:
        _touch(os.path.join(root, rel))
    _touch(os.path.join(root, "README.txt"))  # a file at the top level is not a class
    return root


def test_matches_imagefolder_exactly(awkward_tree):
    ref = ImageFolder(awkward_tree)
    ours = discover(awkward_tree)
    assert ours.classes == ref.classes
    assert ours.class_to_idx == ref.class_to_idx
    assert ours.samples == ref.samples
    assert ours.classes == ["Apple", "Banana", "Zeta", "_under", "apple", "b"]
    assert len(ours) == 12
    assert not any(p.endswith((".txt", ".json", ".bak", ".db", "noext")) for p in ours.paths)


def test_labels_and_paths_align(awkward_tree):
    ours = discover(awkward_tree)
    assert list(zip(ours.paths, ours.labels)) == ours.samples
    assert ours.num_classes == 6


def test_missing_folder(tmp_path):
    with pytest.raises(FastevalError, match="not found: .*nope"):
        discover(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "file.jpg"
    f.write_text("x")
    with pytest.raises(FastevalError, match="not a folder"):
        discover(f)


def test_no_class_folders(tmp_path):
    _img(str(tmp_path / "loose.jpg"))
    with pytest.raises(FastevalError, match="no class folders"):
        discover(tmp_path)


def test_class_folder_without_images_names_it(tmp_path):
    _img(str(tmp_path / "cat" / "1.jpg"))
    _touch(str(tmp_path / "dog" / "readme.txt"))
    with pytest.raises(FastevalError, match=r"class folder has no images: .*dog"):
        discover(tmp_path)
    with pytest.raises(FileNotFoundError):  # ImageFolder refuses it as well
        ImageFolder(str(tmp_path))


def _unreadable(monkeypatch, folder: str) -> None:
    """``folder`` cannot be listed, as after ``chmod 000`` for a user other than root (the tests run as root,
    whom a permission does not stop): os.scandir, which os.walk lists with, raises EACCES for it."""
    import errno

    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path) == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)


@pytest.mark.parametrize("where", ["class", "subfolder"])
def test_an_unreadable_class_folder_is_named_as_unreadable(tmp_path, monkeypatch, capsys, where):
    """A class folder (or the one folder that holds its images) that cannot be read is said to be unreadable,
    naming it, in one line with exit code 2; not "has no images"."""
    from fasteval import cli

    root = tmp_path / "data"
    _img(str(root / "cat" / "1.jpg"))
    _img(str(root / "dog" / "sub" / "2.jpg"))
    dog = str(root / "dog")
    _unreadable(monkeypatch, dog if where == "class" else os.path.join(dog, "sub"))
    expected = {"class": f"cannot read the class folder {dog}: Permission denied",
                "subfolder": f"class folder {dog} has no images it can read: cannot read {dog}/sub: Permission denied"}
    with pytest.raises(FastevalError) as refused:
        discover(root)
    assert str(refused.value) == expected[where]
    capsys.readouterr()
    assert cli.main(["eval", str(root), "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"fasteval: error: {expected[where]}\n"
