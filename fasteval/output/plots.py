"""Pictures of a run's class report (``fasteval eval ... --plot DIR``): the confusion matrix, per-class
recall with its intervals, and the reliability diagram, as PNGs.

They are drawn from the report's JSON-ready figures (``fasteval/evaluation/classes.py``), with
matplotlib's Agg renderer (no display, no pyplot state), and each PNG is written atomically: saved
to a temporary file in DIR, then renamed over its name. Beyond ``MAX_CLASSES`` classes a picture
shows a readable selection (the most confused classes, the worst recalls) and says so in its title.

Class names are folder names, drawn as ``drawable`` makes them: a byte that is not UTF-8 (Python's
surrogate escape), a character the fonts lack or a control character as its escape (``\\xe9``,
``\\u732b``), and ``$`` literally (not as mathtext), so that no name can fail or garble a picture. The
plots are written after the report, JSON and CSV: a picture that cannot be drawn is one warning, never
a failure of the run.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

from fasteval.errors import FastevalError, first_line
from fasteval.evaluation.classes import worst_classes
from fasteval.files import atomic_write, check_output_folder

MAX_CLASSES = 50  # every class is drawn up to this many
SHOWN_CONFUSED = 30  # beyond it, the confusion matrix of the most confused classes
SHOWN_WORST = 40  # beyond it, the worst recalls
ANNOTATE_UP_TO = 30  # counts written in the cells of matrices up to this size
FILES = ("confusion_matrix.png", "recall_by_class.png", "reliability.png")


def check_plot_folder(path: str) -> None:
    """Before any work: matplotlib importable, and ``path`` a folder that can be made and written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FastevalError("--plot needs matplotlib: pip install 'fasteval[plot]'") from None
    check_output_folder(path, "--plot", overwrite=True)


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else name[:width - 1] + "\u2026"


@functools.cache
def font_codes() -> frozenset[int]:
    """The code points matplotlib can draw: those of every installed font of ``font.family``, generic
    families (``sans-serif``) expanded to their lists, as matplotlib falls back through them."""
    from matplotlib import font_manager, rcParams
    from matplotlib.ft2font import FT2Font

    names = []
    for family in rcParams["font.family"]:
        names += rcParams.get(f"font.{family}", [family])
    codes: set[int] = set()
    for name in names:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
        except ValueError:  # not installed
            continue
        codes.update(FT2Font(path).get_charmap())
    if not codes:  # a configuration naming no installed font: matplotlib falls back to its default
        codes.update(FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())
    return frozenset(codes)


def drawable(name: str, codes: frozenset[int] | None = None) -> tuple[str, bool]:
    """``name`` as text matplotlib draws literally, and whether the fonts lacked one of its characters.
    A surrogate escape (a byte of a name that is not UTF-8) becomes ``\\xNN``, a character the fonts lack
    or that is not printable its ``\\u`` escape, ``$`` is escaped so that no mathtext is parsed."""
    codes = font_codes() if codes is None else codes
    out, lacked = [], False
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif not ch.isprintable():  # a control character, another lone surrogate
            out.append(ch.encode("unicode_escape").decode("ascii"))
        elif code not in codes:
            lacked = True
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append("\\$" if ch == "$" else ch)
    return "".join(out), lacked


def _labels(names: list[str]) -> list[str]:
    return [drawable(name)[0] for name in names]


def confusion_classes(matrix: list[list[int]], limit: int = MAX_CLASSES, shown: int = SHOWN_CONFUSED) -> list[int]:
    """The classes the confusion matrix picture shows, in index order: all up to ``limit`` classes, else
    the ``shown`` classes with the most errors (samples of the class predicted as another, plus samples
    of others predicted as it; ties to the lower index)."""
    size = len(matrix)
    if size <= limit:
        return list(range(size))
    errors = [sum(matrix[i]) - matrix[i][i] + sum(row[i] for row in matrix) - matrix[i][i] for i in range(size)]
    return sorted(sorted(range(size), key=lambda i: (-errors[i], i))[:shown])


def _save(fig, folder: str, name: str) -> str:
    """Write ``fig`` as ``folder/name`` atomically (temporary file in ``folder``, then rename)."""
    path = os.path.join(folder, name)
    with atomic_write(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=110)
    return path


def plot_confusion(report: dict):
    """The confusion matrix, rows the true class; colour: the fraction of the true class's samples."""
    from matplotlib.figure import Figure

    matrix, names = report["confusion_matrix"], _labels([c["class"] for c in report["per_class"]])
    keep = confusion_classes(matrix)
    sub = [[matrix[t][p] for p in keep] for t in keep]
    n = len(keep)
    side = min(22.0, max(5.5, 0.32 * n + 3.0))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    totals = [sum(matrix[t]) for t in keep]
    frac = [[v / totals[i] if totals[i] else 0.0 for v in row] for i, row in enumerate(sub)]
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class's samples")
    size = 9 if n <= 20 else 8 if n <= 30 else 6
    labels = [_short(names[i]) for i in keep]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=size)
    ax.set_yticks(range(n), labels, fontsize=size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= ANNOTATE_UP_TO:
        for i, row in enumerate(sub):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=size,
                            color="white" if frac[i][j] > 0.5 else "black")
    total = len(matrix)
    title = f"confusion matrix, {total} classes" if n == total else \
        f"confusion matrix: the {n} most confused of {total} classes (rows: all their samples)"
    ax.set_title(title)
    return fig


