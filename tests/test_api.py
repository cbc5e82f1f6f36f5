"""fasteval.evaluate / fasteval.compare on a module of the caller's own, with the caller's own transform:
the counts and predictions of an independent plain loop, the module left as it was."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2
from torchvision import transforms as v1

import fasteval
from fasteval.cli import main


class TinyNet(nn.Module):
    """Not a torchvision model: a conv stem, global pooling and a two-layer head."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(nn.functional.adaptive_avg_pool2d(self.stem(x), 1))


def plain_loop(model: nn.Module, root: str, transform) -> dict:
    """The tutorial's loop, written here independently: ImageFolder, DataLoader, eager fp32, torch.max/topk."""
    model = copy.deepcopy(model).eval()
    loader = DataLoader(datasets.ImageFolder(root, transform=transform), batch_size=5)
    predictions, top1, top5 = [], 0, 0
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            predicted = torch.max(logits, 1).indices
            predictions += predicted.tolist()
            top1 += int((predicted == labels).sum())
            k = min(5, logits.shape[1])
            top5 += int((logits.topk(k, 1).indices == labels[:, None]).any(1).sum())
    return {"predictions": predictions, "top1": top1, "top5": top5}


def plan_route(result) -> str:
    return result.plan["route"]["value"]


TRANSFORMS = {
    "v2 bicubic, other sizes and stats": v2.Compose([
        v2.Resize(50, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(40), v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5, 0.4, 0.3], [0.2, 0.3, 0.25])]),
    "v1 bilinear, no crop": v1.Compose([v1.Resize(36), v1.CenterCrop([36, 36]), v1.ToTensor(),
                                        v1.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]),
    "not reproduced: a fixed-size squash and a flip": v1.Compose([
        v1.Resize((40, 40)), v1.RandomHorizontalFlip(p=1.0), v1.ToTensor(), v1.Normalize([0.5] * 3, [0.5] * 3)]),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_evaluate_gives_the_plain_loops_counts_and_leaves_the_module(name, varied_data):
    transform = TRANSFORMS[name]
    model = TinyNet(4).train()  # in training mode, as a notebook may leave it
    before = copy.deepcopy(model.state_dict())
    expected = plain_loop(model, varied_data, transform)
    result = fasteval.evaluate(model, varied_data, transform=transform, batch_size=4, workers=0, progress=False,
                               compile="off")  # the fast path (12 images: the route would send them to the reference)
    assert plan_route(result) == "fast"
    assert (result.correct_top1, result.correct_top5, result.samples) == (expected["top1"], expected["top5"], 12)
    assert result.run.predictions.tolist() == expected["predictions"]
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu" and next(model.parameters()).dtype == torch.float32
    plan = result.plan
    if name.startswith("not reproduced"):  # run as given, on the fast path, exact by the recheck
        assert plan["preprocessing"]["value"].startswith("custom:") and plan["exact"]["value"] is True
        assert plan["loader"]["value"] == "the transform given, in DataLoader workers"
    else:
        assert plan["preprocessing"]["reason"].startswith("the transform given, recognised as")
        assert len(result.per_class) == 4


def test_compare_and_reference(varied_data):
    model = TinyNet(4)
    transform = TRANSFORMS["v1 bilinear, no crop"]
    both = fasteval.compare(model, varied_data, transform=transform, batch_size=4, workers=0, progress=False,
                            compile="off")
    assert both["validation"]["flipped"] == 0 and both["fast"].correct_top1 == both["reference"].correct_top1
    ref = fasteval.evaluate(model, varied_data, transform=transform, reference=True, workers=0, progress=False)
    assert ref.plan["precision"]["value"] == "fp32" and ref.correct_top1 == both["reference"].correct_top1
    assert ref.loss == pytest.approx(both["reference"].loss, rel=1e-6)


