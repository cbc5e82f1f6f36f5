"""The decoded set: every sample's preprocessed uint8 image, decoded once and kept for many passes.

The images are kept as the loaders make them before normalising: uint8 after resize and crop (the
reference rounds to uint8 after resizing too), so a pass over the store feeds the model what the
loader would have fed it. Where they are kept is decided from their size (N x 3 x H x W bytes):
on the GPU when they fit in its free memory with a margin, else in pinned host memory, else (on
the CPU: in RAM when they fit) decoded again per pass. ``--cache DIR`` also keeps them on disk,
memory-mapped, keyed by content: the sample list with the SHA-256 of each file's bytes (read on
every lookup: a file rewritten at the same size with its modification time restored is new content),
the preprocessing spec, the loader and the decoders' versions. The description also holds the CRC-32s
of the data file as written (one per 16 MiB); every hit recomputes them over the mapping it then
uses, before any sample is used. An entry whose key no longer matches, or whose data fail their
checksums, is stale: it is rebuilt (one line on stderr says why), never used. Files are written
beside their final name and renamed (atomic); the data file's space is reserved before it is mapped,
so a full disk is an error message, not a SIGBUS.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch

from fasteval.data.batch import Batch
from fasteval.data.loaders import make_loader, resolve_loader
from fasteval.data.preprocess import PreprocessSpec, image_size
from fasteval.data.samples import SampleList
from fasteval.data.sources import read_bytes, sample_stat, split_member
from fasteval.errors import FastevalError

FORMAT = 3  # bump when the file layout, the description or what the images hold changes (2: the checksum,
# 3: the files keyed by their bytes, not their modification times)
CHECKSUM = "crc32"  # of each CHUNK bytes of the data file; see ``checksums`` for why not a cryptographic hash
CHUNK = 16 * 2**20
READ_BYTES = 2**20  # an image file is hashed in reads of this size
HASH_THREADS = 8
FIT_FRACTION = 0.5  # the decoded set may take at most this share of the free (device or host) memory
DEVICE_RESERVE = 2 * 2**30  # bytes of GPU memory left for the model, its activations and the metrics
PLACEMENTS = ("device", "pinned", "host", "mapped", "redecode")


def available_host_memory() -> int | None:
    """Bytes of host memory available without swapping (/proc/meminfo's MemAvailable, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def free_device_memory(device: torch.device) -> int:
    """Bytes of free memory on a CUDA device, as the driver reports it."""
    return torch.cuda.mem_get_info(device)[0]


def choose_placement(nbytes: int, device: torch.device, cached: bool) -> tuple[str, str]:
    """Where ``nbytes`` of decoded images go, and why: ``device`` (CUDA, fits in free GPU memory with
    a margin), ``pinned`` (CUDA, fits in host memory), ``host`` (CPU, fits in host memory),
    ``mapped`` (read from the memory-mapped ``--cache`` file, which the OS pages in and out) or
    ``redecode`` (nothing holds it: decoded again per pass)."""
    size = f"{nbytes / 2**20:,.1f} MiB"
    host = available_host_memory()
    host_fits = host is not None and nbytes <= FIT_FRACTION * host
    host_text = f"{host / 2**30:.1f} GiB available host memory" if host is not None else "unknown host memory"
    if device.type == "cuda":
        free = free_device_memory(device)
        if nbytes <= FIT_FRACTION * max(0, free - DEVICE_RESERVE):
            return "device", f"{size} fit in the GPU's {free / 2**30:.1f} GiB free memory"
        if host_fits:
            return "pinned", f"{size} do not fit in the GPU's {free / 2**30:.1f} GiB free memory; {host_text}"
    elif host_fits:
        return "host", f"{size} fit in {host_text}"
    if cached:
        return "mapped", f"{size} do not fit in memory ({host_text}): read from the memory-mapped --cache file"
    return "redecode", f"{size} do not fit in memory ({host_text}): decoded again for every checkpoint"


def raw_loader(kind: str, samples: SampleList, spec: PreprocessSpec, *, batch_size: int, workers: int,
               device: torch.device, dali=None):
    """A loader of the fast path (``kind``, as ``make_loader`` picks it) in its raw mode: uint8 NCHW batches,
    resized and cropped, not normalised (on CUDA, the fused kernel's pixels: those its normalised batches
    are made of)."""
    if spec.runs_as_given:  # its own arithmetic makes float tensors: there are no uint8 pixels to keep
        raise FastevalError("a transform run as given (not Resize [+ CenterCrop] + to-float + Normalize) cannot "
                            "be decoded once into a store: evaluate each model with evaluate() instead")
    kind = resolve_loader(kind)
    if kind == "dali":
        from fasteval.data.loader_dali import DaliLoader

        return DaliLoader(samples, spec, batch_size, workers, device, raw=True, settings=dali)
    from fasteval.data.loader_torch import GpuDecodeLoader, TorchvisionLoader

    loader = GpuDecodeLoader if device.type == "cuda" else TorchvisionLoader
    return loader(samples, spec, batch_size, workers, device, raw=True)


def loader_name(kind: str, device: torch.device) -> str:
    """The decoder that makes the pixels (the pixels differ between DALI/PIL and nvJPEG, CPU and GPU)."""
    return f"{resolve_loader(kind)}-{'gpu' if device.type == 'cuda' else 'cpu'}"


def decoder_versions() -> dict[str, str | None]:
    """The versions of the packages whose code makes the pixels (part of the cache key)."""
    from fasteval.versions import package_version

    return {name: package_version(name) for name in ("pillow", "torchvision", "nvidia-dali-cuda130",
                                                     "nvidia-dali-cuda120")}


def _threaded(function, items: list) -> list:
    """``function`` over ``items`` in order, on up to ``HASH_THREADS`` threads (zlib and hashlib release
    the GIL while they hash a buffer, and reads release it too)."""
    from concurrent.futures import ThreadPoolExecutor

    from fasteval.procs import usable_cores

    threads = min(HASH_THREADS, usable_cores(), len(items))
    if threads <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, items))


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes whenever a file's bytes may have: size, modification and status-change times, inode
    (``os.utime`` can restore the first two; the status-change time it sets to now)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _file_digest(path: str) -> tuple[str, int, tuple]:
    """The SHA-256 of a file's bytes, their count, and the file's ``identity`` when it was opened."""
    h = hashlib.sha256()
    size = 0
    try:
        if split_member(path) is not None:  # a tar member: its bytes, and its shard's identity
            st, data = sample_stat(path), read_bytes(path)
            h.update(data)
            return h.hexdigest(), len(data), identity(st)
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            while chunk := f.read(READ_BYTES):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise FastevalError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return h.hexdigest(), size, identity(st)


