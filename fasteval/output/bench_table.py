"""``fasteval bench``'s printed table and bar chart, from ``run_bench``'s result (fasteval/bench.py).

Every ratio reads one way, as the fast path's speed-up over the reference: "N.NNx faster", or
"N.NNx slower" where the fast path loses (images/s fast over reference for the loop; seconds
reference over fast for whole commands). The default table is short: the times, the figures and one
line for each thing the fast path ran; ``verbose`` adds the stage breakdown, the whole command's
time split, memory and every reason. The JSON keeps everything.
"""

from __future__ import annotations

import math
import textwrap

from fasteval.files import atomic_write

WIDTH = 100  # no printed line is longer
STAGES = {"decode": "decode+preprocess", "model": "model", "metrics": "metrics",
          "reference_code": "reference code"}
METRICS_NOTE = ("metrics: the fast path's twin also computes per row the decision margins, the top-5 classes and the "
                "confidence, which the reference does not, so on the CPU it can read slower than the reference's; "
                "either is a small fraction of a batch's time")
STAGES_NOTE = ("stages: each alone over the dataset's batches; end to end they share the machine (a loader decodes "
               "beside the model, DALI, or between its batches, PIL on the CPU), so end to end is below the slowest "
               "stage")

Row = tuple[str, str, str, str]  # label, reference, fast, note


def speedup(fast_over_reference: float) -> str:
    """The fast path's speed-up: "N.NNx faster" where ``fast_over_reference`` (a rate of the fast path
    over the reference's, or the reference's seconds over the fast path's) is at least 1, else the
    inverse as "N.NNx slower"; "-" where it is not a positive finite number."""
    if not (math.isfinite(fast_over_reference) and fast_over_reference > 0):
        return "-"
    if fast_over_reference >= 1:
        return f"{fast_over_reference:.2f}x faster"
    return f"{1 / fast_over_reference:.2f}x slower"


