"""Ahead-of-time compiles of the fused kernels for real GPUs, on a machine without one.

Triton's interpreter (what the CPU tests run) accepts code that real code generation rejects,
so this compiles ``kernels/fused_metrics.py`` and ``kernels/resize_crop.py`` for CUDA targets with
``triton.compile``, as the JIT would on a GPU:

1. ``metrics_triton`` (or ``resize_crop_triton``) runs on CPU tensors under the interpreter with every
   Triton kernel of the module replaced by a recorder: the launches are captured exactly as the code
   makes them (arguments, constexprs, block shapes), never written down by hand; the resize kernel's
   with the block shapes its wrapper picks for a GPU, not the interpreter's. A kernel argument the
   launch does not pass fails loudly when it is bound.
2. A second copy of the module is loaded with the interpreter off, so its kernels are
   ``JITFunction``s; Triton's own binder turns each captured launch into the signature,
   constexprs and specialisation attributes (16-byte alignment, integers equal to 1 or divisible
   by 16) its JIT would use for a target, and ``triton.compile`` builds PTX and a cubin.
3. The bundled ``cuobjdump -res-usage`` reads registers and the stack frame (spills live there)
   from the cubin: ``CompiledKernel.n_regs``/``n_spills`` need a driver.

It leans on Triton's JIT internals (``create_function_from_signature``, ``JITFunction._pack_args``,
triton 3.8); ``aot_unavailable()`` says why it cannot run where they are missing.

Run as a script for the whole table: ``python tests/kernel_aot.py [--all]``. As a child process
(``--json``, cases on stdin) it compiles for the test, which splits the work over the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
LOGITS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LABELS = {"i32": torch.int32, "i64": torch.int64}
# One head width per BLOCK shape default_blocks picks (16..1024 columns), and a head narrower than the top-k.
CLASSES = [2, 16, 32, 64, 128, 256, 512, 1000]
BATCH = 256
KERNELS = os.path.join(os.path.dirname(__file__), os.pardir, "kernels")
KERNEL_FILE = os.path.join(KERNELS, "fused_metrics.py")
RESIZE_FILE = os.path.join(KERNELS, "resize_crop.py")
# The resize kernel's cases: output dtypes, filters, and image sets whose batch tap count K (the widest
# support, to a power of two) spans ImageNet-like batches (K 8) and large images (16 bilinear, 32 bicubic).
OUT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FILTERS = ("bilinear", "bicubic")
# A batch of one too: Triton makes an integer argument equal to 1 a compile-time constant (the kernel's ``batch``
# must not be one).
IMAGE_SETS = {"imagenet": [(375, 500), (333, 500), (500, 375), (281, 500)], "large": [(2000, 1500), (375, 500)],
              "one": [(333, 500)]}


def aot_unavailable() -> str | None:
    """Why ahead-of-time CUDA compiles cannot run here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as exc:
        return f"triton without AOT compile support: {exc}"
    if "nvidia" not in backends:
        return "triton has no CUDA backend"
    if not hasattr(JITFunction, "_pack_args"):
        return f"triton {triton.__version__}: its JIT binder differs from 3.8's"
    if not os.path.exists(_cuobjdump()):
        return "triton bundles no cuobjdump"
    return None


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _triton_kernels(module) -> dict:
    from triton.runtime.jit import KernelInterface

    return {name: obj for name, obj in vars(module).items() if isinstance(obj, KernelInterface)}


