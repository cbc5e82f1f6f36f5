"""Compile caching (keys, folders, profiles), the ``--compile auto`` decision, and the bench's time to result
and per-process memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

from fasteval.model import compile_cache as cc
from fasteval.bench import _plan, eval_argv, run_command, time_to_result
from fasteval.cli import build_parser, main
from fasteval.errors import FastevalError
from fasteval.evaluation.fast import FastOptions
from fasteval.model.inference import FastModel

CPU = torch.device("cpu")


def _example(batch: int = 4, size: int = 32) -> torch.Tensor:
    return torch.zeros(batch, 3, size, size).contiguous(memory_format=torch.channels_last)


def _resnet(arch: str = "resnet18", classes: int = 10) -> torch.nn.Module:
    return getattr(torchvision.models, arch)(num_classes=classes)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty FASTEVAL_CACHE; torch's and Triton's cache folders restored afterwards."""
    monkeypatch.setenv("FASTEVAL_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    return tmp_path


def test_key_differs_by_precision_batch_arch_and_head_not_by_weights():
    r18, base = _resnet(), cc.config_key(_resnet(), CPU, "bf16", _example())
    assert cc.config_key(r18, CPU, "bf16", _example()) == base  # other random weights: the same artifact
    others = [cc.config_key(r18, CPU, "fp32", _example()),
              cc.config_key(r18, CPU, "bf16", _example(batch=8)),
              cc.config_key(r18, CPU, "bf16", _example(size=64)),
              cc.config_key(r18, CPU, "bf16", torch.zeros(4, 3, 32, 32)),  # NCHW, not channels-last
              cc.config_key(_resnet("resnet34"), CPU, "bf16", _example()),
              cc.config_key(_resnet(classes=5), CPU, "bf16", _example())]
    hashes = {cc.key_hash(k) for k in [base, *others]}
    assert len(hashes) == 1 + len(others)


def test_device_folder_follows_torch_and_the_cpu_instruction_set(cache, monkeypatch):
    monkeypatch.setattr(cc, "_cpu_identity", lambda: ("Some CPU", "avx2 fma"))
    plain = cc.compile_dir(CPU)
    monkeypatch.setattr(cc, "_cpu_identity", lambda: ("Some CPU", "avx2 avx512_bf16 fma"))
    assert cc.compile_dir(CPU) != plain
    assert plain.startswith(os.path.join(str(cache), "compile", "torch-"))
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert "torch-9.9.9" in cc.compile_dir(CPU)


def test_use_compile_cache_points_inductor_and_triton_into_fasteval_cache(cache):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    folder = cc.use_compile_cache(CPU)
    assert folder == cc.compile_dir(CPU) and os.path.isdir(folder)
    assert cache_dir() == folder
    assert os.environ["TRITON_CACHE_DIR"] == os.path.join(folder, "triton")
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache


def test_a_users_inductor_folder_is_kept(cache, tmp_path, monkeypatch):
    mine = str(tmp_path / "mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)
    assert cc.use_compile_cache(CPU) == mine
    assert cc.profile_dir(CPU) == os.path.join(mine, "profiles")


def test_unwritable_compile_cache_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FASTEVAL_CACHE", str(blocker))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with pytest.raises(FastevalError, match="cannot create the compile cache"):
        cc.use_compile_cache(CPU)


def test_profiles_round_trip_and_ignore_other_keys(tmp_path):
    key = {"a": 1}
    cc.save_profile(str(tmp_path), cc.Profile(key=key, eager_batch_seconds=0.5, artifacts=True))
    assert cc.load_profile(str(tmp_path), key).artifacts is True
    assert cc.load_profile(str(tmp_path), {"a": 2}) == cc.Profile(key={"a": 2})
    (tmp_path / (cc.key_hash(key) + ".json")).write_text("{not json")
    assert cc.load_profile(str(tmp_path), key) == cc.Profile(key=key)


@pytest.mark.parametrize("damage", [None, [], "x", {"eager_batch_seconds": "abc"}, {"eager_batch_seconds": -1.0},
                                    {"eager_batch_seconds": True}, {"artifacts": "yes"}, {"unknown_field": 1}])
def test_a_damaged_profile_or_rates_file_reads_as_missing(tmp_path, damage):
    """JSON that is not an object, a field of the wrong form or an unknown field: an empty profile (the
    decisions fall back to assumed costs), never a traceback later in arithmetic."""
    from fasteval.evaluation.route import Rates

    key = {"a": 1}
    path = tmp_path / (cc.key_hash(key) + ".json")
    for kind, good in ((cc.Profile, cc.Profile(key=key, eager_batch_seconds=0.5, artifacts=True)),
                       (Rates, Rates(key=key, fast_image_seconds=0.01))):
        cc.save_profile(str(tmp_path), good)
        assert cc.load_profile(str(tmp_path), key, kind) == good
        stored = json.loads(path.read_text())
        if isinstance(damage, dict):
            if "artifacts" in damage and kind is Rates:
                continue
            field = "fast_image_seconds" if kind is Rates and "eager_batch_seconds" in damage else next(iter(damage))
            path.write_text(json.dumps({**stored, field: next(iter(damage.values()))}))
        else:
            path.write_text(json.dumps(damage))
        assert cc.load_profile(str(tmp_path), key, kind) == kind(key=key)


@pytest.mark.parametrize("value, mode", [(True, "on"), (False, "off"), ("auto", "auto"), ("off", "off")])
def test_compile_modes(value, mode):
    assert cc.resolve_compile_mode(value) == mode


def test_unknown_compile_mode_is_refused():
    with pytest.raises(FastevalError, match="--compile"):
        cc.resolve_compile_mode("sometimes")


def test_cli_compile_option_and_its_alias(capsys):
    parser = build_parser()
    assert parser.parse_args(["eval"]).compile == "auto"
    assert parser.parse_args(["eval", "--no-compile"]).compile == "off"
    assert parser.parse_args(["bench", "--compile", "on"]).compile == "on"
    assert main(["eval", "--compile", "maybe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile" in err[0]


# --- the decision, with the timing model mocked ---------------------------------------------------------------


def test_decide_cold_cache_small_dataset_is_eager():
    d = cc.decide(cc.Profile(), "cpu", num_samples=160, batch_size=32, eager_batch_seconds=0.36)
    assert not d.compile and d.expected_cost == cc.DEFAULTS["cpu"].cold_seconds
    assert "eager" in d.reason and "cold cache" in d.reason


def test_decide_cold_cache_pays_on_a_large_dataset():
    d = cc.decide(cc.Profile(), "cpu", num_samples=50_000, batch_size=32, eager_batch_seconds=0.36)
    assert d.compile and d.expected_saving > d.expected_cost


def test_decide_on_a_hit_uses_the_measured_load_time_and_speedup():
    hit = cc.Profile(artifacts=True, hit_compile_seconds=0.5, eager_batch_seconds=1.0, compiled_batch_seconds=0.5)
    d = cc.decide(hit, "cpu", num_samples=64, batch_size=32, eager_batch_seconds=1.0)
    assert d.compile and d.expected_saving == pytest.approx(1.0) and d.expected_cost == 0.5
    assert "measured speedup" in d.reason and "cache hit" in d.reason
    # The same hit on a single batch does not pay for its load.
    assert not cc.decide(hit, "cpu", num_samples=8, batch_size=32, eager_batch_seconds=0.2).compile


def test_decide_scales_the_assumed_cold_compile_with_the_model():
    small = cc.decide(cc.Profile(), "cpu", 1000, 32, 0.3, model_leaves=cc.RESNET18_LEAVES)
    large = cc.decide(cc.Profile(), "cpu", 1000, 32, 0.3, model_leaves=2 * cc.RESNET18_LEAVES)
    assert large.expected_cost == pytest.approx(2 * small.expected_cost)


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 3))


def test_auto_is_eager_on_a_cold_cache_for_a_tiny_dataset(cache, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    model = FastModel(_tiny_model(), CPU, "fp32", "auto", num_samples=21)
    model.warm_up(_example())
    assert not model.compiled and not compiled
    assert model.compile_reason.startswith("auto: eager")
    key = cc.config_key(model.model, CPU, "fp32", _example())
    profile = cc.load_profile(cc.profile_dir(CPU), key)
    assert profile.eager_batch_seconds > 0 and not profile.artifacts


def test_auto_times_eager_without_the_first_calls_setup(cache, monkeypatch):
    """The first eager call carries one-time setup (a GPU's cuDNN/cuBLAS handles: a second against
    milliseconds): the profile keeps the faster of two calls, so that setup never reads as a slow model
    that compiling would speed up."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    times = iter([2.0, 0.001])
    monkeypatch.setattr(FastModel, "_timed", lambda self, example: next(times))
    model = FastModel(_tiny_model(), CPU, "fp32", "auto", num_samples=1000 * _example().shape[0])  # 1000 batches
    model.device = torch.device("cuda")  # a GPU's: only the timing, the decision and the profile's key see it
    monkeypatch.setattr(cc, "device_tag", lambda device: "fake-gpu")
    model.warm_up(_example())
    key = cc.config_key(model.model, model.device, "fp32", _example())
    assert cc.load_profile(cc.profile_dir(model.device), key).eager_batch_seconds == 0.001
    assert not model.compiled and not compiled and model.compile_reason.startswith("auto: eager")
    # With the first call's 2 s taken for the batch time, 1000 batches would have been worth compiling.
    assert cc.decide(cc.Profile(), "cuda", 1000 * _example().shape[0], _example().shape[0], 2.0).compile


def test_auto_times_one_eager_call_on_the_cpu(cache, monkeypatch):
    """On the CPU the first call is close to the next and a second would cost a batch of every first run."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    calls = []
    monkeypatch.setattr(FastModel, "_timed", lambda self, example: calls.append(1) or 0.01)
    FastModel(_tiny_model(), CPU, "fp32", "auto", num_samples=21).warm_up(_example())
    assert len(calls) == 1


def test_auto_compiles_on_a_hit_that_pays(cache, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)  # no real compile in CI
    model = FastModel(_tiny_model(), CPU, "fp32", "auto", num_samples=21)
    key = cc.config_key(model.model, CPU, "fp32", _example())
    cc.save_profile(cc.profile_dir(CPU), cc.Profile(key=key, eager_batch_seconds=10.0, compiled_batch_seconds=1.0,
                                                    hit_compile_seconds=0.1, artifacts=True))
    model.warm_up(_example())
    assert model.compiled and compiled
    assert model.compile_reason.startswith("auto: compiled, it pays") and "cache hit" in model.compile_reason
    assert cc.load_profile(cc.profile_dir(CPU), key).compiled_batch_seconds < 10.0  # measured, replaced


def test_auto_without_a_sample_count_compiles_only_on_a_hit(cache, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = FastModel(_tiny_model(), CPU, "fp32", "auto")
    model.warm_up(_example())
    assert not model.compiled and "cold cache" in model.compile_reason


def test_compile_failure_is_one_warning_line_and_eager(cache, monkeypatch, capsys):
    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = FastModel(_tiny_model(), CPU, "fp32", "on")
    model.warm_up(_example())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile failed" in err[0]
    assert not model.compiled and "failed" in model.compile_reason
    with torch.inference_mode():
        assert model(_example()).shape == (4, 3)


def test_off_runs_one_eager_warm_up_call(monkeypatch):
    model = FastModel(_tiny_model(), CPU, "fp32", False)
    calls = []
    monkeypatch.setattr(model, "_forward", lambda x: calls.append(x) or model._eager(x))
    model.warm_up(_example())
    assert len(calls) == 1 and model.compile_reason.startswith("--compile off")


def test_a_planned_auto_eager_choice_runs_no_warm_up_call(monkeypatch):
    """--compile auto's eager choice from a measured eager time (made by the plan) spends no batch on a
    warm-up call, as the in-model decision did before the plan; the planned reason is the model's."""
    model = FastModel(_tiny_model(), CPU, "fp32", False, reason="auto: eager, compiling would not pay",
                      eager_call=False)
    calls = []
    monkeypatch.setattr(model, "_forward", lambda x: calls.append(x) or model._eager(x))
    model.warm_up(_example())
    assert calls == [] and model.compile_reason == "auto: eager, compiling would not pay" and not model.compiled


_REAL_COMPILE = textwrap.dedent("""
    import json, sys, torch
    from torch._dynamo.utils import counters
    from fasteval.model.inference import FastModel
    for config in sys.argv[1:]:  # batch:precision:seed, compiled one after another; a line each
        batch, precision, seed = config.split(":")
        torch.manual_seed(int(seed))
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(8, 3))
        model = FastModel(net, torch.device("cpu"), precision, "on")
        x = torch.rand(int(batch), 3, 16, 16).contiguous(memory_format=torch.channels_last)
        counters.clear()
        model.warm_up(x)
        with torch.inference_mode():
            out = model(x)
        with torch.no_grad():
            ref = net(x)
        inductor = counters["inductor"]
        print(json.dumps({"hit": inductor["fxgraph_cache_hit"], "miss": inductor["fxgraph_cache_miss"],
                          "err": float((out.float() - ref).abs().max()), "reason": model.compile_reason}))
""")


@pytest.mark.slow
def test_real_compile_is_cached_and_keyed(tmp_path):
    """Separate processes, one FASTEVAL_CACHE: the same configuration is a hit (whatever the weights); a changed
    batch size or precision is a miss, and every result matches eager."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["FASTEVAL_CACHE"] = str(tmp_path)

    def run(*configs):
        out = subprocess.run([sys.executable, "-c", _REAL_COMPILE, *configs], env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.strip().splitlines()[-len(configs):]
        return [json.loads(line) for line in lines]

    [cold] = run("4:fp32:0")
    assert cold["miss"] >= 1 and cold["hit"] == 0 and "cached for the next run" in cold["reason"]
    # A second process: other weights, same artifact; then, in that process, a changed batch size and precision.
    warm, batch8, bf16 = run("4:fp32:1", "8:fp32:0", "4:bf16:0")
    assert warm["hit"] >= 1 and warm["miss"] == 0 and "loaded from the compile cache" in warm["reason"]
    assert batch8["miss"] >= 1 and batch8["hit"] == 0
    assert bf16["miss"] >= 1 and bf16["hit"] == 0
    for result in (cold, warm, batch8):
        assert result["err"] < 1e-4
    assert bf16["err"] < 0.05  # bf16 autocast's rounding
    assert os.listdir(tmp_path / "compile")  # the artifacts are in fasteval's cache, not torch's default folder


# --- bench: stages, per-process memory, time to result ---------------------------------------------------------


def test_stage_plan_covers_the_dataset_and_a_minimum():
    assert _plan([32, 32, 10]) == [32, 32, 10] * 3
    assert len(_plan([64] * 20)) == 20


_MEMORY_CHILD = textwrap.dedent("""
    import multiprocessing as mp, time
    def worker():
        block = b"w" * (150 * 2**20)
        time.sleep(0.6)
    if __name__ == "__main__":
        block = b"m" * (300 * 2**20)
        p = mp.get_context("fork").Process(target=worker)
        p.start(); p.join()
        time.sleep(0.2)
""")


def test_run_command_reports_main_and_worker_peaks_apart(tmp_path):
    script = tmp_path / "mem.py"
    script.write_text(_MEMORY_CHILD)
    run = run_command([sys.executable, str(script)], dict(os.environ))
    assert run["returncode"] == 0
    assert 300 <= run["main_peak_rss_mb"] < 420
    # The forked worker shares the parent's 300 MB until written; its own block adds 150 MB: never summed with the main.
    assert 150 <= run["largest_worker_peak_rss_mb"] < 600
    assert run["tree_peak_rss_mb"] >= run["main_peak_rss_mb"] - 1


_HELPER_CHILD = textwrap.dedent("""
    import os, time
    block = b"m" * (300 * 2**20)
    for _ in range(60):  # forks that exec a helper within milliseconds, as ctypes.util.find_library's ldconfig -p
        pid = os.fork()
        if pid == 0:
            time.sleep(0.002)
            os.execv("/bin/true", ["true"])
        os.waitpid(pid, 0)
    time.sleep(0.2)
""")


def test_helper_processes_are_not_workers(tmp_path):
    """A fork that execs a helper holds the parent's 300 MB for a moment before its exec: it is no
    worker, so the run has none (the kernel's tree peak still sees it)."""
    script = tmp_path / "helpers.py"
    script.write_text(_HELPER_CHILD)
    run = run_command([sys.executable, str(script)], dict(os.environ))
    assert run["returncode"] == 0 and run["main_peak_rss_mb"] >= 300
    assert run["largest_worker_peak_rss_mb"] < 50


def test_eval_argv_repeats_the_benchs_settings():
    config = {"path": "/data", "arch": "resnet18", "weights": "/w.pt", "preset": "imagenet", "resize": 256,
              "crop": 224, "batch_size": 21, "batch_size_requested": 64, "workers": 2, "device": "cpu"}
    argv = eval_argv(config, FastOptions(compile="auto"), False, "/tmp/out.json")
    assert argv[:5] == [sys.executable, "-m", "fasteval", "eval", "/data"]
    joined = " ".join(argv)
    for part in ("--batch-size 64", "--weights /w.pt", "--crop 224", "--compile auto", "--json /tmp/out.json"):
        assert part in joined
    assert "--reference" in eval_argv({**config, "crop": None}, FastOptions(), True, "x")
    assert "--crop" not in eval_argv({**config, "crop": None}, FastOptions(), True, "x")


def test_time_to_result_runs_cold_in_an_empty_cache_then_warm(monkeypatch, capsys):
    calls = []

    def fake(argv, env):
        calls.append((argv, env))
        json_path = argv[argv.index("--json") + 1]
        with open(json_path, "w") as f:
            json.dump({"samples": 10, "top1": 50.0, "seconds": 2.0, "warmup_seconds": 0.5 if "--reference" not in argv
                       else 0.0, "exact": {"seconds": 0.25}, "compile": False, "compile_reason": "r",
                       "route": None if "--reference" in argv else "fast path: expected ..."}, f)
        return {"wall_seconds": 4.0 if "--reference" in argv else 3.0, "returncode": 0, "stderr_tail": "",
                "main_peak_rss_mb": 1.0, "largest_worker_peak_rss_mb": 0.0, "tree_peak_rss_mb": 1.0}

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/warm")
    monkeypatch.setattr("fasteval.bench.run_command", fake)
    config = {"path": "/d", "arch": "resnet18", "weights": None, "preset": "imagenet", "resize": 256, "crop": 224,
              "batch_size": 8, "workers": 1, "device": "cpu"}
    t = time_to_result(config, FastOptions(), repeats=2, progress=True)
    assert len(calls) == 2 + 2 * 2
    lines = capsys.readouterr().err.splitlines()  # a line as each command starts, naming it (they print nothing)
    assert lines == ["time to result: the default command, cold (1/6)", "time to result: the reference command, "
                     "cold (2/6)", "time to result: the reference command, warm 1/2 (3/6)",
                     "time to result: the default command, warm 1/2 (4/6)",
                     "time to result: the reference command, warm 2/2 (5/6)",
                     "time to result: the default command, warm 2/2 (6/6)"]
    assert ["--reference" in argv for argv, _ in calls] == [False, True, True, False, True, False]
    assert "--reference" not in calls[0][0] and "--reference" in calls[1][0]  # cold: fast first
    caches = {env["FASTEVAL_CACHE"] for _, env in calls}
    assert len(caches) == 1 and not os.path.exists(caches.pop())  # one fresh cache for the session, removed after
    assert all("TORCHINDUCTOR_CACHE_DIR" not in env for _, env in calls)
    fast = t["fast"]["warm"]
    assert fast["setup_seconds"] + fast["warmup_seconds"] + fast["loop_seconds"] + fast["recheck_seconds"] == \
        pytest.approx(fast["wall_seconds"])
    assert t["ratio_warm"] == pytest.approx(0.75)
    # The default command's route is kept (a run sent whole to the reference's code is not the fast path's time).
    assert t["fast"]["cold"]["route"] == t["fast"]["warm"]["route"] == "fast path: expected ..."
    assert t["reference"]["warm"]["route"] is None


@pytest.mark.slow
def test_bench_reports_time_to_result_and_memory_per_process(small_data, weights_3cls, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setenv("FASTEVAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    assert main(["bench", small_data, "--weights", weights_3cls, "--resize", "40", "--crop", "32", "--batch-size",
                 "8", "--workers", "1", "--repeats", "1", "--compile", "off", "--no-progress", "--verbose",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for row in ("whole command, cold (s)", "whole command, warm (s)", "peak RSS MB, main process",
                "peak RSS MB, largest worker", "reference code"):
        assert row in table
    b = json.loads(out.read_text())
    metrics = b["stages"]["fast"]["metrics"], b["stages"]["reference"]["metrics"]
    assert ("metrics: the fast path's twin" in table) == (metrics[0] < metrics[1])  # the odd figure explained
    for path in ("reference", "fast"):
        for when in ("cold", "warm"):
            run = b["time_to_result"][path][when]
            assert run["samples"] == 21 and run["wall_seconds"] > run["loop_seconds"] > 0
    for path in ("reference", "fast"):  # every stage measured (their speeds are the bench's to show, not a test's)
        stages = b["stages"][path]
        assert all(stages[k] > 0 for k in ("decode", "model", "metrics", "end_to_end"))
    assert "time_to_result" in b


@pytest.mark.parametrize("option", [["--exact", "maybe"], ["--loader", "foo"], ["--precision", "int8"],
                                    ["--device", "gpu"], ["--compile", "sometimes"], ["--help"]])
def test_argument_errors_and_help_answer_without_importing_torch(option):
    """A typo in a named option, and --help, answer before torch is imported (well under a second)."""
    import subprocess
    import sys

    code = ("import sys\nfrom fasteval.cli import main\ntry:\n    rc = main(['eval', '/nonexistent', *sys.argv[1:]])\n"
            "except SystemExit as exc:\n    rc = exc.code\nprint('torch' in sys.modules, rc)")
    done = subprocess.run([sys.executable, "-c", code, *option], capture_output=True, text=True, timeout=60)
    assert done.stdout.split()[-2:] == ["False", "0" if option == ["--help"] else "2"], done
    assert "Traceback" not in done.stderr
    if option != ["--help"]:
        assert option[0] in done.stderr and done.stderr.count("\n") == 1
