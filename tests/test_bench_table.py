"""``fasteval bench``'s table (fasteval/output/bench_table.py): every ratio a speed-up that says which
way it points, a short default table, the details under ``verbose``, and one compile statement."""

from __future__ import annotations

import copy
import json
import re

import pytest

from fasteval.cli import main
from fasteval.output.bench_table import WIDTH, format_bench, speedup

RATIO = re.compile(r"(\d+\.\d+)x(?![\w.])( faster| slower)?")
LONG_REASON = ("12 batch(es) of 20: on the CPU at most 20 image(s) of 224x224 a batch on these cores (its activations "
               "stay in cache), as equal as --batch-size 64 allows, 0 padding row(s) in one process (batches of 64 "
               "would pad 16)")


def _run(wall: float, compiled: bool, route: str | None = "fast path: expected 4.6 s fast") -> dict:
    """One whole command as ``bench.time_to_result`` records it."""
    return {"wall_seconds": wall, "returncode": 0, "stderr_tail": "", "main_peak_rss_mb": 876.0,
            "largest_worker_peak_rss_mb": 64.0, "tree_peak_rss_mb": 900.0, "samples": 240, "top1": 99.167,
            "warmup_seconds": 0.5, "loop_seconds": wall - 3.5, "recheck_seconds": 1.0, "setup_seconds": 2.0,
            "compile": compiled, "compile_reason": "auto: eager (channels-last + autocast), compiling would not pay",
            "route": route}


def _bench(ref_rate: float = 10.0, fast_rate: float = 20.0, cold: tuple[float, float] = (30.0, 15.0),
           warm: tuple[float, float] = (20.0, 10.0), loop_compiled: bool = True,
           command_compiled: tuple[bool, bool] = (False, False), time_to_result: bool = True) -> dict:
    """A result shaped as ``bench.run_bench`` returns it (the demo's figures, the rates and times given):
    ``cold`` and ``warm`` are the whole commands' seconds (reference, fast)."""
    stages = {"reference": {"decode": 125.7, "model": 12.4, "metrics": 1077.6, "end_to_end": ref_rate},
              "fast": {"decode": 314.0, "model": 22.5, "metrics": 2494.2, "reference_code": 144.6,
                       "reference_code_samples": 11, "end_to_end": fast_rate}}
    b = {
        "speedup": fast_rate / ref_rate,
        "agreement": 1.0,
        "config": {"path": "/data", "samples": 240, "batch_size": 64, "workers": 2, "device": "cpu", "repeats": 3,
                   "compile": "auto", "loop_compile": "on"},
        "reference": {"top1": 99.167, "top5": 100.0, "loss": 0.036495, "images_per_sec": ref_rate,
                      "warmup_seconds": 0.0},
        "fast": {"top1": 99.167, "top5": 100.0, "loss": 0.0367, "images_per_sec": fast_rate, "warmup_seconds": 7.1,
                 "loader": "pil-cpu, 2 thread(s) between batches",
                 "loader_reason": "240 image(s) on the CPU (at most 512): PIL's pixels, decoded between batches",
                 "batch_shape": 20, "batch_shape_reason": LONG_REASON, "precision": "bf16",
                 "compile": loop_compiled, "compile_reason": "--compile on; loaded from the compile cache in 2.9 s",
                 "exact": {"enabled": True, "rechecked": 11, "reason": "near-ties are rechecked"}},
        "stages": stages,
        "verdict": {"reference": "bottleneck: model (12 images/s; end to end 10)",
                    "fast": "bottleneck: model (22 images/s; end to end 20)"},
        "validation": {"agreement": 1.0, "flipped": 0},
        "memory": {"in_process": {"after_reference": {"main_peak_rss_mb": 1302.0},
                                  "after_fast": {"main_peak_rss_mb": 1528.0}}},
        "machine": {"cpu": "AMD EPYC 9654 96-Core Processor with a name long enough to need wrapping at all, "
                           "as some cloud machines report theirs", "cpu_cores": 2, "torch": "2.14.1",
                    "torchvision": "0.29.1", "triton": "3.8.0", "dali": None},
    }
    if time_to_result:
        b["time_to_result"] = {
            "reference": {"cold": _run(cold[0], False, None), "warm": _run(warm[0], False, None),
                          "warm_wall_seconds": [warm[0]] * 3},
            "fast": {"cold": _run(cold[1], command_compiled[0]), "warm": _run(warm[1], command_compiled[1]),
                     "warm_wall_seconds": [warm[1]] * 3},
            "ratio_cold": cold[1] / cold[0], "ratio_warm": warm[1] / warm[0], "repeats": 3}
    return b


