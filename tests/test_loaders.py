"""Fast-path loaders: pixel parity with the reference transforms, every sample exactly once, bad files."""

from __future__ import annotations

import pytest
import torch

from fasteval.errors import FastevalError
from fasteval.data.loader_dali import dali_available
from fasteval.data.loader_torch import GpuDecodeLoader
from fasteval.data.loaders import batch_cap, batch_shape, batch_shape_reason, make_loader, needs_pil
from fasteval.data.preprocess import PRESETS, get_spec
from fasteval.evaluation.reference import reference_dataset
from fasteval.data.samples import discover

CPU = torch.device("cpu")
# "decode_jpeg" is the GPU-decode loader's code (batched torchvision.io.decode_jpeg, per-file and PIL
# fallbacks, tensor resize and crop) run on the CPU device: its logic, not nvJPEG itself.
LOADERS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI not installed")),
           "torchvision", "decode_jpeg"]


def loader_for(kind, samples, spec, **kwargs):
    if kind == "decode_jpeg":
        return GpuDecodeLoader(samples, spec, kwargs["batch_size"], kwargs["workers"], kwargs["device"])
    return make_loader(kind, samples, spec, **kwargs)


def pixel_diffs(loader, samples, spec) -> tuple[list[float], list[float]]:
    """Per-sample max and mean |loader - reference| in 1/255 steps (undoing the normalisation)."""
    ref = reference_dataset(samples, spec)
    std = torch.tensor(spec.std).view(3, 1, 1)
    maxima, means, seen = [], [], 0
    for batch in loader:
        for i in range(batch.real):
            expected, label = ref[seen + i]
            got = batch.images[i].float().cpu()
            assert got.shape == expected.shape
            assert int(batch.labels[i]) == label
            diff = (got - expected).abs() * std * 255
            maxima.append(float(diff.max()))
            means.append(float(diff.mean()))
        seen += batch.real
    assert seen == len(samples)
    return maxima, means


def max_pixel_diffs(loader, samples, spec) -> list[float]:
    """Per-sample max |loader - reference| in 1/255 steps."""
    return pixel_diffs(loader, samples, spec)[0]


@pytest.mark.parametrize("kind", LOADERS)
def test_imagenet_preset_parity_on_varied_sizes(kind, varied_data):
    samples, spec = discover(varied_data), PRESETS["imagenet"]
    loader = loader_for(kind, samples, spec, batch_size=5, workers=2, device=CPU)
    diffs = max_pixel_diffs(loader, samples, spec)
    assert max(diffs) <= 1.01, diffs  # within one 1/255 step of torchvision's Resize + CenterCrop


@pytest.mark.parametrize("kind", LOADERS)
def test_every_file_kind_goes_through_and_matches(kind, kinds_data):
    samples, spec = discover(kinds_data), get_spec("imagenet", resize=160, crop=128)
    assert len(samples) == 15
    pil_only = needs_pil(samples)
    assert [samples.paths[i].rsplit("/", 1)[-1] for i in pil_only] == ["gray16.png"]
    loader = loader_for(kind, samples, spec, batch_size=4, workers=1, device=CPU)
    diffs = dict(zip(samples.paths, max_pixel_diffs(loader, samples, spec)))
    if kind == "dali":  # the fast evaluator sends these files to the PIL loader
        for i in pil_only:
            assert diffs.pop(samples.paths[i]) > 10  # what DALI alone would give: not the reference
    assert max(diffs.values()) <= 1.01, diffs


@pytest.mark.parametrize("kind", LOADERS)
def test_seed_preset_without_crop(kind, small_data):
    samples, spec = discover(small_data), PRESETS["seed"]
    loader = loader_for(kind, samples, spec, batch_size=8, workers=1, device=CPU)
    batch = next(iter(loader))
    assert batch.images.shape == (8, 3, 224, 268)  # 72x60 -> shorter side 224, longer floored
    assert max(max_pixel_diffs(loader, samples, spec)) <= 1.01


@pytest.mark.parametrize("kind", LOADERS)
def test_a_pass_stopped_early_leaves_the_next_passes_whole(kind, small_data):
    """A pass abandoned after one batch (an error, Ctrl-C in a caller): DALI cannot rewind, so the
    loader finishes that epoch and resets by hand; the next passes still give every sample once, in order."""
    samples = discover(small_data)  # 21 samples
    loader = loader_for(kind, samples, get_spec("imagenet", resize=40, crop=32), batch_size=8, workers=1,
                        device=CPU)
    for batch in loader:
        break
    for _ in range(2):
        labels = [label for batch in loader for label in batch.labels[:batch.real].tolist()]
        assert labels == samples.labels


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("batch_size", [1, 4, 21, 64])
def test_every_sample_once_with_a_padded_static_last_batch(kind, batch_size, small_data):
    samples = discover(small_data)  # 21 samples
    loader = loader_for(kind, samples, get_spec("imagenet", resize=40, crop=32), batch_size=batch_size,
                        workers=1, device=CPU)
    for _ in range(2):  # a second epoch starts from the first sample again
        labels, reals = [], []
        for batch in loader:
            assert batch.images.shape == (batch_size, 3, 32, 32)  # static shape, last batch included
            assert batch.labels.shape == (batch_size,) and batch.labels.dtype == torch.int64
            assert batch.images.is_contiguous(memory_format=torch.channels_last)
            labels += batch.labels[: batch.real].tolist()
            reals.append(batch.real)
        assert labels == samples.labels
        assert sum(reals) == 21 and all(r == batch_size for r in reals[:-1]) and reals[-1] == 21 - batch_size * (
            len(reals) - 1)


