"""Bad inputs and faults: each ends in one line naming the file or argument (exit 2, no traceback),
or in the reference's own result. Bad trees and faults are made here, in tmp_path; runs use small
images (--resize 40 --crop 32), no compile and no worker processes, so that each takes about a second."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fasteval import demo as demo_module
from fasteval.cli import main
from fasteval.errors import FastevalError
from fasteval.data.loader_dali import dali_available
from fasteval.data.loaders import needs_pil
from fasteval.files import atomic_write
from fasteval.output.report import write_json
from fasteval.data.samples import discover
from fasteval.data.synth import make_image

FAST = ["--no-compile", "--workers", "0", "--precision", "fp32", "--device", "cpu"]
PATHS = {"fast": FAST, "reference": ["--reference", "--workers", "0", "--device", "cpu"]}
needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI not installed")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these runs are tiny, and on a shared small machine a second thread only
    spins against other processes (ten times slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(capfd, *args) -> tuple[int, str, str]:
    """``fasteval eval`` in this process on small inputs: (exit code, stdout, stderr)."""
    rc = main(["eval", *args, "--resize", "40", "--crop", "32", "--batch-size", "8", "--no-progress"])
    out, err = capfd.readouterr()
    return rc, out, err


def error_line(capfd, *args) -> str:
    """Run, expect exit 2 and one error line without traceback; return that line."""
    rc, out, err = run(capfd, *args)
    assert rc == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("fasteval: error: ")
    assert "fasteval eval" not in out  # refused before any work: no result table
    return last


def copy_tree(small_data, tmp_path) -> str:
    root = tmp_path / "data"
    shutil.copytree(small_data, root)
    return str(root)


def predictions(path) -> list[dict]:
    with open(path, newline="", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def same_per_sample(capfd, data, weights, tmp_path) -> tuple[list[dict], list[dict]]:
    """Fast and reference runs' per-sample rows; asserts they match sample by sample."""
    rows = {}
    for name, mode in PATHS.items():
        csv_path = tmp_path / f"{name}.csv"
        rc, out, err = run(capfd, data, "--weights", weights, *mode, "--predictions", str(csv_path))
        assert rc == 0, err
        rows[name] = predictions(csv_path)
    fast, ref = rows["fast"], rows["reference"]
    assert [(r["path"], r["label"], r["prediction"]) for r in fast] == \
        [(r["path"], r["label"], r["prediction"]) for r in ref]
    for f, r in zip(fast, ref):  # DALI's pixels are within 1/255 of PIL's: the losses nearly agree
        assert float(f["loss"]) == pytest.approx(float(r["loss"]), abs=0.02), f["path"]
    return fast, ref


# --- files made here ---------------------------------------------------------------------------

def png_bytes(width: int, height: int, depth: int, color_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, or a header announcing a huge image)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\0" + r for r in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rgb16_png(seed: int) -> bytes:
    """A 16-bit RGB PNG (PIL reports mode RGB): PIL keeps the high byte, DALI rounds."""
    rgb = np.asarray(make_image(seed % 3, seed, 3, 7, (60, 50))).astype(np.uint16)
    wide = (rgb * 257 + np.random.default_rng(seed).integers(0, 257, rgb.shape)).astype(">u2")
    return png_bytes(60, 50, 16, 2, [row.tobytes() for row in wide])


def gray16(seed: int) -> Image.Image:
    """A 16-bit grayscale image: PIL clips to 8 bits where DALI scales."""
    gray = np.asarray(make_image(seed % 3, seed, 3, 7, (60, 50)).convert("L")).astype(np.uint16)
    return Image.fromarray(gray * 200)


def bomb_png() -> bytes:
    """A PNG header announcing more than twice PIL's pixel limit (PIL refuses it at open)."""
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 2
    return png_bytes(side, side, 8, 0, [b"\0" * 8])


