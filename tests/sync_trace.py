"""Catch host syncs without a GPU: run code on fake CUDA tensors and record what would make the host wait.

``FakeTensorMode`` builds tensors that claim ``device="cuda"`` (shapes, dtypes, strides and devices
are tracked, no memory is touched, no CUDA driver is needed), so the real hot loops run on this
CPU machine. Inside it, :class:`SyncRecorder` (a ``TorchDispatchMode``) sees every ATen operation
first and records those that block the host on the device:

- reading a value back (``_local_scalar_dense`` behind ``.item()``/``int()``/``bool()``, ``equal``,
  ``is_nonzero``);
- operations whose output size depends on the data (``nonzero``, boolean-mask indexing,
  ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``);
- device-to-host copies, and host-to-device copies that are blocking or come from pageable
  (unpinned) memory (``_to_copy``, ``copy_``, and in inference mode ``to`` itself). Indexing a CUDA
  tensor with a Python list is one: the list becomes a host tensor copied with a blocking ``_to_copy``.

Fake tensors have no memory to pin, so the recorder emulates pinning: ``pin_memory()`` (and
factories called with ``pin_memory=True``) mark the storage, ``is_pinned()`` reads the mark.
Operations that need real values (the first two groups) cannot run on fake tensors at all: the
recorder raises :class:`HostSyncError` naming the op and the line that called it.

:class:`LaunchCounter` counts the device work a region queues, and ``stub_triton_launches`` records
Triton launches by name instead of running them (the boundary fake tensors cannot cross).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# The host reads a value computed on the device.
_READS_VALUE = {"_local_scalar_dense", "item", "equal", "is_nonzero", "allclose"}
# The output's size depends on the data: the host must wait to learn it.
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                   "bincount", "histc"}
_COPIES = {"to", "_to_copy", "copy_", "_copy_from", "_copy_from_and_resize"}
_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


class HostSyncError(RuntimeError):
    """An operation that needs a device value on the host ran inside a recorded region."""


@dataclass(frozen=True)
class SyncEvent:
    op: str  # the ATen overload, e.g. "aten._to_copy.default"
    reason: str
    where: str  # "path:line in function" of the innermost caller outside torch and this file

    def __str__(self) -> str:
        return f"{self.op}: {self.reason} (at {self.where})"


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != _HERE and not path.startswith(_TORCH_DIR):
            return f"{os.path.relpath(path)}:{frame.lineno} in {frame.name}"
    return "?"


def _tensors(args, kwargs) -> list[torch.Tensor]:
    return [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]


def _bound(func, args, kwargs) -> dict:
    """An operation's arguments by their schema's names."""
    names = [argument.name for argument in func._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


def _is_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


class SyncRecorder(TorchDispatchMode):
    """Records host syncs while ``active``; emulates pinned host memory for fake tensors at all times."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[SyncEvent] = []
        self.active = False
        self._pinned: dict[int, torch.UntypedStorage] = {}  # keeps storages alive so ids are not reused

    def _mark_pinned(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        self._pinned[storage._cdata] = storage

    def is_pinned(self, t: torch.Tensor) -> bool:
        return t.untyped_storage()._cdata in self._pinned

    def _reason(self, func, name: str, args, kwargs) -> str | None:
        tensors = _tensors(args, kwargs)
        on_device = any(_is_cuda(t) for t in tensors)
        if name in _READS_VALUE and on_device:
            return "reads a device value on the host"
        if name in _DATA_DEPENDENT and on_device:
            return "output size depends on device data"
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and on_device:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                return "boolean-mask indexing (a nonzero on the device)"
        if name == "repeat_interleave" and on_device and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
        if name in _COPIES:
            return self._copy_reason(func, name, args, kwargs)
        return None

    def _copy_reason(self, func, name: str, args, kwargs) -> str | None:
        if name == "to":  # inference mode dispatches ``Tensor.to`` itself, not the ``_to_copy`` it decomposes into
            bound = _bound(func, args, kwargs)
            src, other = args[0], bound.get("other")
            dst_device = torch.device(other.device if other is not None else bound.get("device") or src.device)
            non_blocking = bound.get("non_blocking", False)
        elif name == "_to_copy":
            src, dst_device = args[0], kwargs.get("device", args[0].device)
            dst_device = torch.device(dst_device)
            non_blocking = kwargs.get("non_blocking", False)
        else:
            dst, src = args[0], args[1]
            dst_device = dst.device
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if _is_cuda(src) and dst_device.type == "cpu":
            return "device-to-host copy"
        if src.device.type == "cpu" and dst_device.type == "cuda":
            if not non_blocking:
                return "blocking host-to-device copy"
            if not self.is_pinned(src):
                return "host-to-device copy from pageable (unpinned) memory"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func is aten.is_pinned.default:
            return self.is_pinned(args[0])
        if func in (aten._pin_memory.default, aten.pin_memory.default):  # the latter reaches here on a fake GPU
            out = aten.clone.default(args[0])
            self._mark_pinned(out)
            return out
        if self.active:
            reason = self._reason(func, name, args, kwargs)
            if reason is not None:
                event = SyncEvent(str(func), reason, _caller())
                self.events.append(event)
                if name in _READS_VALUE or name in _DATA_DEPENDENT or "boolean-mask" in reason:
                    raise HostSyncError(str(event))
        out = func(*args, **kwargs)
        if kwargs.get("pin_memory") and isinstance(out, torch.Tensor):
            self._mark_pinned(out)
        return out

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[SyncEvent]]:
        """Record within the block; yields the list the events are appended to."""
        self.active = True
        try:
            yield self.events
        finally:
            self.active = False

    def report(self) -> str:
        return "\n".join(str(e) for e in self.events) or "no host sync"


