"""Decoding ahead of the batch loop: on a thread of its own and, on CUDA, a stream of its own.

``Ahead`` runs an iterator (the decoder's batches) on a thread, at most ``depth`` items ahead of the
consumer, so that decoding batch k+1 overlaps whatever the consumer does with batch k (the geometry, the
model and the metrics it launches). Items come out in the producer's order; an error raised while
producing reaches the consumer as the same exception object, where the item would have come; the thread
stops and is joined when the consumer stops, early or not. A consumer resumed after its ``Ahead`` was
closed (a suspended pass of a loader closed or iterated again since) gets an error, never a hang.

The handoffs say how a decoded batch passes from the decoding thread to the consumer's stream without the
host waiting for the device: ``StreamHandoff`` on CUDA, ``HostHandoff`` (nothing to order) elsewhere. The
thread logic is the same for both, so the CPU tests exercise it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Generic, NamedTuple, TypeVar

import torch

T = TypeVar("T")
_END = object()
WAKE_SECONDS = 0.1  # how often a waiting side looks whether the other one has stopped


class _Failed(NamedTuple):
    error: BaseException


class Ahead(Generic[T]):
    """``items`` produced on a thread named ``name``, at most ``depth`` waiting for the consumer (the
    thread works on one more meanwhile). Iterate once; ``close`` stops and joins the thread (iteration's
    end calls it, early or not)."""

    def __init__(self, items: Iterator[T], depth: int, name: str = "fasteval-decode") -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._items = items
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item) or self._stop.is_set():
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(_Failed(exc))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:  # a generator's own cleanup, in the thread that ran it
                close()

    def _put(self, item) -> bool:
        """Wait for room unless the consumer has stopped; whether the item was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=WAKE_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _get(self):
        """The next item, waiting while the thread may still produce one; RuntimeError once it cannot (the
        consumer's ``close`` stopped it, or it ended without a last item)."""
        while True:
            try:
                return self._queue.get(timeout=WAKE_SECONDS)
            except queue.Empty:
                if not self._stop.is_set() and self._thread.is_alive():
                    continue
            try:  # what it queued just before it ended
                return self._queue.get_nowait()
            except queue.Empty:
                raise RuntimeError("the decoding ahead was stopped: this pass was closed, or its loader closed "
                                   "or iterated again, before it ended") from None

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                item = self._get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop producing, drop what was produced ahead, join the thread."""
        self._stop.set()
        self._drain()  # wakes a producer waiting for room
        self._thread.join()
        self._drain()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


class HostHandoff:
    """No device stream to order (the CPU): decoded tensors are ready when the thread hands them over."""

    def on_device(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def decoding(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def hand_over(self, images: list[torch.Tensor]) -> None:
        return None

    def take(self, ready: None) -> None:
        pass


class StreamHandoff:
    """CUDA: the decoding thread works with ``stream`` current; the consumer's stream (the one current on the
    thread that made this handoff) waits on an event, never the host.

    torchvision's batched CUDA decode (``decode_jpegs_cuda.cpp``) allocates each output with ``torch::empty``
    on the current stream, decodes on a pool stream of its own without waiting for the current stream, then
    makes the current stream wait on an event. The caching allocator hands a block freed on a stream to the
    next allocation on that stream while work queued there may still read it: safe for that stream's own
    work, not for nvJPEG's writes on its pool stream. So the decode stream holds nvJPEG's outputs and nothing
    else (no copy, no temporary: the labels' copy and the padding run on the consumer's stream), on the
    decoding thread; ``record_stream`` keeps each output out of that pool until the consumer's uses of it are
    done; an event recorded after the batch orders the consumer's stream after it. torchvision synchronises
    its own stream (the decoding thread waits for the decode, the consumer does not), and blocks the stream of
    the device current when its decoder was made, so the evaluation device is made current too: for the
    whole thread (``on_device``), whose DataLoader iterator and pin-memory thread would otherwise open a
    context on device 0."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream) -> None:
        self.device, self.stream = device, stream
        self.consumer = torch.cuda.current_stream(device)

    def on_device(self) -> contextlib.AbstractContextManager:
        """The evaluation device current on the decoding thread (a new thread starts on device 0)."""
        return torch.cuda.device(self.device)

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield

    def hand_over(self, images: list[torch.Tensor]) -> torch.cuda.Event:
        """On the decoding thread, after the batch's work was queued: an event the consumer waits on."""
        for image in images:
            image.record_stream(self.consumer)
        ready = torch.cuda.Event()
        ready.record(self.stream)
        return ready

    def take(self, ready: torch.cuda.Event) -> None:
        """On the consumer's thread: its stream's next work runs after the batch's decode."""
        self.consumer.wait_event(ready)
