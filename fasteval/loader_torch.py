"""Loaders without DALI: torchvision's nvJPEG decoding on the GPU, and PIL in DataLoader workers.

Both keep images as uint8 until they reach the device, where a single normalisation
produces the model's channels-last float input; the last batch is padded to the static size.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import FastevalError
from .loaders import Batch
from .preprocess import PreprocessSpec
from .reference import load_rgb
from .samples import SampleList


class Normalizer:
    """uint8 NCHW -> normalised float, channels-last, on the device: (x / 255 - mean) / std."""

    def __init__(self, spec: PreprocessSpec, device: torch.device, half: bool) -> None:
        self.dtype = torch.float16 if half else torch.float32
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.contiguous(memory_format=torch.channels_last).float()
        return x.div_(255).sub_(self.mean).div_(self.std).to(self.dtype)


def _pad(images: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    missing = size - images.shape[0]
    if missing == 0:
        return images, labels
    images = torch.cat([images, images.new_zeros((missing, *images.shape[1:]))])
    labels = torch.cat([labels, labels.new_zeros(missing)])
    return images, labels


class _PilUint8(Dataset):
    """PIL decode + torchvision resize/crop, kept as uint8 (normalised later, on the device)."""

    def __init__(self, samples: SampleList, spec: PreprocessSpec) -> None:
        from torchvision import transforms as T

        self.samples = samples.samples
        self.transform = T.Compose([*spec.pil_geometry(), T.PILToTensor()])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label


class TorchvisionLoader:
    """PIL in DataLoader workers (the last resort, and the CPU path without DALI)."""

    name = "torchvision-cpu"

    def __init__(self, samples: SampleList, spec: PreprocessSpec, batch_size: int, workers: int,
                 device: torch.device, half: bool = False) -> None:
        self.batch_size, self.device = batch_size, device
        self.normalize = Normalizer(spec, device, half)
        self.loader = DataLoader(_PilUint8(samples, spec), batch_size=batch_size, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers > 0 else None)

    def __iter__(self) -> Iterator[Batch]:
        for images, labels in self.loader:
            real = images.shape[0]
            images, labels = _pad(images, labels, self.batch_size)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield Batch(self.normalize(images), labels, real)


def _pil_rgb(path: str):
    """An HWC uint8 array decoded by PIL exactly as the reference decodes it."""
    import numpy as np

    return np.array(load_rgb(path))


class _EncodedFiles(Dataset):
    """Raw file bytes for the GPU decoder; files nvJPEG cannot take (non-JPEG) are decoded here."""

    def __init__(self, samples: SampleList) -> None:
        self.samples = samples.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise FastevalError(f"cannot read image {path}: {exc}") from None
        if data[:2] == b"\xff\xd8":
            return data, None, label, path
        return None, _pil_rgb(path), label, path


class EncodedBatch(NamedTuple):
    """A batch of JPEG bytes in one tensor (one shared-memory handle per batch, not one per file)."""

    blob: torch.Tensor  # uint8: the JPEG files back to back
    sizes: list[int]  # bytes of each JPEG in the blob, in batch order; 0 where the file is not a JPEG
    decoded: list  # HWC uint8 arrays for the non-JPEG files (None for JPEGs)
    labels: list[int]
    paths: list[str]


def _collate(items) -> EncodedBatch:
    encoded, decoded, labels, paths = (list(column) for column in zip(*items))
    jpegs = [data for data in encoded if data is not None]
    blob = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8) if jpegs else torch.zeros(0).byte()
    return EncodedBatch(blob, [len(data) if data is not None else 0 for data in encoded], decoded, labels, paths)


# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; nvJPEG through
# torchvision.io is still the DALI-free GPU path on the torchvision releases GPU machines carry.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class GpuDecodeLoader:
    """torchvision.io.decode_jpeg on the CUDA device (nvJPEG, batched), resize and crop on the GPU."""

    name = "torchvision-gpu"

    def __init__(self, samples: SampleList, spec: PreprocessSpec, batch_size: int, workers: int,
                 device: torch.device, half: bool = False) -> None:
        self.spec, self.batch_size, self.device = spec, batch_size, device
        self.normalize = Normalizer(spec, device, half)
        self.loader = DataLoader(_EncodedFiles(samples), batch_size=batch_size, num_workers=workers,
                                 collate_fn=_collate, persistent_workers=workers > 0)

    def _decode(self, batch_in: EncodedBatch) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        sizes, paths = batch_in.sizes, batch_in.paths
        jpeg_at = [i for i, size in enumerate(sizes) if size]
        out = [None if d is None else torch.from_numpy(d).permute(2, 0, 1).to(self.device) for d in batch_in.decoded]
        if jpeg_at:
            batch = list(torch.split(batch_in.blob, [sizes[i] for i in jpeg_at]))
            try:
                images = decode_jpeg(batch, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                images = [self._decode_one(data, paths[i]) for i, data in zip(jpeg_at, batch)]
            for i, image in zip(jpeg_at, images):
                out[i] = image
        return out

    def _decode_one(self, data: torch.Tensor, path: str) -> torch.Tensor:
        """One file after a batched failure: nvJPEG alone, else PIL (e.g. CMYK), else a named error."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return torch.from_numpy(_pil_rgb(path)).permute(2, 0, 1).to(self.device)

    def _geometry(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Resize + crop on the device, one call per distinct input size (not one per image)."""
        from torchvision.transforms.v2 import functional as F

        mode = getattr(F.InterpolationMode, self.spec.interpolation.upper())
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
        out = None
        for (h, w), idx in by_size.items():
            group = F.resize(torch.stack([images[i] for i in idx]), list(self.spec.resized_hw(h, w)),
                             interpolation=mode, antialias=self.spec.antialias)
            if self.spec.crop is not None:
                top, left = self.spec.crop_offsets(h, w)
                group = group[:, :, top:top + self.spec.crop, left:left + self.spec.crop]
            if out is None:
                out = group.new_empty((len(images), *group.shape[1:]))
            out[idx] = group
        return out

    def __iter__(self) -> Iterator[Batch]:
        for batch_in in self.loader:
            images = self._geometry(self._decode(batch_in))
            labels = torch.tensor(batch_in.labels, dtype=torch.int64)
            real = images.shape[0]
            images, labels = _pad(images, labels, self.batch_size)
            yield Batch(self.normalize(images), labels.to(self.device, non_blocking=True), real)
