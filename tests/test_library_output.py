"""What libraries print on stderr stays off it: PIL's decompression-bomb warning, the C decoders' warnings
under DALI (libjpeg, libpng: written to fd 2, not through Python) and torch's tracebacks about a damaged
compile cache. Each run is a process of its own, so that stderr is the real one (pytest would capture
Python warnings and hide whether they are printed); the results are checked to be unaffected."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys

import pytest

from fasteval.data.synth import make_image, synth_dataset

FAST = ["--no-progress", "--resize", "40", "--crop", "32", "--precision", "fp32", "--device", "cpu"]


def run(args: list[str], env: dict | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    """``fasteval ARGS`` in a process of its own; ``prelude``: Python run before the command."""
    code = f"import sys\n{prelude}\nsys.argv = ['fasteval', *{args!r}]\nfrom fasteval.cli import console_main\n" \
           "console_main()\n"
    # Without the compile caches' folders an earlier in-process test left in os.environ: the command's
    # FASTEVAL_CACHE decides where they are.
    base = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, errors="replace",
                          timeout=600, env={**base, **(env or {})})


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


def jpeg_with_bytes_before_a_marker(image) -> bytes:
    """A JPEG with restart markers and 3 stray bytes before the first: libjpeg warns "Corrupt JPEG data: 3
    extraneous bytes before marker 0xd0", skips them and decodes the same pixels (PIL as DALI)."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, restart_marker_rows=1)
    data = buf.getvalue()
    at = data.index(b"\xff\xd0", data.index(b"\xff\xda"))
    return data[:at] + b"\x00\x11\x22" + data[at:]


