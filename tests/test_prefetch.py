"""Decoding at start-up (fasteval/data/prefetch.py, fasteval/data/pixels.py): the reference's pixels
bit for bit, read by the fast pass and the recheck, and started only where the run will read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from fasteval.cli import _start_prefetch, build_parser, main
from fasteval.data import prefetch as prefetch_module
from fasteval.data.pixels import load_rgb, reference_pixels
from fasteval.data.prefetch import Prefetch
from fasteval.data.preprocess import get_spec
from fasteval.data.samples import IMG_EXTENSIONS, discover
from fasteval.errors import FastevalError
from fasteval.evaluation.fast import FastEvaluator, FastOptions
from fasteval.evaluation.reference import evaluate_reference, reference_logits

CPU = torch.device("cpu")


def test_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS as torchvision_extensions

    assert IMG_EXTENSIONS == torchvision_extensions


@pytest.mark.parametrize("spec", [get_spec("imagenet"), get_spec("seed"), get_spec("imagenet", 97, 61),
                                  replace(get_spec("imagenet", 41, 33), interpolation="bicubic"),
                                  replace(get_spec("imagenet", 300, 290), interpolation="nearest")])
def test_pixels_are_the_reference_transforms_bit_for_bit(kinds_data, spec):
    """Every file kind (16-bit, CMYK, palette, EXIF-rotated...), upscaled and downscaled, odd crops:
    the bytes ToTensor would read from torchvision's resize and crop of ImageFolder's image."""
    geometry = T.Compose(spec.pil_geometry())
    samples = discover(kinds_data, quiet=True)
    for path in samples.paths:
        ours, theirs = reference_pixels(path, spec), np.asarray(geometry(load_rgb(path)))
        assert ours.dtype == np.uint8 and ours.shape == theirs.shape, path
        assert np.array_equal(ours, theirs), path


def test_logits_from_pixels_equal_the_decoding_path(kinds_data, model_3cls):
    spec = get_spec("imagenet", 40, 32)
    samples = discover(kinds_data, quiet=True)
    model = torch.nn.Sequential(model_3cls, torch.nn.Linear(3, samples.num_classes)).eval()
    pixels = Prefetch(samples, spec)
    indices = [5, 0, 13, 2, 9, 14]
    run = dict(batch_size=4, workers=0, device=CPU)
    assert torch.equal(reference_logits(samples, indices, model, spec, **run, pixels=pixels),
                       reference_logits(samples, indices, model, spec, **run))


def _broken_copy(src: str, dst) -> str:
    """``src``'s dataset with a middle file cut short (it decodes nowhere)."""
    import shutil

    shutil.copytree(src, dst)
    samples = discover(str(dst), quiet=True)
    bad = samples.paths[len(samples) // 2]
    with open(bad, "r+b") as f:
        f.truncate(40)
    return bad


def test_a_file_that_fails_raises_its_error_where_it_is_read_and_does_not_hold_up_the_others(small_data, tmp_path):
    bad = _broken_copy(small_data, tmp_path / "data")
    samples = discover(str(tmp_path / "data"), quiet=True)
    pixels = Prefetch(samples, get_spec("imagenet", 40, 32))
    last = pixels.get(len(samples) - 1)  # past the bad file: not kept waiting for it
    assert last.shape == (32, 32, 3)
    with pytest.raises(FastevalError, match="cannot decode image .*" + os.path.basename(bad)):
        pixels.get(samples.paths.index(bad))
    pixels.stop()
    assert not pixels.running


def test_a_stopped_prefetch_decodes_what_is_asked(small_data, small_spec):
    samples = discover(small_data, quiet=True)
    pixels = Prefetch(samples, small_spec)
    pixels.stop()
    assert np.array_equal(pixels.get(len(samples) - 1), reference_pixels(samples.paths[-1], small_spec))


def test_fast_path_reads_the_pixels_and_its_counts_are_the_references(kinds_data, model_3cls):
    """The default loader on the CPU with pixels: no file goes to the reference's code for its decoding
    (16-bit PNG, CMYK: PIL decoded them), the batches are the pixels, the counts the reference's."""
    spec = get_spec("imagenet", 40, 32)
    samples = discover(kinds_data, quiet=True)
    model = torch.nn.Sequential(model_3cls, torch.nn.Linear(3, samples.num_classes)).eval()
    options = FastOptions(batch_size=4, workers=0, compile=False)
    evaluator = FastEvaluator(samples, model, spec, CPU, options, pixels=Prefetch(samples, spec))
    assert evaluator.pixels is not None and evaluator.reference_only == []
    result = evaluator.run(progress=False)
    reference = evaluate_reference(samples, model, spec, batch_size=4, workers=0, progress=False)
    assert result.extra["loader"] == "pil-cpu, decoded at start-up"
    assert result.extra["pil_fallback_files"] == 0
    assert (result.correct_top1, result.correct_top5) == (reference.correct_top1, reference.correct_top5)
    assert torch.equal(result.predictions, reference.predictions)


def test_pixels_the_run_will_not_read_are_dropped_and_the_thread_stopped(small_data, small_spec, model_3cls):
    samples = discover(small_data, quiet=True)
    options = FastOptions(batch_size=4, workers=0, compile=False, loader="dali")
    pixels = Prefetch(samples, small_spec)
    evaluator = FastEvaluator(samples, model_3cls, small_spec, CPU, options, pixels=pixels)
    assert evaluator.pixels is None and not pixels.running
    other_list = Prefetch(discover(small_data, quiet=True), small_spec)  # another listing: not the run's
    assert FastEvaluator(samples, model_3cls, small_spec, CPU, replace(options, loader="auto"),
                         pixels=other_list).pixels is None


def test_a_small_cpu_run_without_start_up_pixels_decodes_them_each_pass(small_data, small_spec, model_3cls):
    """evaluate_fast on a small CPU set (as a torchrun rank or a bench runs it: no start-up decoding): the
    reference's pixels again, decoded per pass by DataLoader workers and kept for the recheck."""
    samples = discover(small_data, quiet=True)
    options = FastOptions(batch_size=4, workers=1, compile=False)
    evaluator = FastEvaluator(samples, model_3cls, small_spec, CPU, options)
    assert evaluator.plan.loader.value == "pil-pixels" and evaluator.pixels is None and evaluator.reference_only == []
    first = evaluator.run(progress=False)
    kept = evaluator.loader.pixels
    assert first.extra["loader"] == "pil-cpu, 1 thread(s) between batches" and sorted(kept.images) == list(range(len(samples)))
    for i in (0, 7, len(samples) - 1):
        assert np.array_equal(kept.get(i), reference_pixels(samples.paths[i], small_spec))
    second = evaluator.run(progress=False)
    assert evaluator.loader.pixels is not kept and torch.equal(first.losses, second.losses)
    started = FastEvaluator(samples, model_3cls, small_spec, CPU, options, pixels=Prefetch(samples, small_spec))
    assert torch.equal(started.run(progress=False).losses, first.losses)  # the same pixels either way
    # A run of several passes (training's validation) decodes once: the later passes read the first's.
    several = FastEvaluator(samples, model_3cls, small_spec, CPU, options, passes=3)
    once = several.run(progress=False)
    kept = several.loader.pixels
    assert torch.equal(several.run(progress=False).losses, once.losses) and several.loader.pixels is kept


def test_load_rgb_is_imagefolders_loader(kinds_data):
    """An RGB file is returned as decoded (no copy), any other mode converted: ImageFolder's pixels."""
    from torchvision.datasets.folder import pil_loader

    for path in discover(kinds_data, quiet=True).paths:
        ours, theirs = load_rgb(path), pil_loader(path)
        assert ours.mode == theirs.mode == "RGB" and np.array_equal(np.asarray(ours), np.asarray(theirs)), path


def test_one_image_normalised_in_numpy_is_the_batch_normaliser_on_every_value():
    from fasteval.data.loader_torch import Normalizer

    spec = get_spec("imagenet")
    values = np.arange(256, dtype=np.uint8)
    image = np.stack([np.roll(values, 85 * c) for c in range(3)], axis=-1).reshape(16, 16, 3)  # every value, each channel
    image = np.ascontiguousarray(np.concatenate([image, image[:, :5]], axis=1))  # an odd width: 16 x 21
    normalizer = Normalizer(spec, CPU, half=False)
    out = np.empty(image.shape, np.float32)
    normalizer.into(image, out)
    batch = normalizer(torch.from_numpy(image).permute(2, 0, 1)[None])
    assert torch.equal(torch.from_numpy(out), batch[0].permute(1, 2, 0))


@pytest.mark.parametrize("threads", [0, 2])
def test_pil_loader_batches_are_the_batch_normalisers_with_padding_rows(small_data, small_spec, threads):
    """21 samples at 8: each image normalised where its thread decoded it equals the stacked batch
    normalised at once; the last batch's 3 padding rows are a black image normalised, as elsewhere."""
    from fasteval.data.loader_torch import Normalizer, PixelLoader, _pad

    samples = discover(small_data, quiet=True)
    indices = list(range(len(samples)))
    loader = PixelLoader(samples, indices, 8, small_spec, CPU, workers=threads)
    normalizer = Normalizer(small_spec, CPU, half=False)
    for _ in range(2):
        seen = 0
        for batch in loader:
            chunk = indices[seen:seen + batch.real]
            stacked = torch.from_numpy(np.stack([reference_pixels(samples.paths[i], small_spec) for i in chunk]))
            expected, labels = _pad(stacked.permute(0, 3, 1, 2), torch.tensor([samples.labels[i] for i in chunk]), 8)
            assert torch.equal(batch.images, normalizer(expected)) and torch.equal(batch.labels, labels)
            assert batch.images.is_contiguous(memory_format=torch.channels_last)
            seen += batch.real
        assert seen == 21 and sorted(loader.pixels.images) == indices


def _args(*argv):
    return build_parser().parse_args(["eval", *argv])


def test_started_only_for_a_single_fast_eval_of_a_small_dataset_on_the_cpu(small_data, weights_3cls, tmp_path,
                                                                           monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    listed, plain = _start_prefetch(_args(small_data, "--weights", weights_3cls, "--device", "cpu"))
    assert isinstance(plain, Prefetch) and len(plain) == 21  # a thread here: this process imported torch
    assert plain.samples is listed
    plain.stop()
    for extra in (["--reference"], ["--validate"], ["--cache", str(tmp_path)], ["--loader", "dali"],
                  ["--device", "cuda"], ["--weights", weights_3cls, weights_3cls]):
        assert _start_prefetch(_args(small_data, "--device", "cpu", *extra)) == (None, None), extra
    assert _start_prefetch(_args("--device", "cpu")) == (None, None)  # the demo
    assert _start_prefetch(_args(str(tmp_path / "missing"), "--device", "cpu")) == (None, None)  # reported later
    monkeypatch.setattr(prefetch_module, "MAX_SAMPLES", 20)
    listed, none = _start_prefetch(_args(small_data, "--device", "cpu"))
    assert none is None and len(listed) == 21  # listed once, handed on
    monkeypatch.setattr(prefetch_module, "MAX_SAMPLES", 512)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _start_prefetch(_args(small_data, "--device", "cpu")) == (None, None)


def test_started_before_torch_is_imported(small_data):
    code = textwrap.dedent(f"""
        import sys
        from fasteval.cli import _start_prefetch, build_parser
        _, pixels = _start_prefetch(build_parser().parse_args(["eval", {small_data!r}, "--device", "cpu"]))
        assert type(pixels).__name__ == "ForkedPrefetch"  # a center crop, torch not imported: a child decodes
        assert not [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision"))]
        pixels.get(len(pixels) - 1)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_command_on_every_file_kind_equals_the_reference(kinds_data, tmp_path, model_3cls, capsys):
    """The whole command: decoded at start-up, the 16-bit PNG too, and the reference's counts and losses
    of the rechecked samples."""
    weights = tmp_path / "w.pt"
    model = __import__("torchvision").models.resnet18(num_classes=2)
    torch.save(model.state_dict(), weights)
    common = [kinds_data, "--weights", str(weights), "--resize", "40", "--crop", "32", "--batch-size", "4",
              "--workers", "0", "--device", "cpu", "--no-progress"]
    # --compile off: the fast path itself (on 15 samples --compile auto sends every one to the reference's code)
    assert main(["eval", *common, "--compile", "off", "--json", str(tmp_path / "f.json")]) == 0
    assert main(["eval", *common, "--reference", "--json", str(tmp_path / "r.json")]) == 0
    fast, ref = (json.loads((tmp_path / name).read_text()) for name in ("f.json", "r.json"))
    assert fast["loader"] == "pil-cpu, decoded at start-up" and fast["pil_fallback_files"] == 0
    assert fast["loader_reason"].startswith("15 image(s) on the CPU (at most 512): PIL's pixels")
    assert "decoded while torch imported" in fast["loader_reason"] and ref.get("loader_reason") is None
    for key in ("samples", "correct_top1", "correct_top5"):
        assert fast[key] == ref[key]


def _fresh_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter (torch not imported: where the command forks its decoder)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_forked_decoder_gives_the_same_pixels_and_leaves_no_process(kinds_data, tmp_path):
    """The command's start-up decoder is a child forked before torch: the reference's pixels for every
    file kind; a file it cannot decode fails where it is read, naming it; the child is reaped."""
    import shutil

    shutil.copytree(kinds_data, tmp_path / "data")
    bad = tmp_path / "data" / "a" / "rgb.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    out = _fresh_python(f"""
        import os, sys
        from fasteval.data import prefetch
        from fasteval.data.pixels import reference_pixels
        from fasteval.data.preprocess import get_spec
        from fasteval.data.samples import discover
        from fasteval.errors import FastevalError
        samples, spec = discover({str(tmp_path / "data")!r}, quiet=True), get_spec("imagenet", 97, 61)
        pixels = prefetch.start(samples, spec)
        assert type(pixels).__name__ == "ForkedPrefetch", type(pixels)
        failed = []
        for i, path in enumerate(samples.paths):
            try:
                got = pixels.get(i)
            except FastevalError as exc:
                failed.append(str(exc))
                continue
            assert (got == reference_pixels(path, spec)).all(), path
        assert len(failed) == 1 and "cannot decode image" in failed[0] and "rgb.jpg" in failed[0], failed
        assert not pixels.running and pixels.decoded == len(samples) - 1
        with open(f"/proc/{{os.getpid()}}/task/{{os.getpid()}}/children") as f:
            assert not f.read().split(), "a child is left"
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_stopping_the_forked_decoder_ends_it_and_the_rest_is_decoded_where_asked(varied_data):
    out = _fresh_python(f"""
        import os
        from fasteval.data import prefetch
        from fasteval.data.pixels import reference_pixels
        from fasteval.data.preprocess import get_spec
        from fasteval.data.samples import discover
        samples, spec = discover({varied_data!r}, quiet=True), get_spec("imagenet")
        pixels = prefetch.start(samples, spec)
        pixels.stop()
        assert not pixels.running
        with open(f"/proc/{{os.getpid()}}/task/{{os.getpid()}}/children") as f:
            assert not f.read().split(), "a child is left"
        last = len(samples) - 1
        assert (pixels.get(last) == reference_pixels(samples.paths[last], spec)).all()
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_ctrl_c_while_decoding_at_start_up_ends_every_process(varied_data, weights_3cls):
    """SIGINT to the command's process group while torch imports and the child decodes: one line,
    exit 130, and nothing of the group left."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, "-m", "fasteval", "eval", varied_data, "--device", "cpu",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True,  # SIGINT as a terminal leaves it (a CI shell may ignore it)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.8)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err.decode() and "fasteval: interrupted" in err.decode()
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_a_fifo_first_in_data_is_reported_not_waited_on(small_data, tmp_path):
    """Listing DATA early must not open a FIFO (the open would block for ever): the header check reports it."""
    import shutil

    shutil.copytree(small_data, tmp_path / "data")
    os.mkfifo(tmp_path / "data" / "class_000" / "a_first.jpg")
    for extra in ([], ["--preset", "seed"]):
        out = subprocess.run([sys.executable, "-m", "fasteval", "eval", str(tmp_path / "data"), "--device", "cpu",
                              "--no-progress", *extra], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "not a regular file" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_large_dataset_is_listed_once(tmp_path, monkeypatch, capsys):
    """Over the start-up limit the command lists DATA early anyway and hands that list on (a listing
    warning printed once, not twice)."""
    from fasteval.data.synth import synth_dataset

    root = synth_dataset(tmp_path / "data", classes=1, per_class=6, size="40x40", seed=2)
    os.symlink("img_00000.jpg", os.path.join(root, "class_000", "img_zlink.jpg"))
    monkeypatch.setattr(prefetch_module, "MAX_SAMPLES", 3)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    listed, pixels = _start_prefetch(_args(root, "--device", "cpu"))
    assert pixels is None and len(listed) == 7
    capsys.readouterr()
    assert main(["eval", root, "--device", "cpu", "--no-progress", "--compile", "off", "--resize", "40",
                 "--crop", "32"]) == 0
    assert capsys.readouterr().err.count("already listed") == 1


def test_outputs_are_written_before_the_table_is_printed(small_data, weights_3cls, tmp_path):
    """stdout closed early (``| head``): one line, exit 2, and the JSON and CSV written all the same."""
    proc = subprocess.Popen([sys.executable, "-m", "fasteval", "eval", small_data, "--weights", weights_3cls,
                             "--device", "cpu", "--no-progress", "--resize", "40", "--crop", "32",
                             "--json", str(tmp_path / "r.json"), "--predictions", str(tmp_path / "p.csv")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and b"broken pipe" in err and b"Traceback" not in err
    assert json.loads((tmp_path / "r.json").read_text())["samples"] == 21
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 22


def test_stopping_a_stopped_decoder_does_not_wait_for_it(varied_data):
    """A child that cannot run (stopped, here) is killed, not waited on: Ctrl-C still ends the command."""
    out = _fresh_python(f"""
        import os, signal, time
        from fasteval.data import prefetch
        from fasteval.data.preprocess import get_spec
        from fasteval.data.samples import discover
        pixels = prefetch.start(discover({varied_data!r}, quiet=True), get_spec("imagenet"))
        os.kill(pixels._pid, signal.SIGSTOP)
        start = time.monotonic()
        pixels.stop()
        assert time.monotonic() - start < 3 and not pixels.running
        print("ok")
    """, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
