"""Host time of the CUDA loaders' batch assembly, measured on a machine without a GPU.

    python benchmarks/gpu_host.py --json OUT [--batch 256] [--repeats 20]

What each CUDA loader's batch loop does on the host per batch, after decoding, on fake CUDA tensors
(tests/sync_trace.py: shapes, dtypes and devices tracked, no memory, nothing runs), in a child process
that makes torch see one H100 (tests/fake_gpu.py: that install cannot be undone):

- ``torchvision`` (fasteval/data/loader_torch.py): ``GpuDecodeLoader.assemble`` on one batch of
  ImageNet-like images of distinct sizes, as the decoding thread hands them over (decoded by nvJPEG, the
  labels already on the device: decoding is stubbed at its boundary, the images are given). The fused
  kernel's wrapper runs; its Triton launch is stubbed at the launch (``kernel[grid](...)`` is recorded, not
  run). Not included: the handoff's one ``wait_event`` a batch (a CUDA call fake tensors cannot make), and
  the decoding thread's own work (not on the batch loop's thread). ``per_size_path``: the same batch
  through the path a spec the kernel cannot make takes (one resize per distinct size, then a
  normalisation: the path every spec took before the kernel).
- ``dali`` (fasteval/data/loader_dali.py): fasteval's own work on each batch DALI's iterator yields (the
  channels-last view, the labels' cast). DALI cannot run on a fake device, so its iterator is replaced by
  its outputs: DALI's own host work (the pipeline's scheduling, the plugin's copies into torch tensors) is
  not in the figure.

``host_us_per_image`` is the wall time of a call (median, and ``host_ms_per_batch_min`` the fastest) over
the batch's images. Every ATen call on a fake tensor propagates shapes in Python: ``aten_call_us`` measures
one view on real CPU tensors and on fake CUDA ones, hundreds of times apart, so the figure is dominated by
``aten_calls_per_batch``: for those calls it is far above what a real device's host pays, while the Triton
launcher's own Python (tens of microseconds a launch on a GPU) is not in it.
``outside_aten_us_per_image``: the Python work around those calls (fasteval's, the kernel wrapper's; on fake
tensors, whose ``device`` is a Python property, somewhat slower than on real ones).
``launches``: the ATen operations that would queue device work (kernels and copies), by name, and the
Triton launches. ``host_syncs``: the operations that would make the host wait for the device (none).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDES = (300, 500)  # ImageNet-like: each side drawn in this range, every size distinct


def _sizes(batch: int, seed: int = 0) -> list[tuple[int, int]]:
    """``batch`` distinct (height, width) pairs, sides in ``SIDES``."""
    import random

    rng, seen = random.Random(seed), {}
    while len(seen) < batch:
        seen.setdefault((rng.randint(*SIDES), rng.randint(*SIDES)), None)
    return list(seen)


def _timed(call, repeats: int) -> list[float]:
    """Seconds per call, after two warm-up calls."""
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


class _DispatchTimer:
    """Time spent inside ATen calls (on fake tensors: their shape propagation), and how many were made."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        timer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                start = time.perf_counter()
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    timer.seconds += time.perf_counter() - start
                    timer.calls += 1

        self.mode, self.seconds, self.calls = Mode(), 0.0, 0