@contextlib.contextmanager
def _recorded(module, what: str) -> Iterator[list[tuple[str, tuple, dict]]]:
    """Every Triton kernel of ``module`` replaced by a recorder of its launches (name, args, kwargs) within
    the block; the launches, in the yielded list, must not be none."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"capturing {what}'s launches needs TRITON_INTERPRET=1 set before its module is imported")
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, args, kwargs))

    kernels = _triton_kernels(module)
    try:
        for name in kernels:
            setattr(module, name, Recorder(name))
        yield launches
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    if not launches:
        raise RuntimeError(f"{what} launched no Triton kernel")


def capture_launches(num_classes: int, logits: str, labels: str) -> list[tuple[str, tuple, dict]]:
    """The kernel launches ``metrics_triton`` makes for a [BATCH, num_classes] batch (interpreter, CPU)."""
    from fasteval.kernels import fused_metrics
    from fasteval.evaluation.metrics import TOPK

    with _recorded(fused_metrics, "metrics_triton") as launches:
        x = torch.zeros(BATCH, num_classes, dtype=LOGITS[logits])
        y = torch.zeros(BATCH, dtype=LABELS[labels])
        fused_metrics.metrics_triton(x, y, topk=TOPK, check_labels=False)
    return launches


def capture_resize_launches(interpolation: str, out_dtype: str, images: str) -> list[tuple[str, tuple, dict]]:
    """The launch ``resize_crop_triton`` makes for ``IMAGE_SETS[images]`` (Resize(256) + CenterCrop(224)),
    with the block shapes its wrapper picks for a GPU (interpreter, CPU; the kernel never runs)."""
    from fasteval.kernels import resize_crop

    blocks = resize_crop.default_blocks
    resize_crop.default_blocks = lambda out_h, out_w, k, longest, interpreted: blocks(out_h, out_w, k, longest, False)
    try:
        with _recorded(resize_crop, "resize_crop_triton") as launches:
            pictures = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in IMAGE_SETS[images]]
            resize_crop.resize_crop_triton(pictures, 256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                           interpolation=interpolation, out_dtype=OUT_DTYPES[out_dtype])
    finally:
        resize_crop.default_blocks = blocks
    return launches


@contextlib.contextmanager
def _interpreter_off():
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


def jit_module(path: str = KERNEL_FILE):
    """A private copy of a kernel file (default kernels/fused_metrics.py) whose kernels are real
    ``JITFunction``s."""
    name = "_" + os.path.splitext(os.path.basename(path))[0] + "_aot"
    with _interpreter_off():
        spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def _resources(cubin: bytes, kernel: str) -> dict:
    """Registers and stack frame (``-res-usage``); spills as the SASS's local stores and loads (STL/LDL):
    the kernel declares no local arrays, so every local access is a spill."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage, sass = (subprocess.run([_cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout
                       for flag in ("-res-usage", "-sass"))
    m = re.search(rf"Function {re.escape(kernel)}:\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage: no entry for {kernel}:\n{usage}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack_bytes": stack, "local_bytes": local, "shared_bytes": shared,
            "spill_stores": len(re.findall(r"\bSTL(?:\.\w+)*\s", sass)),
            "spill_loads": len(re.findall(r"\bLDL(?:\.\w+)*\s", sass))}


