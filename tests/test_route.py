"""The route: whether a run's fast path pays, or every sample goes through the reference's code."""

from __future__ import annotations

import json

import pytest
import torch

from fasteval.cli import main
from fasteval.model.inference import resolve_precision
from fasteval.evaluation.route import (DEFAULTS, Rates, choose_route, load_rates, rates_key, record, relax_setup,
                                       save_rates)

CPU = torch.device("cpu")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty FASTEVAL_CACHE; an Inductor cache folder an earlier test's compile pointed torch at (it
    sets TORCHINDUCTOR_CACHE_DIR in this process) would otherwise hold that test's profiles and rates."""
    monkeypatch.setenv("FASTEVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    return tmp_path / "cache"


def test_choose_route_hand_computed():
    rates = Rates(reference_image_seconds=0.03, fast_image_seconds=0.01, fast_setup_seconds=1.0, recheck_share=0.1)
    # 20 samples, 2 PIL-only, 8 calibration: 1 + 18 x 0.01 + (2 + 8 + 1.8) x 0.03 = 1.534 s vs 20 x 0.03 = 0.6 s.
    small = choose_route(rates, "cpu", 20, 2, 8, exact=True)
    assert not small.fast and small.fast_seconds == pytest.approx(1.534) and small.reference_seconds == pytest.approx(0.6)
    assert "would not pay" in small.reason and "measured" in small.reason
    # 200 samples: 1 + 198 x 0.01 + (2 + 8 + 19.8) x 0.03 = 3.874 s vs 6 s.
    large = choose_route(rates, "cpu", 200, 2, 8, exact=True)
    assert large.fast and large.fast_seconds == pytest.approx(3.874) and large.reference_seconds == pytest.approx(6.0)
    # Without the recheck, no calibration and no near-ties: 1 + 48 x 0.01 + 2 x 0.03 = 1.54 s vs 1.5 s.
    off = choose_route(rates, "cpu", 50, 2, 8, exact=False)
    assert off.fast_seconds == pytest.approx(1.54) and not off.fast


def test_a_recheck_during_the_pass_costs_only_what_the_pass_leaves():
    """The near-ties decoded by a pool during the pass (a GPU pass): P of the reference's W workers' pace hide
    behind the pass; the rest goes at W's pace after it. 1,000 samples, 8 calibration, share 0.1 (100 near-ties:
    0.2 s at the reference's 2 ms with W = 8), t_fast 1 ms (a 1 s pass), setup 1 s."""
    rates = Rates(reference_image_seconds=0.002, fast_image_seconds=0.001, fast_setup_seconds=1.0, recheck_share=0.1)
    after = choose_route(rates, "cuda", 1000, 0, 8, exact=True)
    assert after.fast_seconds == pytest.approx(1 + 1000 * 0.001 + (8 + 100) * 0.002)  # 2.216 s
    # 8 pool workers decode as the reference's 8 do: 100 x 2 ms = 0.2 s, hidden behind the 1 s pass
    hidden = choose_route(rates, "cuda", 1000, 0, 8, exact=True, recheck_pool=8, workers=8)
    assert hidden.fast_seconds == pytest.approx(1 + 1.0 + 8 * 0.002)
    assert "100 near-ties by 8 process(es) during the pass" in hidden.reason
    # 1 pool worker beside DALI's threads: the 1 s pass hides 1/8 s of the 0.2 s; 0.075 s are left after it
    slow = choose_route(rates, "cuda", 1000, 0, 8, exact=True, recheck_pool=1, workers=8)
    assert slow.fast_seconds == pytest.approx(1 + 1.0 + 0.075 + 8 * 0.002)
    # A pass too short to hide anything much: 10 samples' pass (10 ms) hides 1.25 ms of 1 near-tie's 2 ms
    short = choose_route(rates, "cuda", 10, 0, 8, exact=True, recheck_pool=1, workers=8)
    assert short.fast_seconds == pytest.approx(1 + 0.01 + (0.002 - 0.01 / 8) + 8 * 0.002)
    # No recheck, nothing to overlap: the pool changes nothing
    off = choose_route(rates, "cuda", 1000, 0, 8, exact=False, recheck_pool=8, workers=8)
    assert off.fast_seconds == pytest.approx(choose_route(rates, "cuda", 1000, 0, 8, exact=False).fast_seconds)


def test_choose_route_defaults_until_measured():
    d = DEFAULTS["cpu"]
    route = choose_route(Rates(), "cpu", 100, 0, 8, exact=True)
    expected = d.fast_setup + 100 * d.fast_image + (8 + d.recheck_share * 100) * d.reference_image
    assert route.fast_seconds == pytest.approx(expected) and "assumed" in route.reason
    # An unknown device kind takes the CPU's figures.
    assert choose_route(Rates(), "mps", 100, 0, 8, exact=True).fast_seconds == pytest.approx(expected)


def test_images_decoded_at_start_assume_a_smaller_setup():
    """No loader to set up: 50 samples pay for the fast path under the assumed figures there, and not
    under DALI's: 0.3 + 50 x 0.012 + (8 + 7.5) x 0.032 = 1.396 s (1.0 s setup: 2.096 s) vs 1.6 s."""
    d = DEFAULTS["cpu"]
    decoded = choose_route(Rates(key={"decoded_at_start": True}), "cpu", 50, 0, 8, exact=True)
    assert decoded.fast and decoded.fast_seconds == pytest.approx(1.396) and d.fast_setup_decoded_at_start == 0.3
    loader = choose_route(Rates(key={}), "cpu", 50, 0, 8, exact=True)
    assert not loader.fast and loader.fast_seconds == pytest.approx(2.096)
    measured = choose_route(Rates(key={"decoded_at_start": True}, fast_setup_seconds=2.0), "cpu", 50, 0, 8, exact=True)
    assert measured.fast_seconds == pytest.approx(3.096)  # a measured setup wins over either assumption


def test_record_keeps_the_best_per_image_cost_and_persists(fresh_cache):
    import torchvision

    key = rates_key(torchvision.models.resnet18(num_classes=3), CPU, "bf16", (32, 32))
    rates = load_rates(CPU, key)
    assert rates.reference_image_seconds is None
    record(rates, CPU, reference=(10, 0.5), fast=(100, 2.0), setup=1.5, recheck_share=0.2)
    record(rates, CPU, reference=(10, 0.9), fast=(0, 1.0), setup=0.7, recheck_share=None)  # slower, nothing, best
    record(rates, CPU, setup=3.0)  # a slower set-up (a busy moment) is not kept
    again = load_rates(CPU, key)
    assert again.reference_image_seconds == pytest.approx(0.05) and again.fast_image_seconds == pytest.approx(0.02)
    assert again.fast_setup_seconds == pytest.approx(0.7) and again.recheck_share == pytest.approx(0.2)
    assert again.fast_to_reference == pytest.approx(0.02 / 0.05)  # the first call measured both; the second one
    # Another precision or input size is another configuration.
    assert load_rates(CPU, rates_key(torchvision.models.resnet18(num_classes=3), CPU, "fp32", (32, 32))).key != key


def test_a_slow_setup_measured_once_does_not_hold_the_reference_route():
    """A new user's trial: one fast run's set-up measured at 7.6 s (a cold disk or a busy machine; 0.3 s is
    usual) sent every later demo run (240 images) to the reference's code, 9 s where the fast path takes 5,
    and nothing measured the set-up again. Each run sent there now halves its excess over the assumed set-up:
    the fast path runs again within three runs, and measures it."""
    rates = Rates(key={"decoded_at_start": True}, reference_image_seconds=0.024, fast_image_seconds=0.0114,
                  fast_to_reference=0.475, fast_setup_seconds=7.6, recheck_share=0.02)
    # Only a run the set-up decided relaxes it: 10 samples go by the reference's code even with the assumed one
    small = choose_route(rates, "cpu", 10, 0, 8, exact=True)
    assert not small.fast and not small.setup_decided
    setups, runs = [], 0
    while not (route := choose_route(rates, "cpu", 240, 0, 8, exact=True)).fast:
        assert route.setup_decided
        relax_setup(rates, "cpu")
        setups.append(rates.fast_setup_seconds)
        runs += 1
        assert runs <= 3, setups
    assumed = DEFAULTS["cpu"].fast_setup_decoded_at_start
    assert setups[0] == pytest.approx(assumed + (7.6 - assumed) / 2)
    relax_setup(rates, "cpu")
    before = rates.fast_setup_seconds
    rates.fast_setup_seconds = 0.2  # at most the assumption: left alone
    relax_setup(rates, "cpu")
    assert rates.fast_setup_seconds == 0.2 and before > assumed
    unmeasured = Rates()
    relax_setup(unmeasured, "cpu")
    assert unmeasured.fast_setup_seconds is None


def test_a_run_the_setup_sent_to_the_reference_relaxes_it(small_data, weights_3cls, tmp_path, fresh_cache,
                                                          model_3cls, capsys):
    """Through the command: the run goes to the reference's code and leaves the set-up halfway to the assumed."""
    key = rates_key(model_3cls, CPU, resolve_precision("auto", CPU), (32, 32), decoded_at_start=True)
    # 21 samples: 0.3 + 21 x 0.01 + 8 x 0.1 = 1.31 s fast with the assumed set-up, against 2.1 s; 8.6 s with 7.6 s
    save_rates(CPU, Rates(key=key, reference_image_seconds=0.1, fast_image_seconds=0.01, fast_to_reference=0.1,
                          fast_setup_seconds=7.6, recheck_share=0.0))
    routed = _eval_json(tmp_path / "a.json", small_data, weights_3cls)
    assert routed["plan"]["route"]["value"] == "reference" and "7.6 s setup" in routed["route"]
    assumed = DEFAULTS["cpu"].fast_setup_decoded_at_start
    assert load_rates(CPU, key).fast_setup_seconds == pytest.approx(assumed + (7.6 - assumed) / 2)
    # Its progress bar says which code evaluates the samples (it said "fast (reference decode)")
    capsys.readouterr()
    assert main(["eval", small_data, "--weights", weights_3cls, "--resize", "40", "--crop", "32", "--workers", "0",
                 "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "reference: 100%" in err and "fast (" not in err, err


def test_a_first_gpu_run_expects_the_costs_measured_on_the_h200():
    """Unmeasured, a GPU configuration expects the one GPU run's costs: there, on 2,000 JPEGs, the whole fast
    command was slower than the reference's, so a first run that size takes the reference's code; the
    crossing is 2.0 s / (1.6 - 0.8 - 0.05 x 1.6 ms) = about 2,800 images."""
    rates = Rates()
    assert not choose_route(rates, "cuda", 2000, 0, 8, exact=True).fast
    assert not choose_route(rates, "cuda", 2700, 0, 8, exact=True).fast
    assert choose_route(rates, "cuda", 2900, 0, 8, exact=True).fast
    assert choose_route(rates, "cuda", 50_000, 0, 8, exact=True).fast
    # Measured rates replace the assumption: a GPU whose fast path costs 0.2 ms an image goes fast at 2,000.
    measured = Rates(reference_image_seconds=0.0016, fast_image_seconds=0.0002, fast_setup_seconds=1.5)
    assert choose_route(measured, "cuda", 2000, 0, 8, exact=True).fast


@pytest.mark.parametrize("device_kind, t_ref", [("cuda", 0.0008), ("cuda", 0.0004), ("cpu", 0.010), ("cpu", 0.004)])
def test_a_quick_reference_never_leaves_the_fast_path_unmeasured_for_good(device_kind, t_ref):
    """A run by the reference's code measures only its cost. On a machine quicker than assumed (more workers,
    smaller files) a fixed fast default would lose at every size: never run, never measured. The unmeasured
    fast cost follows the measured reference by the assumed ratio, so a large enough run goes fast."""
    rates = Rates(reference_image_seconds=t_ref)
    assert choose_route(rates, device_kind, 1_000_000, 0, 8, exact=True).fast
    route = choose_route(rates, device_kind, 10, 0, 8, exact=True)
    assert not route.fast and "the reference's measured, the fast path's assumed" in route.reason


def test_fast_cost_follows_the_reference_measured_beside_it():
    """A fast run on a busy machine measures both per-image costs slow; their ratio still holds, so the
    fast cost is the ratio x the best reference cost, and a later quiet reference run lowers both: a
    route is not stuck on the reference's code by one slow fast run (it would never be re-measured)."""
    rates = Rates(reference_image_seconds=0.3, fast_image_seconds=0.12, fast_to_reference=0.4,
                  fast_setup_seconds=0.5, recheck_share=0.1)  # one fast run, 10x slowed by other load
    busy_route = choose_route(rates, "cpu", 100, 0, 8, exact=True)
    # 0.5 + 100 x (0.4 x 0.3) + (8 + 10) x 0.3 = 17.9 s vs 30 s.
    assert busy_route.fast_seconds == pytest.approx(17.9) and "0.40 x the reference's" in busy_route.reason
    rates.reference_image_seconds = 0.03  # a quiet reference run
    quiet = choose_route(rates, "cpu", 100, 0, 8, exact=True)
    # 0.5 + 100 x 0.012 + 18 x 0.03 = 2.24 s vs 3 s: fast, though the fast pass itself was measured at 0.12 s.
    assert quiet.fast and quiet.fast_seconds == pytest.approx(2.24)
    # Without a ratio (a fast run with no sample by the reference's code), the direct best is used.
    rates.fast_to_reference = None
    assert choose_route(rates, "cpu", 100, 0, 8, exact=True).fast_seconds == pytest.approx(0.5 + 12 + 0.54)


def test_unwritable_cache_warns_once_and_runs(small_data, weights_3cls, tmp_path, monkeypatch, capsys):
    """FASTEVAL_CACHE naming a file: the run goes on (the cache only speeds later decisions up), with one
    warning line naming it, however many profiles the run tried to save."""
    import fasteval.model.compile_cache as compile_cache

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTEVAL_CACHE", str(blocker))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(compile_cache, "_UNWRITABLE", set())
    report = _eval_json(tmp_path / "r.json", small_data, weights_3cls)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "cannot write the cache" in line]
    assert len(warnings) == 1 and str(blocker) in warnings[0] and report["samples"] > 0


def _eval_json(path, data, weights, *extra):
    assert main(["eval", data, "--weights", weights, "--no-progress", "--resize", "40", "--crop", "32",
                 "--workers", "0", "--batch-size", "4", "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


def test_small_dataset_goes_to_the_reference_then_fast_once_it_pays(small_data, weights_3cls, tmp_path,
                                                                    fresh_cache, model_3cls):
    """21 samples with the assumed rates: the fast path's setup alone exceeds the reference's whole run, so
    every sample is the reference's (equal to --reference, no loader built). With rates saying the fast
    path pays, the same command runs it, and its counts are still the reference's (the recheck)."""
    reference = _eval_json(tmp_path / "r.json", small_data, weights_3cls, "--reference")
    routed = _eval_json(tmp_path / "a.json", small_data, weights_3cls)
    assert "would not pay" in routed["route"] and routed["loader"] == "none"
    assert routed["exact"]["all_by_reference"]
    for key in ("correct_top1", "correct_top5", "samples"):
        assert routed[key] == reference[key]
    assert routed["loss_sum"] == pytest.approx(reference["loss_sum"], rel=1e-6)
    # The run recorded the reference's per-image cost for the next decision (under the key of runs whose
    # images the command decoded at start-up: 21 samples on the CPU).
    assert routed["precision"] == "fp32" and routed["plan"]["route"]["value"] == "reference"  # what ran
    key = rates_key(model_3cls, CPU, resolve_precision("auto", CPU), (32, 32), decoded_at_start=True)
    rates = load_rates(CPU, key)
    assert rates.reference_image_seconds and rates.reference_image_seconds > 0
    save_rates(CPU, Rates(key=key, reference_image_seconds=1.0, fast_image_seconds=1e-4, fast_setup_seconds=0.0,
                          recheck_share=0.0))
    fast = _eval_json(tmp_path / "f.json", small_data, weights_3cls)
    assert fast["route"].startswith("fast path") and fast["loader"] != "none"
    assert not fast["exact"].get("all_by_reference")
    for key_ in ("correct_top1", "correct_top5"):
        assert fast[key_] == reference[key_]


def test_a_sweep_records_no_rates(small_data, weights_3cls, tmp_path, fresh_cache, model_3cls):
    """A sweep's setup decodes every image into its store and its passes read the store: neither is a single
    run's cost, so a later single run's route must not learn them (an inflated setup would keep it on the
    reference's code, and a run by the reference's code never measures a setup)."""
    import shutil
    from dataclasses import asdict

    from fasteval.model.inference import resolve_precision

    second = tmp_path / "second.pt"
    shutil.copy(weights_3cls, second)
    key = rates_key(model_3cls, CPU, resolve_precision("auto", CPU), (32, 32))
    saved = Rates(key=key, reference_image_seconds=1.0, fast_image_seconds=1e-4, fast_setup_seconds=0.0,
                  recheck_share=0.0)
    save_rates(CPU, saved)
    out = tmp_path / "s.json"
    assert main(["eval", small_data, "--weights", weights_3cls, str(second), "--no-progress", "--resize", "40",
                 "--crop", "32", "--workers", "0", "--batch-size", "4", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["checkpoints"]) == 2
    assert asdict(load_rates(CPU, key)) == asdict(saved)


def test_explicit_compile_mode_always_runs_the_fast_path(small_data, weights_3cls, tmp_path, fresh_cache):
    report = _eval_json(tmp_path / "o.json", small_data, weights_3cls, "--compile", "off")
    assert report["plan"]["route"] == {"value": "fast", "reason": "--compile off: the fast path as asked"}
    assert report["route"] == "--compile off: the fast path as asked" and report["loader"] != "none"