def stray_bytes_before(jpeg: bytes, marker: int) -> bytes:
    """The JPEG with 3 stray bytes inserted just before its first ``marker`` segment (libjpeg, so PIL,
    skips them with a warning; DALI's parser refused the file, or crashed the process)."""
    i = 2
    while jpeg[i + 1] != marker:
        i += 2 + struct.unpack(">H", jpeg[i + 2:i + 4])[0]
    return jpeg[:i] + b"\x00\x13\x37" + jpeg[i:]


# --- 1. routing by content ---------------------------------------------------------------------

def test_files_go_to_pil_by_content_not_by_name(tmp_path):
    image = make_image(0, 0, 3, 0, (60, 50))
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    image.save(root / "a" / "plain.jpg", quality=90)
    image.save(root / "a" / "png_named.jpg", format="PNG")  # 8-bit PNG: DALI decodes it as PIL does
    gray16(1).save(root / "a" / "gray16_named.jpg", format="PNG")
    (root / "a" / "rgb16.png").write_bytes(rgb16_png(2))
    image.convert("P").save(root / "a" / "gif_named.jpg", format="GIF")
    jpeg = (root / "a" / "plain.jpg").read_bytes()
    (root / "b" / "no_end_marker.jpg").write_bytes(jpeg[:-2])
    image.convert("P").save(root / "b" / "palette.tif")
    (root / "b" / "maxval100.ppm").write_bytes(b"P6\n60 50\n100\n" + bytes(60 * 50 * 3))
    image.save(root / "b" / "rgb.tif")
    for marker, name in ((0xDB, "stray_before_dqt.jpg"), (0xC0, "stray_before_sof.jpg"),
                         (0xC4, "stray_before_dht.jpg"), (0xDA, "stray_before_sos.jpg")):
        (root / "b" / name).write_bytes(stray_bytes_before(jpeg, marker))
        with Image.open(root / "b" / name) as im:
            im.load()  # PIL decodes it: the reference's result exists
    samples = discover(root)
    routed = {os.path.basename(samples.paths[i]) for i in needs_pil(samples)}
    assert routed == {"gray16_named.jpg", "rgb16.png", "gif_named.jpg", "no_end_marker.jpg", "palette.tif",
                      "maxval100.ppm", "stray_before_dqt.jpg", "stray_before_sof.jpg", "stray_before_dht.jpg",
                      "stray_before_sos.jpg"}


@needs_dali
def test_a_jpeg_with_stray_bytes_between_segments_gives_the_reference_result(small_data, weights_3cls, tmp_path,
                                                                              capfd):
    """Stray bytes before DHT or SOS: DALI's parser refused the file in the fast path ('nvImageCodec
    failure', naming no file) or crashed it (SIGSEGV); the reference (PIL) decodes it. Now PIL decodes it
    on both paths."""
    data = copy_tree(small_data, tmp_path)
    for marker, name in ((0xC4, "class_001/img_00002.jpg"), (0xDA, "class_002/img_00004.jpg")):
        path = os.path.join(data, name)
        with open(path, "rb") as f:
            jpeg = f.read()
        with open(path, "wb") as f:
            f.write(stray_bytes_before(jpeg, marker))
    rows = {}
    for name, mode in (("fast", [*FAST, "--loader", "dali", "--compile", "off", "--exact", "off"]),
                       ("reference", PATHS["reference"])):
        rc, out, err = run(capfd, data, "--weights", weights_3cls, *mode, "--predictions", str(tmp_path / "p.csv"),
                           "--json", str(tmp_path / f"{name}.json"))
        assert rc == 0, err
        assert "Invalid marker" not in err and "ERROR" not in err, err
        rows[name] = {r["path"]: r for r in predictions(tmp_path / "p.csv")}
    fast = json.loads((tmp_path / "fast.json").read_text())
    assert fast["loader"].startswith("dali") and fast["pil_fallback_files"] == 2
    for name in ("class_001/img_00002.jpg", "class_002/img_00004.jpg"):  # the reference's code: its values
        assert rows["fast"][name]["prediction"] == rows["reference"][name]["prediction"]
        assert float(rows["fast"][name]["loss"]) == pytest.approx(float(rows["reference"][name]["loss"]), abs=1e-5)


