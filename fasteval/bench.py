"""``fasteval bench``: the reference loop and the fast path side by side: loop throughput, a stage
breakdown, memory per process, and each whole command's time to result, cold and warm.

- Loop throughput: both paths in this process on the same samples, batch size and workers; runs
  repeated (after the first of each, the two paths alternate), the median reported, warm-up excluded
  and reported apart. With ``--compile auto`` the fast
  loop is measured compiled: the steady state, what ``auto`` picks where a run is long enough to pay.
- Stages, each measured alone over the dataset's own batches (at least ``MIN_STAGE_BATCHES``):
  decoding (a pass of the loader), the model (on loaded batches, cycling ``KEEP_BATCHES`` of them),
  the metrics (on computed logits) and, on the fast path, the samples the reference's code evaluates
  (PIL-only files and the exact recheck). Every rate is dataset images per second of that stage, so
  a path's end-to-end rate cannot exceed its slowest stage's (beyond noise).
- Time to result: ``python -m fasteval eval`` in a subprocess, from its start to its exit (interpreter,
  imports, setup, compile, warm-up, loop, recheck, report): cold (an empty ``FASTEVAL_CACHE``, so no
  compiled artifact or profile) then warm (the same cache again), the two commands alternated. Peak
  memory is sampled per process from ``/proc`` (``VmHWM``) while each command runs: the main process
  and its largest worker, never summed.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
from torch import nn

from fasteval.devices import synchronize
from fasteval.evaluation.fast import FastEvaluator, FastOptions
from fasteval.evaluation.plan import reference_plan
from fasteval.kernels.accumulator import MetricsAccumulator
from fasteval.evaluation.metrics import TOPK, EvalResult
from fasteval.data.preprocess import PRESETS, PreprocessSpec
from fasteval.evaluation.reference import REFERENCE_SETTINGS, evaluate_reference, reference_loader, reference_logits, score_batch
from fasteval.output.bench_table import STAGES
from fasteval.output.report import build_report, environment
from fasteval.procs import children
from fasteval.data.samples import SampleList
from fasteval.evaluation.validate import compare

MIN_STAGE_BATCHES = 8  # a stage runs at least this many batches (the dataset's own, repeated if fewer)
KEEP_BATCHES = 4  # distinct decoded batches held for the model and metrics stages
POLL_SECONDS = 0.02  # memory sampling interval of the time-to-result commands


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def _plan(reals: list[int]) -> list[int]:
    """The real-sample counts of the batches a stage runs: the dataset's, repeated to MIN_STAGE_BATCHES."""
    plan = list(reals)
    while plan and len(plan) < MIN_STAGE_BATCHES:
        plan += reals
    return plan


def _in_process_memory() -> dict:
    """This process's peak RSS, MB. (The kernel's figure for its children is not a worker's: it also
    counts every fork that ran a helper, ``ldconfig -p`` say, at its parent's size.)"""
    return {"main_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _reference_stages(samples: SampleList, model: nn.Module, spec: PreprocessSpec, batch_size: int, workers: int,
                      device: torch.device) -> dict:
    kept, reals, start = [], [], time.perf_counter()
    for images, labels in reference_loader(samples, spec, batch_size, workers, device):
        reals.append(labels.shape[0])
        if len(kept) < KEEP_BATCHES and labels.shape[0] == reals[0]:
            kept.append((images.to(device), labels.to(device)))
    decode = _rate(len(samples), time.perf_counter() - start)
    plan = _plan(reals)
    model = model.to(device).eval()
    with torch.no_grad():
        model(kept[0][0])  # first-call allocations are not the steady state
        synchronize(device)
        start = time.perf_counter()
        logits = [model(kept[i % len(kept)][0][:real]) for i, real in enumerate(plan)]
        synchronize(device)
        model_rate = _rate(sum(plan), time.perf_counter() - start)
        start = time.perf_counter()
        for i, (out, real) in enumerate(zip(logits, plan)):  # the reference loop's own per-batch metrics
            score_batch(out.float(), kept[i % len(kept)][1][:real])
        metrics = _rate(sum(plan), time.perf_counter() - start)
    return {"decode": decode, "model": model_rate, "metrics": metrics}


