"""How much memory a model's activations take, estimated on the meta device (shapes only, no compute).

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


class _LiveBytes(TorchDispatchMode):
    """Records the peak of the bytes held by the storages that operators created and that are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [ref for ref in self.live if ref.expired()]:
            del self.live[ref]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.live.setdefault(StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def activation_bytes(model: nn.Module, batch_size: int, input_hw: tuple[int, int],
                     training: bool = False) -> int | None:
    """Peak bytes of the activations of one forward (``training``: one forward and backward, the
    gradients of the parameters included) at ``batch_size`` float32 inputs of ``input_hw``; None when
    the model cannot run on the meta device (an operator without a meta kernel, an input size it
    refuses). The parameters' gradients are left out (they live as long as the weights: the caller counts
    them with the weights); the model's own tensors and mode are left as they were."""
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
