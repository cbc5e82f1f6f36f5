"""The sample list: the one place where a dataset folder is turned into (path, label) pairs.

Discovery follows torchvision's ``ImageFolder`` exactly (class folders sorted by name,
files sorted per folder while walking nested folders, the same case-insensitive extension
filter), so every loader evaluates the identical list in the identical order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import FastevalError


@dataclass(frozen=True)
class SampleList:
    """Every sample of a dataset folder, in ImageFolder order."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [t for _, t in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: list[int]) -> SampleList:
        """The samples at ``indices`` (same root and classes), in that order."""
        return SampleList(root=self.root, classes=self.classes, samples=[self.samples[i] for i in indices])


def is_image_file(path: str) -> bool:
    """ImageFolder's filter: a known image extension, compared case-insensitively."""
    return path.lower().endswith(IMG_EXTENSIONS)


def discover(root: str | os.PathLike) -> SampleList:
    """List the samples of ``root`` exactly as ``torchvision.datasets.ImageFolder`` does.

    Raises FastevalError for a missing folder, a folder without class folders, or a
    class folder without images (ImageFolder refuses those too).
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FastevalError(f"dataset folder not found: {root}")
    if not os.path.isdir(root):
        raise FastevalError(f"dataset path is not a folder: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FastevalError(f"no class folders in {root} (expected ROOT/CLASS/IMAGE files)")
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        found = 0
        for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
            for fname in sorted(fnames):
                path = os.path.join(dirpath, fname)
                if is_image_file(path):
                    samples.append((path, index))
                    found += 1
        if not found:
            raise FastevalError(
                f"class folder has no images: {class_dir} "
                f"(accepted extensions: {', '.join(IMG_EXTENSIONS)})"
            )
    return SampleList(root=root, classes=classes, samples=samples)


def relative_path(samples: SampleList, path: str) -> str:
    """A sample's path relative to the dataset root, for reports."""
    return str(Path(path).relative_to(samples.root))
