"""Output files and folders: checked before any work, written atomically.

A run can take minutes; an output that cannot be written must fail before it starts, with
one line naming the option and the path. A file is written to a temporary file beside
it and renamed over it once complete, so a full disk or an interrupted run leaves the old
file intact. Devices and pipes (``/dev/null``, ``/dev/stdout``, ``>(jq .)``) are written directly.
Temporary names keep at most ``TEMP_NAME_CHARS`` of the target's name, so every name that passes the
checks (its length included) can be written. No output may land inside a dataset it reads, nor be (or
hold) an input file such as ``--weights`` (``check_not_inside``), and a folder that one run fills is held
by that run alone (``locked_folder``).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from fasteval.errors import FastevalError, printable
from fasteval.procs import alive

TEMP_NAME_CHARS = 32  # of a target's name kept in its temporary names: those stay short, whatever its length
LOCK_NAME = ".fasteval.lock"  # in a folder one run writes (locked_folder); not content of the folder


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
    """The folders above ``path`` exist as folders (or can be created) and can be written, and every
    name still to be made on the way (``path``'s own included) fits the file system."""
    path = os.path.abspath(path)
    anchor = _nearest_existing(os.path.dirname(path))
    if not os.path.isdir(anchor):
        raise FastevalError(f"{what}: {anchor} is a file, not a folder")
    _check_name_lengths(os.path.relpath(path, anchor), anchor, what)
    _check_can_create_in(anchor, what)


def _check_name_lengths(names: str, anchor: str, what: str) -> None:
    """Each name of the relative path ``names`` fits the longest name (in bytes) of ``anchor``'s file
    system: a longer one could only fail once the run's work is done."""
    try:
        limit = os.pathconf(anchor, "PC_NAME_MAX")
    except (OSError, ValueError):
        return
    for name in names.split(os.sep):
        size = len(os.fsencode(name))
        if size > limit:
            raise FastevalError(f"{what}: the name {printable(name[:16])}... is {size} bytes long, more than the "
                                f"{limit} this file system allows")


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
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)[:TEMP_NAME_CHARS]}.",
                                   suffix=".tmp")
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
        if set(os.listdir(path)) - {LOCK_NAME} and not overwrite:
            raise FastevalError(f"{what} is not empty; choose a new folder, or pass --overwrite to replace it")
    _check_folder_path(os.path.join(os.path.abspath(path), "x"), what)


def temp_prefix(target: str) -> str:
    """Name prefix of the temporary folders made beside ``target``; the owner's pid follows it."""
    return f".{os.path.basename(os.path.abspath(target))[:TEMP_NAME_CHARS]}.tmp-"


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


def check_not_inside(outputs: dict[str, str | None], inputs: dict[str, str | list[str] | None],
                     clears: tuple[str, ...] = ()) -> None:
    """Refuse an output (``{option: path}``) that would change what the command reads (``{name: path or
    paths}``): one that is, or lies inside, an input folder (e.g. DATA: a PNG or a cache folder written into
    a dataset changes what every later run reads); one that is an input file (``--json best.pt --weights
    best.pt`` would overwrite the checkpoint); and, for the options in ``clears`` (a folder the run may
    empty: train's ``--out --overwrite``), a folder holding one. A folder the run only adds named files to
    (``--plot run/`` beside ``run/best.pt``) may hold inputs. Real paths are compared, and an existing
    output with ``os.path.samefile``, so neither a link, a hard link nor ``..`` can hide where it lands."""
    named = [(name, path) for name, paths in inputs.items()
             for path in ([paths] if isinstance(paths, str) else paths or []) if path]
    for option, path in outputs.items():
        if not path:
            continue
        real = os.path.realpath(path)
        for name, source in named:
            root = os.path.realpath(source)
            if os.path.isfile(source):
                _check_not_file(option, path, real, name, source, root, option in clears)
            elif os.path.commonpath([real, root]) == root:
                where = f"is {name}" if real == root else f"is inside {name} {printable(source)}"
                raise FastevalError(f"{option} {printable(path)} {where}: writing there would change the dataset; "
                                    f"choose a path outside it")


def _check_not_file(option: str, path: str, real: str, name: str, source: str, root: str, clears: bool) -> None:
    """Refuse the output ``option path`` (real path ``real``) that is the input file ``name source`` (real
    path ``root``), or, where the run may empty it (``clears``), a folder holding it."""
    if real == root or (os.path.exists(path) and os.path.samefile(path, source)):
        raise FastevalError(f"{name} and {option} name the same file: {printable(path)}; writing {option} would "
                            f"overwrite the file this run reads, choose another path")
    if clears and os.path.commonpath([real, root]) == real:
        raise FastevalError(f"{option} {printable(path)} holds the {name} file {printable(source)} that this run "
                            f"reads; choose another folder")


@contextmanager
def locked_folder(path: str, option: str) -> Iterator[None]:
    """Make the folder ``path`` if needed and hold its lock (``flock`` on ``LOCK_NAME`` in it) for the
    block: a second process that wants to write it meanwhile is refused with one line naming ``option``,
    so two runs never mix their files. The kernel frees the lock when its process dies, however it dies:
    no stale lock. The lock file is removed on leaving; a folder made here is removed too when the block
    fails and leaves it empty."""
    try:
        os.makedirs(path)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        raise FastevalError(f"{option} {printable(path)}: cannot create it: {_reason(exc)}") from None
    lock = os.path.join(path, LOCK_NAME)
    fd = _lock(lock, option, path)
    try:
        yield
    except BaseException:
        _unlock(fd, lock)
        if created:
            try:
                os.rmdir(path)
            except OSError:
                pass
        raise
    _unlock(fd, lock)


def _lock(lock: str, option: str, folder: str) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on the file ``lock`` (None where the file
    system has no locks); the holder's pid is written in it."""
    import fcntl

    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise FastevalError(f"{option} {printable(folder)}: cannot write in it: {_reason(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise FastevalError(f"{option} {printable(folder)} is being written by another fasteval run{pid}; "
                                f"wait for it to end, or choose another {option}") from None
        except OSError:  # no locks on this file system (some network and FUSE mounts): unguarded, as before
            os.close(fd)
            return None
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # its holder removed that file as it let go: lock the one there now


def _unlock(fd: int | None, lock: str) -> None:
    """Remove the lock file while still holding it (a process that opened it meanwhile sees it gone and
    takes the next one), then let go."""
    if fd is None:
        return
    try:
        os.unlink(lock)
    except OSError:
        pass
    os.close(fd)
