"""Whether the fast path pays for a run at all, or the whole dataset goes through the reference's code.

The fast path has a price the reference's loop does not pay: importing and building its loader, the
model's and the metrics' warm-up, and (exact counts) the calibration samples and the near-ties it
re-evaluates with the reference's own code. On a small dataset that price exceeds what its faster
loop saves; there every sample is evaluated by the reference's code instead, which is exact and, at
that size, the quicker way to the result. The choice compares the two expected times from per-image
rates that earlier runs of the same model, device, precision and input size measured (a small JSON
beside the compile profiles), or from ``DEFAULTS`` until they have:

    reference = N x t_reference
    fast      = setup + N_fast x t_fast + (PIL-only files + calibration + recheck share x N_fast) x t_reference

Where the recheck overlaps the pass (a GPU pass: fasteval/evaluation/recheck_stream.py), its near-ties are
decoded during the pass by a pool of P PIL worker processes, where the reference's loop decodes with W
(``--workers``); what is left after the pass goes at the reference's pace (the pool grows to W). So the pass
hides N_fast x t_fast x P / W of their t_reference x near-ties:

    fast      = setup + N_fast x t_fast + max(0, near-ties x t_reference - N_fast x t_fast x P / W)
                      + (PIL-only files + calibration) x t_reference,   near-ties = recheck share x N_fast

Per-image costs keep the best seen (other load on the machine only adds time). The fast path's is
taken relative to the reference's: a run of the fast path measures both (its pass, and the samples the
reference's code evaluates within it) under the same load, and t_fast = that ratio x the best
t_reference. A single fast run on a busy machine would otherwise leave a fast cost too high to ever
be chosen again, and so never re-measured. For the same reason a fast cost never measured is the
assumed ratio times the measured t_reference, not an absolute default: on a machine whose reference is
quicker than assumed (more workers, smaller files), a fixed fast cost could lose at every size, so
the fast path would never run, never be measured, and never be chosen.

The set-up keeps the best seen too, and cannot hold the reference's route for good: the first fast run
on a machine may pay a cold disk (the libraries' first import) or a busy moment, and a set-up measured
then would keep every later small run on the reference's code, where nothing measures it again. So a
run that the set-up sends to the reference's code (the assumed set-up would have sent it to the fast
path) halves the set-up's excess over the assumed one (``relax_setup``): after a few such runs the fast
path runs again and measures it. A run the reference's code wins anyway leaves the set-up alone.

Like the compile profiles, the rates only steer the choice: a stale figure can make a run slower, never
its counts different (both routes give the reference's counts; the mean loss is the reference's on its
route, within the fast path's precision on the other: docs/exactness.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from fasteval.model.compile_cache import configuration, load_profile, profile_dir, save_profile

RATES_VERSION = 2


@dataclass(frozen=True)
class RouteDefaults:
    """Per-image costs assumed for a device kind until measured (seconds)."""

    reference_image: float  # PIL decode + torchvision transform + eager fp32 model, per image
    fast_image: float  # the fast pass per image (loader, autocast model, metrics)
    fast_setup: float  # the fast path's setup: loader, warm-ups (a first run also times an eager batch)
    recheck_share: float  # near-ties re-evaluated, as a share of the fast pass's samples
    fast_setup_decoded_at_start: float  # the setup where the command decoded the images at start-up


DEFAULTS = {
    # Development CPU (2-core Zen 4), ResNet-18 at 224: eager fp32 36.6 images/s plus PIL decoding;
    # channels-last + bf16 89 images/s; DALI's import and pipeline, a deep copy of the model and the
    # warm-ups about 1 s; 15-20 % of real photographs gated by an out-of-domain model. Where the images
    # were decoded at start-up (fasteval/data/prefetch.py) there is no loader to set up: the warm-up
    # read 0.08 to 0.24 s (240 demo JPEGs, 156 photos, 2026-11-29).
    "cpu": RouteDefaults(reference_image=0.032, fast_image=0.012, fast_setup=1.0, recheck_share=0.15,
                         fast_setup_decoded_at_start=0.3),
    # A GPU: the reference is bound by PIL decoding in DataLoader workers, the fast path by its loader
    # and per-batch host work. The one GPU measured (H200, 16 cores, 2,000 ImageNet-like JPEGs, batch
    # 256, 2026-11-28): the reference 3.13 s (1.6 ms an image, with 16 workers; the default 8 would be
    # slower), the fast pass 1.59 s (0.8 ms: torchvision's nvJPEG, eager bf16; DALI not measured), and the
    # whole fast command slower than the reference's (its recheck, 2.88 s, then decoded in-process; now
    # in workers). Setup and recheck share are assumed. A first run goes fast from about 2,800 images.
    "cuda": RouteDefaults(reference_image=0.0016, fast_image=0.0008, fast_setup=2.0, recheck_share=0.05,
                          fast_setup_decoded_at_start=2.0),
}


@dataclass
class Rates:
    """One configuration's measured per-image costs (seconds); None until measured."""

    key: dict = field(default_factory=dict)
    reference_image_seconds: float | None = None
    fast_image_seconds: float | None = None
    fast_setup_seconds: float | None = None
    recheck_share: float | None = None
    # The fast path's per-image cost over the reference's code's, both measured in one run (the latest).
    fast_to_reference: float | None = None


