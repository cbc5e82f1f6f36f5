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
from fasteval.kernels.accumulator import MetricsAccumulator
from fasteval.evaluation.metrics import TOPK, EvalResult
from fasteval.data.preprocess import PreprocessSpec
from fasteval.evaluation.reference import REFERENCE_SETTINGS, evaluate_reference, reference_loader, reference_logits, score_batch
from fasteval.output.files import atomic_write
from fasteval.output.report import build_report, environment
from fasteval.procs import children
from fasteval.data.samples import SampleList
from fasteval.evaluation.validate import compare

MIN_STAGE_BATCHES = 8  # a stage runs at least this many batches (the dataset's own, repeated if fewer)
KEEP_BATCHES = 4  # distinct decoded batches held for the model and metrics stages
POLL_SECONDS = 0.02  # memory sampling interval of the time-to-result commands
STAGES = {"decode": "decode+preprocess", "model": "model", "metrics": "metrics",
          "reference_code": "reference code"}
METRICS_NOTE = ("metrics: the fast path's twin also computes per row the decision margins, the top-5 classes and the "
                "confidence, which the reference does not, so on the CPU it can read slower than the reference's; "
                "either is a small fraction of a batch's time")


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
                     batch_size=evaluator.options.batch_size, workers=evaluator.options.workers, device=device)
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
    argv = [sys.executable, "-m", "fasteval", "eval", config["path"], "--arch", config["arch"],
            "--preset", config["preset"], "--batch-size", str(config.get("batch_size_requested", config["batch_size"])),
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
    recheck = (result.get("exact") or {}).get("seconds") or 0.0
    run.update(samples=result["samples"], top1=result["top1"], warmup_seconds=result.get("warmup_seconds") or 0.0,
               loop_seconds=result["seconds"] - recheck, recheck_seconds=recheck,
               setup_seconds=run["wall_seconds"] - (result.get("warmup_seconds") or 0.0) - result["seconds"],
               compile=result.get("compile"), compile_reason=result.get("compile_reason"), route=result.get("route"))
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
    loop_options = replace(options, compile="on" if options.compile == "auto" else options.compile, route=False)
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


def _n(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else "nan" if value != value else f"{value:,.{digits}f}"


def _rechecked(exact: dict) -> str:
    return f"{exact['rechecked']} samples" if exact.get("enabled") else "off"


def _yes(flag) -> str:
    return "yes" if flag else "no"


def _time_rows(t: dict) -> list[tuple[str, str, str, str]]:
    ref, fast = t["reference"], t["fast"]
    rows = [("time to result (s)", "reference", "fast", ""),
            ("cold: whole command", _n(ref["cold"]["wall_seconds"], 2), _n(fast["cold"]["wall_seconds"], 2),
             f"{t['ratio_cold']:.2f}x"),
            (f"warm: whole command (median of {t['repeats']})", _n(ref["warm"]["wall_seconds"], 2),
             _n(fast["warm"]["wall_seconds"], 2), f"{t['ratio_warm']:.2f}x")]
    for key, label in (("setup_seconds", "  start, imports, setup, report"), ("warmup_seconds", "  warm-up+compile"),
                       ("loop_seconds", "  loop"), ("recheck_seconds", "  exact recheck")):
        rows.append((label, _n(ref["warm"][key], 2), _n(fast["warm"][key], 2), "warm run"))
    rows += [("fast compile (cold, warm)", "", f"{_yes(fast['cold']['compile'])}, {_yes(fast['warm']['compile'])}",
              "see below"),
             ("peak RSS MB, main process", _n(ref["warm"]["main_peak_rss_mb"], 0),
              _n(fast["warm"]["main_peak_rss_mb"], 0), "warm run, per process"),
             ("peak RSS MB, largest worker", _workers(ref["warm"]), _workers(fast["warm"]), "not added to the main's")]
    return rows


def _workers(run: dict) -> str:
    return _n(run["largest_worker_peak_rss_mb"], 0) if run["largest_worker_peak_rss_mb"] else "none"


def format_bench(b: dict) -> str:
    """The side-by-side table."""
    ref, fast, cfg = b["reference"], b["fast"], b["config"]
    rows = [
        (f"loop images/s (median of {cfg['repeats']})", _n(ref["images_per_sec"]), _n(fast["images_per_sec"]),
         f"{b['speedup']:.2f}x"),
        ("top-1 %", _n(ref["top1"], 3), _n(fast["top1"], 3), f"{fast['top1'] - ref['top1']:+.3f}"),
        ("top-5 %", _n(ref["top5"], 3), _n(fast["top5"], 3), f"{fast['top5'] - ref['top5']:+.3f}"),
        ("loss (per sample)", _n(ref["loss"], 6), _n(fast["loss"], 6), f"{fast['loss'] - ref['loss']:+.6f}"),
        ("agreement (top-1)", "", f"{100 * b['agreement']:.2f} %", f"{b['validation']['flipped']} flipped"),
        ("exact recheck", "", _rechecked(fast.get("exact", {})), "included in images/s"),
        ("warm-up s (excluded)", "0.0", _n(fast["warmup_seconds"], 1), ""),
    ]
    mem = b["memory"]
    if "time_to_result" not in b:  # no per-process sampling: the kernel's figure for this process only
        inproc = mem["in_process"]
        rows += [("peak RSS MB, this process", _n(inproc["after_reference"]["main_peak_rss_mb"], 0),
                  _n(inproc["after_fast"]["main_peak_rss_mb"], 0), "cumulative: fast includes the reference's")]
    if "fast_peak_gpu_mb" in mem:
        rows.append(("peak GPU MB", _n(mem["reference_peak_gpu_mb"], 0), _n(mem["fast_peak_gpu_mb"], 0), ""))
    loop_compile = _yes(fast["compile"]) + (" (steady state)" if cfg.get("compile") == "auto" else "")
    rows += [
        ("loader", "DataLoader+PIL", fast["loader"], ""),
        ("batch shape", str(cfg["batch_size"]), str(fast.get("batch_shape") or cfg["batch_size"]),
         fast.get("batch_shape_reason") or ""),
        ("precision", "fp32", fast["precision"], ""),
        ("compile (loop)", "no", loop_compile, ""),
        ("", "", "", ""),
        ("stage (images/s)", "reference", "fast", ""),
    ]
    for key, label in (*STAGES.items(), ("end_to_end", "end to end")):
        ref_value = b["stages"]["reference"].get(key)
        if key == "reference_code":
            label = f"{label} ({b['stages']['fast'].get('reference_code_samples', 0)} samples)"
        rows.append((label, _n(ref_value), _n(b["stages"]["fast"][key]), ""))
    if "time_to_result" in b:
        rows += [("", "", "", "")] + _time_rows(b["time_to_result"])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    title = (f"fasteval bench: {cfg['samples']} images, batch {cfg['batch_size']}, {cfg['workers']} workers, "
             f"{cfg['device']}")
    lines = [title, "-" * len(title), f"{'':{widths[0]}}  {'reference':>{widths[1]}}  {'fast':>{widths[2]}}"]
    for r in rows:
        lines.append(f"{r[0]:{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
    m = b["machine"]
    lines += [
        f"reference {b['verdict']['reference']}",
        f"fast      {b['verdict']['fast']}",
        "stages: each alone over the dataset's batches; end to end they share the machine (a loader decodes beside "
        "the model, DALI, or between its batches, PIL on the CPU), so end to end is below the slowest stage",
    ]
    if b["stages"]["fast"]["metrics"] < b["stages"]["reference"]["metrics"]:
        lines.append(METRICS_NOTE)
    if "time_to_result" in b:
        t = b["time_to_result"]["fast"]
        for what, key in (("route", "route"), ("compile", "compile_reason")):
            lines += [f"fast {what}, {run}: {t[run][key]}" for run in ("cold", "warm") if t[run].get(key)]
    lines.append(f"machine: {m['cpu']} ({m['cpu_cores']} cores), GPU: {m.get('gpu', 'none')}, torch {m['torch']}, "
                 f"torchvision {m['torchvision']}, triton {m['triton']}, DALI {m['dali'] or 'not installed'}")
    return "\n".join(lines)


def plot_bench(b: dict, path: str) -> None:
    """A PNG bar chart of images/s per stage for both paths (needs matplotlib: pip install fasteval[plot])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["decode", "model", "metrics", "end_to_end"]
    labels = [STAGES.get(s, "end to end") for s in stages]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    for offset, key, colour in ((-width / 2, "reference", "#999999"), (width / 2, "fast", "#1f77b4")):
        values = [b["stages"][key][s] for s in stages]
        bars = ax.bar([i + offset for i in range(len(stages))], values, width, label=key, color=colour)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(stages)), labels)
    ax.set_ylabel("images/s (log scale)")
    ax.set_title(f"fasteval bench: {b['speedup']:.2f}x end to end ({b['config']['device']})")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, binary=True) as f:  # complete or not at all, like every output
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
