"""Output files and folders: checked before any work, written atomically.

A run can take minutes; an output that cannot be written must fail before it starts, with
one line naming the option and the path. A file is written to a temporary file beside
it and renamed over it once complete, so a full disk or an interrupted run leaves the old
file intact. Devices and pipes (``/dev/null``, ``/dev/stdout``, ``>(jq .)``) are written directly.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from fasteval.errors import FastevalError
from fasteval.procs import alive


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _nearest_existing(path: str) -> str:
    """The closest existing ancestor of ``path`` (``path`` itself when it exists)."""
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _check_can_create_in(folder: str, what: str) -> None:
    """Create and remove a temporary file in ``folder``: the only true test (permissions, read-only
    file systems, root) that files can be made there."""
    try:
        fd, check = tempfile.mkstemp(dir=folder, prefix=".fasteval-write-check-")
    except OSError as exc:
        raise FastevalError(f"{what}: cannot write in {folder}: {_reason(exc)}") from None
    os.close(fd)
    os.unlink(check)
    try:
        free = os.statvfs(folder)
    except OSError:
        return
    if (free.f_bfree if os.geteuid() == 0 else free.f_bavail) == 0:  # root may use the reserved blocks
        raise FastevalError(f"{what}: no space left on the device of {folder}")


def _check_folder_path(path: str, what: str) -> None:
    """The folders above ``path`` exist as folders (or can be created) and can be written."""
    anchor = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(anchor):
        raise FastevalError(f"{what}: {anchor} is a file, not a folder")
    _check_can_create_in(anchor, what)


def _check_device(path: str, what: str) -> None:
    """A device or pipe is written directly: open it without blocking and write nothing
    (``/dev/full`` refuses even that, ``/dev/null`` accepts it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise FastevalError(f"{what}: cannot write to {path}: {_reason(exc)}") from None
    try:
        os.write(fd, b"")
    except OSError as exc:
        raise FastevalError(f"{what}: cannot write to {path}: {_reason(exc)}") from None
    finally:
        os.close(fd)


def check_output_file(path: str, option: str) -> None:
    """Refuse an output file that cannot be written: a folder, a path under a file, a folder that
    cannot be written, a full disk, a device that refuses writes."""
    _check_not_empty(path, option)
    what = f"{option} {path}"
    if os.path.lexists(path) and not os.path.exists(path):
        target = os.path.realpath(path)
        _check_folder_path(target, what)  # a dangling link: the file is created at its target
        return
    if os.path.isdir(path):
        raise FastevalError(f"{what} is a folder; give a file name")
    if _is_device(path):
        _check_device(path, what)
        return
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise FastevalError(f"{what} is read-only")
    _check_folder_path(os.path.realpath(path), what)


def _check_not_empty(path: str, option: str) -> None:
    """An empty path names the current folder to ``os.path.abspath``: never an output."""
    if not path.strip():
        raise FastevalError(f"{option}: expected a path, got an empty string")


def check_distinct(paths: dict[str, str | None]) -> None:
    """Refuse two options naming one file (``{option: path}``): one would overwrite the other."""
    seen: dict[str, str] = {}
    for option, path in paths.items():
        if not path:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise FastevalError(f"{seen[real]} and {option} name the same file: {path}")
        seen[real] = option


STREAM_FOLDERS = ("/dev/", "/proc/")  # /dev/stdout, /dev/fd/N, /proc/self/fd/N: this process's own streams


def _is_device(path: str) -> bool:
    """A device, a pipe, or a stream alias (``/dev/stdout`` redirected to a file is still written
    through, never replaced, or the shell's file would lose what was printed before)."""
    if os.path.abspath(path).startswith(STREAM_FOLDERS):
        return os.path.exists(path)
    return os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode)


def _default_mode(base: int) -> int:
    """The mode a plain ``open()`` (0o666) or ``mkdir`` (0o777) would give, less the umask;
    mkstemp and mkdtemp make private 0o600 and 0o700 instead."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


@contextmanager
def atomic_write(path: str, newline: str | None = None, binary: bool = False, option: str = "") -> Iterator:
    """A file to write ``path`` with: written beside it, flushed to disk and renamed over it on
    success; removed on failure (the old file stays intact). Errors are one FastevalError line
    naming the path (and the ``option`` that gave it). Devices and pipes are written directly. Text is
    UTF-8; file names that are not UTF-8 (kept by Python as surrogate escapes) are written back as their
    original bytes. ``binary``: a bytes file (images)."""
    text = {} if binary else {"newline": newline, "encoding": "utf-8", "errors": "surrogateescape"}
    try:
        if _is_device(path):  # appended, not truncated: /dev/stdout may be the shell's redirected file
            sys.stdout.flush()
            with open(path, "ab" if binary else "a", **text) as f:
                yield f
            return
        target = os.path.realpath(path)  # a link's target is replaced, not the link
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.exists(target) else _default_mode(0o666)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb" if binary else "w", **text) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            _remove_quietly(tmp)
            raise
    except OSError as exc:
        raise FastevalError(f"{option + ': ' if option else ''}cannot write {path}: {_reason(exc)}") from None


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def check_output_folder(path: str, option: str, overwrite: bool) -> None:
    """Refuse an output folder that is a file, is not empty (unless ``overwrite``), or cannot be made."""
    _check_not_empty(path, option)
    what = f"{option} {path}"
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise FastevalError(f"{what} is a file, not a folder")
        if os.listdir(path) and not overwrite:
            raise FastevalError(f"{what} is not empty; choose a new folder, or pass --overwrite to replace it")
    _check_folder_path(os.path.join(os.path.abspath(path), "x"), what)


def temp_prefix(target: str) -> str:
    """Name prefix of the temporary folders made beside ``target``; the owner's pid follows it."""
    return f".{os.path.basename(os.path.abspath(target))}.tmp-"


def remove_stale_temps(parent: str, prefix: str) -> None:
    """Remove the temporary files and folders ``{prefix}*.tmp-{pid}-*`` in ``parent`` whose owner process
    is gone (killed before it could clean up)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix) or ".tmp-" not in entry.name:
            continue
        pid = entry.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                _remove_quietly(entry.path)


@contextmanager
def staged_folder(path: str) -> Iterator[str]:
    """A temporary folder beside ``path`` to fill; on success it replaces ``path`` (an existing
    ``path`` is moved aside first, then removed), on any failure it is removed. ``path`` is never
    seen half-written. Temporary folders left by killed runs are removed first."""
    _check_not_empty(path, "output folder")
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent, temp_prefix(target))
    work = tempfile.mkdtemp(dir=parent, prefix=f"{temp_prefix(target)}{os.getpid()}-")
    try:
        os.chmod(work, stat.S_IMODE(os.stat(target).st_mode) if os.path.isdir(target) else _default_mode(0o777))
        yield work
        replace_folder(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def replace_folder(new: str, target: str) -> None:
    """Rename ``new`` to ``target``. An empty ``target`` is replaced by the rename itself; a full one
    is moved aside first (put back if the rename fails) and removed after."""
    if not (os.path.isdir(target) and os.listdir(target)):
        os.replace(new, target)
        return
    holder = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f"{temp_prefix(target)}{os.getpid()}-old-")
    old = os.path.join(holder, "old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` as ``atomic_write`` writes text (beside it, then renamed): for images."""
    with atomic_write(path, binary=True) as f:
        f.write(data)
