"""The fast path's model: channels-last, mixed precision, ``torch.compile``d for one static shape where it pays."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

import torch
from torch import nn

from fasteval.model import cache_damage
from fasteval.model.compile_cache import (Profile, compile_dir, config_key, decide, leaf_modules, load_profile,
                                          profile_dir, resolve_compile_mode, save_profile, use_compile_cache)
from fasteval.choices import PRECISIONS
from fasteval.devices import synchronize
from fasteval.errors import FastevalError

# torch.compile on a CUDA build without a GPU warns that no CUDA runtime exists: noise here.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix work at least as fast as fp32 (2x here, ../shared/FACTS.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Compute capability 8.0+ (Ampere on): bf16 tensor cores. ``torch.cuda.is_bf16_supported()``
    also counts emulation, so it says yes on Turing and Volta, where bf16 is emulated and slow."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs with native bf16 (else fp16) and on CPUs with fast bf16, else fp32."""
    if requested not in PRECISIONS:
        raise FastevalError(f"unknown --precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise FastevalError("--precision fp16 is not supported on the CPU; use bf16 or fp32")
        return requested
    if device.type == "cuda":
        return "bf16" if cuda_has_native_bf16(device) else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def precision_reason(requested: str, device: torch.device, resolved: str) -> str:
    """Why ``resolve_precision`` chose ``resolved``."""
    if requested != "auto":
        return f"--precision {requested}"
    if device.type == "cuda":
        return ("auto: the GPU computes bf16 natively (compute capability 8.0+)" if resolved == "bf16" else
                "auto: the GPU has no native bf16 (compute capability below 8.0): fp16")
    return ("auto: the CPU computes bf16 fast (AVX-512 BF16 or AMX)" if resolved == "bf16" else
            "auto: the CPU has no fast bf16 (no AVX-512 BF16 or AMX): fp32")


CUDNN_BENCHMARK_NOTE = ("cudnn.benchmark on for the fast model's calls (one static shape: cuDNN times its convolution "
                        "algorithms once, at warm-up; the reference's calls keep the user's setting)")


def cudnn_benchmark(device: torch.device) -> bool:
    """Whether the fast model's calls run with ``torch.backends.cudnn.benchmark``: on CUDA, where every batch has
    the one static shape, so cuDNN's search runs once (at warm-up) and every later batch gets its pick."""
    return device.type == "cuda"


@contextlib.contextmanager
def _benchmarked():
    """``cudnn.benchmark`` on within, the caller's setting restored after (the reference's calls never see it)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def plan_compile(model: nn.Module, device: torch.device, precision: str, requested: bool | str, *,
                 num_samples: int, example_shape: tuple[int, ...],
                 example_dtype: torch.dtype) -> tuple[bool | str, str, dict]:
    """Whether the fast model is compiled, why, and its compile profile's key, decided before any work from
    the compile cache's profile (``--compile auto``: fasteval/model/compile_cache.py's rule). Where the
    configuration's eager batch time was never measured the value is ``"measure"``: ``FastModel.warm_up``
    times one eager batch and applies the same rule. The key is the caller's model's (not the fast copy's)."""
    mode = resolve_compile_mode(requested)
    example = torch.empty(example_shape, dtype=example_dtype, device="meta")
    example = example.contiguous(memory_format=torch.channels_last)
    key = config_key(model, device, precision, example)
    if mode == "off":
        return False, "--compile off: eager (channels-last + autocast)", key
    if mode == "on":
        return True, "--compile on", key
    profile = load_profile(profile_dir(device), key)
    batches = -(-num_samples // example_shape[0])
    if profile.eager_batch_seconds is None:
        cache = "a cache hit" if profile.artifacts else "a cold cache"
        return ("measure", f"auto: this configuration's eager batch time is not measured yet: the warm-up times one "
                           f"eager batch and compiles where {batches} batch(es) x that time x (1 - 1/speedup) "
                           f"exceeds the cost of compiling ({cache})", key)
    decision = decide(profile, device.type, num_samples, example_shape[0], profile.eager_batch_seconds,
                      leaf_modules(model))
    return decision.compile, decision.reason, key


# Inductor rounds each intermediate where eager autocast rounds it (to bf16/fp16 after every op, not only
# where a fused kernel stores): on the CPU the compiled logits then equal eager's bit for bit
# (tests/test_fast.py), so compiling never moves a result. Without it, Inductor's fused kernels keep more
# bits here and fewer there, and ResNet-18's bf16 logits drifted 2.5x further from fp32 than eager's
# (0.63 against 0.25 at most on random inputs; on the 156 photos, 73 samples rechecked against 35 and a loss
# 0.07 off): a larger tau, more recheck. Its cost: about 4 % of the compiled model's time here.
COMPILE_OPTIONS = {"emulate_precision_casts": True}


class FastModel:
    """A model moved once, channels-last, run under autocast (on CUDA with ``cudnn.benchmark`` within its calls),
    and ``torch.compile``d for one static shape where that pays. ``compile``: ``on``/True, ``off``/False or ``auto``
    (decided in ``warm_up`` from the number of samples, the measured eager batch time and the compile cache:
    fasteval/model/compile_cache.py). A plan (``plan_compile``) passes its decision as on/off with its ``reason``
    and profile ``key`` (and, where ``--compile auto`` chose eager from a measured eager time, no eager warm-up
    call: ``eager_call``), or ``auto`` where the decision waits for the warm-up's measurement."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str, compile: bool | str,
                 num_samples: int | None = None, reason: str | None = None, key: dict | None = None,
                 eager_call: bool = True) -> None:
        self.device, self.precision = device, precision
        self.mode = resolve_compile_mode(compile)
        self.num_samples = num_samples
        self.key, self.planned_reason = key, reason
        self.eager_call = eager_call  # an eager model's warm-up call (none where --compile auto chose eager)
        self.model = model.eval().to(device, memory_format=torch.channels_last)  # one conversion, one copy
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.compiled = False
        self.cudnn_benchmark = cudnn_benchmark(device)
        off = reason or "--compile off: eager (channels-last + autocast)"
        self.compile_reason = off if self.mode == "off" else ""
        self._forward = self._eager

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def _eager(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model(images)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.cudnn_benchmark:
            return self._forward(images)
        with _benchmarked():
            return self._forward(images)

    def _timed(self, example: torch.Tensor) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self(example)
        synchronize(self.device)
        return time.perf_counter() - start

    def warm_up(self, example: torch.Tensor, calls: int = 2) -> float:
        """Decide (``auto``), compile and run on a batch of the static shape; seconds spent. Eager runs
        one call (``auto``: two on a GPU where it first measures this configuration's eager batch time; once
        known, none on the CPU and one on a GPU, where cuDNN's algorithm search and lazy setup would otherwise
        land in the timed pass); compiled runs ``calls``. Falls back to eager with a one-line warning where
        compiling fails (no C++ compiler, say)."""
        start = time.perf_counter()
        with torch.inference_mode():
            if self.mode == "on":
                self._compile(example, calls, self.planned_reason or "--compile on", self.key)
            elif self.mode == "auto":
                self._auto(example, calls)
            elif self.eager_call or self.device.type == "cuda":  # on a GPU: cuDNN's search and lazy setup here
                self._timed(example)
        return time.perf_counter() - start

    def _auto(self, example: torch.Tensor, calls: int) -> None:
        key = self.key or config_key(self.model, self.device, self.precision, example)
        folder = profile_dir(self.device)
        profile = load_profile(folder, key)
        if self.num_samples is None:
            if profile.artifacts:
                self._compile(example, calls, "auto: number of samples unknown, compiled on a cache hit",
                              key, profile)
            else:
                self._timed(example)
                self.compile_reason = "auto: number of samples unknown, eager on a cold cache"
            return
        measured = profile.eager_batch_seconds is None
        if measured:
            # On a GPU, the faster of two eager calls: the first carries the process's one-time setup (cuDNN
            # and cuBLAS handles: a second or so against milliseconds a batch), which would make compiling look
            # worth tens of seconds. On the CPU the first call is within a third of the next (ResNet-18,
            # MobileNetV3 here) and a second would cost a whole batch (0.24 s here) of every first run: the
            # slight overestimate favours compiling. Measured once per configuration, then kept.
            first = self._timed(example)
            profile.eager_batch_seconds = min(first, self._timed(example)) if self.device.type == "cuda" else first
            save_profile(folder, profile)
        decision = decide(profile, self.device.type, self.num_samples, example.shape[0],
                          profile.eager_batch_seconds, leaf_modules(self.model))
        if decision.compile:
            self._compile(example, calls, decision.reason, key, profile)
        else:
            self.compile_reason = decision.reason
            if self.device.type == "cuda" and profile.eager_batch_seconds is not None and not measured:
                self._timed(example)  # cuDNN's algorithm search and lazy setup out of the timed pass

    def _compile(self, example: torch.Tensor, calls: int, reason: str, key: dict | None = None,
                 profile: Profile | None = None) -> None:
        """Compile into fasteval's cache, run ``calls`` times, record the costs in the profile. A damaged cache
        (fasteval/model/cache_damage.py) costs one line: entries torch cannot load are removed; a compiled
        file that fails the compile clears the cache's artifacts (fasteval's own folder, never a user's
        ``TORCHINDUCTOR_CACHE_DIR``) and the model is compiled once more, afresh."""
        from torch._dynamo.utils import counters

        folder = use_compile_cache(self.device)
        if key is None:
            key = config_key(self.model, self.device, self.precision, example)
        if profile is None:
            profile = load_profile(profile_dir(self.device), key)
        hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
        cleared = None
        try:
            first, batch, removed = self._compiled_calls(example, calls, folder)
        except Exception as exc:
            if folder != compile_dir(self.device) or not cache_damage.implicates(exc, folder):
                self._fall_back(example, reason, exc)
                return
            cleared = cache_damage.reason(exc, folder)
            cache_damage.clear(folder)
            self._reset_torch_caches()
            hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
            try:
                first, batch, removed = self._compiled_calls(example, calls, folder)
            except Exception as again:
                self._fall_back(example, reason, again, f" (also after clearing the damaged compile cache {folder})")
                return
        if cleared is not None:
            print(f"fasteval: warning: the compile cache {folder} was damaged ({cleared[:160]}); cleared it and "
                  f"compiled afresh", file=sys.stderr)
        elif removed:
            print(f"fasteval: warning: removed {removed} damaged file(s) from the compile cache {folder} that torch "
                  f"could not load (the results are unaffected)", file=sys.stderr)
        hit = counters["inductor"]["fxgraph_cache_hit"] > hits
        miss = counters["inductor"]["fxgraph_cache_miss"] > misses
        seconds = max(0.0, first - (batch or 0.0))
        profile.artifacts = True
        if hit:
            profile.hit_compile_seconds = seconds
            outcome = f"loaded from the compile cache in {seconds:.1f} s"
        elif miss:
            profile.cold_compile_seconds = seconds
            outcome = f"cache miss: compiled in {seconds:.1f} s, cached for the next run"
        else:  # this process had compiled the same graph already
            outcome = f"reused this process's compiled graph ({seconds:.1f} s)"
        if cleared is not None:
            outcome += ", after clearing a damaged compile cache"
        if batch is not None:  # the best seen: other load on the machine only ever adds time
            profile.compiled_batch_seconds = min(batch, profile.compiled_batch_seconds or batch)
        save_profile(profile_dir(self.device), profile)
        self.compiled = True
        self.compile_reason = f"{reason}; {outcome}"

    def _compiled_calls(self, example: torch.Tensor, calls: int, folder: str) -> tuple[float, float | None, int]:
        """Compile (on the first call) and run ``calls`` times: the first call's seconds, the best other's, and
        how many cache entries torch could not load meanwhile (removed; its warnings about them kept off
        stderr; removed too where the compile fails)."""
        self._forward = torch.compile(self._eager, dynamic=False, options=COMPILE_OPTIONS)
        with cache_damage.watch(folder) as unloadable:
            try:
                first = self._timed(example)
                batch = min((self._timed(example) for _ in range(calls - 1)), default=None)
            finally:
                removed = cache_damage.remove(unloadable.paths, folder)
        return first, batch, removed

    @staticmethod
    def _reset_torch_caches() -> None:
        """Forget this process's compiled graphs and loaded kernels: the next compile reads the cache afresh."""
        from torch._inductor.utils import clear_caches

        torch._dynamo.reset()
        clear_caches()

    def _fall_back(self, example: torch.Tensor, reason: str, exc: BaseException, after: str = "") -> None:
        """Eager, with one warning line saying why compiling failed."""
        why = cache_damage.reason(exc)
        print(f"fasteval: warning: torch.compile failed, running eager: {why[:200]}{after}", file=sys.stderr)
        self._forward = self._eager
        self._timed(example)
        self.compile_reason = f"{reason}; torch.compile failed, eager: {why[:120]}"