def compile_case(module, case: dict) -> list[dict]:
    """Every kernel launch of one case compiled for the case's target: a metrics case (classes, logits,
    labels) with ``module`` the JIT copy of fused_metrics.py, or a resize case (``kernel: resize_crop``:
    interpolation, out_dtype, images) with ``module`` that of resize_crop.py."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", TARGETS[case["target"]], 32)
    backend = make_backend(target)
    results = []
    if case.get("kernel") == "resize_crop":
        launches = capture_resize_launches(case["interpolation"], case["out_dtype"], case["images"])
    else:
        launches = capture_launches(case["classes"], case["logits"], case["labels"])
    for name, args, kwargs in launches:
        fn = getattr(module, name)
        names = [p.name for p in fn.params]
        bind = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = bind(*args, **kwargs)
        if list(bound) != names:
            raise RuntimeError(f"{name}: the launch binds {list(bound)}, the kernel takes {names}")
        options, signature, constexprs, attrs = fn._pack_args(backend, dict(kwargs), bound, specialization, options)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        declared = {p.name for p in fn.params if p.is_constexpr}  # not the integers specialised to 1
        blocks = {names[path[0]]: value for path, value in constexprs.items() if names[path[0]] in declared}
        ptx = compiled.asm["ptx"]
        results.append({**case, "kernel": name, "blocks": blocks, "num_warps": compiled.metadata.num_warps,
                        "ptx_bytes": len(ptx), "ptx_fma": len(re.findall(r"\bfma\.rn\.f(?:32|64)\b", ptx)),
                        "ptx_inexact_div": len(re.findall(r"\bdiv\.(?:full|approx)\.", ptx)),
                        **_resources(compiled.asm["cubin"], name)})
    return results


def all_cases() -> list[dict]:
    """The full product: every target, logits dtype, label dtype and head width."""
    return [{"target": t, "logits": lg, "labels": lb, "classes": c}
            for t in TARGETS for lg in LOGITS for lb in LABELS for c in CLASSES]


def covering_cases() -> list[dict]:
    """Per target, every head width once, the (logits, labels) pairs cycling so that each of the six
    appears: each dtype, label dtype and block shape is compiled for every target (24 compiles)."""
    pairs = [(lg, lb) for lg in LOGITS for lb in LABELS]
    cases = []
    for k, target in enumerate(TARGETS):
        for i, classes in enumerate(CLASSES):
            lg, lb = pairs[(i + 2 * k) % len(pairs)]
            cases.append({"target": target, "logits": lg, "labels": lb, "classes": classes})
    return cases


def resize_cases() -> list[dict]:
    """Per target both filters, with two output dtypes and two image sets; over the targets each (filter,
    dtype) pair once and each image set twice: every filter, output dtype, tap count K and a batch of one
    compiled in 6 compiles."""
    sets, dtypes = list(IMAGE_SETS), list(OUT_DTYPES)
    return [{"kernel": "resize_crop", "target": target, "interpolation": interpolation,
             "out_dtype": dtypes[(t + i) % len(dtypes)], "images": sets[(t + i) % len(sets)]}
            for t, target in enumerate(TARGETS) for i, interpolation in enumerate(FILTERS)]


def compile_cases(cases: list[dict], workers: int = 2) -> list[dict]:
    """Compile in ``workers`` child processes (the interpreter on for the capture, a fresh JIT copy each)."""
    chunks = [cases[i::workers] for i in range(workers) if cases[i::workers]]
    env = {**os.environ, "TRITON_INTERPRET": "1"}

    def child(chunk):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], input=json.dumps(chunk),
                             capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(f"AOT compile failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(len(chunks)) as pool:
        return [row for rows in pool.map(child, chunks) for row in rows]


def table(rows: list[dict]) -> str:
    import triton

    head = f"triton {triton.__version__}: fused metrics kernel, batch {BATCH}"
    lines = [head, "target  logits labels classes  BLOCK_B BLOCK_C  K KPAD  warps  regs  stack B  spill st/ld (SASS)"]
    for r in sorted(rows, key=lambda r: (r["target"], r["logits"], r["labels"], r["classes"])):
        b = r["blocks"]
        lines.append(f"{r['target']:7} {r['logits']:6} {r['labels']:6} {r['classes']:7}  {b.get('BLOCK_B', '-'):>7} "
                     f"{b.get('BLOCK_C', '-'):>7} {b.get('K', '-'):>2} {b.get('KPAD', '-'):>4}  {r['num_warps']:5} "
                     f"{r['regs']:5}  {r['stack_bytes']:7}  {r['spill_stores']:>5} / {r['spill_loads']}")
    return "\n".join(lines)


def resize_table(rows: list[dict]) -> str:
    import triton

    lines = [f"triton {triton.__version__}: resize + crop + normalize kernel, Resize(256) + CenterCrop(224)",
             "target  filter   out   images    BLOCK_R BLOCK_X  K  SCAN  warps  regs  stack B  spill st/ld (SASS)"]
    for r in sorted(rows, key=lambda r: (r["target"], r["interpolation"], r["out_dtype"])):
        b = r["blocks"]
        lines.append(f"{r['target']:7} {r['interpolation']:8} {r['out_dtype']:5} {r['images']:9} {b['BLOCK_R']:7} "
                     f"{b['BLOCK_X']:7} {b['K']:2} {b['SCAN']:5}  {r['num_warps']:5} {r['regs']:5}  "
                     f"{r['stack_bytes']:7}  {r['spill_stores']:>5} / {r['spill_loads']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="the full product (default: the covering set)")
    parser.add_argument("--json", action="store_true", help="child mode: cases as JSON on stdin, results on stdout")
    args = parser.parse_args()
    if args.json:
        modules, rows = {}, []
        for case in json.loads(sys.stdin.read()):
            path = RESIZE_FILE if case.get("kernel") == "resize_crop" else KERNEL_FILE
            if path not in modules:
                modules[path] = jit_module(path)
            rows += compile_case(modules[path], case)
        print(json.dumps(rows))
        return
    reason = aot_unavailable()
    if reason:
        sys.exit(f"cannot compile ahead of time: {reason}")
    metrics = all_cases() if args.all else covering_cases()
    rows = compile_cases(metrics + resize_cases(), workers=os.cpu_count() or 2)
    print(table([r for r in rows if r.get("kernel") != "_resize_crop_kernel"]))
    print(resize_table([r for r in rows if r.get("kernel") == "_resize_crop_kernel"]))


if __name__ == "__main__":
    main()
