"""Compiled-model caching and the ``--compile auto`` decision.

Artifacts: torch's own Inductor FX-graph and AOTAutograd caches (and Triton's kernel cache) live
in ``$FASTEVAL_CACHE/compile/torch-<version>/<device>/``. Their keys are computed by torch from the
traced graph (so the architecture and the autocast dtype), the inputs' shapes, dtypes and strides,
torch's and Triton's versions, the CUDA device and CUDA version, the CPU thread count and
Inductor's configuration: a changed precision, batch shape or architecture is a miss, never a wrong
reuse. The device folder adds what Inductor's key leaves out on the CPU: the CPU model and its
instruction-set flags (the C++ Inductor generates is built for the machine's ISA, so a cache on a
shared home folder must not cross machines).

Profiles: one small JSON per configuration (``profiles/<key>.json`` in the same folder), written by
fasteval after a run, records that configuration's measured batch times and compile costs and
whether its artifacts were written (a cheap hit test). They only inform the ``auto`` decision: a
stale profile can make a run slower, never wrong.

The decision (``decide``): compile when the model time it is expected to save exceeds what it is
expected to cost, ``batches x t_eager x (1 - 1/speedup) > compile_seconds``, where ``t_eager`` is
this configuration's measured eager batch time, ``speedup`` the compiled-over-eager model speedup
and ``compile_seconds`` the cost of compiling: a cold compile, or loading from the cache on a hit
(tracing the model again and loading the artifacts: about 2 s on the development CPU, not free).
Unmeasured values come from ``DEFAULTS``; a configuration's own measurements replace them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from fasteval.cache_dir import cache_base
from fasteval.choices import COMPILE_MODES
from fasteval.errors import FastevalError

PROFILE_VERSION = 3  # bump when FastModel's forward (what gets compiled), its compile options or its timings change
# (3: a GPU's eager batch time no longer carries the first call's setup)
RESNET18_LEAVES = 52  # leaf modules of torchvision's resnet18: the unit of DEFAULTS' compile times


@dataclass(frozen=True)
class DeviceDefaults:
    """What is assumed for a device kind until a configuration's own figures are measured."""

    speedup: float  # compiled / eager model throughput, same precision, channels-last
    cold_seconds: float  # a first compile of ResNet-18, scaled by the model's size
    hit_seconds: float  # a compile served by the cache: tracing + loading


DEFAULTS = {
    # Development CPU (2-core Zen 4, torch 2.14.1, ResNet-18, batch 32): compiled CL+bf16 105 images/s vs
    # eager CL+bf16 89 (../shared/FACTS.md: 1.18x); a first compile into an empty cache 41 s (12-18 s for
    # further shapes once Inductor's C++ kernels are cached); a cache hit 1.9 s of tracing and loading.
    "cpu": DeviceDefaults(speedup=1.18, cold_seconds=30.0, hit_seconds=2.5),
    # Not measured on a GPU yet: assumed, and replaced by each configuration's own measurements.
    "cuda": DeviceDefaults(speedup=1.3, cold_seconds=40.0, hit_seconds=3.0),
}


def resolve_compile_mode(value: bool | str) -> str:
    """``auto``, ``on`` or ``off``; ``True``/``False`` (the former ``compile`` flag) mean on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in COMPILE_MODES:
        raise FastevalError(f"unknown --compile {value!r}; choose from {', '.join(COMPILE_MODES)}")
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()[:48]


def _cpu_identity() -> tuple[str, str]:
    """(model name, instruction-set flags) from /proc/cpuinfo; empty where unreadable."""
    name = flags = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
    if not name:
        import platform

        name = platform.processor() or platform.machine()
    return name, flags


def device_tag(device: torch.device) -> str:
    """A folder name per device model: ``cuda-<name>-sm<cc>``, or ``cpu-<model>-<hash of ISA flags>``."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-{_slug(torch.cuda.get_device_name(device))}-sm{major}{minor}"
    name, flags = _cpu_identity()
    return f"{device.type}-{_slug(name)}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def compile_dir(device: torch.device) -> str:
    """Where this torch and device keep their compiled artifacts and profiles (under ``$FASTEVAL_CACHE``)."""
    return os.path.join(cache_base(), "compile", f"torch-{_slug(torch.__version__)}", device_tag(device))


def _user_inductor_dir() -> str | None:
    """``TORCHINDUCTOR_CACHE_DIR`` when the user chose it (torch writes its default there on first use)."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not chosen:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return None if os.path.abspath(chosen) == os.path.abspath(default_cache_dir()) else chosen


def use_compile_cache(device: torch.device) -> str:
    """Point Inductor's FX-graph and AOTAutograd caches and Triton's cache into ``compile_dir(device)``
    (a user's ``TORCHINDUCTOR_CACHE_DIR``/``TRITON_CACHE_DIR`` are kept) and switch both caches on (unless
    ``TORCHINDUCTOR_FX_GRAPH_CACHE``/``TORCHINDUCTOR_AUTOGRAD_CACHE`` say otherwise); returns the folder.
    Call before torch compiles anything; a FastevalError names the folder if it cannot be created."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    folder = _user_inductor_dir() or compile_dir(device)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise FastevalError(f"cannot create the compile cache {folder} (FASTEVAL_CACHE): "
                            f"{exc.strerror or exc}") from None
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        from torch._inductor.utils import clear_caches

        clear_caches()  # paths derived from the previous folder
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(folder, "triton"))
    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
        inductor_config.fx_graph_cache = True
    if "TORCHINDUCTOR_AUTOGRAD_CACHE" not in os.environ:
        functorch_config.enable_autograd_cache = True
    return folder


