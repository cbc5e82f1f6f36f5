"""A persistent pool of PIL worker processes: the reference's decode and transform, run while the fast pass runs.

The overlapped recheck (fasteval/evaluation/recheck_stream.py) sends it samples as it finds them; a worker
decodes each as the reference's DataLoader worker does (``dataset[index]``: ``ImageDataset`` with the
reference's transform, one torch thread) and sends the tensor back. A thread of this process takes the
results off the pipe as they come, so that what is left after the pass is the model's work. The caller takes
each value once (``take``), and ``keep_only`` drops those nobody will take: the pool holds only what is still
to be scored.

Workers are started once per run with the fork start method on Linux (``START_METHOD``), whatever a caller set
with ``multiprocessing.set_start_method``: a forked worker inherits the imported modules and the dataset
(nothing pickled, no interpreter to start) and runs only PIL and a one-thread CPU transform, as the
DataLoader's forked workers do beside the parent's CUDA context and threads. Elsewhere the platform's default
method (spawn on macOS and Windows): each worker starts an interpreter, imports this module and unpickles the
dataset, a slower start and the same values. Workers die with this process (``procs.worker_init``) and are
stopped by ``close()``, which ``with`` calls on an exception or Ctrl-C too. A task carries its sample's margin:
a worker skips a task whose margin is above ``limit`` (set to the largest margin still needed once the pass is
over), so decoding nobody needs stops at once.

The receiving thread records any error of its own (a result that cannot be unpickled, memory): ``take`` raises
it in the caller's thread as one FastevalError line rather than wait for results that cannot come.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, replace

import torch

from fasteval.errors import FastevalError, first_line
from fasteval.procs import worker_init

JOIN_SECONDS = 2.0  # a worker asked to stop is terminated after this
START_METHOD = "fork" if sys.platform.startswith("linux") else None  # None: the platform's default


@dataclass
class Decoded:
    """One task's outcome: ``value`` is the transform's output, None where the task was skipped or failed, or
    once the value was taken or dropped."""

    value: torch.Tensor | None
    seconds: float  # the worker's time on it
    finished: float  # time.monotonic() when it was done (one clock for every process on Linux)
    error: str | None = None


def _work(parent: int, dataset, tasks, results, limit) -> None:
    """A worker: ``(index, margin)`` tasks until ``None``; sends ``(index, value, seconds, finished, error)``."""
    worker_init(parent)
    torch.set_num_threads(1)  # as a DataLoader worker: the cores are the pool's, not one worker's
    while (task := tasks.get()) is not None:
        index, margin = task
        if not margin <= limit.value:  # NaN (``close``): every task skipped
            results.put((index, None, 0.0, time.monotonic(), None))
            continue
        start = time.perf_counter()
        try:
            value, _ = dataset[index]
            value, error = (value.numpy() if isinstance(value, torch.Tensor) else value), None
        except Exception as exc:  # the caller decodes it again in-process, where the error is raised as the reference's
            value, error = None, f"{type(exc).__name__}: {exc}"
        results.put((index, value, time.perf_counter() - start, time.monotonic(), error))


def _unpack(item: tuple) -> tuple[int, Decoded]:
    """A worker's result as this process keeps it."""
    index, value, seconds, finished, error = item
    value = torch.from_numpy(value) if value is not None and not isinstance(value, torch.Tensor) else value
    return index, Decoded(value, seconds, finished, error)


