"""Importing torchvision without TorchDynamo (fasteval/model/torchvision_import.py), and the meta-device
checks that no longer import it once kept (fasteval/model/meta_facts.py). Each case runs in a fresh
interpreter: this one imported torchvision, and TorchDynamo with it, long ago."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torchvision_imports_without_dynamo_and_everything_still_works():
    """No TorchDynamo and no stand-in left after the import; torchvision's models build; roi_align's
    deferred function answers as the real one; torch.compile imports the real TorchDynamo afterwards."""
    got = _run("""
        import json, sys
        from fasteval.model.torchvision_import import import_torchvision
        import_torchvision()
        after = {"dynamo": "torch._dynamo" in sys.modules, "stand_in": "torch._dynamo.utils" in sys.modules}
        import torch, torchvision
        import importlib
        module = importlib.import_module("torchvision.ops.roi_align")
        model = torchvision.models.get_model("resnet18", num_classes=3).eval()
        with torch.no_grad():
            shape = list(model(torch.zeros(1, 3, 32, 32)).shape)
        after["dynamo_after_forward"] = "torch._dynamo" in sys.modules
        deferred = module.is_compile_supported("cpu")
        import torch._dynamo.utils as real
        compiled = torch.compile(lambda x: x * 2, backend="eager")(torch.ones(2)).tolist()
        print(json.dumps({**after, "shape": shape, "deferred": deferred, "real": real.is_compile_supported("cpu"),
                          "real_is_module": type(real).__name__ == "module", "compiled": compiled,
                          "models": len(torchvision.models.list_models(module=torchvision.models))}))
    """)
    assert got["dynamo"] is False and got["stand_in"] is False and got["dynamo_after_forward"] is False
    assert got["shape"] == [1, 3] and got["models"] > 50
    assert got["deferred"] == got["real"] and got["real_is_module"]
    assert got["compiled"] == [2.0, 2.0]


def test_the_stand_in_never_shadows_the_real_module():
    """Inside the window, importing the TorchDynamo package, or taking another name from its utils,
    gets the real module and value; afterwards the stand-in is gone either way."""
    got = _run("""
        import importlib, json, sys
        import torch
        from fasteval.model.torchvision_import import without_dynamo, STAND_IN

        seen = {}
        def other_name():
            from torch._dynamo.utils import counters
            seen["counters"] = type(counters).__name__
        without_dynamo(other_name)
        seen["after_other_name"] = type(sys.modules.get(STAND_IN)).__name__
        print(json.dumps(seen))
    """)
    assert got["counters"] == "defaultdict" and got["after_other_name"] == "module"
    got = _run("""
        import json, sys
        import torch
        from fasteval.model.torchvision_import import without_dynamo, STAND_IN

        seen = {}
        def call_it_meanwhile():  # the deferred function called while the stand-in is in place
            from torch._dynamo.utils import is_compile_supported
            seen["answer"] = is_compile_supported("cpu")
        without_dynamo(call_it_meanwhile)
        import torch._dynamo.utils as real
        print(json.dumps({**seen, "real": real.is_compile_supported("cpu"), "kind": type(real).__name__}))
    """)
    assert got["answer"] == got["real"] and got["kind"] == "module"
    got = _run("""
        import importlib, json, sys
        import torch
        from fasteval.model.torchvision_import import without_dynamo, STAND_IN
        without_dynamo(lambda: importlib.import_module("torch._dynamo"))
        import torch._dynamo.utils as utils
        print(json.dumps({"real": type(utils).__name__, "has": hasattr(utils, "counters"),
                          "compiled": torch.compile(lambda x: x + 1, backend="eager")(torch.zeros(1)).tolist()}))
    """)
    assert got == {"real": "module", "has": True, "compiled": [1.0]}


def test_meta_construction_matches_the_cpu_one_without_dynamo():
    """Building on the meta device skips the initialisers' values (the ops whose meta kernels import
    TorchDynamo) and gives the CPU construction's names, shapes and dtypes, for initialisers of every kind
    (kaiming normal, trunc_normal_, uniform, constants), and for architectures that compute on tensors
    while they are built (ConvNeXt's layer scale, Swin's and MaxViT's relative positions: CPU stand-ins)."""
    got = _run("""
        import json, sys
        from fasteval.model.torchvision_import import import_torchvision
        import_torchvision()
        from fasteval.model.models import _construct
        out = {}
        archs = ("resnet18", "vit_b_16", "mobilenet_v3_small", "squeezenet1_0", "efficientnet_b0", "convnext_tiny",
                 "swin_t", "swin_v2_t", "maxvit_t")
        metas = {arch: _construct(arch, 7, device="meta").state_dict() for arch in archs}
        out["dynamo"] = "torch._dynamo" in sys.modules  # before the CPU builds, which may import it
        for arch in archs:
            meta = {k: (list(v.shape), str(v.dtype), v.is_meta) for k, v in metas[arch].items()}
            cpu = {k: (list(v.shape), str(v.dtype), True) for k, v in _construct(arch, 7).state_dict().items()}
            out[arch] = meta == cpu and len(meta) > 10
        print(json.dumps(out))
    """)
    assert got == {"resnet18": True, "vit_b_16": True, "mobilenet_v3_small": True, "squeezenet1_0": True,
                   "efficientnet_b0": True, "convnext_tiny": True, "swin_t": True, "swin_v2_t": True,
                   "maxvit_t": True, "dynamo": False}


@pytest.mark.slow
def test_a_whole_fast_eval_never_imports_dynamo(small_data, weights_3cls, tmp_path):
    """Two fast evals in fresh interpreters with one FASTEVAL_CACHE: the first runs the model checks (on
    real samples: ResNet-18 at 32x32 is small), the second finds them kept; neither imports TorchDynamo,
    and both give the same counts. The reference command imports torchvision as a plain script does."""
    code = f"""
        import json, sys
        from fasteval.cli import main
        rc = main(["eval", {small_data!r}, "--weights", {weights_3cls!r}, "--resize", "40", "--crop", "32",
                   "--batch-size", "4", "--workers", "0", "--no-progress", "--compile", "off",
                   "--json", {str(tmp_path / "r.json")!r}] + sys.argv[1:])
        result = json.load(open({str(tmp_path / "r.json")!r}))
        print(json.dumps({{"rc": rc, "dynamo": "torch._dynamo" in sys.modules, "top1": result["correct_top1"],
                          "top5": result["correct_top5"]}}))
    """
    env = {"FASTEVAL_CACHE": str(tmp_path / "cache")}
    first, second, reference = _run(code, **env), _run(code, **env), _run(code.replace("+ sys.argv[1:]",
                                                                                     '+ ["--reference"]'), **env)
    assert first["rc"] == second["rc"] == reference["rc"] == 0
    assert first["dynamo"] is False and second["dynamo"] is False and reference["dynamo"] is True
    assert (first["top1"], first["top5"]) == (second["top1"], second["top5"]) == (reference["top1"], reference["top5"])
    assert sorted(os.listdir(tmp_path / "cache" / "meta"))  # the kept checks
