"""``fasteval bench``: the reference loop and the fast path side by side, with a stage breakdown.

Both paths see the same samples, batch size and worker count. End-to-end runs are repeated
and the median is reported (warm-up excluded and reported apart). Each stage is measured on
its own: decoding+preprocessing (a pass of the loader alone), the model (on batches already
loaded on the device) and the metrics (on logits already computed).
"""

from __future__ import annotations

import copy
import resource
import time

import torch
from torch import nn

from .devices import synchronize
from .fast import FastEvaluator, FastOptions
from .kernels.accumulator import MetricsAccumulator
from .metrics import TOPK, EvalResult
from .preprocess import PreprocessSpec
from .reference import REFERENCE_SETTINGS, evaluate_reference, reference_loader, score_batch
from .report import build_report, environment
from .samples import SampleList
from .validate import compare

STAGE_BATCHES = 3  # batches timed for the model and metrics stages


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children (DataLoader workers), MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def _reference_stages(samples: SampleList, model: nn.Module, spec: PreprocessSpec, batch_size: int, workers: int,
                      device: torch.device) -> dict:
    kept, start = [], time.perf_counter()
    for images, labels in reference_loader(samples, spec, batch_size, workers, device):
        if len(kept) < STAGE_BATCHES:
            kept.append((images.to(device), labels.to(device)))
    decode = _rate(len(samples), time.perf_counter() - start)
    model = model.to(device).eval()
    n = sum(labels.shape[0] for _, labels in kept)
    with torch.no_grad():
        model(kept[0][0])  # first-call allocations are not the steady state
        synchronize(device)
        start = time.perf_counter()
        logits = [model(images) for images, _ in kept]
        synchronize(device)
        model_rate = _rate(n, time.perf_counter() - start)
        start = time.perf_counter()
        for out, (_, labels) in zip(logits, kept):  # the reference loop's own per-batch metrics
            score_batch(out.float(), labels)
        metrics = _rate(n, time.perf_counter() - start)
    return {"decode": decode, "model": model_rate, "metrics": metrics}


def _fast_stages(evaluator: FastEvaluator) -> dict:
    device, samples = evaluator.device, evaluator.samples
    kept, start = [], time.perf_counter()
    with torch.inference_mode():
        for batch in evaluator.loader:
            if len(kept) < STAGE_BATCHES:  # copies: loaders may reuse their output buffers
                kept.append((batch.images.clone(), batch.labels.clone(), batch.real))
        synchronize(device)
        decode = _rate(len(samples), time.perf_counter() - start)
        n = sum(images.shape[0] for images, _, _ in kept)
        start = time.perf_counter()
        logits = [evaluator.model(images) for images, _, _ in kept]
        synchronize(device)
        model_rate = _rate(n, time.perf_counter() - start)
        acc = MetricsAccumulator(n, device, topk=TOPK, backend=evaluator.options.metrics_backend)
        start = time.perf_counter()
        for out, (_, labels, _) in zip(logits, kept):
            acc.update(out, labels)
        acc.result()
        metrics = _rate(n, time.perf_counter() - start)
    return {"decode": decode, "model": model_rate, "metrics": metrics}


def _verdict(stages: dict) -> str:
    parts = {k: v for k, v in stages.items() if k in ("decode", "model", "metrics")}
    slowest = min(parts, key=parts.get)
    name = {"decode": "decoding+preprocessing", "model": "the model", "metrics": "the metrics"}[slowest]
    return f"bottleneck: {name} ({parts[slowest]:.0f} images/s; end to end {stages['end_to_end']:.0f})"


