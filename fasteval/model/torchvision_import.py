"""Importing torchvision without TorchDynamo: about 1.1 s of every fast command that does not compile.

``torchvision.ops.roi_align`` imports ``is_compile_supported`` from ``torch._dynamo.utils`` at module
level (torchvision 0.2x), and that import loads all of TorchDynamo, although roi_align calls it only
when it runs, which a classifier never does. ``import_torchvision`` imports torchvision with a
stand-in for ``torch._dynamo.utils`` in ``sys.modules`` for the length of that import only:

- its ``is_compile_supported`` imports the real function on its first call and calls it;
- any other name taken from it imports the real module there and then, and hands the real value on;
- anything that imports the ``torch._dynamo`` package meanwhile removes the stand-in first (a finder
  at the head of ``sys.meta_path``), so TorchDynamo is always imported whole and real.

The worst case is therefore no saving, never a wrong module. Afterwards ``torch.compile`` imports
TorchDynamo as usual when a run compiles. The reference command (``--reference``) imports torchvision
plainly, as a script of the tutorial's kind does.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import types

STAND_IN = "torch._dynamo.utils"
DYNAMO = "torch._dynamo"


def _is_compile_supported(device_type: str) -> bool:
    stand_in = sys.modules.get(STAND_IN)
    if isinstance(stand_in, _StandIn):  # called while torchvision imports: the real module from here on
        _drop_stand_in(stand_in)
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


class _StandIn(types.ModuleType):
    """``torch._dynamo.utils`` until something needs more of it than roi_align's one function."""

    is_compile_supported = staticmethod(_is_compile_supported)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # the import system's probes (__path__, __spec__ ...): the stand-in's own
            raise AttributeError(name)
        return getattr(_real_dynamo_utils(self), name)


def _drop_stand_in(stand_in: types.ModuleType) -> None:
    if sys.modules.get(STAND_IN) is stand_in:
        del sys.modules[STAND_IN]


def _real_dynamo_utils(stand_in: types.ModuleType) -> types.ModuleType:
    _drop_stand_in(stand_in)
    return importlib.import_module(STAND_IN)


class _DynamoGuard(importlib.abc.MetaPathFinder):
    """Removes the stand-in before the ``torch._dynamo`` package itself is imported; finds nothing."""

    def __init__(self, stand_in: types.ModuleType):
        self.stand_in = stand_in

    def find_spec(self, name, path, target=None):
        if name == DYNAMO:
            _drop_stand_in(self.stand_in)
        return None


def without_dynamo(import_: callable) -> None:
    """Run ``import_`` (an import) with the stand-in in place; the stand-in is gone afterwards."""
    if DYNAMO in sys.modules or STAND_IN in sys.modules:  # TorchDynamo is here already: nothing to save
        import_()
        return
    stand_in = _StandIn(STAND_IN, "fasteval's stand-in for torch._dynamo.utils while torchvision imports")
    guard = _DynamoGuard(stand_in)
    sys.modules[STAND_IN] = stand_in
    sys.meta_path.insert(0, guard)
    try:
        import_()
    finally:
        sys.meta_path.remove(guard)
        _drop_stand_in(stand_in)


def import_torchvision() -> None:
    """Import torchvision (and torch) without importing TorchDynamo where torchvision allows."""
    if "torchvision" in sys.modules:
        return
    import torch  # noqa: F401  (imported whole before the stand-in exists)

    without_dynamo(lambda: importlib.import_module("torchvision"))
