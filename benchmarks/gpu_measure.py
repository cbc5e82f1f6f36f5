"""What decides the fast path's speed on a GPU, measured in one run: ``benchmarks/gpu_check.sh``'s ``measure`` step.

    python benchmarks/gpu_measure.py OUT_DIR [--budget SECONDS] [--data DIR] [--workers N] [--cpu-dry-run]

Writes ``OUT_DIR/measure.json`` after every step (atomically: a run cut short keeps what it measured) and ends
with a short summary, printed and in the JSON (``summary``, ``summary_lines``). Steps, in order (the targets
first, then what explains them):

  start          import and CUDA start; the GPU; nvJPEG's hardware engines (torchvision's bundled libnvjpeg)
  data           ImageNet-like JPEGs (``fasteval synth``: the base set, 2,000), hard-linked up to 10,000 in the
                 same classes (the large set)
  whole_command  ``fasteval eval`` against ``fasteval eval --reference`` on the large set: wall seconds, the
                 ratio, and whether the counts are equal (the fast command cold, then warm where time is left)
  decode         the decode ceiling: torchvision's batched ``decode_jpeg`` on the device, and DALI's decoder
                 (where installed) with the plan's settings (fasteval/data/dali_settings.py: threads, prefetch,
                 hardware share, size hints, PIL's chroma upsampling), at 3 batch sizes; and at batch 256
                 with ``hw_decoder_load`` 0.65 (DALI's default), 0.9 and 1.0
  loaders        each loader (torchvision-gpu, dali with the plan's settings, pil): construction, a cold pass
                 and a warm one
  overlap        per fast-path loader: the loader alone, the model alone, and both (the fast pass), as the
                 evaluator builds them (``FastEvaluator``, compile off, exact off)
  model          the fast model's precision: eager channels-last bf16 and fp32, cudnn.benchmark off and on
  recheck_small  the exact recheck's share of the run on the base set (``FastEvaluator``, exact on)
  recheck_large  the same on the large set

Every step has a budget: one that would not fit in what is left of ``--budget`` is skipped, one that runs past
its own is cut (the alarm), and one that fails records its error; each is said so in its entry, and the run goes
on. ``--cpu-dry-run``: tiny sizes on the CPU, so that every code path runs without a GPU (the CUDA-only steps
and loaders are recorded as skipped). It uses public entry points only: the loaders by ``make_loader`` and
``TorchvisionLoader``, the fast path by ``FastEvaluator``, the whole command by the CLI.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

# The targets of issue 27 for one H100, on 10,000 ImageNet-like JPEGs with exact counts.
TARGET_IMAGES_PER_SEC = 10_000
TARGET_RATIO = 0.3


@dataclass
class Config:
    """The sizes of one run. ``cpu_dry_run`` shrinks them and puts everything on the CPU."""

    device: str = "cuda"
    classes: int = 50
    distinct: int = 2000  # synthesized JPEGs (the base set)
    images: int = 10_000  # the large set: the base set's files hard-linked up to this count
    batch_size: int = 256
    decode_batches: tuple = (64, 256, 1024)
    workers: int = 16
    model_reps: int = 20
    resize: int | None = None  # the imagenet preset's 256 and 224 where None
    crop: int | None = None
    cpu_dry_run: bool = False

    @classmethod
    def dry_run(cls, workers: int) -> Config:
        return cls(device="cpu", classes=3, distinct=24, images=48, batch_size=8, decode_batches=(2, 4, 8),
                   workers=workers, model_reps=2, resize=40, crop=32, cpu_dry_run=True)


class Skip(Exception):
    """A step (or part of one) that cannot run here; its message says why."""


class Overrun(BaseException):
    """A step ran past its budget. Not an ``Exception``: the handlers that record a part's error and go on
    (here and in fasteval) must not swallow it."""


@contextmanager
def alarm(seconds: float):
    """Raise ``Overrun`` in the main thread after ``seconds`` (a blocking C call returns first)."""
    def fire(signum, frame):
        raise Overrun(f"ran past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:400]


class Recorder:
    """The run's JSON, rewritten after every step; each step's entry is filled in place as it measures."""

    def __init__(self, path: str, budget: float, config: Config) -> None:
        self.path, self.budget, self.start = path, budget, time.perf_counter()
        self.data: dict = {"config": asdict(config), "budget_s": budget, "steps": {}}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def step(self, name: str, fn: Callable[[dict], None], needs: float, budget: float) -> dict:
        """Run ``fn(entry)`` if ``needs`` seconds are left, cut after ``budget`` (or what is left)."""
        entry: dict = {"status": "running"}
        self.data["steps"][name] = entry
        left = self.left()
        if left < needs:
            entry.update(status="skipped", note=f"needs about {needs:.0f} s; {left:.0f} s left of the budget")
        else:
            began = time.perf_counter()
            try:
                with alarm(min(budget, left)):
                    fn(entry)
                entry["status"] = "ok"
            except Skip as exc:
                entry.update(status="skipped", note=str(exc))
            except Overrun as exc:
                entry.update(status="cut", note=f"{exc}: what it measured before is kept")
            except Exception as exc:  # noqa: BLE001 - record and go on: one failed step must not lose the others
                entry.update(status="error", error=error_line(exc))
            entry["seconds"] = round(time.perf_counter() - began, 2)
        self.save()
        print(f"[measure] {name}: {entry['status']} {json.dumps(entry, default=str)[:300]}", flush=True)
        return entry


class Measure:
    """The steps, sharing the data, the device and the imports."""

    def __init__(self, config: Config, data: str, logs: str, rec: Recorder) -> None:
        self.cfg, self.data, self.logs, self.rec = config, data, logs, rec
        self.base = os.path.join(data, "base")
        self.large = os.path.join(data, "large")

    # -- helpers ------------------------------------------------------------------------------------------------

    def cuda(self) -> bool:
        return self.cfg.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda():
            self.torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda():
            self.torch.cuda.empty_cache()

    def samples(self, root: str):
        from fasteval.data.samples import discover

        return discover(root, quiet=True)

    def resnet(self, num_classes: int):
        self.torch.manual_seed(0)
        return self.torchvision.models.resnet18(num_classes=num_classes)

    def spec(self):
        from fasteval.data.preprocess import get_spec

        return get_spec("imagenet", resize=self.cfg.resize, crop=self.cfg.crop)

    def timed_pass(self, loader) -> tuple[int, float]:
        """One pass over ``loader``: (images, seconds), the device's work included."""
        self.sync()
        began, n = time.perf_counter(), 0
        for batch in loader:
            n += batch.real
        self.sync()
        return n, time.perf_counter() - began

    # -- steps --------------------------------------------------------------------------------------------------

    def start(self, e: dict) -> None:
        t = time.perf_counter()
        import torch

        e["import_torch_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        import torchvision

        e["import_torchvision_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        import fasteval.evaluation.fast  # noqa: F401 - the fast path's imports, as a command pays them

        e["import_fasteval_s"] = round(time.perf_counter() - t, 2)
        self.torch, self.torchvision = torch, torchvision
        e["versions"] = {"python": sys.version.split()[0], "torch": torch.__version__,
                         "torchvision": torchvision.__version__}
        from fasteval.data.loader_dali import dali_available

        self.dali = dali_available()
        e["dali"] = self.dali
        if self.dali:
            import nvidia.dali

            e["versions"]["dali"] = nvidia.dali.__version__
            e["dali_from"] = os.path.dirname(nvidia.dali.__file__)
        e["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if not self.cuda():
            e["cuda"] = "not used (a CPU dry run)"
            return
        t = time.perf_counter()
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        e["cuda_init_s"] = round(time.perf_counter() - t, 2)
        props = torch.cuda.get_device_properties(0)
        e["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                    "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1)}
        try:
            e["nvjpeg_hardware"] = self.nvjpeg_hardware()
        except Exception as exc:  # noqa: BLE001
            e["nvjpeg_hardware"] = {"error": error_line(exc)}

    def nvjpeg_hardware(self) -> dict:
        """nvJPEG's hardware decoder (engines, cores per engine) as torchvision's bundled library reports it."""
        import ctypes

        libs = glob.glob(os.path.join(os.path.dirname(self.torchvision.__file__), "..", "torchvision.libs",
                                      "libnvjpeg*"))
        if not libs:
            return {"found": False, "note": "no libnvjpeg in torchvision.libs"}
        lib = ctypes.CDLL(libs[0])
        handle = ctypes.c_void_p()
        status = lib.nvjpegCreateEx(3, None, None, 0, ctypes.byref(handle))  # 3: NVJPEG_BACKEND_HARDWARE
        if status != 0:
            return {"hardware_backend": False, "status": status}
        engines, cores = ctypes.c_uint(), ctypes.c_uint()
        status = lib.nvjpegGetHardwareDecoderInfo(handle, ctypes.byref(engines), ctypes.byref(cores))
        return {"hardware_backend": True, "status": status, "engines": engines.value, "cores_per_engine": cores.value}

    def make_data(self, e: dict) -> None:
        cfg = self.cfg
        per_class = max(1, cfg.distinct // cfg.classes)
        if not glob.glob(os.path.join(self.base, "*", "*.jpg")):
            t = time.perf_counter()
            run = subprocess.run([sys.executable, "-m", "fasteval", "synth", self.base, "--classes", str(cfg.classes),
                                  "--per-class", str(per_class), "--overwrite"],
                                 cwd=self.data, capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"fasteval synth: {(run.stderr or run.stdout).strip()[-300:]}")
            e["synth_s"] = round(time.perf_counter() - t, 2)
        files = sorted(glob.glob(os.path.join(self.base, "*", "*.jpg")))
        e["base_images"] = len(files)
        e["large_images"] = link_up(files, self.base, self.large, cfg.images)
        sizes = [os.path.getsize(f) for f in files]
        e["mean_file_kb"] = round(sum(sizes) / len(sizes) / 1024, 1)
        from PIL import Image

        dims = {Image.open(f).size for f in files[:256]}
        e["distinct_sizes_in_256"] = len(dims)
        self.files = files

    def blobs(self) -> list:
        if not hasattr(self, "_blobs"):
            from torchvision.io import read_file

            self._blobs = [read_file(f) for f in self.files]
        return self._blobs

    def decode(self, e: dict) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        blobs, dev = self.blobs(), self.cfg.device
        tv: dict = {}
        e["torchvision"] = tv
        t = time.perf_counter()
        decode_jpeg(blobs[:8], mode=ImageReadMode.RGB, device=dev)
        self.sync()
        tv["first_call_s"] = round(time.perf_counter() - t, 3)
        for b in self.cfg.decode_batches:
            batches = batch_list(blobs, b)
            decode_jpeg(batches[0], mode=ImageReadMode.RGB, device=dev)  # buffers sized for this batch
            n, seconds = self.repeat(lambda batch: decode_jpeg(batch, mode=ImageReadMode.RGB, device=dev), batches)
            tv[f"b{b}_img_per_s"] = round(n / seconds)
            self.rec.save()
        if not self.dali:
            e["dali"] = "not installed"
            return
        dali: dict = {}
        e["dali"] = dali
        mid = self.cfg.decode_batches[len(self.cfg.decode_batches) // 2]
        settings = self.dali_settings(self.samples(self.base))
        dali["settings"] = settings.to_json()
        runs = [(b, None) for b in self.cfg.decode_batches] + [(mid, load) for load in (0.65, 0.9, 1.0)]
        for b, load in runs:
            key = f"b{b}" + (f"_hw_load_{load}" if load is not None else "") + "_img_per_s"
            try:
                dali[key] = self.dali_decode(b, settings, load)
            except Exception as exc:  # noqa: BLE001
                dali[key] = {"error": error_line(exc)}
            self.rec.save()

    def repeat(self, fn, batches: list) -> tuple[int, float]:
        """Run ``fn`` on ``batches`` (cycled) until at least the base set's count of images went through."""
        target = max(len(self.files), 2 * len(batches[0]))
        self.sync()
        began, n, i = time.perf_counter(), 0, 0
        while n < target:
            batch = batches[i % len(batches)]
            fn(batch)
            n += len(batch)
            i += 1
        self.sync()
        return n, time.perf_counter() - began

    def dali_settings(self, samples):
        """The DALI settings the plan chooses for ``samples`` on this machine (bf16, ``--workers``)."""
        from fasteval.data.dali_settings import choose_settings
        from fasteval.data.probe import probe
        from fasteval.procs import usable_cores

        sizes = [p.size for p in map(probe, samples.paths) if p.format == "JPEG" and p.size]
        return choose_settings(self.cuda(), usable_cores(), self.cfg.workers, "bf16", sizes)[0]

    def dali_decode(self, batch: int, settings, hw_load: float | None) -> int:
        """DALI's image decoder alone on in-memory JPEG bytes (``mixed`` on a GPU, ``cpu`` in a dry run), with
        the plan's ``settings`` (``hw_load``: another hardware-decoder share)."""
        import dataclasses

        import numpy as np
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        arrays = [np.frombuffer(open(f, "rb").read(), dtype=np.uint8) for f in self.files]
        batches = batch_list(arrays, batch)
        state = {"i": 0}

        def source():
            state["i"] += 1
            return batches[state["i"] % len(batches)]

        from fasteval.data.loader_dali import decoder_arguments

        gpu = self.cuda()
        if hw_load is not None:
            settings = dataclasses.replace(settings, hw_decoder_load=hw_load)

        @pipeline_def(batch_size=batch, num_threads=settings.threads, device_id=0 if gpu else None,
                      prefetch_queue_depth=settings.prefetch)
        def pipe():
            encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8)
            return fn.decoders.image(encoded, **decoder_arguments(settings, gpu))

        p = pipe()
        p.build()
        p.run()  # the first batches: the decoder's start
        n, seconds = self.repeat(lambda _: p.run(), batches)
        del p
        self.free()
        return round(n / seconds)

    def loaders(self, e: dict) -> None:
        from fasteval.data.loader_torch import TorchvisionLoader
        from fasteval.data.loaders import make_loader

        samples, spec, dev = self.samples(self.base), self.spec(), self.torch.device(self.cfg.device)
        kw = dict(batch_size=self.cfg.batch_size, workers=self.cfg.workers, device=dev)
        makers = {
            "torchvision-gpu": (lambda: make_loader("torchvision", samples, spec, **kw)) if self.cuda() else None,
            "dali": (lambda: make_loader("dali", samples, spec, dali=self.dali_settings(samples), **kw))
            if self.dali else None,
            "pil": lambda: TorchvisionLoader(samples, spec, **kw),
        }
        for kind, make in makers.items():
            if make is None:
                e[kind] = {"skipped": "needs CUDA (a CPU dry run)" if kind == "torchvision-gpu" else
                           "DALI is not installed"}
                continue
            e[kind] = entry = {}
            try:
                with self.torch.inference_mode():
                    t = time.perf_counter()
                    loader = make()
                    entry["name"] = getattr(loader, "name", type(loader).__name__)
                    entry["construct_s"] = round(time.perf_counter() - t, 2)
                    for name in ("cold", "warm"):
                        n, seconds = self.timed_pass(loader)
                        entry[f"{name}_img_per_s"] = round(n / seconds)
                        entry[f"{name}_s"] = round(seconds, 2)
                        self.rec.save()
                del loader
            except Exception as exc:  # noqa: BLE001
                entry["error"] = error_line(exc)
            self.free()

    def overlap(self, e: dict) -> None:
        from fasteval.evaluation.fast import FastEvaluator
        from fasteval.evaluation.plan import FastOptions

        samples, spec, dev = self.samples(self.base), self.spec(), self.torch.device(self.cfg.device)
        kinds = ["torchvision"] + (["dali"] if self.dali else [])
        for kind in kinds:
            e[kind] = entry = {}
            try:
                opts = FastOptions(loader=kind, batch_size=self.cfg.batch_size, workers=self.cfg.workers,
                                   compile="off", exact="off")
                t = time.perf_counter()
                ev = FastEvaluator(samples, self.resnet(samples.num_classes), spec, dev, opts)
                entry.update(setup_s=round(time.perf_counter() - t, 2), loader=getattr(ev.loader, "name", None),
                             precision=ev.executed_plan.precision.value)
                n = len(samples)
                with self.torch.inference_mode():
                    _, cold = self.timed_pass(ev.loader)
                    _, alone = self.timed_pass(ev.loader)
                    shape = ev.executed_plan.batch_shape.value
                    h, w = ev.executed_plan.input_hw
                    x = self.torch.zeros(shape, 3, h, w, device=dev).contiguous(memory_format=self.torch.channels_last)
                    batches = math.ceil(n / shape)
                    self.sync()
                    t = time.perf_counter()
                    for _ in range(batches):
                        ev.model(x)
                    self.sync()
                    model = time.perf_counter() - t
                both = ev.run(progress=False).seconds
                entry.update(images=n, loader_cold_s=round(cold, 3), loader_alone_s=round(alone, 3),
                             model_alone_s=round(model, 3), both_s=round(both, 3), sum_s=round(alone + model, 3),
                             loader_alone_img_per_s=round(n / alone), model_alone_img_per_s=round(n / model),
                             both_img_per_s=round(n / both),
                             # 1: the shorter stage hides wholly behind the longer; 0: they run one after the other
                             overlap=round((alone + model - both) / min(alone, model), 2))
                del ev
            except Exception as exc:  # noqa: BLE001
                entry["error"] = error_line(exc)
            self.free()
            self.rec.save()
        if self.cuda():
            try:
                e["raw_decode_thread"] = self.raw_overlap()
            except Exception as exc:  # noqa: BLE001
                e["raw_decode_thread"] = {"error": error_line(exc)}

    def raw_overlap(self) -> dict:
        """torchvision's decode on a thread and stream of its own beside the model on the main thread: what
        overlapping the two can give at best, beside what the loader gives."""
        from torchvision.io import ImageReadMode, decode_jpeg

        torch, dev = self.torch, self.torch.device("cuda")
        m = self.fast_model(self.resnet(1000))
        x = torch.randn(self.cfg.batch_size, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
        batches = batch_list(self.blobs(), self.cfg.batch_size)
        reps = len(batches)
        stream = torch.cuda.Stream()

        def decode_loop():
            with torch.cuda.stream(stream):
                for b in batches:
                    decode_jpeg(b, mode=ImageReadMode.RGB, device=dev)
            stream.synchronize()

        def model_loop():
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
                for _ in range(reps):
                    m(x)
            torch.cuda.synchronize()

        decode_loop()
        model_loop()  # warm
        t = time.perf_counter(); decode_loop(); dec = time.perf_counter() - t  # noqa: E702
        t = time.perf_counter(); model_loop(); mod = time.perf_counter() - t  # noqa: E702
        th = threading.Thread(target=decode_loop)
        t = time.perf_counter()
        th.start()
        model_loop()
        th.join()
        both = time.perf_counter() - t
        return {"batches": reps, "decode_alone_s": round(dec, 3), "model_alone_s": round(mod, 3),
                "together_s": round(both, 3), "sum_s": round(dec + mod, 3)}

    def fast_model(self, m):
        from fasteval.evaluation.fast import keep_head_fp32

        keep_head_fp32(m)
        return m.eval().to(self.cfg.device, memory_format=self.torch.channels_last)

    def model(self, e: dict) -> None:
        torch, dev = self.torch, self.cfg.device
        m = self.fast_model(self.resnet(1000))
        b, side = self.cfg.batch_size, self.cfg.crop or 224
        x = torch.randn(b, 3, side, side, device=dev).contiguous(memory_format=torch.channels_last)
        e.update(batch=b, input=f"{side}x{side}")
        settings = (False, True) if self.cuda() else (None,)
        if not self.cuda():
            e["cudnn_benchmark"] = "skipped: needs CUDA (a CPU dry run)"
        before = torch.backends.cudnn.benchmark
        try:
            with torch.inference_mode():
                for bench in settings:
                    if bench is not None:
                        torch.backends.cudnn.benchmark = bench
                    for prec in ("bf16", "fp32"):
                        def run():
                            with torch.autocast(x.device.type, torch.bfloat16, enabled=prec == "bf16"):
                                m(x)

                        name = f"eager_{prec}" + ("" if bench is None else f"_cudnn_benchmark_{bench}")
                        self.sync()
                        t = time.perf_counter()
                        run()  # the first call apart: cudnn.benchmark's algorithm search is paid here
                        self.sync()
                        e[f"{name}_first_call_s"] = round(time.perf_counter() - t, 4)
                        run()
                        self.sync()
                        t = time.perf_counter()
                        for _ in range(self.cfg.model_reps):
                            run()
                        self.sync()
                        e[f"{name}_img_per_s"] = round(b * self.cfg.model_reps / (time.perf_counter() - t))
                        self.rec.save()
        finally:
            torch.backends.cudnn.benchmark = before
        e["fp32_matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
        e["fp32_conv_tf32"] = torch.backends.cudnn.allow_tf32
        del m
        self.free()

    def recheck(self, e: dict, root: str) -> None:
        from fasteval.evaluation.fast import FastEvaluator
        from fasteval.evaluation.plan import FastOptions

        samples, dev = self.samples(root), self.torch.device(self.cfg.device)
        opts = FastOptions(batch_size=self.cfg.batch_size, workers=self.cfg.workers, compile="off")
        t = time.perf_counter()
        ev = FastEvaluator(samples, self.resnet(samples.num_classes), self.spec(), dev, opts)
        e.update(samples=len(samples), setup_s=round(time.perf_counter() - t, 2),
                 loader=ev.executed_plan.loader.value, precision=ev.executed_plan.precision.value,
                 model="resnet18, random init (seed 0): near-ties are far more common than a trained model's")
        r = ev.run(progress=False)
        ex = dict(r.extra.get("exact") or {})
        recheck_s = float(ex.get("seconds") or 0.0)
        e.update(run_s=round(r.seconds, 3), recheck_s=round(recheck_s, 3), pass_s=round(r.seconds - recheck_s, 3),
                 recheck_share=round(recheck_s / r.seconds, 3) if r.seconds else None,
                 run_img_per_s=round(len(samples) / r.seconds) if r.seconds else None,
                 pass_img_per_s=round(len(samples) / (r.seconds - recheck_s)) if r.seconds > recheck_s else None,
                 exact={k: v for k, v in ex.items() if not isinstance(v, (list, dict))})
        del ev
        self.free()

    def whole_command(self, e: dict) -> None:
        """``fasteval eval`` as a user runs it (the default plan: route, loader, compile, exact), the reference's
        command, then the first once more (warm: Triton's kernels and the route's rates cached) where time is
        left; on the large set. Each process's wall seconds, its JSON, and whether the counts are equal.
        ``fast`` is the warm run where there is one, else the cold one."""
        base = ["eval", self.large, "--batch-size", str(self.cfg.batch_size), "--workers", str(self.cfg.workers),
                "--no-progress"] + ([] if self.cuda() else ["--device", "cpu"])
        for flag in ("resize", "crop"):
            if getattr(self.cfg, flag):
                base += [f"--{flag}", str(getattr(self.cfg, flag))]
        self.free()
        for name, extra in (("fast_cold", []), ("reference", ["--reference"]), ("fast_warm", [])):
            if name == "fast_warm" and self.rec.left() < 60:
                e[name] = {"skipped": f"{self.rec.left():.0f} s left of the budget"}
                continue
            e[name] = self.command(name, base + extra)
            compare(e)  # after each command: a step cut later keeps the ratio it had
            self.rec.save()
        if e["fast"].get("compile") and self.rec.left() > 60:  # the default compiled: what eager gives beside it
            e["fast_compile_off"] = self.command("fast_compile_off", base + ["--compile", "off"])
            compare(e)

    def command(self, name: str, args: list[str]) -> dict:
        path = os.path.join(self.logs, f"whole_{name}.json")
        log = os.path.join(self.logs, f"whole_{name}.txt")
        left = max(1.0, self.rec.left() - 5)
        t = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "fasteval", *args, "--json", path], cwd=self.data,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"error": f"cut after {left:.0f} s (what was left of the budget)"}
            finally:
                if proc.poll() is None:  # the step's alarm: end the command with it
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        wall = time.perf_counter() - t
        out = {"wall_s": round(wall, 2), "exit_code": rc}
        if rc:
            with open(log) as f:
                out["error"] = f.read().strip()[-400:]
            return out
        with open(path) as f:
            r = json.load(f)
        ex = r.get("exact") or {}
        out.update(counts={k: r[k] for k in ("samples", "correct_top1", "correct_top5")}, run_s=round(r["seconds"], 3),
                   images_per_sec=round(r["images_per_sec"]), warmup_s=round(r.get("warmup_seconds") or 0, 2),
                   loader=r.get("loader"), precision=r.get("precision"), compile=r.get("compile"),
                   route=str(r.get("route"))[:300],
                   exact={k: ex.get(k) for k in ("rechecked", "gated", "tau", "seconds", "all_by_reference")})
        return out


def compare(e: dict) -> None:
    """Each fast run of the whole-command step against the reference's, in place: ``counts_equal`` (samples,
    top-1 and top-5 counts) and ``ratio`` (wall seconds over the reference's); ``fast`` is the warm run where
    it has both, else the cold one, and its two figures are the step's."""
    ref = e.get("reference") or {}
    for name in ("fast_cold", "fast_warm", "fast_compile_off"):
        run = e.get(name) or {}
        if "counts" in run and "counts" in ref:
            run.update(counts_equal=run["counts"] == ref["counts"], ratio=round(run["wall_s"] / ref["wall_s"], 3))
    which = "fast_warm" if "ratio" in (e.get("fast_warm") or {}) else "fast_cold"
    e["fast"] = dict(e.get(which) or {}, run=which)
    if "ratio" in e["fast"]:
        e.update(counts_equal=e["fast"]["counts_equal"], ratio=e["fast"]["ratio"])


def batch_list(items: list, size: int) -> list[list]:
    """``items`` in batches of ``size``; where there are fewer, one batch filled by cycling them."""
    if len(items) >= size:
        return [items[i:i + size] for i in range(0, len(items) - size + 1, size)]
    return [[items[i % len(items)] for i in range(size)]]


def link_up(files: list[str], base: str, out: str, count: int) -> int:
    """``count`` files under ``out``, in the base set's class folders: hard links to ``files`` in turn (copies
    where links fail), the k-th round named ``NAME_k.jpg``. Reused when ``out`` already holds ``count``."""
    if len(glob.glob(os.path.join(out, "*", "*.jpg"))) == count:
        return count
    shutil.rmtree(out, ignore_errors=True)
    for i in range(count):
        src = files[i % len(files)]
        rel = os.path.relpath(src, base)
        dst = os.path.join(out, f"{os.path.splitext(rel)[0]}_{i // len(files)}.jpg")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return count


def summarise(steps: dict, cfg: Config) -> tuple[dict, list[str]]:
    """The figures that decide, and one line each for a reader."""
    s: dict = {}
    lines: list[str] = []
    get = lambda name: steps.get(name) or {}  # noqa: E731
    start = get("start")
    if "gpu" in start or "import_torch_s" in start:
        s["start_s"] = {k: start.get(k) for k in ("import_torch_s", "import_torchvision_s", "import_fasteval_s",
                                                   "cuda_init_s")}
        lines.append(f"start: {(start.get('gpu') or {}).get('name', cfg.device)}, import torch "
                     f"{start.get('import_torch_s')} s, CUDA {start.get('cuda_init_s', '-')} s, DALI "
                     f"{start.get('versions', {}).get('dali', 'not installed')}")
    dec = get("decode")
    if isinstance(dec.get("torchvision"), dict):
        s["decode_ceiling"] = {"torchvision": dec["torchvision"], "dali": dec.get("dali")}
        tv = ", ".join(f"{k.split('_')[0]} {v:,}" for k, v in dec["torchvision"].items() if k.endswith("img_per_s"))
        dali = dec.get("dali")
        dali = ", ".join(f"{k.removesuffix('_img_per_s')} {v:,}" for k, v in dali.items() if isinstance(v, int)) \
            if isinstance(dali, dict) else str(dali)
        lines.append(f"decode ceiling, img/s: torchvision {tv}; DALI {dali or '-'}")
    loaders = get("loaders")
    parts = [f"{k} {v['cold_img_per_s']:,}/{v['warm_img_per_s']:,}" for k, v in loaders.items()
             if isinstance(v, dict) and "warm_img_per_s" in v]
    if parts:
        s["loaders"] = {k: v for k, v in loaders.items() if isinstance(v, dict)}
        lines.append("loaders cold/warm, img/s: " + "; ".join(parts))
    ov = get("overlap")
    for kind, v in ov.items():
        if isinstance(v, dict) and "both_img_per_s" in v:
            s.setdefault("overlap", {})[kind] = v
            lines.append(f"fast pass ({v['loader']}): loader alone {v['loader_alone_img_per_s']:,}, model alone "
                         f"{v['model_alone_img_per_s']:,}, both {v['both_img_per_s']:,} img/s (overlap {v['overlap']})")
    prec = get("model")
    if "eager_bf16_img_per_s" in prec or "eager_bf16_cudnn_benchmark_False_img_per_s" in prec:
        s["model"] = {k: v for k, v in prec.items() if k.endswith("img_per_s")}
        lines.append("model, img/s: " + ", ".join(f"{k.removeprefix('eager_').removesuffix('_img_per_s')} {v:,}"
                                                  for k, v in s["model"].items()))
    for name in ("recheck_small", "recheck_large"):
        r = get(name)
        if "recheck_share" in r:
            s[name] = {k: r.get(k) for k in ("samples", "run_s", "pass_s", "recheck_s", "recheck_share",
                                             "run_img_per_s", "pass_img_per_s")}
            s[name]["gated"] = (r.get("exact") or {}).get("gated")
            lines.append(f"recheck at {r['samples']:,}: {100 * r['recheck_share']:.0f}% of the run ({r['recheck_s']} "
                         f"of {r['run_s']} s, {s[name]['gated']} gated); run {r['run_img_per_s']:,} img/s")
    whole = get("whole_command")
    fast, ref = whole.get("fast") or {}, whole.get("reference") or {}
    if "ratio" in whole:
        end_to_end = fast["images_per_sec"]
        s["whole_command"] = {"fast_wall_s": fast["wall_s"], "reference_wall_s": ref["wall_s"], "ratio": whole["ratio"],
                              "counts_equal": whole["counts_equal"], "end_to_end_img_per_s": end_to_end,
                              "reference_img_per_s": ref["images_per_sec"], "samples": fast["counts"]["samples"],
                              "target_ratio": TARGET_RATIO, "target_img_per_s": TARGET_IMAGES_PER_SEC,
                              "ratio_met": whole["ratio"] <= TARGET_RATIO,
                              "img_per_s_met": end_to_end >= TARGET_IMAGES_PER_SEC and whole["counts_equal"]}
        cold = whole.get("fast_cold") or {}
        if fast.get("run") == "fast_warm" and "ratio" in cold:
            s["whole_command"].update(cold_wall_s=cold["wall_s"], cold_ratio=cold["ratio"])
        both = f" (warm; cold: {cold['wall_s']} s = {cold['ratio']}x)" if "cold_ratio" in s["whole_command"] else ""
        lines.append(f"whole command at {fast['counts']['samples']:,}{both}: {fast['wall_s']} s vs the reference's "
                     f"{ref['wall_s']} s = {whole['ratio']}x (target <= {TARGET_RATIO}); counts equal: "
                     f"{'yes' if whole['counts_equal'] else 'NO'}; end to end (the run, recheck included) "
                     f"{end_to_end:,} img/s (target >= {TARGET_IMAGES_PER_SEC:,}); reference {ref['images_per_sec']:,}")
        lines.append(f"  the fast command ran: loader {fast.get('loader')}, {fast.get('precision')}, compile "
                     f"{fast.get('compile')}, recheck {fast['exact'].get('rechecked')} samples in "
                     f"{fast['exact'].get('seconds')} s; route: {fast.get('route', '')[:100]}")
        off = whole.get("fast_compile_off") or {}
        if "ratio" in off:
            keys = ("wall_s", "ratio", "counts_equal", "images_per_sec")
            s["whole_command"]["compile_off"] = {k: off[k] for k in keys}
            lines.append(f"  with --compile off: {off['wall_s']} s = {off['ratio']}x, "
                         f"{off['images_per_sec']:,} img/s")
    elif fast or ref:
        lines.append(f"whole command: fast {fast.get('error') or fast.get('wall_s')}; "
                     f"reference {ref.get('error') or ref.get('wall_s')}")
    not_ok = [f"{n}: {v['status']} ({v.get('note') or v.get('error')})" for n, v in steps.items()
              if v.get("status") not in ("ok", "running")]
    if not_ok:
        s["not_ok"] = not_ok
        lines.extend(f"NOT OK {line}" for line in not_ok)
    return s, lines


# The targets first (the whole command), then what explains them.
STEPS = ("start", "data", "whole_command", "decode", "loaders", "overlap", "model", "recheck_small", "recheck_large")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for measure.json (made if missing)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run (default 300)")
    p.add_argument("--data", help="folder for the generated JPEGs (kept, and reused if present; default: a "
                                  "temporary folder, removed at the end)")
    p.add_argument("--logs", help="folder for the whole commands' output and JSON (default: OUT)")
    p.add_argument("--workers", type=int, help="loader workers (default: min(16, cores))")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU: every code path, no GPU")
    a = p.parse_args(argv)
    unknown = set(a.steps.split(",")) - set(STEPS)
    if unknown:
        p.error(f"--steps: unknown {', '.join(sorted(unknown))}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = a.workers or min(16, cores)
    cfg = Config.dry_run(min(workers, 2)) if a.cpu_dry_run else Config(workers=workers)
    os.makedirs(a.out, exist_ok=True)
    logs = a.logs or a.out
    os.makedirs(logs, exist_ok=True)
    data = a.data or tempfile.mkdtemp(prefix="gpu_measure_")
    os.makedirs(data, exist_ok=True)
    rec = Recorder(os.path.join(a.out, "measure.json"), a.budget, cfg)
    m = Measure(cfg, data, logs, rec)
    wanted = ["start"] + [s for s in STEPS[1:] if s in a.steps.split(",")]
    # (step, needs: the seconds left to start it, budget: the seconds it may take), sized for one H100.
    plan = {"start": (0, 60), "data": (20, 90), "decode": (20, 60), "loaders": (30, 90), "overlap": (30, 90),
            "model": (15, 45), "recheck_small": (20, 60), "recheck_large": (30, 90), "whole_command": (60, 200)}
    fns = {"start": m.start, "data": m.make_data, "decode": m.decode, "loaders": m.loaders, "overlap": m.overlap,
           "model": m.model, "recheck_small": lambda e: m.recheck(e, m.base),
           "recheck_large": lambda e: m.recheck(e, m.large), "whole_command": m.whole_command}
    needs_data = {"decode", "loaders", "overlap", "recheck_small", "recheck_large", "whole_command"}
    try:
        for name in wanted:
            if name in needs_data and rec.data["steps"].get("data", {}).get("status") != "ok":
                rec.data["steps"][name] = {"status": "skipped", "note": "no data (the data step did not run)"}
                continue
            if name != "start" and rec.data["steps"]["start"]["status"] != "ok":
                rec.data["steps"][name] = {"status": "skipped", "note": "the start step failed"}
                continue
            needs, budget = plan[name]
            rec.step(name, fns[name], needs, budget)
    finally:
        rec.data["summary"], rec.data["summary_lines"] = summarise(rec.data["steps"], cfg)
        rec.save()
        if not a.data:
            shutil.rmtree(data, ignore_errors=True)
    print("\n".join(["[measure] summary:"] + [f"  {line}" for line in rec.data["summary_lines"]]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
