"""Decoding while the command starts: the reference's pixels of a small dataset, made during the imports.

Importing torch and torchvision keeps one core busy for about 2.3 s (2-core machine, 2026-11-29) while
the other has nothing to do. For a small dataset on the CPU, the command lists DATA before those
imports and starts decoding every sample as the reference does (``reference_pixels``: PIL, RGB,
torchvision's resize and crop) into uint8 arrays: in a child process forked before torch is imported
(``ForkedPrefetch``), or, where forking is not safe, in a thread (``Prefetch``; PIL releases the GIL
while it decodes and resamples, but its Python-level work slowed the imports by about 0.3 s). On 156
photographs the decoding had finished well before torch had loaded. The fast path then reads these
pixels (no decoder to import, no worker to start, no file that only PIL decodes as the reference
does), and the exact recheck reads them again instead of decoding again. The pixels are the
reference's own, so the fast path's logit error is its precision's alone. ``start`` picks the kind.

Torch-free: this module is imported before torch is.
"""

from __future__ import annotations

import atexit
import mmap
import os
import signal
import sys
import threading
import time

import numpy as np

from fasteval.data.pixels import reference_pixels
from fasteval.data.preprocess import PreprocessSpec
from fasteval.data.samples import SampleList

# Up to this many samples, and this many bytes of pixels, are decoded at start-up. Beyond that DALI,
# imported and set up in about 0.6 s, pays for itself: it decodes for about 1 ms of core time less
# per image (1,000 ImageNet-sized JPEGs, batch 64: 78.6 against 73.0 images/s, this machine,
# 2026-11-29), and the arrays are kept for the recheck.
MAX_SAMPLES = 512
MAX_BYTES = 256 * 2**20