def test_sixteen_bit_files_whatever_their_name_give_the_reference_result(small_data, weights_3cls, tmp_path,
                                                                           capfd):
    data = copy_tree(small_data, tmp_path)
    gray16(1).save(os.path.join(data, "class_000", "gray16.jpg"), format="PNG")
    with open(os.path.join(data, "class_002", "rgb16.png"), "wb") as f:
        f.write(rgb16_png(2))
    fast, ref = same_per_sample(capfd, data, weights_3cls, tmp_path)
    special = {"class_000/gray16.jpg", "class_002/rgb16.png"}
    fast_losses = [float(r["loss"]) for r in fast if r["path"] in special]
    ref_losses = [float(r["loss"]) for r in ref if r["path"] in special]
    assert len(fast_losses) == 2
    assert fast_losses == pytest.approx(ref_losses, abs=1e-5)  # PIL's pixels, the reference's code: its loss


def test_a_file_name_that_is_not_utf8_gives_the_reference_result(small_data, weights_3cls, tmp_path, capfd):
    """DALI cannot be given such a name: the file goes to the reference's code; the CSV keeps its bytes."""
    data = copy_tree(small_data, tmp_path)
    source = os.path.join(data, "class_001", "img_00000.jpg").encode()
    shutil.copy(source, source.replace(b"img_00000", b"caf\xe9"))
    fast, _ = same_per_sample(capfd, data, weights_3cls, tmp_path)
    assert "class_001/caf\udce9.jpg" in {r["path"] for r in fast}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_decompression_bomb_refused_the_same_way_wherever_it_is(small_data, weights_3cls, tmp_path, capfd,
                                                                 path, position):
    data = copy_tree(small_data, tmp_path)
    folder, name = {"first": ("class_000", "a.png"), "middle": ("class_001", "img_00003b.png"),
                    "last": ("class_002", "z.png")}[position]
    with open(os.path.join(data, folder, name), "wb") as f:
        f.write(bomb_png())
    line = error_line(capfd, data, "--weights", weights_3cls, *PATHS[path])
    assert f"cannot decode image {os.path.join(data, folder, name)}" in line and "decompression bomb" in line


def test_pil_pixel_limit_is_one_decision_on_every_path(small_data, model_3cls, small_spec, monkeypatch):
    """Over the limit (a warning in PIL): the fast path hands the file to PIL, so both paths warn and
    decode it the same way. Over twice the limit: both refuse it, naming it."""
    from fasteval.evaluation.fast import FastOptions, evaluate_fast
    from fasteval.data.probe import _cache
    from fasteval.evaluation.reference import evaluate_reference

    samples = discover(small_data)
    width, height = Image.open(samples.paths[0]).size
    options = FastOptions(loader="auto", precision="fp32", compile=False, batch_size=8, workers=0, exact="off")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", width * height - 1)
    _cache.clear()
    assert needs_pil(samples) == list(range(len(samples)))
    with pytest.warns(Image.DecompressionBombWarning):
        ref = evaluate_reference(samples, model_3cls, small_spec, batch_size=8, workers=0, progress=False)
    with pytest.warns(Image.DecompressionBombWarning):
        fast = evaluate_fast(samples, model_3cls, small_spec, options=options, progress=False)
    assert torch.equal(fast.predictions, ref.predictions)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", width * height // 2 - 1)
    _cache.clear()
    for evaluate in (lambda: evaluate_reference(samples, model_3cls, small_spec, batch_size=8, workers=0,
                                                progress=False),
                     lambda: evaluate_fast(samples, model_3cls, small_spec, options=options, progress=False)):
        with pytest.raises(FastevalError, match=r"cannot decode image .*img_00000\.jpg.*decompression bomb"):
            evaluate()
    _cache.clear()


# --- 2. undecodable files are named, before any work, the same way on both paths -----------------

def _text(path):
    path.write_text("hello, not an image\n")


def _appledouble(path):
    path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64))


def _empty(path):
    path.write_bytes(b"")


