"""The accepted values of the command's named options, in a module that imports nothing heavy, so
that argparse refuses a wrong value at once, before torch is imported (each stage module uses these)."""

from __future__ import annotations

LOADERS = ("auto", "dali", "torchvision")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EXACT_MODES = ("auto", "on", "off")
COMPILE_MODES = ("auto", "on", "off")
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"

# On the CPU a fast batch holds at most this many input pixels per usable core (10 images of 224x224: 20 on
# the 2-core development machine, where the layers' activations then stay in cache). Measured there only
# (2026-11-29), images/s at batches of 20 / 30 / 60: ResNet-18 compiled bf16 104 / 99.5 / 97, eager
# 107 / 98 / 92.5; MobileNetV3-L compiled 258 / 245 / 217; ResNet-50 eager 34.2 / - / 29.8; batches of 8
# were slower again. Scaled with the cores (their caches grow with them), so from 8 cores the default
# --batch-size 64 is the batch, as before the cap.
CPU_BATCH_PIXELS_PER_CORE = 10 * 224 * 224
