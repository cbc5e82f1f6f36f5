"""fasteval: exact, fast evaluation of image classifiers on ImageFolder datasets."""

from .kernels.accumulator import MetricsAccumulator
from .kernels.fused_metrics import BatchMetrics, fused_metrics

__all__ = ["BatchMetrics", "MetricsAccumulator", "fused_metrics"]
__version__ = "0.1.0"