@dataclass(frozen=True)
class Route:
    fast: bool
    reason: str
    fast_seconds: float
    reference_seconds: float
    setup_decided: bool = False  # the reference's, where the assumed set-up would have made it the fast path's


def rates_key(model: nn.Module, device: torch.device, precision: str, input_hw: tuple[int, int],
              decoded_at_start: bool = False) -> dict:
    """What per-image costs depend on: the configuration (torch, the device model, precision, architecture,
    threads), the input size, and whether the images were decoded at start-up (fasteval/data/prefetch.py:
    then neither route decodes, and the fast path sets up no loader)."""
    key = {"rates_version": RATES_VERSION, **configuration(model, device, precision), "input_hw": list(input_hw)}
    return {**key, "decoded_at_start": True} if decoded_at_start else key


def load_rates(device: torch.device, key: dict) -> Rates:
    return load_profile(profile_dir(device), key, Rates)


def save_rates(device: torch.device, rates: Rates) -> None:
    save_profile(profile_dir(device), rates)


def _assumed_setup(rates: Rates, d: RouteDefaults) -> float:
    """The set-up assumed until measured: smaller where the images were decoded at start-up (no loader)."""
    return d.fast_setup_decoded_at_start if rates.key.get("decoded_at_start") else d.fast_setup


