"""Loaders without DALI: torchvision's nvJPEG decoding on the GPU, PIL in DataLoader workers, and the
reference's PIL pixels for small CPU runs.

The first two keep images as uint8 until they reach the device, where one launch makes the model's
channels-last input (the nvJPEG loader's fused resize, crop and normalisation; the PIL workers'
normalisation); the third (CPU only) normalises each image as it reads it (on the thread that
decoded it, or in order for pixels decoded at start-up). The last batch is padded to the static size.
Per batch, neither makes the host wait for the device: host tensors go to the GPU from pinned
memory with ``non_blocking=True``, padding is made on the device, and no device tensor is indexed
with a host list (``tests/test_sync_free.py`` checks all three on fake CUDA tensors).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fasteval.devices import synchronize
from fasteval.errors import FastevalError, first_line
from fasteval.data.batch import Batch
from fasteval.data.decode_ahead import Ahead, HostHandoff, StreamHandoff
from fasteval.data.preprocess import PreprocessSpec, image_size
from fasteval.data.probe import probe, probe_all
from fasteval.data.pixels import load_rgb, reference_pixels
from fasteval.data.dataset import ImageDataset
from fasteval.data.samples import SampleList
from fasteval.data.sources import read_bytes


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait: on CUDA, from pinned memory with
    ``non_blocking`` (a copy from pageable memory, or a blocking one, waits for the stream).
    ``pin_memory()`` returns the tensor itself when it is already pinned (DataLoader's pin thread)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Normalizer:
    """uint8 NCHW -> normalised float, channels-last, on the device: (x / 255 - mean) / std, each step
    rounded to float32 as torchvision's ``ToTensor`` and ``Normalize`` round it."""

    def __init__(self, spec: PreprocessSpec, device: torch.device, half: bool) -> None:
        self.dtype = torch.float16 if half else torch.float32
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # image width -> mean, std along a row

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.contiguous(memory_format=torch.channels_last).float()
        return x.div_(255).sub_(self.mean).div_(self.std).to(self.dtype)

    def into(self, image: np.ndarray, out: np.ndarray) -> None:
        """The same arithmetic for one HWC uint8 image, written into ``out`` (its float32 HWC row of a
        channels-last batch) with NumPy: one image's steps stay in the core's cache and run on the
        thread that decoded it, where the batch's four passes over memory took the model's cores
        (22 against 4 ms a batch of 60 on the demo). Equal bit for bit: tested on every value."""
        h, w, c = image.shape
        if w not in self._rows:
            self._rows[w] = (np.tile(self.mean.cpu().numpy().ravel(), w), np.tile(self.std.cpu().numpy().ravel(), w))
        mean, std = self._rows[w]
        flat = out.reshape(h, w * c)  # a row of w x 3 values: the channel pattern, tiled, broadcasts fast
        np.divide(image.reshape(h, w * c), np.float32(255), out=flat, dtype=np.float32)
        flat -= mean
        flat /= std


def _zero_rows(t: torch.Tensor, size: int) -> torch.Tensor:
    """Zero rows up to ``size``, made where the tensor already is (the device)."""
    missing = size - t.shape[0]
    if missing == 0:
        return t
    return torch.cat([t, t.new_zeros((missing, *t.shape[1:]))])


