"""``fasteval eval --plot DIR``: the class report on the fast path equals the reference's, the PNGs are
written (atomically, readable at 10 and 131 classes), and a bad --plot fails before any work."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from fasteval.cli import main
from fasteval.output.plots import FILES, confusion_classes, drawable, write_plots

sys.path.insert(0, os.path.dirname(__file__))
from test_classes import names, result_from_logits  # noqa: E402

from fasteval.output.report import build_report  # noqa: E402

CLASS_KEYS = ("per_class", "confusion_matrix", "macro", "balanced_accuracy", "worst_classes", "confused_pairs",
              "intervals")


def _eval(*args):
    return main(["eval", *args, "--no-progress", "--resize", "40", "--crop", "32", "--workers", "0",
                 "--batch-size", "4"])


def test_fast_path_class_report_equals_reference(small_data, weights_3cls, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    fast_json, ref_json, plots = tmp_path / "f.json", tmp_path / "r.json", tmp_path / "plots"
    fast_csv, ref_csv = tmp_path / "f.csv", tmp_path / "r.csv"
    assert _eval(small_data, "--weights", weights_3cls, "--compile", "off", "--precision", "fp32",
                 "--json", str(fast_json), "--plot", str(plots), "--predictions", str(fast_csv)) == 0
    assert "worst classes (recall)" in capsys.readouterr().out
    assert _eval(small_data, "--weights", weights_3cls, "--reference", "--json", str(ref_json),
                 "--predictions", str(ref_csv)) == 0
    fast, ref = json.loads(fast_json.read_text()), json.loads(ref_json.read_text())
    assert fast["samples"] == 21 and fast["exact"]["enabled"]
    for key in CLASS_KEYS:
        assert fast[key] == ref[key], key
    assert sum(map(sum, fast["confusion_matrix"])) == 21 and len(fast["per_class"]) == 3
    # The calibration comes from float confidences: the fast path's (DALI's pixels, channels-last) on the
    # samples the recheck did not redo. With the same samples in each bin and the same hits, the ECE can
    # differ by at most the mean |confidence difference| (each sample moves its bin's gap by that much).
    assert [b["samples"] for b in fast["calibration"]["reliability"]] == \
        [b["samples"] for b in ref["calibration"]["reliability"]]
    conf = [[float(row["confidence"]) for row in csv.DictReader(open(path))] for path in (fast_csv, ref_csv)]
    mean_diff = sum(abs(a - b) for a, b in zip(*conf)) / 21
    assert abs(fast["calibration"]["ece"] - ref["calibration"]["ece"]) <= mean_diff + 1e-6
    assert fast["calibration"]["brier"] == pytest.approx(ref["calibration"]["brier"], abs=1e-3)
    assert sorted(os.listdir(plots)) == sorted(FILES)
    for name in FILES:
        with open(plots / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def synthetic_report(num_classes: int, per_class: int, seed: int = 0) -> dict:
    """A run over ``num_classes`` classes with uneven difficulty and a confusable neighbour every 7th class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    logits = torch.randn(len(labels), num_classes, generator=g) * 1.5
    rows = torch.arange(len(labels))
    logits[rows, labels] += (1.5 + 5 * torch.rand(num_classes, generator=g))[labels]
    logits[rows, (labels + 1) % num_classes] += 3.0 * (labels % 7 == 0).float()
    result = result_from_logits(logits, labels)
    return build_report(result, {}, None, names(num_classes, labels))


@pytest.mark.parametrize("num_classes", [10, 131])
def test_pictures_at_10_and_131_classes(tmp_path, num_classes):
    image = pytest.importorskip("matplotlib.image")
    report = synthetic_report(num_classes, 6)
    paths = write_plots(report, str(tmp_path / "p"))
    assert [os.path.basename(p) for p in paths] == list(FILES)
    assert sorted(os.listdir(tmp_path / "p")) == sorted(FILES)  # no temporary file left behind
    for path in paths:
        pixels = image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 300 and pixels.std() > 0.01