def _fast_stages(evaluator: FastEvaluator, median: EvalResult) -> dict:
    device, samples = evaluator.device, evaluator.samples
    stages = {"decode": float("nan"), "model": float("nan"), "metrics": float("nan")}
    if evaluator.loader is not None:
        stages = _fast_loop_stages(evaluator)
    # The samples the reference's code evaluates: the PIL-only files (timed here) and the recheck (the run's own).
    start = time.perf_counter()
    reference_logits(samples, evaluator.reference_only, evaluator.reference_model, evaluator.spec,
                     batch_size=evaluator.plan.reference_batch_size, workers=evaluator.options.workers, device=device)
    seconds = time.perf_counter() - start + median.extra["exact"].get("seconds", 0.0)
    return {**stages, "reference_code": _rate(len(samples), seconds) if seconds > 0 else float("inf"),
            "reference_code_samples": int(median.rechecked.sum())}


def _fast_loop_stages(evaluator: FastEvaluator) -> dict:
    """Rates per dataset image: the PIL-only files the loader skips count as images of the dataset."""
    device = evaluator.device
    kept, reals, start = [], [], time.perf_counter()
    with torch.inference_mode():
        for batch in evaluator.loader:
            reals.append(batch.real)
            if len(kept) < KEEP_BATCHES:  # copies: loaders may reuse their output buffers
                kept.append((batch.images.clone(), batch.labels.clone()))
        synchronize(device)
        decode = _rate(len(evaluator.samples), time.perf_counter() - start)
        per_dataset = len(evaluator.samples) / sum(reals)
        plan = _plan(reals)  # every batch is padded to the static shape: a short one costs a full one
        start = time.perf_counter()
        logits = [evaluator.model(kept[i % len(kept)][0]) for i in range(len(plan))]
        synchronize(device)
        model_rate = _rate(sum(plan), time.perf_counter() - start) * per_dataset
        acc = MetricsAccumulator(sum(plan), device, topk=TOPK, backend=evaluator.metrics_backend)
        start = time.perf_counter()
        for i, (out, real) in enumerate(zip(logits, plan)):
            acc.update(out, kept[i % len(kept)][1], num_real=real)
        acc.result()
        metrics = _rate(sum(plan), time.perf_counter() - start) * per_dataset
    return {"decode": decode, "model": model_rate, "metrics": metrics}


def _verdict(stages: dict) -> str:
    parts = {k: stages[k] for k in STAGES if k in stages and stages[k] == stages[k]}  # NaN: a stage that did not run
    slowest = min(parts, key=parts.get)
    return (f"bottleneck: {STAGES[slowest]} ({parts[slowest]:,.0f} images/s; "
            f"end to end {stages['end_to_end']:,.0f})")


def _median_result(results: list[EvalResult]) -> EvalResult:
    ordered = sorted(results, key=lambda r: r.images_per_sec)
    return ordered[len(ordered) // 2]


# --- time to result: whole commands in subprocesses ---------------------------------------------------------


def _hwm_mb(pid: int) -> float:
    """A live process's peak RSS (``VmHWM``), MB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def run_command(argv: list[str], env: dict[str, str]) -> dict:
    """Run a command to its exit: wall seconds, exit code, stderr's tail, and the peak RSS of its main
    process and of its largest worker (sampled every POLL_SECONDS; ``tree_peak_rss_mb``, from the
    kernel's accounting at exit, is the largest single process's exact peak, helpers included).
    A worker is a descendant seen in two consecutive samples: a fork that runs a helper (``ldconfig -p``
    from ``ctypes.util.find_library``, ``uname -p``) holds its parent's pages for the milliseconds before
    its exec, and would otherwise read as a worker as large as the main process."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        main = workers = 0.0
        previous: set[int] = set()
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                main = max(main, _hwm_mb(proc.pid))
                current = set(_descendants(proc.pid))
                workers = max([workers] + [_hwm_mb(child) for child in current & previous])
                previous = current
                time.sleep(POLL_SECONDS)
        except BaseException:  # Ctrl-C or SIGTERM in bench: no eval left running behind it
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-2000:].decode(errors="replace")
    return {"wall_seconds": wall, "returncode": proc.returncode, "stderr_tail": tail, "main_peak_rss_mb": main,
            "largest_worker_peak_rss_mb": workers, "tree_peak_rss_mb": usage.ru_maxrss / 1024}


