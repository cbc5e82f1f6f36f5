"""Checkpoint formats, head detection and refusals of the model loader."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torchvision
from torch import nn

from fasteval.errors import FastevalError
from fasteval.model.models import build_model, head_name, read_state_dict

X = torch.randn(2, 3, 32, 32)


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(1)
    return torchvision.models.resnet18(num_classes=7).eval()


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "model_state_dict", "ddp", "compiled", "both"])
def test_checkpoint_formats_load_the_same_model(net, tmp_path, wrap):
    sd = net.state_dict()
    if wrap in ("ddp", "compiled", "both"):
        prefix = {"ddp": "module.", "compiled": "_orig_mod.", "both": "module._orig_mod."}[wrap]
        obj = {prefix + k: v for k, v in sd.items()}
    elif wrap == "bare":
        obj = sd
    else:
        obj = {wrap: sd, "epoch": 3, "best_acc1": torch.tensor(71.0)}
    model = build_model("resnet18", _save(obj, tmp_path / "w.pt"), num_classes=7)
    with torch.no_grad():
        assert torch.equal(model(X), net(X))


@pytest.mark.parametrize("arch", ["resnet18", "regnet_x_400mf"])
def test_loaded_model_is_the_plain_load_bitwise(arch, tmp_path):
    """The model built without initialising weights (on the meta device, or on the CPU with nn.init's
    initialisers skipped where the meta device cannot build it: RegNets) and given the checkpoint's
    tensors is the tutorial's ``model = arch(...); model.load_state_dict(torch.load(f))``: every tensor
    equal, fp32, contiguous, ``requires_grad`` as a fresh model's, for fp16 and channels-last checkpoints
    too. Building it draws no random numbers."""
    torch.manual_seed(1)
    plain = torchvision.models.get_model(arch, num_classes=7)
    sd = {k: v.clone() for k, v in torchvision.models.get_model(arch, num_classes=7).state_dict().items()}
    variants = {"fp32": sd, "fp16": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()},
                "channels_last": {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                                  for k, v in sd.items()}}
    for name, state in variants.items():
        plain.load_state_dict(state)
        path = _save(state, tmp_path / f"{name}.pt")
        rng = torch.get_rng_state()
        model = build_model(arch, path, num_classes=7)
        assert torch.equal(torch.get_rng_state(), rng), "building a model to load drew random numbers"
        ours, theirs = model.state_dict(), plain.state_dict()
        assert list(ours) == list(theirs)
        for key, value in theirs.items():
            assert ours[key].dtype == value.dtype and ours[key].is_contiguous() and not ours[key].is_meta, key
            assert torch.equal(ours[key], value), (name, key)
        assert all(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            assert torch.equal(model(X), plain.eval()(X))
    checked = build_model(arch, _save(sd, tmp_path / "c.pt"), num_classes=7, check_only=True)
    assert all(t.is_meta for t in checked.parameters()) or arch.startswith("regnet")  # a check reads no weights


def test_every_classifier_keeps_all_its_buffers_in_its_state_dict():
    """A model built without initialising (meta device, or nn.init skipped) is whole only if the checkpoint
    replaces every tensor: no torchvision classifier may have a non-persistent buffer."""
    from fasteval.model.models import _construct_for_loading, classification_models

    for arch in classification_models():
        model = _construct_for_loading(arch, 10)
        assert not [name for name, module in model.named_modules() if module._non_persistent_buffers_set], arch
        assert len(model.state_dict()) == len(list(model.parameters())) + len(list(model.buffers())), arch


def test_initialisers_are_skipped_whole_and_restored():
    """Each of nn.init's initialisers is skipped whole, so a rejection loop (trunc_normal_ redraws values
    outside its bounds) never runs on memory left as allocated, and so are the copies other modules hold
    (nn.MultiheadAttention's ``from torch.nn.init import xavier_uniform_``); every one is restored
    afterwards, also when the build raises."""
    from torch.nn import init
    from torch.nn.modules import activation

    from fasteval.model.init_skip import initialisers_skipped

    before, held = dict(vars(init)), activation.xavier_uniform_
    weights = torch.full((4, 4), 1e9)  # far outside trunc_normal_'s [-2, 2]
    with pytest.raises(RuntimeError, match="build failed"), initialisers_skipped():
        assert init.trunc_normal_(weights) is weights and init.kaiming_normal_(tensor=weights) is weights
        assert activation.xavier_uniform_(weights) is weights
        assert torch.equal(weights, torch.full((4, 4), 1e9))
        raise RuntimeError("build failed")
    assert dict(vars(init)) == before and activation.xavier_uniform_ is held
    init.trunc_normal_(weights)
    assert weights.abs().max() <= 2


def test_initialisers_are_skipped_on_the_building_thread_only():
    """Another thread's model, built while one thread is inside, is initialised as usual; overlapping
    builds on two threads, ending in either order, leave every initialiser restored."""
    import threading

    from torch.nn import init

    from fasteval.model.init_skip import initialisers_skipped

    before = dict(vars(init))
    entered, other_done, first_left = threading.Event(), threading.Event(), threading.Event()
    built = {}

    def other():
        entered.wait()
        torch.manual_seed(5)
        built["other"] = nn.Linear(8, 8)  # while the main thread is inside
        with initialisers_skipped():  # and overlapping: enters second, leaves last
            other_done.set()
            first_left.wait()

    thread = threading.Thread(target=other)
    thread.start()
    with initialisers_skipped():
        entered.set()
        other_done.wait()
    first_left.set()
    thread.join()
    torch.manual_seed(5)
    assert torch.equal(built["other"].weight, nn.Linear(8, 8).weight)
    assert dict(vars(init)) == before


def test_default_weights_are_torchvisions_load_without_its_random_init(monkeypatch):
    """``--weights DEFAULT`` is torchvision's own build and load (the download replaced by a seeded state
    here), with no random numbers drawn for the weights the load replaces."""
    torch.manual_seed(3)
    pretrained = torchvision.models.resnet18(num_classes=1000).eval()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict",
                        lambda self, *a, **k: {k2: v.clone() for k2, v in pretrained.state_dict().items()})
    rng = torch.get_rng_state()
    model = build_model("resnet18", "DEFAULT", num_classes=1000)
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        assert torch.equal(model(X), pretrained(X))


def test_default_weights_of_another_class_count_refused_before_any_download(monkeypatch):
    """The DEFAULT weights' class count comes from their metadata: a 7-class dataset is refused without
    fetching 45 MB (the download itself is made to fail loudly here)."""
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded")

    monkeypatch.setattr(torchvision.models, "get_model", no_download)
    with pytest.raises(FastevalError, match="DEFAULT weights have a 1000-class head but the dataset has 7 classes"):
        build_model("resnet18", "DEFAULT", num_classes=7)


def test_sequential_head_as_saved_by_finetuning_scripts(net, tmp_path):
    finetuned = torchvision.models.resnet18(num_classes=1000)
    finetuned.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, strict=False)
    finetuned.fc = nn.Sequential(nn.Linear(512, 7))
    finetuned.fc[0].load_state_dict(net.fc.state_dict())
    sd = finetuned.state_dict()
    assert "fc.0.weight" in sd
    model = build_model("resnet18", _save({"model_state_dict": sd}, tmp_path / "ft.pt"), num_classes=7)
    with torch.no_grad():
        assert torch.equal(model(X), net.eval()(X))


def test_head_size_comes_from_weights_and_must_match_dataset(net, tmp_path):
    path = _save(net.state_dict(), tmp_path / "w.pt")
    assert build_model("resnet18", path).fc.out_features == 7
    with pytest.raises(FastevalError, match=r"7-class head but the dataset has 10 classes"):
        build_model("resnet18", path, num_classes=10)
    with pytest.raises(FastevalError, match=r"7-class head but the dataset has 1 class; where DATA holds only some "
                                            r"of the model's classes, give --classes$"):
        build_model("resnet18", path, num_classes=1)


def test_safetensors_weights_are_read_by_content(net, tmp_path):
    """A safetensors file (Hugging Face's format, timm's hub weights) loads as the same state as the .pt, whatever
    its name; a damaged one is one line."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / "weights.bin"  # not named .safetensors: decided by content
    save_file(state, str(path))
    model = build_model("resnet18", str(path))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(FastevalError, match=r"cannot load --weights .*damaged.safetensors: a damaged safetensors file"):
        build_model("resnet18", str(damaged))


