"""``--arch timm:NAME``: timm's models by name, their weights forms, and the preprocessing of their pretrained
configuration, each checked against timm's own code (its eval transform, its checkpoint loader) and a plain
fp32 loop."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.data import create_transform, resolve_data_config  # noqa: E402
from timm.models import load_checkpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from fasteval.data.samples import discover  # noqa: E402
from fasteval.data.synth import make_image  # noqa: E402
from fasteval.errors import FastevalError  # noqa: E402
from fasteval.evaluation.fast import FastOptions, evaluate_fast  # noqa: E402
from fasteval.model.models import build_model, head_name  # noqa: E402
from fasteval.model.timm_models import is_timm, timm_spec  # noqa: E402

# Bilinear, ImageNet's mean and std, crop_pct 0.875 at 224 (torchvision's weights as timm names them).
IMAGENET_LIKE = "resnet18.tv_in1k"
# Bicubic, mean and std 0.5, crop_pct 1.0 at its 288 px test size (224 px in training).
OTHER = "resnet18d.ra4_e3600_r224_in1k"
# Bilinear, crop_pct 0.95 at 160 px, mean and std 0.5: the smallest model timm has a configuration for.
TINY = "test_resnet.r160_in1k"
SQUASH = "convnext_tiny.fb_in22k_ft_in1k_384"
# Odd sizes (width, height): portrait, landscape, square, smaller than every crop (upscaled), prime sides.
SIZES = [(301, 199), (97, 413), (288, 288), (61, 47), (523, 331), (224, 225)]


def _timm_eval(name: str):
    """timm's own eval transform for ``name``, resolved as its validate.py resolves it."""
    model = timm.create_model(name, pretrained=False)
    return create_transform(**resolve_data_config({}, model=model, use_test_size=True))


def test_is_timm():
    assert is_timm("timm:resnet18") and not is_timm("resnet18")


@pytest.mark.parametrize("name", [IMAGENET_LIKE, OTHER, TINY])
def test_spec_is_timms_eval_transform(name):
    """The spec's reference transform gives timm's eval transform's tensors, to the bit, on images of odd sizes."""
    config = resolve_data_config({}, model=timm.create_model(name), use_test_size=True)
    spec = timm_spec(f"timm:{name}")
    assert spec.interpolation == config["interpolation"] and spec.crop == config["input_size"][-1]
    theirs, ours = _timm_eval(name), spec.torchvision_transform()
    for i, size in enumerate(SIZES):
        image = make_image(i, i % 3, 4, i, size)
        expected = theirs(image)
        assert expected.shape == (3, spec.crop, spec.crop)
        assert torch.equal(ours(image), expected), (name, size)


def test_configurations_differ_as_chosen():
    """The two configurations the parity tests use are what they say (else the tests would test less)."""
    imagenet, other = timm_spec(f"timm:{IMAGENET_LIKE}"), timm_spec(f"timm:{OTHER}")
    assert (imagenet.resize, imagenet.crop, imagenet.interpolation) == (256, 224, "bilinear")
    assert (other.resize, other.crop, other.interpolation, other.mean) == (288, 288, "bicubic", (0.5, 0.5, 0.5))


def test_untagged_name_takes_timms_default_configuration():
    cfg = timm.create_model("resnet18").pretrained_cfg
    spec = timm_spec("timm:resnet18")
    assert spec == timm_spec(f"timm:resnet18.{cfg['tag']}") and spec.name == f"timm:resnet18.{cfg['tag']}"


def test_squash_crop_mode_refused_in_one_line():
    with pytest.raises(FastevalError, match="crop mode 'squash'") as info:
        timm_spec(f"timm:{SQUASH}")
    assert "\n" not in str(info.value) and "--preset" in str(info.value)