def eval_argv(config: dict, options: FastOptions, reference: bool, json_path: str) -> list[str]:
    """``python -m fasteval eval`` with the bench's dataset, model and settings (the demo by its files)."""
    preset = ["--preset", config["preset"]] if config["preset"] in PRESETS else []  # else the weights' or timm's own
    argv = [sys.executable, "-m", "fasteval", "eval", config["path"], "--arch", config["arch"], *preset,
            "--batch-size", str(config.get("batch_size_requested", config["batch_size"])),
            "--workers", str(config["workers"]), "--device", config["device"], "--no-progress", "--json", json_path]
    for option in ("resize", "crop", "weights"):
        if config.get(option) is not None:
            argv += [f"--{option}", str(config[option])]
    if reference:
        return argv + ["--reference"]
    return argv + ["--loader", options.loader, "--precision", options.precision, "--compile", str(options.compile),
                   "--exact", options.exact]


def _timed_eval(config: dict, options: FastOptions, reference: bool, env: dict[str, str], work: str) -> dict:
    path = os.path.join(work, "result.json")
    run = run_command(eval_argv(config, options, reference, path), env)
    if run["returncode"] != 0:
        raise RuntimeError(f"time to result: the {'reference' if reference else 'default'} command failed "
                           f"(exit {run['returncode']}): {run['stderr_tail'].strip()[-500:]}")
    with open(path) as f:
        result = json.load(f)
    os.unlink(path)
    exact = result.get("exact") or {}
    recheck = exact.get("seconds") or 0.0  # overlapped with the loop, the seconds before and after it
    run.update(samples=result["samples"], top1=result["top1"], warmup_seconds=result.get("warmup_seconds") or 0.0,
               loop_seconds=result["seconds"] - recheck, recheck_seconds=recheck,
               recheck_hidden_seconds=exact.get("hidden_seconds", 0.0),
               setup_seconds=run["wall_seconds"] - (result.get("warmup_seconds") or 0.0) - result["seconds"],
               compile=result.get("compile"), compile_reason=result.get("compile_reason"), route=result.get("route"),
               route_value=((result.get("plan") or {}).get("route") or {}).get("value"))
    return run