def test_weights_of_another_arch_are_refused(net, tmp_path):
    path = _save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(FastevalError, match=r"do not fit --arch resnet34"):
        build_model("resnet34", path, num_classes=7)
    with pytest.raises(FastevalError, match=r"do not fit --arch mobilenet_v3_small"):
        build_model("mobilenet_v3_small", path, num_classes=7)


def test_other_architectures_and_their_heads(tmp_path):
    assert head_name("resnet18") == "fc"
    assert head_name("mobilenet_v3_small") == "classifier.3"
    assert head_name("vit_b_16") == "heads.head"
    assert head_name("squeezenet1_0") == "classifier.1"
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    loaded = build_model("mobilenet_v3_small", _save(m.state_dict(), tmp_path / "m.pt"), num_classes=5)
    with torch.no_grad():
        assert torch.equal(loaded(X), m(X))


def test_unknown_arch():
    with pytest.raises(FastevalError, match="unknown --arch 'resnet19'"):
        build_model("resnet19", None, num_classes=3)


def test_random_init_is_sized_to_dataset():
    assert build_model("resnet18", None, num_classes=4).fc.out_features == 4


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fasteval-pwned",))


def test_checkpoint_cannot_run_code(tmp_path):
    marker = "/tmp/fasteval-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "x": _Evil()}, path, pickle_protocol=2)
    with pytest.raises(FastevalError, match=r"cannot load --weights .*evil\.pt"):
        read_state_dict(str(path))
    assert not os.path.exists(marker)


