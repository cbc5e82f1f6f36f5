"""The cost of a ``--cache`` hit on a store of realistic size (2,560 samples of 3 x 224 x 224: 368 MiB):
``DecodedSource``'s setup (the lookup: the files' SHA-256s, then with ``verified`` the CRC-32s over the
mapping) and one read of every sample, as the first pass makes it. ``unverified`` skips the checksums
(the code before them): the difference is what the verification costs. ``stat-keyed`` stats the files
in place of hashing them (the code before the content key, which served the old pixels of files
rewritten with their modification times kept): its difference to ``verified`` is what hashing the
files costs. ``warm``: the store and the images in the page cache; ``cold``: their pages evicted first
(posix_fadvise). The pixels are random: the cost does not depend on them.

    pytest benchmarks/bench_cache.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fasteval.data import decoded
from fasteval.data.preprocess import get_spec
from fasteval.data.samples import discover

COPIES = 10  # each of the bench dataset's 256 JPEGs linked 10 times: 2,560 samples
CPU = torch.device("cpu")


def build_store(data: str, folder, copies: int, spec) -> tuple:
    """A dataset of ``copies`` hard links to each image of ``data`` under ``folder``, and its cache
    entry filled with random pixels: (samples, spec, cache folder, data file)."""
    from fasteval.data.preprocess import image_size

    root = os.path.join(folder, "data")
    for path, label in discover(data, quiet=True).samples:
        os.makedirs(os.path.join(root, f"c{label}"), exist_ok=True)
        for copy in range(copies):
            os.link(path, os.path.join(root, f"c{label}", f"{copy}_{os.path.basename(path)}"))
    samples = discover(root, quiet=True)
    cache = os.path.join(folder, "cache")
    shape = (len(samples), 3, *spec.output_hw(*image_size(samples.paths[0])))
    entry = decoded.DiskCache(cache, samples, spec, decoded.loader_name("torchvision", CPU), shape)
    array = entry.create()
    rng = np.random.default_rng(0)
    for start in range(0, shape[0], 256):
        array[start:start + 256] = rng.integers(0, 256, array[start:start + 256].shape, dtype=np.uint8)
    entry.commit(array)
    return samples, spec, cache, entry.data


@pytest.fixture(scope="session")
def cache_store(bench_dataset, tmp_path_factory) -> tuple:
    """2,560 samples (the bench dataset's 256 JPEGs, each linked 10 times) at 224 x 224: 368 MiB."""
    return build_store(bench_dataset, tmp_path_factory.mktemp("cache_bench"), COPIES, get_spec("imagenet"))


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("pages", ["warm", "cold"])
@pytest.mark.parametrize("variant", ["unverified", "verified", "stat-keyed"])
def bench_cache_hit(benchmark, cache_store, monkeypatch, variant, pages):
    samples, spec, cache, data = cache_store
    if variant == "unverified":
        with open(data.replace(".u8", ".json")) as f:
            recorded = json.load(f)["checksum"]["values"]
        monkeypatch.setattr(decoded, "checksums", lambda images: recorded)
    if variant == "stat-keyed":
        key = decoded.files_key(samples)

        def by_stat(listed):  # what the key by sizes and modification times read: one stat per file
            for path in listed.paths:
                os.stat(path)
            return key

        monkeypatch.setattr(decoded, "files_key", by_stat)
    buffer = None

    def hit():  # the eviction (a few ms) is timed too, equally in every variant
        nonlocal buffer
        if pages == "cold":
            for path in [data, *samples.paths]:
                _evict(path)
        source = decoded.DecodedSource(cache)("torchvision", samples, spec, batch_size=64, workers=0, device=CPU)
        assert source.info["cache"] == "hit", source.info
        buffer = torch.empty_like(source.images[:64]) if buffer is None else buffer
        for start in range(0, len(source), 64):
            part = source.images[start:start + 64]
            buffer[:part.shape[0]].copy_(part)

    benchmark.group = f"--cache hit, {os.path.getsize(data) / 2**20:.0f} MiB store, {pages} page cache"
    benchmark.pedantic(hit, rounds=9, iterations=1, warmup_rounds=1)
