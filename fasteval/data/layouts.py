"""Dataset layouts beside ImageFolder's tree: a CSV file list and WebDataset tar shards.

Each is turned into the same three things ImageFolder's discovery gives (a root, the class names, the
(path, label) pairs in order); ``fasteval.data.samples.discover`` picks the layout by content and builds
the one ``SampleList``. Every problem is one ``FastevalError`` line naming the file and line (CSV) or the
shard and member (tar), raised here, before any image is decoded.

- **CSV** (``csv_listing``): a file whose first line is the header ``path,label``; each row one image
  (a path relative to the CSV's folder, or absolute) and its class name. The classes are the labels'
  names sorted, as ImageFolder sorts its class folders; the samples are ordered as ImageFolder orders the
  same files (by class, then by folder and name, the order of its sorted walk). A path listed twice is
  refused (ImageFolder lists a file once; a repeated row would count it twice).
- **WebDataset** (``webdataset_listing``): tar shards whose samples are ``KEY.<image ext>`` plus
  ``KEY.cls`` (the class index as text), as the ``webdataset`` library writes them; KEY is a member's name
  up to the first dot after its last slash, other members (``KEY.json``...) are ignored. The samples come
  in the shards' order, members in tar order; the classes are the indices 0..N-1 (N = the largest + 1),
  named by their number. A sample is addressed as ``SHARD::MEMBER`` (fasteval/data/sources.py).

Torch-free: imported before torch is (fasteval/data/prefetch.py).
"""

from __future__ import annotations

import csv
import os
import re
import stat
import tarfile
from typing import NamedTuple

from fasteval.data.sources import member_path, shard_members
from fasteval.errors import FastevalError, printable

HEADER = ["path", "label"]
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp")  # ImageFolder's, no dot
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_INDEX = re.compile(r"^\s*(-?\d+)\s*$")


class Listing(NamedTuple):
    """What a layout lists: ImageFolder's root, classes and (path, label) pairs, and the layout's name."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    layout: str


# -- CSV -----------------------------------------------------------------------------------------------------

def is_csv_list(path: str) -> bool:
    """Whether ``path`` is a regular file whose first line is the header ``path,label`` (content, not name)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return next(csv.reader([first]), None) == HEADER


def csv_listing(path: str) -> Listing:
    """The samples a CSV list names (the module's docstring), checked row by row."""
    where = printable(path)
    root = os.path.dirname(path) or "."
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            next(reader)  # the header, checked by is_csv_list
            for row in reader:
                line = reader.line_num
                if not row:
                    continue  # a blank line
                if len(row) != 2:
                    raise FastevalError(f"{where} line {line}: {len(row)} field(s), expected 2 (path,label)")
                file, label = row
                if not file:
                    raise FastevalError(f"{where} line {line}: an empty path")
                if not label.strip():
                    raise FastevalError(f"{where} line {line}: an empty label for {printable(file)}")
                full = os.path.normpath(os.path.join(root, file))
                _check_file(where, line, file, full)
                if full in seen:
                    raise FastevalError(f"{where} line {line}: {printable(file)} is listed already on line "
                                        f"{seen[full]} (each image once, as ImageFolder lists it)")
                seen[full] = line
                rows.append((full, label))
    except UnicodeDecodeError as exc:
        raise FastevalError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise FastevalError(f"{where} line {reader.line_num}: {exc}") from None
    except OSError as exc:
        raise FastevalError(f"cannot read the CSV list {where}: {exc.strerror or exc}") from None
    if not rows:
        raise FastevalError(f"{where}: no samples (only the header path,label)")
    classes = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(classes)}
    # ImageFolder's order: by class, then as its sorted walk yields the files (by folder, then by name).
    ordered = sorted(((full, index[label]) for full, label in rows),
                     key=lambda s: (s[1], os.path.dirname(s[0]), os.path.basename(s[0])))
    return Listing(root, classes, ordered, "csv")


