"""Reports: the readable table on stdout and the JSON file, with the run's environment."""

from __future__ import annotations

import json
import math
import os
import platform
import textwrap

import torch

from fasteval.evaluation.classes import Labelled, class_report
from fasteval.evaluation.metrics import TOPK, EvalResult
from fasteval.output.class_table import class_rows
from fasteval.versions import package_version
from fasteval.files import atomic_write


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str | None = None) -> dict:
    """Versions and hardware, so a figure can be traced to the machine that produced it."""
    import torchvision

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": package_version("triton"),
        "dali": package_version("nvidia-dali-cuda130") or package_version("nvidia-dali-cuda120"),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "device": str(device) if device is not None else None,
    }
    if device is not None and torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def run_config(data: str, arch: str, weights: str | None, spec, batch_size: int, workers: int,
               device: torch.device | str, num_classes: int, num_samples: int) -> dict:
    """The report's ``config``: what ran, the same keys for the command and the Python API. The batch
    size used is the requested one capped at the dataset's size (what both paths use on a smaller set)."""
    return {"path": os.path.abspath(data), "arch": arch, "weights": weights, "preset": spec.name,
            "resize": spec.resize, "crop": spec.crop, "preprocessing": spec.describe(),
            "batch_size": min(batch_size, num_samples), "batch_size_requested": batch_size, "workers": workers,
            "device": str(device), "classes": num_classes}


def build_report(result: EvalResult, config: dict, device: torch.device | str | None = None,
                 samples: Labelled | None = None) -> dict:
    """Every figure of a run plus its configuration and environment (the ``--json`` content); given the
    run's ``samples``, the class report too (fasteval/evaluation/classes.py)."""
    classes = class_report(result, samples) if samples is not None and result.predictions is not None else {}
    report = {**result.to_dict(), **classes, "config": config, "environment": environment(device)}
    top = result.topk_classes
    if top is not None and len(top) and bool((top[0] < 0).any()):  # -1 fills a row where the model has < TOPK
        report["model_classes"] = int((top[0] >= 0).sum())
    return report


def _fmt(value: float, digits: int = 4) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _fewer_classes(classes: int | None) -> str:
    """The top-5 row's note where the model has fewer than 5 classes: every label is then among its top 5."""
    if classes is None:
        return ""
    return f"  <- always 100 %: the model has {classes} class(es)"


def format_table(report: dict, title: str = "fasteval") -> str:
    """The human-readable summary of one run; its last rows are the plan as it ran (``report["plan"]``)."""
    plan = report.get("plan") or {}
    rows = []
    route = plan.get("route", {})
    if route.get("value") == "reference":  # said first: nothing below is the fast path's
        rows.append(("route", f"every sample by the reference's code: PIL, fp32, NCHW, eager  ({route['reason']})"))
    rows += [
        ("samples", str(report["samples"])),
        ("top-1", f"{_fmt(report['top1'], 3)} %  ({report['correct_top1']}/{report['samples']})"),
        ("top-5", f"{_fmt(report['top5'], 3)} %  ({report['correct_top5']}/{report['samples']})"
         + _fewer_classes(report.get("model_classes"))),
        ("loss (per sample)", _fmt(report["loss"], 6)),
        ("loss (mean of batch means)", _fmt(report["loss_batch_mean"], 6)
         + ("  <- differs: last batch is short" if report.get("loss_batch_mean_differs") else "")),
        ("images/s", _fmt(report["images_per_sec"], 1)),
        ("seconds", _fmt(report["seconds"], 2)),
    ]
    rows += class_rows(report)
    cfg = report.get("config", {})
    for key in ("path", "arch", "weights", "device"):
        if key in cfg:
            rows.append((key, str(cfg[key])))
    if report.get("distributed"):
        d = report["distributed"]
        rows.append(("ranks", f"{d['world_size']} ({d['backend']}), samples per rank "
                              f"{' '.join(str(n) for n in d['samples_per_rank'])}"))
    rows += plan_rows(plan)
    if report.get("warmup_seconds"):
        rows.append(("warm-up seconds", _fmt(report["warmup_seconds"], 2)))
    if "exact" in report and plan.get("route", {}).get("value") != "reference":
        rows.append(("exact counts", exact_summary(report["exact"])))
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)]
    for k, v in rows:  # long values (reasons) wrap under their value's column
        wrapped = textwrap.wrap(v, max(40, TABLE_WIDTH - width - 2), subsequent_indent="  ",
                                break_on_hyphens=False, break_long_words=False) or [""]
        lines += [f"{(k if i == 0 else '').ljust(width)}  {line}" for i, line in enumerate(wrapped)]
    return "\n".join(lines)


TABLE_WIDTH = 110  # the report's lines, a reason wrapped (a path or a class name longer than that stays whole)


# The plan's decisions a run's table shows, under these labels; a reason is shown where it adds to the value.
PLAN_ROWS = {"preprocessing": "preprocessing", "route": "route", "loader": "loader", "batch_shape": "batch shape",
             "precision": "precision", "compile": "compile", "by_reference": "by reference's code", "workers": "workers"}


