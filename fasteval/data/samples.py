"""The sample list: the one place where DATA is turned into (path, label) pairs.

DATA's layout is decided by content: an ImageFolder tree (class folders), a CSV file list (a file whose
first line is ``path,label``) or WebDataset tar shards (a ``.tar`` file, a brace pattern, a folder of
``.tar`` files and no class folders); the last two are listed by fasteval/data/layouts.py. A tree's
discovery follows torchvision's ``ImageFolder`` exactly (class folders sorted by name, files sorted per
folder while walking nested folders, the same case-insensitive extension filter), so every loader
evaluates the identical list in the identical order. A sample's bytes are read through
fasteval/data/sources.py (a tar member's path is ``SHARD::MEMBER``).
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from fasteval.data.sources import sample_stat
from fasteval.errors import FastevalError, printable

# torchvision's ImageFolder extensions (``torchvision.datasets.folder.IMG_EXTENSIONS``; a test keeps them
# equal), held here so that listing a dataset imports neither torch nor torchvision: the command scans
# DATA and starts decoding while they import (fasteval/data/prefetch.py).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


LAYOUTS = ("folder", "csv", "webdataset")


@dataclass(frozen=True)
class SampleList:
    """Every sample of a dataset, in ImageFolder order (a tree, a CSV list) or the shards' order (WebDataset).
    ``root``: the folder paths are reported relative to (the tree, the CSV's folder, the shards' folder)."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    layout: str = "folder"  # one of LAYOUTS

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
        return SampleList(root=self.root, classes=self.classes, samples=[self.samples[i] for i in indices],
                          layout=self.layout)


def check_not_samples(samples: SampleList, outputs: dict[str, str | None]) -> None:
    """Refuse an output file (``{option: path}``) that is one of the dataset's files, even outside DATA
    (a sample may be a link to it): writing it would destroy a sample. Outputs inside DATA are refused
    before the listing (``output.files.check_not_inside``); here the files are compared (device and
    inode), once per sample, and only for an output that exists already (a rerun's report)."""
    for option, path in outputs.items():
        if not path or not os.path.isfile(path):
            continue
        found = os.stat(path)
        for sample, _ in samples.samples:
            try:
                same = os.path.samestat(sample_stat(sample), found)  # a tar member: its shard
            except OSError:
                continue  # a broken link: the header check names it
            if same:
                raise FastevalError(f"{option} {printable(path)} is an image of the dataset ({printable(sample)}): "
                                    f"writing it would destroy that sample; choose another file")


def is_image_file(path: str) -> bool:
    """ImageFolder's filter: a known image extension, compared case-insensitively."""
    return path.lower().endswith(IMG_EXTENSIONS)


def discover(root: str | os.PathLike, quiet: bool = False, classes: int | list[str] | None = None) -> SampleList:
    """List the samples of DATA (``root``): a CSV list or WebDataset shards (fasteval/data/layouts.py,
    decided by content), else a folder listed exactly as ``torchvision.datasets.ImageFolder`` does.

    ``classes``: the model's classes (``--classes``), where DATA holds only some of them: see ``with_classes``.

    Raises FastevalError for a missing folder, a folder without class folders, or a
    class folder without images, named unreadable where that is why (ImageFolder refuses those
    too). ImageFolder's list is kept
    as it is, but one warning line goes to stderr (unless ``quiet``) when files are counted
    more than once (symlinks, folder loops) or folders cannot be read (ImageFolder skips them).
    """
    root, given = os.fspath(root), classes
    other = _other_layout(root)
    if other is not None:
        return with_classes(other, given)
    if not os.path.exists(root):
        raise FastevalError(f"dataset folder not found: {root}")
    if not os.path.isdir(root):
        raise FastevalError(f"dataset path is not a folder, nor a CSV list (first line path,label), nor a tar "
                            f"shard: {root}")
    try:
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except OSError as exc:
        raise FastevalError(f"cannot read the dataset folder {root}: {exc.strerror or exc}") from None
    if not classes:
        raise FastevalError(f"no class folders in {root} (expected ROOT/CLASS/IMAGE files)")
    samples: list[tuple[str, int]] = []
    unreadable: list[OSError] = []
    for index, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        found, errors_before = 0, len(unreadable)
        for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True, onerror=unreadable.append)):
            for fname in sorted(fnames):
                path = os.path.join(dirpath, fname)
                if is_image_file(path):
                    samples.append((path, index))
                    found += 1
        if not found:
            _refuse_unreadable(class_dir, unreadable[errors_before:])
            raise FastevalError(
                f"class folder has no images: {class_dir} "
                f"(accepted extensions: {', '.join(IMG_EXTENSIONS)})"
            )
    if not quiet:
        for line in _warnings(root, samples, unreadable):
            print(f"fasteval: warning: {line}", file=sys.stderr)
    return with_classes(SampleList(root=root, classes=classes, samples=samples), given)


def given_classes(value: str | None) -> int | list[str] | None:
    """``--classes``: a count (digits), or the class names its file lists; None where not given."""
    if value is None:
        return None
    if value.strip().isdigit():
        count = int(value)
        if count < 1:
            raise FastevalError(f"--classes {value}: expected a class count >= 1 or a file of class names")
        return count
    return read_class_names(value)


