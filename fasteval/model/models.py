"""Model construction: any torchvision classifier by name, or a timm one (``timm:NAME``,
fasteval/model/timm_models.py), with weights from a checkpoint file.

Checkpoints are read with ``torch.load(weights_only=True)``, so a file can never run code.
The number of classes is read from the checkpoint's classification head.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import warnings
import zipfile
from collections import OrderedDict
from contextlib import nullcontext

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map_only

from fasteval.errors import FastevalError, first_line, message_lines
from fasteval.model.init_skip import initialisers_skipped
from fasteval.model.timm_models import is_timm

# Where training scripts keep the weights, in order of preference: timm's train.py saves "state_dict" and,
# with --model-ema, "state_dict_ema" beside it; the plain weights are taken first, as timm's validate.py
# does by default, and the EMA's where a file holds only those.
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
PICKLE_PROTO = 0x80  # a pickle (protocol >= 2) starts with PROTO: torch.save's legacy format


def classification_models() -> list[str]:
    """Names accepted by ``--arch``: torchvision's image classification models."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_arch(arch: str) -> None:
    if arch not in classification_models():
        raise FastevalError(
            f"unknown --arch {arch!r}: not a torchvision classification model (e.g. resnet18, resnet50, "
            f"vit_b_16, efficientnet_b0; see torchvision.models.list_models())"
        )


# Tensor methods that only set values, which a meta tensor does not have. Some (normal_, erfinv_, clamp_,
# exponential_) have Python meta kernels whose first call imports TorchDynamo: about 1.1 s of a command
# that does not compile (fasteval/model/torchvision_import.py).
VALUE_OPS = frozenset({"normal_", "uniform_", "fill_", "zero_", "erfinv_", "mul_", "add_", "sub_", "div_", "clamp_",
                       "clamp_min_", "clamp_max_", "exponential_", "log_normal_", "cauchy_", "geometric_",
                       "bernoulli_", "random_", "copy_", "sqrt_", "neg_", "abs_"})


# A computation on meta tensors while a model is built (ConvNeXt's layer scale, Swin's and MaxViT's relative
# position index) reaches Python meta kernels wrapped in ``torch._disable_dynamo``, whose first call imports
# TorchDynamo. These out-of-place operators, on up to ``CPU_STAND_IN_ELEMENTS`` input elements, run on
# zero-filled CPU stand-ins instead (the values are never read: a checkpoint replaces them), their results
# moved back to the meta device. Any other operator runs on the meta device: at worst no saving.
CPU_STAND_IN_OPS = frozenset({
    "mul", "add", "sub", "div", "true_divide", "floor_divide", "pow", "neg", "abs", "sign", "exp", "log", "log2",
    "log1p", "sqrt", "rsqrt", "floor", "ceil", "round", "clamp", "where", "matmul", "sum", "mean", "stack", "cat",
    "meshgrid", "flatten", "permute", "transpose", "contiguous", "reshape", "view", "unsqueeze", "squeeze",
    "expand", "repeat", "roll", "ones_like", "zeros_like", "__mul__", "__rmul__", "__add__", "__radd__",
    "__sub__", "__rsub__", "__truediv__", "__rtruediv__", "__floordiv__", "__pow__", "__neg__", "__abs__",
    "__matmul__", "__getitem__"})
CPU_STAND_IN_ELEMENTS = 1 << 20
CPU_STAND_IN_FACTORIES = frozenset({"arange", "linspace"})  # computed by Python refs on the meta device too