def plot_recall(report: dict):
    """Per-class recall, worst first, with 95 % Wilson intervals; lines at top-1 and balanced accuracy."""
    from matplotlib.figure import Figure

    per_class = report["per_class"]
    order = worst_classes(per_class, count=len(per_class))
    total = len(order)
    order = order[:SHOWN_WORST] if total > MAX_CLASSES else order
    n = len(order)
    names = _labels([c["class"] for c in per_class])
    fig = Figure(figsize=(8.0, max(3.0, 0.26 * n + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    recall = [100 * per_class[i]["recall"] for i in order]
    low = [r - 100 * per_class[i]["recall_interval"][0] for r, i in zip(recall, order)]
    high = [100 * per_class[i]["recall_interval"][1] - r for r, i in zip(recall, order)]
    ax.barh(range(n), recall, xerr=[low, high], color="tab:blue", alpha=0.75, ecolor="0.25", capsize=2)
    size = 9 if n <= 25 else 7
    ax.set_yticks(range(n), [f"{_short(names[i])} ({per_class[i]['correct_top1']}/"
                             f"{per_class[i]['samples']})" for i in order], fontsize=size)
    ax.set_ylim(n - 0.5, -0.5)  # worst at the top, no empty margin
    ax.set_xlim(0, 100)
    ax.set_xlabel("recall (%), 95 % Wilson interval")
    ax.axvline(report["top1"], color="tab:red", linestyle="--", linewidth=1, label=f"top-1 {report['top1']:.1f} %")
    balanced = report.get("balanced_accuracy")
    if balanced is not None:
        ax.axvline(100 * balanced, color="tab:green", linestyle=":", linewidth=1.2,
                   label=f"balanced accuracy {100 * balanced:.1f} %")
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("recall by class, worst first" if n == total else
                 f"recall: the {n} worst of {total} classes")
    return fig


def plot_reliability(report: dict):
    """Accuracy against confidence per bin (the diagonal is perfect calibration), samples per bin below."""
    from matplotlib.figure import Figure

    cal = report["calibration"]
    bins = [dict(b) for b in cal["reliability"]]
    last = bins.pop()  # confidences of exactly 1 (a bin of their own, as torchmetrics bins): drawn in the top bin
    if last["samples"]:
        top = bins[-1]
        count = top["samples"] + last["samples"]
        for key in ("confidence", "accuracy"):
            top[key] = ((top[key] or 0.0) * top["samples"] + last[key] * last["samples"]) / count
        top["samples"] = count
    fig = Figure(figsize=(6.0, 6.8), layout="constrained")
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = bins[0]["high"] - bins[0]["low"]
    full = [b for b in bins if b["samples"]]
    ax.bar([b["low"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
           color="tab:blue", alpha=0.8, edgecolor="white", label="accuracy in the bin")
    ax.bar([b["low"] for b in full], [b["confidence"] - b["accuracy"] for b in full],
           bottom=[b["accuracy"] for b in full], width=width, align="edge", fill=False, hatch="///",
           edgecolor="tab:red", linewidth=0.8, label="gap to the bin's mean confidence")
    ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (top-1)")
    ece, brier = cal.get("ece"), cal.get("brier")
    fmt = lambda v: "n/a" if v is None or v != v else f"{v:.4f}"  # noqa: E731
    ax.set_title(f"reliability ({cal['bins']} bins): ECE {fmt(ece)}, Brier {fmt(brier)}")
    fig.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)  # clear of the bars
    bars = hist.bar([b["low"] for b in bins], [b["samples"] for b in bins], width=width, align="edge", color="0.5",
                    edgecolor="white")
    hist.bar_label(bars, labels=[str(b["samples"]) if b["samples"] else "" for b in bins], fontsize=7)
    hist.margins(y=0.25)  # room for the counts: a bin of 1 sample is as visible as its number
    hist.set_xlabel("confidence (softmax probability of the prediction)")
    hist.set_ylabel("samples")
    return fig


def write_plots(report: dict, folder: str) -> list[str]:
    """Write the three PNGs of ``report`` (a report holding the class report's keys) into ``folder``; the
    paths written. A folder that cannot be written is a FastevalError; a picture that cannot be drawn (a
    fault of the drawing, found after the other outputs were written) is one warning line and is skipped.
    Class names the fonts cannot draw are escaped (``drawable``) and said in one line."""
    lacking = [c["class"] for c in report["per_class"] if drawable(c["class"])[1]]
    if lacking:
        print(f"fasteval: note: --plot: {len(lacking)} class name(s) have characters the fonts lack, drawn as "
              f"escapes (e.g. {drawable(lacking[0])[0]}); a font with them in matplotlib's font.family draws them",
              file=sys.stderr)
    written = []
    try:
        os.makedirs(folder, exist_ok=True)
        for draw, name in zip((plot_confusion, plot_recall, plot_reliability), FILES):
            try:
                with warnings.catch_warnings():
                    # Missing glyphs were escaped above; whatever the font check missed stays off stderr.
                    warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
                    written.append(_save(draw(report), folder, name))
            except OSError:
                raise
            except Exception as exc:
                print(f"fasteval: warning: --plot: cannot draw {name}, skipped: {type(exc).__name__}: "
                      f"{first_line(exc)}", file=sys.stderr)
    except OSError as exc:
        raise FastevalError(f"--plot {folder}: cannot write: {exc.strerror or exc}") from None
    return written