def read_class_names(path: str) -> list[str]:
    """``--classes FILE``: one class name per line, in the model's head order (line 1 is index 0)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FastevalError(f"--classes {printable(path)}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise FastevalError(f"--classes {printable(path)} is empty: expected one class name per line")
    seen: dict[str, int] = {}
    for number, name in enumerate(names, 1):
        if not name:
            raise FastevalError(f"--classes {printable(path)} line {number} is empty: every line names a class")
        if name in seen:
            raise FastevalError(f"--classes {printable(path)} line {number}: {printable(name)} is on line "
                                f"{seen[name]} too")
        seen[name] = number
    return names


def with_classes(samples: SampleList, given: int | list[str] | None) -> SampleList:
    """The sample list with the model's classes where DATA holds only some (a subset of a validation set):
    ``given`` a count N (shards' ``.cls`` indices are the head's: every label must be below N) or the class
    names in the head's order (a folder's or a CSV's classes are found there by name, and relabelled with their
    index; shards' indices must be below their count). The samples and their order stay DATA's."""
    if given is None:
        return samples
    if isinstance(given, int):
        if samples.layout != "webdataset":
            if given == samples.num_classes:
                return samples
            raise FastevalError(f"--classes {given}: DATA's classes are named ({samples.num_classes} of them), not "
                                f"numbered: give --classes FILE, the model's class names one per line in its "
                                f"output order")
        names = [str(i) for i in range(given)]
    else:
        names = list(given)
    if samples.layout == "webdataset":
        outside = next(((p, t) for p, t in samples.samples if t >= len(names)), None)
        if outside is not None:
            raise FastevalError(f"{printable(outside[0])}: class index {outside[1]} is outside --classes "
                                f"({len(names)} classes)")
        return SampleList(samples.root, names, samples.samples, samples.layout)
    index = {name: i for i, name in enumerate(names)}
    missing = [name for name in samples.classes if name not in index]
    if missing:
        raise FastevalError(f"DATA's class {printable(missing[0])} is not among --classes' {len(names)} names"
                            + (f" ({len(missing)} such classes)" if len(missing) > 1 else ""))
    relabel = [index[name] for name in samples.classes]
    return SampleList(samples.root, names, [(p, relabel[t]) for p, t in samples.samples], samples.layout)


def _other_layout(data: str) -> SampleList | None:
    """DATA listed as a CSV list or as WebDataset shards, where its content is one; else None."""
    from fasteval.data import layouts

    if layouts.is_csv_list(data):
        found = layouts.csv_listing(data)
    else:
        shards = layouts.shards_of(data)
        if shards is None:
            return None
        found = layouts.webdataset_listing(shards, layouts.shards_root(data))
    return SampleList(root=found.root, classes=found.classes, samples=found.samples, layout=found.layout)


def _refuse_unreadable(class_dir: str, errors: list[OSError]) -> None:
    """A class folder without images because it, or a folder in it, cannot be read (a permission): said
    so, naming that folder, rather than "no images" (a folder loop's error is not one)."""
    failed = next((e for e in errors if e.errno != errno.ELOOP), None)
    if failed is None:
        return
    reason = failed.strerror or str(failed)
    if failed.filename == class_dir:
        raise FastevalError(f"cannot read the class folder {printable(class_dir)}: {reason}")
    raise FastevalError(f"class folder {printable(class_dir)} has no images it can read: cannot read "
                        f"{printable(failed.filename)}: {reason}")


def repeated_files(paths: list[str]) -> list[str]:
    """Paths whose file (same st_dev and st_ino) was already reached through an earlier path."""
    seen: set[tuple[int, int]] = set()
    repeated = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue  # a broken link: the header check names it
        key = (st.st_dev, st.st_ino)
        if key in seen:
            repeated.append(path)
        seen.add(key)
    return repeated


def _warnings(root: str, samples: list[tuple[str, int]], unreadable: list[OSError]) -> list[str]:
    """What the user should know about a listing that is ImageFolder's but maybe not what was meant."""
    lines = []
    repeated = repeated_files([p for p, _ in samples])
    if repeated:
        lines.append(
            f"{len(repeated)} of the {len(samples)} samples under {root} are files already listed through "
            f"another path (symbolic links or a folder loop), e.g. {printable(repeated[0])}; ImageFolder counts "
            f"every path, and so does fasteval: {len(samples) - len(repeated)} distinct files"
        )
    # A folder loop ends in "too many levels of symbolic links": the line above already says it.
    skipped = [e for e in unreadable if e.errno != errno.ELOOP]
    if skipped:
        reasons = sorted({e.strerror for e in skipped})
        lines.append(
            f"{len(skipped)} folders under {root} cannot be read and are skipped, as ImageFolder skips them "
            f"(e.g. {printable(skipped[0].filename)}: {', '.join(reasons)})"
        )
    return lines


def relative_path(samples: SampleList, path: str) -> str:
    """A sample's path for reports: relative to the root (a tree's, the CSV's folder, the shards' folder;
    ``SHARD::MEMBER`` with the shard's path relative), or absolute where the file lies outside it (a CSV's
    absolute path elsewhere)."""
    from fasteval.data.sources import member_path, split_member

    found = split_member(path)
    if found is not None:
        return member_path(_relative(samples.root, found[0]), found[1])
    return _relative(samples.root, path)


def _relative(root: str, path: str) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        pass
    full, base = os.path.abspath(path), os.path.abspath(root)
    return os.path.relpath(full, base) if os.path.commonpath([full, base]) == base else full
