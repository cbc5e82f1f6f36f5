"""The GPU-decode loader's batch loop on the CPU device: decoding ahead on its own thread (order, depth,
early stops, errors, a pass resumed after its close), the handoff to the consumer's CUDA stream (devices and
streams mocked), the fused geometry against the per-size path, the raw mode a decoded store reads, the resize
kernel's variants compiled before the pass and the fallback where it cannot run, and benchmarks/gpu_host.py's
figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from fasteval.data.decode_ahead import Ahead
from fasteval.data.loader_torch import GpuDecodeLoader, Normalizer, per_size_reason
from fasteval.data.pixels import reference_pixels
from fasteval.data.preprocess import PreprocessSpec, get_spec, image_size
from fasteval.data.samples import discover
from fasteval.errors import FastevalError
from fasteval.evaluation.reference import reference_dataset
from fasteval.kernels import resize_crop
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


def _finishes(call, seconds: float = 30.0):
    """``call()``'s outcome (its value, or the exception it raised), run on a thread; fails rather than hang."""
    outcome = []

    def target():
        try:
            outcome.append(call())
        except BaseException as exc:  # the outcome under test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting after {seconds} s"
    return outcome[0]


def test_a_consumer_resumed_after_close_gets_an_error_not_a_hang():
    ahead = Ahead(iter(range(100)), depth=2)
    stream = iter(ahead)
    assert next(stream) == 0
    ahead.close()
    assert isinstance(_finishes(lambda: next(stream)), RuntimeError)
    assert not ahead.alive


def test_an_old_pass_resumed_after_its_loader_started_another_gets_an_error(small_data):
    """Iterating the loader again closes the pass it left suspended: resuming that one raises (it waited
    forever on its queue before), and the new pass is whole."""
    loader = _loader(small_data, workers=0)
    old = iter(loader)
    next(old)
    labels = [label for b in loader for label in b.labels[:b.real].tolist()]
    assert labels == discover(small_data).labels
    error = _finishes(lambda: next(old))
    assert isinstance(error, RuntimeError) and "stopped" in str(error)
    assert not decode_threads()


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
    """The thread runs with the evaluation device current from its start (the DataLoader's iterator and
    pin-memory thread are made there), decodes with the dedicated stream current (its outputs come from that
    stream's pool), marks each nvJPEG output as used on the consumer's stream, records an event; the labels
    and PIL's images stay on the host, for the consumer's stream to copy. The consumer's stream waits on the
    event (the host never waits). CUDA's devices, streams and events are mocked: current per thread, as CUDA's."""
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

    class Current:
        """``torch.cuda.stream``/``torch.cuda.device``: the given stream (device) current on this thread."""

        def __init__(self, value, what="stack"):
            self.value, self.what = value, what

        def __enter__(self):
            setattr(local, self.what, [*getattr(local, self.what, [main if self.what == "stack" else "cuda:none"]),
                                       self.value])

        def __exit__(self, *exc):
            setattr(local, self.what, getattr(local, self.what)[:-1])

    def device_now():
        return getattr(local, "devices", ["cuda:none"])[-1]

    def no_sync(*args, **kwargs):
        raise AssertionError("the host waited for the device")

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream("decode"))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", current)
    monkeypatch.setattr(torch.cuda, "stream", Current)
    monkeypatch.setattr(torch.cuda, "device", lambda device: Current(str(device), "devices"))
    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)

    class Image:
        is_cuda = True

        def record_stream(self, stream):
            note(f"image used on {stream.name}")

    class Files:
        def __iter__(self):
            note(f"files iterated with {device_now()} current")
            return iter([type("EncodedBatch", (), {"labels": f"labels{i}"})() for i in range(2)])

    loader = GpuDecodeLoader.__new__(GpuDecodeLoader)
    loader.device, loader.batch_size, loader._decode_stream, loader._ahead = torch.device("cuda:0"), 2, None, None
    loader.loader = Files()
    host = type("HostImage", (), {"is_cuda": False})()  # a file nvJPEG does not take, decoded by PIL
    monkeypatch.setattr(loader, "_decode", lambda batch_in: note(f"decode with {current().name} current on "
                                                                 f"{device_now()}") or [Image(), host, Image()])
    monkeypatch.setattr(loader, "assemble", lambda images, labels: note(f"assemble with {current().name} current")
                        or (labels, images[1] is host))
    assert list(loader) == [("labels0", True), ("labels1", True)]
    assert log["thread"] == ["files iterated with cuda:0 current"] + [entry for i in range(2) for entry in (
        "decode with decode current on cuda:0", "image used on main", "image used on main",
        f"event{i} recorded on decode")]
    assert log["consumer"] == [entry for i in range(2) for entry in (f"main waits event{i}",
                                                                      "assemble with main current")]