def _row(table: str, label: str) -> str:
    [line] = [line for line in table.splitlines() if re.match(rf"{re.escape(label)}( \([^)]*\))?\s\s", line)]
    return line


def test_speedup_words_point_one_way():
    assert speedup(4.63) == "4.63x faster"
    assert speedup(0.5) == "2.00x slower"
    assert speedup(1.0) == "1.00x faster"
    assert speedup(float("nan")) == speedup(float("inf")) == speedup(0.0) == "-"


@pytest.mark.parametrize("verbose", [False, True])
def test_every_ratio_says_faster_or_slower_in_the_right_direction(verbose):
    # The fast path wins the loop (20 vs 10 images/s) and the cold command (15 s vs 30 s) and loses the
    # warm command (12 s vs 8 s).
    table = format_bench(_bench(cold=(30.0, 15.0), warm=(8.0, 12.0)), verbose=verbose)
    ratios = RATIO.findall(table)
    assert len(ratios) == 3 and all(word for _, word in ratios), ratios
    assert _row(table, "loop images/s").endswith("2.00x faster")
    assert _row(table, "whole command, cold").endswith("2.00x faster")
    assert _row(table, "whole command, warm").endswith("1.50x slower")


def test_a_slower_loop_says_slower():
    table = format_bench(_bench(ref_rate=10.0, fast_rate=4.0))
    assert _row(table, "loop images/s").endswith("2.50x slower")


def test_default_table_is_short_and_narrow():
    table = format_bench(_bench())
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= WIDTH
    assert all(len(line) <= WIDTH for line in format_bench(_bench(), verbose=True).splitlines())
    rows = lines[3:lines.index(next(line for line in lines if line.startswith("machine:")))]
    assert len(rows) <= 15
    assert LONG_REASON[:40] not in table  # the batch shape's reason: verbose only


def test_verbose_adds_stages_time_split_memory_and_reasons():
    b = _bench()
    short, long = format_bench(b), format_bench(b, verbose=True)
    for detail in ("stage (images/s)", "decode+preprocess", "reference code (11 samples)", "  warm-up+compile",
                   "peak RSS MB, main process", "bottleneck: model", "batch shape: 12 batch(es)", "torch 2.14.1"):
        assert detail in long and detail not in short, detail
    lines = short.splitlines()
    rows = lines[3:next(i for i, line in enumerate(lines) if line.startswith("machine:"))]
    assert len(rows) == 14 and all(_row(long, re.split(r"\s{2,}", row)[0]) for row in rows)  # the default rows stay


@pytest.mark.parametrize("loop, command, value, loop_says", [
    (True, (False, False), "no  cold and warm", "(compiled)"),  # the loop measured compiled, the commands eager
    (True, (True, True), "yes  cold and warm", None),
    (False, (False, True), "cold no, warm yes", "(eager)"),
])
def test_one_compile_statement_for_the_whole_command(loop, command, value, loop_says):
    table = format_bench(_bench(loop_compiled=loop, command_compiled=command))
    compile_rows = [line for line in table.splitlines() if line.startswith("compile")]
    assert len(compile_rows) == 1
    assert re.fullmatch(rf"compile \(whole command\)\s+no\s+{re.escape(value)}", compile_rows[0]), compile_rows
    loop_row = _row(table, "loop images/s")
    assert ("(" not in loop_row) if loop_says is None else (loop_says in loop_row)