def test_to_dict_has_the_commands_json_keys(small_data, weights_3cls, tmp_path):
    import torchvision

    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(weights_3cls, weights_only=True))
    transform = v1.Compose([v1.Resize(40), v1.CenterCrop(32), v1.ToTensor(),
                            v1.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    result = fasteval.evaluate(model, small_data, transform=transform, batch_size=8, workers=0, progress=False)
    out = tmp_path / "r.json"
    assert main(["eval", small_data, "--weights", weights_3cls, "--resize", "40", "--crop", "32", "--batch-size", "8",
                 "--workers", "0", "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(result.to_dict()) == set(report)
    assert result.correct_top1 == report["correct_top1"] and result.correct_top5 == report["correct_top5"]


def test_bad_arguments_are_one_line_errors(small_data):
    from fasteval.errors import FastevalError

    with pytest.raises(FastevalError, match="model must be a torch.nn.Module"):
        fasteval.evaluate(lambda x: x, small_data)
    with pytest.raises(FastevalError, match="dataset folder not found"):
        fasteval.evaluate(TinyNet(3), "/nonexistent/data")
    with pytest.raises(FastevalError, match=r"transform: expected a 3-channel image tensor \(C, H, W\)"):
        fasteval.evaluate(TinyNet(3), small_data, transform=v1.Compose([v1.Resize((40, 30)), v1.Grayscale()]))


def test_a_non_square_transform_runs_and_a_size_following_one_is_refused(varied_data):
    """A (40, 30) squash run as given on the fast path: the plain loop's counts. A transform whose output size
    follows the image's (no crop on varied sizes): one line, before any work (the caller's loop fails too)."""
    from fasteval.errors import FastevalError

    model = TinyNet(4)
    squash = v1.Compose([v1.Resize((40, 30)), v1.ToTensor(), v1.Normalize([0.5] * 3, [0.5] * 3)])
    result = fasteval.evaluate(model, varied_data, transform=squash, workers=0, progress=False, compile="off")
    expected = plain_loop(model, varied_data, squash)
    assert plan_route(result) == "fast" and result.correct_top1 == expected["top1"]
    assert result.run.predictions.tolist() == expected["predictions"]
    with pytest.raises(FastevalError, match=r"transform: its output size follows the image's \(40x\d+ from .*, "
                                            r"40x\d+ from .*\), so no batch can be stacked"):
        fasteval.evaluate(model, varied_data, transform=v1.Compose([v1.Resize(40), v1.Grayscale(3), v1.ToTensor()]))


def test_the_public_names_and_a_light_import():
    assert {"evaluate", "compare", "Result"} <= set(fasteval.__all__)
    code = "import sys, fasteval; assert 'torch' not in sys.modules; print(fasteval.evaluate.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "fasteval.api"


def test_argument_checks_and_the_default_transform_note(small_data, capsys):
    from fasteval.errors import FastevalError

    for bad in (0, -1, 2.5, True):
        with pytest.raises(FastevalError, match="batch_size must be an integer >= 1"):
            fasteval.evaluate(TinyNet(3), small_data, batch_size=bad)
    with pytest.raises(FastevalError, match="workers must be an integer >= 0 or None"):
        fasteval.evaluate(TinyNet(3), small_data, workers=-1)
    result = fasteval.evaluate(TinyNet(3), small_data, workers=0, progress=False, compile="off")
    assert "note: transform=None: torchvision's ImageNet eval transform" in capsys.readouterr().err
    assert result.plan["preprocessing"]["reason"] == "the default: torchvision's ImageNet eval transform"


def test_a_crop_larger_than_the_resize_runs_as_given(varied_data):
    """torchvision pads such a crop: not a spec fasteval's decoders reproduce, so the transform runs as given."""
    transform = v1.Compose([v1.Resize(30), v1.CenterCrop(36), v1.ToTensor(), v1.Normalize([0.5] * 3, [0.5] * 3)])
    model = TinyNet(4)
    result = fasteval.evaluate(model, varied_data, transform=transform, workers=0, progress=False, compile="off")
    assert result.plan["loader"]["value"] == "the transform given, in DataLoader workers"
    assert result.correct_top1 == plain_loop(model, varied_data, transform)["top1"]


def test_sweep_gives_each_models_own_result_with_one_compile(varied_data):
    """Modules and state_dicts of one architecture: each result is evaluate()'s of that model alone; the
    best and the paired tests as the checkpoint sweep's --json has them; the modules left as they were."""
    transform = TRANSFORMS["v1 bilinear, no crop"]
    models = {"a": TinyNet(4), "b": TinyNet(4), "c": None}
    with torch.no_grad():
        models["b"].head[-1].bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # predicts class 0 almost always
    state = copy.deepcopy(models["a"].state_dict())
    state["head.3.weight"] = state["head.3.weight"].flip(0)
    models["c"] = state
    before = copy.deepcopy(models["b"].state_dict())
    run = dict(transform=transform, batch_size=4, workers=0, progress=False, compile="off")
    swept = fasteval.sweep(models, varied_data, **run)
    assert swept.names == ["a", "b", "c"] and len(swept.results) == 3
    c_module = TinyNet(4)
    c_module.load_state_dict(state)
    for result, module in zip(swept.results, (models["a"], models["b"], c_module)):
        alone = plain_loop(module, varied_data, transform)
        assert (result.correct_top1, result.correct_top5) == (alone["top1"], alone["top5"])
        assert result.run.predictions.tolist() == alone["predictions"]
    tops = [(r.correct_top1, r.correct_top5, -r.loss) for r in swept.results]
    assert swept.best == max(range(3), key=lambda i: (tops[i], -i))
    report = swept.to_dict()
    assert report["best_weights"] == swept.names[swept.best] and report["checkpoints"][swept.best]["best"]
    assert all(torch.equal(v, before[k]) for k, v in models["b"].state_dict().items())


def test_sweep_refuses_other_architectures_and_bad_entries(small_data):
    from fasteval.errors import FastevalError

    with pytest.raises(FastevalError, match="model 2 is not the same architecture as model 1"):
        fasteval.sweep([TinyNet(3), TinyNet(4)], small_data)
    with pytest.raises(FastevalError, match="models: model 2 is a str"):
        fasteval.sweep([TinyNet(3), "ckpt.pt"], small_data)
    with pytest.raises(FastevalError, match="the first .* must be a torch.nn.Module"):
        fasteval.sweep([TinyNet(3).state_dict()], small_data)
    with pytest.raises(FastevalError, match="models is empty"):
        fasteval.sweep([], small_data)


def test_evaluate_under_torchrun_is_the_one_process_result(varied_data, tmp_path):
    """Two gloo ranks on the CPU, from a script: with no process group (the library makes one and removes it) and
    in the script's own (left initialised); every rank gets the whole run's result, equal to one process's; a rank
    with other weights stops every rank with one line; sweep() is refused."""
    import os
    from pathlib import Path

    transform = TRANSFORMS["v1 bilinear, no crop"]
    alone = plain_loop(TinyNet(4), varied_data, transform)
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    script = str(Path(__file__).with_name("api_rank.py"))
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             script, varied_data, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**clean, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # no rank left behind: torchrun and its ranks are one process group
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the ranks did not finish in 240 s: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key in ("own_group", "own_group_again", "script_group", "reference"):
            got = found[key]
            assert (got["top1"], got["top5"], got["samples"]) == (alone["top1"], alone["top5"], 12), key
            assert got["predictions"] == alone["predictions"] and got["per_rank"] == [6, 6], key
        assert not found["initialised_after_own"] and found["initialised_after_script"]
        assert found["script_group"]["loss"] == pytest.approx(found["reference"]["loss"], rel=1e-2)  # bf16 here
        assert found["compare"]["flipped"] == 0 and found["compare"]["fast"]["top1"] == alone["top1"]
        assert found["other_weights"].startswith("rank 1: this rank holds other model weights than rank 0")
        assert "sweep() runs in one process" in found["sweep"]


def test_classes_names_the_heads_classes_for_a_subset(varied_data):
    """A 6-class head and a dataset of 4 of its classes: labels are the head's indices, as a tutorial's loop with a
    target_transform gives them."""
    from fasteval.errors import FastevalError

    names = ["class_003", "x", "class_000", "class_002", "y", "class_001"]
    transform = TRANSFORMS["v1 bilinear, no crop"]
    model = TinyNet(6)
    folder = datasets.ImageFolder(varied_data)
    relabel = [names.index(c) for c in folder.classes]
    data = datasets.ImageFolder(varied_data, transform=transform, target_transform=relabel.__getitem__)
    with torch.no_grad():
        logits = torch.cat([model.eval()(x) for x, _ in DataLoader(data, batch_size=5)])
    labels = torch.tensor([relabel[t] for t in folder.targets])
    result = fasteval.evaluate(model, varied_data, transform=transform, classes=names, workers=0, progress=False,
                               compile="off")
    assert result.correct_top1 == int((logits.argmax(1) == labels).sum())
    assert result.run.predictions.tolist() == logits.argmax(1).tolist()
    assert [c["class"] for c in result.per_class] == names
    with pytest.raises(FastevalError, match="classes must be a class count >= 1 or a list of distinct class names"):
        fasteval.evaluate(model, varied_data, classes=["a", "a"])


def test_errors_name_the_keyword_arguments_not_the_commands_flags(varied_data):
    from fasteval.errors import FastevalError

    with pytest.raises(FastevalError, match=r"^classes=2: DATA's classes are named \(4 of them\), not numbered: give "
                                            r"classes=FILE"):
        fasteval.evaluate(TinyNet(4), varied_data, classes=2)
    with pytest.raises(FastevalError, match=r"^device must be auto, cpu, cuda or cuda:N, got 'gpu'$"):
        fasteval.evaluate(TinyNet(4), varied_data, device="gpu")  # a flag's following word is not its value
    if not torch.cuda.is_available():
        with pytest.raises(FastevalError, match=r"^device='cuda:3': CUDA is not available on this machine$"):
            fasteval.evaluate(TinyNet(4), varied_data, device="cuda:3")


def test_sweep_with_a_transform_run_as_given_decodes_each_pass(varied_data):
    """A transform fasteval does not reproduce makes no uint8 pixels to keep: the sweep decodes again for each
    model (the plan says so) and each result is still the plain loop's."""
    transform = TRANSFORMS["not reproduced: a fixed-size squash and a flip"]
    models = [TinyNet(4), TinyNet(4)]
    with torch.no_grad():
        models[1].head[-1].bias.add_(torch.tensor([0.0, 2.0, 0.0, 0.0]))
    swept = fasteval.sweep(models, varied_data, transform=transform, workers=0, progress=False, compile="off")
    assert swept.to_dict()["decoded"]["placement"] == "redecode"
    assert "makes no uint8 pixels to keep" in swept.to_dict()["plan"]["loader"]["reason"]
    for result, model in zip(swept.results, models):
        alone = plain_loop(model, varied_data, transform)
        assert result.correct_top1 == alone["top1"] and result.run.predictions.tolist() == alone["predictions"]