def _pad(images: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows up to the static batch size, made where the tensors already are (the device)."""
    return _zero_rows(images, size), _zero_rows(labels, size)


def _pil_uint8(samples: SampleList, spec: PreprocessSpec) -> ImageDataset:
    """PIL decode + torchvision resize/crop, kept as uint8 (normalised later, on the device)."""
    from torchvision import transforms as T

    return ImageDataset(samples, T.Compose([*spec.pil_geometry(), T.PILToTensor()]))


def _worker_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """The DataLoader of the PIL loaders: pinned batches for CUDA, workers kept across passes, 4 batches ahead."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


class TorchvisionLoader:
    """PIL in DataLoader workers (the last resort, and the CPU path without DALI). ``raw``: batches of the
    resized, cropped uint8 pixels, not normalised (a decoded store's)."""

    name = "torchvision-cpu"

    def __init__(self, samples: SampleList, spec: PreprocessSpec, batch_size: int, workers: int,
                 device: torch.device, half: bool = False, raw: bool = False) -> None:
        self.batch_size, self.device, self.raw = batch_size, device, raw
        self.normalize = Normalizer(spec, device, half)
        self.loader = _worker_loader(_pil_uint8(samples, spec), batch_size, workers, device)

    def to_batch(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        """A collated host batch (pinned by the DataLoader on CUDA) -> the model's padded device batch.
        Padding after the copy: a host-side ``torch.cat`` would make an unpinned tensor."""
        real = images.shape[0]
        images, labels = _pad(to_device(images, self.device), to_device(labels, self.device), self.batch_size)
        return Batch(images if self.raw else self.normalize(images), labels, real)

    def __iter__(self) -> Iterator[Batch]:
        for images, labels in self.loader:
            yield self.to_batch(images, labels)


class TransformLoader:
    """The caller's own transform, one fasteval's decoders do not reproduce (fasteval/data/transform_spec.py), run
    as the reference's code runs it: on PIL images, in DataLoader workers. Its float batches are made the
    model's: on the device, in the model's input dtype, channels-last, padded to the static batch size."""

    name = "the transform given, in DataLoader workers"

    def __init__(self, samples: SampleList, spec: PreprocessSpec, batch_size: int, workers: int,
                 device: torch.device, half: bool = False) -> None:
        self.batch_size, self.device = batch_size, device
        self.dtype = torch.float16 if half else torch.float32
        self.loader = _worker_loader(ImageDataset(samples, spec.torchvision_transform()), batch_size, workers, device)

    def __iter__(self) -> Iterator[Batch]:
        for images, labels in self.loader:
            real = images.shape[0]
            images = images.as_subclass(torch.Tensor)  # a v2 transform's tv_tensors.Image: a plain tensor
            images, labels = _pad(to_device(images, self.device), to_device(labels, self.device), self.batch_size)
            yield Batch(images.to(self.dtype).contiguous(memory_format=torch.channels_last), labels, real)


class KeptPixels:
    """A pass's pixels by sample index, the HWC uint8 arrays ``ToTensor`` takes (``Prefetch``'s ``get``):
    the recheck reads the pixels the pass decoded instead of decoding again."""

    def __init__(self, samples: SampleList, spec: PreprocessSpec) -> None:
        self.samples, self.spec = samples, spec
        self.images: dict[int, np.ndarray] = {}

    def get(self, index: int) -> np.ndarray:
        image = self.images.get(index)
        if image is None:  # not in the pass (it stopped early): decoded as the reference does
            return reference_pixels(self.samples.paths[index], self.spec)
        return image


class PixelLoader:
    """Batches of the reference's own pixels (ImageFolder's PIL decode, torchvision's resize and crop) for
    the samples at ``indices``, normalised and padded as the other loaders' batches are, on the CPU (the
    only device that reads PIL's pixels: ``prefetch.reads_pil_pixels``; fp32 or bf16, whose autocast takes
    float32 input). Each image is normalised as it is read, into its row of one buffer reused by every
    batch. ``pixels``: the samples decoded since the command started (fasteval/data/prefetch.py), batched in
    this process on every pass. Without them each pass decodes here, batch by batch, between the model's
    batches, on ``workers`` threads (PIL lets go of the GIL while it decodes and resizes), and keeps what it
    decoded. Between, not beside: on the CPU the model's threads take every core, and decoding beside them
    (DataLoader workers, or a thread) stalls its parallel regions: on the demo, 75 images/s beside against
    80 between, and 68 for one decoding thread beside. ``self.pixels``: the last pass's, for the recheck."""

    name = "pil-cpu, in-process"

    def __init__(self, samples: SampleList, indices: list[int], batch_size: int, spec: PreprocessSpec,
                 device: torch.device, pixels=None, workers: int = 0, keep: bool = False) -> None:
        """``keep``: the pixels the first pass decodes serve the later passes too (a run of several
        passes over the same images, training's validation: decoded once, as a sweep's store is)."""
        if device.type != "cpu":
            raise ValueError(f"PixelLoader batches on the CPU, not on {device}")
        self.samples, self.indices, self.batch_size, self.spec = samples, indices, batch_size, spec
        self.given = self.pixels = pixels
        self.keep, self.threads = keep, workers
        # The labels padded once to whole batches: each batch is a slice.
        whole = -(-len(indices) // batch_size) * batch_size
        self.labels = torch.zeros(whole, dtype=torch.int64)
        self.labels[:len(indices)] = torch.tensor([samples.labels[i] for i in indices], dtype=torch.int64)
        self.normalize = Normalizer(spec, device, half=False)
        self.output_hw = spec.output_hw(*image_size(samples.paths[indices[0]])) if indices else (0, 0)
        # NHWC memory, a channels-last NCHW batch: made here, where the evaluator builds its loader in
        # inference mode (an inference tensor, as its warm-up example is). Fresh pages to fault in on
        # every batch were 2/3 of normalising one (36 MB at 60 x 224^2).
        self._out = torch.empty((batch_size, *self.output_hw, 3), dtype=torch.float32)
        if pixels is not None:
            self.name = "pil-cpu, decoded at start-up"
        elif workers:
            self.name = f"pil-cpu, {workers} thread(s) between batches"

    def __iter__(self) -> Iterator[Batch]:
        if self.given is not None:
            yield from self._from_pixels(self.given)
            return
        if self.keep and isinstance(self.pixels, KeptPixels) and len(self.pixels.images) == len(self.indices):
            yield from self._from_pixels(self.pixels)
            return
        kept = KeptPixels(self.samples, self.spec)
        self.pixels = kept
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fasteval-decode") if self.threads else None
        try:
            yield from self._from_pixels(kept, decode=pool.map if pool else map)
        finally:  # no idle thread outlives the pass (a process with one exits the slow way: procs.exit_promptly)
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)

    def _from_pixels(self, pixels, decode=None) -> Iterator[Batch]:
        """``decode``: a map (the pool's or the builtin) that decodes each batch's files into ``pixels`` (a
        ``KeptPixels``); each image is normalised where it was decoded, into its row of the batch."""
        b, rows = self.batch_size, self._out.numpy()

        def fill(row: int, index: int) -> np.ndarray:
            image = reference_pixels(self.samples.paths[index], self.spec) if decode else pixels.get(index)
            self.normalize.into(image, rows[row])
            return image

        for start in range(0, len(self.indices), b):
            chunk = self.indices[start:start + b]
            images = list((decode or map)(fill, range(len(chunk)), chunk))
            if decode is not None:
                pixels.images.update(zip(chunk, images))
            if len(chunk) < b:  # padding rows: a black image, normalised, as the other loaders pad
                self.normalize.into(np.zeros((*self.output_hw, 3), np.uint8), rows[len(chunk)])
                rows[len(chunk) + 1:] = rows[len(chunk)]
            yield Batch(self._out.permute(0, 3, 1, 2), self.labels[start:start + b], len(chunk))


def _pil_rgb(path: str):
    """An HWC uint8 array decoded by PIL exactly as the reference decodes it."""
    return np.array(load_rgb(path))


class _EncodedFiles(Dataset):
    """Raw file bytes for the GPU decoder; files it would not decode as PIL does (anything but a
    baseline/progressive 8-bit JPEG that holds all its data, judged by content) are decoded here."""

    def __init__(self, samples: SampleList) -> None:
        self.samples = samples.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            data = read_bytes(path)
        except OSError as exc:
            raise FastevalError(f"cannot read image {path}: {exc}") from None
        found = probe(path)
        if found.format == "JPEG" and found.dali_safe:
            return data, None, label, path
        return None, _pil_rgb(path), label, path


class EncodedBatch(NamedTuple):
    """A batch of JPEG bytes in one tensor (one shared-memory handle per batch, not one per file)."""

    blob: torch.Tensor  # uint8: the JPEG files back to back
    sizes: list[int]  # bytes of each JPEG in the blob, in batch order; 0 where the file is not a JPEG
    decoded: list  # HWC uint8 arrays for the non-JPEG files (None for JPEGs)
    labels: torch.Tensor  # int64 [batch_size] on the host (pinned by the DataLoader on CUDA): zeros past the files
    paths: list[str]


def _collate(items, batch_size: int) -> EncodedBatch:
    """The workers' batch; its labels padded to the static batch size here, so that the batch loop copies
    one pinned buffer and pads nothing."""
    encoded, decoded, labels, paths = (list(column) for column in zip(*items))
    jpegs = [data for data in encoded if data is not None]
    blob = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8) if jpegs else torch.zeros(0).byte()
    padded = torch.zeros(batch_size, dtype=torch.int64)
    padded[:len(labels)] = torch.tensor(labels, dtype=torch.int64)
    return EncodedBatch(blob, [len(data) if data is not None else 0 for data in encoded], decoded, padded, paths)


# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; nvJPEG through
# torchvision.io is still the DALI-free GPU path on the torchvision releases GPU machines carry.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


# Decoded batches waiting for the batch loop, beside the one being decoded: two, so that one slow batch of
# files (large images, PIL fallbacks) does not idle the model. About 0.15 GB of device memory each at
# batch 256 of ImageNet-sized images.
DECODE_AHEAD = 2


def per_size_reason(spec: PreprocessSpec, device: torch.device | None = None) -> str | None:
    """Why the fused kernel (kernels/resize_crop.py) cannot make ``spec``'s batches on ``device``, so that the
    GPU-decode loader resizes once per distinct image size instead; None where it can. Without a crop it can
    (the run's outputs share one size: ``preprocess.check_batchable``), and with ``antialias=False`` too: the
    reference resizes PIL images, which PIL always antialiases (torchvision ignores ``antialias=False`` there),
    so both paths antialias. On CUDA without Triton it cannot: the kernel's PyTorch twin would copy each
    image's coefficients from pageable memory, a host sync an image."""
    from fasteval.kernels.resize_crop import SUPPORTS, triton_usable

    if spec.crop is not None and spec.crop > spec.resize:
        return f"the crop {spec.crop} is larger than the resize {spec.resize}"
    if spec.interpolation not in SUPPORTS:
        return f"{spec.interpolation} interpolation (the kernel has {', '.join(SUPPORTS)})"
    if device is not None and device.type == "cuda" and not triton_usable(device):
        return "Triton is not installed (the kernel's PyTorch twin makes a host sync an image on CUDA)"
    return None


class GpuDecodeLoader:
    """torchvision.io.decode_jpeg on the CUDA device (nvJPEG, batched), resize, crop and normalise on the GPU.

    Decoding runs ahead on a thread and a CUDA stream of its own (fasteval/data/decode_ahead.py): DataLoader
    workers read the files into pinned memory (the labels padded to the static batch size there), the thread
    decodes each batch on its stream and hands it to the batch loop's stream by an event, up to
    ``DECODE_AHEAD`` batches ahead. The decode stream holds nvJPEG's outputs and nothing else: the batch
    loop's own work per batch (``assemble``, on its stream) copies the labels and PIL's images (files nvJPEG
    does not take), pads, and makes the batch with one launch of ``resize_crop_normalize`` for the whole
    ragged batch, in the model's input dtype, channels-last; no host sync. A spec that kernel cannot make
    (``per_size_reason``), or a GPU where it cannot run (``warm_up``), is resized once per distinct image
    size, then normalised; the loader's name says so.

    ``raw``: batches of the resized, cropped uint8 pixels, not normalised (a decoded store's): the kernel's
    pixels, those its normalised batches are made of.
    """

    def __init__(self, samples: SampleList, spec: PreprocessSpec, batch_size: int, workers: int,
                 device: torch.device, half: bool = False, raw: bool = False) -> None:
        self.samples, self.spec, self.batch_size, self.device, self.raw = samples, spec, batch_size, device, raw
        self.normalize = Normalizer(spec, device, half)
        self.backend = "triton" if device.type == "cuda" else "torch"  # the CPU device (tests): the kernel's twin
        self.per_size = per_size_reason(spec, device)  # None: one fused launch a batch
        self.variants: list[int] = []  # the resize kernel's tap counts compiled by warm_up
        self.loader = DataLoader(_EncodedFiles(samples), batch_size=batch_size, num_workers=workers,
                                 collate_fn=partial(_collate, batch_size=batch_size), persistent_workers=workers > 0,
                                 pin_memory=device.type == "cuda")
        self._decode_stream = None  # made on the first CUDA pass
        self._ahead: Ahead | None = None

    @property
    def name(self) -> str:
        """The loader's name in reports: with the per-size path's reason where that path runs."""
        return "torchvision-gpu" + ("" if self.per_size is None else f", resized per image size: {self.per_size}")

    def warm_up(self) -> None:
        """Compile the resize kernel's variants this run's images need (their sizes from the header probes,
        cached since the plan read them) and run each once, before the timed pass; where the kernel cannot run,
        the per-size path from here on (``_fall_back``). Nothing to do on the per-size path or the CPU."""
        if self.per_size is not None or self.backend != "triton":
            return
        from fasteval.kernels.resize_crop import compile_variants

        sizes = [(p.size[1], p.size[0]) for p in probe_all(self.samples.paths) if p.size]
        try:
            self.variants = compile_variants(sizes, self.spec.resize, self.spec.crop, batch=self.batch_size,
                                             device=self.device, interpolation=self.spec.interpolation,
                                             out_dtype=torch.float32 if self.raw else self.normalize.dtype)
            synchronize(self.device)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        """The per-size path for the rest of the run, where the resize kernel cannot run (Triton without a C
        compiler or ptxas, an architecture it lacks): one line on stderr, and the loader's name says so."""
        print(f"fasteval: warning: the resize kernel cannot run, resizing once per image size instead: "
              f"{first_line(exc)[:200]}", file=sys.stderr)
        self.per_size = "the resize kernel could not run"

    def _decode(self, batch_in: EncodedBatch) -> list[torch.Tensor]:
        """The batch's CHW uint8 images in order: nvJPEG's on the device, PIL's on the host (pinned on CUDA:
        ``assemble`` copies them on the batch loop's stream)."""
        sizes, paths = batch_in.sizes, batch_in.paths
        out = [None if d is None else self._host(d) for d in batch_in.decoded]
        jpeg_at = [i for i, size in enumerate(sizes) if size]
        if jpeg_at:
            batch = list(torch.split(batch_in.blob, [sizes[i] for i in jpeg_at]))
            for i, image in zip(jpeg_at, self._decode_jpegs(batch, [paths[i] for i in jpeg_at])):
                out[i] = image
        return out

    def _host(self, image: np.ndarray) -> torch.Tensor:
        """An HWC uint8 array as a CHW host tensor, pinned on CUDA (no device work on the decoding thread)."""
        chw = torch.from_numpy(image).permute(2, 0, 1)
        return chw.pin_memory() if self.device.type == "cuda" else chw

    def _decode_jpegs(self, batch: list[torch.Tensor], paths: list[str]) -> list[torch.Tensor]:
        """One batched nvJPEG call; after a failure, file by file (nvJPEG alone, else PIL, else a named error).
        Runs on the decoding thread, with the decode stream current on CUDA (``StreamHandoff``)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(batch, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return [self._decode_one(data, path) for data, path in zip(batch, paths)]

    def _decode_one(self, data: torch.Tensor, path: str) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return self._host(_pil_rgb(path))

    def _handoff(self) -> HostHandoff | StreamHandoff:
        if self.device.type != "cuda":
            return HostHandoff()
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        return StreamHandoff(self.device, self._decode_stream)

    def _decoded(self, handoff: HostHandoff | StreamHandoff, inference: bool) -> Iterator[tuple]:
        """The decoding thread's work, with the evaluation device current (the DataLoader's iterator and its
        pin-memory thread are made here: on another device they would open a CUDA context there): each batch of
        files decoded, its padded host labels, and what orders the device images before the loop's use.
        ``inference``: whether the consumer runs in inference mode (thread-local: the thread takes it up)."""
        with torch.inference_mode(inference), handoff.on_device():
            for batch_in in self.loader:
                with handoff.decoding():
                    images = self._decode(batch_in)
                yield images, batch_in.labels, handoff.hand_over([image for image in images if image.is_cuda])

    def _resize_crop(self, images: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
        """One group of same-size images resized (antialiased, as PIL resizes the reference's images, whatever
        the spec's ``antialias``) and centre-cropped."""
        from torchvision.transforms.v2 import functional as F

        mode = getattr(F.InterpolationMode, self.spec.interpolation.upper())
        stacked = images[0].unsqueeze(0) if len(images) == 1 else torch.stack(images)
        group = F.resize(stacked, list(self.spec.resized_hw(h, w)), interpolation=mode, antialias=True)
        if self.spec.crop is not None:  # CenterCrop's offsets; zeros around an image smaller than the crop
            group = F.center_crop(group, [self.spec.crop, self.spec.crop])
        return group

    def _geometry(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Resize + crop on the device, one call per distinct input size (the path for a spec the fused
        kernel cannot make: ``per_size_reason``).

        The groups go back into batch order by ``index_copy_`` with one index tensor copied from
        pinned memory without blocking. Writing ``out[idx] = group`` with ``idx`` a Python list would
        copy the list with a blocking transfer: a host sync per distinct size (about one per image on
        ImageNet), each also waiting for the previous batch's model."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
        groups = [(idx, self._resize_crop([images[i] for i in idx], h, w)) for (h, w), idx in by_size.items()]
        if len(groups) == 1:
            return groups[0][1]
        order = to_device(torch.tensor([i for idx, _ in groups for i in idx], dtype=torch.int64), self.device)
        out = groups[0][1].new_empty((len(images), *groups[0][1].shape[1:]))
        start = 0
        for idx, group in groups:
            out.index_copy_(0, order[start:start + len(idx)], group)
            start += len(idx)
        return out

    def _fused(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The whole ragged batch in one launch: resized, cropped, normalised in the model's input dtype (raw:
        the uint8 pixels)."""
        from fasteval.kernels.resize_crop import resize_crop_normalize, resize_crop_pixels

        spec = self.spec
        if self.raw:
            return resize_crop_pixels(images, spec.resize, spec.crop, interpolation=spec.interpolation,
                                      backend=self.backend)
        return resize_crop_normalize(images, spec.resize, spec.crop, spec.mean, spec.std,
                                     interpolation=spec.interpolation, out_dtype=self.normalize.dtype,
                                     backend=self.backend)

    def assemble(self, images: list[torch.Tensor], labels: torch.Tensor) -> Batch:
        """Decoded CHW uint8 images (nvJPEG's on the device, PIL's on the host) and the labels padded to the
        static batch size (on the host, pinned on CUDA, as the decoding thread hands them over; or already on
        the device) -> the model's padded, normalised batch (raw: its uint8 pixels). Runs on the batch loop's
        stream: every copy and temporary here is ordered with the model's work, none with nvJPEG's.

        A short batch's padding rows are a black image, resized and normalised by the same launch: the values
        the per-size path gives them (zeros, normalised). Where the kernel fails here (a variant ``warm_up``
        did not compile), this batch and the rest go by the per-size path (``_fall_back``)."""
        real = len(images)
        if self.device.type == "cuda":
            images = [image if image.is_cuda else to_device(image, self.device) for image in images]
            if not labels.is_cuda:
                labels = to_device(labels, self.device)
        if self.per_size is None:
            padded = images
            if real < self.batch_size:  # the black image takes the first's size: without a crop, the run's output size
                padded = [*images, *[images[0].new_zeros(images[0].shape)] * (self.batch_size - real)]
            try:
                return Batch(self._fused(padded), labels, real)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                self._fall_back(exc)
        pixels = _zero_rows(self._geometry(images), self.batch_size)
        return Batch(pixels if self.raw else self.normalize(pixels), labels, real)

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        handoff = self._handoff()
        self._ahead = ahead = Ahead(self._decoded(handoff, torch.is_inference_mode_enabled()), DECODE_AHEAD)
        try:
            for images, labels, ready in ahead:
                handoff.take(ready)
                yield self.assemble(images, labels)
        finally:
            ahead.close()
            if self._ahead is ahead:  # its thread's generator holds this loader: a cycle otherwise
                self._ahead = None

    def close(self) -> None:
        """Stop a pass still decoding ahead (one its consumer left unfinished) and join its thread."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
