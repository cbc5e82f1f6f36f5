"""Decoding while the command starts: the reference's pixels of a small dataset, made during the imports.

Importing torch and torchvision keeps one core busy for about 2.5 s (2-core machine, 2026-11-29) while
the other has nothing to do. For a small dataset on the CPU, the command lists DATA before those
imports and starts this thread, which decodes every sample as the reference does
(``reference_pixels``: PIL, RGB, torchvision's resize and crop) into uint8 arrays. PIL releases the
GIL while it decodes and resamples, so the imports go on at their own pace; on 156 photographs the
thread had finished before torch had loaded. The fast path then reads these pixels (no decoder to
import, no worker to start, no file that only PIL decodes as the reference does), and the exact
recheck reads them again instead of decoding again. The pixels are the reference's own, so the
fast path's logit error is its precision's alone.

Torch-free: this module is imported before torch is.
"""

from __future__ import annotations

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

    def __init__(self, samples: SampleList, spec: PreprocessSpec, order: list[int] | None = None) -> None:
        """``order``: the samples the thread decodes, in that order (default: all); others are
        decoded by ``get`` when asked for."""
        self.samples, self.spec = samples, spec
        self.order = list(range(len(samples))) if order is None else list(order)
        self._pixels: list[np.ndarray | None] = [None] * len(samples)
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self.started = time.perf_counter()
        self.decoded = 0
        self._position = 0  # the thread has been through ``order`` up to here
        self._rank = {index: position for position, index in enumerate(self.order)}
        self.seconds: float | None = None  # the thread's wall time, once it has finished
        self._thread = threading.Thread(target=self._run, name="fasteval-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for position, index in enumerate(self.order):
            if self._stop.is_set():
                break
            try:
                pixels = reference_pixels(self.samples.paths[index], self.spec)
            except Exception:  # decoded again by get(), which raises the error where it is used
                pixels = None
            with self._ready:
                self._pixels[index] = pixels
                self.decoded += pixels is not None
                self._position = position + 1
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
            position = self._rank.get(index, -1)
            while self._pixels[index] is None and self._position <= position and self._thread.is_alive():
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


def fits(num_samples: int, output_hw: tuple[int, int]) -> bool:
    """Whether a run is small enough for the reference's pixels (``MAX_SAMPLES``, ``MAX_BYTES``): decoded at
    start-up by the command, and in any case read by the fast path on the CPU in place of DALI's."""
    return 0 < num_samples <= MAX_SAMPLES and num_samples * 3 * output_hw[0] * output_hw[1] <= MAX_BYTES