class _MetaValuesSkipped(TorchFunctionMode):
    """On a meta tensor, an initialiser (``torch.nn.init``'s in-place functions, whole: their inner ops
    would run with this mode set aside) or a value-only tensor method returns the tensor as it is: it
    changes no shape, dtype or stride. The ``CPU_STAND_IN_OPS`` on small meta tensors run on CPU
    stand-ins; where that fails, on the meta device as before."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        initialiser = getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_")
        tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
        if (initialiser or name in VALUE_OPS) and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        if name not in CPU_STAND_IN_OPS and name not in CPU_STAND_IN_FACTORIES:
            return func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in CPU_STAND_IN_FACTORIES and not tensors and kwargs.get("device") is None:
            return _to_meta(func(*args, **{**kwargs, "device": "cpu"}))  # the default device is the meta one
        metas = [t for t in tensors if t.is_meta]
        if metas and sum(t.numel() for t in metas) <= CPU_STAND_IN_ELEMENTS:
            try:
                out = func(*_on_cpu(args), **_on_cpu(kwargs))
            except Exception:
                return func(*args, **kwargs)
            return _to_meta(out)
        return func(*args, **kwargs)


def _on_cpu(tree):
    """``tree`` (arguments, any nesting) with each meta tensor replaced by a zero-filled CPU tensor of its
    shape and dtype."""
    return tree_map_only(torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype, device="cpu") if t.is_meta else t,
                         tree)


def _to_meta(tree):
    """``tree`` (a result, any nesting) with each tensor moved to the meta device (a parameter stays one)."""
    def moved(t: torch.Tensor) -> torch.Tensor:
        meta = t.to("meta")
        return nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta

    return tree_map_only(torch.Tensor, moved, tree)


def _construct(arch: str, num_classes: int, device: str | torch.device = "cpu", initialise: bool = True) -> nn.Module:
    """The architecture; ``initialise=False``: its values are left as allocated (a checkpoint replaces them)."""
    import torchvision

    kwargs = {"num_classes": num_classes}
    if arch in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    if torch.device(device).type == "meta":
        values = _MetaValuesSkipped()
    else:
        values = nullcontext() if initialise else initialisers_skipped()
    with torch.device(device), values:
        return torchvision.models.get_model(arch, weights=None, **kwargs)


def head_name(arch: str) -> str:
    """Qualified name of the module that produces the logits (e.g. ``fc``, ``classifier.1``)."""
    if is_timm(arch):
        from fasteval.model.timm_models import head_name as timm_head_name

        return timm_head_name(arch)
    probe = _construct_for_loading(arch, num_classes=1000)
    name = None
    for qualified, module in probe.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == 1000:
            name = qualified
        elif isinstance(module, nn.Conv2d) and module.out_channels == 1000:
            name = qualified
    if name is None:
        raise FastevalError(f"cannot find the classification head of --arch {arch}")
    return name


def _check_weights_file(path: str) -> None:
    """A missing file, a folder, a broken link, a FIFO or an empty file, named as such."""
    if os.path.isdir(path):
        raise FastevalError(f"--weights {path} is a folder, not a checkpoint file")
    if os.path.islink(path) and not os.path.exists(path):
        raise FastevalError(f"--weights {path} is a broken symbolic link (to {os.readlink(path)})")
    if not os.path.exists(path):
        raise FastevalError(f"--weights file not found: {path}")
    if not os.path.isfile(path):
        raise FastevalError(f"--weights {path} is not a regular file")
    if os.path.getsize(path) == 0:
        raise FastevalError(f"--weights {path} is empty (0 bytes)")


def _load_failure(path: str, exc: Exception) -> str:
    """Why a weights-only load failed, in words that fit the file (never "use weights_only=False")."""
    text = " ".join(message_lines(exc))
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return (f"it holds a pickled object ({refused.group(1)}), not a plain state_dict of tensors; "
                f"save model.state_dict() with torch.save (fasteval never runs code from a checkpoint)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC and _is_torchscript(path):
        return (f"it is a TorchScript module (torch.jit.save), a program, not a checkpoint, and fasteval runs no "
                f"code from a file: save its weights with torch.save(torch.jit.load({path!r}).state_dict(), "
                f"'weights.pt') and give that file with the model's --arch")
    if head == ZIP_MAGIC:
        reason = first_line(exc).split(". ")[0]  # torch adds advice after the first sentence
        return f"a damaged or truncated PyTorch checkpoint (its zip archive cannot be read: {reason})"
    if len(head) >= 2 and head[0] == PICKLE_PROTO and 2 <= head[1] <= 5:
        return "a pickle that is not a readable PyTorch checkpoint (damaged, or not written by torch.save)"
    return "not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy torch.save pickle)"


def _is_torchscript(path: str) -> bool:
    """Whether ``path`` is a ``torch.jit.save`` archive: a zip with a ``constants.pkl`` (torch's own test)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.partition("/")[2] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _is_safetensors(path: str) -> bool:
    """Whether ``path`` is a safetensors file, by content: an 8-byte little-endian header length that fits the
    file, then the header's JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (Hugging Face's format: no code, tensors only), read by the safetensors
    library (installed with the timm extra)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise FastevalError(f"--weights {path} is a safetensors file: install the safetensors package "
                            f"(pip install safetensors, or fasteval[timm], which brings it)") from None
    try:
        state = load_file(path, device="cpu")
    except Exception as exc:
        raise FastevalError(f"cannot load --weights {path}: a damaged safetensors file ({first_line(exc)[:200]})") \
            from None
    if not state:
        raise FastevalError(f"--weights {path} holds no tensors")
    return state


def read_state_dict(path: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A bare state_dict from a checkpoint file, unwrapped and with DDP/compile prefixes removed.
    ``mmap``: map a zip-format file rather than read it (a check of names and shapes reads no weights)."""
    _check_weights_file(path)
    if _is_safetensors(path):
        return _renamed(_read_safetensors(path), _unprefixed)
    if mmap:
        with open(path, "rb") as f:
            mmap = f.read(4) == ZIP_MAGIC  # torch maps only its zip format
    try:
        # The training scripts of torchvision's references and of timm save their arguments beside the
        # weights as an argparse.Namespace: allowed, since unpickling one only sets attributes.
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says enough
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as exc:
        raise FastevalError(f"cannot load --weights {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise FastevalError(f"cannot load --weights {path}: {_load_failure(path, exc)}") from None
    if isinstance(obj, dict):
        for key in CHECKPOINT_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FastevalError(
            f"--weights {path} holds no state_dict (expected a dict of tensors, or one under "
            f"{', '.join(repr(k) for k in CHECKPOINT_KEYS)})"
        )
    return _renamed(obj, _unprefixed)


def _unprefixed(key: str) -> str:
    """``key`` without the DDP and torch.compile prefixes, however nested."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _renamed(state: dict, rename) -> OrderedDict:
    """``state`` with each key renamed by ``rename`` (None: dropped), and its modules' saved versions
    (``state_dict()._metadata``, which ``torch.save(model.state_dict())`` keeps and some modules load by:
    MNASNet refuses a state without them) renamed alike, a module's name as the start of its keys
    (``name + "."``). Where two names become one (DDP's root "" and its "module"), the later, inner one stays."""
    out = OrderedDict((new, value) for key, value in state.items() if (new := rename(key)) is not None)
    metadata = getattr(state, "_metadata", None)
    if isinstance(metadata, dict):
        out._metadata = OrderedDict((new[:-1], value) for name, value in metadata.items()
                                    if (new := rename(name + ".")) is not None)
    return out


def _without_wrapper(state: dict[str, torch.Tensor], head: str, path: str) -> dict[str, torch.Tensor]:
    """The model's own state where a training wrapper saved it under an attribute (a LightningModule's
    ``self.model``: ``model.fc.weight``), decided by content: the one prefix under which the head's
    weight is found and under which every key is."""
    if f"{head}.weight" in state or f"{head}.0.weight" in state:
        return state
    suffix = f".{head}.weight"
    found = {k[:len(k) - len(suffix) + 1] for k in state if k.endswith(suffix)}
    # A head-named layer inside the model (Inception's AuxLogits.fc) is not another model.
    prefixes = sorted(p for p in found if not any(p != q and p.startswith(q) for q in found))
    if len(prefixes) != 1:
        if len(prefixes) > 1:
            raise FastevalError(f"--weights {path} holds several models ({', '.join(p[:-1] for p in prefixes)}): "
                                f"save the one to evaluate with its state_dict()")
        return state
    (prefix,) = prefixes
    others = [k for k in state if not k.startswith(prefix)]
    if others:
        raise FastevalError(f"--weights {path}: the model's weights are under {prefix[:-1]!r}, beside {len(others)} "
                            f"other key(s) ({', '.join(others[:2])}): save {prefix[:-1]}.state_dict() alone")
    return _renamed(state, lambda key: key[len(prefix):] if key.startswith(prefix) else None)


AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def _without_aux_heads(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` less its auxiliary classifiers' weights: GoogLeNet and Inception v3 are built without them
    (in eval mode they never reach the output), while torchvision builds them by default and for every
    fine-tune of its pretrained weights, so most checkpoints of those models hold them."""
    prefixes = AUX_HEADS.get(arch)
    if not prefixes or not any(k.startswith(prefixes) for k in state):
        return state
    return _renamed(state, lambda key: None if key.startswith(prefixes) else key)


def _unwrap_sequential_head(state: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """Map ``head.N.weight``/``head.N.bias`` (a head saved as ``nn.Sequential(nn.Linear)``) to ``head.*``."""
    if f"{head}.weight" in state:
        return state
    pattern = re.compile(rf"^{re.escape(head)}\.(\d+)\.(weight|bias)$")
    indices = {m.group(1) for k in state if (m := pattern.match(k))}
    if len(indices) != 1:
        return state
    return _renamed(state, lambda key: f"{head}.{m.group(2)}" if (m := pattern.match(key)) else key)


def build_model(arch: str, weights: str | None = None, num_classes: int | None = None,
                check_only: bool = False) -> nn.Module:
    """A torchvision classifier in eval mode on the CPU.

    ``weights``: None (random init, head sized to ``num_classes``), ``"DEFAULT"`` (torchvision's
    pretrained weights) or a checkpoint path. The head's size must equal ``num_classes``
    when both are known. ``check_only``: a checkpoint is mapped, not read, and its model is left
    without values (its tensors on the meta device): every check of a real load, none of its reading
    (a sweep's check of every file). Only its structure may be used. A ``timm:NAME`` arch: ``_build_timm``.
    """
    if is_timm(arch):
        return _build_timm(arch, weights, num_classes, check_only)
    _check_arch(arch)
    if weights is None:
        if num_classes is None:
            raise FastevalError("num_classes is needed to build a model without --weights")
        return _construct(arch, num_classes).eval()
    if weights == "DEFAULT":
        import torchvision

        # The class count is in the weights' metadata: a dataset it cannot fit is refused before any download.
        categories = torchvision.models.get_model_weights(arch).DEFAULT.meta.get("categories")
        if categories:
            _check_classes(len(categories), num_classes, "torchvision's DEFAULT weights")
        try:
            with initialisers_skipped():  # torchvision's own build and load, less the init the load replaces
                model = torchvision.models.get_model(arch, weights="DEFAULT")
        except Exception as exc:
            raise FastevalError(f"cannot get torchvision's pretrained weights for {arch}: {exc}") from None
        head_classes = _head_classes(model, head_name(arch))
        _check_classes(head_classes, num_classes, "torchvision's DEFAULT weights")
        return model.eval()
    head = head_name(arch)
    state = _without_wrapper(read_state_dict(weights, mmap=check_only), head, weights)
    state = _without_aux_heads(arch, _unwrap_sequential_head(state, head))
    key = f"{head}.weight"
    if key not in state:
        raise FastevalError(
            f"--weights {weights} do not fit --arch {arch}: no classification head {key!r} in the checkpoint"
        )
    head_classes = int(state[key].shape[0])
    _check_classes(head_classes, num_classes, f"--weights {weights}")
    model = _construct_for_loading(arch, head_classes)
    expected = model.state_dict()
    try:
        mismatch = describe_mismatch(expected, state, *_strict_load_keys(model, expected, state))
        if mismatch:
            raise FastevalError(f"--weights {weights} do not fit --arch {arch}: {mismatch}")
        if check_only:
            return model.eval()
        # The loaded tensors become the model's, in the dtype and (contiguous) layout a plain
        # load_state_dict into a fresh model gives: an fp16 or channels-last checkpoint loads as fp32 NCHW.
        loaded = _renamed(state, lambda key: key)  # a copy, the modules' saved versions with it
        for key, value in loaded.items():
            loaded[key] = value.to(expected.get(key, value).dtype).contiguous()
        model.load_state_dict(loaded, strict=True, assign=True)
    except RuntimeError as exc:
        raise FastevalError(f"--weights {weights} do not fit --arch {arch}: {_load_error(exc)}") from None
    except ValueError as exc:  # MNASNet's, for a state without the modules' versions
        raise FastevalError(f"--weights {weights} do not fit --arch {arch}: {first_line(exc)} (the checkpoint "
                            f"lacks the modules' saved versions: save model.state_dict() itself, not a copy "
                            f"of it as a plain dict)") from None
    if _on_meta(model):  # a buffer the checkpoint does not hold (none in torchvision's classifiers)
        model = _construct(arch, head_classes)
        model.load_state_dict(state, strict=True)
    return model.eval()


def _build_timm(arch: str, weights: str | None, num_classes: int | None, check_only: bool) -> nn.Module:
    """``build_model`` for ``timm:NAME``: the same weights forms, class-count check and one-line errors."""
    from fasteval.model import timm_models

    if weights is None:
        if num_classes is None:
            raise FastevalError("num_classes is needed to build a model without --weights")
        return timm_models.create(arch, num_classes)
    if weights == "DEFAULT":
        # timm would silently replace a pretrained head of another size by a random one: refused before.
        classes = timm_models.pretrained_classes(arch)
        if classes:
            _check_classes(classes, num_classes, "timm's pretrained weights")
        model = timm_models.create(arch, pretrained=True)
        _check_classes(timm_models.head_classes(model), num_classes, "timm's pretrained weights")
        return model
    state = read_state_dict(weights, mmap=check_only)
    head_classes = timm_models.state_classes(arch, state, weights)
    _check_classes(head_classes, num_classes, f"--weights {weights}")
    try:
        return timm_models.load(arch, state, head_classes, check_only=check_only)
    except RuntimeError as exc:
        raise FastevalError(f"--weights {weights} do not fit --arch {arch}: {_load_error(exc)}") from None


def _load_error(exc: RuntimeError) -> str:
    """``load_state_dict``'s first error, not its heading ("Error(s) in loading state_dict for ResNet:")."""
    lines = message_lines(exc)
    heading = len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict")
    return (lines[1] if heading else first_line(exc))[:300]


def _construct_for_loading(arch: str, num_classes: int) -> nn.Module:
    """The architecture on the meta device, where building it initialises no weights (2 s for a ViT-B/16
    on this machine's CPU, 0.03 s there) since a checkpoint replaces them all; where an architecture
    cannot be built without real values (RegNets compute their widths with ``tolist``), on the CPU
    without its random init."""
    try:
        return _construct(arch, num_classes, device="meta")
    except Exception:
        return _construct(arch, num_classes, initialise=False)


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _strict_load_keys(model: nn.Module, expected: dict[str, torch.Tensor],
                      state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """The keys a strict ``model.load_state_dict(state)`` finds missing and unexpected, as torch decides
    them: the modules' own load hooks included (a BatchNorm fills the ``num_batches_tracked`` a state saved
    without the modules' versions lacks, as older checkpoints do; ViT's blocks rename their legacy MLP keys).
    Found by a non-strict load of meta stand-ins (the model's shapes where it has the key: shapes are
    compared apart), which replaces ``model``'s tensors with them: the real load follows."""
    stand_ins = _renamed(state, lambda key: key)  # the modules' saved versions decide what the hooks accept
    for key, value in stand_ins.items():
        like = expected.get(key, value)
        stand_ins[key] = torch.empty(like.shape, dtype=like.dtype, device="meta")
    result = model.load_state_dict(stand_ins, strict=False, assign=True)
    return result.missing_keys, result.unexpected_keys


def describe_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], missing: list[str],
                      unexpected: list[str], examples: int = 2) -> str:
    """Missing and unexpected keys (as a strict load finds them: ``_strict_load_keys``) and differently
    shaped ones, counted with a few examples ("" when none)."""
    shaped = [f"{k} {list(state[k].shape)} in the file, {list(v.shape)} in the model"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    parts = []
    for items, what in ((missing, "missing keys"), (unexpected, "unexpected keys"), (shaped, "other shapes")):
        if items:
            more = ", ..." if len(items) > examples else ""
            parts.append(f"{len(items)} {what} ({'; '.join(items[:examples])}{more})")
    return ", ".join(parts)


def _head_classes(model: nn.Module, head: str) -> int:
    module = model.get_submodule(head)
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def n_classes(n: int) -> str:
    """``1 class``, ``3 classes``: for messages."""
    return f"{n} class" if n == 1 else f"{n} classes"


def _check_classes(head_classes: int, num_classes: int | None, what: str) -> None:
    if num_classes is not None and head_classes != num_classes:
        raise FastevalError(
            f"{what} have a {head_classes}-class head but the dataset has {n_classes(num_classes)}"
            + ("; where DATA holds only some of the model's classes, give --classes" if head_classes > num_classes
               else "")
        )


def check_input_fits(model: nn.Module, arch: str, spec, input_hw: tuple[int, int]) -> None:
    """Refuse, before any work, a model that cannot take inputs of ``input_hw`` (AlexNet at 32x32,
    a ViT at another size than its own). The check runs the model on the meta device (shapes
    only, no compute); a failure there is confirmed by one real forward of one sample, so that
    an operator without a meta kernel is never blamed on the input. A small model takes the real
    forward alone. A pass is kept between runs (fasteval/model/meta_facts.py)."""
    from fasteval.model.meta_facts import remembered

    remembered("input_fits", model, {"input_hw": list(input_hw)}, lambda: _input_fits(model, arch, spec, input_hw))


def _input_fits(model: nn.Module, arch: str, spec, input_hw: tuple[int, int]) -> bool:
    """Meta device first, confirmed by a real forward of one sample; a small model, the real one alone
    (``footprint.cheap_forward``: it costs less than the meta device's first use)."""
    from torch.func import functional_call

    from fasteval.model.footprint import cheap_forward

    h, w = input_hw
    if not cheap_forward(model, input_hw):
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
        try:
            with torch.no_grad():
                functional_call(model, meta, (torch.zeros(1, 3, h, w, device="meta"),))
            return True
        except Exception:
            pass
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, h, w, device=device))
    except Exception as exc:
        sizes = f"--resize {spec.resize} --crop {spec.crop}" if spec.crop is not None else f"--resize {spec.resize}"
        raise FastevalError(f"--arch {arch} does not accept {h}x{w} inputs ({sizes}): {first_line(exc)}") from None
    finally:
        model.train(was_training)
    return True
