"""The plan as a function: table-driven cases, no model run (the model given raises if called)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import fasteval.evaluation.plan as plan_module
from fasteval.data.samples import discover
from fasteval.errors import FastevalError
from fasteval.evaluation.exact import WholeRun
from fasteval.evaluation.plan import DECISIONS, SMALL_DATASET, FastOptions, make_plan, reference_plan
from fasteval.evaluation.route import Rates, rates_key, save_rates
from fasteval.model.compile_cache import Profile, decide, leaf_modules, profile_dir, save_profile
from fasteval.model.inference import resolve_precision

CPU = torch.device("cpu")


class NoRun(nn.Module):
    """A 3-class ResNet-18's parameters that refuses to run: planning must not evaluate anything."""

    def __init__(self) -> None:
        import torchvision

        super().__init__()
        torch.manual_seed(0)
        self.net = torchvision.models.resnet18(num_classes=3)

    def forward(self, x):
        raise AssertionError("the planner ran the model")


@pytest.fixture(scope="module")
def no_run():
    return NoRun()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


class Sharded(WholeRun):
    """One shard of a larger run: the whole-run decisions must be the one-process ones."""

    sharded = True

    def __init__(self, total: int) -> None:
        self.whole = total

    def total(self, local: int) -> int:
        return self.whole


# (name, options, make_plan keywords, expected decisions' values). 21 samples of 72x60, crop 32.
CASES = [
    ("small CPU run, decoded at start", dict(compile="off"), dict(decoded_at_start=True),
     dict(route="fast", loader="pil-pixels", startup_decoding=True, batch_shape=21, compile=False, exact=True,
          calibration=8, by_reference=0)),
    ("small CPU run, no start-up decoding", dict(compile="off"), {},
     dict(route="fast", loader="pil-pixels", startup_decoding=False, compile=False)),
    ("batch shape: equal batches on the CPU", dict(compile="off", batch_size=8), {},
     dict(batch_shape=7, route="fast")),
    ("torchvision loader asked", dict(compile="off", loader="torchvision"), {},
     dict(loader="pil-pixels")),
    ("a decoded store (sweep)", dict(compile="off"), dict(source="store", passes=3),
     dict(loader="decoded store (pil-pixels, host)", startup_decoding=False)),
    ("exact off", dict(compile="off", exact="off"), {}, dict(exact=False, calibration=0)),
    ("compile on", dict(compile="on"), {}, dict(compile=True)),
    ("compile auto, never measured", dict(compile="auto"), {}, dict(compile="measure", route="fast")),
    ("a shard of a 600-image run: the loader a 600-image run gets",
     dict(compile="off", loader="torchvision"), dict(scope=Sharded(600)),
     dict(loader="torchvision-cpu", route="fast", batch_shape=60)),  # 10 equal batches of 600
]


@pytest.mark.parametrize("name,options,kwargs,expected", CASES, ids=[c[0] for c in CASES])
def test_plan_cases(name, options, kwargs, expected, small_data, small_spec, no_run, fresh_cache):
    samples = discover(small_data, quiet=True)
    plan = make_plan(samples, no_run, small_spec, CPU, FastOptions(**{"batch_size": 64, **options}), **kwargs)
    values = {key: plan.decisions()[key].value for key in expected}
    assert values == expected
    for decision in plan.decisions().values():  # every decision says why
        assert isinstance(decision.reason, str) and decision.reason
    assert sorted(plan.main + plan.reference_only) == list(range(len(samples)))


