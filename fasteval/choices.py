"""The accepted values of the command's named options, in a module that imports nothing heavy, so
that argparse refuses a wrong value at once, before torch is imported (each stage module uses these)."""

from __future__ import annotations

LOADERS = ("auto", "dali", "torchvision")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EXACT_MODES = ("auto", "on", "off")
COMPILE_MODES = ("auto", "on", "off")
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
