"""User-facing errors: one line that names the file or argument at fault."""

from __future__ import annotations


class FastevalError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, no traceback."""


def message_lines(exc: BaseException) -> list[str]:
    """The non-empty, stripped lines of an error's message."""
    return [line.strip() for line in str(exc).splitlines() if line.strip()]


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