def time_to_result(config: dict, options: FastOptions, repeats: int = 3, progress: bool = False) -> dict:
    """Both whole commands, cold then ``repeats`` times warm, alternated; the warm figure is the median run.
    ``progress``: a line on stderr as each command starts (they print nothing themselves)."""
    work = tempfile.mkdtemp(prefix="fasteval-ttr-")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["FASTEVAL_CACHE"] = os.path.join(work, "cache")
    order = [("fast", "cold"), ("reference", "cold")] + [(path, f"warm {i + 1}/{repeats}") for i in range(repeats)
                                                        for path in ("reference", "fast")]
    done = []
    try:
        for n, (path, when) in enumerate(order, 1):
            if progress:
                print(f"time to result: the {'reference' if path == 'reference' else 'default'} command, {when} "
                      f"({n}/{len(order)})", file=sys.stderr, flush=True)
            done.append(_timed_eval(config, options, path == "reference", env, work))
        cold = {"fast": done[0], "reference": done[1]}
        warm_runs = {path: [r for (p, _), r in zip(order[2:], done[2:]) if p == path] for path in ("reference", "fast")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {}
    for path in ("reference", "fast"):
        runs = sorted(warm_runs[path], key=lambda r: r["wall_seconds"])
        out[path] = {"cold": cold[path], "warm": runs[len(runs) // 2],
                     "warm_wall_seconds": [r["wall_seconds"] for r in warm_runs[path]]}
    out["ratio_cold"] = out["fast"]["cold"]["wall_seconds"] / out["reference"]["cold"]["wall_seconds"]
    out["ratio_warm"] = out["fast"]["warm"]["wall_seconds"] / out["reference"]["warm"]["wall_seconds"]
    out["repeats"] = repeats
    return out


# --- the bench --------------------------------------------------------------------------------------------


def bench_loop_options(options: FastOptions) -> FastOptions:
    """The options of the fast loop a bench times: always the fast path (no route to the reference's code),
    compiled where ``--compile auto`` would compile a long run."""
    if options.compile != "auto":
        return replace(options, route=False)
    return replace(options, compile="on", route=False,
                   compile_asked_by="bench times the fast loop compiled, as --compile auto compiles a run long "
                                    "enough to pay (--compile off times it eager)")


def run_bench(samples: SampleList, model: nn.Module, spec: PreprocessSpec, device: torch.device,
              options: FastOptions, repeats: int = 3, progress: bool = True, eval_config: dict | None = None,
              measure_time_to_result: bool = True, scope=None) -> dict:
    """Everything ``fasteval bench`` reports, as a dict (the ``--json`` content). ``eval_config`` (the
    eval command's ``config``: path, arch, weights, preset, sizes, batch size, workers, device) is needed
    for the time to result. ``scope``: ``samples`` are one torchrun rank's shard (fasteval/distributed.py)."""
    ref_model = copy.deepcopy(model)

    def reference_run() -> EvalResult:
        return evaluate_reference(samples, ref_model, spec, batch_size=options.batch_size, workers=options.workers,
                                  device=device, progress=progress)

    # The first reference run alone: the reference's memory, as a process running only it holds it.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ref_runs = [reference_run()]
    memory = {"in_process": {"after_reference": _in_process_memory()}}
    if device.type == "cuda":
        memory["reference_peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        # The reference's model stays for its later runs: the fast path's peak is the rest (the cuBLAS
        # workspaces that the fast path reuses included, as a process running only it would hold them).
        base = sum(t.numel() * t.element_size() for t in (*ref_model.parameters(), *ref_model.buffers()))
        torch.cuda.reset_peak_memory_stats(device)

    # The fast loop itself, always (no route to the reference); compiled where auto would compile a long run.
    loop_options = bench_loop_options(options)
    evaluator = FastEvaluator(samples, model, spec, device, loop_options, scope=scope)
    fast_runs = [evaluator.run(progress)]
    if device.type == "cuda":
        memory["fast_peak_gpu_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # The other runs alternate, so that a machine whose speed drifts (other tenants, clocks) moves both
    # paths' medians alike and the ratio compares runs made side by side. (No loader decodes between
    # passes: DALI's is reset by hand when a pass starts.)
    for _ in range(repeats - 1):
        ref_runs.append(reference_run())
        fast_runs.append(evaluator.run(progress))
    ref_stages = _reference_stages(samples, ref_model, spec, options.batch_size, options.workers, device)
    ref, fast = _median_result(ref_runs), _median_result(fast_runs)
    fast_stages = _fast_stages(evaluator, fast)
    memory["in_process"]["after_fast"] = _in_process_memory()

    ref_stages["end_to_end"], fast_stages["end_to_end"] = ref.images_per_sec, fast.images_per_sec
    config = {"path": samples.root, "samples": len(samples), "batch_size": options.batch_size,
              "workers": options.workers, "device": str(device), "repeats": repeats,
              "compile": str(options.compile), "loop_compile": str(loop_options.compile)}
    cmp = compare(samples, ref, fast)
    result = {
        "speedup": fast.images_per_sec / ref.images_per_sec,
        "agreement": cmp["agreement"],
        "config": config,
        "reference": {**build_report(ref, REFERENCE_SETTINGS, device),
                      "plan": reference_plan(len(samples), options.batch_size, options.workers, "bench",
                                             spec).to_json(),
                      "runs_images_per_sec": [r.images_per_sec for r in ref_runs]},
        "fast": {**build_report(fast, {}, device), "runs_images_per_sec": [r.images_per_sec for r in fast_runs]},
        "stages": {"reference": ref_stages, "fast": fast_stages},
        "verdict": {"reference": _verdict(ref_stages), "fast": _verdict(fast_stages)},
        "validation": cmp,
        "memory": memory,
        "machine": environment(device),
    }
    if measure_time_to_result and eval_config is not None:
        del evaluator  # its DALI threads and buffers would compete with the commands
        result["time_to_result"] = time_to_result(eval_config, options, repeats, progress=progress)
    return result
