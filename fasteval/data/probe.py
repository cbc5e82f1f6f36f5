"""What each image file is, read from its content (magic bytes and header), never from its name.

Two questions are answered per file, both without decoding the pixels:

- can the reference read it at all? PIL's ``Image.open`` (the reference's own first step, with
  its decompression-bomb limit) plus the checks a header cannot skip: a broken link, an empty
  file, a FIFO. ``check_headers`` refuses a dataset with such files before any work.
- does DALI decode it to exactly PIL's pixels? Only kinds verified bit-identical qualify
  (8-bit JPEG, PNG, BMP, WebP, TIFF and PNM variants, single frame, complete); everything
  else (16-bit or float samples, PNM with maxval != 255, palette TIFF, GIF/ICO/AVIF/... under
  an image extension, multi-frame files, a JPEG without its end marker) goes to PIL.

Results are cached per file (path, size, mtime, inode), so the CLI's check and the fast
path's routing read each header once. A long list is probed by worker processes, in order
(``probe_all``): PIL's header parsing is Python, so threads would share one core.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
import warnings
from dataclasses import dataclass

from fasteval.errors import FastevalError, first_line, printable
from fasteval.procs import pool_map, usable_cores
from fasteval.data.samples import SampleList
from fasteval.data.sources import open_sample, sample_size, sample_stat, split_member

HEAD_BYTES = 64  # enough for every signature and PNG's IHDR
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC
JPEG_END = b"\xff\xd9"
APPLEDOUBLE = b"\x00\x05\x16\x07"
SIGNATURES = ((PNG_SIGNATURE, "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
              (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}  # the DIB header versions
# JPEG frame markers DALI decodes as PIL does: baseline, extended and progressive Huffman.
JPEG_SAFE_FRAMES = {0xC0, 0xC1, 0xC2}
JPEG_NON_FRAME = {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC share the SOFn range
TIFF_SAFE_COMPRESSION = {"raw", "tiff_lzw", "tiff_adobe_deflate", "packbits", "jpeg"}
TIFF_SAFE_PHOTOMETRIC = {1, 2}  # min-is-black, RGB (CMYK: identical pixels, but libtiff logs an error first)
BMP_SAFE_BITS = {1, 8, 24, 32}


@dataclass(frozen=True)
class FileProbe:
    """What a file's header says. ``error`` is set when the reference cannot open it."""

    path: str
    error: str | None = None
    format: str | None = None  # PIL's format name, identified from the content
    size: tuple[int, int] | None = None  # (width, height)
    dali_safe: bool = False  # DALI's decoder gives PIL's pixels bit for bit
    complete: bool = True  # holds what its header announces (JPEG, PNG, BMP, binary PNM)


_cache: dict[str, tuple[tuple, FileProbe]] = {}

# From this many files not yet probed, ``probe_all`` probes in worker processes (``PARALLEL_CHUNK`` files a task):
# a process costs tens of milliseconds to start, a file 55-80 us to probe here (2-core Xeon, 2026-12-06).
PARALLEL_FILES = 2048
PARALLEL_CHUNK = 512


def probe(path: str) -> FileProbe:
    """The probe of one file (cached while the file is unchanged)."""
    key, result = _keyed_probe(path)
    if key is not None:
        _cache[path] = (key, result)
    return result


def _keyed_probe(path: str) -> tuple[tuple | None, FileProbe]:
    """(the file's cache key, its probe): the cached probe where the file is unchanged; key None where the
    file cannot be stat'ed (nothing to cache)."""
    try:
        st = sample_stat(path)  # a tar member's: its shard's
    except OSError as exc:
        return None, FileProbe(path, error=_stat_error(path, exc))
    key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    cached = _cache.get(path)
    if cached is not None and cached[0] == key:
        return key, cached[1]
    return key, _probe(path, st)


