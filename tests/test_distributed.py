"""Distributed evaluation under torchrun (fasteval/distributed.py): the one-process result, for any world size.

The pure parts (shards, the calibration's share, the dataset comparison, the merged recheck report,
torchrun's environment) are checked in-process; the whole command runs under torchrun with gloo on
the CPU and is compared with one process (``fasteval eval`` without torchrun), file by file.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fasteval import cli, distributed
from fasteval.data.samples import discover
from fasteval.data.synth import synth_dataset
from fasteval.distributed import (CommunicationFailed, Launch, RankFailed, TorchrunRanks, calibration_share,
                                  dataset_entries, detect_launch, first_difference, rank_device, reports_error,
                                  shard_bounds, timeout_seconds)
from fasteval.errors import FastevalError, Terminated
from fasteval.evaluation.exact import WholeRun, calibration_positions, merge_reports
from fasteval.evaluation.fast import FastOptions, evaluate_fast
from fasteval.evaluation.reference import evaluate_reference

RANK_SCRIPT = str(Path(__file__).with_name("distributed_rank.py"))
SMALL = ["--resize", "40", "--crop", "32", "--workers", "0", "--compile", "off", "--device", "cpu", "--no-progress"]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --- the pure parts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 3, 7, 10, 50_000])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shards_are_disjoint_contiguous_and_cover_every_sample_once(n, world):
    blocks = [shard_bounds(n, r, world) for r in range(world)]
    covered = [i for start, stop in blocks for i in range(start, stop)]
    assert covered == list(range(n))  # in rank order = sample order: no duplicate, no drop, no padding
    sizes = [stop - start for start, stop in blocks]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("counts", [[3, 4], [0, 1, 1, 1], [5, 0, 6], [1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 2], [40, 41]])
def test_calibration_shares_are_the_one_process_calibration(counts):
    whole = calibration_positions(sum(counts))
    gathered, before = [], 0
    for rank, n in enumerate(counts):
        share, total = calibration_share(counts, rank)
        assert total == len(whole) and all(0 <= p < n for p in share)
        gathered += [before + p for p in share]
        before += n
    assert gathered == whole


def test_a_different_dataset_is_named_by_its_first_differing_file():
    entries = [("a/1.jpg", 10, 0), ("a/2.jpg", 11, 0), ("b/1.jpg", 12, 1)]
    classes = ["a", "b"]
    same = (classes, list(entries))
    assert first_difference(same, (classes, entries)) is None
    resized = (classes, [entries[0], ("a/2.jpg", 99, 0), entries[2]])
    assert first_difference(resized, (classes, entries)) == \
        "the first differing file is a/2.jpg (99 bytes here, 11 on rank 0)"
    missing = (classes, [entries[0], entries[2]])
    assert "a/2.jpg (on rank 0 but not here)" in first_difference(missing, (classes, entries))
    extra = (classes, entries + [("b/2.jpg", 5, 1)])
    assert "b/2.jpg (here but not on rank 0)" in first_difference(extra, (classes, entries))
    assert "class folders differ (e.g. c)" in first_difference((["a", "b", "c"], entries), (classes, entries))


def test_dataset_entries_are_relative_paths_sizes_and_labels(small_data):
    samples = discover(small_data)
    entries = dataset_entries(samples)
    assert len(entries) == len(samples)
    path, label = samples.samples[8]
    assert entries[8] == (os.path.relpath(path, small_data), os.path.getsize(path), label)


def test_merged_recheck_report_sums_counts_and_weights_the_mean():
    common = {"enabled": True, "tau": 0.5, "safety": 3.0, "max_logit_error": 1 / 12}
    a = {**common, "calibration_samples": 3, "gated": 2, "rechecked": 5, "changed_top1": 1, "changed_top5": 0,
         "calibration_loss_error_mean": 0.1, "calibration_loss_error_max": 0.3, "seconds": 2.0}
    b = {**common, "calibration_samples": 1, "gated": 0, "rechecked": 1, "changed_top1": 0, "changed_top5": 1,
         "calibration_loss_error_mean": -0.2, "calibration_loss_error_max": 0.2, "seconds": 3.0}
    empty = {**common, "calibration_samples": 0, "gated": 0, "rechecked": 0, "changed_top1": 0, "changed_top5": 0,
             "calibration_loss_error_mean": 0.0, "calibration_loss_error_max": 0.0, "seconds": 0.1}
    merged = merge_reports([empty, a, b])
    assert {k: merged[k] for k in ("calibration_samples", "gated", "rechecked", "changed_top1", "changed_top5")} == \
        {"calibration_samples": 4, "gated": 2, "rechecked": 6, "changed_top1": 1, "changed_top5": 1}
    assert merged["calibration_loss_error_mean"] == pytest.approx((3 * 0.1 - 0.2) / 4)
    assert merged["calibration_loss_error_max"] == 0.3 and merged["seconds"] == 3.0 and merged["tau"] == 0.5


def test_torchrun_environment_is_read_and_checked():
    assert detect_launch({}) is None
    env = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert detect_launch(env) == Launch(rank=2, world_size=4, local_rank=0)
    for bad, named in (({**env, "RANK": "4"}, "RANK=4"), ({**env, "WORLD_SIZE": "x"}, "WORLD_SIZE='x'"),
                       ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT not set")):
        with pytest.raises(FastevalError, match=named):
            detect_launch(bad)
    assert timeout_seconds({}) == 1800 and timeout_seconds({"FASTEVAL_DIST_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-3", "soon", "inf", "nan"):
        with pytest.raises(FastevalError, match="FASTEVAL_DIST_TIMEOUT"):
            timeout_seconds({"FASTEVAL_DIST_TIMEOUT": bad})


def test_each_rank_takes_its_local_device():
    launch = Launch(rank=1, world_size=2, local_rank=1)
    assert rank_device("cpu", launch) == "cpu"
    with pytest.raises(FastevalError, match="cuda:LOCAL_RANK"):
        rank_device("cuda:0", launch)
    if not torch.cuda.is_available():
        assert rank_device("auto", launch) == "cpu"
        with pytest.raises(FastevalError, match="CUDA is not available"):
            rank_device("cuda", launch)


def test_the_reference_evaluates_a_shard_as_a_block_of_imagefolder(small_data, small_spec):
    from torch.utils.data import Subset

    from fasteval.evaluation.reference import reference_dataset

    samples = discover(small_data)
    block = reference_dataset(samples.subset(list(range(5, 12))), small_spec)
    assert isinstance(block, Subset) and list(block.indices) == list(range(5, 12))
    assert len(reference_dataset(samples.subset([]), small_spec)) == 0
    with pytest.raises(FastevalError, match="list different samples"):
        reference_dataset(samples.subset([1, 3]), small_spec)


def fake_group(monkeypatch, others):
    """torch.distributed.all_gather_object answering with ``others(mine)`` (every rank's entry): the
    exchange protocol without a process group."""
    import torch.distributed as dist

    def all_gather_object(out, mine):
        out[:] = others(mine)

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)


def ranks_at(rank: int) -> TorchrunRanks:
    return TorchrunRanks(Launch(rank=rank, world_size=3, local_rank=rank), "gloo", "cpu")


def test_exchange_returns_payloads_in_rank_order(monkeypatch):
    fake_group(monkeypatch, lambda mine: [(None, "a"), mine, (None, "c")])
    assert ranks_at(1).exchange("b") == ["a", "b", "c"]


def test_a_failed_rank_raises_everywhere_and_rank_0_says_it_once(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "_error_said", False)  # this process's flag, restored afterwards
    fake_group(monkeypatch, lambda mine: [mine, (None, None), ("cannot decode image x.jpg: truncated", None)])
    with pytest.raises(RankFailed, match=r"^rank 2: cannot decode image x.jpg: truncated$") as failed:
        ranks_at(0).exchange()
    assert capsys.readouterr().err == "fasteval: error: rank 2: cannot decode image x.jpg: truncated\n"
    assert not reports_error(failed.value, {"RANK": "0"})  # printed already: main() stays quiet,
    assert not reports_error(Terminated(), {"RANK": "0"})  # and about torchrun's SIGTERM after it
    with pytest.raises(RankFailed) as failed:
        ranks_at(1).exchange()
    assert capsys.readouterr().err == "" and not reports_error(failed.value, {"RANK": "1"})


def test_the_same_failure_on_every_rank_is_one_plain_line(monkeypatch):
    fake_group(monkeypatch, lambda mine: [("weights file not found: w.pt", None)] * 3)
    with pytest.raises(RankFailed, match=r"^weights file not found: w.pt$"):
        ranks_at(1).exchange(error="weights file not found: w.pt")


def test_a_failing_step_tells_the_others_or_says_it_itself(monkeypatch):
    sent = []
    fake_group(monkeypatch, lambda mine: sent.append(mine) or [(None, None), mine, (None, None)])

    def bad():
        raise FastevalError("cannot decode image y.jpg: truncated")

    with pytest.raises(RankFailed, match="^rank 1: cannot decode image y.jpg"):
        ranks_at(1).step(bad)
    assert sent == [("cannot decode image y.jpg: truncated", None)]
    assert ranks_at(1).step(lambda x: x + 1, 2) == 3  # success: an exchange with no error, then the value

    def broken(out, mine):
        raise RuntimeError("Connection closed by peer. Check the logs.")

    import torch.distributed as dist

    monkeypatch.setattr(dist, "all_gather_object", broken)
    with pytest.raises(FastevalError, match="^cannot decode image y.jpg") as own:
        ranks_at(1).step(bad)  # nobody to tell: the failing rank prints its own line
    assert reports_error(own.value, {"RANK": "1"})
    with pytest.raises(CommunicationFailed, match=r"rank 1: the other ranks stopped answering .*: "
                                                  r"Connection closed by peer$") as lost:
        ranks_at(1).exchange()
    assert not reports_error(lost.value, {"RANK": "1"}) and reports_error(lost.value, {"RANK": "0"})


def test_a_rank_whose_process_ended_is_named_with_its_signal_while_it_can_be_read():
    """``died``: a rank of this machine whose process ended, named with its signal while it is a zombie (not
    yet reaped by torchrun), as the one that ended first once gone (a rank that timed out exits too); one
    that torchrun stopped (SIGTERM) is never the news; None while every rank runs. A rank killed by a signal
    is reported by the first rank still running."""
    import signal
    import socket

    killed = os.fork()
    if killed == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    stopped = os.fork()
    if stopped == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)  # reaped, as torchrun reaps a rank before it stops the others
    time.sleep(0.2)
    try:
        host, me = socket.gethostname(), os.getpid()
        ranks = TorchrunRanks(Launch(rank=2, world_size=4, local_rank=2), "gloo", "cpu",
                              places=[(host, stopped), (host, killed), (host, me), ("elsewhere", 1)])
        died = ranks.died()
        assert str(died) == f"rank 1 died (signal KILL; pid {killed}): the run stopped without a result"
        assert isinstance(died, FastevalError) and died.fasteval_report  # ranks 0 and 1 ended: rank 2 says it
        ranks.places[1] = (host, gone)
        died = ranks.died()
        assert str(died) == (f"rank 1 ended first, without a word (its exit code in torchrun's summary; pid {gone}): "
                             f"the run stopped without a result")
        assert not died.fasteval_report  # it may have said its own line
        ranks.places[:2] = [(host, me), (host, me)]
        assert ranks.died(wait_s=0.1) is None  # every rank here runs; rank 3 is on another machine
    finally:
        os.waitpid(killed, 0)
        os.waitpid(stopped, 0)


class ShardScope(WholeRun):
    """A shard of a 21-sample run, as RankScope decides it, without a process group: the run's size,
    the first and last of this shard's samples as its calibration share out of 8, and the run's error."""

    def __init__(self, run_error: float) -> None:
        self.run_error, self.errors = run_error, []

    def total(self, local: int) -> int:
        return 21

    def calibration(self, main: list[int]) -> tuple[list[int], int]:
        return sorted({main[0], main[-1]}) if main else [], 8

    def max_error(self, error: float) -> float:
        self.errors.append(error)
        return max(error, self.run_error)


FAST = FastOptions(loader="torchvision", precision="fp32", compile=False, batch_size=4, workers=0)


def test_a_shard_rechecks_with_the_whole_runs_tau(small_data, model_3cls, small_spec):
    shard = discover(small_data).subset(list(range(5, 12)))  # 7 samples: alone, the reference would take them all
    scope = ShardScope(run_error=1e3)  # another rank saw a huge logit error: every margin here is below tau
    result = evaluate_fast(shard, model_3cls, small_spec, options=FAST, progress=False, scope=scope)
    exact = result.extra["exact"]
    assert not exact.get("all_by_reference") and exact["tau"] == 6e3 and exact["calibration_samples"] == 2
    assert len(scope.errors) == 1 and 0 <= scope.errors[0] < 1e-3  # its own error, fp32 against fp32
    assert result.rechecked.all() and exact["gated"] == 5 and result.samples == 7


def test_an_empty_shard_joins_the_recheck_and_returns_typed_empty_outputs(small_data, model_3cls, small_spec):
    empty = discover(small_data).subset([])
    scope = ShardScope(run_error=0.1)
    fast = evaluate_fast(empty, model_3cls, small_spec, options=FAST, progress=False, scope=scope)
    assert scope.errors == [0.0] and fast.samples == 0 and fast.extra["exact"]["rechecked"] == 0
    reference = evaluate_reference(empty, model_3cls, small_spec, batch_size=4, workers=0, progress=False)
    for result in (fast, reference):
        outputs = result.per_sample()
        assert outputs["topk_classes"].shape == (0, 5) and outputs["predictions"].dtype == torch.int64
        assert outputs["topk_hits"].dtype == torch.bool and outputs["losses"].dtype == torch.float32


# --- the whole command under torchrun (gloo, CPU) ----------------------------------------------------------

def tree(root: Path, per_class: int, keep: int) -> str:
    """``keep`` tiny JPEGs in 3 classes (the last files dropped): sizes that no world size divides."""
    data = synth_dataset(root, classes=3, per_class=per_class, size="64x64", seed=11)
    files = sorted(Path(data).rglob("*.jpg"))
    for extra in files[keep:]:
        extra.unlink()
    return data


def torchrun(nproc: int, *args: str, env: dict | None = None, script: str | None = None):
    """``python -m torch.distributed.run`` (torchrun) with ``nproc`` gloo ranks on this machine."""
    clean = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *(["-m", "fasteval"] if script is None else [script]), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**clean, "OMP_NUM_THREADS": "1", **(env or {})})
    return proc, time.perf_counter() - start


def one_process(*args: str) -> None:
    assert cli.main(list(args)) == 0


def rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


COUNTS = ("samples", "correct_top1", "correct_top5", "loss_sum", "loss_batch_mean")
# The class report comes from the gathered per-sample outputs: its counts are one process's.
CLASS_REPORT = ("per_class", "confusion_matrix", "macro", "balanced_accuracy", "calibration", "intervals",
                "worst_classes", "confused_pairs")
# What holds across world sizes (docs/distributed.md, "What is guaranteed"): every count, prediction
# and top-5 set is one process's; a float only to the rounding of the arithmetic that made it. A
# sample's logits can depend on the rest of its batch (oneDNN with AMX on Intel CPUs: last-bit
# differences), and a rank's batches are not one process's. fp32 values: 1e-5 relative; bf16 ones (the fast path's unrechecked
# samples): 1e-2, a few bf16 roundings.
FP32_REL, BF16_REL = 1e-5, 1e-2


def assert_close_tree(one, many, rel: float, where: str = "") -> None:
    """``one`` and ``many`` (JSON values) equal, except floats, which agree to ``rel`` (and 1e-6 absolute):
    integers, strings, booleans and the structure compare exactly."""
    assert type(one) is type(many), where
    if isinstance(one, float):
        assert many == pytest.approx(one, rel=rel, abs=1e-6, nan_ok=True), where
    elif isinstance(one, dict):
        assert sorted(one) == sorted(many), where
        for key in one:
            assert_close_tree(one[key], many[key], rel, f"{where}.{key}")
    elif isinstance(one, list):
        assert len(one) == len(many), where
        for i, (a, b) in enumerate(zip(one, many)):
            assert_close_tree(a, b, rel, f"{where}[{i}]")
    else:
        assert one == many, where


def assert_same_run(one: dict, many: dict, world: int, rel: float) -> None:
    assert [many[k] for k in COUNTS[:3]] == [one[k] for k in COUNTS[:3]]  # the counts: exactly
    assert_close_tree({k: one[k] for k in COUNTS[3:] + CLASS_REPORT}, {k: many[k] for k in COUNTS[3:] + CLASS_REPORT},
                      rel)
    assert many["distributed"]["world_size"] == world and many["distributed"]["backend"] == "gloo"
    assert sum(many["distributed"]["samples_per_rank"]) == one["samples"]
    assert "distributed" not in one


CSV_FLOATS = ("loss", "confidence", "margin")


def assert_same_rows(one_csv, many_csv, rel: float) -> None:
    """The predictions CSVs: every path, label, prediction, top-5 set and recheck flag equal; the floats
    to ``rel``."""
    one, many = rows(one_csv), rows(many_csv)
    assert one[0] == many[0] and len(one) == len(many)
    floats = [one[0].index(name) for name in CSV_FLOATS]
    for a, b in zip(one[1:], many[1:]):
        assert [v for i, v in enumerate(a) if i not in floats] == [v for i, v in enumerate(b) if i not in floats]
        assert_close_tree([float(a[i]) for i in floats], [float(b[i]) for i in floats], rel, a[0])


def test_the_comparison_tolerates_rounding_and_nothing_else():
    """The helpers above: a last-bit float difference passes; a changed count, prediction or key fails."""
    run = {"samples": 3, "correct_top1": 2, "correct_top5": 3, "loss_sum": 1.25, "loss_batch_mean": 0.4}
    assert_close_tree(run, {**run, "loss_sum": 1.25 * (1 + 3e-7)}, FP32_REL)
    for changed in ({**run, "loss_sum": 1.26}, {**run, "correct_top1": 1}, {**run, "correct_top1": 2.0000001},
                    {k: v for k, v in run.items() if k != "loss_batch_mean"}):
        with pytest.raises(AssertionError):
            assert_close_tree(run, changed, FP32_REL)


@pytest.mark.slow
@pytest.mark.parametrize("world, per_class, keep, batch", [(2, 3, 7, 5), (4, 1, 3, 4)], ids=["7-on-2", "3-on-4"])
def test_fast_path_under_torchrun_is_one_process(tmp_path, weights_3cls, world, per_class, keep, batch):
    """7 samples at --batch-size 5: the fast path's shape is 4 (4+3) in one process and on both ranks (3, 4)."""
    data = tree(tmp_path / "data", per_class, keep)
    opts = ["--weights", weights_3cls, "--batch-size", str(batch), "--exact", "off", "--precision", "fp32", *SMALL]
    one_process("eval", data, *opts, "--json", str(tmp_path / "one.json"), "--predictions", str(tmp_path / "one.csv"))
    proc, _ = torchrun(world, "eval", data, *opts, "--json", str(tmp_path / "n.json"),
                       "--predictions", str(tmp_path / "n.csv"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("fasteval eval") == 1  # only rank 0 reports
    one, many = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "n"))
    assert_same_run(one, many, world, FP32_REL)
    assert many["distributed"]["samples_per_rank"] == {2: [3, 4], 4: [0, 1, 1, 1]}[world]  # rank 0 may hold none
    assert_same_rows(tmp_path / "one.csv", tmp_path / "n.csv", FP32_REL)
    assert sorted(os.listdir(tmp_path)) == ["data", "n.csv", "n.json", "one.csv", "one.json"]
    assert one["batch_shape"] == many["batch_shape"] == {2: 4, 4: 3}[world]


@pytest.mark.slow
def test_recheck_and_validate_under_torchrun_match_one_process(tmp_path, weights_3cls):
    """Default --exact (10 samples: calibration over every rank, one tau), bf16, and --validate (the
    reference sharded too): the fast path's counts, predictions and recheck are one process's; its floats
    to bf16's rounding."""
    data = tree(tmp_path / "data", 4, 10)
    opts = ["--weights", weights_3cls, "--batch-size", "4", "--validate", *SMALL]
    one_process("eval", data, *opts, "--json", str(tmp_path / "one.json"), "--predictions", str(tmp_path / "one.csv"))
    proc, _ = torchrun(3, "eval", data, *opts, "--json", str(tmp_path / "n.json"),
                       "--predictions", str(tmp_path / "n.csv"))
    assert proc.returncode == 0, proc.stderr
    one, many = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "n"))
    assert_same_run(one, many, 3, BF16_REL)
    assert many["distributed"]["samples_per_rank"] == [3, 3, 4]
    assert many["exact"]["calibration_samples"] == 8
    counts = ("calibration_samples", "gated", "rechecked", "changed_top1", "changed_top5")
    assert {k: many["exact"][k] for k in counts} == {k: one["exact"][k] for k in counts}
    # tau and the logit error come from the calibration samples' fp32 logits, batched differently on ranks.
    assert_close_tree({k: one["exact"][k] for k in ("tau", "max_logit_error")},
                      {k: many["exact"][k] for k in ("tau", "max_logit_error")}, FP32_REL)
    assert_same_rows(tmp_path / "one.csv", tmp_path / "n.csv", BF16_REL)
    ref_one, ref_many = one["reference"], many["reference"]
    assert [ref_many[k] for k in COUNTS[:3]] == [ref_one[k] for k in COUNTS[:3]]
    # The one-process reference sums float64 batch losses; sharded, it is the float64 sum of its fp32 per-sample
    # losses (docs/distributed.md), each from a rank's own batches: equal to fp32 rounding.
    assert ref_many["loss_sum"] == pytest.approx(ref_one["loss_sum"], rel=FP32_REL)
    assert many["validation"]["flipped"] == one["validation"]["flipped"]