@contextlib.contextmanager
def fake_cuda() -> Iterator[SyncRecorder]:
    """Fake tensors on a CUDA device that need no GPU, with a recorder (idle until ``recording()``).

    Factories called with ``device="cuda"`` inside the block return fake CUDA tensors; real CPU
    tensors passed in are converted on use. Build objects (their one-off copies are not recorded),
    then wrap the steady-state loop in ``recorder.recording()``.
    """
    with FakeTensorMode(allow_non_fake_inputs=True), SyncRecorder() as recorder:
        yield recorder


# Operations that launch no device work: allocations, host-side pinning and metadata (views are told by
# their schema: ``OpOverload.is_view``).
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "is_pinned", "_pin_memory",
              "detach", "detach_", "device", "lift_fresh", "alias", "sym_size", "sym_stride", "sym_numel",
              "sym_storage_offset"}


class LaunchCounter(TorchDispatchMode):
    """Counts the ATen operations that would queue device work (a kernel or a copy) on a CUDA device, by
    name: every operation with a CUDA tensor among its inputs or outputs, except views, allocations and
    metadata. Enter it inside ``fake_cuda()``, around the code to count."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        copied = name == "to" and out is not args[0]  # under inference mode: a copy unless it returned its input
        if copied or (not func.is_view and name not in _NO_LAUNCH):
            if any(_is_cuda(t) for t in _tensors((args, kwargs), {}) + _tensors(out, {})):
                self.ops[name] = self.ops.get(name, 0) + 1
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@contextlib.contextmanager
def stub_triton_launches() -> Iterator[list[str]]:
    """Every Triton launch (``kernel[grid](...)``, autotuned or not) recorded by its kernel's name instead of
    run: the launch is the boundary past which fake tensors cannot go. Yields the list of names."""
    from triton.runtime.jit import KernelInterface

    launches: list[str] = []
    real = KernelInterface.__getitem__

    def launcher(kernel, grid):
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
        return lambda *args, **kwargs: launches.append(name)

    KernelInterface.__getitem__ = launcher
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = real
