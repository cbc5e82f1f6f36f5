"""The GPU-decode loader's batch loop on the CPU device: decoding ahead on its own thread (order, depth,
early stops, errors), the handoff to the consumer's CUDA stream (streams mocked), the fused geometry
against the per-size path, and benchmarks/gpu_host.py's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import pytest
import torch

from fasteval.data.decode_ahead import Ahead
from fasteval.data.loader_torch import GpuDecodeLoader, per_size_reason
from fasteval.data.preprocess import PreprocessSpec, get_spec
from fasteval.data.samples import discover
from fasteval.errors import FastevalError
from fasteval.evaluation.reference import reference_dataset
from fasteval.kernels.resize_crop import resize_crop_normalize

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fasteval-decode"]


# Ahead, alone


def test_items_arrive_in_order_and_the_thread_ends():
    ahead = Ahead(iter(range(50)), depth=2)
    assert list(ahead) == list(range(50))
    assert not ahead.alive


def test_an_error_arrives_after_the_items_before_it_as_the_same_object():
    error = FastevalError("cannot decode image /data/b.jpg: broken")

    def items():
        yield 1
        yield 2
        raise error

    got = []
    with pytest.raises(FastevalError) as caught:
        for item in Ahead(items(), depth=2):
            got.append(item)
    assert caught.value is error and got == [1, 2]
    assert not decode_threads()


def _wait(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_the_producer_stays_depth_ahead_and_a_stop_joins_it_and_runs_its_cleanup():
    """With one item taken, ``depth`` wait and one more is held by the blocked producer; stopping early
    wakes it, runs the producer's ``finally`` on its thread, and joins it."""
    produced, cleaned = [], []

    def items():
        try:
            for i in range(100):
                produced.append(i)
                yield i
        finally:
            cleaned.append(threading.current_thread().name)

    ahead = Ahead(items(), depth=2)
    stream = iter(ahead)
    assert next(stream) == 0
    assert _wait(lambda: len(produced) == 4)
    time.sleep(0.2)  # room for a producer that would run further ahead to do so
    assert len(produced) == 4
    stream.close()  # what a consumer's break does to the generator
    assert not ahead.alive and cleaned == ["fasteval-decode"]


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        Ahead(iter(()), depth=0)


# The loader on the CPU device: the same thread logic as on CUDA (HostHandoff)


def _loader(small_data, batch_size=4, workers=1, spec=None):
    return GpuDecodeLoader(discover(small_data), spec or get_spec("imagenet", resize=40, crop=32), batch_size,
                           workers, CPU)


def test_decoding_runs_ahead_on_its_own_thread(small_data, monkeypatch):
    """While the loop holds batch 0, the thread decodes batches 1 and 2 (and holds 3); every batch in order,
    the short last one padded."""
    loader = _loader(small_data)  # 21 samples: 6 batches, the last of 1
    decode = loader._decode_jpegs
    threads, decoded, ahead = [], [], threading.Event()

    def counted(batch, paths):
        threads.append(threading.current_thread().name)
        images = decode(batch, paths)
        decoded.append(len(paths))
        if len(decoded) == 3:
            ahead.set()
        return images

    monkeypatch.setattr(loader, "_decode_jpegs", counted)
    labels, reals = [], []
    for batch in loader:
        if not reals:
            assert ahead.wait(30), "batches 1 and 2 were not decoded while the loop held batch 0"
        labels += batch.labels[:batch.real].tolist()
        reals.append(batch.real)
    assert labels == discover(small_data).labels and reals == [4, 4, 4, 4, 4, 1]
    assert set(threads) == {"fasteval-decode"}
    assert not decode_threads()


def test_a_break_stops_and_joins_the_decoding_thread(small_data):
    loader = _loader(small_data)
    for _ in loader:
        assert len(decode_threads()) == 1
        break
    assert not decode_threads()
    assert [label for b in loader for label in b.labels[:b.real].tolist()] == discover(small_data).labels


