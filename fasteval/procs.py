"""Processes: worker pools that never outlive fasteval, and SIGTERM turned into an exception.

Python's default SIGTERM kills the main process at once: no ``finally`` runs, so temporary
folders stay and pool workers (blocked on their queue) live on. Within ``sigterm_raises()``
SIGTERM raises ``Terminated`` instead, so every ``with`` block cleans up; and workers started
with ``worker_init`` get SIGTERM from the kernel when their parent dies, however it dies.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress

from fasteval.errors import Terminated

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's share, not the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_end(pid: int) -> str | None:
    """How the process ``pid`` (not a child of this one) ended: None while it runs; ``"signal KILL"`` or
    ``"exit code 3"`` while it is a zombie (Linux keeps its wait status in ``/proc/PID/stat`` until its
    parent reaps it); ``""`` once it is gone, when only its parent knew how."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    except FileNotFoundError:
        return "" if os.path.isdir("/proc/self") else (None if alive(pid) else "")
    except OSError:
        return None if alive(pid) else ""
    if not fields or fields[0] not in ("Z", "X"):
        return None
    status = int(fields[49]) if len(fields) > 49 and fields[49].lstrip("-").isdigit() else 0  # field 52: exit_code
    if status & 0x7F:
        try:
            return f"signal {signal.Signals(status & 0x7F).name.removeprefix('SIG')}"
        except ValueError:
            return f"signal {status & 0x7F}"
    return f"exit code {status >> 8}" if status >> 8 else ""


def die_with_parent(parent_pid: int) -> None:
    """In a child: be sent SIGTERM when the parent dies (Linux ``prctl``), and exit at once if the
    parent is already gone (it died before the call)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        except (OSError, AttributeError):
            pass
    if not alive(parent_pid):
        os._exit(1)


def worker_init(parent_pid: int) -> None:
    """Pool initializer: die with the parent; leave Ctrl-C to the parent (which stops the pool) and
    let SIGTERM end the worker silently (the parent's handler is inherited through fork)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent_pid)


def pool_map(function: Callable, tasks: list, workers: int) -> list:
    """``function`` over ``tasks`` in ``workers`` processes that end with this one: on any exception
    (Terminated and KeyboardInterrupt included) the pool is terminated before it propagates."""
    with multiprocessing.get_context().Pool(workers, initializer=worker_init, initargs=(os.getpid(),)) as pool:
        return pool.map(function, tasks, chunksize=1)


def dataloader_batches(loader: Iterable) -> Iterator:
    """``loader``'s batches, whose worker processes (a DataLoader's) end with the loop, however it ends.

    An error raised by the loader keeps torch.utils.data's frames in its traceback, and they hold the
    iterator: its workers would live as long as the error (a notebook keeps the last one) and then cost
    5 s a worker to stop. Those frames lose their locals here, and the iterator is dropped when this
    generator ends (an error in the caller's loop closes it). Only torch's frames are cleared: a
    dataset's own (``workers=0``), the caller's and the model's keep their locals for a post-mortem."""
    batches = iter(loader)
    try:
        yield from batches
    except BaseException as exc:
        data = sys.modules.get("torch.utils.data")
        folder = os.path.dirname(data.__file__) + os.sep if data is not None else None
        tb = exc.__traceback__
        while folder and tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith(folder):
                with suppress(RuntimeError):  # a frame still running (none of torch's here) is left as it is
                    tb.tb_frame.clear()
            tb = tb.tb_next
        raise
    finally:
        del batches


@contextmanager
def _handling(signum: int, in_owner: Callable[[], None], in_child: Callable[[], None]) -> Iterator[None]:
    """Within: ``signum`` calls ``in_owner`` in this process's main thread, ``in_child`` in a forked child that
    inherited the handler; restored after. Off the main thread (where no handler can be set): nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(sig, frame):
        (in_owner if os.getpid() == owner else in_child)()

    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises ``Terminated`` in this process's main thread; restored after.
    Forked children that inherit the handler die as by default instead."""
    def terminated():
        raise Terminated("terminated (SIGTERM)")

    def die():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    with _handling(signal.SIGTERM, terminated, die):
        yield


@contextmanager
def interrupts_noted() -> Iterator[list[float]]:
    """Within: Ctrl-C (SIGINT) raises KeyboardInterrupt in this process's main thread, as by default, and is
    noted in the list yielded (its time): an error it caused first elsewhere (a DataLoader worker it ended, whose
    loss the loader reports) is then known for the interruption it is. Forked children that inherit the handler
    (DataLoader workers, the moment before their own handlers are set) ignore it: this process stops them, with
    no traceback of theirs. Restored after."""
    noted: list[float] = []

    def interrupted():
        noted.append(time.monotonic())
        raise KeyboardInterrupt

    with _handling(signal.SIGINT, interrupted, lambda: None):
        yield noted


def drop_quietly(exc: BaseException) -> None:
    """Free what an interrupted run's traceback holds (a DataLoader iterator stopped half-built, whose
    finalizer then fails: "Exception ignored in ... _workers_status") with such finalizer errors kept off
    stderr: the run is over and said so."""
    import gc

    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        while exc is not None:
            exc.__traceback__ = None
            exc = exc.__context__ or exc.__cause__
        gc.collect()
    finally:
        sys.unraisablehook = hook


def exit_promptly(code: int) -> None:
    """End the process with ``code`` once its work is done, without the interpreter's teardown.

    Tearing down the modules of torch, torchvision and DALI (clearing their namespaces, collecting
    hundreds of thousands of objects) took 0.8-1.3 s of a 156-image run's 8 s on a 2-core machine, and
    nothing in it is fasteval's work: every output was written (atomically) and closed before. The
    registered exit handlers still run (``multiprocessing`` ends its children, ``tempfile`` removes
    its folders, DALI unloads, logging flushes), then the standard streams are flushed. Where anything
    else would still run at a normal exit (a live non-daemon thread, a child process), the normal
    exit is taken."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be shown there
            pass
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if others or multiprocessing.active_children() or children(os.getpid()):
        sys.exit(code)
    os._exit(code)


def children(pid: int) -> list[int]:
    """A process's child processes, forked by any of its threads (Linux ``/proc``; elsewhere none are seen)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return found
