"""The memory check before a run: activation sizes hand-computed on small modules, refusals in one line
(exit 2, nothing written) when the inputs, activations and weights exceed the memory, ordinary sizes
accepted, and the CUDA budget read from ``torch.cuda.mem_get_info`` (monkeypatched: no GPU here)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fasteval import memory
from fasteval.cli import main
from fasteval.data.preprocess import get_spec
from fasteval.errors import FastevalError
from fasteval.model import footprint
from fasteval.model.footprint import activation_bytes, parameter_bytes

FLOAT = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Residual(nn.Module):
    """a = conv(x); b = conv2(a); a + b: three tensors of one size alive at the addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.conv(x)
        b = self.conv2(a)
        return a + b


class NeedsValues(nn.Module):
    """Reads a value back in its forward: it cannot run on the meta device."""

    def forward(self, x):
        return x * float(x.mean())


def test_activation_sizes_of_small_modules_by_hand():
    s = 2 * 4 * 8 * 8 * FLOAT  # one 2x4x8x8 float32 activation
    conv = nn.Conv2d(3, 4, 3, padding=1)
    # The conv's output and the ReLU's (the input batch is the caller's to count).
    assert activation_bytes(nn.Sequential(conv, nn.ReLU()), 2, (8, 8)) == 2 * s
    assert activation_bytes(nn.Sequential(conv, nn.ReLU(inplace=True)), 2, (8, 8)) == s  # one storage
    # A stride halves each side: the conv's output is a quarter, the ReLU's too.
    strided = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
    assert activation_bytes(strided, 2, (8, 8)) == 2 * s // 4
    assert activation_bytes(Residual(), 2, (8, 8)) == 3 * s  # a tensor held by the module counts too
    # Training: each ReLU keeps its output for the backward pass (3 s); during the backward the gradients
    # of two layers are alive at once (2 s), with the loss and its gradient (two float32 scalars).
    chain = nn.Sequential(conv, nn.ReLU(), nn.ReLU(), nn.ReLU())
    assert activation_bytes(chain, 2, (8, 8), training=True) == 5 * s + 2 * FLOAT
    assert activation_bytes(chain, 2, (8, 8)) == 2 * s
    assert chain.training and conv.weight.device.type == "cpu" and conv.weight.grad is None  # untouched


def test_resnet18_activations_by_hand(model_3cls):
    """ResNet-18's peak is its stem: the conv's output and BatchNorm's, 64 channels at half the size
    (the ReLU after them is in place). On the meta device BatchNorm's operator also returns its 64-value
    mean and inverse deviation beside its output; the CPU's eval kernel returns them empty (the real
    forwards of a small model)."""
    stats = 2 * 64 * FLOAT
    assert activation_bytes(model_3cls, 8, (32, 32)) == 2 * 8 * 64 * 16 * 16 * FLOAT
    assert footprint._on_meta(model_3cls, 8, (32, 32), False) == 2 * 8 * 64 * 16 * 16 * FLOAT + stats
    assert activation_bytes(model_3cls, 4, (20000, 20000)) == 2 * 4 * 64 * 10000 * 10000 * FLOAT + stats
    assert not model_3cls.training


class FixedThenScaled(nn.Module):
    """A fixed 40 KB temporary first, then activations in proportion to the batch: at 1 or 2 samples the
    fixed one is the peak, at 64 the activations are."""

    def forward(self, x):
        total = torch.ones(10_000).sum()
        return (x * 2) * total