class Prefetch:
    """A thread decoding ``samples`` in order into the reference's uint8 HWC pixels. ``get(i)`` waits
    for sample ``i``, or decodes it itself once the thread has stopped without it (a file the thread
    could not decode raises its error there, in the caller, as the reference's loader would)."""

    def __init__(self, samples: SampleList, spec: PreprocessSpec) -> None:
        self.samples, self.spec = samples, spec
        self._pixels: list[np.ndarray | None] = [None] * len(samples)
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self.started = time.perf_counter()
        self.decoded = 0
        self._position = 0  # the thread has been through every sample before this one
        self.seconds: float | None = None  # the thread's wall time, once it has finished
        self._thread = threading.Thread(target=self._run, name="fasteval-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for index, path in enumerate(self.samples.paths):
            if self._stop.is_set():
                break
            try:
                pixels = reference_pixels(path, self.spec)
            except Exception:  # decoded again by get(), which raises the error where it is used
                pixels = None
            with self._ready:
                self._pixels[index] = pixels
                self.decoded += pixels is not None
                self._position = index + 1
                self._ready.notify_all()
        with self._ready:
            self.seconds = time.perf_counter() - self.started
            self._ready.notify_all()

    def __len__(self) -> int:
        return len(self._pixels)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def get(self, index: int) -> np.ndarray:
        """Sample ``index``'s pixels (the reference's uint8 HWC array)."""
        with self._ready:
            while self._pixels[index] is None and self._position <= index and self._thread.is_alive():
                self._ready.wait(0.1)
            pixels = self._pixels[index]
        if pixels is None:
            pixels = reference_pixels(self.samples.paths[index], self.spec)
            self._pixels[index] = pixels
        return pixels

    def stop(self) -> None:
        """End the thread after its current image and wait for it: before a fork, or when the run
        will not read the pixels."""
        self._stop.set()
        self._thread.join()


def reads_pil_pixels(device_type: str, loader: str, num_samples: int, input_hw: tuple[int, int] | None) -> bool:
    """Whether a fast run reads PIL's pixels (the reference's) in place of DALI's: on the CPU, with the
    default or the PIL loader, and small enough (``MAX_SAMPLES``, ``MAX_BYTES``) for DALI's import and
    set-up not to pay. The one rule behind the command's start-up decoding and the evaluator's loader."""
    return (device_type == "cpu" and loader in ("auto", "torchvision") and input_hw is not None
            and 0 < num_samples <= MAX_SAMPLES and num_samples * 3 * input_hw[0] * input_hw[1] <= MAX_BYTES)


class ForkedPrefetch:
    """``Prefetch``'s interface, decoding in a child process forked before torch is imported.

    A thread shares the GIL with the imports it overlaps: PIL's Python-level work (header parsing,
    the calls around each C step) slowed ``import torch, torchvision`` from 2.3 to 2.6 s here, while a
    forked child left them as fast as alone (2026-11-29). The child writes each sample's pixels into
    an anonymous shared mapping (fixed size: a center crop) and then its index into a pipe; the
    parent reads the pipe when it needs a sample it has not seen yet (the pipe orders the writes
    before the reads on every architecture). The child ignores Ctrl-C (the parent reports it), dies
    with the parent, and is reaped as soon as its pipe ends; ``stop`` ends it."""

    def __init__(self, samples: SampleList, spec: PreprocessSpec) -> None:
        if spec.crop is None:
            raise ValueError("ForkedPrefetch needs a center crop (one image size)")
        self.samples, self.spec = samples, spec
        shape = (len(samples), spec.crop, spec.crop, 3)
        self._buffer = mmap.mmap(-1, int(np.prod(shape)))  # MAP_SHARED | MAP_ANONYMOUS: seen by both
        self._images = np.frombuffer(self._buffer, dtype=np.uint8).reshape(shape)
        self._state = [0] * len(samples)  # 0 not yet, 1 decoded, -1 failed in the child
        self.started = time.perf_counter()
        self.decoded = 0
        self.seconds: float | None = None
        self._pending = b""
        read, write = os.pipe()
        parent = os.getpid()
        self._pid = os.fork()
        if self._pid == 0:  # the child: decode, report, and never return into the parent's code
            try:
                os.close(read)
                self._child(parent, write)
            finally:
                os._exit(0)
        os.close(write)
        self._read = read
        atexit.register(self.stop)

    def _child(self, parent: int, write: int) -> None:
        from fasteval.procs import die_with_parent

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_parent(parent)
        for index, path in enumerate(self.samples.paths):
            try:
                self._images[index] = reference_pixels(path, self.spec)
                record = index
            except Exception:  # decoded again by get(), which raises the error where it is used
                record = -index - 1
            os.write(write, record.to_bytes(4, "little", signed=True))

    def __len__(self) -> int:
        return len(self._state)

    @property
    def running(self) -> bool:
        return self._pid is not None

    def _pump(self) -> None:
        """Read the next records from the child (blocking until one comes or the child ends)."""
        chunk = os.read(self._read, 4096)
        if not chunk:
            self._reap()
            return
        data = self._pending + chunk
        whole = len(data) - len(data) % 4
        for offset in range(0, whole, 4):
            record = int.from_bytes(data[offset:offset + 4], "little", signed=True)
            if record >= 0:
                self._state[record] = 1
                self.decoded += 1
            else:
                self._state[-record - 1] = -1
        self._pending = data[whole:]
        if all(self._state):  # the last record: the child is exiting
            self._reap()

    def _reap(self, patience: float | None = None) -> None:
        """Wait for the child (at most ``patience`` seconds: one stuck in the kernel, on a stalled network
        file, is left to die with this process), close the pipe and drop the exit hook."""
        if self._pid is not None:
            deadline = None if patience is None else time.monotonic() + patience
            while os.waitpid(self._pid, 0 if deadline is None else os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            self._pid = None
            self.seconds = time.perf_counter() - self.started
        if self._read is not None:
            os.close(self._read)
            self._read = None
        atexit.unregister(self.stop)

    def get(self, index: int) -> np.ndarray:
        """Sample ``index``'s pixels (a view of the shared mapping), or decoded here where the child failed."""
        while self._state[index] == 0 and self._pid is not None:
            self._pump()
        if self._state[index] == 1:
            return self._images[index]
        pixels = reference_pixels(self.samples.paths[index], self.spec)
        self._images[index] = pixels
        self._state[index] = 1
        return self._images[index]

    def stop(self) -> None:
        """End the child (if it still runs) and reap it; what it decoded stays readable."""
        if self._pid is not None:
            try:  # SIGKILL: it has nothing to clean up, and it ends a stopped process too
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap(patience=2.0)


def start(samples: SampleList, spec: PreprocessSpec):
    """The command's start-up decoding: in a forked child where that is safe (Linux, before torch is
    imported, a center crop giving one image size), else in a thread."""
    if sys.platform.startswith("linux") and spec.crop is not None and "torch" not in sys.modules and hasattr(os, "fork"):
        return ForkedPrefetch(samples, spec)
    return Prefetch(samples, spec)
