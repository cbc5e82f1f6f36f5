"""The plan: every decision of a run, made once, each with its reason, before any work.

``make_plan`` reads the samples' headers and the caches (compile profiles, the route's measured rates)
and returns a frozen ``Plan``: the route (the fast path, or every sample by the reference's code), the
loader, start-up decoding, the batch shape, the precision, compile, the exact recheck and its calibration
samples, the samples the reference's code evaluates and why, the workers and the metrics backend. The
executors (the fast pass, the reference loop, the recheck, a sweep, torchrun shards, ``train``'s
validation) follow it and decide nothing; ``--explain`` prints it without evaluating, and every report
carries the plan as it ran (``Plan.executed``: the compile's outcome, the loader that was built).

One decision is left to the warm-up by rule, not by choice: ``--compile auto`` on a configuration whose
eager batch time was never measured. The plan then says ``measure``: the warm-up times one eager batch
and compiles where ``fasteval/model/compile_cache.py``'s rule says it pays; the executed plan holds the
outcome.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from fasteval.data.dali_settings import DaliOverrides, DaliSettings, choose_settings
from fasteval.data.decoded import choose_placement
from fasteval.data.loaders import batch_shape, batch_shape_reason, needs_pil, resolve_loader
from fasteval.data.prefetch import MAX_SAMPLES, reads_pil_pixels
from fasteval.data.preprocess import PreprocessSpec, check_batchable, image_size
from fasteval.data.probe import FileProbe, check_headers
from fasteval.data.samples import SampleList
from fasteval.errors import FastevalError
from fasteval.evaluation.exact import (CALIBRATION_SAMPLES, GPU_DECODE_CORES, WholeRun, recheck_pool_size,
                                       resolve_exact, resolve_recheck)
from fasteval.evaluation.route import Rates, choose_route, load_rates, rates_key
from fasteval.kernels.fused_metrics import resolve_backend
from fasteval.model.compile_cache import resolve_compile_mode
from fasteval.model.inference import (CUDNN_BENCHMARK_NOTE, DTYPES, cudnn_benchmark, plan_compile, precision_reason,
                                      resolve_precision)
from fasteval.procs import usable_cores


@dataclass(frozen=True)
class FastOptions:
    """What the user asked of the fast path (the command's options); the plan turns them into decisions."""

    loader: str = "auto"
    precision: str = "auto"
    compile: bool | str = True  # True/"on", False/"off", or "auto" (fasteval/model/compile_cache.py)
    batch_size: int = 64
    workers: int = 2
    metrics_backend: str = "auto"
    exact: str = "auto"
    # Let the measured costs send a run the fast path would not pay for through the reference's code
    # whole (fasteval/evaluation/route.py). The command sets it; callers timing the fast loop do not.
    route: bool = False
    # When the exact recheck decodes: "auto" (exact.resolve_recheck), "overlap" (during the pass) or "after".
    # No command option: tests and measurements force a schedule here.
    recheck: str = "auto"
    # Why compile is on where a caller, not the user, turned it on (bench's timed loop): the reason shown.
    compile_asked_by: str = ""
    dali: DaliOverrides = DaliOverrides()  # --dali: the DALI pipeline's tuning, where given


# With --exact on, datasets this small go through the reference's code whole: every sample would be a
# calibration sample, so the fast pass (and its setup: loader, warm-up) would be spent for nothing.
SMALL_DATASET = CALIBRATION_SAMPLES


@dataclass(frozen=True)
class Decision:
    """One decision: what was chosen and why."""

    value: object
    reason: str

    def to_json(self) -> dict:
        return {"value": self.value, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """Every decision of one evaluation (``DECISIONS``, printed and recorded), and what the executors need
    to follow them. Sample indices are this evaluator's; counts named ``total`` are the whole run's."""

    preprocessing: Decision  # the transform, and where it comes from
    route: Decision  # "fast" or "reference"
    loader: Decision
    dali: Decision  # the DALI pipeline's tuning (None where no DALI pipeline runs)
    startup_decoding: Decision
    batch_shape: Decision
    precision: Decision
    compile: Decision  # True, False, or "measure" (see the module's docstring)
    exact: Decision
    calibration: Decision
    by_reference: Decision
    workers: Decision
    metrics_backend: Decision
    # What the executors follow, beside the decisions:
    total: int = 0
    input_hw: tuple[int, int] | None = None
    main: tuple[int, ...] = ()  # the fast pass's samples
    reference_only: tuple[int, ...] = ()  # evaluated by the reference's code in place of the fast pass
    calibration_indices: tuple[int, ...] = ()
    calibration_total: int = 0
    loader_kind: str = "none"  # the batch source's ``kind``
    in_process: bool = False  # PIL's pixels decoded in this process (``PixelLoader``)
    # The PIL worker processes that decode the recheck during the pass, and why (exact.recheck_pool_size); (0, "")
    # where it decodes after the pass
    recheck_pool: tuple[int, str] = (0, "")
    dali_settings: DaliSettings | None = None  # the dali decision, as the DALI loader takes it
    input_dtype: str = "fp32"  # the fast model's input ("fp32" or "fp16"): what its loader writes
    store_placement: tuple[str, str] | None = None  # a decoded store's (device, pinned, host, mapped or redecode;
    # why), from decoded.choose_placement
    decoded_at_start: bool = False  # those pixels decoded since the command started (fasteval/data/prefetch.py)
    reference_batch_size: int = 0  # the reference's batch size (its batch means, the recheck's batches)
    passes: int = 1
    records_rates: bool = False
    compile_key: dict | None = field(default=None, compare=False)
    rates: Rates | None = field(default=None, compare=False)
    relaxes_setup: bool = False  # the measured set-up alone sent the run to the reference's code (route.py)

    @property
    def recheck_overlap(self) -> bool:
        """The recheck decodes during the pass (fasteval/evaluation/recheck_stream.py)."""
        return self.recheck_pool[0] > 0

    @property
    def by_reference_only(self) -> bool:
        """Every sample by the reference's code: no fast pass."""
        return self.route.value == "reference"

    def decisions(self) -> dict[str, Decision]:
        return {name: getattr(self, name) for name in DECISIONS}

    def to_json(self) -> dict:
        """The ``plan`` object of ``--json``: ``{decision: {"value": ..., "reason": ...}}``."""
        return {name: d.to_json() for name, d in self.decisions().items()}

    def executed(self, **changes: Decision) -> Plan:
        """The plan as it ran: decisions the run resolved (``compile`` after its warm-up) or refined."""
        return replace(self, **changes)


DECISIONS = tuple(f.name for f in fields(Plan) if f.type == "Decision")


def make_plan(samples: SampleList, model: nn.Module, spec: PreprocessSpec, device: torch.device,
              options: FastOptions, *, source: str = "loader", passes: int = 1, scope: WholeRun | None = None,
              decoded_at_start: bool = False, cached: bool = False) -> Plan:
    """Every decision of a fast evaluation of ``samples`` (the module's docstring). ``source``: ``loader``
    (a loader decodes each pass) or ``store`` (a sweep's or ``--cache``'s decoded store feeds the passes);
    ``passes``: how many times the evaluator runs (a sweep's checkpoints); ``scope``: a torchrun shard's
    view of the whole run; ``decoded_at_start``: the command is decoding these samples with PIL since it
    started (fasteval/data/prefetch.py); ``cached``: the store is kept in a ``--cache`` folder. Refuses, before
    any work, files the reference cannot decode."""
    scope = scope or WholeRun()
    total = scope.total(len(samples))
    check_batchable(spec, samples.paths)
    probes = check_headers(samples)  # a bad file fails here, in seconds, not after the fast pass (cached per file)
    input_hw = spec.output_hw(*image_size(samples.paths[0])) if len(samples) else None

    # Start-up decoding: the whole run's size decides, so that every torchrun rank decides as one process does.
    pil_pixels = reads_pil_pixels(device.type, options.loader, total, input_hw) and not spec.runs_as_given
    in_process = pil_pixels and source == "loader"
    at_start = in_process and decoded_at_start
    startup = Decision(at_start, "the command decodes these images with PIL while torch imports" if at_start else
                       "a decoded store feeds the passes" if source == "store" else
                       "not decoded at start-up: the command starts it for a single eval of DATA on the CPU only "
                       "(not the demo, a sweep, --validate, --cache, a bench, a torchrun rank or a library call)"
                       if in_process else f"{total} image(s) on {device.type}: a loader decodes them")

    # Batch shape: a static batch larger than the dataset would be mostly padding: clamped to the whole run's
    # size, so that every shard runs the one-process shape. The reference keeps --batch-size (clamped).
    reference_batch = min(options.batch_size, total)
    shape = batch_shape(total, reference_batch, device_type=device.type, input_hw=input_hw)
    shape_reason = batch_shape_reason(total, options.batch_size, shape, device_type=device.type, input_hw=input_hw)
    shape_decision = Decision(shape, shape_reason or (
        f"--batch-size {options.batch_size}" if shape == options.batch_size else
        f"--batch-size {options.batch_size}, clamped to the {total} sample(s)"))

    exact_on, exact_reason = resolve_exact(options.exact)
    precision = resolve_precision(options.precision, device)

    # Files DALI would decode differently from PIL (only headers are read; DALI itself is imported only when
    # the fast path runs): the route counts them, and with DALI they go by the reference's code.
    # DALI resizes with its own filters: only its bilinear matches PIL's within the recheck's margin.
    if options.loader == "dali" and spec.runs_as_given:
        raise FastevalError("--loader dali: the transform given is not one DALI reproduces; use --loader torchvision "
                            "or auto")
    if options.loader == "dali" and spec.interpolation != "bilinear":
        raise FastevalError(f"--loader dali: DALI's {spec.interpolation} resize is not PIL's; use --loader "
                            f"torchvision or auto")
    asked = options.loader if spec.interpolation == "bilinear" and not spec.runs_as_given else "torchvision"
    pil_only = needs_pil(samples) if asked in ("auto", "dali") and not pil_pixels else []
    # The fast path's loader, its DALI tuning and the recheck's schedule, as the fast path would run: the
    # route weighs a recheck that overlaps the pass by the pool that would decode it.
    kind = "torchvision" if pil_pixels else resolve_loader(asked)
    pil_set = set(pil_only) if kind == "dali" else set()
    fast_main = tuple(i for i in range(len(samples)) if i not in pil_set)
    dali, dali_settings = _dali(kind, source, device, options, precision, probes, fast_main, scope)
    overlap, schedule = resolve_recheck(options.recheck, device_type=device.type, cpu_decoding=spec.runs_as_given,
                                        pass_pixels=in_process, sharded=scope.sharded, workers=options.workers)
    overlap = overlap and exact_on and bool(fast_main)
    pool = recheck_pool_size(options.workers, dali_settings.threads if dali_settings is not None else
                             GPU_DECODE_CORES if device.type == "cuda" else options.workers) if overlap else (0, "")
    route, rates, setup_decided = _route(samples, model, device, options, precision, input_hw, at_start,
                                         len(pil_only), exact_on, passes, scope, total, pool[0])
    reference_route = route.value == "reference"
    if reference_route:
        kind, overlap, pool = "torchvision", False, (0, "")
        dali, dali_settings = _dali(kind, source, device, options, precision, probes, (), scope)
        reference_only = tuple(range(len(samples)))
        by_reference = Decision(len(samples), "every sample: " + route.reason)
    else:
        reference_only = tuple(pil_only) if kind == "dali" else ()
        by_reference = Decision(len(reference_only), (
            f"{len(reference_only)} file(s) DALI would decode differently from PIL (16-bit, float, palette TIFF, "
            f"formats DALI lacks...): the reference's code evaluates them") if reference_only else
            "none: every sample goes through the fast pass")
    main = () if reference_route else fast_main

    calibration, calibration_total = scope.calibration(list(main)) if exact_on else ([], 0)
    backend = resolve_backend(options.metrics_backend, device)
    if reference_route:
        exact = Decision(True, "every sample by the reference's code: its own counts")
        calibration_decision = Decision(0, "none needed: every sample by the reference's code")
    else:
        exact = Decision(exact_on, f"{exact_reason}; {schedule}" + (f"; {pool[1]}" if overlap else "")
                         if exact_on and main else exact_reason)
        calibration_decision = Decision(calibration_total, (
            f"{calibration_total} sample(s) spread over the run, evaluated by the reference's code, measure the "
            f"fast path's logit error; samples within 3 x twice that error of a tie are rechecked") if exact_on
            else "--exact off: no recheck")
    key, placement = None, None
    input_dtype = dali_settings.output_dtype if dali_settings is not None and source == "loader" else \
        "fp16" if precision == "fp16" else "fp32"
    if not main:
        why = "every sample by the reference's code" if reference_route else "no sample for the fast pass here"
        loader = Decision("none", f"no fast pass ({why})" + ("; the reference's DataLoader + PIL"
                                                             if reference_route and not at_start else ""))
        shape_decision = Decision(reference_batch, "the reference's --batch-size, clamped to the run")
        precision_decision = Decision("fp32", f"{why}: fp32, NCHW, eager, as the plain loop")
        compile_decision = Decision(False, f"{why}: eager, as the plain loop")
        metrics = Decision("torch", f"{why}: torch.max and nn.CrossEntropyLoss, as the plain loop")
    else:
        loader = _loader(kind, pil_pixels, in_process, at_start, source, options.loader, device, total, spec)
        if source == "store":  # where the decoded images are kept, from their size and the memory free now
            placement = ("redecode", "the transform given runs as given on PIL images: it makes no uint8 pixels "
                                     "to keep, so every pass decodes again") if spec.runs_as_given else \
                choose_placement(len(main) * 3 * input_hw[0] * input_hw[1], device, cached)
            value = f"{loader.value[:-1]}, {placement[0]})" if loader.value.endswith(")") else \
                f"{loader.value} ({placement[0]})"
            loader = Decision(value, f"{loader.reason}; {placement[0]}: {placement[1]}")
            if placement[0] == "redecode" and dali_settings is not None:  # nothing kept: DALI's batches feed the model
                input_dtype = dali_settings.output_dtype
                dali = Decision(dali.value, dali.reason.replace(STORE_KEEPS_UINT8, "; nothing is kept: every pass "
                                                                                   "decodes again"))
        precision_decision = Decision(precision, precision_reason(options.precision, device, precision) + (
            f"; {CUDNN_BENCHMARK_NOTE}" if cudnn_benchmark(device) else ""))
        value, reason, key = plan_compile(model, device, precision, options.compile, num_samples=len(main) * passes,
                                          example_shape=(shape, 3, *input_hw), example_dtype=DTYPES[input_dtype])
        compile_decision = Decision(value, options.compile_asked_by or reason)
        metrics = Decision(backend, f"--metrics-backend {options.metrics_backend}"
                           if options.metrics_backend != "auto" else
                           "auto: the Triton kernel on CUDA" if backend == "triton" else
                           "auto: the kernel's PyTorch twin off CUDA")
    return Plan(
        preprocessing=_preprocessing(spec), route=route, loader=loader, dali=dali, startup_decoding=startup,
        batch_shape=shape_decision,
        precision=precision_decision, compile=compile_decision, exact=exact, calibration=calibration_decision,
        by_reference=by_reference,
        workers=Decision(options.workers, _workers_reason(options.workers, loader.value, reference_route,
                                                          dali_settings, device)),
        metrics_backend=metrics, total=total, input_hw=input_hw, main=main, reference_only=reference_only,
        calibration_indices=tuple(calibration), calibration_total=calibration_total, loader_kind=kind,
        in_process=in_process, recheck_pool=pool,
        decoded_at_start=at_start, reference_batch_size=reference_batch, passes=passes,
        records_rates=passes == 1 and source == "loader", compile_key=key, rates=rates, relaxes_setup=setup_decided,
        store_placement=placement if source == "store" and main else None, dali_settings=dali_settings,
        input_dtype=input_dtype)


STORE_KEEPS_UINT8 = "; the store keeps uint8 pixels (the output dtype applies to a loader's batches)"


def _local_ranks() -> int:
    """torchrun's ranks on this machine (``LOCAL_WORLD_SIZE``; 1 where unset)."""
    text = os.environ.get("LOCAL_WORLD_SIZE") or "1"
    if not text.strip().isdigit() or int(text) < 1:
        raise FastevalError(f"LOCAL_WORLD_SIZE must be a positive integer, got {text!r} (launch with torchrun)")
    return int(text)


def _dali(kind: str, source: str, device: torch.device, options: FastOptions, precision: str,
          probes: list[FileProbe], main: tuple[int, ...], scope: WholeRun) -> tuple[Decision, DaliSettings | None]:
    """The DALI pipeline's tuning (fasteval/data/dali_settings.py), from the JPEG headers of the fast pass's
    samples and the cores this process shares with torchrun's other local ranks; None where no DALI pipeline
    runs."""
    if kind != "dali" or not main:
        return Decision(None, "no DALI pipeline" + (f": the {kind} loader" if main else ": no fast pass")), None
    sizes = [probes[i].size for i in main if probes[i].format == "JPEG" and probes[i].size]
    ranks = _local_ranks() if scope.sharded else 1
    settings, reason = choose_settings(device.type == "cuda", usable_cores(), options.workers, precision, sizes,
                                       options.dali, ranks)
    if source == "store":
        reason += STORE_KEEPS_UINT8
    return Decision(settings.to_json(), reason), settings


def _preprocessing(spec: PreprocessSpec) -> Decision:
    return Decision(spec.describe(), spec.source or "given by the caller")


def _loader(kind: str, pil_pixels: bool, in_process: bool, at_start: bool, source: str, asked: str,
            device: torch.device, total: int, spec: PreprocessSpec) -> Decision:
    """The fast pass's batch source and why."""
    if spec.runs_as_given:
        return Decision("the transform given, in DataLoader workers",
                        "a transform fasteval's decoders do not reproduce: run as given on PIL images in DataLoader "
                        "workers (the recheck runs it too), its tensors to the fast model")
    if pil_pixels:
        how = ("decoded while torch imported" if at_start else
               "decoded between the model's batches" if in_process else "decoded into the store")
        return Decision("pil-pixels" if in_process else "decoded store (pil-pixels)",
                        f"{total} image(s) on the CPU (at most {MAX_SAMPLES}): PIL's pixels, the reference's, {how}; "
                        f"DALI's import and set-up would not pay")
    name = f"{kind}-{'gpu' if device.type == 'cuda' else 'cpu'}"
    why = (f"--loader {asked}" if asked != "auto" else
           f"auto: a {spec.interpolation} resize, DALI's is not PIL's" if spec.interpolation != "bilinear" else
           "auto: DALI is installed" if kind == "dali" else "auto: DALI is not installed")
    if source == "store":
        return Decision(f"decoded store ({name})", f"{why}; decoded once into a store that every pass reads")
    return Decision(name, f"{why}; " + ("decoding on the GPU" if device.type == "cuda" else "decoding on the CPU"))


def _route(samples, model, device, options, precision, input_hw, at_start, pil_files, exact, passes, scope,
           total, recheck_pool) -> tuple[Decision, Rates | None, bool]:
    """The route: every sample by the reference's code on a tiny run (``SMALL_DATASET``) or where the measured
    costs say the fast path would not pay (``options.route`` with ``--compile auto``: fasteval/evaluation/
    route.py); else the fast path. Returns the decision, the rates to record the run into, and whether the
    measured set-up alone sent it to the reference's code (``Route.setup_decided``)."""
    mode = resolve_compile_mode(options.compile)
    rates = chosen = None
    if options.route and mode == "auto" and len(samples) and not scope.sharded:
        rates = load_rates(device, rates_key(model, device, precision, input_hw, decoded_at_start=at_start))
        chosen = choose_route(rates, device.type, len(samples), pil_files, min(CALIBRATION_SAMPLES, len(samples)),
                              exact, passes=passes, recheck_pool=recheck_pool, workers=options.workers)
    if exact and total <= SMALL_DATASET:
        return Decision("reference", f"{total} sample(s) (<= {SMALL_DATASET}, the calibration's size): every sample "
                                     f"evaluated by the reference's code"), rates, False
    if chosen is not None:
        return Decision("fast" if chosen.fast else "reference", chosen.reason), rates, chosen.setup_decided
    why = ("torchrun: every rank takes the fast path" if scope.sharded else
           f"{options.compile_asked_by}: the fast path" if options.compile_asked_by else
           f"--compile {mode}: the fast path as asked" if mode != "auto" else
           "no samples" if not len(samples) else
           "no route asked: the fast path (--validate, a bench's timed loop, train's validation, compare())")
    return Decision("fast", why), None, False


def _workers_reason(workers: int, loader: object, reference_route: bool, dali: DaliSettings | None,
                    device: torch.device) -> str:
    kind = str(loader)
    if reference_route:
        what = "the reference's DataLoader worker processes (PIL)"
    elif kind.startswith("pil-pixels"):
        what = "threads decoding with PIL between the model's batches, and the recheck's DataLoader workers"
    elif kind.startswith("dali") and (device.type == "cuda" or dali is None or dali.threads != workers):
        what = "the recheck's DataLoader workers (DALI's decoding threads: the dali decision)"
    elif kind.startswith("dali"):
        what = "DALI's decoding threads, and the recheck's DataLoader workers"
    elif kind.startswith("decoded store"):
        what = "the store's decoding workers (once), and the recheck's DataLoader workers"
    else:
        what = "DataLoader worker processes (PIL), and the recheck's"
    return f"--workers {workers}: {what}"


def reference_plan(samples: int, batch_size: int, workers: int, reason: str = "--reference",
                   spec: PreprocessSpec | None = None) -> Plan:
    """The plain PyTorch loop's plan (``--reference``, and the reference side of ``--validate`` and ``bench``):
    nothing to decide, every value the tutorial loop's."""
    why = f"{reason}: the plain PyTorch loop"
    batch = min(batch_size, samples)
    return Plan(
        preprocessing=_preprocessing(spec) if spec is not None else Decision(None, "not given"),
        route=Decision("reference", why), loader=Decision("none", "the reference's DataLoader + PIL"),
        dali=Decision(None, "no DALI pipeline: the plain loop"),
        startup_decoding=Decision(False, "the plain loop decodes in its DataLoader"),
        batch_shape=Decision(batch, f"--batch-size {batch_size}" + (f", clamped to the {samples} sample(s)"
                                                                     if batch != batch_size else "")),
        precision=Decision("fp32", "the plain loop: fp32, NCHW"), compile=Decision(False, "the plain loop: eager"),
        exact=Decision(True, "the reference's own numbers"), calibration=Decision(0, "none needed"),
        by_reference=Decision(samples, f"every sample: {why}"),
        workers=Decision(workers, f"--workers {workers}: the DataLoader's worker processes (PIL)"),
        metrics_backend=Decision("torch", "torch.max and nn.CrossEntropyLoss"), total=samples,
        reference_only=tuple(range(samples)), loader_kind="none", reference_batch_size=batch)