def _n(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else "nan" if value != value else f"{value:,.{digits}f}"


def _yes(flag) -> str:
    return "yes" if flag else "no"


def _rechecked(exact: dict) -> str:
    return f"{exact['rechecked']} samples" if exact.get("enabled") else "off"


def _recheck_note(exact: dict) -> str:
    """Where the recheck's seconds went: in the loop's time, or, overlapped with the pass, how much of its
    decoding the pass hid (workers' seconds) and the seconds left before and after the pass."""
    if exact.get("schedule") != "during the pass":
        return "near-ties, in the loop's time"
    return (f"near-ties: {exact.get('hidden_seconds', 0.0):.2f} s of decoding hidden in the pass, "
            f"{exact.get('seconds', 0.0):.2f} s before and after it")


def _workers(run: dict) -> str:
    return _n(run["largest_worker_peak_rss_mb"], 0) if run["largest_worker_peak_rss_mb"] else "none"


def _route(run: dict) -> str:
    """A whole command's route in two words: which code evaluated its samples (its executed plan's route; for
    a command of an older fasteval, from the route's reason: none, the fast path ran)."""
    if run.get("route_value") is not None:
        return "reference's code" if run["route_value"] == "reference" else "fast path"
    reason = run.get("route")
    if reason and not reason.startswith("fast path") and "every sample" in reason:
        return "reference's code"
    return "fast path"


def _cold_warm(cold: str, warm: str) -> tuple[str, str]:
    """One value and its note for a whole command's cold and warm runs: the same, or each named."""
    if cold == warm:
        return cold, "cold and warm"
    return f"cold {cold}, warm {warm}", ""


def _time_rows(t: dict) -> list[Row]:
    ref, fast = t["reference"], t["fast"]
    cold_ref, cold_fast = ref["cold"]["wall_seconds"], fast["cold"]["wall_seconds"]
    warm_ref, warm_fast = ref["warm"]["wall_seconds"], fast["warm"]["wall_seconds"]
    return [("whole command, cold (s)", _n(cold_ref, 2), _n(cold_fast, 2),
             speedup(cold_ref / cold_fast if cold_fast else math.nan)),
            ("whole command, warm (s)", _n(warm_ref, 2), _n(warm_fast, 2),
             speedup(warm_ref / warm_fast if warm_fast else math.nan))]


def _fixed_row(b: dict) -> Row:
    """The fixed costs apart from the per-image ones: each warm whole command's start, imports, setup, warm-up
    (compile) and report, the rest being its loop and recheck; without timed commands, the loop's warm-up."""
    if "time_to_result" not in b:
        return ("warm-up (s)", _n(b["reference"].get("warmup_seconds") or 0.0, 1), _n(b["fast"]["warmup_seconds"], 1),
                "fixed: not in the loop's images/s")
    ref, fast = b["time_to_result"]["reference"]["warm"], b["time_to_result"]["fast"]["warm"]
    return ("warm, of which fixed (s)", _n(ref["setup_seconds"] + ref["warmup_seconds"], 2),
            _n(fast["setup_seconds"] + fast["warmup_seconds"], 2),
            "start, imports, setup, warm-up, report")


def _compile_row(b: dict) -> tuple[Row, bool]:
    """The compile line: what ran in the timed whole command where it was timed, else in the loop; and
    whether the loop's own compile differs from what that line states (its row then says which)."""
    loop = bool(b["fast"]["compile"])
    t = b.get("time_to_result")
    if t is None:
        note = "auto compiles a long run: the steady state" if b["config"].get("compile") == "auto" and loop else ""
        return ("compile (loop)", "no", _yes(loop), note), False
    cold, warm = bool(t["fast"]["cold"]["compile"]), bool(t["fast"]["warm"]["compile"])
    value, note = _cold_warm(_yes(cold), _yes(warm))
    return ("compile (whole command)", "no", value, note), loop != cold or loop != warm


def _short_rows(b: dict) -> list[Row]:
    ref, fast, cfg = b["reference"], b["fast"], b["config"]
    rows = [*(_time_rows(b["time_to_result"]) if "time_to_result" in b else []), _fixed_row(b)]
    compile_row, loop_differs = _compile_row(b)
    how = f" ({'compiled' if fast['compile'] else 'eager'})" if loop_differs else ""
    loader, _, loader_detail = fast["loader"].partition(", ")
    rows += [
        (f"loop images/s{how}", _n(ref["images_per_sec"]), _n(fast["images_per_sec"]),
         speedup(b["speedup"])),
        ("top-1 %", _n(ref["top1"], 3), _n(fast["top1"], 3), f"{fast['top1'] - ref['top1']:+.3f}"),
        ("top-5 %", _n(ref["top5"], 3), _n(fast["top5"], 3), f"{fast['top5'] - ref['top5']:+.3f}"),
        ("loss (per sample)", _n(ref["loss"], 6), _n(fast["loss"], 6), f"{fast['loss'] - ref['loss']:+.6f}"),
        ("agreement (top-1)", "", f"{100 * b['agreement']:.2f} %", f"{b['validation']['flipped']} flipped"),
        ("exact recheck", "", _rechecked(fast.get("exact", {})), _recheck_note(fast.get("exact", {}))),
    ]
    of = ""
    if "time_to_result" in b:
        t = b["time_to_result"]["fast"]
        routes = _route(t["cold"]), _route(t["warm"])
        value, note = _cold_warm(*routes)
        rows.append(("route (whole command)", "", value, note))
        if "reference's code" in routes:  # the rows below are the timed loop's, not what that command ran
            of = " (loop)"
    rows += [
        (f"loader{of}", "DataLoader+PIL", loader, loader_detail),
        (f"batch shape{of}", str(cfg["batch_size"]), str(fast.get("batch_shape") or cfg["batch_size"]), ""),
        (f"precision{of}", "fp32", fast["precision"], ""),
        compile_row,
    ]
    return rows


def _verbose_rows(b: dict) -> list[Row]:
    """The stage breakdown, memory and the whole command's time split."""
    fast, mem = b["fast"], b["memory"]
    rows: list[Row] = []
    if "time_to_result" in b:  # the loop's own warm-up (without timed commands, the short table's fixed row)
        rows.append(("warm-up s (excluded)", "0.0", _n(fast["warmup_seconds"], 1), ""))
    else:  # no per-process sampling: the kernel's figure for this process only
        inproc = mem["in_process"]
        rows.append(("peak RSS MB, this process", _n(inproc["after_reference"]["main_peak_rss_mb"], 0),
                     _n(inproc["after_fast"]["main_peak_rss_mb"], 0), "cumulative: fast includes the reference's"))
    if "fast_peak_gpu_mb" in mem:
        rows.append(("peak GPU MB", _n(mem["reference_peak_gpu_mb"], 0), _n(mem["fast_peak_gpu_mb"], 0), ""))
    rows += [("", "", "", ""), ("stage (images/s)", "reference", "fast", "")]
    for key, label in (*STAGES.items(), ("end_to_end", "end to end")):
        if key == "reference_code":
            label = f"{label} ({b['stages']['fast'].get('reference_code_samples', 0)} samples)"
        rows.append((label, _n(b["stages"]["reference"].get(key)), _n(b["stages"]["fast"][key]), ""))
    if "time_to_result" in b:
        ref, fast_t = b["time_to_result"]["reference"]["warm"], b["time_to_result"]["fast"]["warm"]
        rows += [("", "", "", ""), ("warm whole command (s)", "reference", "fast", "")]
        for key, label in (("setup_seconds", "  start, imports, setup, report"),
                           ("warmup_seconds", "  warm-up+compile"), ("loop_seconds", "  loop"),
                           ("recheck_seconds", "  exact recheck")):
            rows.append((label, _n(ref[key], 2), _n(fast_t[key], 2), ""))
        rows += [("peak RSS MB, main process", _n(ref["main_peak_rss_mb"], 0), _n(fast_t["main_peak_rss_mb"], 0),
                  "per process"),
                 ("peak RSS MB, largest worker", _workers(ref), _workers(fast_t), "not added to the main's")]
    return rows


def _reasons(b: dict) -> list[str]:
    """Every reason behind a line of the table, one paragraph each."""
    fast = b["fast"]
    found = [("loader", fast.get("loader_reason")), ("batch shape", fast.get("batch_shape_reason")),
             ("compile (loop)", fast.get("compile_reason")), ("exact recheck", fast.get("exact", {}).get("reason"))]
    if "time_to_result" in b:
        t = b["time_to_result"]["fast"]
        for what, key in (("compile", "compile_reason"), ("route", "route")):
            cold, warm = t["cold"].get(key), t["warm"].get(key)
            if cold == warm:
                found.append((f"{what} (whole command, cold and warm)", cold))
            else:
                found += [(f"{what} (whole command, cold)", cold), (f"{what} (whole command, warm)", warm)]
    return [f"{what}: {reason}" for what, reason in found if reason]


def _table(rows: list[Row]) -> list[str]:
    """Aligned columns; a note too long for WIDTH continues on lines under its own column."""
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{'':{widths[0]}}  {'reference':>{widths[1]}}  {'fast':>{widths[2]}}"]
    indent = sum(widths) + 6
    for label, ref, fast, note in rows:
        parts = textwrap.wrap(note, max(WIDTH - indent, 20)) or [""]
        lines.append(f"{label:{widths[0]}}  {ref:>{widths[1]}}  {fast:>{widths[2]}}  {parts[0]}".rstrip())
        lines += [" " * indent + part for part in parts[1:]]
    return lines


def _wrap(paragraph: str) -> list[str]:
    return textwrap.wrap(paragraph, WIDTH, subsequent_indent="  ", break_on_hyphens=False)


def format_bench(b: dict, verbose: bool = False) -> str:
    """The side-by-side table: short by default; ``verbose`` adds the stage breakdown, the time split,
    memory, the bottlenecks and every reason."""
    cfg, m = b["config"], b["machine"]
    runs = f"median of {cfg['repeats']} runs" if cfg["repeats"] > 1 else "1 run"
    title = (f"fasteval bench: {cfg['samples']} images, batch {cfg['batch_size']}, {cfg['workers']} workers, "
             f"{cfg['device']}; loop and warm: {runs}")
    rows = _short_rows(b) + (_verbose_rows(b) if verbose else [])
    lines = [title, "-" * len(title), *_table(rows)]
    if not verbose:
        lines += _wrap(f"machine: {m['cpu']} ({m['cpu_cores']} cores), GPU: {m.get('gpu', 'none')}")
        lines.append("more: --verbose (stages, time split, memory, reasons) or --json (every figure)")
        return "\n".join(lines)
    paragraphs = [f"reference {b['verdict']['reference']}", f"fast      {b['verdict']['fast']}", STAGES_NOTE]
    if b["stages"]["fast"]["metrics"] < b["stages"]["reference"]["metrics"]:
        paragraphs.append(METRICS_NOTE)
    paragraphs += _reasons(b)
    paragraphs.append(f"machine: {m['cpu']} ({m['cpu_cores']} cores), GPU: {m.get('gpu', 'none')}, "
                      f"torch {m['torch']}, torchvision {m['torchvision']}, triton {m['triton']}, "
                      f"DALI {m['dali'] or 'not installed'}")
    for paragraph in paragraphs:
        lines += _wrap(paragraph)
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
    ax.set_title(f"fasteval bench: the fast loop {speedup(b['speedup'])} end to end ({b['config']['device']})")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, binary=True) as f:  # complete or not at all, like every output
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
