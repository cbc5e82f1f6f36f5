"""Many checkpoints on one dataset: decoded once, compiled once, ranked with paired statistics.

One ``FastEvaluator`` is built for the first checkpoint, its batches coming from the decoded store
(fasteval/data/decoded.py); every checkpoint's weights are then copied into its compiled model and
its reference model in place, so each pass runs the same graph on the same decoded images. Each
checkpoint's result is what ``fasteval eval`` of that checkpoint alone gives (same counts, the loss
within float tolerance). The best checkpoint is the highest top-1; ties go to the higher top-5,
then the lower mean loss, then the one given first. Each checkpoint is compared with the best by
McNemar's exact test on the paired per-sample top-1 correctness.
"""

from __future__ import annotations

import glob
import os
import sys
import time

import torch

from fasteval.errors import FastevalError
from fasteval.evaluation.metrics import EvalResult
from fasteval.evaluation.stats import mcnemar_exact, percent_interval

CHECKPOINT_EXTENSIONS = (".pt", ".pth")
TIE_BREAK = "highest top-1; ties: higher top-5, then lower loss, then the first given"
PLOT_NAME = "checkpoints.png"


def expand_weights(values: list[str]) -> list[str]:
    """``--weights`` values as checkpoint paths, in the order given: a folder becomes its *.pt/*.pth
    files (sorted), a pattern that names no file its glob matches (sorted), anything else itself
    (``DEFAULT``, a path, checked when loaded)."""
    paths: list[str] = []
    for value in values:
        if os.path.isdir(value):
            found = sorted(os.path.join(value, n) for n in os.listdir(value)
                           if n.lower().endswith(CHECKPOINT_EXTENSIONS) and os.path.isfile(os.path.join(value, n)))
            if not found:
                raise FastevalError(f"--weights {value} is a folder with no *.pt or *.pth checkpoint files")
            paths.extend(found)
        elif not os.path.exists(value) and glob.has_magic(value):
            found = sorted(p for p in glob.glob(value) if os.path.isfile(p))
            if not found:
                raise FastevalError(f"--weights {value}: the pattern matches no file")
            paths.extend(found)
        else:
            paths.append(value)
    return paths


def split_sweep(args) -> bool:
    """Expand ``args.weights`` (eval's list) in place: one checkpoint leaves ``args.weights`` that path
    (``eval`` as it always was) and returns False; several set ``args.checkpoints`` and
    ``args.weights`` the first, resolve ``--plot``, refuse what a sweep cannot do, and return True."""
    values = args.weights or []
    paths = expand_weights(values) if values else []
    args.checkpoints = paths
    if len(paths) <= 1:
        args.weights = paths[0] if paths else None
        return False
    for option, on in (("--reference", args.reference), ("--validate", args.validate),
                       ("--predictions", args.predictions)):
        if on:
            raise FastevalError(f"{option} evaluates one checkpoint; it cannot be combined with several --weights")
    if args.data is None:
        raise FastevalError("the built-in demo uses its own model: give DATA to evaluate several --weights")
    from fasteval.distributed import detect_launch

    launch = detect_launch()
    if launch is not None and launch.world_size > 1:
        raise FastevalError("a checkpoint sweep runs in one process: launch it without torchrun (or evaluate each "
                            "checkpoint under torchrun)")
    args.weights = paths[0]
    return True


def check_checkpoints(arch: str, paths: list[str], num_classes: int) -> None:
    """Check every checkpoint before any work (mapped, not read: each is read once, in its turn): each
    must fit ``arch`` and the first checkpoint's class count (the dataset's), whatever format a training
    script saved it in."""
    from fasteval.model.models import build_model, head_name, n_classes

    head = head_name(arch)
    first = None
    for path in paths:
        model = build_model(arch, path, None, check_only=True)
        classes = model.get_submodule(head)
        classes = getattr(classes, "out_features", None) or getattr(classes, "out_channels")
        if first is None:
            first = (path, classes)
        elif classes != first[1]:
            raise FastevalError(f"--weights {path} have a {classes}-class head but the first checkpoint "
                                f"{first[0]} has {n_classes(first[1])}")
    if first is not None and first[1] != num_classes:
        raise FastevalError(f"--weights {first[0]} have a {first[1]}-class head but the dataset has "
                            f"{n_classes(num_classes)}")


def best_index(results: list[EvalResult]) -> int:
    """The best checkpoint by top-1, ties broken as ``TIE_BREAK`` says."""
    return min(range(len(results)), key=lambda i: (-results[i].correct_top1, -results[i].correct_top5,
                                                   results[i].loss_sum, i))


def paired_test(labels: torch.Tensor, result: EvalResult, best: EvalResult) -> dict:
    """McNemar's exact test of ``result`` against ``best`` on per-sample top-1 correctness."""
    this = result.predictions == labels
    other = best.predictions == labels
    only_this, only_best = int((this & ~other).sum()), int((~this & other).sum())
    return {"only_this_correct": only_this, "only_best_correct": only_best,
            "p_value": mcnemar_exact(only_this, only_best)}


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


def run_sweep(evaluator, arch: str, paths: list[str], progress: bool = True) -> tuple[list[EvalResult], list[float]]:
    """Every checkpoint through one evaluator (built with the first's weights), in order; the results
    and the seconds each pass took (loading its weights included)."""
    from fasteval.model.models import build_model

    results, seconds = [], []
    for i, path in enumerate(paths):
        start = time.perf_counter()
        if i > 0:
            evaluator.load_weights(build_model(arch, path, None))
        results.append(evaluator.run(progress))
        seconds.append(time.perf_counter() - start)
    return results, seconds


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

    from fasteval.output.files import atomic_write_bytes

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


def cmd_sweep(args, prepare) -> int:
    """``fasteval eval DATA --weights A B C``: check everything, decode once, compile once, run each."""
    from fasteval.cli import fast_options
    from fasteval.data.decoded import DecodedSource, check_cache_dir
    from fasteval.evaluation.fast import FastEvaluator
    from fasteval.output.report import write_json

    if args.cache:
        check_cache_dir(args.cache)
    samples, spec, device, model, config = prepare(args)
    check_checkpoints(args.arch, args.checkpoints, samples.num_classes)
    start = time.perf_counter()
    source = DecodedSource(args.cache)
    evaluator = FastEvaluator(samples, model, spec, device, fast_options(args), batch_source=source,
                              passes=len(args.checkpoints))
    setup = time.perf_counter() - start
    results, seconds = run_sweep(evaluator, args.arch, args.checkpoints, progress=not args.no_progress)
    labels = torch.tensor(samples.labels)
    decoded = dict(source.info) if source.info else {"placement": "none", "reason": "every sample by the reference's "
                                                                                     "code", "cache": "off"}
    report = build_sweep_report(args.checkpoints, results, seconds, labels, config, device, decoded, setup, samples)
    print(format_sweep(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot_sweep(report, os.path.join(args.plot, PLOT_NAME))
    print(f"fasteval: {len(args.checkpoints)} checkpoints in {report['seconds']:.1f} s", file=sys.stderr)
    return 0