def test_not_a_checkpoint(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a torch file")
    with pytest.raises(FastevalError, match="cannot load --weights .*garbage.pt"):
        read_state_dict(str(garbage))
    no_sd = _save({"epoch": 3}, tmp_path / "nosd.pt")
    with pytest.raises(FastevalError, match="holds no state_dict"):
        read_state_dict(no_sd)
    with pytest.raises(FastevalError, match="not found"):
        read_state_dict(str(tmp_path / "missing.pt"))


def test_pickle_protocol_is_not_loaded_directly(tmp_path):
    # A plain pickle (not a torch zip file) with code in it is refused as well.
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(FastevalError):
        read_state_dict(str(path))


def test_module_versions_are_kept_for_models_that_load_by_them(tmp_path):
    """MNASNet loads by its saved version (``state_dict()._metadata``): a checkpoint saved with
    ``torch.save(model.state_dict())`` loads as the tutorial's load does, also saved from DDP
    (``module.`` prefixes on the keys and on the versions' module names); a state stripped of its
    versions, which the tutorial's load refuses too, is one line naming the file."""
    torch.manual_seed(2)
    net = torchvision.models.mnasnet0_5(num_classes=5).eval()
    for name, state in (("plain", net.state_dict()), ("ddp", nn.DataParallel(net).state_dict())):
        model = build_model("mnasnet0_5", _save(state, tmp_path / f"{name}.pt"), num_classes=5)
        with torch.no_grad():
            assert torch.equal(model(X), net(X)), name
    bare = dict(net.state_dict())
    with pytest.raises(ValueError):
        torchvision.models.mnasnet0_5(num_classes=5).load_state_dict(bare)
    with pytest.raises(FastevalError, match=r"--weights .*bare.pt do not fit --arch mnasnet0_5: .*version.*lacks the modules. saved versions"):
        build_model("mnasnet0_5", _save(bare, tmp_path / "bare.pt"), num_classes=5)


def test_torchvision_reference_training_checkpoint_loads(net, tmp_path):
    """torchvision's reference training scripts (and timm's) save their arguments as an argparse.Namespace
    beside the weights and the optimizer: such a file loads, with no code run."""
    import argparse

    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    saved = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 89,
             "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=90)}
    model = build_model("resnet18", _save(saved, tmp_path / "checkpoint.pth"), num_classes=7)
    with torch.no_grad():
        assert torch.equal(model(X), net.eval()(X))


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("arch", ["googlenet", "inception_v3"])
def test_checkpoints_with_auxiliary_classifiers_load(arch, wrapped, tmp_path):
    """torchvision builds GoogLeNet and Inception v3 with auxiliary classifiers by default (and for every
    fine-tune of its pretrained weights): their weights are in most checkpoints, and never in the eval
    output, so they are dropped, not refused."""
    torch.manual_seed(4)
    trained = torchvision.models.get_model(arch, num_classes=5, init_weights=True).eval()
    state = trained.state_dict()
    assert any(k.startswith(("aux1.", "AuxLogits.")) for k in state)
    if wrapped:  # inside a training wrapper: Inception's AuxLogits.fc is not a second model
        state = {f"model.{k}": v for k, v in state.items()}
    model = build_model(arch, _save(state, tmp_path / "aux.pt"), num_classes=5)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


def test_a_model_saved_inside_a_training_wrapper_loads(tmp_path):
    """A LightningModule's ``self.model`` saves as ``model.fc.weight``...: the one prefix under which the
    head and every key are is the model's (MNASNet's module versions follow it); two models under two
    prefixes, or the model beside other weights, are refused in one line that says what to save."""
    torch.manual_seed(6)
    net = torchvision.models.mnasnet0_5(num_classes=5).eval()

    class Wrapper(nn.Module):
        def __init__(self, **models):
            super().__init__()
            for name, module in models.items():
                setattr(self, name, module)

    model = build_model("mnasnet0_5", _save(Wrapper(model=net).state_dict(), tmp_path / "w.ckpt"), num_classes=5)
    with torch.no_grad():
        assert torch.equal(model(X), net(X))
    for name, wrapper, message in (
            ("two", Wrapper(model=net, ema=net), r"holds several models \(ema, model\)"),
            ("beside", Wrapper(model=net, criterion=nn.Linear(2, 2)), r"under 'model', beside 2 other key\(s\)")):
        with pytest.raises(FastevalError, match=message):
            build_model("mnasnet0_5", _save(wrapper.state_dict(), tmp_path / f"{name}.ckpt"), num_classes=5)


def _without_batches_tracked(state: dict, version: int | None) -> dict:
    """``state`` less its BatchNorms' ``num_batches_tracked``, with the modules' saved versions set to
    ``version`` (None: none saved, as in a plain dict)."""
    from collections import OrderedDict

    out = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    if version is not None:
        out._metadata = OrderedDict((name, {**meta, "version": version} if "version" in meta else meta)
                                    for name, meta in state._metadata.items())
    return out


@pytest.mark.parametrize("version", [None, 1, 2])
def test_batchnorm_counters_are_optional_exactly_where_a_strict_load_accepts_them(net, tmp_path, version):
    """Older checkpoints have no ``num_batches_tracked`` (BatchNorm's buffer since its version 2): a strict
    ``load_state_dict`` fills it where the state's saved versions are older (or none), and refuses the state
    with version-2 BatchNorms. fasteval accepts and refuses the same states, and the model it loads is the
    strict load's."""
    state = _without_batches_tracked(net.state_dict(), version)
    assert len(state) == len(net.state_dict()) - 20
    path = _save(state, tmp_path / "old.pt")
    plain = torchvision.models.resnet18(num_classes=7)
    if version == 2:
        with pytest.raises(RuntimeError, match="Missing key"):
            plain.load_state_dict(state, strict=True)
        with pytest.raises(FastevalError, match=r"old.pt do not fit --arch resnet18: 20 missing keys \(bn1.num_batches"):
            build_model("resnet18", path, num_classes=7)
        return
    plain.load_state_dict(state, strict=True)
    model = build_model("resnet18", path, num_classes=7)
    ours, theirs = model.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        assert torch.equal(model(X), net(X))
    assert build_model("resnet18", path, num_classes=7, check_only=True).fc.out_features == 7


def test_a_checkpoint_without_batchnorm_counters_evaluates_as_with_them(small_data, tmp_path):
    """Through the command: resnet18 weights whose num_batches_tracked keys are deleted give the figures the
    whole state_dict gives."""
    import json

    from fasteval import cli

    torch.manual_seed(3)
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    results = {}
    for name, saved in (("with", state), ("without", _without_batches_tracked(state, None))):
        path = _save(saved, tmp_path / f"{name}.pt")
        out = tmp_path / f"{name}.json"
        assert cli.main(["eval", small_data, "--weights", path, "--resize", "40", "--crop", "32", "--device", "cpu",
                         "--workers", "0", "--compile", "off", "--no-progress", "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    keys = ("samples", "correct_top1", "correct_top5", "loss_sum")
    assert [results["without"][k] for k in keys] == [results["with"][k] for k in keys]


def test_a_torchscript_file_is_named_with_how_to_evaluate_it(net, tmp_path, monkeypatch):
    """A ``torch.jit.save`` archive is a program, which fasteval does not run: refused in one line that says
    what the file is and how to get its weights; following that line loads the scripted model's weights."""
    import warnings

    path = str(tmp_path / "scripted.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(net), path)
        for check_only in (False, True):
            with pytest.raises(FastevalError) as refused:
                build_model("resnet18", path, num_classes=7, check_only=check_only)
            message = str(refused.value)
            assert message.startswith(f"cannot load --weights {path}: it is a TorchScript module (torch.jit.save)")
            assert "damaged" not in message and "\n" not in message
        advice = f"torch.save(torch.jit.load({path!r}).state_dict(), 'weights.pt')"
        assert advice in message
        monkeypatch.chdir(tmp_path)
        exec(advice, {"torch": torch})
    model = build_model("resnet18", str(tmp_path / "weights.pt"), num_classes=7)
    with torch.no_grad():
        assert torch.equal(model(X), net(X))