class BranchesOnBatch(nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[0] == 1 else (x + 1) * 3


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "squeezenet1_0", "efficientnet_b0"])
def test_the_real_forward_estimate_equals_the_meta_one(arch):
    """A small model's estimate from real forwards of 1 and 2 samples, extrapolated operator by operator,
    equals the meta device's at every batch size (the meta device being the independent computation),
    but for BatchNorm's statistics, which only the meta kernel returns (two vectors a layer at most)."""
    import torchvision

    model = torchvision.models.get_model(arch, num_classes=5).eval()
    stats = sum(2 * m.num_features * FLOAT for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    for batch in (1, 3, 64):
        real = footprint._extrapolated(model, batch, (48, 40))
        assert real is not None and 0 <= footprint._on_meta(model, batch, (48, 40), False) - real <= stats, batch
    assert footprint.cheap_forward(model, (224, 224))


def test_extrapolation_takes_each_operator_line_and_refuses_a_branch():
    for batch in (1, 2, 64):
        assert footprint._extrapolated(FixedThenScaled(), batch, (8, 8)) == \
            footprint._on_meta(FixedThenScaled(), batch, (8, 8), False)
    assert footprint._extrapolated(FixedThenScaled(), 64, (8, 8)) > 40_000  # the activations' line, not 40 KB
    assert footprint._extrapolated(BranchesOnBatch(), 8, (8, 8)) is None  # other operators at 1 and 2 samples
    assert activation_bytes(BranchesOnBatch(), 8, (8, 8)) == footprint._on_meta(BranchesOnBatch(), 8, (8, 8), False)


def test_a_model_that_cannot_run_on_meta_falls_back_to_the_inputs(monkeypatch):
    monkeypatch.setattr(footprint, "REAL_FORWARD_PARAMS", -1)  # the meta device's path, which cannot run it
    spec = get_spec("imagenet", 40, 32)
    assert activation_bytes(NeedsValues(), 2, (8, 8)) is None
    monkeypatch.setattr(memory, "host_memory", lambda: 10**12)
    memory.check_eval_memory(NeedsValues(), "x", spec, (60, 72), 8, 0, torch.device("cpu"))  # no crash
    monkeypatch.setattr(memory, "host_memory", lambda: 1000)
    with pytest.raises(FastevalError, match=r"the activations of --arch x not estimated\), more than"):
        memory.check_eval_memory(NeedsValues(), "x", spec, (60, 72), 8, 0, torch.device("cpu"))


def _inputs_and_weights(model, batch: int) -> int:
    # 8 float32 inputs of 32x32, plus one 72x60 image resized to 48x40 (uint8) for the one decoding thread.
    return batch * 3 * 32 * 32 * FLOAT + 3 * 48 * 40 + parameter_bytes(model)


@pytest.mark.parametrize("mode", [[], ["--reference"]])
def test_activations_that_do_not_fit_are_refused_before_any_work(small_data, weights_3cls, model_3cls, tmp_path,
                                                                   monkeypatch, capfd, mode):
    """The inputs and weights fit, the activations do not: refused (the old check counted the inputs only)."""
    activations = 2 * 8 * 64 * 16 * 16 * FLOAT + 2 * 64 * FLOAT  # as test_resnet18_activations_by_hand
    monkeypatch.setattr(memory, "host_memory", lambda: _inputs_and_weights(model_3cls, 8) + activations // 2)
    out_json, preds = tmp_path / "r.json", tmp_path / "p.csv"
    rc = main(["eval", small_data, "--weights", weights_3cls, *mode, "--resize", "40", "--crop", "32", "--batch-size",
               "8", "--workers", "0", "--compile", "off", "--device", "cpu", "--no-progress", "--json", str(out_json),
               "--predictions", str(preds)])
    out, err = capfd.readouterr()
    assert rc == 2 and "Traceback" not in err and "fasteval eval" not in out
    line = err.strip().splitlines()[-1]
    assert line.startswith("fasteval: error: --resize 40 --crop 32 --batch-size 8 needs ")
    assert "activations 1.0 MiB" in line  # 2^20 bytes
    assert line.endswith("lower --batch-size or --resize/--crop")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(memory, "host_memory", lambda: _inputs_and_weights(model_3cls, 8) + activations)
    assert main(["eval", small_data, "--weights", weights_3cls, *mode, "--resize", "40", "--crop", "32",
                 "--batch-size", "8", "--workers", "0", "--compile", "off", "--device", "cpu", "--no-progress",
                 "--json", str(out_json)]) == 0  # exactly enough: accepted, and run
    assert out_json.is_file()


@pytest.mark.parametrize("mode", [[], ["--reference"]])
def test_the_reported_huge_size_is_refused_in_one_line(small_data, weights_3cls, monkeypatch, capfd, mode):
    """``--resize 20000 --crop 20000 --batch-size 4`` (the fault tester's command): its inputs (19.2 GiB) fit a 24 GiB machine, its
    activations (190.7 GiB) do not; refused at once, nothing allocated (the estimate is shapes only)."""
    monkeypatch.setattr(memory, "host_memory", lambda: 24 * 2**30)  # whatever this machine has
    fast_only = [] if mode else ["--compile", "off"]  # --reference would name it as ignored
    rc = main(["eval", small_data, "--weights", weights_3cls, *mode, "--resize", "20000", "--crop", "20000",
               "--batch-size", "4", "--workers", "0", *fast_only, "--device", "cpu", "--no-progress"])
    out, err = capfd.readouterr()
    assert rc == 2 and "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1
    activations = 2 * 4 * 64 * 10000 * 10000 * FLOAT
    inputs = 4 * 3 * 20000 * 20000 * FLOAT + 3 * 24000 * 20000  # the batch, and one 72x60 image resized
    assert f"(inputs {inputs / 2**30:.1f} GiB, activations {activations / 2**30:.1f} GiB, weights 42.7 MiB)" in err
    assert "more than this machine's 24.0 GiB: lower --batch-size or --resize/--crop" in err


@pytest.mark.parametrize("command", ["bench", "sweep"])
def test_bench_and_sweeps_are_checked_alike(small_data, weights_3cls, tmp_path, monkeypatch, capfd, command):
    monkeypatch.setattr(memory, "host_memory", lambda: 24 * 2**30)
    if command == "sweep":
        other = tmp_path / "other.pt"
        other.write_bytes(open(weights_3cls, "rb").read())
        args = ["eval", small_data, "--weights", weights_3cls, str(other), "--json", str(tmp_path / "s.json")]
    else:
        args = ["bench", small_data, "--weights", weights_3cls, "--json", str(tmp_path / "b.json")]
    rc = main([*args, "--resize", "20000", "--crop", "20000", "--batch-size", "4", "--workers", "0", "--compile", "off",
               "--device", "cpu", "--no-progress"])
    out, err = capfd.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err
    assert "--resize 20000 --crop 20000 --batch-size 4 needs" in err and "activations 190.7 GiB" in err
    assert sorted(os.listdir(tmp_path)) == (["other.pt"] if command == "sweep" else [])


def test_cuda_budget_is_the_free_device_memory(model_3cls, monkeypatch):
    """On CUDA the input batch, activations and weights are checked against ``mem_get_info``'s free bytes,
    the decoded inputs against host memory."""
    spec = get_spec("imagenet", 40, 32)
    cuda = torch.device("cuda", 0)
    on_device = 8 * 3 * 32 * 32 * FLOAT + 2 * 8 * 64 * 16 * 16 * FLOAT + parameter_bytes(model_3cls)  # by hand above
    seen = []

    def mem_get_info(device=None):
        seen.append(device)
        return on_device - 1, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(memory, "host_memory", lambda: 10**6)  # the decoded inputs (104 kB) fit
    with pytest.raises(FastevalError, match=r"free on cuda:0: lower --batch-size or --resize/--crop$"):
        memory.check_eval_memory(model_3cls, "resnet18", spec, (60, 72), 8, 0, cuda)
    assert seen == [cuda]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (on_device, 80 * 2**30))
    memory.check_eval_memory(model_3cls, "resnet18", spec, (60, 72), 8, 0, cuda)
    monkeypatch.setattr(memory, "host_memory", lambda: 10**5)  # now the decoded inputs do not fit the host
    with pytest.raises(FastevalError, match=r"needs 101.6 KiB \(inputs 101.6 KiB\), more than this machine's 97.7 KiB"):
        memory.check_eval_memory(model_3cls, "resnet18", spec, (60, 72), 8, 0, cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: 1 / 0)
    monkeypatch.setattr(memory, "host_memory", lambda: 10**6)
    memory.check_eval_memory(model_3cls, "resnet18", spec, (60, 72), 8, 0, cuda)  # unreadable: not checked


def test_host_memory_takes_the_cgroup_limit_when_lower(monkeypatch, tmp_path):
    limit = tmp_path / "memory.max"
    limit.write_text("1073741824\n")
    unlimited = tmp_path / "unlimited"
    unlimited.write_text("max\n")
    monkeypatch.setattr(memory, "physical_memory", lambda: 8 * 2**30)
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (str(unlimited), str(tmp_path / "absent"), str(limit)))
    assert memory.host_memory() == 2**30
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (str(unlimited),))
    assert memory.host_memory() == 8 * 2**30