def test_plan_is_a_frozen_value_with_a_json_form(small_data, small_spec, no_run, fresh_cache):
    samples = discover(small_data, quiet=True)
    options = FastOptions(compile="off", batch_size=8)
    plan = make_plan(samples, no_run, small_spec, CPU, options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.route = None
    as_json = json.loads(json.dumps(plan.to_json()))
    assert list(as_json) == list(DECISIONS)
    assert {"route", "loader", "batch_shape", "precision", "compile", "exact"} <= set(as_json)
    assert all(set(d) == {"value", "reason"} for d in as_json.values())
    assert as_json["batch_shape"] == {"value": 7, "reason": "3 batch(es) of 7: as equal as --batch-size 8 "
                                                            "allows, 0 padding row(s) in one process (batches "
                                                            "of 8 would pad 3)"}
    assert make_plan(samples, no_run, small_spec, CPU, options) == plan  # a function of its inputs
    assert as_json["precision"]["value"] == resolve_precision("auto", CPU)


def test_a_tiny_run_goes_wholly_by_the_reference_and_says_fp32_eager(small_data, small_spec, no_run, fresh_cache):
    samples = discover(small_data, quiet=True).subset(list(range(SMALL_DATASET)))
    plan = make_plan(samples, no_run, small_spec, CPU, FastOptions(compile="on", precision="bf16"))
    got = {k: d.value for k, d in plan.decisions().items() if k != "preprocessing"}
    assert got == {"route": "reference", "loader": "none", "dali": None, "startup_decoding": False,
                   "batch_shape": SMALL_DATASET,
                   "precision": "fp32", "compile": False, "exact": True, "calibration": 0,
                   "by_reference": SMALL_DATASET, "workers": 2, "metrics_backend": "torch"}
    assert plan.main == () and plan.reference_only == tuple(range(SMALL_DATASET))
    # --exact off: nothing forces the reference's code; the fast path runs as asked
    off = make_plan(samples, no_run, small_spec, CPU, FastOptions(compile="on", precision="bf16", exact="off"))
    assert (off.route.value, off.precision.value, off.compile.value) == ("fast", "bf16", True)


def test_compile_auto_decides_from_the_profile(small_data, small_spec, no_run, fresh_cache):
    """A profile with a measured eager batch: the plan decides with compile_cache.decide's rule and says so."""
    samples = discover(small_data, quiet=True)
    options = FastOptions(compile="auto", batch_size=8, exact="off")
    first = make_plan(samples, no_run, small_spec, CPU, options)
    assert first.compile.value == "measure" and first.compile_key is not None
    for eager, compiled in ((0.001, 0.0009), (100.0, 1.0)):  # a saving far below and far above the cost
        profile = Profile(key=first.compile_key, eager_batch_seconds=eager, compiled_batch_seconds=compiled)
        save_profile(profile_dir(CPU), profile)
        plan = make_plan(samples, no_run, small_spec, CPU, options)
        expected = decide(profile, "cpu", len(samples), 7, eager, leaf_modules(no_run))
        assert (plan.compile.value, plan.compile.reason) == (expected.compile, expected.reason)
    assert plan.compile.value is True


def test_benchs_timed_loop_says_why_it_compiles(small_data, small_spec, no_run, fresh_cache):
    """bench turns --compile auto into a compiled loop: the plan says bench did, not "--compile on"; a --compile the
    user gave is kept and named as theirs."""
    from fasteval.bench import bench_loop_options

    samples = discover(small_data, quiet=True)
    plan = make_plan(samples, no_run, small_spec, CPU, bench_loop_options(FastOptions(compile="auto", exact="off")))
    assert plan.compile.value is True and plan.compile.reason.startswith("bench times the fast loop compiled")
    assert plan.route.reason.startswith("bench times the fast loop compiled")
    off = make_plan(samples, no_run, small_spec, CPU, bench_loop_options(FastOptions(compile="off", exact="off")))
    assert off.compile.value is False and off.compile.reason.startswith("--compile off")


def test_route_from_measured_rates(small_data, small_spec, no_run, fresh_cache):
    """With the route on and --compile auto, rates saying the fast path cannot pay send every sample to the
    reference's code; rates saying it pays keep the fast path. Both keep the rates to record into."""
    samples = discover(small_data, quiet=True)
    options = FastOptions(compile="auto", route=True)
    precision = resolve_precision("auto", CPU)
    key = rates_key(no_run, CPU, precision, (32, 32))
    save_rates(CPU, Rates(key=key, reference_image_seconds=1e-4, fast_image_seconds=1.0, fast_setup_seconds=9.0))
    slow = make_plan(samples, no_run, small_spec, CPU, options)
    assert slow.route.value == "reference" and "would not pay" in slow.route.reason
    assert (slow.precision.value, slow.compile.value, slow.loader.value) == ("fp32", False, "none")
    assert slow.rates is not None and slow.records_rates
    save_rates(CPU, Rates(key=key, reference_image_seconds=1.0, fast_image_seconds=1e-4, fast_setup_seconds=0.0))
    fast = make_plan(samples, no_run, small_spec, CPU, options)
    assert fast.route.value == "fast" and fast.route.reason.startswith("fast path")
    assert fast.precision.value == precision
    # A shard never routes (every rank must take the same route), nor does --compile on
    assert make_plan(samples, no_run, small_spec, CPU, options, scope=Sharded(21)).route.value == "fast"
    assert make_plan(samples, no_run, small_spec, CPU, FastOptions(compile="on", route=True)).rates is None


def test_files_dali_decodes_differently_go_by_the_reference(small_data, small_spec, no_run, fresh_cache,
                                                            monkeypatch):
    """With DALI (a run too large for PIL's pixels), the files ``needs_pil`` names are the reference's."""
    monkeypatch.setattr(plan_module, "needs_pil", lambda samples: [2, 5])
    monkeypatch.setattr(plan_module, "resolve_loader", lambda kind: "dali")
    samples = discover(small_data, quiet=True)
    plan = make_plan(samples, no_run, small_spec, CPU, FastOptions(compile="off", loader="dali"),
                     scope=Sharded(1000))
    assert plan.loader.value == "dali-cpu" and plan.by_reference.value == 2 and plan.reference_only == (2, 5)
    assert 2 not in plan.main and 5 not in plan.main and len(plan.main) == 19
    assert set(plan.calibration_indices) <= set(plan.main)
    # The torchvision loaders decode with PIL already: no file goes by the reference
    monkeypatch.setattr(plan_module, "resolve_loader", lambda kind: "torchvision")
    tv = make_plan(samples, no_run, small_spec, CPU, FastOptions(compile="off"), scope=Sharded(1000))
    assert tv.by_reference.value == 0 and tv.reference_only == ()


def test_bad_options_and_files_are_refused_while_planning(small_data, small_spec, no_run, fresh_cache, tmp_path):
    samples = discover(small_data, quiet=True)
    with pytest.raises(FastevalError, match="--precision fp16"):
        make_plan(samples, no_run, small_spec, CPU, FastOptions(precision="fp16"))
    with pytest.raises(FastevalError, match="--exact"):
        make_plan(samples, no_run, small_spec, CPU, FastOptions(exact="maybe"))
    bad = tmp_path / "data" / "a"
    bad.mkdir(parents=True)
    (bad / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(FastevalError, match="x.jpg"):
        make_plan(discover(str(tmp_path / "data"), quiet=True), no_run, small_spec, CPU, FastOptions())


def test_reference_plan_is_the_plain_loop():
    plan = reference_plan(21, 64, 2)
    assert {k: d.value for k, d in plan.decisions().items() if k != "preprocessing"} == {
        "route": "reference", "loader": "none", "dali": None, "startup_decoding": False, "batch_shape": 21,
        "precision": "fp32",
        "compile": False, "exact": True, "calibration": 0, "by_reference": 21, "workers": 2,
        "metrics_backend": "torch"}


# --- the commands: --explain, the JSON plan, the table -------------------------------------------------------

SMALL = ["--resize", "40", "--crop", "32", "--workers", "0", "--no-progress"]


@pytest.fixture
def nothing_runs(monkeypatch):
    """--explain evaluates nothing: any evaluation fails the test. Modules that bind ``evaluate_reference`` at
    import are imported first, so that they keep the real one after the test."""
    import fasteval.bench  # noqa: F401
    import fasteval.evaluation.fast as fast
    import fasteval.evaluation.reference as reference

    def refuse(*args, **kwargs):
        raise AssertionError("--explain evaluated")

    monkeypatch.setattr(fast.FastEvaluator, "__init__", refuse)
    monkeypatch.setattr(reference, "evaluate_reference", refuse)


def test_eval_explain_prints_and_writes_the_plan(small_data, weights_3cls, tmp_path, capsys, nothing_runs,
                                                 fresh_cache):
    from fasteval.cli import main

    out = tmp_path / "plan.json"
    assert main(["eval", small_data, "--weights", weights_3cls, *SMALL, "--explain", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("fasteval eval --explain: the plan (nothing evaluated)")
    report = json.loads(out.read_text())
    assert report["explain"] is True and list(report["plan"]) == list(DECISIONS)
    for name, decision in report["plan"].items():  # each value printed on its row, its reason below it
        assert set(decision) == {"value", "reason"} and decision["reason"]
        assert decision["reason"].split()[0] in text
    assert "correct_top1" not in report and "samples" not in report


def test_validate_explain_gives_both_plans_and_reference_explain_the_plain_loop(small_data, weights_3cls, tmp_path,
                                                                                capsys, nothing_runs, fresh_cache):
    from fasteval.cli import main

    out = tmp_path / "v.json"
    assert main(["eval", small_data, "--weights", weights_3cls, *SMALL, "--validate", "--explain",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["reference"]["plan"]["precision"]["value"] == "fp32" and list(report["plan"]) == list(DECISIONS)
    assert "the reference's plan" in capsys.readouterr().out
    assert main(["eval", small_data, "--weights", weights_3cls, *SMALL, "--reference", "--explain"]) == 0
    text = capsys.readouterr().out
    assert "the reference's plan" in text and "--explain: the plan (" not in text


def test_train_and_bench_explain_write_nothing(small_data, tmp_path, capsys, nothing_runs, fresh_cache):
    from fasteval.cli import main

    run = tmp_path / "run"
    assert main(["train", small_data, small_data, "--out", str(run), *SMALL, "--epochs", "2", "--explain"]) == 0
    assert "fasteval train (validation, 2 epoch(s)) --explain" in capsys.readouterr().out and not run.exists()
    assert main(["bench", small_data, *SMALL, "--explain"]) == 0
    text = capsys.readouterr().out
    assert "fasteval bench --explain: the plan" in text and "the reference's plan" in text


def test_a_run_reports_the_plan_it_executed(small_data, weights_3cls, tmp_path, capsys, fresh_cache):
    """The JSON's plan is the executed one (compile resolved from 'measure'), and the table shows it; a run the
    route sends to the reference's code says so first and shows fp32 eager, no loader."""
    from fasteval.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", small_data, "--weights", weights_3cls, *SMALL, "--compile", "auto", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    plan = report["plan"]
    text = capsys.readouterr().out.splitlines()
    if plan["route"]["value"] == "reference":  # 21 samples with the assumed rates: the reference's code
        assert text[2].startswith("route") and "every sample by the reference's code" in text[2]
        assert (plan["precision"]["value"], plan["compile"]["value"], plan["loader"]["value"]) == ("fp32", False,
                                                                                                    "none")
        assert report["precision"] == "fp32" and not any(line.startswith("exact counts") for line in text)
    assert plan["compile"]["value"] in (True, False) and report["compile"] == plan["compile"]["value"]
    assert any(line.startswith("compile ") for line in text)
    ran = main(["eval", small_data, "--weights", weights_3cls, *SMALL, "--compile", "off", "--json", str(out)])
    plan = json.loads(out.read_text())["plan"]
    assert ran == 0 and plan["route"]["value"] == "fast" and plan["compile"] == {
        "value": False, "reason": "--compile off: eager (channels-last + autocast)"}
    assert plan["precision"]["value"] == resolve_precision("auto", CPU)


def test_torchrun_merges_the_ranks_plans_counting_every_rank():
    """Each rank plans its shard: the merged plan is the first evaluating rank's, its count of samples by the
    reference's code the sum over the ranks (one process would count them all)."""
    from fasteval.distributed import merge_extra

    def extra(count: int) -> dict:
        plan = reference_plan(4, 4, 0).to_json()
        return {"plan": {**plan, "by_reference": {"value": count, "reason": "r"}}, "pil_fallback_files": count}

    merged = merge_extra([extra(1), extra(0), extra(2)], [4, 4, 4])
    assert merged["plan"]["by_reference"] == {"value": 3, "reason": "r"} and merged["pil_fallback_files"] == 3
    assert merged["plan"]["precision"] == reference_plan(4, 4, 0).to_json()["precision"]


def test_a_bicubic_resize_never_goes_to_dali(small_data, small_spec, no_run, fresh_cache, monkeypatch):
    """DALI's resize filters are not PIL's: a bicubic spec takes torchvision's loader under auto (counting no
    file as DALI's), and --loader dali is refused while planning, in one line."""
    monkeypatch.setattr(plan_module, "resolve_loader", lambda kind: "dali" if kind in ("auto", "dali") else kind)
    monkeypatch.setattr(plan_module, "needs_pil", lambda samples: [1])
    samples = discover(small_data, quiet=True)
    bicubic = dataclasses.replace(small_spec, interpolation="bicubic")
    plan = make_plan(samples, no_run, bicubic, CPU, FastOptions(compile="off"), scope=Sharded(1000))
    assert plan.loader.value == "torchvision-cpu" and "bicubic" in plan.loader.reason
    assert plan.by_reference.value == 0
    assert make_plan(samples, no_run, small_spec, CPU, FastOptions(compile="off"),
                     scope=Sharded(1000)).loader.value == "dali-cpu"  # bilinear: DALI where installed
    with pytest.raises(FastevalError, match="--loader dali: DALI's bicubic resize is not PIL's"):
        make_plan(samples, no_run, bicubic, CPU, FastOptions(loader="dali"), scope=Sharded(1000))


def test_a_stores_placement_is_planned(small_data, small_spec, no_run, fresh_cache, monkeypatch):
    """A decoded store's placement is the plan's, from its size and the memory free: host memory where it fits;
    else the --cache file memory-mapped, or decoding again each pass without a cache."""
    import fasteval.data.decoded as decoded

    samples = discover(small_data, quiet=True)
    options = FastOptions(compile="off", exact="off")
    plan = make_plan(samples, no_run, small_spec, CPU, options, source="store", passes=2)
    assert plan.store_placement == decoded.choose_placement(21 * 3 * 32 * 32, CPU, False)
    assert plan.store_placement[0] == "host" and plan.loader.value == "decoded store (pil-pixels, host)"
    monkeypatch.setattr(decoded, "available_host_memory", lambda: 1024)
    mapped = make_plan(samples, no_run, small_spec, CPU, options, source="store", passes=2, cached=True)
    again = make_plan(samples, no_run, small_spec, CPU, options, source="store", passes=2)
    assert (mapped.store_placement[0], again.store_placement[0]) == ("mapped", "redecode")
    assert "memory-mapped --cache file" in mapped.loader.reason
    assert make_plan(samples, no_run, small_spec, CPU, options).store_placement is None  # a loader: no store


def test_a_transform_run_as_given_takes_its_own_loader(small_data, no_run, fresh_cache):
    """A caller's transform fasteval's decoders do not reproduce: no PIL pixels, no DALI (refused if asked), its
    own DataLoader; the recheck still runs (it runs the same transform)."""
    from PIL import Image
    from torchvision import transforms as T

    from fasteval.data.transform_spec import spec_from_transform

    samples = discover(small_data, quiet=True)
    flip = T.Compose([T.Resize((32, 32)), T.RandomHorizontalFlip(p=1.0), T.ToTensor()])
    with Image.open(samples.paths[0]) as image:
        spec = spec_from_transform(flip, image.convert("RGB"))
    assert spec.runs_as_given and (spec.crop, spec.resize) == (32, 32)
    plan = make_plan(samples, no_run, spec, CPU, FastOptions(compile="off"))
    assert plan.loader.value == "the transform given, in DataLoader workers" and plan.exact.value is True
    assert plan.startup_decoding.value is False and plan.input_hw == (32, 32)
    with pytest.raises(FastevalError, match="--loader dali: the transform given is not one DALI reproduces"):
        make_plan(samples, no_run, spec, CPU, FastOptions(compile="off", loader="dali"))


def _fake_cuda(monkeypatch) -> torch.device:
    """A CUDA device for the planner: torch.cuda's two questions it asks answered as an H100 would (nothing runs)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3 (fake)")
    return torch.device("cuda")


def test_dali_is_tuned_by_the_plan_on_a_gpu_and_on_the_cpu(small_data, small_spec, no_run, fresh_cache, monkeypatch):
    """With DALI installed: on a (faked) H100 the plan tunes the mixed pipeline (threads, the hardware decoder's
    share, size hints from the headers, prefetch 3, fp16 out under bf16, PIL's chroma upsampling), the compile key
    is for fp16 input, and the fast model's calls get cudnn.benchmark; on the CPU the measured CPU path stays;
    --dali overrides; another loader has no DALI decision."""
    from fasteval.data.dali_settings import DaliSettings, parse_overrides

    monkeypatch.setattr(plan_module, "resolve_loader", lambda kind: "dali" if kind in ("auto", "dali") else kind)
    monkeypatch.setattr(plan_module, "usable_cores", lambda: 16)
    samples = discover(small_data, quiet=True)  # 21 JPEGs of 72x60
    gpu = make_plan(samples, no_run, small_spec, _fake_cuda(monkeypatch), FastOptions(compile="off"))
    assert gpu.loader.value == "dali-gpu" and gpu.precision.value == "bf16"
    assert gpu.dali_settings == DaliSettings(threads=14, prefetch=3, output_dtype="fp16", fancy_upsampling=True,
                                             hw_decoder_load=0.75, size_hint=(72, 60))
    assert gpu.dali.value == gpu.dali_settings.to_json() and "size hints 72x60" in gpu.dali.reason
    assert gpu.input_dtype == "fp16" and gpu.compile_key["input_dtype"] == "float16"
    assert "cudnn.benchmark on" in gpu.precision.reason and "the dali decision" in gpu.workers.reason
    tuned = make_plan(samples, no_run, small_spec, torch.device("cuda"),
                      FastOptions(compile="off", precision="fp32", dali=parse_overrides("threads=3,hw_decoder_load=1")))
    assert (tuned.dali_settings.threads, tuned.dali_settings.hw_decoder_load) == (3, 1.0)
    assert tuned.input_dtype == "fp32" and "--dali threads" in tuned.dali.reason
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # a torchrun rank, 4 on this machine: a quarter of the cores each
    rank = make_plan(samples, no_run, small_spec, torch.device("cuda"), FastOptions(compile="off"), scope=Sharded(84))
    assert rank.dali_settings.threads == 2 and "shared by 4 local ranks" in rank.dali.reason

    cpu = make_plan(samples, no_run, small_spec, CPU, FastOptions(compile="off", workers=2), scope=Sharded(1000))
    assert cpu.loader.value == "dali-cpu"
    assert cpu.dali_settings == DaliSettings(threads=2, prefetch=2, output_dtype="fp32", fancy_upsampling=True)
    assert cpu.input_dtype == "fp32" and "cudnn" not in cpu.precision.reason
    assert "DALI's decoding threads" in cpu.workers.reason
    tv = make_plan(samples, no_run, small_spec, CPU, FastOptions(compile="off", loader="torchvision"),
                   scope=Sharded(1000))
    assert tv.dali.value is None and tv.dali_settings is None and "torchvision" in tv.dali.reason


def test_explain_shows_the_dali_decision(small_data, weights_3cls, tmp_path, capsys, nothing_runs, fresh_cache,
                                         monkeypatch):
    """--explain prints every DALI choice with its reason, and --json holds them."""
    if not plan_module.resolve_loader("auto") == "dali":
        pytest.skip("DALI not installed")
    from fasteval.cli import main

    out = tmp_path / "plan.json"
    rc = main(["eval", small_data, "--weights", weights_3cls, "--arch", "resnet18", *SMALL, "--device", "cpu",
               "--loader", "dali", "--compile", "off", "--dali", "threads=1,prefetch=3", "--explain", "--json",
               str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "dali" in text and "--dali threads" in text and "--dali prefetch" in text
    assert json.loads(out.read_text())["plan"]["dali"]["value"]["prefetch"] == 3