class DecodePool:
    """``workers`` processes decoding ``dataset[index]`` for the indices submitted; a context manager."""

    def __init__(self, dataset, workers: int) -> None:
        context = multiprocessing.get_context(START_METHOD)
        self._tasks, self._results = context.Queue(), context.Queue()
        self._limit = context.Value("d", math.inf, lock=False)
        self._done: dict[int, Decoded] = {}
        self._keep: set[int] | None = None  # None: every value is kept until taken
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self.failure: BaseException | None = None  # the receiving thread's error, raised by ``take``
        self._context, self._dataset = context, dataset
        self.processes: list = []
        self._receiver = threading.Thread(target=self._receive, name="fasteval-recheck-receiver", daemon=True)
        self.closed = False
        try:
            self.grow(workers)
            self._receiver.start()
        except BaseException:
            self.close()
            raise

    def grow(self, workers: int) -> None:
        """Start workers until there are ``workers`` (never fewer than now): once the pass is over, the cores
        its loader kept busy are free for what is left to decode."""
        while len(self.processes) < workers and not self.closed:
            process = self._context.Process(target=_work, args=(os.getpid(), self._dataset, self._tasks,
                                                                self._results, self._limit), daemon=True)
            self.processes.append(process)
            process.start()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _receive(self) -> None:
        """Take results off the pipe until ``close()`` sends None: the copies happen while the pass runs. An error
        (other than the queue closed by ``close()``) is recorded for ``take``, which stops waiting."""
        try:
            while not self._stop.is_set():
                try:
                    item = self._results.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is None:
                    return
                index, decoded = _unpack(item)
                with self._ready:
                    if self._keep is not None and index not in self._keep:
                        decoded = replace(decoded, value=None)
                    self._done[index] = decoded
                    self._ready.notify_all()
        except BaseException as exc:
            if not self.closed:
                self.failure = exc
        finally:
            with self._ready:
                self._ready.notify_all()

    def submit(self, tasks: list[tuple[int, float]]) -> None:
        """Queue ``(index, margin)`` tasks; never blocks (the queue's feeder thread writes the pipe)."""
        for task in tasks:
            self._tasks.put(task)

    def set_limit(self, limit: float) -> None:
        """Tasks not yet taken whose margin is above ``limit`` are skipped."""
        self._limit.value = limit

    def keep_only(self, indices: set[int]) -> None:
        """Drop the values of every outcome, received or to come, not in ``indices``."""
        with self._ready:
            self._keep = set(indices)
            for index, decoded in self._done.items():
                if index not in self._keep and decoded.value is not None:
                    self._done[index] = replace(decoded, value=None)

    def done(self) -> dict[int, Decoded]:
        """The outcomes received so far, by index (a copy; values are None once taken)."""
        with self._ready:
            return dict(self._done)

    def take(self, indices: list[int]) -> dict[int, Decoded]:
        """The outcomes of ``indices``, waiting for them, their values then dropped from the pool; where a worker
        has died, those not received by then are left out (the caller decodes them itself). Raises FastevalError
        where the receiving thread has stopped."""
        wanted = set(indices)
        with self._ready:
            while not wanted <= self._done.keys():
                if not self._receiver.is_alive():
                    why = f"{type(self.failure).__name__}: {first_line(self.failure)}" if self.failure else "stopped"
                    raise FastevalError(f"the exact recheck's decoding pool stopped receiving results ({why}); "
                                        f"--workers 0 runs the recheck after the pass") from self.failure
                if any(p.exitcode is not None for p in self.processes):
                    break
                self._ready.wait(0.1)
            taken = {i: self._done[i] for i in indices if i in self._done}
            for i in taken:
                self._done[i] = replace(taken[i], value=None)
            return taken

    def close(self) -> None:
        """Stop the workers (skipping what is queued), then the receiver; terminate any that does not stop.
        Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._limit.value = math.nan
        started = [p for p in self.processes if p.pid is not None]
        for _ in started:
            self._tasks.put(None)
        deadline = time.monotonic() + JOIN_SECONDS
        for process in started:
            process.join(max(0.0, deadline - time.monotonic()))  # the receiver drains their last results
        for process in started:
            if process.is_alive():
                process.terminate()
                process.join(JOIN_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
        if self._receiver.is_alive():
            self._results.put(None)  # after every worker's last result: the receiver has drained them
            self._receiver.join(JOIN_SECONDS)
        self._stop.set()  # a receiver stuck on a terminated worker's half-written result is a daemon: left behind
        with self._ready:
            self._done = {i: replace(d, value=None) for i, d in self._done.items()}
        for q in (self._tasks, self._results):
            q.cancel_join_thread()  # what a stopped worker did not read must not hold this process's exit
            q.close()
