"""``fasteval eval DATA --weights A B C``: the checkpoint sweep as a command (options, checks, outputs);
the sweep itself is fasteval/evaluation/sweep.py."""

from __future__ import annotations

import functools
import os
import sys
import time

import torch

from fasteval.errors import FastevalError
from fasteval.evaluation.sweep import check_checkpoints, expand_weights, run_sweep
from fasteval.options import fast_options
from fasteval.output.sweep_report import PLOT_NAME, build_sweep_report, format_sweep, plot_sweep


def split_sweep(args) -> bool:
    """Expand ``args.weights`` (eval's list) in place: one checkpoint leaves ``args.weights`` that path
    (``eval`` as it always was) and returns False; several set ``args.checkpoints`` and
    ``args.weights`` the first, resolve ``--plot``, refuse what a sweep cannot do, and return True."""
    values = args.weights or []
    paths = expand_weights(values) if values else []
    args.checkpoints = paths
    if len(paths) <= 1:
        args.weights = paths[0] if paths else None
        return False
    for option, on in (("--reference", args.reference), ("--validate", args.validate),
                       ("--predictions", args.predictions)):
        if on:
            raise FastevalError(f"{option} evaluates one checkpoint; it cannot be combined with several --weights")
    if args.data is None:
        raise FastevalError("the built-in demo uses its own model: give DATA to evaluate several --weights")
    from fasteval.distributed import detect_launch

    launch = detect_launch()
    if launch is not None and launch.world_size > 1:
        raise FastevalError("a checkpoint sweep runs in one process: launch it without torchrun (or evaluate each "
                            "checkpoint under torchrun)")
    args.weights = paths[0]
    return True


def cmd_sweep(args, prepare) -> int:
    """``fasteval eval DATA --weights A B C``: check everything, decode once, compile once, run each."""
    from fasteval.data.decoded import DecodedSource, check_cache_dir
    from fasteval.evaluation.fast import FastEvaluator
    from fasteval.output.report import write_json

    from fasteval.spec_choice import check_one_preprocessing

    if args.cache:
        check_cache_dir(args.cache)
    check_one_preprocessing(args.checkpoints, args.preset)
    samples, spec, device, model, config = prepare(args)
    check_checkpoints(config["arch"], args.checkpoints, samples.num_classes)
    if args.explain:
        from fasteval.evaluation.plan import make_plan
        from fasteval.output.report import explain_report

        plan = make_plan(samples, model, spec, device, fast_options(args), source="store",
                         passes=len(args.checkpoints))
        text, report = explain_report(f"fasteval eval (a sweep of {len(args.checkpoints)} checkpoints)", config,
                                      samples, plan.to_json())
        print(text)
        if args.json:
            write_json(report, args.json)
        return 0
    start = time.perf_counter()
    source = DecodedSource(args.cache)
    evaluator = FastEvaluator(samples, model, spec, device, fast_options(args), batch_source=source,
                              passes=len(args.checkpoints))
    setup = time.perf_counter() - start
    from fasteval.model.models import build_model

    loads = [functools.partial(build_model, config["arch"], path, None) for path in args.checkpoints]
    results, seconds = run_sweep(evaluator, loads, progress=not args.no_progress)
    labels = torch.tensor(samples.labels)
    decoded = dict(source.info) if source.info else {"placement": "none", "reason": "every sample by the reference's "
                                                                                     "code", "cache": "off"}
    report = build_sweep_report(args.checkpoints, results, seconds, labels, config, device, decoded, setup, samples)
    report["plan"] = evaluator.executed_plan.to_json()
    print(format_sweep(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot_sweep(report, os.path.join(args.plot, PLOT_NAME))
    print(f"fasteval: {len(args.checkpoints)} checkpoints in {report['seconds']:.1f} s", file=sys.stderr)
    return 0
