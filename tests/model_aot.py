"""What ``torch.compile`` makes of fasteval's fast model on a GPU, generated and compiled on a machine
without one.

1. In a child process, ``fake_gpu.install`` makes torch see one GPU of the target's compute capability.
   The fast model is built as the fast path builds it (``build_model``, ``keep_head_fp32``, ``FastModel``:
   channels-last, bf16 autocast, the head in fp32), moved to the fake device under ``FakeTensorMode``,
   and compiled as ``FastModel._compile`` does (``dynamic=False``, ``COMPILE_OPTIONS``) by a backend that
   runs TorchInductor's ``compile_fx`` and returns the graph uncompiled: Inductor writes its Triton
   kernels (recorded, never loaded) and the wrapper that calls them and cuDNN/cuBLAS (``extern_kernels``).
2. In other children, each kernel is loaded into Inductor's own autotuner, whose compile metadata and
   options for a config are the ones its precompile step would use, and ``triton.compile`` builds the
   cubin for the target; ``cuobjdump`` reads registers, the stack frame and spill stores/loads from it
   (``kernel_aot._resources``).

This checks what Inductor generates and Triton compiles for the targets: a kernel that fails to compile
for sm_80, sm_90 or sm_100, or that spills. It cannot check what only a GPU shows: cuDNN's and cuBLAS's
choices, which autotuned config wins, launches, numbers. Private torch internals it relies on:
``AsyncCompile.triton``, ``GraphLowering.save_output_code``, ``CachingAutotuner._create_compile_meta`` and
``_create_compile_options`` (torch 2.14), and fake_gpu.py's. ``model_aot_unavailable()`` says where they are missing.

``python tests/model_aot.py [--targets sm_80,sm_90,sm_100] [--every-config]``: the table (by default every
target, the heaviest config of each kernel: the most elements per thread, where registers run out first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from kernel_aot import TARGETS, _resources, aot_unavailable  # noqa: E402

ARCH, BATCH, SIZE, PRECISION = "resnet18", 64, 224, "bf16"  # the default command's shape on a GPU
CHILD_SECONDS = 600  # a child that hangs fails the run (10x a 2-core machine's time)


def model_aot_unavailable() -> str | None:
    """Why the model's CUDA code cannot be generated and compiled here, or None."""
    reason = aot_unavailable()
    if reason:
        return reason
    try:
        from torch._inductor.async_compile import AsyncCompile
        from torch._inductor.graph import GraphLowering
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError as exc:
        return f"torch without the Inductor internals this check uses: {exc}"
    for owner, name in ((AsyncCompile, "triton"), (GraphLowering, "save_output_code"),
                        (CachingAutotuner, "_create_compile_meta"), (CachingAutotuner, "_create_compile_options")):
        if not hasattr(owner, name):
            return f"torch's Inductor has no {owner.__name__}.{name}"
    return None


def codegen(capability: tuple[int, int]) -> dict:
    """Child: the Triton kernels and the wrapper Inductor generates for the fast model on such a GPU."""
    import fake_gpu

    fake_gpu.install(capability)
    import torch
    import torch._inductor.config as inductor_config
    from torch._inductor import async_compile
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.graph import GraphLowering
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fasteval.evaluation.fast import keep_head_fp32
    from fasteval.model.inference import COMPILE_OPTIONS, FastModel
    from fasteval.model.models import build_model

    inductor_config.compile_threads = 1  # no worker pool: the kernels are recorded, not compiled, here
    inductor_config.fx_graph_cache = False  # always generate
    kernels: dict[str, str] = {}
    wrappers: list[str] = []
    async_compile.AsyncCompile.triton = lambda self, name, source, device_str="cuda": kernels.setdefault(name, source)
    GraphLowering.save_output_code = staticmethod(wrappers.append)

    def backend(graph, example_inputs):
        compile_fx(graph, example_inputs, config_patches=COMPILE_OPTIONS)
        return graph.forward  # runs on fake tensors: nothing compiled is ever called

    start = time.perf_counter()
    model = build_model(ARCH, None, num_classes=1000)
    head_fp32 = keep_head_fp32(model)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fast = FastModel(model, torch.device("cuda"), PRECISION, "off")
        x = torch.empty(BATCH, 3, SIZE, SIZE, device="cuda").contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = torch.compile(fast._eager, dynamic=False, backend=backend)(x)
        out = {"shape": list(logits.shape), "dtype": str(logits.dtype), "device": logits.device.type}
    return {"capability": list(capability), "seconds": time.perf_counter() - start, "kernels": kernels,
            "wrapper": "\n".join(wrappers), "logits": out, "head_fp32": head_fp32}