def test_confusion_picture_selects_the_most_confused_classes_beyond_50():
    size = 131
    matrix = [[0] * size for _ in range(size)]
    for t in range(size):
        matrix[t][t] = 5
    for t, p, n in ((3, 100, 9), (77, 3, 4), (50, 51, 2)):
        matrix[t][p] = n
    # errors: class 3: 9 + 4, class 100: 9, class 77: 4, classes 50 and 51: 2 each; the rest 0.
    assert confusion_classes(matrix, limit=50, shown=5) == [3, 50, 51, 77, 100]
    assert confusion_classes(matrix, limit=50, shown=6) == [0, 3, 50, 51, 77, 100]  # ties: the lower index
    small = [row[:10] for row in matrix[:10]]
    assert confusion_classes(small) == list(range(10))


def _error(capsys, *args) -> str:
    rc = _eval(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("fasteval: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_plot_folder_that_is_a_file_fails_before_work(small_data, tmp_path, capsys):
    target = tmp_path / "file.png"
    target.write_text("x")
    msg = _error(capsys, small_data, "--reference", "--plot", str(target))
    assert "--plot" in msg and "is a file" in msg


def test_plot_without_matplotlib_fails_before_work(small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    msg = _error(capsys, small_data, "--reference", "--plot", str(tmp_path / "plots"))
    assert "--plot needs matplotlib" in msg and not (tmp_path / "plots").exists()


def test_plot_folder_and_json_naming_one_path_is_refused(small_data, tmp_path, capsys):
    same = str(tmp_path / "out")
    assert "name the same file" in _error(capsys, small_data, "--reference", "--json", same, "--plot", same)


def test_drawable_escapes_what_cannot_be_drawn():
    codes = frozenset(map(ord, "abcfé$ "))
    assert drawable("caf\udce9", codes) == ("caf\\xe9", False)  # a Latin-1 byte of a non-UTF-8 folder name
    assert drawable("café", codes) == ("café", False)
    assert drawable("a\u732bb", codes) == ("a\\u732bb", True)  # a glyph the fonts lack
    assert drawable("$a$ b\n", codes) == ("\\$a\\$ b\\n", False)  # no mathtext, no line break


def test_class_names_the_fonts_or_utf8_cannot_hold_are_drawn(tmp_path):
    """A folder name that is not UTF-8 failed the plot after the JSON was written (TypeError from FT2Font);
    a name in a script the font lacks drew boxes and printed matplotlib's two-line glyph warning; ``$x$`` was
    drawn as mathtext. A process of its own: the warnings are checked on the real stderr."""
    pytest.importorskip("matplotlib")
    from fasteval.data.synth import synth_dataset

    data = synth_dataset(str(tmp_path / "data"), classes=3, per_class=4, size="48x40", seed=3)
    root = os.fsencode(data)
    for old, new in ((b"class_000", b"caf\xe9"), (b"class_001", "猫".encode()), (b"class_002", b"$x$")):
        os.rename(os.path.join(root, old), os.path.join(root, new))
    plots, report = tmp_path / "plots", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "fasteval", "eval", data, "--reference", "--workers", "0",
                           "--no-progress", "--resize", "40", "--crop", "32", "--json", str(report),
                           "--plot", str(plots)], capture_output=True, text=True, errors="replace",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(plots)) == sorted(FILES) and report.exists()
    assert "Glyph" not in proc.stderr and "Warning" not in proc.stderr and "Traceback" not in proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "--plot" in line]
    assert notes == ["fasteval: note: --plot: 1 class name(s) have characters the fonts lack, drawn as escapes "
                     "(e.g. \\u732b); a font with them in matplotlib's font.family draws them"]


def test_a_picture_that_fails_to_draw_is_one_warning(tmp_path, monkeypatch, capsys):
    """Plots come after the JSON and CSV: a fault in drawing one skips it, never fails the finished run."""
    pytest.importorskip("matplotlib")
    import fasteval.output.plots as plots

    monkeypatch.setattr(plots, "plot_recall", lambda report: 1 / 0)
    paths = write_plots(synthetic_report(4, 5), str(tmp_path / "p"))
    assert [os.path.basename(p) for p in paths] == ["confusion_matrix.png", "reliability.png"]
    assert capsys.readouterr().err.splitlines() == [
        "fasteval: warning: --plot: cannot draw recall_by_class.png, skipped: ZeroDivisionError: division by zero"]