# The fused geometry


RAGGED = [(37, 50), (50, 37), (64, 64), (41, 97), (120, 80)]


def ragged_batch() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random images of the ``RAGGED`` sizes, and their labels padded to a batch of 6 (as collated)."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in RAGGED]
    return images, torch.tensor([1, 2, 3, 4, 5, 0])


@pytest.mark.parametrize("interpolation, half", [("bilinear", False), ("bicubic", True)])
def test_the_fused_batch_equals_the_per_size_path(small_data, interpolation, half):
    """One ragged batch, padded (6 rows for 5 images), through the fused kernel's twin and through the
    per-size path (torchvision's uint8 resize per size, then Normalizer): equal, padding rows included, in
    the model's input dtype, channels-last."""
    spec = PreprocessSpec("test", resize=40, crop=32, interpolation=interpolation, mean=(0.5, 0.4, 0.3),
                          std=(0.2, 0.25, 0.3))
    loader = GpuDecodeLoader(discover(small_data), spec, 6, 0, CPU, half=half)
    assert loader.per_size is None
    images, labels = ragged_batch()
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


@pytest.mark.filterwarnings("ignore:Anti-alias option is always applied for PIL Image input")
def test_the_per_size_path_antialiases_as_pil_does_whatever_the_spec_says(small_data):
    """``antialias=False`` on a spec the kernel cannot make: the reference's PIL resize antialiases anyway, and so
    does the per-size path (without, these downscaled images differ from the reference's by 24 levels). The
    loader's name says which path runs, and why."""
    spec = PreprocessSpec("t", resize=40, crop=48, antialias=False)
    loader = _loader(small_data, spec=spec)
    assert loader.name == "torchvision-gpu, resized per image size: the crop 48 is larger than the resize 40"
    assert max_diffs_from_reference(small_data, spec) <= 1.01


def test_nearest_goes_by_the_per_size_path(small_data):
    spec = PreprocessSpec("t", resize=40, crop=32, interpolation="nearest")
    assert "nearest interpolation" in per_size_reason(spec)
    batch = next(iter(_loader(small_data, batch_size=8, spec=spec)))
    assert batch.images.shape == (8, 3, 32, 32) and batch.real == 8


def test_cuda_without_triton_goes_by_the_per_size_path(monkeypatch):
    """The kernel's PyTorch twin makes a host sync an image on CUDA: there the loader resizes per size."""
    assert per_size_reason(get_spec("imagenet"), torch.device("cuda")) is None
    monkeypatch.setattr(resize_crop, "HAS_TRITON", False)
    assert "Triton is not installed" in per_size_reason(get_spec("imagenet"), torch.device("cuda"))
    assert per_size_reason(get_spec("imagenet"), CPU) is None  # the CPU runs the twin, which syncs nothing there


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


# The raw mode (a decoded store's batches)


