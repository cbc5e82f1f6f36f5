"""The memory check before a run: sizes whose inputs, activations and model tensors cannot fit are
refused in one line naming the options to lower and the figures, instead of being killed by the OS.

On the CPU everything is in host memory, checked against this machine's memory (or the cgroup's limit,
if lower). On CUDA the decoded inputs are checked against host memory, and the input batch, the
activations and the model's tensors against the memory free on the GPU (``torch.cuda.mem_get_info``).
The activations are fasteval/model/footprint.py's estimate (what it leaves out is said there); where
it cannot be made, the inputs and weights alone are checked.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fasteval.data.preprocess import PreprocessSpec
from fasteval.errors import FastevalError
from fasteval.model.footprint import activation_bytes, parameter_bytes
from fasteval.model.meta_facts import remembered

LOWER = "--batch-size or --resize/--crop"
LOWER_VAL = "--val-batch-size or --resize/--crop"
TRAIN_PREFETCH = 4  # batches in flight per DataLoader worker (fasteval/training/data.py's prefetch_factor)
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def physical_memory() -> int | None:
    """Bytes of physical memory, where the OS says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def host_memory() -> int | None:
    """Bytes this process may use: the physical memory, or the cgroup's limit where that is lower."""
    sizes = [physical_memory()]
    for path in CGROUP_LIMITS:
        try:
            with open(path) as f:
                sizes.append(int(f.read().strip()))
        except (OSError, ValueError):  # absent, or "max"
            pass
    sizes = [s for s in sizes if s]
    return min(sizes) if sizes else None


def device_free_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device now (None where it cannot be read)."""
    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except Exception:
        return None


def batch_bytes(batch_size: int, input_hw: tuple[int, int]) -> int:
    """One float32 batch of model inputs."""
    return batch_size * 3 * input_hw[0] * input_hw[1] * 4


def input_bytes(spec: PreprocessSpec, image_hw: tuple[int, int], batch_size: int, workers: int,
                batches: int = 1) -> int:
    """Host memory of the decoded inputs: ``batches`` float32 batches plus one resized uint8 image per
    decoding worker (the images taken to be ``image_hw``, the first one's size)."""
    rh, rw = spec.resized_hw(*image_hw)
    return batches * batch_bytes(batch_size, spec.output_hw(*image_hw)) + max(1, workers) * 3 * rh * rw


def _sizes(spec: PreprocessSpec) -> str:
    return f"--resize {spec.resize}" + (f" --crop {spec.crop}" if spec.crop is not None else "")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _refuse_over(what: str, parts: dict[str, int], budget: int | None, where: str, lower: str, note: str) -> None:
    """``where``: the budget's description, with ``{}`` for its size."""
    need = sum(parts.values())
    if budget is None or need <= budget:
        return
    detail = ", ".join(f"{name} {_size(n)}" for name, n in parts.items())
    raise FastevalError(f"{what} needs {_size(need)} ({detail}{note}), more than {where.format(_size(budget))}: "
                        f"lower {lower}")


def check_fits(what: str, inputs: int, batch: int, model_parts: dict[str, int], device: torch.device,
               lower: str, note: str = "") -> None:
    """Refuse when the parts exceed the memory they live in. ``inputs``: host memory of the decoded data
    (``batch``, one input batch, included); ``model_parts``: the activations and model tensors, in host
    memory on the CPU, beside a copy of the batch on the GPU on CUDA."""
    if device.type == "cuda":
        _refuse_over(what, {"inputs": inputs}, host_memory(), "this machine's {}", lower, "")
        _refuse_over(what, {"input batch": batch, **model_parts}, device_free_memory(device),
                     f"the {{}} free on {device}", lower, note)
        return
    _refuse_over(what, {"inputs": inputs, **model_parts}, host_memory(), "this machine's {}", lower, note)


def _activations(model: nn.Module, arch: str, batch_size: int, input_hw: tuple[int, int],
                 training: bool = False) -> tuple[dict[str, int], str]:
    """The activation part (empty where it cannot be estimated) and a note saying so."""
    found = remembered("activation_bytes", model, {"batch_size": batch_size, "input_hw": list(input_hw),
                                                   "training": training},
                       lambda: activation_bytes(model, batch_size, input_hw, training=training))
    if found is None:
        return {}, f"; the activations of --arch {arch} not estimated"
    return {"activations": found}, ""


def check_eval_memory(model: nn.Module, arch: str, spec: PreprocessSpec, image_hw: tuple[int, int],
                      batch_size: int, workers: int, device: torch.device) -> None:
    """``eval``, ``bench`` and sweeps: one batch of inputs, one forward's activations and the weights."""
    input_hw = spec.output_hw(*image_hw)
    activations, note = _activations(model, arch, batch_size, input_hw)
    check_fits(f"{_sizes(spec)} --batch-size {batch_size}", input_bytes(spec, image_hw, batch_size, workers),
               batch_bytes(batch_size, input_hw), {**activations, "weights": parameter_bytes(model)}, device,
               LOWER, note)


def check_train_memory(model: nn.Module, arch: str, spec: PreprocessSpec, image_hw: tuple[int, int],
                       batch_size: int, val_batch_size: int, workers: int, device: torch.device) -> None:
    """``train``: the model's tensors for the whole run (weights, gradients, AdamW's two moments and the
    validation evaluator's copy: 5x the parameters), with a training step (the loader's batches in
    flight, the activations autograd keeps for the backward pass) or a validation pass (as ``eval``)."""
    input_hw = spec.output_hw(*image_hw)
    state = {"weights, gradients, AdamW state and the validation copy": 5 * parameter_bytes(model)}
    activations, note = _activations(model, arch, batch_size, input_hw, training=True)
    check_fits(f"fasteval train {_sizes(spec)} --batch-size {batch_size}: a training step",
               input_bytes(spec, image_hw, batch_size, workers, batches=max(1, TRAIN_PREFETCH * workers)),
               batch_bytes(batch_size, input_hw), {**activations, **state}, device, LOWER, note)
    activations, note = _activations(model, arch, val_batch_size, input_hw)
    check_fits(f"fasteval train {_sizes(spec)} --val-batch-size {val_batch_size}: validation",
               input_bytes(spec, image_hw, val_batch_size, workers), batch_bytes(val_batch_size, input_hw),
               {**activations, **state}, device, LOWER_VAL, note)
