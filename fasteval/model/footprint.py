"""How much memory a model's activations take, estimated on the meta device (shapes only, no compute)
or, for a small model in eval, from real forwards of 1 and 2 samples (the meta device's first use
imports TorchDynamo, about 1.1 s; those forwards cost less).

The model runs once on meta copies of its parameters and buffers at the run's batch and input size,
under a dispatch mode that sees every aten operator's outputs and follows each output storage with a
weak reference: the live bytes are summed after every operator, and the estimate is their peak. It
counts what eager PyTorch keeps alive at once: an operator's inputs and outputs (at least the largest
input+output pair of any layer), tensors a module still holds (a residual branch's identity),
in-place results once (they share their input's storage), and, in training, everything autograd
keeps for the backward pass (the sum over layers) with the activations' gradients in flight. It leaves
out the model's input batch (the caller counts it), the weights and their gradients, the operators' scratch memory (convolution
workspaces, oneDNN or cuDNN buffers, the allocator's caching and fragmentation) and what
``torch.compile`` or autocast change: float32 eager sizes, an upper bound for bf16 autocast runs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


# A model whose forward on a few real samples costs less than the meta device's first use (torch's Python
# meta kernels import TorchDynamo on their first call: about 1.1 s on a 2-core machine). Parameters times
# input pixels over 224x224, a proxy for a forward's cost: ResNet-50 at 224 (25.6 M) is in, ViT-B/16 not.
REAL_FORWARD_PARAMS = 30_000_000


class _LiveBytes(TorchDispatchMode):
    """Records, after every operator, the bytes held by the storages that operators created and that are
    still alive (``trace``: the operator and that total)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # never run under torch.compile: left unwrapped, entering it imports no TorchDynamo

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.trace: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [ref for ref in self.live if ref.expired()]:
            del self.live[ref]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.live.setdefault(StorageWeakRef(storage), storage.nbytes())
        self.trace.append((str(func), sum(self.live.values())))
        return out

    @property
    def peak(self) -> int:
        return max((total for _, total in self.trace), default=0)


def cheap_forward(model: nn.Module, input_hw: tuple[int, int]) -> bool:
    """Whether a forward of a few real samples costs less than a meta-device forward's first use."""
    params = sum(p.numel() for p in model.parameters())
    return params * (input_hw[0] * input_hw[1]) / (224 * 224) <= REAL_FORWARD_PARAMS


def activation_bytes(model: nn.Module, batch_size: int, input_hw: tuple[int, int],
                     training: bool = False) -> int | None:
    """Peak bytes of the activations of one forward (``training``: one forward and backward, the
    gradients of the parameters included) at ``batch_size`` float32 inputs of ``input_hw``; None when
    the model cannot run (an operator without a meta kernel, an input size it refuses). The parameters'
    gradients are left out (they live as long as the weights: the caller counts them with the weights);
    the model's own tensors and mode are left as they were. A small model in eval is measured on real
    samples (``_extrapolated``), any other on the meta device; the two agree but for BatchNorm's
    statistics, which the meta kernel returns and the CPU's eval kernel does not (tested)."""
    if not training and cheap_forward(model, input_hw):
        found = _extrapolated(model, batch_size, input_hw)
        if found is not None:
            return found
    return _on_meta(model, batch_size, input_hw, training)


def _trace(model: nn.Module, images: torch.Tensor) -> list[tuple[str, int]] | None:
    """The live-bytes trace of one real eval forward of ``images``; None where the model refuses them."""
    tracker = _LiveBytes()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracker:
            model(images)
    except Exception:
        return None
    finally:
        model.train(was_training)
    return tracker.trace


def _extrapolated(model: nn.Module, batch_size: int, input_hw: tuple[int, int]) -> int | None:
    """The peak at ``batch_size`` from real forwards of 1 and 2 samples. Every tensor an operator makes
    holds either a fixed number of bytes or a number in proportion to the batch, so each operator's live
    total is a line in the batch size, and the peak is the highest of those lines at ``batch_size`` (one
    with a larger fixed part can lead at 1 or 2 samples and another at 64). None where the two forwards
    do not run the same operators (a model that branches on its batch size)."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    one, two = (_trace(model, torch.zeros(n, 3, *input_hw, device=device)) for n in (1, 2))
    if one is None or two is None or [op for op, _ in one] != [op for op, _ in two]:
        return None
    return max((a + (batch_size - 1) * (b - a) for (_, a), (_, b) in zip(one, two)), default=0)


def _on_meta(model: nn.Module, batch_size: int, input_hw: tuple[int, int], training: bool) -> int | None:
    from torch.func import functional_call

    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    params = {name for name, _ in model.named_parameters()}
    meta = {name: torch.empty_like(t, device="meta").requires_grad_(training and name in params and
                                                                      t.is_floating_point())
            for name, t in tensors.items()}
    for t in meta.values():
        if t.requires_grad:  # the parameters' gradients are the caller's to count, as the weights are
            t.register_post_accumulate_grad_hook(_drop_grad)
    images = torch.zeros(batch_size, 3, *input_hw, device="meta")
    was_training = model.training
    tracker = _LiveBytes()
    model.train(training)
    try:
        with torch.set_grad_enabled(training), tracker:
            logits = functional_call(model, meta, (images,))
            if training:
                logits.float().sum().backward()
    except Exception:
        return None
    finally:
        model.train(was_training)
    return tracker.peak


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
