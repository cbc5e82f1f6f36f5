"""The fasteval command: outputs, JSON keys and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import fasteval.cli
from fasteval.cli import main
from fasteval.errors import FastevalError

JSON_KEYS = {"samples", "correct_top1", "correct_top5", "top1", "top5", "loss", "loss_sum", "images_per_sec",
             "seconds", "loss_batch_mean", "config", "environment"}


def _eval(*args):
    return main(["eval", *args, "--no-progress", "--resize", "40", "--crop", "32", "--workers", "0"])


def test_reference_eval_json(small_data, weights_3cls, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _eval(small_data, "--reference", "--weights", weights_3cls, "--batch-size", "4", "--json", str(out)) == 0
    table = capsys.readouterr().out
    assert "top-1" in table and "differs" in table
    report = json.loads(out.read_text())
    assert JSON_KEYS <= set(report)
    assert report["samples"] == 21
    assert report["top1"] == pytest.approx(100 * report["correct_top1"] / 21)
    assert report["loss"] == pytest.approx(report["loss_sum"] / 21)
    assert report["config"]["arch"] == "resnet18" and report["config"]["batch_size"] == 4
    assert report["environment"]["torch"] == torch.__version__


def _error(capsys, *args) -> str:
    rc = _eval(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("fasteval: error: ")
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_missing_folder(capsys, tmp_path):
    assert "not found" in _error(capsys, str(tmp_path / "nope"), "--reference")


def test_empty_dataset(capsys, tmp_path):
    assert "no class folders" in _error(capsys, str(tmp_path), "--reference")


def test_class_without_images(capsys, tmp_path):
    os.makedirs(tmp_path / "a")
    Image.new("RGB", (40, 40)).save(tmp_path / "a" / "1.jpg")
    os.makedirs(tmp_path / "b")
    msg = _error(capsys, str(tmp_path), "--reference")
    assert "class folder has no images" in msg and msg.rstrip(")").find(str(tmp_path / "b")) >= 0


def test_corrupt_image(capsys, tmp_path, weights_3cls):
    for c in "abc":
        os.makedirs(tmp_path / c)
        Image.new("RGB", (40, 40)).save(tmp_path / c / "1.jpg")
    (tmp_path / "c" / "2.jpg").write_bytes(b"garbage")
    msg = _error(capsys, str(tmp_path), "--reference", "--weights", weights_3cls)
    assert "cannot decode image" in msg and "2.jpg" in msg


def test_weights_mismatch(capsys, small_data, tmp_path, weights_3cls):
    path = tmp_path / "w10.pt"
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    msg = _error(capsys, small_data, "--reference", "--weights", str(path))
    assert "10-class head but the dataset has 3 classes" in msg
    assert "do not fit --arch resnet34" in _error(capsys, small_data, "--reference", "--weights", weights_3cls,
                                                  "--arch", "resnet34")


def test_unknown_arch(capsys, small_data):
    assert "unknown --arch 'nonet'" in _error(capsys, small_data, "--reference", "--arch", "nonet")


def test_bad_device(capsys, small_data):
    assert "--device" in _error(capsys, small_data, "--reference", "--device", "tpu")


@pytest.mark.parametrize("argv, names", [(["eval", "--batch-size", "0"], "--batch-size"),
                                         (["eval", "x", "--batch-size", "-3"], "--batch-size"),
                                         (["eval", "x", "--workers", "two"], "--workers"),
                                         (["eval", "x", "--no-such-option"], "--no-such-option"),
                                         (["synth"], "OUT"), (["evaluate", "x"], "evaluate"), ([], "command")])
def test_bad_argument_values_are_one_line(argv, names, capsys):
    """Like every other refusal: one line naming the argument, exit 2 (not argparse's usage block)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fasteval") and ": error: " in err and names in err, err
    assert "--help lists the options" in err


@pytest.mark.parametrize("argv", [["synth", ""], ["synth", "  "], ["eval", "x", "--json", ""],
                                  ["eval", "x", "--predictions", ""], ["eval", "x", "--plot", ""],
                                  ["eval", "x", "--cache", ""], ["eval", ""], ["eval", "x", "--weights", "a.pt", ""],
                                  ["bench", "--plot", ""], ["train", "a", "b", "--out", ""],
                                  ["synth", "x", "--seed", "-1"]])
def test_empty_paths_and_negative_seed_refused(argv, tmp_path, monkeypatch, capsys):
    """An empty path is the current folder to os.path.abspath: `synth ''` replaced it (its files lost).
    Every path option refuses it in one line, exit 2, before anything is touched."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert ("expected a path, got an empty string" in err or "expected an integer >= 0" in err) and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


@pytest.mark.parametrize("option", ["--predictions", "--json"])
def test_output_naming_a_sample_is_refused(option, small_data, weights_3cls, tmp_path, capsys):
    """An output that is one of the dataset's images (directly or through a link) would destroy it; so
    would one naming the file outside DATA that a sample links to."""
    from fasteval.data.samples import discover

    sample = discover(small_data).paths[5]
    before = open(sample, "rb").read()
    link = tmp_path / "out.csv"
    link.symlink_to(sample)
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    outside = tmp_path / "outside.jpg"
    os.replace(data / "class_001" / "img_00000.jpg", outside)
    (data / "class_001" / "img_00000.jpg").symlink_to(outside)
    linked = outside.read_bytes()
    for root, target, words in ((small_data, sample, "is inside DATA"), (small_data, str(link), "is inside DATA"),
                                (str(data), str(outside), "is an image of the dataset")):
        rc = main(["eval", root, "--weights", weights_3cls, "--reference", "--workers", "0", option, target])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and words in err[0], err
        assert open(sample, "rb").read() == before and outside.read_bytes() == linked


def _tree(root) -> list[tuple[str, int]]:
    """Every entry under ``root`` (itself included) with its modification time: a run that writes
    nothing there leaves this unchanged."""
    entries = [(os.path.relpath(os.path.join(d, n), root), os.stat(os.path.join(d, n)).st_mtime_ns)
               for d, dirs, files in os.walk(root) for n in dirs + files]
    return sorted(entries) + [(".", os.stat(root).st_mtime_ns)]


# Paths relative to a folder holding DATA (data/) and a link to one of its class folders (link/).
@pytest.mark.parametrize("command, option, path", [
    ("eval", "--plot", "data/class_000"),  # its PNGs would be counted as samples by the next run
    ("eval", "--cache", "data/cache"),  # a class folder without images: every later run would fail
    ("eval", "--json", "link/../r.json"),  # a link then '..': data/r.json, whatever the text says
    ("eval", "--predictions", "data/p.csv"),
    ("sweep", "--plot", "link"),
    ("sweep", "--cache", "elsewhere/../data/class_002/cache"),
    ("bench", "--plot", "data/class_000/bench.png"),
    ("bench", "--json", "link/../r.json"),
])
def test_outputs_inside_data_are_refused_before_any_work(command, option, path, small_data, weights_3cls, tmp_path,
                                                         capsys):
    """Every output of eval, the sweep and bench: one line naming the option, exit 2, DATA untouched."""
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    (tmp_path / "link").symlink_to(data / "class_000")
    before = _tree(data)
    argv = {"eval": ["eval", str(data), "--weights", weights_3cls],
            "sweep": ["eval", str(data), "--weights", weights_3cls, weights_3cls],
            "bench": ["bench", str(data), "--weights", weights_3cls, "--repeats", "1", "--no-time-to-result"]}[command]
    rc = main([*argv, "--resize", "40", "--crop", "32", "--workers", "0", "--no-progress", option,
               str(tmp_path / path)])
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith(f"fasteval: error: {option} {tmp_path / path} is inside DATA {data}: ")
    assert len(err.splitlines()) == 1 and not out
    assert _tree(data) == before


# An output naming (or, a folder the run may empty, holding) a checkpoint the same command reads. Paths relative to a folder
# holding the checkpoint best.pt, its hard link hard.pt, a second checkpoint b2.pt, and run/best.pt.
@pytest.mark.parametrize("argv, words", [
    (["eval", "DATA", "--weights", "best.pt", "--json", "best.pt"], "--weights and --json name the same file"),
    (["eval", "DATA", "--weights", "best.pt", "--predictions", "./best.pt"],
     "--weights and --predictions name the same file"),
    (["eval", "DATA", "--weights", "best.pt", "--json", "hard.pt"], "--weights and --json name the same file"),
    (["eval", "DATA", "--weights", "best.pt", "b2.pt", "--json", "b2.pt"], "--weights and --json name the same file"),
    (["eval", "DATA", "--weights", "best.pt", "run/best.pt", "--json", "run/best.pt"],
     "--weights and --json name the same file"),
    (["bench", "DATA", "--weights", "best.pt", "--plot", "best.pt"], "--weights and --plot name the same file"),
    (["train", "DATA", "DATA", "--weights", "best.pt", "--out", "new", "--json", "best.pt"],
     "--weights and --json name the same file"),
    (["train", "DATA", "DATA", "--weights", "run/best.pt", "--out", "run", "--overwrite"],
     "--out run holds the --weights file run/best.pt"),
])
def test_an_output_naming_an_input_file_is_refused(argv, words, small_data, weights_3cls, tmp_path, monkeypatch,
                                                   capsys):
    """``--json best.pt --weights best.pt`` (or a folder output holding the checkpoint) overwrote the
    checkpoint the run reads: now one line naming both options, exit 2, every checkpoint untouched."""
    shutil.copy(weights_3cls, tmp_path / "best.pt")
    shutil.copy(weights_3cls, tmp_path / "b2.pt")
    os.link(tmp_path / "best.pt", tmp_path / "hard.pt")
    (tmp_path / "run").mkdir()
    shutil.copy(weights_3cls, tmp_path / "run" / "best.pt")
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    argv = [small_data if arg == "DATA" else arg for arg in argv]
    rc = main([*argv, "--resize", "40", "--crop", "32", "--workers", "0", "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("fasteval: error: ") and words in err, err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("argv", [["--arch", "alexnet", "--resize", "32", "--crop", "32"],
                                  ["--reference", "--arch", "alexnet", "--resize", "32", "--crop", "32"]])
def test_a_refused_run_without_weights_prints_only_its_error(argv, small_data, capsys):
    """The random-init note came before the error line of a run refused by its checks: two stderr lines.
    It is printed once the checks have passed, so a refused run prints exactly one."""
    assert main(["eval", small_data, *argv, "--workers", "0", "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("fasteval: error: --arch alexnet does not accept 32x32"), err


def test_plots_beside_the_checkpoint_they_evaluate_are_written(small_data, weights_3cls, tmp_path, capsys):
    """``--plot run/`` beside ``run/best.pt``: the pictures are added by name, the checkpoint is untouched."""
    (tmp_path / "run").mkdir()
    shutil.copy(weights_3cls, tmp_path / "run" / "best.pt")
    before = (tmp_path / "run" / "best.pt").read_bytes()
    pytest.importorskip("matplotlib")
    rc = main(["eval", small_data, "--weights", str(tmp_path / "run" / "best.pt"), "--plot", str(tmp_path / "run"),
               "--resize", "40", "--crop", "32", "--workers", "0", "--no-progress", "--device", "cpu",
               "--compile", "off"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "best.pt").read_bytes() == before
    assert any(name.endswith(".png") for name in os.listdir(tmp_path / "run"))


@pytest.mark.parametrize("command", [["eval", "DATA"], ["bench", "DATA"], ["train", "DATA", "DATA", "--out", "run"]])
@pytest.mark.parametrize("options, first, second", [
    (["--compile", "on", "--no-compile"], "--compile on", "--no-compile"),
    (["--no-compile", "--compile=auto"], "--no-compile", "--compile auto"),
])
def test_compile_and_no_compile_together_are_refused(command, options, first, second, tmp_path, capsys):
    """``--compile on --no-compile`` let the last one win silently: now one line naming both, exit 2."""
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path) if arg == "DATA" else arg for arg in command] + options)
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert f"error: {first} and {second} contradict each other" in err[0]
    same = fasteval.cli.build_parser().parse_args([*command, "--no-compile", "--compile", "off"])
    assert same.compile == "off"  # one value given twice: no conflict


@pytest.mark.parametrize("size, message", [("100000x100000", "at most 65535 pixels a side"),
                                           ("20000x20000", "decompression bomb"), ("4x4", "at least 8x8")])
def test_synth_refuses_sizes_it_cannot_write_or_read_back(size, message, tmp_path, capsys):
    assert main(["synth", str(tmp_path / "s"), "--size", size]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_reference_names_the_fast_options_it_ignores(small_data, weights_3cls, capsys):
    assert main(["eval", small_data, "--weights", weights_3cls, "--reference", "--workers", "0", "--no-progress",
                 "--compile", "on", "--precision", "fp32"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "ignored" in line]
    assert warning == ["fasteval: warning: --reference runs the plain PyTorch loop; ignored: --precision fp32, "
                       "--compile on"]


def test_more_workers_than_cores_is_one_line_of_ours(small_data, weights_3cls):
    """In a process of its own: pytest would capture torch's warning and hide whether it is printed."""
    cores = len(os.sched_getaffinity(0))
    proc = subprocess.run([sys.executable, "-m", "fasteval", "eval", small_data, "--weights", weights_3cls,
                           "--reference", "--workers", str(cores + 1), "--batch-size", "8", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"--workers {cores + 1} is more than the {cores} cores" in proc.stderr
    assert "This DataLoader will create" not in proc.stderr and "UserWarning" not in proc.stderr


def test_default_workers_fit_the_usable_cores(monkeypatch):
    """The default never draws the warning: it counts the cores this process may use (a container's or
    taskset's share), not the machine's."""
    import fasteval.cli as cli
    import fasteval.options as options
    import fasteval.procs as procs

    monkeypatch.setattr(procs.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(options, "usable_cores", procs.usable_cores)
    assert procs.usable_cores() == 3
    assert cli.build_parser().parse_args(["eval", "x"]).workers == 3


def test_output_checks_refuse_an_empty_path():
    from fasteval.files import check_output_file, check_output_folder

    for check in (lambda: check_output_file("", "--json"), lambda: check_output_folder("", "OUT", overwrite=True)):
        with pytest.raises(FastevalError, match="empty string"):
            check()


def test_ctrl_c_during_teardown_prints_no_traceback():
    """An interrupt that lands after the run (here from an atexit callback, where DALI's unload runs)
    is ignored: exit code of the run, no traceback."""
    code = ("import atexit, os, signal, time, fasteval.cli as cli\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))\n"
            "cli.main = lambda: 0\n"
            "cli.console_main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "KeyboardInterrupt" not in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_before_main_handles_it_is_one_line():
    """An interrupt while the argument parser and its imports run (before main's handler): exit 130, one line."""
    code = ("import fasteval.cli as cli\n"
            "def main():\n    raise KeyboardInterrupt\n"
            "cli.main = main\n"
            "cli.console_main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip() == "fasteval: interrupted"


def test_random_init_is_the_same_model_in_every_run(small_data, tmp_path, capsys):
    """Without --weights, `eval` and `eval --reference` evaluate one model (seed 0), so their counts agree
    (before, each run drew its own random model)."""
    reports = []
    for mode in ([], ["--reference"]):
        path = tmp_path / f"r{len(reports)}.json"
        assert main(["eval", small_data, "--workers", "0", "--batch-size", "4", "--resize", "40", "--crop", "32",
                     "--no-progress", "--json", str(path), *mode]) == 0
        reports.append(json.loads(path.read_text()))
    assert "seed 0" in capsys.readouterr().err
    fast, reference = reports
    assert (fast["correct_top1"], fast["correct_top5"]) == (reference["correct_top1"], reference["correct_top5"])
    assert fast["loss_sum"] == pytest.approx(reference["loss_sum"], rel=1e-3)


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fasteval", "eval", str(tmp_path / "x"), "--reference", "--debug"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_synth_is_deterministic(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["synth", str(tmp_path / name), "--classes", "2", "--per-class", "2", "--size", "64x48"]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 4
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert main(["synth", str(tmp_path / "c"), "--size", "tiny"]) == 2
    assert "--size" in capsys.readouterr().err


@pytest.mark.parametrize("raised, code, message", [(KeyboardInterrupt, 130, "fasteval: interrupted"),
                                                   (ValueError("boom"), 2, "fasteval: error: ")])
def test_a_run_stopped_mid_progress_bar_ends_with_its_message_on_a_line_of_its_own(raised, code, message, capsys,
                                                                                 monkeypatch, tmp_path):
    from tqdm import tqdm

    def stopped(args):
        bar = tqdm(total=10, desc="reference", file=sys.stderr)
        bar.update(4)
        raise raised

    monkeypatch.setitem(fasteval.cli.COMMANDS, "synth", stopped)
    assert main(["synth", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert err.rstrip("\n").split("\n")[-1].startswith(message), repr(err)  # the last line, whole
    assert err.count("reference") >= 1 and not tqdm._instances


def test_version_is_the_package_version():
    """``fasteval --version`` answered 'the following arguments are required: command' (new-user trial)."""
    import fasteval

    proc = subprocess.run([sys.executable, "-m", "fasteval", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fasteval {fasteval.__version__}", proc.stderr


def test_repeated_weights_make_a_sweep_and_bench_refuses_two(capsys):
    """``--weights a --weights b`` on eval is the sweep of both (argparse would keep b alone); bench evaluates one
    checkpoint and refuses a second, exit 2, one line."""
    from fasteval.cli import build_parser

    assert build_parser().parse_args(["eval", "D", "--weights", "a", "--weights", "b", "c"]).weights == ["a", "b", "c"]
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["bench", "D", "--weights", "a", "--weights", "b"])
    assert stop.value.code == 2
    assert "--weights given twice (a and b): give it once" in capsys.readouterr().err


def test_an_error_that_ctrl_c_caused_is_the_interruption(monkeypatch, tmp_path, capsys):
    """Ctrl-C to the process group ended a DataLoader worker before this process saw its KeyboardInterrupt:
    the loader's "worker exited unexpectedly" became `fasteval: error: ...` and exit 2 (a new user's trial,
    2 times in 45). An error raised after a SIGINT is the interruption: one line, exit 130."""
    import signal
    import time

    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly") from None
        return 0

    monkeypatch.setitem(fasteval.cli.COMMANDS, "synth", command)
    assert main(["synth", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "fasteval: interrupted\n"
    # Without a SIGINT the same error is an error
    monkeypatch.setitem(fasteval.cli.COMMANDS, "synth", lambda args: (_ for _ in ()).throw(RuntimeError("boom")))
    assert main(["synth", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("fasteval: error: ")


def test_forked_children_leave_ctrl_c_to_the_parent():
    """A child forked while a run is on (a DataLoader worker before its own handlers) ignores SIGINT: the parent
    stops it, and no traceback of the child's reaches the terminal."""
    import signal
    import time

    from fasteval.procs import interrupts_noted

    with interrupts_noted() as noted:
        pid = os.fork()
        if pid == 0:  # the child: survives its SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            os._exit(7)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7 and noted == []


def test_an_interrupted_runs_finalizer_errors_stay_off_stderr():
    """A DataLoader iterator stopped half-built fails in its finalizer ("Exception ignored in ...
    _workers_status"); freeing the interrupted run's traceback keeps that off stderr, and the hook is restored."""
    import sys

    from fasteval.procs import drop_quietly

    class HalfBuilt:
        def __del__(self):
            raise AttributeError("'HalfBuilt' object has no attribute '_workers_status'")

    def run():
        it = HalfBuilt()  # noqa: F841 (held by this frame, so by the traceback)
        raise KeyboardInterrupt

    seen = []
    hook = sys.unraisablehook
    sys.unraisablehook = recorder = lambda unraisable: seen.append(unraisable.exc_value)
    try:
        try:
            run()
        except KeyboardInterrupt:
            pass
        assert len(seen) == 1  # the control: freed as usual, the finalizer's error reaches the hook
        try:
            run()
        except KeyboardInterrupt as exc:
            drop_quietly(exc)
        assert len(seen) == 1 and sys.unraisablehook is recorder
    finally:
        sys.unraisablehook = hook


def test_top5_of_a_model_with_fewer_than_5_classes_says_it_is_always_100(small_data, weights_3cls, tmp_path, capsys):
    """3 classes: every label is among the top 5, so top-5 is 100 % whatever the model (a plain loop's
    topk(5) would raise). The table says so and the JSON has model_classes; a 5-wide top list has neither."""
    from fasteval.evaluation.metrics import EvalResult
    from fasteval.output.report import build_report, format_table

    out = tmp_path / "r.json"
    assert main(["eval", small_data, "--weights", weights_3cls, "--resize", "40", "--crop", "32", "--workers", "0",
                 "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model_classes"] == 3 and report["top5"] == 100.0
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("top-5  ")]
    assert row.endswith("(21/21)  <- always 100 %: the model has 3 class(es)"), row
    wide = EvalResult(samples=2, correct_top1=1, correct_top5=1, loss_sum=1.0,
                      topk_classes=torch.tensor([[3, 1, 0, 7, 2], [1, 3, 0, 2, 7]]))
    built = build_report(wide, {"classes": 3})
    assert "model_classes" not in built
    assert "always 100" not in format_table({**built, "top1": 50.0, "top5": 50.0, "loss": 0.5,
                                             "loss_batch_mean": 0.5, "images_per_sec": 1.0, "seconds": 1.0})
