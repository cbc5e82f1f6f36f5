"""The one line the command prints for an error no input explains but the machine does (fasteval/errors.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from torch._utils import ExceptionWrapper

from fasteval import cli
from fasteval.errors import describe_error, is_expected

# torch's own words (ATen's MapAllocator; the DataLoader's SIGCHLD handler) when /dev/shm is full.
NO_SPACE = "unable to allocate shared memory(shm) for file </torch_5451_3215839038_0>: No space left on device (28)"
BUS_ERROR = ("DataLoader worker (pid 5452) is killed by signal: Bus error. It is possible that dataloader's workers "
             "are out of shared memory. Please try to raise your shared memory limit.")


def from_worker(message: str) -> RuntimeError:
    """``RuntimeError(message)`` raised in a DataLoader worker, as the loader re-raises it in this process
    (the worker's whole traceback as its message)."""
    try:
        raise RuntimeError(message)
    except RuntimeError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")  # pragma: no cover


def assert_shared_memory_line(line: str) -> None:
    assert line.startswith("out of shared memory: the DataLoader workers pass decoded batches through /dev/shm ("), line
    assert "--workers 0" in line and "--shm-size" in line and "unexpected" not in line and "\n" not in line


@pytest.mark.parametrize("exc", [from_worker(NO_SPACE), RuntimeError(BUS_ERROR)], ids=["no-space", "bus-error"])
def test_a_full_shared_memory_is_named_with_the_ways_out(exc, small_data, monkeypatch, capsys):
    """A worker that cannot put its batch in /dev/shm, or dies of SIGBUS writing it: one line that names
    shared memory and the ways out, not "RuntimeError ... (unexpected ...)"; exit 2."""
    assert is_expected(exc)
    assert_shared_memory_line(describe_error(exc))
    import fasteval.evaluation.reference

    def full(*args, **kwargs):
        raise exc

    monkeypatch.setattr(fasteval.evaluation.reference, "evaluate_reference", full)
    capsys.readouterr()
    assert cli.main(["eval", small_data, "--reference", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("fasteval: no --weights")  # the random-init note, then the error
    assert_shared_memory_line(err[1].removeprefix("fasteval: error: "))


def test_other_runtime_errors_are_still_unexpected():
    assert describe_error(from_worker("shape mismatch")).endswith("(unexpected; rerun with --debug for the traceback)")


def _can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64K tmpfs /dev/shm"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a mount namespace (unshare -m) to shrink /dev/shm")
def test_a_real_full_shared_memory_through_the_command(small_data, weights_3cls):
    """The reference's DataLoader workers with a 64 KiB /dev/shm (a tmpfs of its own, in a mount namespace):
    the one line, exit 2; --workers 0, the way out it names, evaluates."""
    command = [sys.executable, "-m", "fasteval", "eval", small_data, "--weights", weights_3cls, "--reference",
               "--batch-size", "8", "--device", "cpu", "--no-progress"]
    script = "mount -t tmpfs -o size=64K tmpfs /dev/shm && exec \"$@\""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command, "--workers", "2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert full.returncode == 2 and full.stdout == "", full.stderr
    note, line = full.stderr.splitlines()  # a plain state_dict on the default preset: its one note first
    assert note.startswith("fasteval: note: --weights ") and "records no preprocessing" in note
    assert_shared_memory_line(line.removeprefix("fasteval: error: "))
    assert "(0.1 MiB)" in line
    fine = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command, "--workers", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert fine.returncode == 0 and "samples                       21" in fine.stdout, fine.stderr
