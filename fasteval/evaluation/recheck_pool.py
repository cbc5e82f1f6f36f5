"""A persistent pool of PIL worker processes: the reference's decode and transform, run while the fast pass runs.

The overlapped recheck (fasteval/evaluation/recheck_stream.py) sends it samples as it finds them; a worker
decodes each as the reference's DataLoader worker does (``dataset[index]``: ``ImageDataset`` with the
reference's transform, one torch thread) and sends the tensor back. A thread of this process takes the
results off the pipe as they come, so that what is left after the pass is the model's work.

Workers are forked once per run (the dataset is this process's: nothing pickled), die with this process
(``procs.worker_init``) and are stopped by ``close()``, which ``with`` calls on an exception or Ctrl-C too.
A task carries its sample's margin: a worker skips a task whose margin is above ``limit`` (set to the
largest margin still needed once the pass is over), so decoding nobody needs stops at once.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import threading
import time
from dataclasses import dataclass

import torch

from fasteval.procs import worker_init

JOIN_SECONDS = 2.0  # a worker asked to stop is terminated after this


@dataclass
class Decoded:
    """One task's outcome: ``value`` is the transform's output, None where the task was skipped or failed."""

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
        if margin > limit.value:
            results.put((index, None, 0.0, time.monotonic(), None))
            continue
        start = time.perf_counter()
        try:
            value, _ = dataset[index]
            value, error = (value.numpy() if isinstance(value, torch.Tensor) else value), None
        except Exception as exc:  # the caller decodes it again in-process, where the error is raised as the reference's
            value, error = None, f"{type(exc).__name__}: {exc}"
        results.put((index, value, time.perf_counter() - start, time.monotonic(), error))


class DecodePool:
    """``workers`` processes decoding ``dataset[index]`` for the indices submitted; a context manager."""

    def __init__(self, dataset, workers: int) -> None:
        context = multiprocessing.get_context()
        self._tasks, self._results = context.Queue(), context.Queue()
        self._limit = context.Value("d", math.inf, lock=False)
        self._done: dict[int, Decoded] = {}
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self.processes = [context.Process(target=_work, args=(os.getpid(), dataset, self._tasks, self._results,
                                                              self._limit), daemon=True)
                          for _ in range(workers)]
        self._receiver = threading.Thread(target=self._receive, name="fasteval-recheck-receiver", daemon=True)
        self.closed = False
        try:
            for process in self.processes:
                process.start()
            self._receiver.start()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _receive(self) -> None:
        """Take results off the pipe until ``close()`` sends None: the copies happen while the pass runs."""
        while not self._stop.is_set():
            try:
                item = self._results.get(timeout=0.5)
            except queue.Empty:
                continue
            except (EOFError, OSError, ValueError):  # the queue was closed under it
                return
            if item is None:
                return
            index, value, seconds, finished, error = item
            value = torch.from_numpy(value) if value is not None and not isinstance(value, torch.Tensor) else value
            with self._ready:
                self._done[index] = Decoded(value, seconds, finished, error)
                self._ready.notify_all()

    def submit(self, tasks: list[tuple[int, float]]) -> None:
        """Queue ``(index, margin)`` tasks; never blocks (the queue's feeder thread writes the pipe)."""
        for task in tasks:
            self._tasks.put(task)

    def set_limit(self, limit: float) -> None:
        """Tasks not yet taken whose margin is above ``limit`` are skipped."""
        self._limit.value = limit

    def done(self) -> dict[int, Decoded]:
        """The outcomes received so far, by index (a copy)."""
        with self._ready:
            return dict(self._done)

    def wait(self, indices: list[int]) -> dict[int, Decoded]:
        """The outcomes of ``indices``, waiting for them; where a worker has died, those not received by
        then are left out (the caller decodes them itself)."""
        wanted = set(indices)
        with self._ready:
            while not wanted <= self._done.keys():
                if any(p.exitcode is not None for p in self.processes):
                    break
                self._ready.wait(0.1)
            return {i: self._done[i] for i in indices if i in self._done}

    def close(self) -> None:
        """Stop the workers (skipping what is queued), then the receiver; terminate any that does not stop.
        Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._limit.value = -math.inf
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
        for q in (self._tasks, self._results):
            q.cancel_join_thread()  # what a stopped worker did not read must not hold this process's exit
            q.close()
