"""A sample's bytes, wherever they are stored: the one place every reader opens a sample.

A sample is addressed by one string, its path. A file on disk (an ImageFolder tree, a CSV list) is its
own path; a member of a tar shard (WebDataset) is the virtual path ``SHARD::MEMBER``, the shard's path
and the member's name in the archive. The members' offsets are recorded once per shard (a scan of its
headers with the standard library's ``tarfile``) and kept per process while the shard is unchanged; a
process that has not seen the shard (a spawned worker) scans it again on its first read. Every reader
(the reference's PIL decode, the header probe, the GPU decoder's bytes, the decoded store's digests)
goes through ``open_sample``, ``read_bytes`` or ``sample_stat``, never ``open(path)``.

Torch-free: imported before torch is (fasteval/data/prefetch.py).
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
from typing import BinaryIO, NamedTuple

SEPARATOR = "::"


class Member(NamedTuple):
    """Where a member's bytes lie in its shard."""

    offset: int
    size: int


_shards: dict[str, tuple[tuple, dict[str, Member]]] = {}  # shard path -> (its stat key, members by name)
_lock = threading.Lock()


def member_path(shard: str, member: str) -> str:
    """The virtual path of ``member`` in ``shard``."""
    return f"{shard}{SEPARATOR}{member}"


def split_member(path: str) -> tuple[str, str] | None:
    """(shard, member) of a virtual path, or None for a path on disk. A path is virtual where the part
    before its first ``::`` is a ``.tar`` file and the whole path is not itself a file."""
    shard, sep, member = path.partition(SEPARATOR)
    if not sep or not member or not shard.lower().endswith(".tar") or os.path.lexists(path):
        return None
    return shard, member


def _stat_key(st: os.stat_result) -> tuple:
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def shard_members(shard: str, st: os.stat_result | None = None) -> dict[str, Member]:
    """The regular members of ``shard`` by name, in tar order (dicts keep it), scanned once while the
    shard is unchanged. Raises ``tarfile.TarError`` or ``OSError`` for a shard that cannot be read, holds
    a member twice or ends inside a member."""
    st = st or os.stat(shard)
    key = _stat_key(st)
    with _lock:
        cached = _shards.get(shard)
    if cached is not None and cached[0] == key:
        return cached[1]
    members: dict[str, Member] = {}
    last = None
    with tarfile.open(shard, "r:") as archive:
        for info in archive:
            last = info.name
            if not info.isfile():
                continue
            if info.name in members:
                raise tarfile.TarError(f"member {info.name} appears twice")
            if info.offset_data + info.size > st.st_size:
                raise tarfile.TarError(f"member {info.name} is cut short")
            members[info.name] = Member(info.offset_data, info.size)
        _check_end(archive, last)
    with _lock:
        _shards[shard] = (key, members)
    return members


def _check_end(archive: tarfile.TarFile, last: str | None) -> None:
    """``tarfile`` ends an archive silently at a header it cannot read (past the first), or at the end of the
    file: a shard cut inside a header or between members, or with a damaged header, would lose its later
    members unseen. Where the members stop, a shard holds tar's end-of-archive zero block (every tar writer,
    ``tarfile`` and so ``webdataset`` included, writes it)."""
    archive.fileobj.seek(archive.offset)
    block = archive.fileobj.read(tarfile.BLOCKSIZE)
    if block != tarfile.NUL * tarfile.BLOCKSIZE:
        where = f"after member {last}" if last else "at its start"
        what = "ends" if not block else "has a header cut short or damaged"
        raise tarfile.TarError(f"it {what} {where}, without tar's end-of-archive block (cut short?)")


def read_bytes(path: str) -> bytes:
    """The bytes of a sample (a file, or a tar member). Raises OSError where they cannot be read, a
    member cut short included."""
    found = split_member(path)
    if found is None:
        with open(path, "rb") as f:
            return f.read()
    shard, name = found
    try:
        member = shard_members(shard)[name]
    except KeyError:
        raise FileNotFoundError(f"no member {name} in {shard}") from None
    except tarfile.TarError as exc:
        raise OSError(f"damaged tar file {shard}: {exc}") from None
    with open(shard, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise OSError(f"member {name} is cut short ({len(data)} of {member.size} bytes)")
    return data


def open_sample(path: str) -> BinaryIO:
    """A binary file object over a sample's bytes: the file itself, or a tar member's bytes in memory."""
    if split_member(path) is None:
        return open(path, "rb")
    return io.BytesIO(read_bytes(path))


def sample_stat(path: str) -> os.stat_result:
    """``os.stat`` of the file that holds the sample: the file itself, or its shard (which changes whenever
    one of its members does)."""
    found = split_member(path)
    return os.stat(path if found is None else found[0])


def sample_size(path: str) -> int:
    """A sample's size in bytes (a member's own size, not its shard's)."""
    found = split_member(path)
    if found is None:
        return os.stat(path).st_size
    try:
        return shard_members(found[0])[found[1]].size
    except (KeyError, tarfile.TarError) as exc:
        raise OSError(f"cannot read {path}: {exc}") from None