def plan_rows(plan: dict) -> list[tuple[str, str]]:
    """The executed plan as table rows: ``value (reason)``, without what says nothing (no PIL-only file)."""
    rows = []
    for name, label in PLAN_ROWS.items():
        decision = plan.get(name)
        if decision is None or (name == "by_reference" and not decision["value"]) or (
                name in ("route", "by_reference") and plan["route"]["value"] == "reference"):  # said first
            continue
        value = decision["value"]
        shown = {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else \
            "none" if value is None else value
        rows.append((label, f"{shown}  ({decision['reason']})" if decision.get("reason") else str(shown)))
    return rows


# The decisions under their printed names, in the order a reader follows a run.
PLAN_LABELS = {"preprocessing": "preprocessing", "route": "route", "loader": "loader",
               "startup_decoding": "start-up decoding", "batch_shape": "batch shape", "precision": "precision", "compile": "compile", "exact": "exact counts",
               "calibration": "calibration", "by_reference": "by reference's code", "workers": "workers",
               "metrics_backend": "metrics", "dali": "DALI tuning"}


def format_plan(plan: dict, title: str, header: list[tuple[str, str]] = ()) -> str:
    """``--explain``: each decision's value on its row, its reason wrapped below it (as a query planner's
    EXPLAIN shows each node with what it will do and why). ``header``: (label, value) rows first."""
    width = max(len(label) for label in (*PLAN_LABELS.values(), *(k for k, _ in header)))
    lines = [title, "-" * len(title)] + [f"{k.ljust(width)}  {v}" for k, v in header]
    for name, decision in plan.items():
        value = decision["value"]
        shown = {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else \
            "none" if value is None else value
        lines.append(f"{PLAN_LABELS.get(name, name).ljust(width)}  {shown}")
        lines += textwrap.wrap(decision["reason"], 110, initial_indent=" " * (width + 4),
                               subsequent_indent=" " * (width + 4), break_on_hyphens=False)
    return "\n".join(lines)


def explain_report(command: str, config: dict, samples, fast: dict | None,
                   reference: dict | None = None) -> tuple[str, dict]:
    """``--explain``'s text and JSON: the fast path's plan and, for ``--reference``/``--validate`` (and a
    bench), the reference's; the JSON holds ``plan`` (and ``reference.plan``) beside the ``config``."""
    header = [("data", f"{config['path']}: {len(samples)} sample(s), {samples.num_classes} class(es)"),
              ("model", f"{config['arch']}, weights {config['weights'] or 'none (random init)'}"),
              ("device", config["device"])]
    parts = []
    if fast is not None:
        parts.append(format_plan(fast, f"{command} --explain: the plan (nothing evaluated)", header))
    if reference is not None:
        parts.append(format_plan(reference, f"{command} --explain: the reference's plan (nothing evaluated)",
                                 [] if parts else header))
    report = {"explain": True, "plan": fast or reference, "config": config}
    if fast is not None and reference is not None:
        report["reference"] = {"plan": reference}
    return "\n\n".join(parts), report


def exact_summary(exact: dict) -> str:
    """One line on the exact-count recheck: how many samples, why, what changed, the loss drift left."""
    if not exact.get("enabled") or exact.get("all_by_reference"):
        return f"{'on' if exact.get('enabled') else 'off'} ({exact.get('reason', '')})"
    return (f"{exact['rechecked']} sample(s) rechecked by the reference's code ({exact['calibration_samples']} "
            f"calibration + {exact['gated']} with margin <= tau {exact['tau']:.3g} = {exact['safety']:g} x 2 x "
            f"max logit error {exact['max_logit_error']:.3g}); {exact['changed_top1']} top-1 and "
            f"{exact['changed_top5']} top-5 result(s) changed; loss of the others: fast path's, per-sample error "
            f"up to {exact['calibration_loss_error_max']:.2g} on the {exact['calibration_samples']} calibration samples "
            f"(a bound on no other sample: --validate measures them all)")


def write_predictions(path: str, samples, result: EvalResult) -> None:
    """Per-sample CSV: path (relative to the dataset root), label, prediction, loss, the top-5 classes
    (space-separated, best first), confidence, decision margin, and whether the reference's code
    computed the row (``rechecked``: 1, else 0)."""
    import csv

    from fasteval.data.samples import relative_path

    n = len(samples)
    rechecked = result.rechecked if result.rechecked is not None else torch.zeros(n, dtype=torch.bool)
    columns = zip(samples.samples, result.predictions.tolist(), result.losses.tolist(),
                  result.topk_classes.tolist(), result.confidences.tolist(), result.margins.tolist(),
                  rechecked.tolist())
    with atomic_write(path, newline="", option="--predictions") as f:  # complete or not at all: the old file stays
        writer = csv.writer(f)
        writer.writerow(["path", "label", "prediction", "loss", "top5", "confidence", "margin", "rechecked"])
        for (file, label), pred, loss, top, conf, margin, again in columns:
            writer.writerow([relative_path(samples, file), label, pred, f"{loss:.7g}",
                             " ".join(str(c) for c in top if c >= 0), f"{conf:.6g}", f"{margin:.6g}", int(again)])


def write_json(report: dict | list, path: str) -> None:
    """Write a report (or a list of them); NaN becomes null so the file is strict JSON."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    with atomic_write(path, option="--json") as f:
        json.dump(clean(report), f, indent=2, sort_keys=False)
        f.write("\n")