def error_lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("fasteval: error")]


def assert_clean_failure(proc) -> None:
    """The first rank to end exited 2 (fasteval's error exit; torchrun then stops the others, whose exit
    codes race with its signal), and no rank printed a traceback (torchrun's own summary is not fasteval's)."""
    assert "exitcode  : 2 " in proc.stderr.split("Root Cause")[1].split("=====")[0], proc.stderr
    assert "fasteval/" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_a_rank_with_another_copy_of_the_dataset_stops_every_rank(tmp_path, weights_3cls):
    data = tree(tmp_path / "data", 3, 7)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    changed = sorted(other.rglob("*.jpg"))[2]
    changed.write_bytes(changed.read_bytes() + b"\0")  # same name, one byte more: another copy of the file
    proc, seconds = torchrun(2, "eval", data, "--weights", weights_3cls, *SMALL, "--json", str(tmp_path / "r.json"),
                             script=RANK_SCRIPT, env={"FASTEVAL_TEST_FAULT": "data",
                                                      "FASTEVAL_TEST_OTHER_DATA": str(other)})
    assert proc.returncode != 0
    rel = changed.relative_to(other)
    assert error_lines(proc) == [f"fasteval: error: rank 1: this rank sees a different dataset under {other} from "
                                 f"rank 0's: the first differing file is {rel} ({changed.stat().st_size} bytes here, "
                                 f"{changed.stat().st_size - 1} on rank 0); every rank must see the same files"]
    assert "fasteval eval" not in proc.stdout and not (tmp_path / "r.json").exists()
    assert_clean_failure(proc)