def gray_png_with_an_rgb_profile(image) -> bytes:
    """A grayscale PNG carrying an RGB ICC profile: libpng warns ("iCCP: ... RGB color space not permitted
    on grayscale PNG", the family of "iCCP: known incorrect sRGB profile") and ignores it, as PIL does."""
    from PIL import ImageCms

    buf = io.BytesIO()
    image.convert("L").save(buf, "PNG", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    return buf.getvalue()


def test_dali_decoders_warnings_stay_off_stderr(tmp_path):
    """DALI's CPU decoders (libjpeg, libpng) wrote their warnings to fd 2 on every decode of such a file; the
    run now shows one note at its end, fasteval's own lines still pass, and each such file's result is its
    clean twin's (the same image without the stray bytes, without the profile)."""
    from PIL import Image

    from fasteval.data.loader_dali import dali_available

    if not dali_available():
        pytest.skip("DALI not installed")
    data = synth_dataset(str(tmp_path / "data"), classes=2, per_class=6, size="64x48", seed=3)
    stray = jpeg_with_bytes_before_a_marker(make_image(7, 0, 2, 0, (64, 48)))
    files = {"class_000/stray.jpg": stray,
             "class_000/stray_clean.jpg": stray.replace(b"\x00\x11\x22\xff\xd0", b"\xff\xd0"),
             "class_001/profile.png": gray_png_with_an_rgb_profile(make_image(8, 1, 2, 0, (64, 48)))}
    buf = io.BytesIO()
    Image.open(io.BytesIO(files["class_001/profile.png"])).save(buf, "PNG")  # the same pixels, no profile
    files["class_001/profile_clean.png"] = buf.getvalue()
    for rel, content in files.items():
        with open(os.path.join(data, rel), "wb") as f:
            f.write(content)
    csv = tmp_path / "p.csv"
    proc = run(["eval", data, *FAST, "--workers", "1", "--loader", "dali", "--no-compile", "--exact", "off",
                "--predictions", str(csv)])
    assert proc.returncode == 0, proc.stderr
    assert "Corrupt JPEG" not in proc.stderr and "libpng warning" not in proc.stderr, proc.stderr
    assert "fasteval: no --weights" in proc.stderr  # fasteval's lines pass
    note = proc.stderr.splitlines()[-1]
    assert note.startswith("fasteval: note: the image decoders warned ") and "libjpeg: bytes before a marker: " \
        in note and "libpng: an ICC profile it rejects: " in note
    rows = {row.split(",")[0]: row.split(",")[1:] for row in csv.read_text().splitlines()[1:]}  # paths under DATA
    assert len(rows) == 16 and rows["class_000/stray.jpg"] == rows["class_000/stray_clean.jpg"] and \
        rows["class_001/profile.png"] == rows["class_001/profile_clean.png"]


def test_only_the_known_decoder_warnings_are_held_back():
    """fd 2 while held: other lines (and a progress bar's unfinished line) pass at once and in order; fd 2
    is back after release; the count is said once, at exit."""
    code = ("import os, sys\n"
            "from fasteval.data.decoder_output import hold\n"
            "h = hold()\n"
            "os.write(2, b'bar 10%\\r')\n"
            "os.write(2, b'Corrupt JPEG data: 2 extraneous bytes before marker 0xd9\\n')\n"
            "os.write(2, b'libpng warning: iCCP: known incorrect sRGB profile\\nother library line\\n')\n"
            "print('fasteval line', file=sys.stderr)\n"
            "os.write(2, b'Corrupt JPEG data: premature end of data segment\\n')\n"
            "h.release()\n"
            "os.write(2, b'Corrupt JPEG data: 1 extraneous bytes before marker 0xd0\\n')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stderr.decode().split("\n") == [
        "bar 10%\rother library line", "fasteval line", "Corrupt JPEG data: premature end of data segment",
        "Corrupt JPEG data: 1 extraneous bytes before marker 0xd0",
        "fasteval: note: the image decoders warned 2 time(s) about defects that do not change the pixels (libjpeg: "
        "bytes before a marker: 1; libpng: an ICC profile it rejects: 1), not shown: they decode those files as PIL "
        "does", ""]


# --- a damaged compile cache ------------------------------------------------------------------------------

def test_torchs_records_of_unloadable_entries_are_collected_not_printed(tmp_path, capfd):
    """torch's own cache reader (GuardedCache.iterate_over_candidates) on a truncated entry: its warning and
    traceback do not reach stderr, and ``watch`` names the entry (only inside the folder)."""
    from torch._inductor.codecache import GuardedCache

    from fasteval.model import cache_damage

    entries = tmp_path / "fxgraph" / "key"
    entries.mkdir(parents=True)
    (entries / "good").write_bytes(pickle.dumps({"graph": 1}))
    (entries / "damaged").write_bytes(pickle.dumps({"graph": 2})[:5])

    class Cache(GuardedCache):
        @classmethod
        def _get_tmp_dir_for_key(cls, key):
            return str(tmp_path / "fxgraph" / key)

    with cache_damage.watch(str(tmp_path)) as found:
        loaded = [entry for entry, _, _ in Cache.iterate_over_candidates(True, None, "key")]
    assert loaded == [{"graph": 1}] and found.paths == [str(entries / "damaged")] and found.unknown == 0
    assert "unable to load" not in capfd.readouterr().err
    assert cache_damage.remove(found.paths + ["/etc/hostname"], str(tmp_path)) == 1  # nothing outside it
    assert sorted(os.listdir(entries)) == ["good"]


def test_a_compile_failing_on_a_cached_file_clears_the_cache_and_compiles_again(tmp_path, monkeypatch, capsys):
    """The failure torch raises on a truncated kernel (an ImportError naming the file in the cache): the
    artifacts are cleared (the profiles kept), the model compiled once more, one line. A failure that names
    nothing in the cache (no C++ compiler) leaves the cache alone and runs eager, as before."""
    import torch
    import torchvision

    from fasteval.model.compile_cache import compile_dir
    from fasteval.model.inference import FastModel

    monkeypatch.setenv("FASTEVAL_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cpu = torch.device("cpu")
    folder = compile_dir(cpu)
    kernel = os.path.join(folder, "nk", "cnk.main.so")
    for path in (kernel, os.path.join(folder, "fxgraph", "f3", "entry"), os.path.join(folder, "profiles", "p.json")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("x")
    compiles = []

    def compile_failing_once(fn, **kwargs):
        compiles.append(fn)
        if len(compiles) > 1:
            return fn

        def run(*args):
            raise RuntimeError(f"backend='inductor' raised:\nImportError: {kernel}: cannot read file data")
        return run

    monkeypatch.setattr(torch, "compile", compile_failing_once)
    model = FastModel(torchvision.models.resnet18(num_classes=3), cpu, "fp32", "on")
    model.warm_up(torch.zeros(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert model.compiled and len(compiles) == 2 and "after clearing a damaged compile cache" in model.compile_reason
    assert sorted(os.listdir(folder)) == ["profiles"] and "p.json" in os.listdir(os.path.join(folder, "profiles"))
    assert capsys.readouterr().err.splitlines() == [
        f"fasteval: warning: the compile cache {folder} was damaged (ImportError: nk/cnk.main.so: cannot read file "
        f"data); cleared it and compiled afresh"]

    os.makedirs(os.path.dirname(kernel))
    open(kernel, "w").close()
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: lambda *args: 1 / 0)
    model = FastModel(torchvision.models.resnet18(num_classes=3), cpu, "fp32", "on")
    model.warm_up(torch.zeros(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert not model.compiled and os.path.exists(kernel)
    assert capsys.readouterr().err.splitlines() == [
        "fasteval: warning: torch.compile failed, running eager: division by zero"]


def _cache_entries(cache) -> list[str]:
    """torch's FX-graph and AOTAutograd entries (pickles) in a fasteval cache."""
    return [os.path.join(d, name) for d, _, names in os.walk(cache)
            if os.sep + "fxgraph" + os.sep in d + os.sep or os.sep + "aotautograd" + os.sep in d + os.sep
            for name in names]


@pytest.mark.slow
def test_a_damaged_compile_cache_is_noticed_once_and_replaced(small_data, tmp_path):
    """Entries of the compile cache truncated after a run that compiled: the next run printed torch's warning
    and traceback for each (six lines apiece) and wrote a good entry beside the damaged one, which every
    later run read first again. Now: one fasteval line, the damaged files gone, the same result, and the run
    after it is quiet and loads from the cache. About 40 s: one cold compile on the CPU."""
    env = {"FASTEVAL_CACHE": str(tmp_path / "cache")}
    # SqueezeNet: the smallest graph among torchvision's classifiers to compile cold, twice here
    args = ["eval", small_data, *FAST, "--arch", "squeezenet1_1", "--compile", "on", "--workers", "0"]
    results, errs = [], []
    for step in range(3):
        out = tmp_path / f"{step}.json"
        proc = run([*args, "--json", str(out)], env=env)
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(out.read_text()))
        errs.append(proc.stderr)
        if step == 0:
            damaged = _cache_entries(tmp_path / "cache")
            assert damaged
            for path in damaged:
                os.truncate(path, 10)
    for err in errs[1:]:
        assert "Traceback" not in err and "codecache" not in err and "unable to load" not in err, err
    lines = [line for line in errs[1].splitlines() if "compile cache" in line]
    assert len(lines) == 1 and lines[0].startswith(f"fasteval: warning: removed {len(damaged)} damaged file(s) "
                                                   f"from the compile cache "), errs[1]
    assert not any(os.path.exists(path) for path in damaged) and _cache_entries(tmp_path / "cache")
    assert "compile cache" not in errs[2] and "loaded from the compile cache" in results[2]["compile_reason"]
    for result in results[1:]:
        assert (result["correct_top1"], result["loss_sum"]) == (results[0]["correct_top1"], results[0]["loss_sum"])