def _keyed_probes(paths: list[str]) -> list[tuple]:
    """A worker's task: ``_keyed_probe`` of each path, in order, as (key, the probe's fields but its path): plain
    tuples cost the pipe a third of what the dataclasses cost."""
    return [(key, r.error, r.format, r.size, r.dali_safe, r.complete) for key, r in map(_keyed_probe, paths)]


def probe_all(paths: list[str], workers: int | None = None) -> list[FileProbe]:
    """Probes of many files, in order. From ``PARALLEL_FILES`` files not in the cache, in ``workers`` processes
    (default: the usable cores), the results cached here as ``probe`` caches them: the same probes, the same
    messages, as one process gives."""
    missing = [p for p in dict.fromkeys(paths) if p not in _cache]
    workers = min(workers or usable_cores(), -(-len(missing) // PARALLEL_CHUNK))
    if len(missing) < PARALLEL_FILES or workers < 2:
        return [probe(p) for p in paths]
    chunks = [missing[i:i + PARALLEL_CHUNK] for i in range(0, len(missing), PARALLEL_CHUNK)]
    fresh = {}
    done = (r for chunk in pool_map(_keyed_probes, chunks, workers) for r in chunk)
    for path, (key, error, fmt, size, safe, complete) in zip(missing, done):
        fresh[path] = result = FileProbe(path, error, fmt, size, safe, complete)
        if key is not None:
            _cache[path] = (key, result)
    return [fresh[p] if p in fresh else probe(p) for p in paths]


def _stat_error(path: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return f"symbolic link loop (it leads back to itself through {os.readlink(path)})"
    if os.path.islink(path) and not os.path.exists(path):
        return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    return f"cannot read it: {exc.strerror or exc}"


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _probe(path: str, st: os.stat_result) -> FileProbe:
    if not stat.S_ISREG(st.st_mode):
        return FileProbe(path, error=f"not a regular file ({_kind_of(st.st_mode)})")
    try:
        size = st.st_size if split_member(path) is None else sample_size(path)
        if size == 0:
            return FileProbe(path, error="empty file (0 bytes)")
        with open_sample(path) as f:
            head = f.read(HEAD_BYTES)
            return _probe_open(path, f, head, size)
    except OSError as exc:
        return FileProbe(path, error=f"cannot read it: {exc.strerror or exc}")


def _probe_open(path: str, f, head: bytes, size: int) -> FileProbe:
    """PIL's verdict on an open file, then whether DALI would decode it identically."""
    from PIL import Image, UnidentifiedImageError

    f.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb warnings: the reference warns when it decodes
            image = Image.open(f)
            safe = _dali_safe(image, head, f)
            complete = _complete(image, head, f, size)
            fmt, dims = image.format, image.size
    except UnidentifiedImageError:
        return FileProbe(path, error=describe_content(head))
    except Exception as exc:  # the reference fails on these at Image.open too: its own reason
        return FileProbe(path, error=first_line(exc))
    return FileProbe(path, format=fmt, size=dims, dali_safe=safe and complete, complete=complete,)


def _signature(head: bytes) -> str | None:
    """The image format whose signature ``head`` starts with, if any."""
    for signature, name in SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack("<I", head[14:18])[0] in BMP_HEADER_SIZES:
        return "BMP"
    return None


def describe_content(head: bytes) -> str:
    """What a file that PIL cannot open is, from its first bytes."""
    if head.startswith(APPLEDOUBLE):
        return "not an image: a macOS AppleDouble metadata file (a '._' companion file)"
    name = _signature(head)
    if name is not None:
        return f"a damaged {name} file (its header cannot be read)"
    text = head.decode("utf-8", "ignore")
    if text and b"\x00" not in head and all(c.isprintable() or c in "\t\r\n" for c in text):
        if text.lstrip()[:1] == "<" and "html" in text.lower():
            return "not an image: an HTML page (a failed download?)"
        return f"not an image: a text file starting {text[:24]!r}"
    return f"no image format PIL can read (first bytes {head[:8].hex(' ')})"


def _dali_safe(image, head: bytes, f) -> bool:
    """True for the kinds whose DALI decode was verified bit-identical to PIL's ``convert('RGB')``.
    Anything this cannot establish (an odd header, say) is not safe: PIL decodes it."""
    from PIL import Image

    width, height = image.size
    if width * height > (Image.MAX_IMAGE_PIXELS or float("inf")):
        return False  # PIL warns (or refuses): one decision, taken by PIL on every path
    check = _SAFE_BY_FORMAT.get(image.format)
    try:
        return bool(check and getattr(image, "n_frames", 1) == 1 and check(image, head, f))
    except Exception:
        return False


def _jpeg_safe(image, head: bytes, f) -> bool:
    frame = jpeg_frame(f)
    if frame is None:
        return False
    marker, precision, components = frame
    ycck = components == 4 and image.info.get("adobe_transform") == 2
    return marker in JPEG_SAFE_FRAMES and precision == 8 and components in (1, 3, 4) and not ycck


def jpeg_frame(f) -> tuple[int, int, int] | None:
    """(SOF marker, sample precision, components) of a JPEG whose segments, from its start to its first
    scan, follow one another with nothing between them; None for any other. libjpeg (PIL) skips stray
    bytes between segments with a warning and decodes the image; DALI's parser refuses the file
    ("Invalid marker") or crashes, so such a file is PIL's to decode."""
    f.seek(2)
    frame = None
    while True:
        if f.read(1) != b"\xff":  # stray bytes where a marker must start
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker or marker[0] == 0xD9:  # the end before any scan
            return None
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # standalone markers
            continue
        length = f.read(2)
        if len(length) < 2:
            return None
        if code == 0xDA:  # the first scan: the header is complete
            return frame
        size = struct.unpack(">H", length)[0]
        if 0xC0 <= code <= 0xCF and code not in JPEG_NON_FRAME:
            header = f.read(6)
            if frame is not None or size < 8 or len(header) < 6:  # a second frame (hierarchical) or a short one
                return None
            frame = (code, header[0], header[5])
            f.seek(size - 8, os.SEEK_CUR)
        elif size < 2:
            return None
        else:
            f.seek(size - 2, os.SEEK_CUR)


def _png_safe(image, head: bytes, f) -> bool:
    bit_depth = head[24] if len(head) > 24 and head.startswith(PNG_SIGNATURE) else None
    return bit_depth is not None and bit_depth <= 8  # 16-bit: PIL keeps the high byte, DALI rounds


def _bmp_safe(image, head: bytes, f) -> bool:
    if len(head) < 34 or struct.unpack("<I", head[14:18])[0] < 40:  # OS/2 headers: not verified
        return False
    height, _, bits, compression = struct.unpack("<iHHI", head[22:34])
    return bits in BMP_SAFE_BITS and compression == 0 and height > 0  # bottom-up, uncompressed


def _tiff_safe(image, head: bytes, f) -> bool:
    tags = image.tag_v2
    bits = tags.get(258) or ()
    return (image.mode in ("L", "RGB", "RGBA")
            and image.info.get("compression") in TIFF_SAFE_COMPRESSION
            and tags.get(262) in TIFF_SAFE_PHOTOMETRIC
            and tags.get(284, 1) == 1  # interleaved samples
            and all(b == 8 for b in bits) and bool(bits)
            and all(s == 1 for s in (tags.get(339) or (1,)))  # unsigned integer samples
            and (image.mode != "RGBA" or tuple(tags.get(338) or ()) == (2,)))  # unassociated alpha


def _pnm_safe(image, head: bytes, f) -> bool:
    codec, args = image.tile[0][0], image.tile[0][3]
    if codec == "raw":  # maxval 255 (or a bitmap)
        return image.mode in ("1", "L", "RGB")
    return codec == "ppm_plain" and image.mode in ("L", "RGB") and args[1] == 255


def _webp_safe(image, head: bytes, f) -> bool:
    return True  # lossy, lossless and alpha verified; animated files were refused above


_SAFE_BY_FORMAT = {"JPEG": _jpeg_safe, "PNG": _png_safe, "BMP": _bmp_safe, "TIFF": _tiff_safe,
                   "PPM": _pnm_safe, "WEBP": _webp_safe}


def _complete(image, head: bytes, f, size: int) -> bool:
    """Whether the file holds what its header announces: JPEG and PNG end with a marker, a BMP
    declares its size, a binary PNM's pixels have a fixed size. A truncated file is decoded
    differently by DALI and PIL (or refused by one only), so it goes to PIL."""
    fmt = image.format
    if fmt in ("JPEG", "PNG"):
        end = JPEG_END if fmt == "JPEG" else PNG_END
        if size < len(end):
            return False
        f.seek(size - len(end))
        return f.read(len(end)) == end
    if fmt == "BMP" and len(head) >= 6:
        return struct.unpack("<I", head[2:6])[0] <= size
    if fmt == "PPM" and image.tile and image.tile[0][0] == "raw":
        width, height = image.size
        row = {"1": (width + 7) // 8, "L": width, "RGB": 3 * width}.get(image.mode)
        return row is None or image.tile[0][2] + row * height <= size
    return True


def full_decode_error(path: str) -> str | None:
    """Why the reference's decode (``Image.open(f).convert('RGB')``) fails on ``path``, or None."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_sample(path) as f:
                Image.open(f).convert("RGB")
    except Exception as exc:
        return first_line(exc)
    return None


def bad_files(probes: list[FileProbe]) -> list[tuple[str, str]]:
    """(path, reason) of every file the reference cannot decode: header failures, and a full
    decode of the few files that do not hold what their header announces (truncated downloads)."""
    bad = []
    for p in probes:
        reason = p.error
        if reason is None and not p.complete:
            reason = full_decode_error(p.path)
        if reason is not None:
            bad.append((p.path, reason))
    return bad


def check_headers(samples: SampleList) -> list[FileProbe]:
    """Refuse, before any work, a dataset with a file the reference cannot decode; the probes otherwise.

    The message names the first such file (in sample order) and counts the others.
    """
    probes = probe_all(samples.paths)
    bad = bad_files(probes)
    if bad:
        path, reason = bad[0]
        more = ""
        if len(bad) > 1:
            more = f" ({len(bad) - 1} more files cannot be decoded either, e.g. {printable(bad[1][0])})"
        raise FastevalError(f"cannot decode image {printable(path)}: {reason}{more}")
    _note_large(probes)
    return probes


_NOTED_LARGE: set[str] = set()  # files already named by _note_large in this process


def _note_large(probes: list[FileProbe]) -> None:
    """One line, once a process, for files above PIL's decompression-bomb warning size: PIL decodes them (the
    reference too) and its own warning is hidden (fasteval.data.preprocess), but they cost time and memory."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    large = [p for p in probes if limit and p.size and p.size[0] * p.size[1] > limit and p.path not in _NOTED_LARGE]
    if not large:
        return
    _NOTED_LARGE.update(p.path for p in large)
    (width, height), path = large[0].size, printable(large[0].path)
    print(f"fasteval: note: {len(large)} image(s) above PIL's decompression-bomb warning size of {limit:,} pixels, "
          f"e.g. {path} ({width}x{height}): decoded as the reference decodes them", file=sys.stderr)


def find_undecodable(paths: list[str]) -> tuple[str | None, str]:
    """The first file the reference cannot decode (to name it when a batched decoder fails), or
    (None, ""): header problems first (cheap), then PIL's full decode, as the reference does it."""
    for path in paths:
        reason = probe(path).error or full_decode_error(path)
        if reason is not None:
            return path, reason
    return None, ""
