"""The ``--cache DIR`` store (fasteval/data/decoded.py) when its inputs or its disk misbehave: files
rewritten at the same size with their modification times restored, files changed while they are
decoded, a full disk (SIGBUS through the map before), a folder made read-only mid-run, the temporary
files of dead runs."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fasteval.cli import main
from fasteval.data import decoded
from fasteval.data.decoded import DecodedSource, check_cache_dir
from fasteval.data.samples import discover

SIZES = ["--resize", "40", "--crop", "32", "--batch-size", "4", "--workers", "0", "--compile", "off", "--no-progress"]
CPU = torch.device("cpu")


@pytest.fixture
def bmp_data(small_data, tmp_path) -> str:
    """``small_data`` as BMPs: every file the same size (72 x 60 x 3 bytes and a header)."""
    root = tmp_path / "bmp"
    for path, _ in discover(small_data).samples:
        out = root / os.path.basename(os.path.dirname(path)) / (os.path.splitext(os.path.basename(path))[0] + ".bmp")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").save(out)
    assert len({p.stat().st_size for p in root.glob("*/*.bmp")}) == 1
    return str(root)


def _swap_keeping_times(a: str, b: str) -> None:
    """Exchange two files' bytes, then give each back its size (equal) and its times, as
    ``rsync -t``, ``cp -p`` or an archive restore leave them."""
    times = {p: os.stat(p) for p in (a, b)}
    data = {p: open(p, "rb").read() for p in (a, b)}
    for path, other in ((a, b), (b, a)):
        with open(path, "wb") as f:
            f.write(data[other])
        os.utime(path, ns=(times[path].st_atime_ns, times[path].st_mtime_ns))
    assert all(os.stat(p).st_size == times[p].st_size and os.stat(p).st_mtime_ns == times[p].st_mtime_ns
               for p in (a, b))


def _rows(path) -> dict[str, tuple]:
    with open(path) as f:
        return {r["path"]: (r["label"], r["prediction"], r["loss"]) for r in csv.DictReader(f)}


def test_cache_same_size_files_swapped_are_not_served(bmp_data, weights_3cls, tmp_path, capsys):
    """Two same-size files of different classes swapped, their sizes and modification times restored:
    the entry is stale and rebuilt (one line says so), and every sample's prediction and loss equal a
    fresh decode's, not the old pixels'. A file only touched (same bytes) is still a hit."""
    cache = tmp_path / "cache"

    def run(folder, name: str) -> dict:
        out, predictions = tmp_path / f"{name}.json", tmp_path / f"{name}.csv"
        assert main(["eval", bmp_data, "--weights", weights_3cls, "--exact", "off", "--cache", str(folder),
                     "--json", str(out), "--predictions", str(predictions), *SIZES]) == 0
        return {"report": json.loads(out.read_text()), "rows": _rows(predictions)}

    before = run(cache, "before")
    assert before["report"]["decoded"]["cache"] == "written"
    paths = discover(bmp_data).paths
    a, b = paths[0], paths[-1]  # the first class's first image, the last class's last
    _swap_keeping_times(a, b)
    capsys.readouterr()
    after = run(cache, "after")
    state = after["report"]["decoded"]["cache"]
    assert state.startswith("stale: the files (their contents)") and state.endswith("rebuilt"), state
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fasteval")]
    assert len(err) == 1 and "is stale" in err[0] and "rebuilding it" in err[0], err
    fresh = run(tmp_path / "fresh", "fresh")
    assert fresh["report"]["decoded"]["cache"] == "written"
    assert after["rows"] == fresh["rows"]
    swapped = [os.path.relpath(p, bmp_data) for p in (a, b)]
    assert all(after["rows"][p] != before["rows"][p] for p in swapped)  # the old pixels would give the old rows
    for path in paths:
        os.utime(path)
    assert run(cache, "touched")["report"]["decoded"]["cache"] == "hit"


def test_cache_files_changed_while_decoded_are_not_stored(small_data, small_spec, tmp_path, monkeypatch, capsys):
    """A file rewritten while the store is being decoded (its bytes may be either version): the run uses
    what it decoded, the entry is not written (one line names the file), nothing is left in the folder,
    and the next run decodes and writes it."""
    data = shutil.copytree(small_data, tmp_path / "data")
    samples = discover(str(data))
    cache = str(tmp_path / "cache")
    real = decoded.decode_into

    def rewrite_after(loader, out):
        real(loader, out)
        with open(samples.paths[4], "r+b") as f:  # the same bytes, written again
            content = f.read()
            f.seek(0)
            f.write(content)

    args = dict(batch_size=4, workers=0, device=CPU)
    with monkeypatch.context() as m:
        m.setattr(decoded, "decode_into", rewrite_after)
        source = DecodedSource(cache)("torchvision", samples, small_spec, **args)
    assert source.info["cache"] == "not written: 1 file(s) changed while they were decoded", source.info
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written" in err[0] and samples.paths[4] in err[0], err
    assert os.listdir(cache) == []
    fresh = DecodedSource(None)("torchvision", samples, small_spec, **args)
    assert torch.equal(source.images, fresh.images)
    again = DecodedSource(cache)("torchvision", samples, small_spec, **args)
    assert again.info["cache"] == "written" and torch.equal(again.images, fresh.images)


def _cache_error(capsys, rc: int, cache) -> str:
    """The one stderr line of a refused ``--cache`` run; nothing may be left in the folder."""
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("fasteval: error: --cache "), err
    assert "Traceback" not in err[0]
    assert [n for n in os.listdir(cache) if not n.startswith(".fasteval-write-check")] == []
    return err[0]


def test_cache_no_space_is_one_line(small_data, weights_3cls, tmp_path, monkeypatch, capsys):
    """A disk without room for the store: ``posix_fallocate``'s ENOSPC before anything is decoded, one
    line naming --cache and the size, exit 2, no file left, no output written (the map was written
    unreserved before, and died of SIGBUS)."""
    cache, out = tmp_path / "cache", tmp_path / "out.json"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(decoded, "decode_into", lambda *a: pytest.fail("decoded without room for the store"))
    rc = main(["eval", small_data, "--weights", weights_3cls, "--cache", str(cache), "--json", str(out), *SIZES])
    line = _cache_error(capsys, rc, cache)
    assert "no space left on device for the decoded images (0.1 MiB" in line, line
    assert not out.exists()


def test_cache_folder_made_read_only_mid_run(small_data, weights_3cls, tmp_path, monkeypatch, capsys):
    """The cache folder made read-only while the store is decoded: one line naming --cache and the
    file it could not write, exit 2, and nothing left in the folder (the data were written to an unnamed
    file; before, a raw '[Errno 13]' and the whole store left as a hidden temporary). As root, whom
    permissions do not stop, the store is committed as nobody."""
    cache = tmp_path / "cache"
    real = decoded.DiskCache.commit

    def read_only_commit(self, *args):
        os.chmod(cache, 0o555)
        root = os.geteuid() == 0
        if root:
            os.seteuid(65534)
        try:
            real(self, *args)
        finally:
            if root:
                os.seteuid(0)

    monkeypatch.setattr(decoded.DiskCache, "commit", read_only_commit)
    try:
        rc = main(["eval", small_data, "--weights", weights_3cls, "--cache", str(cache), *SIZES])
    finally:
        os.chmod(cache, 0o755)
    line = _cache_error(capsys, rc, cache)
    assert "Permission denied" in line and str(cache) in line, line


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_runs_removed_first(tmp_path):
    """``check_cache_dir`` removes a dead run's hidden temporary before it checks the folder (one killed
    while writing may have filled the disk, which the check then refused for ever); a live run's stays."""
    dead = tmp_path / f".decoded-x.u8.tmp-{_dead_pid()}-1"
    live = tmp_path / f".decoded-y.u8.tmp-{os.getpid()}-1"
    for path in (dead, live):
        path.write_bytes(b"\0" * 1000)
    check_cache_dir(str(tmp_path))
    assert not dead.exists() and live.exists()


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MiB tmpfs (mounting needs root: skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_cache_on_a_real_full_filesystem(small_data, weights_3cls, small_filesystem):
    """On a 1 MiB file system: a 3 MiB store is refused in one line naming --cache, exit 2, nothing
    left (it died of SIGBUS, exit -7, with nothing printed); then a dead run's temporary that fills the
    disk is removed and a 63 KiB store is written."""
    cache = small_filesystem / "cache"

    def run(*sizes: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fasteval", "eval", small_data, "--weights", weights_3cls,
                               "--cache", str(cache), "--compile", "off", "--no-progress", "--workers", "0", *sizes],
                              capture_output=True, text=True, timeout=300)

    big = run("--resize", "256", "--crop", "224")  # 21 x 3 x 224 x 224 bytes: 3.0 MiB
    err = big.stderr.strip().splitlines()
    assert big.returncode == 2 and len(err) == 1, (big.returncode, err)
    assert err[0].startswith(f"fasteval: error: --cache {cache}: no space left on device for the decoded images")
    assert os.listdir(cache) == []
    with open(cache / f".decoded-x.u8.tmp-{_dead_pid()}-1", "wb", buffering=0) as f:
        with pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 4096)
    small = run("--resize", "40", "--crop", "32")
    assert small.returncode == 0, small.stderr
    assert sorted(n.split(".")[-1] for n in os.listdir(cache)) == ["json", "u8"], os.listdir(cache)