def test_without_time_to_result_the_compile_line_is_the_loops():
    table = format_bench(_bench(loop_compiled=True, time_to_result=False))
    assert "whole command" not in table
    assert re.match(r"compile \(loop\)\s+no\s+yes\b", _row(table, "compile"))
    assert "peak RSS MB, this process" in format_bench(_bench(time_to_result=False), verbose=True)


def test_a_whole_command_routed_to_the_reference_says_so():
    b = _bench()
    for when in ("cold", "warm"):
        b["time_to_result"]["fast"][when]["route"] = ("every sample by the reference's code, the fast path would "
                                                      "not pay: expected 9.0 s fast vs 7.7 s")
    assert re.search(r"route \(whole command\)\s+reference's code\s+cold and warm", format_bench(b))
    assert re.search(r"route \(whole command\)\s+fast path\s+cold and warm", format_bench(_bench()))
    planned = _bench()  # a command's executed plan decides, whatever its reason says
    for when, value in (("cold", "reference"), ("warm", "fast")):
        planned["time_to_result"]["fast"][when]["route_value"] = value
    assert re.search(r"route \(whole command\)\s+cold reference's code, warm fast path", format_bench(planned))
    # The loader, batch and precision rows are then the timed loop's, and say so; a fast command's are its own
    for table, of in ((format_bench(b), " (loop)"), (format_bench(planned), " (loop)"), (format_bench(_bench()), "")):
        for label, fast in (("loader", "pil-cpu"), ("batch shape", "20"), ("precision", "bf16")):
            assert re.match(rf"{re.escape(label + of)}\s+\S.*\s{fast}\b", _row(table, label)), table


def test_the_result_is_not_changed():
    b = _bench()
    before = copy.deepcopy(b)
    format_bench(b, verbose=True)
    assert b == before


def test_cli_verbose_prints_the_verbose_table(small_data, weights_3cls, tmp_path, capsys):
    """One real bench through the command line: --verbose prints the verbose table of the run it writes
    to --json, stage breakdown included; the default table of that run has none."""
    out = tmp_path / "bench.json"
    assert main(["bench", small_data, "--weights", weights_3cls, "--resize", "40", "--crop", "32", "--batch-size",
                 "8", "--workers", "1", "--repeats", "1", "--compile", "off", "--no-time-to-result", "--no-progress",
                 "--verbose", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    b = json.loads(out.read_text())
    assert printed.strip() == format_bench(b, verbose=True)
    assert "stage (images/s)" in printed and "decode+preprocess" in printed
    short = format_bench(b)
    assert "stage (images/s)" not in short and "decode+preprocess" not in short
    assert all(word for _, word in RATIO.findall(printed)) and RATIO.findall(printed)
    assert max(len(line) for line in printed.splitlines()) <= WIDTH


def test_the_default_table_shows_the_fixed_costs_apart():
    """The warm commands' start, imports, setup, warm-up and report (their seconds outside the loop and the
    recheck), apart from the per-image time; without timed commands, the loop's warm-up, shown once."""
    b = _bench(warm=(20.0, 10.0))
    b["time_to_result"]["reference"]["warm"].update(setup_seconds=3.0, warmup_seconds=0.0)
    b["time_to_result"]["fast"]["warm"].update(setup_seconds=1.5, warmup_seconds=0.75)
    assert re.match(r"warm, of which fixed \(s\)\s+3\.00\s+2\.25\s+start, imports, setup, warm-up, report",
                    _row(format_bench(b), "warm, of which fixed"))
    plain = _bench(time_to_result=False)
    assert re.match(r"warm-up \(s\)\s+0\.0\s+7\.1\s+fixed", _row(format_bench(plain), "warm-up"))
    assert format_bench(plain, verbose=True).count("7.1") == 1