def _median_result(results: list[EvalResult]) -> EvalResult:
    ordered = sorted(results, key=lambda r: r.images_per_sec)
    return ordered[len(ordered) // 2]


def run_bench(samples: SampleList, model: nn.Module, spec: PreprocessSpec, device: torch.device,
              options: FastOptions, repeats: int = 3, progress: bool = True) -> dict:
    """Everything ``fasteval bench`` reports, as a dict (the ``--json`` content)."""
    ref_model = copy.deepcopy(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ref_runs = []
    for _ in range(repeats):
        ref_runs.append(evaluate_reference(samples, ref_model, spec, batch_size=options.batch_size,
                                           workers=options.workers, device=device, progress=progress))
    ref_stages = _reference_stages(samples, ref_model, spec, options.batch_size, options.workers, device)
    memory = {"reference_peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        memory["reference_peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        del ref_model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    evaluator = FastEvaluator(samples, model, spec, device, options)
    fast_runs = [evaluator.run(progress) for _ in range(repeats)]
    fast_stages = _fast_stages(evaluator)
    memory["fast_peak_rss_mb"] = peak_rss_mb()  # the process peak so far (reference included)
    if device.type == "cuda":
        memory["fast_peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    ref, fast = _median_result(ref_runs), _median_result(fast_runs)
    ref_stages["end_to_end"], fast_stages["end_to_end"] = ref.images_per_sec, fast.images_per_sec
    config = {"path": samples.root, "samples": len(samples), "batch_size": options.batch_size,
              "workers": options.workers, "device": str(device), "repeats": repeats}
    cmp = compare(samples, ref, fast)
    return {
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


def _n(value: float, digits: int = 1) -> str:
    return "nan" if value != value else f"{value:,.{digits}f}"


def _rechecked(exact: dict) -> str:
    return f"{exact['rechecked']} samples" if exact.get("enabled") else "off"


def format_bench(b: dict) -> str:
    """The side-by-side table."""
    ref, fast, cfg = b["reference"], b["fast"], b["config"]
    rows = [
        (f"images/s (median of {cfg['repeats']})", _n(ref["images_per_sec"]), _n(fast["images_per_sec"]),
         f"{b['speedup']:.2f}x"),
        ("top-1 %", _n(ref["top1"], 3), _n(fast["top1"], 3), f"{fast['top1'] - ref['top1']:+.3f}"),
        ("top-5 %", _n(ref["top5"], 3), _n(fast["top5"], 3), f"{fast['top5'] - ref['top5']:+.3f}"),
        ("loss (per sample)", _n(ref["loss"], 6), _n(fast["loss"], 6), f"{fast['loss'] - ref['loss']:+.6f}"),
        ("agreement (top-1)", "", f"{100 * b['agreement']:.2f} %", f"{b['validation']['flipped']} flipped"),
        ("exact recheck", "", _rechecked(fast.get("exact", {})), "included in images/s"),
        ("warm-up s (excluded)", "0.0", _n(fast["warmup_seconds"], 1), ""),
        ("peak RSS MB", _n(b["memory"]["reference_peak_rss_mb"], 0), _n(b["memory"]["fast_peak_rss_mb"], 0),
         "process peak"),
    ]
    if "fast_peak_gpu_mb" in b["memory"]:
        rows.append(("peak GPU MB", _n(b["memory"]["reference_peak_gpu_mb"], 0),
                     _n(b["memory"]["fast_peak_gpu_mb"], 0), ""))
    rows += [
        ("loader", "DataLoader+PIL", fast["loader"], ""),
        ("precision", "fp32", fast["precision"], ""),
        ("compile", "no", "yes" if fast["compile"] else "no", ""),
        ("", "", "", ""),
        ("stage (images/s)", "reference", "fast", ""),
    ]
    for key, label in (("decode", "decode+preprocess"), ("model", "model"), ("metrics", "metrics"),
                       ("end_to_end", "end to end")):
        rows.append((label, _n(b["stages"]["reference"][key]), _n(b["stages"]["fast"][key]), ""))
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
        f"machine: {m['cpu']} ({m['cpu_cores']} cores), GPU: {m.get('gpu', 'none')}, torch {m['torch']}, "
        f"torchvision {m['torchvision']}, triton {m['triton']}, DALI {m['dali'] or 'not installed'}",
    ]
    return "\n".join(lines)


def plot_bench(b: dict, path: str) -> None:
    """A PNG bar chart of images/s per stage for both paths (needs matplotlib: pip install fasteval[plot])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["decode", "model", "metrics", "end_to_end"]
    labels = ["decode+preprocess", "model", "metrics", "end to end"]
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
