"""fasteval: exact, fast evaluation of image classifiers.

``fasteval.evaluate(model, data, transform=...)``, ``fasteval.compare(...)`` and ``fasteval.sweep(models, data)``
are the Python API
(fasteval/api.py); the fused metrics kernel is public too. Everything is imported on first use, so that
``fasteval --help`` and argument errors do not pay for importing torch and triton.
"""

from __future__ import annotations

import importlib

__all__ = ["evaluate", "compare", "sweep", "Result", "SweepResult", "BatchMetrics", "MetricsAccumulator",
           "fused_metrics"]
__version__ = "0.1.0"

_LAZY = {"evaluate": ".api", "compare": ".api", "sweep": ".api", "Result": ".api", "SweepResult": ".api",
         "BatchMetrics": ".kernels.fused_metrics", "fused_metrics": ".kernels.fused_metrics",
         "MetricsAccumulator": ".kernels.accumulator"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
