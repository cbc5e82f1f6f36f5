"""What a forward on the meta device tells about a model, kept between runs.

Two checks before any work run the model on the meta device (a small model: on a few real samples):
whether it takes the input size (``models.check_input_fits``) and the peak bytes of its activations
(``footprint.activation_bytes``, for the memory check). Torch's Python meta kernels are wrapped in
``torch._compile._disable_dynamo``, so the first meta forward of a process imports TorchDynamo: about
1.1 s on a 2-core machine, more than the rest of a small run's setup. The answers depend only on the architecture (its class, its parameters' and
buffers' names, shapes and dtypes: ``compile_cache.model_signature``), the shapes asked about, torch and
torchvision, never on the weights' values; they are kept in ``$FASTEVAL_CACHE/meta/``, one JSON file a
key, and a run that finds its key runs no meta forward. A failure is never kept: an error raised, or no
answer (None: the model could not run on the meta device). A kept answer is used only if it has the
form its check gives (``VALID``), and ``FACTS_VERSION`` in every key retires the answers of an older
fasteval whose checks computed them differently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from fasteval.cache_dir import cache_base
from fasteval.model.compile_cache import load_profile, model_signature, save_profile

FACTS_VERSION = 1

@dataclass
class MetaFact:
    """One answer, under the key it was computed for."""

    key: dict = field(default_factory=dict)
    value: Any = None
    known: bool = False


def facts_dir() -> str:
    return os.path.join(cache_base(), "meta")


def fact_key(kind: str, model: nn.Module, shapes: dict) -> dict:
    import torchvision

    model_name = f"{type(model).__module__}.{type(model).__qualname__}/{model_signature(model)}"
    key = {"kind": kind, "facts_version": FACTS_VERSION, "torch": torch.__version__,
           "torchvision": torchvision.__version__, "model": model_name, **shapes}
    if type(model).__module__.startswith("timm."):  # a timm model's code is timm's release's
        from fasteval.versions import package_version

        key["timm"] = package_version("timm")
    return key


def _is_byte_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_pass(value: Any) -> bool:
    return value is True


VALID = {"activation_bytes": _is_byte_count, "input_fits": _is_pass}  # each kind's answers, by form


def remembered(kind: str, model: nn.Module, shapes: dict, compute: Callable[[], Any]) -> Any:
    """The kept answer for (``kind``, one of ``VALID``, the model's architecture, ``shapes``) where it has
    its kind's form, else ``compute()``'s, kept unless it is None."""
    key = fact_key(kind, model, shapes)
    fact = load_profile(facts_dir(), key, MetaFact)
    if fact.known and VALID[kind](fact.value):
        return fact.value
    value = compute()
    if value is not None:
        save_profile(facts_dir(), MetaFact(key=key, value=value, known=True))
    return value