@pytest.mark.slow
def test_a_bad_file_in_one_ranks_shard_ends_every_rank_with_one_line(tmp_path, weights_3cls):
    data = tree(tmp_path / "data", 3, 7)
    bad = sorted(Path(data).rglob("*.jpg"))[5]  # rank 1 holds samples 3..6
    content = bad.read_bytes()
    bad.write_bytes(content[: len(content) // 2])  # a truncated JPEG: its header is fine
    proc, seconds = torchrun(2, "eval", data, "--weights", weights_3cls, *SMALL, "--json", str(tmp_path / "r.json"))
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"fasteval: error: rank 1: cannot decode image {bad}: "), lines
    assert "fasteval: error" not in proc.stdout and not (tmp_path / "r.json").exists()
    assert_clean_failure(proc)


@pytest.mark.slow
def test_a_rank_that_dies_ends_every_rank_promptly(tmp_path, weights_3cls):
    """A process that dies without a word mid-run: torchrun stops the others, or their collective fails at
    once; no rank waits for the collectives' timeout (600 s here)."""
    data = tree(tmp_path / "data", 3, 7)
    proc, seconds = torchrun(2, "eval", data, "--weights", weights_3cls, *SMALL, "--json", str(tmp_path / "r.json"),
                             script=RANK_SCRIPT, env={"FASTEVAL_TEST_FAULT": "exit", "FASTEVAL_DIST_TIMEOUT": "600"})
    assert proc.returncode != 0 and seconds < 120
    assert "fasteval eval" not in proc.stdout and not (tmp_path / "r.json").exists()
    # torchrun names the rank that died; rank 0 is stopped by torchrun's signal or by its broken collective,
    # whichever comes first, and says so in at most one line
    assert "exitcode  : 3" in proc.stderr and len(error_lines(proc)) <= 1
    assert "fasteval/" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("busy", [True, False], ids=["while-rank-0-works", "while-rank-0-waits"])
def test_a_killed_rank_is_named_by_rank_0(tmp_path, weights_3cls, busy):
    """``kill -9`` of rank 1: torchrun stops rank 0 with SIGTERM (it was working), or rank 0's collective
    breaks (it was waiting for rank 1). Either way rank 0 names rank 1 and its pid, which torchrun's summary
    confirms, with its signal where it could still be read; not "terminated (SIGTERM)"."""
    data = tree(tmp_path / "data", 3, 7)
    env = {"FASTEVAL_TEST_FAULT": "kill", "FASTEVAL_DIST_TIMEOUT": "600"}
    if busy:
        env["FASTEVAL_TEST_BUSY_S"] = "30"
    proc, seconds = torchrun(2, "eval", data, "--weights", weights_3cls, *SMALL, "--json", str(tmp_path / "r.json"),
                             script=RANK_SCRIPT, env=env)
    assert proc.returncode != 0 and seconds < 60, proc.stderr
    cause = re.search(r"Root Cause.*?rank\s*: 1 .*?exitcode\s*: -9 \(pid: (\d+)\)", proc.stderr, re.S)
    assert cause, proc.stderr
    pid = cause.group(1)
    gone = rf"ended first, without a word \(its exit code in torchrun's summary; pid {pid}\)"
    how = gone if busy else rf"(died \(signal KILL; pid {pid}\)|{gone})"
    lines = error_lines(proc)
    assert len(lines) == 1 and re.fullmatch(rf"fasteval: error: rank 1 {how}: the run stopped without a result",
                                            lines[0]), proc.stderr
    assert "terminated" not in proc.stderr.split("Traceback")[0] and "fasteval/" not in proc.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_a_rank_that_hangs_ends_every_rank_at_the_timeout(tmp_path, weights_3cls):
    data = tree(tmp_path / "data", 3, 7)
    proc, seconds = torchrun(2, "eval", data, "--weights", weights_3cls, *SMALL, "--json", str(tmp_path / "r.json"),
                             script=RANK_SCRIPT, env={"FASTEVAL_TEST_FAULT": "stall", "FASTEVAL_DIST_TIMEOUT": "4"})
    assert proc.returncode != 0 and seconds < 100  # the stalled rank sleeps an hour
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("fasteval: error: rank 0: the other ranks stopped answering (one "
                                                   "failed or did not answer within FASTEVAL_DIST_TIMEOUT=4 s): "
                                                   "Timed out"), proc.stderr
    assert_clean_failure(proc)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_bench_under_torchrun_reports_every_rank_and_the_total(tmp_path, weights_3cls):
    data = tree(tmp_path / "data", 3, 7)
    proc, _ = torchrun(2, "bench", data, "--weights", weights_3cls, "--batch-size", "4", "--repeats", "1",
                       "--no-time-to-result", *SMALL, "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("fasteval bench:") == 1 and "time to result: not measured under torchrun" in proc.stdout
    bench = json.loads((tmp_path / "b.json").read_text())
    d = bench["distributed"]
    assert d["world_size"] == 2 and d["samples_per_rank"] == [3, 4] and bench["config"]["samples"] == 3
    for path in ("reference", "fast"):
        rates = d[path]["images_per_sec_per_rank"]
        assert len(rates) == 2 and all(r > 0 for r in rates)
        slowest = max(n / r for n, r in zip(d["samples_per_rank"], rates))
        assert d[path]["images_per_sec_total"] == pytest.approx(7 / slowest)
    assert "time_to_result" not in bench