def test_an_error_in_the_consumer_stops_the_thread(small_data):
    loader = _loader(small_data)
    with pytest.raises(KeyError):
        for _ in loader:
            raise KeyError("the model failed")
    assert not decode_threads()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_file_reaches_the_loop_as_the_named_error_after_the_batches_before_it(workers, tmp_path, small_data):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(small_data, root)
    samples = discover(root)
    bad = samples.paths[9]  # in the third batch of 4
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    loader = _loader(root, workers=workers)
    seen = []
    with pytest.raises(FastevalError) as caught:
        for batch in loader:
            seen.append(batch.real)
    assert seen == [4, 4]
    assert f"cannot decode image {bad}" in str(caught.value)
    assert not decode_threads()


# The handoff to the consumer's CUDA stream, through the loader's thread


def test_decoded_batches_reach_the_consumer_stream_by_an_event(monkeypatch):
    """The thread decodes with the dedicated stream current (its outputs come from that stream's pool), marks
    each output as used on the consumer's stream, records an event; the consumer's stream waits on that event
    (the host never waits). CUDA's streams and events are mocked: current streams are per thread, as CUDA's."""
    local, log = threading.local(), {"thread": [], "consumer": []}

    def note(entry):
        log["thread" if threading.current_thread().name == "fasteval-decode" else "consumer"].append(entry)

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, event):
            note(f"{self.name} waits {event.name}")

    main, events = Stream("main"), []

    class Event:
        def __init__(self):
            self.name = f"event{len(events)}"
            events.append(self)

        def record(self, stream):
            note(f"{self.name} recorded on {stream.name}")

    def current(device=None):
        return getattr(local, "stack", [main])[-1]

    class StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            local.stack = [*getattr(local, "stack", [main]), self.stream]

        def __exit__(self, *exc):
            local.stack = local.stack[:-1]

    def no_sync(*args, **kwargs):
        raise AssertionError("the host waited for the device")

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream("decode"))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", current)
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)

    class Image:
        shape = (2,)  # as labels: a full batch of 2

        def __init__(self, what="image"):
            self.what = what

        def record_stream(self, stream):
            note(f"{self.what} used on {stream.name}")

    from fasteval.data import loader_torch

    monkeypatch.setattr(loader_torch, "to_device", lambda t, device: Image("labels"))
    loader = GpuDecodeLoader.__new__(GpuDecodeLoader)
    loader.device, loader.batch_size, loader._decode_stream, loader._ahead = torch.device("cuda:0"), 2, None, None
    loader.loader = [type("EncodedBatch", (), {"labels": i})() for i in range(2)]
    monkeypatch.setattr(loader, "_decode", lambda batch_in: note(f"decode with {current().name} current")
                        or [Image(), Image()])
    monkeypatch.setattr(loader, "assemble", lambda images, labels: note(f"assemble with {current().name} current")
                        or labels.what)
    assert list(loader) == ["labels", "labels"]
    assert log["thread"] == [entry for i in range(2) for entry in (
        "decode with decode current", "image used on main", "image used on main", "labels used on main",
        f"event{i} recorded on decode")]
    assert log["consumer"] == [entry for i in range(2) for entry in (f"main waits event{i}",
                                                                      "assemble with main current")]


# The fused geometry


RAGGED = [(37, 50), (50, 37), (64, 64), (41, 97), (120, 80)]


