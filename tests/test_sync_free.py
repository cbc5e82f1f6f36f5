"""The hot loops make no host sync, checked without a GPU on fake CUDA tensors (see sync_trace.py).

What cannot run on fake tensors is stubbed at its boundary: nvJPEG (the GPU-decode loader gets
decoded uint8 CUDA images), DataLoader workers (the loaders get collated host tensors) and the
compiled, autocast model (``FastModel`` moves parameters with ``Module.to``, which cannot swap
fake parameters, and autocast turns itself off without CUDA): the loop gets a plain eager module.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from sync_trace import HostSyncError, fake_cuda  # noqa: E402

from fasteval.kernels.accumulator import MetricsAccumulator  # noqa: E402
from fasteval.data.loader_torch import GpuDecodeLoader, TorchvisionLoader  # noqa: E402
from fasteval.data.batch import Batch  # noqa: E402
from fasteval.data.samples import discover  # noqa: E402

CUDA = torch.device("cuda")
# Distinct sizes (h, w), as nvJPEG returns them: the geometry groups them, one resize per size.
SIZES = [(375, 500), (333, 500), (375, 500), (500, 375), (281, 500), (375, 500), (400, 300)]


def test_recorder_flags_syncs_and_passes_async_work():
    """The recorder itself: every kind of sync is caught, and the sync-free idioms record nothing."""
    with fake_cuda() as trace:
        x = torch.empty(4, 3, device=CUDA)
        with trace.recording() as events:
            x[[0, 2]] = torch.ones(2, 3, device=CUDA)  # a host list index: blocking copy
            x.cpu()
            torch.zeros(3).to(CUDA, non_blocking=True)  # pageable memory
            torch.zeros(3).pin_memory().to(CUDA)  # pinned but blocking
        assert [e.reason for e in events] == [
            "blocking host-to-device copy", "device-to-host copy",
            "host-to-device copy from pageable (unpinned) memory", "blocking host-to-device copy"]
        assert all("test_sync_free.py" in e.where for e in events)
        for read in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x[x > 0], lambda: x.nonzero()):
            with pytest.raises(HostSyncError), trace.recording():
                read()
        trace.events.clear()
        with trace.recording() as events:
            index = torch.tensor([2, 0]).pin_memory().to(CUDA, non_blocking=True)
            assert index.device.type == "cuda"
            x.index_copy_(0, index, torch.ones(2, 3, device=CUDA))
            x[1:3] = 0.0
            torch.where(x > 0, x, 0.0).sum()
        assert events == []


def _gpu_decode_loader(small_data, spec, batch_size):
    loader = GpuDecodeLoader(discover(small_data), spec, batch_size, 0, CUDA)
    assert loader.normalize.mean.device.type == "cuda"
    return loader


@pytest.mark.parametrize("batch_size", [4, 3])
def test_gpu_decode_assembly_has_no_host_sync(batch_size, small_data, small_spec):
    """Geometry (several sizes per batch), label transfer, padding of the short last batch, normalisation."""
    with fake_cuda() as trace:
        loader = _gpu_decode_loader(small_data, small_spec, batch_size)
        decoded = [torch.empty(3, h, w, dtype=torch.uint8, device=CUDA) for h, w in SIZES]
        chunks = [decoded[i:i + batch_size] for i in range(0, len(decoded), batch_size)]
        labels = [torch.arange(i, i + len(c)) for i, c in zip(range(0, len(decoded), batch_size), chunks)]
        loader.loader = list(zip(chunks, labels))  # collated host batches, as the DataLoader yields them
        loader._decode = lambda batch_in: batch_in[0]  # nvJPEG's boundary: decoded uint8 CUDA images
        with trace.recording() as events:
            batches = [loader.assemble(images, lab) for images, lab in loader.loader]
        assert events == [], trace.report()
        assert [b.real for b in batches] == [len(c) for c in chunks]
        for b in batches:
            assert b.images.device.type == "cuda" and b.labels.device.type == "cuda"
            assert b.images.shape == (batch_size, 3, 32, 32) and b.labels.shape == (batch_size,)
            assert b.images.is_contiguous(memory_format=torch.channels_last)
            assert b.labels.dtype == torch.int64


def test_gpu_decode_iteration_has_no_host_sync(small_data, small_spec, monkeypatch):
    """``__iter__`` itself, with the DataLoader replaced by collated batches and nvJPEG by fake images."""
    from fasteval.data.loader_torch import EncodedBatch

    with fake_cuda() as trace:
        loader = _gpu_decode_loader(small_data, small_spec, 4)
        loader.loader = [EncodedBatch(torch.zeros(len(sizes), dtype=torch.uint8), [1] * len(sizes), [None] * len(sizes),
                                      torch.arange(len(sizes)), ["x.jpg"] * len(sizes))
                         for sizes in (SIZES[:4], SIZES[4:])]
        monkeypatch.setattr(loader, "_decode_jpegs",
                            lambda batch, paths: [torch.empty(3, *SIZES[i % 4], dtype=torch.uint8, device=CUDA)
                                                  for i in range(len(paths))])
        with trace.recording() as events:
            reals = [batch.real for batch in loader]
        assert events == [], trace.report()
        assert reals == [4, 3]


def test_gpu_decode_geometry_keeps_batch_order(small_spec):
    """Grouping by size and writing the groups back keeps each image in its row (real CPU tensors)."""
    loader = GpuDecodeLoader.__new__(GpuDecodeLoader)
    loader.spec, loader.device = small_spec, torch.device("cpu")
    images = [torch.full((3, h, w), 10 * i, dtype=torch.uint8) for i, (h, w) in enumerate(SIZES)]
    out = loader._geometry(images)
    assert out.shape == (len(SIZES), 3, 32, 32)
    assert [int(v) for v in out[:, 0, 16, 16]] == [10 * i for i in range(len(SIZES))]


def test_torchvision_loader_transfer_has_no_host_sync(small_data, small_spec):
    with fake_cuda() as trace:
        loader = TorchvisionLoader(discover(small_data), small_spec, 4, 0, CUDA)
        # What the DataLoader's pin-memory thread hands over: pinned host batches, the last one short.
        host = [(torch.empty(n, 3, 32, 32, dtype=torch.uint8).pin_memory(), torch.arange(n).pin_memory())
                for n in (4, 4, 1)]
        with trace.recording() as events:
            batches = [loader.to_batch(images, labels) for images, labels in host]
        assert events == [], trace.report()
        assert [b.real for b in batches] == [4, 4, 1]
        assert all(b.images.shape == (4, 3, 32, 32) and b.labels.shape == (4,) for b in batches)
        assert all(b.images.device.type == "cuda" and b.labels.device.type == "cuda" for b in batches)
        # Unpinned batches (a DataLoader without pin_memory) are pinned here rather than copied from pageable memory.
        with trace.recording() as events:
            loader.to_batch(torch.empty(2, 3, 32, 32, dtype=torch.uint8), torch.arange(2))
        assert events == [], trace.report()


@pytest.mark.parametrize("num_real", [6, 4])
def test_accumulator_update_has_no_host_sync(num_real):
    with fake_cuda() as trace:
        acc = MetricsAccumulator(6 + num_real, CUDA, backend="torch")
        logits = torch.empty(6, 1000, device=CUDA, dtype=torch.bfloat16)
        labels = torch.zeros(6, dtype=torch.int64, device=CUDA)
        with trace.recording() as events:
            acc.update(logits, labels)
            acc.update(logits, labels, num_real=num_real)  # a padded last batch: labels past it are ignored
        assert events == [], trace.report()
        assert acc.filled == 6 + num_real


def test_fast_loop_has_no_host_sync():
    """The evaluator's batch loop: batches -> model -> accumulator, as ``fast.run_loop`` drives it."""
    from fasteval.evaluation.fast import run_loop

    with fake_cuda() as trace:
        with torch.device(CUDA):
            model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(8, 10)).eval()
        images = torch.empty(4, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
        labels = torch.zeros(4, dtype=torch.int64, device=CUDA)
        batches = [Batch(images, labels, 4), Batch(images, labels, 4), Batch(images, labels, 2)]
        acc = MetricsAccumulator(10, CUDA, backend="torch")
        with trace.recording() as events, torch.inference_mode():
            run_loop(batches, model, acc)
        assert events == [], trace.report()
        assert acc.filled == 10


@pytest.mark.parametrize("placement", ["device", "pinned"])
def test_decoded_store_iteration_has_no_host_sync(placement, small_spec):
    """A sweep's passes over the decoded store (kept on the GPU, or in pinned host memory) make no host sync,
    and the last batch is padded to the static shape."""
    from fasteval.data.decoded import DecodedStore

    with fake_cuda() as trace:
        images = (torch.empty(10, 3, 32, 32, dtype=torch.uint8, device=CUDA) if placement == "device" else
                  torch.empty(10, 3, 32, 32, dtype=torch.uint8).pin_memory())
        with torch.inference_mode():
            store = DecodedStore(images, list(range(10)), small_spec, batch_size=4, device=CUDA, half=False,
                                 placement=placement, info={"loader": "test"})
        with trace.recording() as events, torch.inference_mode():
            batches = list(store)
        assert events == [], trace.report()
        assert [b.real for b in batches] == [4, 4, 2]
        assert all(b.images.shape[0] == 4 and b.images.device.type == "cuda" for b in batches)


def test_decoding_into_a_gpu_store_has_no_host_sync():
    from fasteval.data.decoded import decode_into

    with fake_cuda() as trace:
        out = torch.empty(10, 3, 32, 32, dtype=torch.uint8, device=CUDA)
        images = torch.empty(4, 3, 32, 32, dtype=torch.uint8, device=CUDA)
        labels = torch.zeros(4, dtype=torch.int64, device=CUDA)
        loader = [Batch(images, labels, 4), Batch(images, labels, 4), Batch(images, labels, 2)]
        with trace.recording() as events, torch.inference_mode():
            decode_into(loader, out)
        assert events == [], trace.report()
