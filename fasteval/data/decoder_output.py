"""The C image decoders' own warnings on stderr, kept off it while DALI decodes.

libjpeg ("Corrupt JPEG data: 3 extraneous bytes before marker 0xd0") and libpng ("libpng warning: iCCP:
known incorrect sRGB profile", "libpng warning: iCCP: profile ...: RGB color space not permitted on
grayscale PNG") write their warnings from C straight to file descriptor 2, each time DALI parses such a
file (three times a file in a run here): no Python setting reaches them.
For these defects DALI's pixels are PIL's (the reference's decoder skips the same bytes and ignores the
same profile; tests/test_library_output.py), so the lines say nothing about the result.

``hold()`` points fd 2 at a pipe while DALI decodes; a thread passes everything written there on to the
real stderr at once (fasteval's own lines, progress bars, any other library's), except whole lines that
match ``HARMLESS``, which it counts. The last ``release()`` (at the latest at exit: fasteval ends without
the interpreter's teardown but runs the exit handlers) flushes Python's stderr into the pipe, puts fd 2
back and waits for the thread to pass what it still holds. At exit, if anything was held back, one
fasteval line says how many. Where the pipe cannot be made, nothing is captured.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import sys
import threading

# A line the decoders write about a defect that does not change the pixels (with what it is, for the note).
HARMLESS = {
    "libjpeg: bytes before a marker": re.compile(rb"Corrupt JPEG data: \d+ extraneous bytes before marker 0x[0-9a-f]+"),
    "libpng: an ICC profile it rejects": re.compile(rb"libpng warning: iCCP: .*"),
}
PREFIXES = (b"Corrupt JPEG data: ", b"libpng warning: iCCP: ")
_LINE_END = re.compile(rb"\r\n|\r|\n")
DRAIN_SECONDS = 5.0  # at most this long for the thread to pass on what the pipe holds when fd 2 is put back
IDLE_SECONDS = 0.01  # the pipe empty this long after fd 2 is put back: all this process wrote has passed

_lock = threading.Lock()
_users = 0
_capture: _Capture | None = None
counts: dict[str, int] = {}  # lines held back in this process, by kind
_exit_handler = False


class _Capture:
    """fd 2 redirected into a pipe, and the thread that passes its content on to the saved real stderr."""

    def __init__(self) -> None:
        self.saved = os.dup(2)
        try:
            self.read, write = os.pipe()
        except OSError:
            os.close(self.saved)
            raise
        _flush_python_stderr()
        os.dup2(write, 2)
        os.close(write)
        self.pipe = _identity(self.read)
        self.pid, self.closing, self.drained = os.getpid(), False, threading.Event()
        self.saved_lock, self.saved_open = threading.Lock(), True
        self.thread = threading.Thread(target=self._pump, name="fasteval-decoder-stderr", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        """Pass the pipe on until every writer has closed it. Once fd 2 is back (``closing``), the first moment
        the pipe is empty sets ``drained``; a child forked meanwhile may still write, and is still passed on."""
        pending, forward = b"", self._forward
        poll = select.poll()
        poll.register(self.read, select.POLLIN)
        while True:
            if not poll.poll(IDLE_SECONDS * 1000):
                if self.closing and not self.drained.is_set():
                    self._write(pending)
                    pending = b""
                    self.drained.set()
                continue
            try:
                chunk = os.read(self.read, 65536)
            except InterruptedError:
                continue
            if not chunk:
                break
            try:
                pending = forward(pending + chunk)
            except Exception:  # never lose what was written: from now on pass everything on as it is
                self._write(pending + chunk)
                pending, forward = b"", self._write
        self._write(pending)
        os.close(self.read)
        if self.closing:
            self._close_saved()
        self.drained.set()

    def _close_saved(self) -> None:
        with self.saved_lock:
            if self.saved_open:
                self.saved_open = False
                os.close(self.saved)

    def _forward(self, data: bytes) -> bytes:
        """Pass on ``data``'s lines but the harmless ones; returns the unfinished tail still held (only
        while it may become a harmless line: a progress bar's partial line goes on at once)."""
        out, start = [], 0
        for end in _LINE_END.finditer(data):
            line = data[start:end.start()]
            kind = next((k for k, pattern in HARMLESS.items() if pattern.fullmatch(line)), None)
            if kind is None:
                out.append(data[start:end.end()])
            else:
                counts[kind] = counts.get(kind, 0) + 1
            start = end.end()
        tail = data[start:]
        if tail and not any(p.startswith(tail[:len(p)]) for p in PREFIXES):
            out.append(tail)
            tail = b""
        self._write(b"".join(out))
        return tail

    def _write(self, data: bytes) -> bytes:
        while data:
            try:
                data = data[os.write(self.saved, data):]
            except InterruptedError:
                continue
            except OSError:  # the real stderr is gone (a closed pipe): keep draining, show nothing
                break
        return b""

    def close(self) -> None:
        """fd 2 back to the real stderr (unless someone else has pointed it elsewhere meanwhile: pytest's
        capture, say), then wait (briefly) until the thread has passed on what was written."""
        _flush_python_stderr()
        if _identity(2) == self.pipe:
            os.dup2(self.saved, 2)
        self.closing = True
        if os.getpid() != self.pid:  # a forked child: no thread of its own to wait for
            return
        self.drained.wait(DRAIN_SECONDS)
        self.thread.join(IDLE_SECONDS)
        if not self.thread.is_alive():  # else a child still writes into the pipe: the thread closes it at the end
            self._close_saved()


def _identity(fd: int) -> tuple[int, int] | None:
    """What file ``fd`` is (device, inode), or None where it is not open."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _flush_python_stderr() -> None:
    try:
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


class Hold:
    """One user's share of the capture; ``release()`` is idempotent."""

    def __init__(self) -> None:
        self.held = _acquire()

    def release(self) -> None:
        if self.held:
            self.held = False
            _release()


def hold() -> Hold:
    """Keep the decoders' harmless lines off stderr until ``release()`` (module docstring)."""
    return Hold()


def _acquire() -> bool:
    global _users, _capture, _exit_handler
    with _lock:
        if _users == 0:
            try:
                _capture = _Capture()
            except OSError:  # no file descriptors left: the lines pass, nothing else changes
                return False
            if not _exit_handler:
                atexit.register(_at_exit)
                _exit_handler = True
        _users += 1
        return True


def _release() -> None:
    global _users, _capture
    with _lock:
        _users = max(0, _users - 1)
        if _users > 0 or _capture is None:
            return
        capture, _capture = _capture, None
        capture.close()


def _at_exit() -> None:
    """fd 2 back, whoever still holds it; then, if lines were held back, one line that says so (at the end,
    not in the middle of a progress bar)."""
    global _users
    with _lock:
        held, _users = _users, min(_users, 1)
    if held:
        _release()
    if not counts:
        return
    kinds = "; ".join(f"{kind}: {n}" for kind, n in counts.items())
    print(f"fasteval: note: the image decoders warned {sum(counts.values())} time(s) about defects that do not "
          f"change the pixels ({kinds}), not shown: they decode those files as PIL does", file=sys.stderr)
