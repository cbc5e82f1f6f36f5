"""The header probe in worker processes (fasteval/data/probe.py ``probe_all``): the same probes, in the same order,
the same refusal message as one process gives, on a tree with every kind of bad file."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import fasteval.data.probe as probe_module
from fasteval.data.probe import check_headers, probe_all
from fasteval.data.samples import SampleList
from fasteval.errors import FastevalError


@pytest.fixture
def mixed_tree(tmp_path) -> list[str]:
    """40 files: JPEGs and PNGs of varied sizes, and among them an empty file, a text file, an HTML page, a
    truncated JPEG, a macOS '._' file, a broken link, a FIFO and a folder named like an image."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(32):
        w, h = int(rng.integers(8, 40)), int(rng.integers(8, 40))
        path = str(tmp_path / f"img{i:02d}.{'png' if i % 5 == 0 else 'jpg'}")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    data = open(paths[1], "rb").read()
    bad = {"empty.jpg": b"", "notes.jpg": b"just some text\n", "page.jpg": b"<!DOCTYPE html><html>404</html>",
           "cut.jpg": data[: len(data) // 2], "._img01.jpg": b"\x00\x05\x16\x07" + b"\x00" * 60}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    os.symlink(str(tmp_path / "gone.jpg"), tmp_path / "link.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "folder.jpg").mkdir()
    extra = [str(tmp_path / n) for n in (*bad, "link.jpg", "fifo.jpg", "folder.jpg")]
    for k, path in enumerate(extra):  # spread among the good files, so that each chunk gets some
        paths.insert(3 + 4 * k, path)
    return paths


def test_parallel_probes_equal_serial_ones_in_order(mixed_tree, monkeypatch):
    monkeypatch.setattr(probe_module, "PARALLEL_FILES", 8)
    monkeypatch.setattr(probe_module, "PARALLEL_CHUNK", 6)
    probe_module._cache.clear()
    serial = [probe_module.probe(p) for p in mixed_tree]
    assert sum(p.error is not None for p in serial) == 7 and sum(not p.complete for p in serial) == 1
    probe_module._cache.clear()
    pools, parent_probes = [], []
    real_pool, real_probe = probe_module.pool_map, probe_module._probe
    monkeypatch.setattr(probe_module, "pool_map", lambda *a: pools.append(a[2]) or real_pool(*a))
    monkeypatch.setattr(probe_module, "_probe", lambda *a: parent_probes.append(a[0]) or real_probe(*a))
    parallel = probe_all(mixed_tree + mixed_tree[:3], workers=2)  # a repeated path too
    assert pools == [2] and parent_probes == []  # probed by the workers; this process read the cache
    assert parallel == serial + serial[:3]
    assert probe_all(mixed_tree) == serial and pools == [2]  # cached: no second pool


def test_the_refusal_is_the_same_serial_or_parallel(mixed_tree, monkeypatch):
    samples = SampleList(os.path.dirname(mixed_tree[0]), ["a"], [(p, 0) for p in mixed_tree])
    messages = []
    for files in (10**9, 8):  # serial, then parallel
        monkeypatch.setattr(probe_module, "PARALLEL_FILES", files)
        monkeypatch.setattr(probe_module, "PARALLEL_CHUNK", 6)
        probe_module._cache.clear()
        with pytest.raises(FastevalError) as exc:
            check_headers(samples)
        messages.append(str(exc.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"cannot decode image {mixed_tree[3]}: empty file (0 bytes) (7 more files")