def _elements_per_thread(config) -> float:
    blocks = 1
    for name, value in config.kwargs.items():
        if name.endswith("BLOCK"):
            blocks *= value
    return blocks / (config.num_warps * 32)


def compile_kernels(target: str, kernels: dict[str, str], every_config: bool = False) -> list[dict]:
    """Child: each kernel's heaviest config (or every config) compiled for ``target`` as Inductor's
    precompile step would, with its registers and spills."""
    import fake_gpu

    capability = divmod(TARGETS[target], 10)
    fake_gpu.install(capability)
    import triton
    from torch._inductor.codecache import PyCodeCache
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for name, source in kernels.items():
        autotuner = getattr(PyCodeCache.load(source), name)  # Inductor's CachingAutotuner; nothing compiled yet
        configs = autotuner.configs if every_config else [max(autotuner.configs, key=_elements_per_thread)]
        for config in configs:
            meta = autotuner._create_compile_meta(config)
            options = autotuner._create_compile_options(config, meta)
            row = {"target": target, "kernel": name, "config": {**config.kwargs, "num_warps": config.num_warps,
                                                                 "num_stages": config.num_stages}}
            try:
                binary = triton.compile(ASTSource(autotuner.fn, meta["signature"], meta["constants"],
                                                  meta["configs"][0]),
                                        target=GPUTarget("cuda", TARGETS[target], 32), options=options)
                row.update(_resources(binary.asm["cubin"], binary.metadata.name))
            except Exception as exc:  # reported, not raised: every kernel's outcome is in the table
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            rows.append(row)
    return rows


def _child(args: list[str], stdin: str | None = None) -> object:
    """Run this file's ``--child`` stage in a fresh interpreter (the fake GPU is per process), with its own
    Inductor and Triton caches: nothing is reused from another run."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(scratch, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(scratch, "triton"), "TRITON_INTERPRET": "0"}
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], input=stdin,
                              capture_output=True, text=True, env=env, timeout=CHILD_SECONDS)
    if done.returncode:
        raise RuntimeError(f"model_aot {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.rsplit("\n@@json@@", 1)[1])


def generate(target: str) -> dict:
    return _child(["codegen", target])


def compile_generated(target: str, kernels: dict[str, str], every_config: bool = False, workers: int = 2) -> list[dict]:
    """The kernels split over ``workers`` children."""
    names = sorted(kernels)
    chunks = [names[i::workers] for i in range(workers) if names[i::workers]]
    flag = ["--every-config"] if every_config else []

    def run(chunk):
        return _child(["compile", target, *flag], json.dumps({n: kernels[n] for n in chunk}))

    with ThreadPoolExecutor(len(chunks)) as pool:
        return [row for rows in pool.map(run, chunks) for row in rows]


def table(rows: list[dict]) -> str:
    lines = [f"{'target':7} {'kernel':62} {'config':44} regs stack spills(st/ld)"]
    for r in rows:
        config = ",".join(f"{k}={v}" for k, v in r["config"].items())
        found = (f"ERROR {r['error'][:160]}" if "error" in r else
                 f"{r['regs']:4} {r['stack_bytes']:5} {r['spill_stores']}/{r['spill_loads']}")
        lines.append(f"{r['target']:7} {r['kernel'][:62]:62} {config[:44]:44} {found}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--every-config", action="store_true")
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args()
    if args.child:
        stage, target = args.child[0], args.child[1]
        if stage == "codegen":
            out = codegen(divmod(TARGETS[target], 10))
        else:
            out = compile_kernels(target, json.loads(sys.stdin.read()), args.every_config)
        print("\n@@json@@" + json.dumps(out))
        return
    for target in args.targets.split(","):
        generated = generate(target)
        rows = compile_generated(target, generated["kernels"], args.every_config)
        print(table(rows))
        print(f"{target}: generated in {generated['seconds']:.1f} s, {len(generated['kernels'])} Triton kernels, "
              f"{generated['wrapper'].count('extern_kernels.')} extern calls, {len(rows)} compiled, "
              f"{sum('error' in r for r in rows)} errors, max regs {max((r.get('regs', 0) for r in rows), default=0)}")


if __name__ == "__main__":
    main()
