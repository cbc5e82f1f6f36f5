"""The hot loops make no host sync, checked without a GPU on fake CUDA tensors (see sync_trace.py).

What cannot run on fake tensors is stubbed at its boundary: nvJPEG (the GPU-decode loader gets
decoded uint8 CUDA images), Triton launches (recorded, not run: ``stub_triton_launches``), CUDA streams and
events (the decode thread's handoff records its calls), DataLoader workers (the loaders get collated host
tensors) and the
compiled, autocast model (``FastModel`` moves parameters with ``Module.to``, which cannot swap
fake parameters, and autocast turns itself off without CUDA): the loop gets a plain eager module.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from sync_trace import HostSyncError, LaunchCounter, fake_cuda, stub_triton_launches  # noqa: E402

from fasteval.kernels.accumulator import MetricsAccumulator  # noqa: E402
from fasteval.data.decode_ahead import HostHandoff  # noqa: E402
from fasteval.data.loader_torch import GpuDecodeLoader, TorchvisionLoader  # noqa: E402
from fasteval.data.batch import Batch  # noqa: E402
from fasteval.data.samples import discover  # noqa: E402

CUDA = torch.device("cuda")
# The fused kernel's wrapper reads each image's data pointer (its table for the launch): a fake tensor's is
# meaningless, and the launch that would use it is stubbed.
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
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


def test_recorder_sees_copies_under_inference_mode():
    """Inference mode dispatches ``Tensor.to`` whole (not the ``_to_copy`` it becomes outside it): its copies
    are judged alike, and counted as device work unless ``to`` returned its input."""
    with fake_cuda() as trace, torch.inference_mode():
        x = torch.zeros(4, dtype=torch.int32, device=CUDA)
        with trace.recording() as events, LaunchCounter() as counter:
            torch.zeros(3).to(CUDA)
            x.cpu()
            torch.zeros(3).pin_memory().to(CUDA, non_blocking=True)
            x.long()
            x.to(CUDA)  # already there: no copy
        assert [e.reason for e in events] == ["blocking host-to-device copy", "device-to-host copy"]
        assert counter.ops == {"to": 4}


def _gpu_decode_loader(small_data, spec, batch_size):
    loader = GpuDecodeLoader(discover(small_data), spec, batch_size, 0, CUDA)
    assert loader.normalize.mean.device.type == "cuda"
    assert loader.loader.pin_memory  # the workers' file bytes and labels reach the loop pinned
    return loader


@pytest.fixture
def device_guard(monkeypatch):
    """``torch.cuda.device(...)`` (the fused kernel's launch guard) without a driver: device 0 stays current."""
    monkeypatch.setattr(torch.cuda, "_exchange_device", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", lambda device: 0)


def padded_labels(first: int, count: int, batch_size: int) -> torch.Tensor:
    """Labels ``first..first+count-1`` padded with zeros to the batch size, pinned: as the workers collate them
    and the DataLoader's pin thread hands them over."""
    labels = torch.zeros(batch_size, dtype=torch.int64)
    labels[:count] = torch.arange(first, first + count)
    return labels.pin_memory()


@pytest.mark.parametrize("batch_size", [4, 3])
def test_gpu_decode_assembly_has_no_host_sync(batch_size, small_data, small_spec, device_guard):
    """The fused geometry (several sizes per batch, the Triton launch stubbed), label transfer, padding of the
    short last batch, a PIL-decoded image (a file nvJPEG does not take) copied from the host."""
    with fake_cuda() as trace, stub_triton_launches() as launches:
        loader = _gpu_decode_loader(small_data, small_spec, batch_size)
        assert loader.per_size is None
        decoded = [torch.empty(3, h, w, dtype=torch.uint8, device=CUDA) for h, w in SIZES]
        decoded[1] = torch.empty(SIZES[1][0], SIZES[1][1], 3, dtype=torch.uint8).pin_memory().permute(2, 0, 1)
        chunks = [decoded[i:i + batch_size] for i in range(0, len(decoded), batch_size)]
        labels = [padded_labels(i, len(c), batch_size) for i, c in zip(range(0, len(decoded), batch_size), chunks)]
        with trace.recording() as events:
            batches = [loader.assemble(images, lab) for images, lab in zip(chunks, labels)]
        assert events == [], trace.report()
        assert launches == ["_resize_crop_kernel"] * len(chunks)  # one launch a batch, the short one too
        assert [b.real for b in batches] == [len(c) for c in chunks]
        for b in batches:
            assert b.images.device.type == "cuda" and b.labels.device.type == "cuda"
            assert b.images.shape == (batch_size, 3, 32, 32) and b.labels.shape == (batch_size,)
            assert b.images.is_contiguous(memory_format=torch.channels_last)
            assert b.images.dtype == torch.float32 and b.labels.dtype == torch.int64


def test_gpu_decode_per_size_assembly_has_no_host_sync(small_data, small_spec):
    """The path of a spec the fused kernel cannot make: one resize per distinct size, then normalised."""
    with fake_cuda() as trace:
        loader = _gpu_decode_loader(small_data, small_spec, 8)
        loader.per_size = "forced"
        images = [torch.empty(3, h, w, dtype=torch.uint8, device=CUDA) for h, w in SIZES]
        with trace.recording() as events:
            batch = loader.assemble(images, padded_labels(0, len(images), 8))
        assert events == [], trace.report()
        assert batch.images.shape == (8, 3, 32, 32) and batch.real == len(SIZES)
        assert batch.images.is_contiguous(memory_format=torch.channels_last)


def test_gpu_decode_geometry_is_one_launch_a_batch_whatever_its_sizes(small_data, small_spec, device_guard):
    """The device work ``assemble`` queues is the same for a batch of one size as for one of 8 distinct
    sizes: one Triton launch, a fixed set of ATen operations. The per-size path's grows with the sizes."""
    one_size, distinct = [(40, 50)] * 8, [(40 + i, 50 + 3 * i) for i in range(8)]
    with fake_cuda(), stub_triton_launches() as triton:
        loader = _gpu_decode_loader(small_data, small_spec, 8)

        def launches(sizes, per_size=None):
            loader.per_size = per_size
            images = [torch.empty(3, h, w, dtype=torch.uint8, device=CUDA) for h, w in sizes]
            triton.clear()
            with LaunchCounter() as counter:
                loader.assemble(images, padded_labels(0, 8, 8))
            return list(triton), counter.ops

        fused = launches(one_size)
        assert fused[0] == ["_resize_crop_kernel"]
        assert launches(distinct) == fused
        per_size_one, per_size_distinct = launches(one_size, "forced")[1], launches(distinct, "forced")[1]
        assert sum(per_size_distinct.values()) >= sum(per_size_one.values()) + 7 * 3, (per_size_one, per_size_distinct)


class RecordingHandoff(HostHandoff):
    """The handoff's calls (CUDA streams and events need a driver): what each was given, and the device work
    queued while the decode stream is current."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.on_decode_stream: dict[str, int] = {}

    @contextlib.contextmanager
    def decoding(self):
        self.calls.append(("decoding",))
        with LaunchCounter() as counter:
            yield
        for name, count in counter.ops.items():
            self.on_decode_stream[name] = self.on_decode_stream.get(name, 0) + count

    def hand_over(self, tensors):
        self.calls.append(("hand_over", [t.device.type for t in tensors]))
        return len(self.calls)

    def take(self, ready):
        self.calls.append(("take", ready))


class Inline:
    """``Ahead``'s interface on the consumer's thread (its thread logic is tested in test_gpu_loader.py): the
    decoding side's device work runs under the recorder too (dispatch modes are per thread)."""

    def __init__(self, items, depth):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def close(self):
        pass


def test_gpu_decode_iteration_has_no_host_sync(small_data, small_spec, monkeypatch, device_guard):
    """``__iter__`` itself, both sides of the decoding thread: the DataLoader replaced by batches as the workers
    collate them (labels padded; one file nvJPEG does not take, decoded by PIL) and its pin thread hands them
    over, nvJPEG by fake images, the thread by ``Inline``. While the decode stream is current, no device work
    is queued but nvJPEG's (stubbed here): the labels' and PIL's copies and the padding run on the loop's
    stream, where the caching allocator cannot hand their blocks to nvJPEG's pool-stream writes early."""
    from fasteval.data import loader_torch
    from fasteval.data.loader_torch import EncodedBatch, _collate

    monkeypatch.setattr(loader_torch, "Ahead", Inline)
    pil = np.zeros((*SIZES[0], 3), dtype=np.uint8)
    files = [[(b"jpeg", None, i, "x.jpg") for i in range(4)],
             [(b"jpeg", None, 4, "x.jpg"), (None, pil, 5, "x.png"), (b"jpeg", None, 6, "x.jpg")]]
    assert [_collate(items, 4).labels.tolist() for items in files] == [[0, 1, 2, 3], [4, 5, 6, 0]]
    with fake_cuda() as trace, stub_triton_launches() as launches:
        loader = _gpu_decode_loader(small_data, small_spec, 4)
        collated = [_collate(items, 4) for items in files]
        loader.loader = [EncodedBatch(b.blob.pin_memory(), b.sizes, b.decoded, b.labels.pin_memory(), b.paths)
                         for b in collated]
        monkeypatch.setattr(loader, "_decode_jpegs", lambda batch, paths: [
            torch.empty(3, *SIZES[i], dtype=torch.uint8, device=CUDA) for i in range(len(paths))])
        handoff = RecordingHandoff()
        monkeypatch.setattr(loader, "_handoff", lambda: handoff)
        with trace.recording() as events:
            batches = list(loader)
        assert events == [], trace.report()
        assert [b.real for b in batches] == [4, 3]
        assert all(b.labels.shape == (4,) and b.labels.device.type == "cuda" for b in batches)
        assert launches == ["_resize_crop_kernel"] * 2
    assert handoff.on_decode_stream == {}
    # Each batch's nvJPEG images (not the labels, not PIL's host image) are handed over, then taken before the
    # loop uses them.
    assert handoff.calls == [("decoding",), ("hand_over", ["cuda"] * 4), ("take", 2),
                             ("decoding",), ("hand_over", ["cuda"] * 2), ("take", 5)]


def test_the_raw_gpu_loader_of_a_decoded_store_makes_uint8_pixels_without_host_sync(small_data, small_spec,
                                                                                    device_guard):
    """A decoded store's loader on CUDA without DALI (``raw_loader``) is the GPU-decode loader in its raw
    mode: one launch a batch, uint8 channels-last pixels, no host sync (it broke on its first batch before)."""
    from fasteval.data.decoded import raw_loader

    with fake_cuda() as trace, stub_triton_launches() as launches:
        loader = raw_loader("torchvision", discover(small_data), small_spec, batch_size=8, workers=0, device=CUDA)
        assert isinstance(loader, GpuDecodeLoader) and loader.raw and loader.name == "torchvision-gpu"
        images = [torch.empty(3, h, w, dtype=torch.uint8, device=CUDA) for h, w in SIZES]
        with trace.recording() as events:
            batch = loader.assemble(images, padded_labels(0, len(images), 8))
        assert events == [], trace.report()
        assert launches == ["_resize_crop_kernel"]
        assert batch.images.dtype == torch.uint8 and batch.images.shape == (8, 3, 32, 32)
        assert batch.images.is_contiguous(memory_format=torch.channels_last) and batch.real == len(SIZES)


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