def profile_dir(device: torch.device) -> str:
    """The profiles' folder: beside the artifacts, so that deleting one deletes the other."""
    return os.path.join(_user_inductor_dir() or compile_dir(device), "profiles")


def model_signature(model: nn.Module) -> str:
    """A hash of the model's class and of its parameters' and buffers' names, shapes and dtypes: the
    architecture and head size, whatever the weights' values (compiled graphs take weights as inputs)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return h.hexdigest()[:16]


def leaf_modules(model: nn.Module) -> int:
    """Modules without children: a proxy for the graph's size (compile time grows with it)."""
    return sum(1 for m in model.modules() if next(m.children(), None) is None)


def configuration(model: nn.Module, device: torch.device, precision: str) -> dict:
    """What every measurement of a model here depends on: torch, the device model, precision, architecture
    and (on the CPU) the thread count. Compile profiles and the route's rates add their own parts."""
    key = {"torch": torch.__version__, "device": device_tag(device), "precision": precision,
           "model": f"{type(model).__qualname__}/{model_signature(model)}"}
    if device.type == "cpu":
        key["threads"] = torch.get_num_threads()
    return key


def config_key(model: nn.Module, device: torch.device, precision: str, example: torch.Tensor) -> dict:
    """Everything a compiled artifact depends on that fasteval chooses: the configuration, the batch shape
    and layout (on the CPU the thread count is the one Inductor's code is built for)."""
    return {"profile_version": PROFILE_VERSION, **configuration(model, device, precision),
            "input_shape": list(example.shape), "input_dtype": str(example.dtype).removeprefix("torch."),
            "channels_last": example.is_contiguous(memory_format=torch.channels_last)}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class Profile:
    """One configuration's measurements (seconds); None until measured."""

    key: dict = field(default_factory=dict)
    eager_batch_seconds: float | None = None
    compiled_batch_seconds: float | None = None
    cold_compile_seconds: float | None = None
    hit_compile_seconds: float | None = None
    artifacts: bool = False  # a compile of this configuration completed: its artifacts are cached


def _well_formed(kind: type, stored: dict) -> bool:
    """Each stored field in its field's form: a finite number >= 0 or None for a ``float | None`` field,
    a bool for a ``bool`` one (other fields are their readers' to check)."""
    for f in fields(kind):
        if f.name not in stored:  # the default serves
            continue
        value = stored[f.name]
        if "float" in str(f.type) and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf):
            return False
        if str(f.type) == "bool" and not isinstance(value, bool):
            return False
    return True


def load_profile(folder: str, key: dict, kind: type = Profile):
    """The stored profile of ``key`` (a ``kind`` dataclass with a ``key`` field: compile profiles, the
    route's rates, kept model checks), or an empty one (missing, unreadable, damaged or for another key)."""
    path = os.path.join(folder, key_hash(key) + ".json")
    with contextlib.suppress(OSError, ValueError, TypeError):
        with open(path) as f:
            stored = json.load(f)
        if isinstance(stored, dict) and stored.get("key") == key and _well_formed(kind, stored):
            return kind(**stored)
    return kind(key=key)


_UNWRITABLE: set[str] = set()  # cache folders this process could not write (the first one is reported)


def save_profile(folder: str, profile) -> None:
    """Write atomically (a temporary file renamed). A cache that cannot be written does not stop the run
    (profiles and kept checks only speed later runs up), but says so once a process, in one line naming
    the folder."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".profile-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(profile), f, indent=1, sort_keys=True)
            os.replace(tmp, os.path.join(folder, key_hash(profile.key) + ".json"))
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        if not _UNWRITABLE:
            print(f"fasteval: warning: cannot write the cache {folder} (FASTEVAL_CACHE): {exc.strerror or exc}; "
                  f"nothing this run measured or checked is kept, so later runs measure, check or assume it again",
                  file=sys.stderr)
        _UNWRITABLE.add(folder)


@dataclass(frozen=True)
class Decision:
    compile: bool
    reason: str
    expected_saving: float = 0.0  # seconds of model time
    expected_cost: float = 0.0  # seconds of compiling (cold) or loading (hit)


def decide(profile: Profile, device_kind: str, num_samples: int, batch_size: int, eager_batch_seconds: float,
           model_leaves: int = RESNET18_LEAVES) -> Decision:
    """The ``auto`` choice (module docstring): compile when the expected saving exceeds the expected cost."""
    defaults = DEFAULTS.get(device_kind, DEFAULTS["cpu"])
    batches = math.ceil(num_samples / batch_size)
    if profile.compiled_batch_seconds and profile.eager_batch_seconds:
        speedup, speedup_src = profile.eager_batch_seconds / profile.compiled_batch_seconds, "measured"
    else:
        speedup, speedup_src = defaults.speedup, "assumed"
    saving = batches * eager_batch_seconds * max(0.0, 1.0 - 1.0 / speedup)
    if profile.artifacts:
        cost, cost_src = profile.hit_compile_seconds or defaults.hit_seconds, "cache hit"
        if profile.hit_compile_seconds is None:
            cost_src += ", load time assumed"
    else:
        cost = profile.cold_compile_seconds or defaults.cold_seconds * model_leaves / RESNET18_LEAVES
        cost_src = "cold cache" + (", compile time assumed" if profile.cold_compile_seconds is None else "")
    figures = (f"{batches} batch(es) x {eager_batch_seconds:.2f} s eager x (1 - 1/{speedup:.2f} {speedup_src} "
               f"speedup) = {saving:.1f} s saved vs {cost:.1f} s to compile ({cost_src})")
    if saving > cost:
        return Decision(True, f"auto: compiled, it pays: {figures}", saving, cost)
    return Decision(False, f"auto: eager (channels-last + autocast), compiling would not pay: {figures}",
                    saving, cost)