def test_the_raw_mode_gives_the_pixels_the_normalised_batches_are_made_of(small_data):
    """uint8 pixels, channels-last, black padding rows: equal to the per-size path's raw pixels (torchvision's
    uint8 resize), and normalised they are the normalised loader's batch, bit for bit."""
    spec = PreprocessSpec("test", resize=40, crop=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    raw = GpuDecodeLoader(discover(small_data), spec, 6, 0, CPU, raw=True)
    normalised = GpuDecodeLoader(discover(small_data), spec, 6, 0, CPU)
    images, labels = ragged_batch()
    pixels = raw.assemble(images, labels)
    assert pixels.images.dtype == torch.uint8 and pixels.images.shape == (6, 3, 32, 32)
    assert pixels.images.is_contiguous(memory_format=torch.channels_last) and pixels.real == 5
    assert not pixels.images[5].any()
    assert torch.equal(Normalizer(spec, CPU, half=False)(pixels.images), normalised.assemble(images, labels).images)
    raw.per_size = "forced"
    assert torch.equal(raw.assemble(images, labels).images, pixels.images)


def test_the_raw_mode_reads_the_reference_pixels(small_data, small_spec):
    """Every sample through the raw mode (decoded by torchvision's JPEG decoder): within one level of the
    reference's PIL pixels, in sample order, the short last batch padded with black."""
    samples = discover(small_data)
    batches = list(GpuDecodeLoader(samples, small_spec, 8, 0, CPU, raw=True))
    assert [b.real for b in batches] == [8, 8, 5] and not batches[-1].images[5:].any()
    got = torch.cat([b.images[:b.real] for b in batches]).permute(0, 2, 3, 1).int()
    want = torch.from_numpy(np.stack([reference_pixels(path, small_spec) for path in samples.paths])).int()
    assert got.dtype == torch.int32 and int((got - want).abs().max()) <= 1


# The resize kernel's variants, compiled before the pass, and its fallback


def test_the_kernel_gives_the_uint8_pixels_and_a_wider_variant_the_same_values():
    """``resize_crop_pixels`` (the kernel under the interpreter, and the twin) is torchvision's uint8 resize +
    crop; a variant of more taps than the batch needs (what ``compile_variants`` compiles for a run) gives the
    same output; fewer, or not a power of two, is refused."""
    from torchvision.transforms.v2 import functional as F

    images, _ = ragged_batch()
    want = torch.stack([F.center_crop(F.resize(image, [40], antialias=True), [32, 32]) for image in images])
    for backend in ("triton", "torch"):
        pixels = resize_crop.resize_crop_pixels(images, 40, 32, backend=backend)
        assert pixels.dtype == torch.uint8 and pixels.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(pixels, want)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    assert resize_crop.variant_taps(120, 80, 40, "bilinear") == 8  # 3x down: 7 taps
    narrow = resize_crop.resize_crop_triton(images, 40, 32, mean, std)
    assert torch.equal(resize_crop.resize_crop_triton(images, 40, 32, mean, std, k=16), narrow)
    for k in (4, 12):
        with pytest.raises(ValueError, match="k must be a power of two of at least the batch's 8 taps"):
            resize_crop.resize_crop_triton(images, 40, 32, mean, std, k=k)
    assert resize_crop.compile_variants([(120, 80), (37, 50)], 40, 32, batch=2, device=CPU) == [4, 8]  # ran


class LaunchKeys:
    """The resize kernel replaced by a recorder of what decides which compiled variant a launch runs: its
    constexprs, and per other argument what Triton specialises on (a tensor's dtype; an integer equal to 1,
    divisible by 16, or neither). Nothing runs."""

    def __init__(self) -> None:
        self.keys: list[tuple] = []

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            spec = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else (a == 1, a % 16 == 0) for a in args)
            self.keys.append((tuple(sorted(constexprs.items())), spec))
        return launch


