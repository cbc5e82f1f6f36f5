"""Damaged compile-cache entries: noticed while torch compiles, removed, said in one fasteval line.

A truncated or overwritten file in the compile cache (``fasteval/model/compile_cache.py``) shows in one of
two ways:

- an FX-graph or AOTAutograd entry (a pickle) that torch cannot load: torch logs a warning with its
  traceback (six lines on stderr), compiles afresh and writes the new entry beside the damaged one, which
  it reads first again on every later run. ``watch`` keeps these records off stderr and collects the
  entries' paths (torch's own ``subdir`` and ``path``, from the frame that caught the error); the caller
  removes them (``remove``) once the compile is done.
- a compiled kernel or wrapper (``.so``, ``.py``) that cannot be loaded: the compile fails, with an error
  that names the file (an ImportError, a SyntaxError) or the wrapper's module. ``implicates`` tells such a
  failure from others (no C++ compiler, say); the caller then clears the cache's artifacts (``clear``:
  all but the profiles) and compiles once more, afresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator

from fasteval.errors import message_lines

TORCH_CACHE_LOGGER = "torch._inductor.codecache"  # GuardedCache.iterate_over_candidates logs there
WRAPPER_MODULES = "torch._inductor.runtime.compile_tasks."  # the cached wrappers' module names


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder and path != folder


class Unloadable(logging.Filter):
    """Drops torch's "unable to load compiled graph" records; ``paths``: the entries they were about (inside
    ``folder``); ``unknown``: records whose entry could not be told."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder, self.paths, self.unknown = folder, [], 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or "unable to load" not in record.getMessage():
            return True
        tb = record.exc_info[2]
        while tb is not None:
            local = tb.tb_frame.f_locals
            if isinstance(local.get("subdir"), str) and isinstance(local.get("path"), str):
                path = os.path.join(local["subdir"], local["path"])
                if _inside(path, self.folder):
                    self.paths.append(path)
                    return False
            tb = tb.tb_next
        self.unknown += 1
        return False


@contextlib.contextmanager
def watch(folder: str) -> Iterator[Unloadable]:
    """While torch compiles: its records about cache entries it cannot load stay off stderr, collected."""
    found = Unloadable(folder)
    logger = logging.getLogger(TORCH_CACHE_LOGGER)
    logger.addFilter(found)
    try:
        yield found
    finally:
        logger.removeFilter(found)


def remove(paths: list[str], folder: str) -> int:
    """Delete the damaged entries (only inside ``folder``); how many were deleted."""
    removed = 0
    for path in dict.fromkeys(paths):
        if _inside(path, folder):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
    return removed


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def implicates(exc: BaseException, folder: str) -> bool:
    """Whether a compile's failure comes from a file of the cache: one named in an error's message, its
    traceback or a SyntaxError's file, or a cached wrapper module named in a message."""
    for error in _chain(exc):
        text = str(error)
        if folder in text or WRAPPER_MODULES in text:
            return True
        if isinstance(error, SyntaxError) and error.filename and _inside(error.filename, folder):
            return True
        tb = error.__traceback__
        while tb is not None:
            if _inside(tb.tb_frame.f_code.co_filename, folder):
                return True
            tb = tb.tb_next
    return False


def clear(folder: str, keep: str = "profiles") -> None:
    """Remove the cache's compiled artifacts (everything in ``folder`` but ``keep``)."""
    for name in os.listdir(folder):
        if name == keep:
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def reason(exc: BaseException, folder: str | None = None) -> str:
    """The line of a compile error that says what failed (torch's first line is often only "backend='inductor'
    raised:"); paths inside ``folder`` made relative to it, to keep the line short."""
    lines = [line for line in message_lines(exc) if not line.endswith("raised:")]
    line = lines[0] if lines else type(exc).__name__
    return line.replace(os.path.join(folder, ""), "") if folder else line
