"""The DALI pipeline's tuning (fasteval/data/dali_settings.py): chosen with a reason each, overridable with
``--dali``, and passed to DALI as chosen (read back from the graph DALI builds, a CUDA pipeline's too, which
DALI lays out without a GPU); the chroma upsampling checked against PIL's pixels as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fasteval.cli import main
from fasteval.data.dali_settings import DaliOverrides, DaliSettings, choose_settings, parse_overrides
from fasteval.data.loader_dali import dali_available
from fasteval.data.samples import discover

needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI not installed")

# 100 JPEGs: most 500x375, some portrait, one 12-megapixel photo the hints must not follow.
SIZES = [(500, 375)] * 90 + [(333, 500)] * 9 + [(4000, 3000)]


def _p99(values: list[int]) -> int:
    return int(np.percentile(values, 99, method="inverted_cdf"))  # the nearest rank, computed by numpy


def test_gpu_settings_and_their_reasons():
    settings, reason = choose_settings(True, 16, 8, "bf16", SIZES)
    hint = (_p99([w for w, _ in SIZES]), _p99([h for _, h in SIZES]))
    assert hint == (500, 500)
    assert settings == DaliSettings(threads=14, prefetch=3, output_dtype="fp16", fancy_upsampling=True,
                                    hw_decoder_load=0.75, size_hint=hint)
    for clause in ("14 decoding thread(s): the 16 usable cores less two", "hw_decoder_load 0.75", "DALI's default 0.65",
                   "size hints 500x500: the 99th percentile of the 100 JPEGs'", "prefetch 3",
                   "output fp16: DALI 2.4's crop_mirror_normalize writes FLOAT, FLOAT16, INT8 or UINT8, no bfloat16",
                   "jpeg_fancy_upsampling"):
        assert clause in reason, clause
    assert choose_settings(True, 16, 8, "fp32", SIZES)[0].output_dtype == "fp32"
    assert choose_settings(True, 16, 8, "fp16", SIZES)[0].output_dtype == "fp16"
    assert choose_settings(True, 2, 8, "bf16", SIZES)[0].threads == 1
    shared, why = choose_settings(True, 16, 8, "bf16", SIZES, ranks=4)  # 4 torchrun ranks on these cores
    assert shared.threads == 2 and "the 16 usable cores shared by 4 local ranks (4 each) less two" in why
    none, why = choose_settings(True, 16, 8, "bf16", [])
    assert none.size_hint is None and "no size hints: no JPEG" in why


def test_cpu_settings_keep_the_measured_cpu_path():
    settings, reason = choose_settings(False, 2, 2, "bf16", SIZES)
    assert settings == DaliSettings(threads=2, prefetch=2, output_dtype="fp32", fancy_upsampling=True)
    assert "--workers" in reason and "prefetch 2" in reason and "hw_decoder_load" not in reason


def test_overrides_win_and_say_so():
    given = parse_overrides(" hw_decoder_load=0.9, threads=12,prefetch=4,size_hint=640x480")
    assert given == DaliOverrides(hw_decoder_load=0.9, threads=12, prefetch=4, size_hint=(640, 480))
    settings, reason = choose_settings(True, 16, 8, "bf16", SIZES, given)
    got = (settings.hw_decoder_load, settings.threads, settings.prefetch, settings.size_hint)
    assert got == (0.9, 12, 4, (640, 480))
    assert all(f"--dali {key}" in reason for key in ("threads", "hw_decoder_load", "size_hint", "prefetch"))
    assert choose_settings(True, 16, 8, "bf16", SIZES, parse_overrides("size_hint=none"))[0].size_hint is None
    cpu, why = choose_settings(False, 2, 2, "bf16", SIZES, parse_overrides("hw_decoder_load=0.5,threads=1"))
    assert cpu.threads == 1 and cpu.hw_decoder_load is None and "not used on the CPU" in why


@pytest.mark.parametrize("text,message", [("threads=0", "threads: expected an integer >= 1"),
                                          ("hw_decoder_load=1.5", "hw_decoder_load: expected a number from 0 to 1"),
                                          ("size_hint=640", "size_hint: expected WIDTHxHEIGHT or none"),
                                          ("speed=9", "KEY one of"), ("prefetch", "KEY one of"),
                                          ("threads=2,threads=3", "threads given twice"), (",", "got nothing")])
def test_bad_overrides_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(text)


def test_a_bad_dali_option_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "x", "--dali", "hw_decoder_load=2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--dali" in err and "from 0 to 1" in err


def _graph(pipe) -> dict[str, dict[str, str]]:
    """Each operator's arguments as DALI recorded them in its graph (DALI's own OpSpec text: its private graph
    builder, which lays out a CUDA pipeline without touching a GPU), by operator schema."""
    pipe._build_graph()
    found = {}
    for op in pipe._ops:
        head, _, rest = str(op.spec).partition("Arguments:")
        schema = head.splitlines()[0].removeprefix("OpSpec for ").rstrip(":")
        found[schema] = dict(line.strip().split(": ", 1) for line in rest.splitlines() if ": " in line)
    return found


@needs_dali
def test_a_cuda_pipeline_gets_the_gpu_arguments(small_data, small_spec):
    import nvidia.dali.types as types

    from fasteval.data.loader_dali import build_pipeline

    settings = DaliSettings(14, 3, "fp16", True, 0.75, (500, 375))
    pipe = build_pipeline(discover(small_data, quiet=True), small_spec, 4, settings, torch.device("cuda:1"))
    assert (pipe.num_threads, pipe.prefetch_queue_depth, pipe.device_id) == (14, 3, 1)
    graph = _graph(pipe)
    decoder = graph["decoders__Image"]
    assert decoder["device"] == "mixed" and decoder["jpeg_fancy_upsampling"] == "True"
    assert float(decoder["hw_decoder_load"]) == 0.75
    assert (decoder["preallocate_width_hint"], decoder["preallocate_height_hint"]) == ("500", "375")
    assert graph["CropMirrorNormalize"]["device"] == "gpu"
    assert graph["CropMirrorNormalize"]["dtype"] == str(int(types.DALIDataType.FLOAT16))


@needs_dali
def test_a_cpu_pipeline_leaves_the_gpu_arguments_out_and_runs_with_its_settings(small_data, small_spec):
    import nvidia.dali.types as types

    from fasteval.data.loader_dali import DaliLoader, build_pipeline

    samples = discover(small_data, quiet=True)
    settings = DaliSettings(2, 2, "fp32", True, 0.75, (500, 375))  # GPU-only values a CPU pipeline must drop
    decoder = _graph(build_pipeline(samples, small_spec, 4, settings, torch.device("cpu")))["decoders__Image"]
    assert decoder["device"] == "cpu" and decoder["jpeg_fancy_upsampling"] == "True"
    assert not {"hw_decoder_load", "preallocate_width_hint", "preallocate_height_hint"} & set(decoder)
    plain = DaliLoader(samples, small_spec, 8, 1, torch.device("cpu"), settings=DaliSettings(1, 2, "fp32"))
    half = DaliLoader(samples, small_spec, 8, 1, torch.device("cpu"), settings=DaliSettings(2, 3, "fp16"))
    assert (half._pipe.num_threads, half._pipe.prefetch_queue_depth) == (2, 3)
    for a, b in zip(plain, half):
        assert a.images.dtype == torch.float32 and b.images.dtype == torch.float16
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        # DALI's fp16 is its fp32 result rounded: within half an fp16 step of it
        assert torch.allclose(b.images.float(), a.images, rtol=2 ** -11, atol=2 ** -24)
    assert str(int(types.DALIDataType.FLOAT16)) == _graph(half._pipe)["CropMirrorNormalize"]["dtype"]


def _subsampled_jpegs(folder) -> list[str]:
    """4:2:0 JPEGs (PIL, quality 90) with colour edges, where chroma upsampling shows, of odd and even sizes."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(64, 48), (199, 260), (333, 500), (97, 131)]):
        y, x = np.mgrid[0:h, 0:w]
        image = np.stack([x * 255 // w, y * 255 // h, (x // 8 + y // 8) % 2 * 255], -1)
        image = image + rng.integers(-30, 30, (h, w, 3))
        path = str(folder / f"{i}.jpg")
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, quality=90, subsampling=2)
        with Image.open(path) as f:
            assert f.layer[0][1:3] == (2, 2)  # luma sampled 2x2: chroma at half resolution both ways
        paths.append(path)
    return paths


def _decode_errors(paths: list[str], device: str, fancy: bool) -> tuple[int, float]:
    """Max and mean |DALI - PIL| over the files' pixels, DALI decoding with ``jpeg_fancy_upsampling=fancy``."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=0 if device == "mixed" else None)
    def pipe():
        encoded, _ = fn.readers.file(files=paths, labels=list(range(len(paths))))
        return fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=False,
                                 jpeg_fancy_upsampling=fancy)

    p = pipe()
    p.build()
    (out,) = p.run()
    out = out.as_cpu() if device == "mixed" else out
    errors = []
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            errors.append(np.abs(np.array(out[i]).astype(int) - np.asarray(image.convert("RGB")).astype(int)))
    return int(max(e.max() for e in errors)), float(np.mean([e.mean() for e in errors]))


@needs_dali
def test_the_cpu_decoder_gives_pils_pixels_with_the_planned_upsampling(tmp_path):
    """Measured 2026-12-06 (DALI 2.4.0, CPU): max 0 and mean 0 against PIL with jpeg_fancy_upsampling on and
    off; the plan's setting (on) is the better or equal one, and exact."""
    paths = _subsampled_jpegs(tmp_path)
    planned = choose_settings(False, 2, 2, "fp32", [])[0].fancy_upsampling
    chosen, other = _decode_errors(paths, "cpu", planned), _decode_errors(paths, "cpu", not planned)
    assert chosen == (0, 0.0) and chosen <= other


@pytest.mark.cuda
@needs_dali
def test_the_gpu_decoder_with_the_planned_upsampling_is_closer_to_pil(tmp_path):
    """The ``mixed`` decoder: the plan's chroma upsampling is at least as close to PIL's pixels as the other,
    both in the largest and the mean difference (the measured figures go in the report of the GPU run)."""
    paths = _subsampled_jpegs(tmp_path)
    planned = choose_settings(True, 16, 8, "fp32", [])[0].fancy_upsampling
    chosen, other = _decode_errors(paths, "mixed", planned), _decode_errors(paths, "mixed", not planned)
    print(f"mixed decoder vs PIL: planned (fancy={planned}) max {chosen[0]} mean {chosen[1]:.4f}; "
          f"other max {other[0]} mean {other[1]:.4f}")
    assert chosen[0] <= other[0] and chosen[1] <= other[1]


@pytest.mark.parametrize("command", ["bench", "train"])
def test_only_eval_takes_dali(command, capsys):
    """bench's timed commands and train's validation would not pass --dali on: refused there, not ignored."""
    with pytest.raises(SystemExit) as exc:
        main([command, "x", "--dali", "threads=2"] + (["y", "--out", "z"] if command == "train" else []))
    assert exc.value.code == 2 and "--dali" in capsys.readouterr().err


def test_the_evaluator_builds_dali_with_the_plans_settings(small_data, small_spec, model_3cls):
    """The plan's DALI decision (here --dali threads=1,prefetch=3 over the CPU rule) is what the loader the
    evaluator builds runs with, not the loader's own defaults."""
    from fasteval.data.dali_settings import parse_overrides
    from fasteval.evaluation.fast import FastEvaluator, FastOptions

    samples = discover(small_data, quiet=True)
    options = FastOptions(loader="dali", precision="fp32", compile="off", batch_size=8, workers=2, exact="off",
                          dali=parse_overrides("threads=1,prefetch=3"))
    evaluator = FastEvaluator(samples, model_3cls, small_spec, torch.device("cpu"), options)
    planned = evaluator.plan.dali_settings
    assert (planned.threads, planned.prefetch) == (1, 3)
    assert evaluator.loader.settings == planned
    assert (evaluator.loader._pipe.num_threads, evaluator.loader._pipe.prefetch_queue_depth) == (1, 3)