def _check_file(where: str, line: int, file: str, full: str) -> None:
    """A listed path that is a readable regular file, else one line naming the CSV's line."""
    try:
        st = os.stat(full)
    except OSError as exc:
        what = "not found" if isinstance(exc, FileNotFoundError) else f"cannot be read: {exc.strerror or exc}"
        raise FastevalError(f"{where} line {line}: {printable(file)} {what}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FastevalError(f"{where} line {line}: {printable(file)} is not a regular file")
    try:
        with open(full, "rb"):
            pass
    except OSError as exc:
        raise FastevalError(f"{where} line {line}: {printable(file)} cannot be read: {exc.strerror or exc}") from None


# -- WebDataset ----------------------------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """A shard pattern's names in order: ``{000000..000049}`` (a range, zero-padded as written) and ``{a,b}``
    (a list), several groups expanding left to right as the shell and ``braceexpand`` do."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers = _RANGE.match(body)
    if numbers:
        first, last = numbers.groups()
        padded = any(len(n.lstrip("-")) > 1 and n.lstrip("-").startswith("0") for n in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def is_brace_pattern(path: str) -> bool:
    return _BRACE.search(path) is not None


def tar_files(folder: str) -> list[str]:
    """The ``.tar`` files of a folder, by name."""
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file() and entry.name.lower().endswith(".tar"))
    except OSError:
        return []
    return [os.path.join(folder, name) for name in names]


def webdataset_listing(shards: list[str], root: str) -> Listing:
    """The samples of ``shards`` in order (the module's docstring), every member checked."""
    samples: list[tuple[str, int]] = []
    for shard in shards:
        samples.extend(_shard_samples(shard))
    if not samples:
        raise FastevalError(f"no samples (KEY.jpg/png/... with KEY.cls) in the tar shard(s) {printable(shards[0])}"
                            + (f" ... {printable(shards[-1])}" if len(shards) > 1 else ""))
    classes = [str(i) for i in range(max(label for _, label in samples) + 1)]
    return Listing(root, classes, samples, "webdataset")


def _shard_samples(shard: str) -> list[tuple[str, int]]:
    """(virtual path, label) of one shard's samples, in tar order."""
    where = printable(shard)
    try:
        members = shard_members(shard)
    except FileNotFoundError:
        raise FastevalError(f"tar shard not found: {where}") from None
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise FastevalError(f"tar shard {where} is damaged or unreadable: {getattr(exc, 'strerror', None) or exc}") from None
    images: dict[str, str] = {}
    labels: dict[str, str] = {}
    for name in members:
        folder, _, base = name.rpartition("/")
        stem, dot, suffix = base.partition(".")
        if not dot:
            continue
        key = f"{folder}/{stem}" if folder else stem
        suffix = suffix.lower()
        if suffix == "cls":
            labels[key] = name
        elif suffix in IMAGE_SUFFIXES:
            if key in images:
                raise FastevalError(f"tar shard {where}: sample {printable(key)} has two images, "
                                    f"{printable(images[key])} and {printable(name)}")
            images[key] = name
    for key, name in labels.items():
        if key not in images:
            raise FastevalError(f"tar shard {where}: member {printable(name)} has no image beside it "
                                f"({key}.jpg, .png, ...)")
    out = []
    with open(shard, "rb") as f:
        for key, image in images.items():
            if key not in labels:
                raise FastevalError(f"tar shard {where}: member {printable(image)} has no {printable(key)}.cls "
                                    f"(its class index)")
            member = members[labels[key]]
            f.seek(member.offset)
            out.append((member_path(shard, image), _class_index(where, labels[key], f.read(member.size))))
    return out


def _class_index(where: str, name: str, data: bytes) -> int:
    """A ``.cls`` member's class index (ASCII digits), else one line naming the shard and member."""
    text = data.decode("ascii", "replace")
    found = _INDEX.match(text)
    if found is None:
        raise FastevalError(f"tar shard {where}: member {printable(name)} is not a class index: {text[:20]!r}")
    index = int(found.group(1))
    if index < 0:
        raise FastevalError(f"tar shard {where}: member {printable(name)}: class index {index} is out of range "
                            f"(indices start at 0)")
    return index


def shards_of(data: str) -> list[str] | None:
    """The shards DATA names (a ``.tar`` file, a brace pattern, a folder of ``.tar`` files and no class
    folders), or None where DATA is not WebDataset shards."""
    if os.path.isfile(data):
        return [data] if tarfile.is_tarfile(data) else None
    if os.path.isdir(data):
        try:
            has_folders = any(entry.is_dir() for entry in os.scandir(data))
        except OSError:
            return None
        return None if has_folders else (tar_files(data) or None)
    if is_brace_pattern(data):
        return expand_braces(data)
    return None


def shards_root(data: str) -> str:
    """The folder a WebDataset's paths are reported relative to: DATA itself where it is a folder, else the
    folder of its (first) shard."""
    if os.path.isdir(data):
        return data
    first = expand_braces(data)[0]
    return os.path.dirname(first) or "."
