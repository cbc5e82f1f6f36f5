"""User-facing errors: one line that names the file or argument at fault."""

from __future__ import annotations

import os
import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class FastevalError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, no traceback."""


class Terminated(BaseException):
    """SIGTERM turned into an exception, so that ``with`` blocks and ``finally`` clean up.

    A BaseException (like KeyboardInterrupt), so that no ``except Exception`` swallows it.
    """


def message_lines(exc: BaseException) -> list[str]:
    """The non-empty, stripped lines of an error's message, without terminal colour codes."""
    return [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (libraries put the summary first, details after)."""
    return next(iter(message_lines(exc)), type(exc).__name__)


def one_line(exc: BaseException) -> str:
    """The last meaningful line of an error message.

    Exceptions re-raised by DataLoader workers carry the worker's whole traceback as
    their message; the line that matters (``SomeError: what went wrong``) is the last.
    """
    lines = message_lines(exc)
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    for p in (prefix, f"{type(exc).__name__}: "):
        if last.startswith(p):
            return last[len(p):]
    return last


# torch's words when DataLoader workers, which pass each batch through shared memory, find /dev/shm full:
# a worker cannot allocate a batch there (ATen's MapAllocator: "unable to allocate shared memory(shm) for
# file </torch_...>: No space left on device (28)", re-raised in this process inside the worker's
# traceback), or a worker dies of SIGBUS writing one ("DataLoader worker (pid N) is killed by signal: Bus
# error. It is possible that dataloader's workers are out of shared memory...").
_SHARED_MEMORY_FULL = re.compile(r"unable to allocate shared memory|out of shared memory|insufficient shared memory"
                                 r"|unable to (?:write to|resize) file </torch_")
SHM = "/dev/shm"


def shared_memory_full(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's report of a full /dev/shm (its message, a worker's traceback included)."""
    return bool(_SHARED_MEMORY_FULL.search(_ANSI.sub("", str(exc))))


def shared_memory_advice() -> str:
    """The one line for a full /dev/shm: what ran out, how big it is, and the ways out."""
    try:
        st = os.statvfs(SHM)  # its free space now says nothing: the workers' batches were freed as they stopped
        size = f" ({st.f_blocks * st.f_frsize / 2**20:,.1f} MiB)"
    except OSError:
        size = ""
    return (f"out of shared memory: the DataLoader workers pass decoded batches through {SHM}{size}, which is full "
            f"or too small; free space there, or give fewer --workers (--workers 0 decodes in this process and needs "
            f"none), or, in a docker container, run it with a larger --shm-size")


def is_expected(exc: BaseException) -> bool:
    """Errors that bad input or a faulty machine cause: a user error, the OS (files, disk, memory, a full
    /dev/shm), or the image library reading data. The CLI prints these as one line."""
    if isinstance(exc, (FastevalError, OSError, MemoryError)) or shared_memory_full(exc):
        return True
    return type(exc).__module__.split(".")[0] == "PIL"


def printable(path: str) -> str:
    """A path as one printable line: control characters (a newline in a file name) escaped."""
    return path if path.isprintable() else path.encode("unicode_escape").decode("ascii")


def describe_error(exc: BaseException) -> str:
    """The one line the CLI prints for an error: its message; for an error no input explains
    (a bug), also its type and where to find more."""
    if shared_memory_full(exc):
        return shared_memory_advice()
    if is_expected(exc):
        return one_line(exc)
    return f"{type(exc).__name__}: {one_line(exc)} (unexpected; rerun with --debug for the traceback)"