def _plain_loop(data: str, name: str, model: torch.nn.Module) -> tuple[int, int, torch.Tensor]:
    """A plain fp32 loop with timm's resolved transform: (correct top-1, correct top-5, predictions)."""
    dataset = ImageFolder(data, transform=_timm_eval(name))
    top1 = top5 = 0
    predictions = []
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch_size=5, shuffle=False):
            logits = model(images)
            _, predicted = torch.max(logits, 1)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += int((predicted == labels).sum())
            top5 += int((top == labels[:, None]).any(dim=1).sum())
            predictions.append(predicted)
    return top1, top5, torch.cat(predictions)


def _varied_model(name: str, root: str, num_classes: int) -> torch.nn.Module:
    """A seeded random model whose head is centred on ``root``'s features (under timm's transform): a random
    init alone predicts one class for every image, which would make a comparison of predictions say little."""
    torch.manual_seed(1)
    model = timm.create_model(name, num_classes=num_classes).eval()
    images = torch.stack([image for image, _ in ImageFolder(root, transform=_timm_eval(name))])
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        head = model.get_classifier()
        head.bias.copy_(-head.weight @ features.mean(0))
        assert len(set(model(images).argmax(1).tolist())) > 1
    return model


@pytest.mark.parametrize("name,data", [(TINY, "varied_data"), (TINY, "kinds_data"), (OTHER, "varied_data")])
def test_fast_path_gives_the_plain_loops_counts(name, data, request, tmp_path):
    """A timm model by name, from a saved state_dict, through the fast path with ``timm_spec``: the plain fp32
    loop's counts and predictions, sample by sample."""
    root = request.getfixturevalue(data)
    samples = discover(root)
    trained = _varied_model(name, root, samples.num_classes)
    weights = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), weights)
    arch = f"timm:{name}"
    model = build_model(arch, str(weights), samples.num_classes)
    result = evaluate_fast(samples, model, timm_spec(arch), progress=False,
                           options=FastOptions(precision="fp32", compile=False, batch_size=4, workers=0))
    top1, top5, predictions = _plain_loop(root, name, trained)
    assert (result.samples, result.correct_top1, result.correct_top5) == (len(predictions), top1, top5)
    assert torch.equal(result.predictions, predictions)


def _timm_training_checkpoint(model, ema_model) -> dict:
    """What timm's train.py (its CheckpointSaver) writes: the weights beside the run's state."""
    return {"epoch": 3, "arch": TINY, "state_dict": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
            "version": 2, "args": argparse.Namespace(lr=0.1, model=TINY), "metric": 12.5,
            "state_dict_ema": ema_model.state_dict()}


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


@pytest.fixture(scope="module")
def two_models():
    torch.manual_seed(2)
    return timm.create_model(TINY, num_classes=3).eval(), timm.create_model(TINY, num_classes=3).eval()


@pytest.mark.parametrize("form,use_ema", [
    ("bare", False), ("state_dict", False), ("model", False), ("ddp", False), ("compiled_ddp", False),
    ("training", False), ("ema_only", True)])
def test_checkpoint_forms_load_as_timm_loads_them(form, use_ema, two_models, tmp_path):
    """Each form loads the weights timm's own ``load_checkpoint`` loads (its validate.py's choice: the plain
    weights of a training checkpoint, the EMA's where a file holds only those)."""
    model, ema = two_models
    state = model.state_dict()
    content = {"bare": state, "state_dict": {"state_dict": state}, "model": {"model": state},
               "ddp": _prefixed(state, "module."),
               "compiled_ddp": {"state_dict": _prefixed(state, "_orig_mod.module.")},
               "training": _timm_training_checkpoint(model, ema),
               "ema_only": {"state_dict_ema": ema.state_dict(), "epoch": 1}}[form]
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(content, path)
    expected = timm.create_model(TINY, num_classes=3)
    load_checkpoint(expected, str(path), use_ema=use_ema)
    loaded = build_model(f"timm:{TINY}", str(path), 3)
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(value, expected.state_dict()[key]) for key, value in loaded.state_dict().items())
    assert not loaded.training