def _figures(call, repeats: int, batch: int, trace, batches: int = 1) -> dict:
    """Host time per image and per batch (the median call; ``batches`` batches a call); the part of it spent
    outside ATen calls (Python: fasteval's, the kernel wrapper's) and the ATen calls made, whose cost on fake
    tensors (shape propagation in Python) is far above a real device's dispatch; the launches a batch; the
    host syncs a call made."""
    from sync_trace import LaunchCounter, stub_triton_launches

    times = [t / batches for t in _timed(call, repeats)]
    with stub_triton_launches() as triton, LaunchCounter() as counter, trace.recording() as syncs:
        call()
    split = []
    for _ in range(max(3, repeats // 4)):
        timer = _DispatchTimer()
        start = time.perf_counter()
        with timer.mode:
            call()
        split.append((time.perf_counter() - start - timer.seconds) / batches)
    median = statistics.median(times)
    aten = {name: count / batches for name, count in sorted(counter.ops.items())}
    return {"host_us_per_image": round(median / batch * 1e6, 2), "host_ms_per_batch": round(median * 1e3, 3),
            "host_ms_per_batch_min": round(min(times) * 1e3, 3),
            "outside_aten_us_per_image": round(statistics.median(split) / batch * 1e6, 2),
            "aten_calls_per_batch": timer.calls / batches,
            "launches": {"total": sum(aten.values()) + len(triton) / batches, "triton_stubbed": len(triton) / batches,
                         "aten": aten},
            "host_syncs": [str(event) for event in syncs]}


def _torchvision(sizes: list[tuple[int, int]], repeats: int, trace) -> dict:
    import torch

    from fasteval.data.loader_torch import GpuDecodeLoader
    from fasteval.data.preprocess import PRESETS
    from fasteval.data.samples import SampleList
    from sync_trace import stub_triton_launches

    cuda = torch.device("cuda")
    samples = SampleList("/fake", ["a"], [(f"/fake/a/{i}.jpg", 0) for i in range(len(sizes))])
    loader = GpuDecodeLoader(samples, PRESETS["imagenet"], len(sizes), 0, cuda)
    images = [torch.empty((3, h, w), dtype=torch.uint8, device=cuda) for h, w in sizes]
    labels = torch.zeros(len(sizes), dtype=torch.int64, device=cuda)  # as the decoding thread hands them over

    def assemble():
        return loader.assemble(images, labels)

    with stub_triton_launches():
        fused = _figures(assemble, repeats, len(sizes), trace)
    fused["geometry"] = "resize_crop_normalize: one launch a batch (Triton launch stubbed)"
    fused["measured"] = ("GpuDecodeLoader.assemble on a batch as the decoding thread hands it over (labels on the "
                         "device); not in it: the handoff's one wait_event a batch, the decoding thread's own work")
    loader.per_size = "measured for comparison"
    fused["per_size_path"] = _figures(assemble, max(3, repeats // 4), len(sizes), trace)
    fused["per_size_path"]["geometry"] = "one torchvision resize per distinct size, then Normalizer"
    return fused


def _dali(batch: int, repeats: int, trace) -> dict:
    import torch

    from fasteval.data.loader_dali import DaliLoader
    from fasteval.data.samples import SampleList

    class Held:  # decoder_output.hold()'s handle, without touching stderr
        held = True

        def release(self):
            pass

    cuda = torch.device("cuda")
    per_pass = 10  # batches a pass: the pass's own setup is shared by them, as in a run
    out = {"images": torch.empty((batch, 224, 224, 3), device=cuda),
           "labels": torch.zeros((batch, 1), dtype=torch.int32, device=cuda)}

    class Iterator:  # DALIGenericIterator's outputs: a list of one dict per pipeline, per_pass batches a pass
        def __iter__(self):
            return iter([[out]] * per_pass)

        def reset(self):
            pass

    loader = DaliLoader.__new__(DaliLoader)
    loader.samples = SampleList("/fake", ["a"], [(f"/fake/a/{i}.jpg", 0) for i in range(batch * per_pass)])
    loader.batch_size, loader._mid_epoch, loader._ended, loader._quiet, loader._pipe = batch, False, False, Held(), None
    loader._iter = Iterator()

    def one_pass():
        for _ in loader:
            pass

    figures = _figures(one_pass, repeats, batch, trace, batches=per_pass)
    figures["measured"] = ("fasteval's work on a batch DALI yields (channels-last view, labels to int64) and the "
                           "pass's own setup; DALI's pipeline and its plugin's copies are not measured")
    return figures


def _view_cost(device: str, repeats: int = 2000) -> float:
    """Microseconds of one ``reshape(-1)`` (a view: no device work) of a 3x400x300 uint8 image: what one
    ATen call costs the host on this machine, on real CPU tensors and on fake CUDA ones."""
    import torch

    image = torch.empty((3, 400, 300), dtype=torch.uint8, device=device)
    return statistics.median(_timed(lambda: [image.reshape(-1) for _ in range(100)], max(3, repeats // 100))) * 1e4


def child(batch: int, repeats: int) -> dict:
    """The figures, in a process whose torch sees one (fake) H100."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_gpu
    import torch
    from sync_trace import fake_cuda

    fake_gpu.install((9, 0))
    # The kernel wrapper's table of data pointers: a fake tensor's is meaningless; the launch using it is stubbed.
    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
    sizes = _sizes(batch)
    real_view = _view_cost("cpu")
    # Outside inference mode (the fast loop runs in it; the code path is the same): in it, composite operations
    # (reshape) reach fake tensors whole and bypass their dispatch cache, about three times slower a call.
    with fake_cuda() as trace:
        fake_view = _view_cost("cuda")
        loaders = {"torchvision": _torchvision(sizes, repeats, trace), "dali": _dali(batch, repeats, trace)}
    return {"batch": batch, "distinct_sizes": len(set(sizes)), "repeats": repeats,
            "device": "fake CUDA tensors (FakeTensorMode, a fake H100): host time only, nothing ran on a device",
            "host": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores",
            "torch": torch.__version__,
            "aten_call_us": {"real_cpu_tensor_view": round(real_view, 2), "fake_cuda_tensor_view": round(fake_view, 2)},
            "loaders": loaders}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the figures here")
    parser.add_argument("--batch", type=int, default=256, help="images a batch (each of a distinct size)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (the median is reported)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        json.dump(child(args.batch, args.repeats), sys.stdout)
        return 0
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--json", args.json,
                           "--batch", str(args.batch), "--repeats", str(args.repeats)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        return done.returncode
    figures = json.loads(done.stdout)
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    for name, entry in figures["loaders"].items():
        old = entry.get("per_size_path")
        print(f"{name}: {entry['host_us_per_image']} us/image, {entry['launches']['total']} launch(es) a batch"
              + (f" (per-size path: {old['host_us_per_image']} us/image, {old['launches']['total']} launches)"
                 if old else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
