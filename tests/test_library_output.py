"""What libraries print on stderr stays off it: PIL's decompression-bomb warning, the C decoders' warnings
under DALI (libjpeg, libpng: written to fd 2, not through Python) and torch's tracebacks about a damaged
compile cache. Each run is a process of its own, so that stderr is the real one (pytest would capture
Python warnings and hide whether they are printed); the results are checked to be unaffected."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from fasteval.data.synth import make_image, synth_dataset

FAST = ["--no-progress", "--resize", "40", "--crop", "32", "--precision", "fp32", "--device", "cpu"]


def run(args: list[str], env: dict | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    """``fasteval ARGS`` in a process of its own; ``prelude``: Python run before the command."""
    code = f"import sys\n{prelude}\nsys.argv = ['fasteval', *{args!r}]\nfrom fasteval.cli import console_main\n" \
           "console_main()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, errors="replace",
                          timeout=600, env={**os.environ, **(env or {})})


def test_images_over_pils_bomb_warning_size_are_one_note(tmp_path):
    """PIL warns (two lines, from every process that opens the file) above MAX_IMAGE_PIXELS and decodes
    anyway, as the reference does: one fasteval line names the file. The limit is lowered in the command's
    process (and so in the processes it forks) to keep the images small."""
    data = synth_dataset(str(tmp_path / "data"), classes=2, per_class=5, size="48x40", seed=3)
    make_image(9, 0, 2, 0, (80, 80)).save(os.path.join(data, "class_000", "large.png"))
    prelude = "from PIL import Image\nImage.MAX_IMAGE_PIXELS = 4000  # 48x40 below, 80x80 above (and below 2x)"
    note = (f"fasteval: note: 1 image(s) above PIL's decompression-bomb warning size of 4,000 pixels, e.g. "
            f"{os.path.join(data, 'class_000', 'large.png')} (80x80): decoded as the reference decodes them")
    results = []
    for mode in (["--no-compile"], ["--reference", "--workers", "2"]):  # start-up decoder + recheck; workers
        out = tmp_path / f"{mode[0]}.json"
        proc = run(["eval", data, *FAST, *mode, "--json", str(out)], prelude=prelude)
        assert proc.returncode == 0, proc.stderr
        assert "DecompressionBomb" not in proc.stderr and "warnings.warn" not in proc.stderr, proc.stderr
        assert [line for line in proc.stderr.splitlines() if "decompression-bomb" in line] == [note]
        results.append(json.loads(out.read_text()))
    assert results[0]["samples"] == results[1]["samples"] == 11
    assert results[0]["correct_top1"] == results[1]["correct_top1"]