def test_check_only_reads_no_values(two_models, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(two_models[0].state_dict(), path)
    model = build_model(f"timm:{TINY}", str(path), 3, check_only=True)
    assert model.get_submodule(head_name(f"timm:{TINY}")).weight.is_meta


def test_head_name_is_timms_classifier():
    for name in ("convnext_tiny", "vit_small_patch16_224.augreg_in21k_ft_in1k", TINY):
        model = timm.create_model(name)
        assert model.get_submodule(head_name(f"timm:{name}")) is model.get_classifier()


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_unknown_name():
    with pytest.raises(FastevalError) as info:
        build_model("timm:resnet181", None, 3)
    assert "unknown --arch timm:resnet181" in _one_line(info) and "timm:resnet18" in _one_line(info)


def test_unknown_tag_lists_the_tags():
    with pytest.raises(FastevalError) as info:
        timm_spec("timm:resnet18.nope")
    assert "'nope'" in _one_line(info) and "a1_in1k" in _one_line(info)


def test_wrong_class_count(two_models, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(two_models[0].state_dict(), path)
    with pytest.raises(FastevalError) as info:
        build_model(f"timm:{TINY}", str(path), 5)
    assert _one_line(info) == f"--weights {path} have a 3-class head but the dataset has 5 classes"


def test_weights_of_another_model(two_models, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(two_models[0].state_dict(), path)
    with pytest.raises(FastevalError) as info:
        build_model("timm:resnet10t", str(path), 3)
    assert _one_line(info).startswith(f"--weights {path} do not fit --arch timm:resnet10t: ")


def test_default_weights_with_another_class_count_refused_before_any_download(monkeypatch):
    """timm would give a pretrained model with a random head of the dataset's size: refused, no download."""
    create = timm.create_model

    def no_download(name, pretrained=False, **kwargs):
        assert not pretrained, "no download expected"
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.raises(FastevalError) as info:
        build_model(f"timm:{TINY}", "DEFAULT", 3)
    assert _one_line(info) == ("timm's pretrained weights have a 1000-class head but the dataset has 3 classes; where "
                               "DATA holds only some of the model's classes, give --classes")


def test_timm_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    for call in (lambda: build_model("timm:resnet18", None, 3), lambda: timm_spec("timm:resnet18"),
                 lambda: head_name("timm:resnet18")):
        with pytest.raises(FastevalError) as info:
            call()
        assert _one_line(info) == "--arch timm:resnet18: needs timm: pip install 'fasteval[timm]'"


def test_benchmark_against_timms_loader(small_data, capsys):
    """benchmarks/timm_validate.py on the small fixture: ``fasteval eval --arch timm:NAME`` (its default, timm's
    configuration) gives validate.py's loader's counts and per-file predictions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "timm_validate.py"
    spec = importlib.util.spec_from_file_location("timm_validate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([small_data, "--model", TINY]) == 0
    out = capsys.readouterr().out
    assert "21 of 21 equal" in out and "same counts, file by file" in out
    assert "fasteval's preprocessing: timm:test_resnet.r160_in1k: Resize(168, bilinear) + CenterCrop(160)" in out


def test_kept_model_facts_are_keyed_by_timms_release_for_a_timm_model():
    """A timm model's code is its timm release's: the kept meta-device facts (fasteval/model/meta_facts.py) are
    keyed by that release too; a torchvision model's are not."""
    import torchvision

    from fasteval.model.meta_facts import fact_key
    from fasteval.versions import package_version

    timm_key = fact_key("input_fits", timm.create_model("resnet10t", pretrained=False, num_classes=3), {})
    tv_key = fact_key("input_fits", torchvision.models.resnet18(num_classes=3), {})
    assert timm_key["timm"] == package_version("timm") == timm.__version__ and "timm" not in tv_key
