"""Bring DALI to a device machine that cannot fetch it: its wheels in parts small enough for one call each.

A device call carries at most 64 MiB (the working tree included), and DALI's wheel is about 199 MB. Here:

    python benchmarks/dali_wheel.py download /tmp/daliwheel      # DALI and the wheels it needs there (cp312)
    python benchmarks/dali_wheel.py split /tmp/daliwheel/*.whl .dali_parts

``split`` writes the wheels, back to back, as parts of at most ``--part-mib`` (default 58) MiB and a manifest
with the sha256 of every part and of every wheel. Each device call, back to back on one warm machine, carries the
manifest and one part (ignored files stay there between calls); the last one installs and runs:

    python3 benchmarks/dali_wheel.py check .dali_parts           # which parts are there, each one's hash checked
    python3 benchmarks/dali_wheel.py join .dali_parts TARGET     # all parts checked, the wheels rebuilt and checked,
                                                                 # then pip install --no-deps --target TARGET

``join --print-only`` rebuilds and checks the wheels and prints the pip command instead of running it.
docs/gpu.md gives the sequence of calls; benchmarks/gpu_check.sh joins the parts itself where it finds them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

MANIFEST = "manifest.json"
CHUNK = 8 << 20
# What DALI needs on the device machines beyond what their image holds (numpy, packaging, six are there): the
# modules ``import nvidia.dali`` and its PyTorch plugin load, and nvImageCodec with nvJPEG, which DALI's decoders
# load from beside its own folder; nvJPEG2000 and nvTIFF (7 MB) because nvImageCodec prints an [ERROR] line for
# each library it misses, on every run. libcst, makefun and nvtx serve DALI's experimental dynamic mode only, and
# nvCOMP (28 MB) compressed TIFFs only: left out.
DALI = "nvidia-dali-cuda130"
NEEDED = [DALI, "nvidia-nvimgcodec-cu13", "nvidia-nvjpeg", "nvidia-nvjpeg2k-cu13", "nvidia-nvtiff-cu13", "optree",
          "astunparse", "gast"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


class Refused(Exception):
    """A one-line error for the user (exit 2)."""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def pinned(names: list[str]) -> list[str]:
    """Each name pinned to the version installed here (the one tested here), or left open where it is not."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def download(folder: str, python_version: str, dry: bool) -> list[str]:
    """``pip download`` of DALI and the wheels it needs on the device machines, for their Python and platform."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
           "-d", folder, *pinned(NEEDED)]
    if not dry:
        subprocess.run(cmd, check=True)
    return cmd


def split(wheels: list[str], folder: str, part_bytes: int) -> dict:
    """The wheels, back to back, as parts of at most ``part_bytes`` under ``folder`` (new or empty), and the
    manifest: each wheel's name, size and sha256; each part's name, size and sha256; the stream's sha256."""
    for w in wheels:
        if not os.path.isfile(w):
            raise Refused(f"WHEEL {w}: no such file")
    if len({os.path.basename(w) for w in wheels}) != len(wheels):
        raise Refused("WHEEL: two wheels of the same name")
    if part_bytes < 1:
        raise Refused("--part-mib must be positive")
    if os.path.isdir(folder) and os.listdir(folder):
        raise Refused(f"DIR {folder} is not empty; give a new or empty folder")
    os.makedirs(folder, exist_ok=True)
    total = sum(os.path.getsize(w) for w in wheels)
    count = max(1, -(-total // part_bytes))
    names = [f"part-{i + 1:0{len(str(count))}d}" for i in range(count)]
    stream, parts = hashlib.sha256(), []
    part, part_hash, written = None, None, 0

    def close():
        part.close()
        parts.append({"name": names[len(parts)], "size": written, "sha256": part_hash.hexdigest()})

    for w in wheels:
        with open(w, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                stream.update(block)
                while block:
                    if part is None or written == part_bytes:
                        if part is not None:
                            close()
                        part = open(os.path.join(folder, names[len(parts)]), "wb")
                        part_hash, written = hashlib.sha256(), 0
                    piece, block = block[:part_bytes - written], block[part_bytes - written:]
                    part.write(piece)
                    part_hash.update(piece)
                    written += len(piece)
    if part is not None:
        close()
    files = [{"name": os.path.basename(w), "size": os.path.getsize(w), "sha256": sha256(w)} for w in wheels]
    manifest = {"files": files, "parts": parts, "part_bytes": part_bytes, "total_bytes": total,
                "stream_sha256": stream.hexdigest()}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as exc:
        raise Refused(f"DIR {folder}: cannot read {MANIFEST}: {exc.strerror or exc}") from None
    except ValueError:
        raise Refused(f"{path}: not a manifest (not JSON)") from None


def check(folder: str) -> tuple[list[str], list[str], list[str]]:
    """The parts that are here and whole, those missing, and those whose size or sha256 differ."""
    ok, missing, bad = [], [], []
    for p in read_manifest(folder)["parts"]:
        path = os.path.join(folder, p["name"])
        if not os.path.isfile(path):
            missing.append(p["name"])
        elif os.path.getsize(path) != p["size"] or sha256(path) != p["sha256"]:
            bad.append(p["name"])
        else:
            ok.append(p["name"])
    return ok, missing, bad


def rebuild(folder: str, out: str) -> list[str]:
    """The wheels from the parts, into ``out``, each one's size and sha256 checked; their paths."""
    manifest = read_manifest(folder)
    _, missing, bad = check(folder)
    if missing or bad:
        raise Refused(f"DIR {folder}: " + "; ".join(
            ([f"missing {', '.join(missing)} (carried in an earlier call to a machine since given back?)"]
             if missing else []) + ([f"damaged {', '.join(bad)} (size or sha256 differ)"] if bad else [])))
    stream = hashlib.sha256()
    parts = iter(manifest["parts"])
    current, left = None, 0
    paths = []
    try:
        for entry in manifest["files"]:
            path = os.path.join(out, entry["name"])
            need = entry["size"]
            with open(path, "wb") as f:
                while need:
                    if left == 0:
                        if current is not None:
                            current.close()
                        p = next(parts)
                        current, left = open(os.path.join(folder, p["name"]), "rb"), p["size"]
                    block = current.read(min(need, left, CHUNK))
                    f.write(block)
                    stream.update(block)
                    need -= len(block)
                    left -= len(block)
            if sha256(path) != entry["sha256"]:
                raise Refused(f"{entry['name']}: rebuilt, its sha256 differs from the manifest's")
            paths.append(path)
    finally:
        if current is not None:
            current.close()
    if stream.hexdigest() != manifest["stream_sha256"]:
        raise Refused(f"DIR {folder}: the parts together differ from the manifest's stream sha256")
    return paths


def install_command(wheels: list[str], target: str, python_version: str | None = None) -> list[str]:
    """pip's install of ``wheels`` into ``target``, for this interpreter or for ``python_version``'s."""
    other = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:",
             *[a for p in PLATFORMS for a in ("--platform", p)]] if python_version else []
    return [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
            "--no-cache-dir", "--upgrade", *other, "--target", target, *wheels]


def join(folder: str, target: str, print_only: bool, python_version: str | None = None) -> list[str]:
    """Check the parts, rebuild and check the wheels, install them into ``target`` (or print the command)."""
    work = tempfile.mkdtemp(prefix="dali_wheels_")
    try:
        wheels = rebuild(folder, work)
        cmd = install_command(wheels, target, python_version)
        if print_only:
            print(" ".join(cmd))
            return cmd
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise Refused(f"pip install --target {target} failed: {(run.stderr or run.stdout).strip()[-300:]}")
        print(f"installed {', '.join(os.path.basename(w) for w in wheels)} into {target}; "
              f"PYTHONPATH={target} makes them importable")
        return cmd
    finally:
        if not print_only:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="pip download DALI and the wheels it needs there into DIR")
    d.add_argument("dir")
    d.add_argument("--python-version", default="3.12", help="the device machines' Python (default 3.12)")
    d.add_argument("--print-only", action="store_true", help="print the pip command")
    s = sub.add_parser("split", help="WHEEL... into parts and a manifest under DIR (new or empty)")
    s.add_argument("wheels", nargs="+", metavar="WHEEL")
    s.add_argument("dir")
    s.add_argument("--part-mib", type=float, default=58.0,
                   help="the largest part in MiB (default 58: a part and a working tree under 6 MiB fit a 64 MiB call)")
    c = sub.add_parser("check", help="which parts under DIR are here and whole")
    c.add_argument("dir")
    j = sub.add_parser("join", help="rebuild the wheels from DIR's parts, check them, pip install --target TARGET")
    j.add_argument("dir")
    j.add_argument("target")
    j.add_argument("--print-only", action="store_true", help="print the pip command instead of running it")
    j.add_argument("--python-version", help="install for this Python (default: the one running this)")
    a = p.parse_args(argv)
    try:
        if a.command == "download":
            cmd = download(a.dir, a.python_version, a.print_only)
            if a.print_only:
                print(" ".join(cmd))
        elif a.command == "split":
            m = split(a.wheels, a.dir, int(a.part_mib * (1 << 20)))
            print(f"{len(m['files'])} wheel(s), {m['total_bytes'] / (1 << 20):.1f} MiB, in {len(m['parts'])} part(s) "
                  f"under {a.dir}: {', '.join(x['name'] for x in m['parts'])}")
        elif a.command == "check":
            ok, missing, bad = check(a.dir)
            print(f"{len(ok)} of {len(ok) + len(missing) + len(bad)} part(s) here and whole"
                  + (f"; missing: {', '.join(missing)}" if missing else "")
                  + (f"; DAMAGED: {', '.join(bad)}" if bad else ""))
            return 1 if bad else 0
        else:
            join(a.dir, a.target, a.print_only, a.python_version)
    except Refused as exc:
        print(f"dali_wheel: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"dali_wheel: {exc.cmd[2]} exited with {exc.returncode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
