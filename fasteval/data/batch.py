"""What every loader of the fast path yields.

Every loader is fed the one sample list, yields batches of the static batch size (the last
one padded; its ``real`` rows are the samples), images already normalised, channels-last,
on the evaluation device. A batch is valid until the next one is asked for: the PIL pixel loader
writes every batch into one buffer, and DALI's iterator may reuse its outputs (clone what you keep).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """One batch: the images, their labels, and how many of its rows are samples."""

    images: torch.Tensor  # [B, 3, H, W] float, channels-last, on the device
    labels: torch.Tensor  # [B] int64, on the device
    real: int  # the first `real` rows are samples; the rest is padding
