"""The samples as a torch ``Dataset``, decoded as the reference decodes them."""

from __future__ import annotations

from torch.utils.data import Dataset

from fasteval.data.pixels import load_rgb
from fasteval.data.samples import SampleList


class ImageDataset(Dataset):
    """``(transform(image), label)`` per sample of the list, the image decoded by ``load_rgb``: ImageFolder's
    ``__getitem__`` over fasteval's sample list (the recheck, the PIL loader and training all read through it)."""

    def __init__(self, samples: SampleList, transform) -> None:
        self.samples, self.transform = samples.samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label
