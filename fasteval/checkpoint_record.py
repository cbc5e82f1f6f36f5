"""What a ``fasteval train`` checkpoint records beside its weights: the architecture, the class names and the
validation preprocessing, so that ``eval`` uses them unless told otherwise.

Read without torch and without running anything: a checkpoint ``torch.save`` wrote is a zip holding a
pickle (``*/data.pkl``) of the saved dict, whose tensors are references into the zip's other entries. The
pickle is read with every class stubbed out, so the plain values (strings, numbers, lists, dicts) come back
as they are and a tensor comes back as an inert stub; its bytes are never read. Torch-free, the record can be
read while the command starts, before torch is imported (fasteval/data/prefetch.py decodes with it).
"""

from __future__ import annotations

import collections
import pickle
import zipfile

RECORD_KEYS = ("arch", "classes", "preprocess")


class _Stub:
    """Whatever the pickle names that is not plain data (a tensor's rebuild, a storage): inert."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs) -> _Stub:
        return _Stub()

    def __setstate__(self, state) -> None:
        pass


class _PlainData(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return _Stub

    def persistent_load(self, pid) -> None:
        return None


def fasteval_record(path: str) -> dict | None:
    """``{"arch", "classes", "preprocess"}`` of a checkpoint ``fasteval train`` wrote, or None for any other
    file (a plain state_dict, another tool's checkpoint, a file that cannot be read: the weights' own load
    reports that)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(names) != 1:
                return None
            with archive.open(names[0]) as f:
                obj = _PlainData(f).load()
    except Exception:
        return None
    if not isinstance(obj, dict) or "model_state_dict" not in obj or not isinstance(obj.get("preprocess"), dict):
        return None
    return {key: obj.get(key) for key in RECORD_KEYS}
