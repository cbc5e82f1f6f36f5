"""Reports: the readable table on stdout and the JSON file, with the run's environment."""

from __future__ import annotations

import json
import math
import os
import platform

import torch

from .metrics import EvalResult


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    from importlib import metadata

    for candidate in (name, name.replace("_", "-")):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


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


def build_report(result: EvalResult, config: dict, device: torch.device | str | None = None) -> dict:
    """Every figure of a run plus its configuration and environment (the ``--json`` content)."""
    return {**result.to_dict(), "config": config, "environment": environment(device)}


def _fmt(value: float, digits: int = 4) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(report: dict, title: str = "fasteval") -> str:
    """The human-readable summary of one run."""
    rows = [
        ("samples", str(report["samples"])),
        ("top-1", f"{_fmt(report['top1'], 3)} %  ({report['correct_top1']}/{report['samples']})"),
        ("top-5", f"{_fmt(report['top5'], 3)} %  ({report['correct_top5']}/{report['samples']})"),
        ("loss (per sample)", _fmt(report["loss"], 6)),
        ("loss (mean of batch means)", _fmt(report["loss_batch_mean"], 6)
         + ("  <- differs: last batch is short" if report.get("loss_batch_mean_differs") else "")),
        ("images/s", _fmt(report["images_per_sec"], 1)),
        ("seconds", _fmt(report["seconds"], 2)),
    ]
    cfg = report.get("config", {})
    for key in ("path", "arch", "weights", "device", "loader", "precision", "compile", "batch_size", "workers"):
        if key in report:
            rows.append((key, str(report[key])))
        elif key in cfg:
            rows.append((key, str(cfg[key])))
    if report.get("warmup_seconds"):
        rows.append(("warm-up seconds", _fmt(report["warmup_seconds"], 2)))
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] + [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def _make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_predictions(path: str, samples, result: EvalResult) -> None:
    """Per-sample CSV: path (relative to the dataset root), label, prediction, loss."""
    import csv

    from .samples import relative_path

    _make_parent(path)
    preds, losses = result.predictions.tolist(), result.losses.tolist()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "prediction", "loss"])
        for (file, label), pred, loss in zip(samples.samples, preds, losses):
            writer.writerow([relative_path(samples, file), label, pred, f"{loss:.7g}"])


def write_json(report: dict, path: str) -> None:
    """Write a report; NaN becomes null so the file is strict JSON."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    _make_parent(path)
    with open(path, "w") as f:
        json.dump(clean(report), f, indent=2, sort_keys=False)
        f.write("\n")