@pytest.mark.parametrize("kind", LOADERS)
def test_corrupt_file_is_named(kind, tmp_path, small_data):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(small_data, root)
    (root / "class_001" / "img_00003.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    samples = discover(root)
    loader = loader_for(kind, samples, get_spec("imagenet", resize=40, crop=32), batch_size=4, workers=1,
                        device=CPU)
    with pytest.raises(FastevalError, match=r"cannot decode image .*class_001.img_00003\.jpg"):
        for _ in loader:
            pass


def test_auto_prefers_dali_and_names_a_missing_one(small_data, monkeypatch):
    samples, spec = discover(small_data), get_spec("imagenet", resize=40, crop=32)
    expected = "dali-cpu" if dali_available() else "torchvision-cpu"
    assert make_loader("auto", samples, spec, batch_size=4, workers=1, device=CPU).name == expected
    import fasteval.data.loader_dali as loader_dali

    monkeypatch.setattr(loader_dali, "dali_available", lambda: False)
    assert make_loader("auto", samples, spec, batch_size=4, workers=1, device=CPU).name == "torchvision-cpu"
    with pytest.raises(FastevalError, match="nvidia-dali is not installed"):
        make_loader("dali", samples, spec, batch_size=4, workers=1, device=CPU)
    with pytest.raises(FastevalError, match="unknown --loader 'pil'"):
        make_loader("pil", samples, spec, batch_size=4, workers=1, device=CPU)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", LOADERS)
def test_gpu_loaders_parity(kind, varied_data, kinds_data):
    device = torch.device("cuda")
    for root, spec in [(varied_data, PRESETS["imagenet"]), (kinds_data, get_spec("imagenet", resize=160, crop=128))]:
        samples = discover(root)
        loader = loader_for(kind, samples, spec, batch_size=4, workers=2, device=device)
        assert loader.name in ("dali-gpu", "torchvision-gpu")
        maxima, means = pixel_diffs(loader, samples, spec)
        print(kind, root, "max diff", max(maxima), "largest per-image mean diff", max(means))
        # nvJPEG is not libjpeg-turbo: its chroma upsampling differs at colour edges, so single pixels
        # differ by up to 41/255 while each image's mean difference stays under 0.63/255 (H200, torchvision
        # 0.26, 2026-11-28). A wrong crop offset, size or channel order moves the mean by tens of steps.
        assert max(maxima) <= 64.0, dict(zip(samples.paths, maxima))
        assert max(means) <= 1.5, dict(zip(samples.paths, means))


@pytest.mark.parametrize("total, cap, shape", [(240, 64, 60), (50_000, 256, 256), (10, 32, 10), (65, 64, 33),
                                               (64, 64, 64), (1, 64, 1), (21, 8, 7), (21, 4, 4), (129, 64, 43)])
def test_cpu_batch_shape_by_hand(total, cap, shape):
    assert batch_shape(total, cap, "cpu") == shape == batch_shape(total, cap, "cpu", (1, 1), cores=1)


@pytest.mark.parametrize("total, asked, shape", [(240, 64, 64), (50_000, 512, 512), (20_000, 256, 256),
                                                 (10, 32, 10), (65, 64, 64), (1, 64, 1), (3000, 64, 64)])
def test_a_gpu_runs_the_asked_batch_size_whatever_the_dataset_size(total, asked, shape):
    """A new shape is a new compile; on a GPU padding costs at most a batch's GPU time (equal batches would
    make 50,000 at 512 batches of 511, 20,000 at 256 batches of 254: each its own compile)."""
    assert batch_shape(total, asked, "cuda", (224, 224)) == shape
    assert batch_shape_reason(total, asked, shape, "cuda", (224, 224)) is None


@pytest.mark.parametrize("total, hw, shape", [(240, (224, 224), 20), (250, (224, 224), 20), (241, (224, 224), 19),
                                              (240, (32, 32), 60), (10, (224, 224), 10), (100, (448, 448), 5),
                                              (3, (4000, 4000), 1)])
def test_a_cpu_batch_holds_at_most_ten_224px_images_a_core(total, hw, shape):
    assert batch_shape(total, 64, "cpu", hw, cores=2) == shape


def test_the_cpu_cap_scales_with_the_usable_cores(monkeypatch):
    assert [batch_cap(64, "cpu", (224, 224), cores) for cores in (1, 2, 3, 6, 8, 64)] == [10, 20, 30, 60, 64, 64]
    monkeypatch.setattr("fasteval.data.loaders.usable_cores", lambda: 4)  # the process's affinity by default
    assert batch_shape(240, 64, "cpu", (224, 224)) == 40


def test_cpu_batch_shape_keeps_the_batch_count_and_leaves_under_one_padding_row_per_batch():
    for hw in ((224, 224), (100, 150), None):
        for asked in range(1, 70):
            cap = batch_cap(asked, "cpu", hw, cores=2)
            assert 1 <= cap <= asked
            for total in range(1, 300):
                shape = batch_shape(total, asked, "cpu", hw, cores=2)
                batches = -(-total // cap)
                assert shape <= cap and -(-total // shape) == batches  # no more batches than the cap makes
                assert 0 <= batches * shape - total < batches  # padding: under one row per batch


def test_the_reason_names_the_cpu_cap_and_the_padding_saved():
    assert batch_shape_reason(240, 64, 60, "cpu") == ("4 batch(es) of 60: as equal as --batch-size 64 allows, "
                                                      "0 padding row(s) in one process (batches of 64 would pad 16)")
    assert batch_shape_reason(241, 64, 19, "cpu", (224, 224), cores=2) == (
        "13 batch(es) of 19: on the CPU at most 20 image(s) of 224x224 a batch on these cores (its activations "
        "stay in cache), as equal as --batch-size 64 allows, 6 padding row(s) in one process (batches of 64 would "
        "pad 15)")
    assert batch_shape_reason(64, 64, 64, "cpu") is None
    assert batch_shape_reason(156, 32, 20, "cpu", (224, 224), cores=2).endswith("32 allows, 4 padding row(s) in "
                                                                                "one process")
    # A --batch-size above the run's size is named as asked; the run's own size is the clamp, not padding.
    assert batch_shape_reason(30, 64, 15, "cpu", (224, 224), cores=2).endswith("--batch-size 64 allows, 0 padding "
                                                                              "row(s) in one process")
    assert batch_shape_reason(30, 64, 30, "cpu", (32, 32), cores=2) is None


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_that_cannot_start_leaves_auto_to_torchvision(small_data, model_3cls, small_spec, monkeypatch, capsys,
                                                            tmp_path):
    """DALI's own failure to start (its GPU decoder, a library; simulated: its iterator raises) under --loader
    auto: torchvision's loader decodes instead, with one warning, the reference's counts, and the executed plan
    saying so. Asked by name, it is the run's error; a bad file among the first batches is named, not skipped."""
    import shutil

    import nvidia.dali.plugin.pytorch as dali_torch

    import fasteval.data.prefetch as prefetch
    from fasteval.evaluation.fast import FastEvaluator
    from fasteval.evaluation.plan import FastOptions
    from fasteval.evaluation.reference import evaluate_reference

    def broken(*args, **kwargs):
        raise RuntimeError("[dali/operators/decoder/nvjpeg.cc:120] nvjpeg error: hardware decoder failed to start")

    monkeypatch.setattr(dali_torch, "DALIGenericIterator", broken)
    monkeypatch.setattr(prefetch, "MAX_SAMPLES", 0)  # DALI, not PIL's pixels, even for this small set
    samples = discover(small_data)
    options = FastOptions(compile="off", loader="auto", workers=1)
    evaluator = FastEvaluator(samples, model_3cls, small_spec, CPU, options)
    assert evaluator.plan.loader_kind == "dali" and evaluator.plan.dali.value is not None
    result = evaluator.run(progress=False)
    ref = evaluate_reference(samples, model_3cls, small_spec, batch_size=8, workers=0, device=CPU, progress=False)
    assert (result.correct_top1, result.correct_top5) == (ref.correct_top1, ref.correct_top5)
    assert result.loss_sum == pytest.approx(ref.loss_sum, rel=1e-3)  # bf16 logits: counts exact, the loss close
    err = capsys.readouterr().err
    assert err.count("fasteval: warning: DALI could not start (cannot start the DALI pipeline on cpu: ") == 1, err
    assert "hardware decoder failed to start): torchvision's loader decodes instead" in err
    executed = evaluator.executed_plan
    assert executed.loader.value == "torchvision-cpu"
    assert "torchvision's loader decodes instead" in executed.loader.reason
    assert executed.dali.value is None and "DALI could not start" in executed.dali.reason
    with pytest.raises(FastevalError, match="^cannot start the DALI pipeline on cpu: .*hardware decoder failed"):
        FastEvaluator(samples, model_3cls, small_spec, CPU, FastOptions(compile="off", loader="dali", workers=1))
    root = tmp_path / "data"
    shutil.copytree(small_data, root)
    bad = root / "class_000" / "img_00001.jpg"
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])  # its header intact, its scan cut short
    with pytest.raises(FastevalError, match=r"^cannot decode image .*class_000.img_00001\.jpg"):
        FastEvaluator(discover(root), model_3cls, small_spec, CPU, options)
    assert "torchvision's loader decodes instead" not in capsys.readouterr().err