def _broken_link(path):
    os.symlink(path.parent / "nowhere.jpg", path)


def _link_loop(path):
    os.symlink(path.name, path)  # x.jpg -> x.jpg


def _truncated(path):
    buffer = path.parent / "source.tmp"
    make_image(0, 1, 3, 0, (60, 50)).save(buffer, "JPEG", quality=90)
    data = buffer.read_bytes()
    buffer.unlink()
    path.write_bytes(data[: len(data) // 2])


def _fifo(path):
    os.mkfifo(path)


def _corrupt_png(path):
    """A PNG whose header and chunk CRCs are right but whose compressed pixels are not: found only
    by decoding it, in the run, the same way on both paths."""
    rgb = np.asarray(make_image(0, 2, 3, 0, (60, 50)))
    data = bytearray(png_bytes(60, 50, 8, 2, [row.tobytes() for row in rgb]))
    start = data.index(b"IDAT")
    length = struct.unpack(">I", data[start - 4:start])[0]
    data[start + 4 + length // 2] ^= 0xFF
    data[start + 4 + length:start + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[start:start + 4 + length])))
    path.write_bytes(bytes(data))


BAD_FILES = {"text": (_text, "x.jpg", "text file"), "appledouble": (_appledouble, "._img.jpg", "AppleDouble"),
             "empty": (_empty, "x.jpg", "empty file"), "broken_link": (_broken_link, "x.jpg", "broken symbolic link"),
             "link_loop": (_link_loop, "x.jpg", "symbolic link loop"),
             "truncated": (_truncated, "x.jpg", "truncated"), "fifo": (_fifo, "x.jpg", "FIFO"),
             "corrupt_data": (_corrupt_png, "x.png", "broken data stream")}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_undecodable_file_is_named_the_same_way_on_both_paths(small_data, weights_3cls, tmp_path, capfd, kind):
    make, name, reason = BAD_FILES[kind]
    data = copy_tree(small_data, tmp_path)
    bad = tmp_path / "data" / "class_001" / name
    make(bad)
    lines = {path: error_line(capfd, data, "--weights", weights_3cls, *mode) for path, mode in PATHS.items()}
    assert lines["fast"] == lines["reference"]
    assert f"cannot decode image {bad}: " in lines["fast"] and reason in lines["fast"]


def test_a_bad_file_with_a_newline_in_its_name_is_still_one_line(small_data, weights_3cls, tmp_path, capfd):
    data = copy_tree(small_data, tmp_path)
    _text(tmp_path / "data" / "class_000" / "two\nlines.jpg")
    assert "class_000/two\\nlines.jpg: not an image" in error_line(capfd, data, "--weights", weights_3cls)


def test_several_bad_files_are_counted(small_data, weights_3cls, tmp_path, capfd):
    data = copy_tree(small_data, tmp_path)
    for c in ("class_000", "class_002"):
        _empty(tmp_path / "data" / c / "zero.jpg")
    line = error_line(capfd, data, "--weights", weights_3cls)
    assert "class_000/zero.jpg: empty file" in line and "1 more files cannot be decoded" in line


@needs_dali
def test_dali_names_the_file_that_fails_its_pipeline_start(small_data, small_spec, tmp_path):
    """Used directly (no header check first), DALI's loader still names a bad file in its first batches."""
    from fasteval.data.loaders import make_loader

    data = copy_tree(small_data, tmp_path)
    _appledouble(tmp_path / "data" / "class_000" / "._img.jpg")
    with pytest.raises(FastevalError, match=r"cannot decode image .*class_000/\._img\.jpg: not an image"):
        for _ in make_loader("dali", discover(data), small_spec, batch_size=4, workers=1, device=torch.device("cpu")):
            pass


def test_fast_api_refuses_a_bad_file_with_the_reference_message(small_data, model_3cls, small_spec, tmp_path):
    from fasteval.evaluation.fast import FastOptions, evaluate_fast

    data = copy_tree(small_data, tmp_path)
    _text(tmp_path / "data" / "class_002" / "notes.jpg")
    options = FastOptions(precision="fp32", compile=False, batch_size=8, workers=0, exact="off")
    with pytest.raises(FastevalError, match=r"cannot decode image .*class_002/notes\.jpg"):
        evaluate_fast(discover(data), model_3cls, small_spec, options=options, progress=False)


# --- 3. outputs: checked before any work, written atomically ---------------------------------------

def _folder(tmp_path):
    (tmp_path / "out.json").mkdir()
    return str(tmp_path / "out.json"), "is a folder"


def _under_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return str(tmp_path / "file" / "out.json"), "is a file, not a folder"


def _dev_full(tmp_path):
    return "/dev/full", "No space left on device"


def _unwritable(tmp_path):
    return "/proc/fasteval-out.json", "cannot write in /proc"  # read-only even for root


BAD_OUTPUTS = {"folder": _folder, "under_file": _under_file, "dev_full": _dev_full, "unwritable": _unwritable}


@pytest.mark.parametrize("option", ["--json", "--predictions"])
@pytest.mark.parametrize("kind", BAD_OUTPUTS)
def test_unwritable_output_fails_before_any_work(small_data, weights_3cls, tmp_path, capfd, option, kind):
    path, reason = BAD_OUTPUTS[kind](tmp_path)
    line = error_line(capfd, small_data, "--weights", weights_3cls, *FAST, option, path)
    assert f"{option} {path}" in line and reason in line


def test_one_file_for_two_outputs_is_refused(small_data, weights_3cls, tmp_path, capfd):
    path = str(tmp_path / "same")
    line = error_line(capfd, small_data, "--reference", "--json", path, "--predictions", path)
    assert "--json and --predictions name the same file" in line
    line = error_line(capfd, small_data, "--reference", "--weights", weights_3cls, "--json", weights_3cls)
    assert "--weights and --json name the same file" in line


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old\n")
    os.chmod(target, 0o640)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(FastevalError, match=r"^--json: cannot write .*report\.json: No space left on device"):
        write_json({"a": 1.0, "rows": list(range(1000))}, str(target))
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["report.json"]
    monkeypatch.undo()
    with atomic_write(str(target)) as f:
        f.write("new\n")
    assert target.read_text() == "new\n" and os.stat(target).st_mode & 0o777 == 0o640


def test_outputs_are_written_whole_into_new_folders_and_devices(small_data, weights_3cls, tmp_path, capfd):
    out = tmp_path / "new" / "folder" / "r.json"
    rc, stdout, err = run(capfd, small_data, "--weights", weights_3cls, *PATHS["reference"], "--json", str(out),
                          "--predictions", "/dev/stdout")
    assert rc == 0, err
    assert stdout.index("fasteval eval") < stdout.index("path,label,prediction")  # appended, not truncated
    assert json.loads(out.read_text())["samples"] == 21
    assert os.listdir(out.parent) == ["r.json"]


def _longest_name(folder) -> int:
    return os.pathconf(folder, "PC_NAME_MAX")


@pytest.mark.parametrize("option", ["--json", "--predictions"])
def test_every_output_name_that_passes_the_checks_is_written(small_data, weights_3cls, tmp_path, capfd, option):
    """A name of the file system's longest length is written (its temporary name beside it stays short);
    one byte more is refused before any work, in one line."""
    longest = tmp_path / ("r" * _longest_name(tmp_path))
    rc, _, err = run(capfd, small_data, "--weights", weights_3cls, *PATHS["reference"], option, str(longest))
    assert rc == 0, err
    assert os.listdir(tmp_path) == [longest.name] and longest.stat().st_size > 0
    too_long = tmp_path / "new" / ("r" * (_longest_name(tmp_path) + 1))
    line = error_line(capfd, small_data, "--weights", weights_3cls, *PATHS["reference"], option, str(too_long))
    limit = _longest_name(tmp_path)
    assert line == (f"fasteval: error: {option} {too_long}: the name rrrrrrrrrrrrrrrr... is {limit + 1} bytes long, "
                    f"more than the {limit} this file system allows")
    assert os.listdir(tmp_path) == [longest.name]


# --- 4. options are checked before any work, whatever the mode --------------------------------------

@pytest.mark.parametrize("args, named", [
    (["--validate", "--precision", "fp16", "--device", "cpu"], "--precision fp16"),
    (["--reference", "--loader", "foo"], "--loader 'foo'"),
    (["--reference", "--precision", "int8"], "--precision 'int8'"),
    (["--reference", "--exact", "maybe"], "--exact 'maybe'"),
    (["--reference", "--device", "tpu"], "--device"),
    (["--reference", "--preset", "tiny"], "--preset 'tiny'"),
])
def test_bad_option_fails_before_any_work(small_data, capfd, monkeypatch, args, named):
    import fasteval.data.samples

    def work(*args, **kwargs):
        raise AssertionError("the dataset was read before the options were checked")

    monkeypatch.setattr(fasteval.data.samples, "discover", work)
    assert named in error_line(capfd, small_data, *args)


# --- 5. the demo cache ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, reason", [("file", "is not a folder"), ("under_file", "cannot create the demo cache"),
                                          ("unwritable", "cannot create the demo cache")])