def files_key(samples: SampleList) -> tuple[str, list[tuple]]:
    """A digest of the sample list with every file's bytes (SHA-256, read by threads), and each file's
    ``identity`` as it was read (``changed_files`` compares them after decoding).

    Content, not size and modification time: those survive an archive restore, ``rsync -t``, ``cp -p``
    or a regenerated set, and an entry keyed by them served the old pixels of rewritten files. SHA-256,
    not CRC-32 as for the data file: this key alone decides whether edited files are read again, and
    it makes that certain, where a CRC-32 would pass one edited file in 2**32 (and two same-size files
    of equal CRC swapped). Measured here (315 MiB of 110 KB files in the page cache, min of 5, one
    thread, 2 shared cores): reading 0.07 s, reading and CRC-32 0.14 s, SHA-256 0.34 s (the CPU's SHA
    extensions), BLAKE2b 0.96 s, MD5 0.73 s; threads share the files where cores are free."""
    digests = _threaded(_file_digest, samples.paths)
    h = hashlib.sha256()
    for (path, label), (digest, size, _) in zip(samples.samples, digests):
        h.update(f"{path}\0{label}\0{size}\0{digest}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest(), [found for _, _, found in digests]


def link_open_file(fd: int, path: str) -> None:
    """Give the open unnamed (O_TMPFILE) file ``fd`` the name ``path``: ``linkat`` of its /proc entry,
    following that link (a plain ``os.link`` would link the /proc entry itself: EXDEV)."""
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(str(fd), path, src_dir_fd=proc, follow_symlinks=True)
    finally:
        os.close(proc)


def reserve(fd: int, nbytes: int) -> None:
    """Give a new file ``nbytes`` of allocated space: ENOSPC now, not a SIGBUS when a map of it is
    written. Where the file system cannot allocate ahead (no ``posix_fallocate``), the file is only sized."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except AttributeError:
        os.ftruncate(fd, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.ftruncate(fd, nbytes)


def checksums(data: torch.Tensor) -> list[str]:
    """The CRC-32 (zlib's) of each ``CHUNK`` bytes of a contiguous uint8 tensor, as 8 hex digits each,
    computed by up to ``HASH_THREADS`` threads.

    They guard against accidental damage (a partial write, a tool or a disk changing the file): a
    change of up to 32 consecutive bits is always caught, any other with probability 1 - 2**-32 per
    chunk. Measured on this machine CRC-32 runs at about 3 GiB/s against 0.7 GiB/s for BLAKE2b and
    1.4 GiB/s for SHA-256, near the speed at which a hit pages the store in anyway; a cryptographic
    hash would add no protection, since whoever can rewrite the data can rewrite its description."""
    flat = data.reshape(-1).numpy()

    def crc(start: int) -> str:
        return f"{zlib.crc32(memoryview(flat[start:start + CHUNK])):08x}"

    return _threaded(crc, list(range(0, flat.shape[0], CHUNK)))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class DiskCache:
    """One entry of the ``--cache DIR`` store: ``decoded-<slot>.u8`` (the images, raw uint8 N x 3 x H x W)
    and ``decoded-<slot>.json`` (what they were made from). The slot names the dataset folder,
    spec and loader; the content key inside the JSON decides whether the entry may be used."""

    def __init__(self, folder: str, samples: SampleList, spec: PreprocessSpec, loader: str,
                 shape: tuple[int, int, int, int]) -> None:
        self.folder, self.shape, self.paths = folder, shape, samples.paths
        files, self.identities = files_key(samples)
        self.parts = {"format": FORMAT, "files": files, "spec": _digest(asdict(spec)),
                      "loader": loader, "decoders": _digest(decoder_versions()), "shape": list(shape)}
        self.key = _digest(self.parts)
        slot = _digest([os.path.abspath(samples.root), asdict(spec), loader])[:20]
        self.data = os.path.join(folder, f"decoded-{slot}.u8")
        self.meta = os.path.join(folder, f"decoded-{slot}.json")
        self.status = "miss"
        self.file, self.tmp, self.unnamed = None, None, False  # the file ``create`` makes

    @property
    def nbytes(self) -> int:
        """The data file's expected size: one byte per pixel and channel."""
        return int(np.prod(self.shape))

    def lookup(self) -> torch.Tensor | None:
        """The stored images, memory-mapped, when the entry is complete, its key matches and the data
        match their recorded checksums (computed here, before any sample is used); else None, with
        ``status`` saying why (``miss``, or ``stale: ...`` naming what changed)."""
        try:
            with open(self.meta) as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            self.status = "miss" if not os.path.exists(self.data) else "stale: its description is missing or damaged"
            return None
        if meta.get("key") != self.key:
            old = meta.get("parts") if isinstance(meta.get("parts"), dict) else {}
            changed = [name for name in self.parts if old.get(name) != self.parts[name]]
            changed = ["format"] if "format" in changed else changed  # another format's parts mean other things
            what = {"files": "the files (their contents) or the sample list", "spec": "the preprocessing",
                    "loader": "the loader", "decoders": "the decoders' versions", "shape": "the image size",
                    "format": "the cache format"}
            self.status = ("stale: " + ", ".join(what[c] for c in changed) + " changed" if changed
                           else "stale: its description's key does not match what it describes")
            return None
        try:
            size = os.path.getsize(self.data)
        except OSError as exc:
            self.status = ("stale: its data file is missing" if isinstance(exc, FileNotFoundError)
                           else f"stale: its data file cannot be read ({exc.strerror or exc})")
            return None
        if size != self.nbytes:
            self.status = f"stale: the data file holds {size} bytes, not {self.nbytes}"
            return None
        expected = meta.get("checksum")
        if not isinstance(expected, dict) or (expected.get("algorithm"), expected.get("chunk")) != (CHECKSUM, CHUNK):
            self.status = "stale: its description holds no checksum of the data"
            return None
        images = torch.from_file(self.data, shared=False, size=self.nbytes, dtype=torch.uint8)
        found = checksums(images)  # over the very mapping returned: the bytes checked are the bytes used
        recorded = expected.get("values")
        if found != recorded:
            recorded = recorded if isinstance(recorded, list) and len(recorded) == len(found) else None
            if recorded is None:
                self.status = "stale: its description's checksums do not cover the data"
                return None
            bad = next(i for i, value in enumerate(found) if recorded[i] != value)
            self.status = (f"stale: the data file's content changed (bytes {bad * CHUNK:,} to "
                           f"{min((bad + 1) * CHUNK, self.nbytes):,} fail their recorded CRC-32)")
            return None
        self.status = "hit"
        return images.view(self.shape)

    def create(self) -> np.memmap:
        """A writable memory map of a new file of the entry's size, its space reserved first (a map over
        space the disk does not have dies of SIGBUS when written: ``posix_fallocate`` refuses up front).
        The file has no name until ``commit`` where the file system allows (O_TMPFILE): a run killed, or
        refused its rename by a folder made read-only, leaves nothing behind; elsewhere it is a hidden
        temporary that the next run removes once its owner is dead. Fill it, then ``commit`` or ``discard``."""
        from fasteval.files import remove_stale_temps

        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise self._error(exc) from None
        remove_stale_temps(self.folder, ".decoded-")  # any entry's, left by a killed run
        self.tmp = os.path.join(self.folder, f".{os.path.basename(self.data)}.tmp-{os.getpid()}-{time.time_ns()}")
        try:
            self.file = self._open_new()
            reserve(self.file.fileno(), self.nbytes)
            return np.memmap(self.file, dtype=np.uint8, mode="r+", shape=self.shape)
        except OSError as exc:
            self.discard()
            raise self._error(exc) from None

    def _open_new(self):
        """An unnamed file in the cache folder (``self.unnamed``), else ``self.tmp``, open for writing."""
        self.unnamed = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")  # linked by its /proc entry
        if self.unnamed:
            try:
                return os.fdopen(os.open(self.folder, os.O_TMPFILE | os.O_RDWR, 0o666), "r+b", buffering=0)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS):
                    raise
                self.unnamed = False
        return os.fdopen(os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), "r+b", buffering=0)

    def discard(self) -> None:
        """Drop the file ``create`` made, and its name where it has one (a folder made read-only keeps
        that name: the next run removes it, its owner then being dead)."""
        if self.file is not None:
            self.file.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)

    def changed_files(self) -> list[str]:
        """The files whose ``identity`` differs from the one they had when they were hashed."""
        changed = []
        for path, recorded in zip(self.paths, self.identities):
            try:
                now = identity(sample_stat(path))
            except OSError:
                now = None
            if now != recorded:
                changed.append(path)
        return changed

    def _error(self, exc: OSError, path: str | None = None) -> FastevalError:
        """One line naming ``--cache`` for a failure to write in the cache folder (``path``, where named)."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                st = os.statvfs(self.folder)
                free = f", {st.f_bavail * st.f_frsize / 2**20:,.1f} MiB free"
            except OSError:
                free = ""
            return FastevalError(f"--cache {self.folder}: {(exc.strerror or 'no space left').lower()} for the decoded images "
                                 f"({self.nbytes / 2**20:,.1f} MiB{free}); free some or choose another folder")
        return FastevalError(f"--cache {self.folder}: cannot write {path or 'in this folder'}: {exc.strerror or exc}")

    def commit(self, array: np.memmap) -> None:
        """Flush the images to disk, checksum them as written (the file's own pages), then name them and
        rename them and their description into place: the old description goes first, so a crash in
        between leaves an entry that reads as stale; a description beside other data fails their checksum."""
        from fasteval.files import atomic_write

        try:
            array.flush()
            crcs = checksums(torch.from_numpy(array))
            os.fsync(self.file.fileno())
            if self.unnamed:
                link_open_file(self.file.fileno(), self.tmp)
            if os.path.exists(self.meta):
                os.unlink(self.meta)
            os.replace(self.tmp, self.data)
        except OSError as exc:
            raise self._error(exc, self.data) from None
        self.file.close()
        with atomic_write(self.meta, option="--cache") as f:
            json.dump({"key": self.key, "parts": self.parts, "created": time.time(),
                       "checksum": {"algorithm": CHECKSUM, "chunk": CHUNK, "values": crcs}}, f)


def check_cache_dir(path: str) -> None:
    """Refuse a ``--cache`` path that is a file or cannot be written, before any work; the temporary
    files of dead runs are removed first (one killed while writing may have filled the disk)."""
    from fasteval.files import check_output_folder, remove_stale_temps

    if os.path.isdir(path):
        remove_stale_temps(path, ".decoded-")
    check_output_folder(path, "--cache", overwrite=True)


class DecodedStore:
    """The decoded images of a sample list in one place (see ``choose_placement``), yielded as the
    fast path's batches: a slice, on the device, padded to the static batch size, normalised."""

    def __init__(self, images: torch.Tensor, labels: list[int], spec: PreprocessSpec, *, batch_size: int,
                 device: torch.device, half: bool, placement: str, info: dict) -> None:
        from fasteval.data.loader_torch import Normalizer

        self.images, self.batch_size, self.device, self.placement = images, batch_size, device, placement
        self.labels = torch.tensor(labels, dtype=torch.int64, device=device)
        self.normalize = Normalizer(spec, device, half)
        self.info = info
        self.name = f"decoded store ({info['loader']}, {placement})"

    def __len__(self) -> int:
        return self.images.shape[0]

    def __iter__(self) -> Iterator[Batch]:
        from fasteval.data.loader_torch import _pad

        n, b = len(self), self.batch_size
        non_blocking = self.placement == "pinned"
        for start in range(0, n, b):
            images = self.images[start:start + b].to(self.device, non_blocking=non_blocking)
            real = images.shape[0]
            images, labels = _pad(images, self.labels[start:start + b], b)
            yield Batch(self.normalize(images), labels, real)


def decode_into(loader, out: torch.Tensor) -> None:
    """Every batch of a raw loader into ``out`` (N x 3 x H x W uint8), in sample order."""
    seen = 0
    for images, _, real in loader:
        out[seen:seen + real].copy_(images[:real], non_blocking=out.device.type == "cuda")
        seen += real
    if seen != out.shape[0]:
        raise FastevalError(f"the loader yielded {seen} images, not {out.shape[0]}")


class DecodedSource:
    """A batch source for ``FastEvaluator`` (the signature of ``make_loader``): builds the decoded
    store of the samples it is given (from the ``--cache`` entry when it is valid), or, when nothing
    can hold it and there is no cache, the plain loader. ``info`` says what it did (for reports)."""

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir
        self.info: dict = {}

    def __call__(self, kind: str, samples: SampleList, spec: PreprocessSpec, *, batch_size: int, workers: int,
                 device: torch.device, half: bool = False, placement: tuple[str, str] | None = None, dali=None):
        """``placement``: the plan's (where, why: fasteval/evaluation/plan.py); chosen here from the memory
        free now where no plan gave one."""
        start = time.perf_counter()
        h, w = spec.output_hw(*image_size(samples.paths[0]))
        shape = (len(samples), 3, h, w)
        nbytes = int(np.prod(shape))
        name = loader_name(kind, device)
        cache = DiskCache(self.cache_dir, samples, spec, name, shape) if self.cache_dir else None
        placement, reason = placement or choose_placement(nbytes, device, cached=cache is not None)
        self.info = {"placement": placement, "reason": reason, "bytes": nbytes, "loader": name,
                     "cache": "off" if cache is None else None, "decoded": False}
        if placement == "redecode":
            self.info["seconds"] = time.perf_counter() - start
            return make_loader(kind, samples, spec, batch_size=batch_size, workers=workers, device=device, half=half,
                               dali=dali)
        images = cache.lookup() if cache is not None else None
        if cache is not None:
            self.info.update(cache=cache.status, cache_file=cache.data)
        if cache is not None and cache.status.startswith("stale"):
            print(f"fasteval: --cache entry {cache.data} is {cache.status}; rebuilding it", file=sys.stderr)
        if images is None:
            images = self._decode(kind, samples, spec, batch_size, workers, device, placement, cache, shape, dali)
        elif placement in ("device", "pinned"):
            images = self._place(images, device, placement)
        self.info["seconds"] = time.perf_counter() - start
        return DecodedStore(images, samples.labels, spec, batch_size=batch_size, device=device, half=half,
                            placement=placement, info=self.info)

    def _decode(self, kind, samples, spec, batch_size, workers, device, placement, cache, shape,
                dali=None) -> torch.Tensor:
        loader = raw_loader(kind, samples, spec, batch_size=batch_size, workers=workers, device=device, dali=dali)
        self.info["decoded"] = True
        if cache is None:
            if placement == "device":
                out = torch.empty(shape, dtype=torch.uint8, device=device)
            else:
                out = torch.empty(shape, dtype=torch.uint8, pin_memory=placement == "pinned")
            with torch.inference_mode():
                decode_into(loader, out)
            return out
        array = cache.create()
        out = torch.from_numpy(array)
        try:
            with torch.inference_mode():
                decode_into(loader, out)
            changed = cache.changed_files()
            if not changed:
                cache.commit(array)
        except BaseException:
            cache.discard()
            raise
        if changed:  # decoded from bytes other than the ones hashed: the entry's key would not describe them
            cache.discard()
            self.info["cache"] = f"not written: {len(changed)} file(s) changed while they were decoded"
            print(f"fasteval: --cache entry {cache.data} not written: {len(changed)} file(s) changed while they "
                  f"were decoded ({changed[0]}{', ...' if len(changed) > 1 else ''})", file=sys.stderr)
        else:
            self.info["cache"] = "written" if cache.status == "miss" else f"{cache.status}: rebuilt"
        return self._place(out, device, placement) if placement in ("device", "pinned") else out

    @staticmethod
    def _place(images: torch.Tensor, device: torch.device, placement: str) -> torch.Tensor:
        if placement == "device":
            return images.to(device)
        return images.pin_memory()
