"""A checkpoint sweep's report: the ``--json`` content, the table and the top-1 plot
(the sweep itself: fasteval/evaluation/sweep.py)."""

from __future__ import annotations

import os

import torch

from fasteval.evaluation.metrics import EvalResult
from fasteval.evaluation.stats import percent_interval
from fasteval.evaluation.sweep import TIE_BREAK, best_index, paired_test

PLOT_NAME = "checkpoints.png"  # in eval's --plot folder


def checkpoint_entry(path: str, result: EvalResult, config: dict, device, labels: torch.Tensor,
                     best: EvalResult, is_best: bool, samples=None) -> dict:
    """One checkpoint's JSON object: ``weights``, the keys a single ``eval`` writes, the 95 % Wilson
    intervals of top-1/top-5 (percent) and the paired test against the best."""
    from fasteval.output.report import build_report

    report = build_report(result, {**config, "weights": path}, device, samples)
    return {"weights": path, **report, "best": is_best,
            "top1_interval": percent_interval(result.correct_top1, result.samples),
            "top5_interval": percent_interval(result.correct_top5, result.samples),
            "vs_best": paired_test(labels, result, best)}


def build_sweep_report(paths: list[str], results: list[EvalResult], seconds: list[float], labels: torch.Tensor,
                       config: dict, device, decoded: dict, setup_seconds: float, samples=None) -> dict:
    """The sweep's ``--json`` content: ``checkpoints`` in the order given (each with its class report when
    ``samples`` are given, as a single ``eval``), the best, how the images were kept."""
    from fasteval.output.report import environment

    best = best_index(results)
    entries = [checkpoint_entry(p, r, config, device, labels, results[best], i == best, samples)
               for i, (p, r) in enumerate(zip(paths, results))]
    for entry, s in zip(entries, seconds):
        entry["pass_seconds"] = s
    return {"checkpoints": entries, "best": best, "best_weights": paths[best], "tie_break": TIE_BREAK,
            "samples": results[0].samples, "decoded": decoded, "setup_seconds": setup_seconds,
            "seconds": setup_seconds + sum(seconds), "config": {**config, "weights": paths},
            "environment": environment(device)}


def _p(value: float) -> str:
    return f"{value:.3g}" if value >= 1e-4 else f"{value:.1e}"


def format_sweep(report: dict) -> str:
    """The sweep's table: one row per checkpoint, the best marked, each against the best."""
    rows = [("", "weights", "top-1 % [95% CI]", "top-5 % [95% CI]", "loss", "vs best: only this/only best", "p")]
    for i, e in enumerate(report["checkpoints"]):
        t1, t5, vs = e["top1_interval"], e["top5_interval"], e["vs_best"]
        paired = "(best)" if e["best"] else f"{vs['only_this_correct']}/{vs['only_best_correct']}"
        rows.append(("*" if e["best"] else str(i + 1), os.path.basename(e["weights"]) or e["weights"],
                     f"{e['top1']:.2f} [{t1[0]:.2f}, {t1[1]:.2f}]", f"{e['top5']:.2f} [{t5[0]:.2f}, {t5[1]:.2f}]",
                     f"{e['loss']:.5f}", paired, "" if e["best"] else _p(vs["p_value"])))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    title = f"fasteval eval: {len(report['checkpoints'])} checkpoints on {report['samples']} samples"
    lines = [title, "-" * len(title)] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    d = report["decoded"]
    first = report["checkpoints"][0]
    passes = ", ".join(f"{e['pass_seconds']:.2f}" for e in report["checkpoints"])
    lines += ["", f"* best: {report['best_weights']} ({report['tie_break']})",
              "p: McNemar's exact test on the paired top-1 outcomes against the best (small p: not noise)",
              f"decoded once: {d.get('placement')} ({d.get('reason')}); cache: {d.get('cache')}",
              f"loader {first['loader']}, {first['precision']}, compile {first['compile']}; setup "
              f"{report['setup_seconds']:.2f} s (decode, warm-up), passes {passes} s; total {report['seconds']:.2f} s"]
    return "\n".join(lines)


def plot_sweep(report: dict, path: str) -> None:
    """Top-1 with its 95 % Wilson interval per checkpoint, the best highlighted (PNG, written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fasteval.files import atomic_write_bytes

    entries = report["checkpoints"]
    x = list(range(len(entries)))
    top1 = [e["top1"] for e in entries]
    low = [e["top1"] - e["top1_interval"][0] for e in entries]
    high = [e["top1_interval"][1] - e["top1"] for e in entries]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(entries) + 2), 4.2))
    ax.errorbar(x, top1, yerr=[low, high], fmt="o", capsize=4, color="#1f77b4", label="top-1, 95 % Wilson interval")
    b = report["best"]
    ax.plot([b], [top1[b]], "o", color="#d62728", markersize=10, label="best")
    ax.set_xticks(x, [os.path.basename(e["weights"]) for e in entries], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("top-1 %")
    ax.set_title(f"{len(entries)} checkpoints, {report['samples']} samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