def test_unusable_cache_is_one_line(tmp_path, capfd, monkeypatch, kind, reason):
    (tmp_path / "file").write_text("x")
    cache = {"file": tmp_path / "file", "under_file": tmp_path / "file" / "cache",
             "unwritable": "/proc/fasteval-cache"}[kind]
    monkeypatch.setenv("FASTEVAL_CACHE", str(cache))
    rc = main(["eval", "--reference", "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{cache}" in err and reason in err


def _fake_build(calls):
    def build(work):
        calls.append(work)
        time.sleep(0.3)
        os.makedirs(os.path.join(work, "val", "a"))
        with open(os.path.join(work, f"{demo_module.DEMO_ARCH}-demo.pt"), "w") as f:
            f.write("weights")
    return build


def test_concurrent_first_runs_build_once_and_never_delete_a_published_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEVAL_CACHE", str(tmp_path))
    stale = tmp_path / f".demo-{demo_module.DEMO_VERSION}.tmp-999999999-x"  # a killed builder's (no such pid)
    stale.mkdir()
    (tmp_path / f"demo-{demo_module.DEMO_VERSION}").mkdir()  # an incomplete entry (older versions left those)
    calls, results = [], []
    monkeypatch.setattr(demo_module, "_build", _fake_build(calls))
    threads = [threading.Thread(target=lambda: results.append(demo_module.ensure_demo(log=open(os.devnull, "w"))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3
    data, weights = results[0]
    inode = os.stat(data).st_ino
    assert demo_module.ensure_demo() == (data, weights) and os.stat(data).st_ino == inode  # kept, not rebuilt
    assert sorted(os.listdir(tmp_path)) == [f".demo-{demo_module.DEMO_VERSION}.lock",
                                            f"demo-{demo_module.DEMO_VERSION}"]


# --- 6. processes: SIGTERM and SIGKILL leave no worker and no temporary folder ----------------------

def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal_during_pool(args: list[str], sig: int, env: dict | None = None) -> tuple[subprocess.Popen, str, list]:
    """Start ``fasteval ARGS``, wait for its pool workers, send ``sig``; (process, stderr, worker pids)."""
    proc = subprocess.Popen([sys.executable, "-m", "fasteval", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "no pool workers seen"
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    deadline = time.monotonic() + 10
    while any(_running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(w) for w in workers), "a pool worker outlived its parent"
    return proc, err, workers


SYNTH_BIG = ["--classes", "4", "--per-class", "400", "--size", "640x480"]
needs_pool = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="synth starts a worker pool only with 2+ cores")


@needs_pool
def test_sigterm_during_synth_stops_the_workers_and_removes_the_temporary_folder(tmp_path):
    out = tmp_path / "out"
    proc, err, _ = _signal_during_pool(["synth", str(out), *SYNTH_BIG], signal.SIGTERM)
    assert proc.returncode == 143 and "fasteval: terminated" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []  # neither OUT nor a temporary folder


@needs_pool
def test_sigkill_during_synth_workers_die_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "out"
    _signal_during_pool(["synth", str(out), *SYNTH_BIG], signal.SIGKILL)
    assert [name for name in os.listdir(tmp_path) if ".tmp-" in name]  # left by the killed run
    assert main(["synth", str(out), "--classes", "2", "--per-class", "1", "--size", "16x16"]) == 0
    assert os.listdir(tmp_path) == ["out"]


@needs_pool
def test_sigterm_during_the_demo_build_leaves_nothing_behind(tmp_path):
    proc, err, _ = _signal_during_pool(["eval", "--reference", "--no-progress"], signal.SIGTERM,
                                       env={"FASTEVAL_CACHE": str(tmp_path)})
    assert proc.returncode == 143 and "Traceback" not in err
    assert os.listdir(tmp_path) == [f".demo-{demo_module.DEMO_VERSION}.lock"]


# --- 7. a model that does not take the input size -----------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_model_and_input_that_do_not_fit(small_data, tmp_path, capfd, path):
    line = error_line(capfd, small_data, "--arch", "alexnet", *PATHS[path], "--resize", "32", "--crop", "32")
    assert "--arch alexnet does not accept 32x32 inputs" in line


@pytest.mark.parametrize("path", PATHS)
def test_inputs_larger_than_the_machine_are_refused_before_any_work(small_data, weights_3cls, capfd, path):
    rc = main(["eval", small_data, "--weights", weights_3cls, *PATHS[path], "--resize", "100000", "--crop", "100000",
               "--no-progress"])
    out, err = capfd.readouterr()
    assert rc == 2 and "Traceback" not in err and "fasteval eval" not in out
    assert "--resize 100000 --crop 100000 --batch-size 21 needs" in err and "activations" in err


# --- 8. messages that are true -------------------------------------------------------------------------

def test_weights_messages_say_what_the_file_is(small_data, tmp_path, capfd):
    import torchvision

    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(num_classes=3), whole)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    line = error_line(capfd, small_data, "--reference", "--weights", str(random_bytes))
    assert "not a PyTorch checkpoint" in line and "weights_only" not in line
    line = error_line(capfd, small_data, "--reference", "--weights", str(whole))
    assert "pickled object (torchvision.models.resnet.ResNet)" in line and "model.state_dict()" in line
    assert "\x1b" not in line and "weights_only=False" not in line
    assert f"--weights {folder} is a folder" in error_line(capfd, small_data, "--reference", "--weights", str(folder))
    os.symlink(tmp_path / "gone.pt", tmp_path / "link.pt")
    line = error_line(capfd, small_data, "--reference", "--weights", str(tmp_path / "link.pt"))
    assert "is a broken symbolic link" in line


@needs_dali
def test_no_decoder_log_lines_in_a_successful_run(small_data, weights_3cls, tmp_path, capfd):
    """A CMYK TIFF makes DALI's libtiff decoder log a coloured [ERROR] before another decoder takes it:
    such files go to PIL, and the decoders' other logs are switched off."""
    data = copy_tree(small_data, tmp_path)
    make_image(1, 0, 3, 0, (60, 50)).convert("CMYK").save(os.path.join(data, "class_001", "cmyk.tif"))
    rc, _, err = run(capfd, data, "--weights", weights_3cls, *FAST)
    assert rc == 0 and "[ERROR" not in err and "\x1b[" not in err


# --- 9. folder loops ---------------------------------------------------------------------------------

def test_a_folder_loop_is_counted_as_imagefolder_does_with_one_warning(tmp_path, weights_3cls, capfd):
    from torchvision.datasets import ImageFolder

    from fasteval.data.synth import synth_dataset

    data = synth_dataset(tmp_path / "data", classes=3, per_class=2, size="60x50", seed=4)
    os.symlink(".", os.path.join(data, "class_001", "again"))
    count = len(ImageFolder(data).samples)
    fast, ref = same_per_sample(capfd, data, weights_3cls, tmp_path)
    assert len(fast) == count > 6
    rc, _, err = run(capfd, data, "--weights", weights_3cls, *PATHS["reference"])
    warnings = [line for line in err.splitlines() if line.startswith("fasteval: warning:")]
    assert len(warnings) == 1 and f"{count - 6} of the {count} samples" in warnings[0]
    assert "6 distinct files" in warnings[0]


# --- 10. synth ------------------------------------------------------------------------------------------

def test_synth_refuses_a_non_empty_out_unless_overwrite(tmp_path, capfd):
    out = tmp_path / "out"
    args = ["synth", str(out), "--classes", "2", "--per-class", "1", "--size", "16x16"]
    assert main(args) == 0
    (out / "mine.txt").write_text("keep?")
    assert main(args) == 2
    err = capfd.readouterr().err
    assert f"OUT {out} is not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "mine.txt").exists()
    assert main([*args, "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["class_000", "class_001"] and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("kind, reason", [("file", "is a file, not a folder"), ("under_file", "is a file"),
                                          ("unwritable", "cannot write in /proc")])
def test_synth_unusable_out_is_one_line(tmp_path, capfd, kind, reason):
    (tmp_path / "file").write_text("x")
    out = {"file": tmp_path / "file", "under_file": tmp_path / "file" / "out", "unwritable": "/proc/fasteval-out"}[kind]
    assert main(["synth", str(out), "--classes", "2", "--per-class", "1", "--size", "16x16"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and reason in err and len(err.strip().splitlines()) == 1


def test_synth_writes_every_out_name_that_passes_the_checks(tmp_path, capfd):
    """The longest name the file system allows is written (the temporary folder's name stays short);
    a longer one, or one on the way to OUT, is one line, exit 2, nothing written."""
    limit = _longest_name(tmp_path)
    args = ["--classes", "2", "--per-class", "1", "--size", "16x16"]
    assert main(["synth", str(tmp_path / ("s" * limit)), *args]) == 0
    assert os.listdir(tmp_path) == ["s" * limit] and len(os.listdir(tmp_path / ("s" * limit))) == 2
    capfd.readouterr()
    for out in (tmp_path / ("t" * (limit + 1)), tmp_path / "a" / ("t" * (limit + 1)) / "b"):
        assert main(["synth", str(out), *args]) == 2
        err = capfd.readouterr().err
        assert err == (f"fasteval: error: OUT {out}: the name tttttttttttttttt... is {limit + 1} bytes long, more "
                       f"than the {limit} this file system allows\n")
        assert os.listdir(tmp_path) == ["s" * limit]


# --- 11. the batch size used --------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_json_records_the_batch_size_used_and_the_one_requested(small_data, weights_3cls, tmp_path, capfd, path):
    out = tmp_path / "r.json"
    rc = main(["eval", small_data, "--weights", weights_3cls, *PATHS[path], "--resize", "40", "--crop", "32",
               "--batch-size", "100000", "--no-progress", "--json", str(out)])
    assert rc == 0, capfd.readouterr().err
    config = json.loads(out.read_text())["config"]
    assert config["batch_size"] == 21 and config["batch_size_requested"] == 100000


# --- every other error: one line, exit 2; --debug shows the traceback ------------------------------------

def test_unexpected_and_os_errors_are_one_line_and_debug_shows_them(small_data, capfd, monkeypatch):
    import fasteval.data.samples

    def broken(*args, **kwargs):
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(fasteval.data.samples, "discover", broken)
    line = error_line(capfd, small_data, "--reference")
    assert "RuntimeError: went wrong" in line and "--debug" in line
    with pytest.raises(RuntimeError):
        main(["eval", small_data, "--reference", "--debug"])

    def os_error(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/file")

    monkeypatch.setattr(fasteval.data.samples, "discover", os_error)
    assert "Permission denied: '/some/file'" in error_line(capfd, small_data, "--reference")