def test_warm_up_compiles_every_variant_the_pass_launches(varied_data, monkeypatch):
    """The variants the warm-up compiles (its image sizes from the header probes) are the ones every batch of
    the pass launches, whatever its images: no compile inside the timed loop. With the GPU's block shapes:
    their scan chunk no longer depends on the batch's longest side."""
    keys = LaunchKeys()
    monkeypatch.setattr(resize_crop, "_resize_crop_kernel", keys)
    blocks = resize_crop.default_blocks
    monkeypatch.setattr(resize_crop, "default_blocks", lambda h, w, k, longest, interpreted: blocks(h, w, k, longest,
                                                                                                    False))
    samples = discover(varied_data)
    loader = GpuDecodeLoader(samples, PreprocessSpec("t", resize=128, crop=112), 4, 0, CPU)
    loader.backend = "triton"  # the interpreter's kernel, as on CUDA
    loader.warm_up()
    sizes = [image_size(p) for p in samples.paths]  # (height, width)
    assert loader.variants == [8, 16]  # 8 taps up to 2x downscaling (a short side of 256), 16 up to 4x
    assert loader.variants == sorted({resize_crop.variant_taps(h, w, 128, "bilinear") for h, w in sizes})
    assert len(keys.keys) == len(loader.variants)
    warmed, keys.keys = set(keys.keys), []
    for start in range(0, len(sizes), 3):  # batches of 3 files, padded to 4: every mix of sizes the pass sees
        images = [torch.zeros((3, h, w), dtype=torch.uint8) for h, w in sizes[start:start + 3]]
        loader.assemble(images, torch.zeros(4, dtype=torch.int64))
    assert keys.keys and set(keys.keys) <= warmed
    loader.assemble([torch.zeros((3, 2000, 1500), dtype=torch.uint8)], torch.zeros(4, dtype=torch.int64))
    assert keys.keys[-1] not in warmed  # a size no sample has: another variant (the keys tell them apart)


def test_where_the_kernel_cannot_run_the_warm_up_falls_back_to_the_per_size_path(small_data, small_spec,
                                                                                 monkeypatch, capsys):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("PTXAS error: Internal Triton PTX codegen error\nptxas fatal: Unsupported .version")

    monkeypatch.setattr(resize_crop, "compile_variants", no_compiler)
    loader = GpuDecodeLoader(discover(small_data), small_spec, 6, 0, CPU)
    loader.backend = "triton"
    loader.warm_up()
    err = capsys.readouterr().err
    assert err == ("fasteval: warning: the resize kernel cannot run, resizing once per image size instead: "
                   "PTXAS error: Internal Triton PTX codegen error\n")
    assert loader.name == "torchvision-gpu, resized per image size: the resize kernel could not run"
    images, labels = ragged_batch()
    batch = loader.assemble(images, labels)
    loader.per_size, loader.backend = None, "torch"
    assert torch.equal(batch.images, loader.assemble(images, labels).images)


def test_a_kernel_failure_inside_the_pass_goes_on_by_the_per_size_path(small_data, small_spec, monkeypatch, capsys):
    """A variant the warm-up did not compile fails to: that batch and the rest by the per-size path, one line."""
    reference = [b.images for b in _loader(small_data, batch_size=8)]
    calls = []

    def fails(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory")

    monkeypatch.setattr(resize_crop, "resize_crop_normalize", fails)
    loader = _loader(small_data, batch_size=8)
    got = [b.images for b in loader]
    assert len(calls) == 1 and capsys.readouterr().err.count("\n") == 1
    assert all(torch.equal(a, b) for a, b in zip(got, reference)) and len(got) == len(reference)
    assert "resized per image size" in loader.name


def test_the_evaluator_warms_the_loader_up_and_its_plan_names_the_path_that_runs(small_data, small_spec,
                                                                                 monkeypatch, capsys):
    """FastEvaluator's warm-up calls the loader's, before the executed plan is written: a fallback there is in
    the plan's loader."""
    from torch import nn

    from fasteval.evaluation import plan
    from fasteval.evaluation.fast import FastEvaluator

    monkeypatch.setattr(resize_crop, "compile_variants", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no cc")))
    monkeypatch.setattr(plan, "reads_pil_pixels", lambda *a: False)  # a loader, not PIL's pixels in-process

    def source(kind, samples, spec, *, batch_size, workers, device, half=False, **kw):
        loader = GpuDecodeLoader(samples, spec, batch_size, workers, device, half)
        loader.backend = "triton"
        return loader

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    options = plan.FastOptions(loader="torchvision", compile=False, exact="off", workers=0, batch_size=8)
    evaluator = FastEvaluator(discover(small_data), model, small_spec, CPU, options, batch_source=source)
    assert evaluator.executed_plan.loader.value == ("torchvision-gpu, resized per image size: the resize kernel "
                                                    "could not run")
    assert "the resize kernel cannot run" in capsys.readouterr().err


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