@pytest.mark.parametrize("interpolation, half", [("bilinear", False), ("bicubic", True)])
def test_the_fused_batch_equals_the_per_size_path(small_data, interpolation, half):
    """One ragged batch, padded (6 rows for 5 images), through the fused kernel's twin and through the
    per-size path (torchvision's uint8 resize per size, then Normalizer): equal, padding rows included, in
    the model's input dtype, channels-last."""
    spec = PreprocessSpec("test", resize=40, crop=32, interpolation=interpolation, mean=(0.5, 0.4, 0.3),
                          std=(0.2, 0.25, 0.3))
    loader = GpuDecodeLoader(discover(small_data), spec, 6, 0, CPU, half=half)
    assert loader.per_size is None
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in RAGGED]
    labels = torch.arange(5)
    fused = loader.assemble(images, labels)
    loader.per_size = "forced"
    per_size = loader.assemble(images, labels)
    assert fused.images.dtype == (torch.float16 if half else torch.float32) == per_size.images.dtype
    assert fused.images.shape == (6, 3, 32, 32) and fused.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fused.images, per_size.images)
    assert torch.equal(fused.labels, per_size.labels) and fused.real == per_size.real == 5
    black = ((0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)).to(fused.images.dtype)
    assert torch.equal(fused.images[5], black.view(3, 1, 1).expand(3, 32, 32))


def test_a_crop_larger_than_the_resize_goes_by_the_per_size_path_padded_as_centercrop_pads(small_data):
    """The kernel refuses it; the per-size path pads with zeros as CenterCrop does: the reference's pixels."""
    spec = PreprocessSpec("t", resize=40, crop=48)
    assert "crop 48 is larger than the resize 40" in per_size_reason(spec)
    with pytest.raises(ValueError, match="crop 48 is larger"):
        resize_crop_normalize([torch.zeros((3, 60, 72), dtype=torch.uint8)], 40, 48, spec.mean, spec.std,
                              backend="torch")
    assert max_diffs_from_reference(small_data, spec) <= 1.01


def test_nearest_goes_by_the_per_size_path(small_data):
    spec = PreprocessSpec("t", resize=40, crop=32, interpolation="nearest")
    assert "nearest interpolation" in per_size_reason(spec)
    batch = next(iter(_loader(small_data, batch_size=8, spec=spec)))
    assert batch.images.shape == (8, 3, 32, 32) and batch.real == 8


@pytest.mark.filterwarnings("ignore:Anti-alias option is always applied for PIL Image input")
def test_the_kernel_makes_the_other_specs_without_antialias_too(small_data):
    """``antialias=False`` means nothing to the reference's PIL resize: the kernel's antialiased pixels are its."""
    assert per_size_reason(get_spec("imagenet")) is None
    assert per_size_reason(get_spec("seed")) is None  # no crop: the run's outputs share one size
    assert per_size_reason(PreprocessSpec("t", resize=40, crop=32, interpolation="bicubic")) is None
    spec = PreprocessSpec("t", resize=40, crop=32, antialias=False)
    assert per_size_reason(spec) is None
    assert max_diffs_from_reference(small_data, spec) <= 1.01


def max_diffs_from_reference(root, spec) -> float:
    """The largest |loader - reference| over the first batch of 8, in 1/255 steps."""
    reference = reference_dataset(discover(root), spec)
    batch = next(iter(_loader(root, batch_size=8, spec=spec)))
    assert batch.images.shape == (8, 3, *reference[0][0].shape[-2:]) and batch.real == 8
    std = torch.tensor(spec.std).view(3, 1, 1)
    return max(float(((batch.images[i] - reference[i][0]).abs() * std * 255).max()) for i in range(8))


# benchmarks/gpu_host.py


def test_gpu_host_writes_its_figures(tmp_path):
    out = tmp_path / "host.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_host.py"), "--json", str(out),
                           "--batch", "6", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures["batch"] == 6 and figures["distinct_sizes"] == 6
    assert set(figures["loaders"]) == {"torchvision", "dali"}
    torchvision = figures["loaders"]["torchvision"]
    assert torchvision["host_us_per_image"] > 0
    assert torchvision["launches"]["triton_stubbed"] == 1
    assert torchvision["host_syncs"] == [] and figures["loaders"]["dali"]["host_syncs"] == []
    per_size = torchvision["per_size_path"]
    assert per_size["host_us_per_image"] > 0 and per_size["launches"]["aten"]["_upsample_bilinear2d_aa"] == 6
    assert figures["loaders"]["dali"]["host_us_per_image"] > 0