def choose_route(rates: Rates, device_kind: str, num_samples: int, pil_files: int, calibration: int,
                 exact: bool, passes: int = 1, recheck_pool: int = 0, workers: int = 0) -> Route:
    """Fast or reference for the whole run: the smaller expected time (module docstring); ``passes``
    runs (a checkpoint sweep's) share one setup; ``recheck_pool``: the processes that decode the near-ties
    during the pass (0: after it), beside the reference's ``workers``."""
    d = DEFAULTS.get(device_kind, DEFAULTS["cpu"])
    t_ref = rates.reference_image_seconds or d.reference_image
    if rates.fast_to_reference and rates.reference_image_seconds:
        t_fast = rates.fast_to_reference * t_ref
    elif rates.fast_image_seconds:
        t_fast = rates.fast_image_seconds
    else:  # never measured: the assumed ratio to this machine's reference cost (module docstring)
        t_fast = d.fast_image / d.reference_image * t_ref
    assumed = _assumed_setup(rates, d)
    setup = rates.fast_setup_seconds if rates.fast_setup_seconds is not None else assumed
    share = (rates.recheck_share if rates.recheck_share is not None else d.recheck_share) if exact else 0.0
    main = num_samples - pil_files
    near_ties = share * main if exact else 0.0
    by_reference = pil_files + (calibration if exact else 0.0) + near_ties
    overlapped = recheck_pool > 0 and near_ties > 0
    if overlapped:
        left = max(0.0, near_ties * t_ref - main * t_fast * recheck_pool / max(1, workers))
        fast = setup + passes * (main * t_fast + left + (by_reference - near_ties) * t_ref)
    else:
        fast = setup + passes * (main * t_fast + by_reference * t_ref)
    reference = passes * num_samples * t_ref
    if rates.reference_image_seconds and rates.fast_image_seconds:
        source = "measured"
    elif rates.reference_image_seconds:
        source = f"the reference's measured, the fast path's assumed ({d.fast_image / d.reference_image:.2f} x it)"
    elif rates.fast_image_seconds:
        source = "the fast path's measured, the reference's assumed"
    else:
        source = "assumed"
    if rates.fast_to_reference and rates.reference_image_seconds:
        source += f", the fast path's per image {rates.fast_to_reference:.2f} x the reference's (one run)"
    runs = f"{passes} x " if passes > 1 else ""
    during = f", the {near_ties:.0f} near-ties by {recheck_pool} process(es) during the pass" if overlapped else ""
    figures = (f"expected {fast:.1f} s fast ({setup:.1f} s setup + {runs}{main} x {1e3 * t_fast:.1f} ms + "
               f"{by_reference:.0f} x {1e3 * t_ref:.1f} ms by the reference's code{during}) vs {reference:.1f} s "
               f"({runs}{num_samples} x {1e3 * t_ref:.1f} ms) all by the reference's code; rates {source}")
    if fast < reference:
        return Route(True, f"fast path: {figures}", fast, reference)
    return Route(False, f"every sample by the reference's code, the fast path would not pay: {figures}",
                 fast, reference, setup_decided=fast - setup + assumed < reference)


def record(rates: Rates, device: torch.device, *, reference: tuple[int, float] | None = None,
           fast: tuple[int, float] | None = None, setup: float | None = None,
           recheck_share: float | None = None) -> None:
    """Fold one run's measurements in (``(images, seconds)`` pairs) and save. Per-image costs and the
    set-up keep the best seen; where one run measured both costs, their ratio (module docstring); the
    recheck share the latest."""
    def per_image(pair: tuple[int, float] | None) -> float | None:
        if not pair or pair[0] <= 0 or not math.isfinite(pair[1]) or pair[1] <= 0:
            return None
        return pair[1] / pair[0]

    def best(old: float | None, new: float | None) -> float | None:
        return old if new is None else new if old is None else min(old, new)

    t_ref, t_fast = per_image(reference), per_image(fast)
    rates.reference_image_seconds = best(rates.reference_image_seconds, t_ref)
    rates.fast_image_seconds = best(rates.fast_image_seconds, t_fast)
    if t_ref is not None and t_fast is not None:
        rates.fast_to_reference = t_fast / t_ref
    if setup is not None:
        rates.fast_setup_seconds = best(rates.fast_setup_seconds, setup if math.isfinite(setup) else None)
    if recheck_share is not None:
        rates.recheck_share = recheck_share
    save_rates(device, rates)


def relax_setup(rates: Rates, device_kind: str) -> None:
    """A run the measured set-up sent to the reference's code (``Route.setup_decided``): halve its excess over
    the assumed one (module docstring; ``record`` saves it); nothing where it is at most the assumption."""
    assumed = _assumed_setup(rates, DEFAULTS.get(device_kind, DEFAULTS["cpu"]))
    if rates.fast_setup_seconds is not None and rates.fast_setup_seconds > assumed:
        rates.fast_setup_seconds = assumed + (rates.fast_setup_seconds - assumed) / 2
