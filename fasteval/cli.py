"""The ``fasteval`` command: ``eval``, ``bench``, ``train`` and ``synth``."""

from __future__ import annotations

import argparse
import os
import sys

from fasteval.errors import FastevalError, Terminated, describe_error
from fasteval.options import (add_fast_options, add_run_options, fast_options, non_empty_path, non_negative_int,
                              output_paths, positive_int, warn_many_workers)
from fasteval.procs import exit_promptly


class _Parser(argparse.ArgumentParser):
    """argparse with fasteval's errors: one line naming the argument, exit 2 (argparse's own prints its
    whole usage block first); the command's ``--help`` lists the options."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    from fasteval import __version__

    parser = _Parser(prog="fasteval", description="The fasteval command: eval, bench, train and synth.")
    parser.add_argument("--version", action="version", version=f"fasteval {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate a classifier on a dataset (an ImageFolder, a CSV list or WebDataset "
                                     "shards)")
    add_run_options(ev, sweep=True)
    add_fast_options(ev)
    mode = ev.add_mutually_exclusive_group()
    mode.add_argument("--reference", action="store_true",
                      help="run the plain PyTorch reference loop (torchvision + PIL + eager fp32)")
    ev.add_argument("--explain", action="store_true",
                    help="print the plan, every decision with its reason, and exit without evaluating")
    mode.add_argument("--validate", action="store_true",
                      help="run the fast path and the reference, and compare them sample by sample")
    ev.add_argument("--predictions", metavar="PATH", type=non_empty_path,
                    help="write per sample: path, label, prediction, loss, top-5 classes, confidence, margin, "
                         "rechecked (CSV)")
    ev.add_argument("--cache", metavar="DIR", type=non_empty_path,
                    help="keep the decoded images in DIR (memory-mapped, keyed by content): a later run skips decoding")
    ev.add_argument("--plot", metavar="DIR", type=non_empty_path,
                    help="write PNGs into DIR (needs matplotlib): the confusion matrix, recall by class with "
                         "intervals, the reliability diagram; a sweep: top-1 per checkpoint with its 95%% interval "
                         "(checkpoints.png)")

    be = sub.add_parser("bench", help="the reference loop and the fast path side by side (--verbose: the stage "
                                      "breakdown)")
    add_run_options(be)
    add_fast_options(be, dali=False)
    be.add_argument("--repeats", type=positive_int, default=3,
                    help="end-to-end runs per path; the median is reported (default 3)")
    be.add_argument("--plot", metavar="PNG", type=non_empty_path,
                    help="bar chart of images/s per stage (needs matplotlib)")
    be.add_argument("--no-time-to-result", action="store_true",
                    help="skip timing the whole eval commands (each path cold, then --repeats times warm)")
    be.add_argument("--explain", action="store_true",
                    help="print the plans of the timed fast loop and of the reference, and exit without running")
    be.add_argument("--verbose", action="store_true",
                    help="print the stage breakdown, the time split, memory and every reason")

    from fasteval.training.options import add_train_options  # light: argparse only

    tr = sub.add_parser("train", help="fine-tune a classifier, with exact per-epoch train and validation metrics")
    add_train_options(tr)
    add_fast_options(tr, dali=False)
    tr.add_argument("--explain", action="store_true",
                    help="print the plan each epoch's validation follows, and exit without training")

    sy = sub.add_parser("synth", help="write a deterministic synthetic ImageFolder of JPEGs")
    sy.add_argument("out", metavar="OUT", type=non_empty_path, help="output folder")
    sy.add_argument("--classes", type=positive_int, default=10, help="number of class folders (default 10)")
    sy.add_argument("--per-class", type=positive_int, default=20, help="images per class (default 20)")
    sy.add_argument("--size", default="imagenet", help="imagenet (varied, around 500x375; the default) or WxH, "
                                                       "e.g. 100x100")
    sy.add_argument("--seed", type=non_negative_int, default=0,
                    help="the same seed gives the same files (default 0)")
    sy.add_argument("--quality", type=positive_int, default=90, help="JPEG quality (default 90)")
    sy.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUT")
    sy.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _check_names(args) -> None:
    """The named options' values, checked before anything heavy is imported: a typo answers at once,
    with the same line the stage that uses the value would give."""
    import re

    from fasteval.choices import COMPILE_MODES, DEVICE_PATTERN, EXACT_MODES, LOADERS, PRECISIONS

    for option, value, allowed in (("--loader", args.loader, LOADERS), ("--precision", args.precision, PRECISIONS),
                                   ("--exact", args.exact, EXACT_MODES), ("--compile", args.compile, COMPILE_MODES)):
        if value not in allowed:
            raise FastevalError(f"unknown {option} {value!r}; choose from {', '.join(allowed)}")
    if not re.fullmatch(DEVICE_PATTERN, args.device):
        raise FastevalError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")


def _check_options(args, outputs: bool = True) -> None:
    """Every option and output path, checked before any work whatever the mode (``--reference`` too);
    the names of values were checked by ``_check_names``, what they mean here is checked now.
    ``outputs=False``: a distributed rank that writes nothing (rank 0 checks them)."""
    from fasteval.devices import resolve_device
    from fasteval.model.inference import resolve_precision
    from fasteval.data.loaders import resolve_loader
    from fasteval.files import check_distinct, check_not_inside, check_output_file
    from fasteval.data.preprocess import get_spec

    if args.preset is not None:  # the sizes alone are checked against the spec they change (fasteval/spec_choice.py)
        get_spec(args.preset, args.resize, args.crop)
    if outputs:
        warn_many_workers(args.workers)
    if outputs and getattr(args, "reference", False):  # once under torchrun: by the rank that writes
        ignored = [f"--{name} {getattr(args, name)}" for name in ("loader", "precision", "compile", "exact")
                   if getattr(args, name) != "auto"] + (["--dali"] if getattr(args, "dali", None) else [])
        if ignored:
            print(f"fasteval: warning: --reference runs the plain PyTorch loop; ignored: {', '.join(ignored)}",
                  file=sys.stderr)
    resolve_precision(args.precision, resolve_device(args.device))
    if args.loader == "dali":  # "auto" needs no check, and importing DALI to find out costs a third of a second
        resolve_loader(args.loader)
    files = {option: path for option, path in output_paths(args).items() if option != "--cache"}  # a folder
    outputs = {option: path if outputs else None for option, path in files.items()}
    checkpoints = getattr(args, "checkpoints", None) or [args.weights]  # eval's (a sweep's several), or bench's one
    check_not_inside(outputs, {"--weights": [path for path in checkpoints if path and os.path.isfile(path)]})
    check_distinct(outputs)
    if args.command == "eval" and outputs.get("--plot"):  # a folder of PNGs, unlike bench's --plot file
        from fasteval.output.plots import check_plot_folder

        check_plot_folder(outputs.pop("--plot"))
    for option, path in outputs.items():
        if path:
            check_output_file(path, option)


def _prepare(args, ranks=None, samples=None):
    """Resolve the dataset, model, spec and device shared by every run; refuse what cannot run
    (options, outputs, a model that does not take the input size, undecodable files) before any work.
    ``ranks`` (fasteval/distributed.py): under torchrun, every rank checks that it sees rank 0's dataset
    and the files of its own shard. ``samples``: DATA's sample list, when the command listed it already."""
    import torch

    from fasteval.demo import ensure_demo
    from fasteval.devices import resolve_device
    from fasteval.model.models import build_model, check_input_fits
    from fasteval.data.preprocess import get_spec
    from fasteval.memory import check_eval_memory
    from fasteval.data.probe import check_headers, probe
    from fasteval.data.samples import check_not_samples, discover, given_classes
    from fasteval.distributed import Ranks
    from fasteval.spec_choice import choose_spec
    from fasteval.output.report import run_config

    ranks = ranks or Ranks()
    _check_options(args, outputs=ranks.is_main)
    weights = args.weights
    data = args.data
    if data is None:
        if args.arch not in (None, "resnet18") or args.weights:
            raise FastevalError("the built-in demo uses its own resnet18 model: give DATA to choose --arch/--weights")
        data, weights = ensure_demo()
        check_outside_data(args, data)
    samples = samples if samples is not None else discover(data, quiet=not ranks.is_main,
                                                           classes=given_classes(getattr(args, "classes", None)))
    ranks.check_same_data(samples)
    if ranks.is_main:
        files = output_paths(args)  # the files a run writes (eval's --plot and --cache are folders)
        check_not_samples(samples, {**files, "--plot": files["--plot"] if args.command == "bench" else None,
                                    "--cache": None})
    choice = choose_spec(args.arch, args.weights, args.preset, args.resize, args.crop)  # the demo's: the default
    spec, arch = choice.spec, choice.arch
    device = resolve_device(ranks.device_name(args.device), make_current=True)
    with torch.random.fork_rng(devices=[]):  # a random init is seed 0's: `eval` and `--reference` see one model
        if weights is None:
            torch.manual_seed(0)
        model = build_model(arch, weights, samples.num_classes)
    if weights is None:
        ranks.share_random_init(model)
    first = probe(samples.paths[0])
    if first.size is not None:
        image_hw = (first.size[1], first.size[0])
        check_eval_memory(model, arch, spec, image_hw, min(args.batch_size, len(samples)), args.workers, device)
        check_input_fits(model, arch, spec, spec.output_hw(*image_hw))
    check_headers(ranks.shard(samples))
    if weights is None and ranks.is_main:  # once every check passed: a refused run prints its one error line
        print("fasteval: no --weights: the model is randomly initialised (seed 0, the same in every run), "
              "its accuracy means nothing", file=sys.stderr)
    if choice.note and ranks.is_main:
        print(f"fasteval: note: {choice.note}", file=sys.stderr)
    config = run_config(data, arch, weights, spec, args.batch_size, args.workers, device, samples.num_classes,
                        len(samples))
    return samples, spec, device, model, config


def check_outside_data(args, data: str | None) -> None:
    """Refuse any output of ``eval`` (a sweep's too) or ``bench`` inside the dataset ``data``; first of
    all, before an output's folder is even probed."""
    from fasteval.files import check_not_inside

    check_not_inside(output_paths(args), {"DATA" if args.data else "the demo dataset": data})


# Device nodes whose presence means torch may find a GPU (NVIDIA's driver, ROCm's): with --device auto
# there, the command does not decode at start-up (a GPU run would not read the pixels).
GPU_NODES = ("/dev/nvidiactl", "/dev/kfd")


def _start_prefetch(args):
    """Before torch is imported, for a single fast eval on the CPU: list DATA and, for a small dataset,
    start decoding it as the reference does (fasteval/data/prefetch.py). Returns (the sample list or
    None, the decoder or None; ``--explain``: True where it would start one); any problem with DATA or the
    options is left to the checks that report it (None, None here)."""
    if (args.reference or args.validate or args.cache or args.data is None or args.loader not in ("auto", "torchvision")
            or len(args.weights or []) > 1 or "RANK" in os.environ or "WORLD_SIZE" in os.environ):
        return None, None
    if args.device != "cpu" and not (args.device == "auto" and not any(map(os.path.exists, GPU_NODES))):
        return None, None  # a GPU run: neither listed early nor decoded at start-up
    if args.weights and args.weights[0] != "DEFAULT" and not os.path.isfile(args.weights[0]):  # a folder or a glob
        return None, None
    if args.arch and args.arch.startswith("timm:"):  # its preprocessing is timm's, known once torch is imported
        return None, None
    from fasteval.data import prefetch
    from fasteval.data.preprocess import input_hw
    from fasteval.data.samples import discover, given_classes
    from fasteval.spec_choice import choose_spec

    try:  # the run's own preprocessing (a checkpoint's record is read without torch)
        spec = choose_spec(args.arch, (args.weights or [None])[0], args.preset, args.resize, args.crop).spec
        samples = discover(args.data, classes=given_classes(args.classes))
    except FastevalError:
        return None, None
    hw = input_hw(spec, samples.paths[0]) if samples.paths else None
    if not prefetch.reads_pil_pixels("cpu", args.loader, len(samples), hw):
        return samples, None
    return samples, True if args.explain else prefetch.start(samples, spec)


def cmd_eval(args) -> int:
    _check_names(args)
    check_outside_data(args, args.data)
    listed, pixels = _start_prefetch(args)
    if not args.reference:  # the reference command imports torchvision as a plain script does
        from fasteval.model.torchvision_import import import_torchvision

        import_torchvision()
    from fasteval.sweep_command import cmd_sweep, split_sweep

    if split_sweep(args):
        return cmd_sweep(args, _prepare)
    if args.cache:
        from fasteval.data.decoded import check_cache_dir

        check_cache_dir(args.cache)
    from fasteval.evaluation.fast import evaluate_fast
    from fasteval.evaluation.plan import make_plan, reference_plan
    from fasteval.evaluation.reference import REFERENCE_SETTINGS, evaluate_reference
    from fasteval.output.report import build_report, format_table, write_json, write_predictions
    from fasteval.evaluation.validate import compare, format_comparison
    from fasteval.distributed import start_ranks

    with start_ranks(args.device, debug=args.debug) as ranks:  # one process, or one rank under torchrun
        samples, spec, device, model, config = ranks.step(_prepare, args, ranks, listed)
        shard, batch, progress = ranks.shard(samples), config["batch_size"], not args.no_progress and ranks.is_main
        plain = reference_plan(len(samples), args.batch_size, args.workers,
                               "--reference" if args.reference else "--validate's reference", spec).to_json()
        if args.explain:  # the plans, nothing evaluated
            fast = None if args.reference else ranks.step(
                make_plan, shard, model, spec, device, fast_options(args), source="store" if args.cache else "loader",
                scope=ranks.scope(samples), decoded_at_start=pixels is not None)
            if not ranks.is_main:
                return 0
            return _explain(args, config, samples, fast.to_json() if fast else None,
                            plain if args.reference or args.validate else None)
        reference = fast = None
        if args.reference or args.validate:
            reference = ranks.gather(ranks.step(evaluate_reference, shard, model, spec, batch_size=args.batch_size,
                                                workers=args.workers, device=device, progress=progress), samples, batch)
            reference.extra["plan"] = plain
        if not args.reference:
            fast = ranks.gather(ranks.step(evaluate_fast, shard, model, spec, device=device, options=fast_options(args),
                                           progress=progress, scope=ranks.scope(samples), pixels=pixels,
                                           **_decoded_source(args)), samples, batch)
    if not ranks.is_main:
        return 0  # rank 0 reports and writes
    main_result = fast if fast is not None else reference
    report = build_report(main_result, {**config, **(REFERENCE_SETTINGS if fast is None else {})}, device, samples)
    text = format_table(report, "fasteval eval" + (" --reference" if fast is None else ""))
    if args.validate:
        cmp = compare(samples, reference, fast)
        report = {**report, "reference": build_report(reference, {**config, **REFERENCE_SETTINGS}, device, samples),
                  "validation": cmp}
        text += "\n\n" + format_comparison(cmp)
    printed = _print_report(text)
    if args.json:
        write_json(report, args.json)
    if args.predictions:
        write_predictions(args.predictions, samples, main_result)
    if args.plot:
        from fasteval.output.plots import write_plots

        write_plots(report, args.plot)
    return 0 if printed else _stdout_closed(bool(args.json or args.predictions or args.plot))


def _explain(args, config: dict, samples, fast: dict | None, reference: dict | None) -> int:
    """``--explain``: print the plan(s) and write them to ``--json``; nothing evaluated, nothing else written."""
    from fasteval.output.report import explain_report, write_json

    text, report = explain_report(f"fasteval {args.command}", config, samples, fast, reference)
    printed = _print_report(text)
    if args.json:
        write_json(report, args.json)
    return 0 if printed else _stdout_closed(bool(args.json))


def _print_report(text: str) -> bool:
    """Print the report (flushed); False where stdout was closed early (``| head``), which then points
    at /dev/null, so that the run's files are still written and Python's final flush stays quiet."""
    try:
        print(text, flush=True)
        return True
    except BrokenPipeError:
        _to_devnull(sys.stdout)
        return False


def _to_devnull(stream) -> None:
    """Point a closed pipe's file descriptor at /dev/null: Python's flush at exit then stays quiet."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _stdout_closed(wrote: bool) -> int:
    """The one line for a report that could not be printed (exit 2); stderr may be that pipe too
    (``2>&1 | head``), and then there is nowhere left to say it."""
    try:
        print("fasteval: error: stdout was closed before the report was printed (broken pipe)"
              + ("; the output files were written" if wrote else ""), file=sys.stderr)
    except OSError:
        _to_devnull(sys.stderr)
    return 2


def _decoded_source(args) -> dict:
    """``--cache DIR`` on a single eval: the batches from the decoded store (fasteval/data/decoded.py)."""
    if not args.cache:
        return {}
    from fasteval.data.decoded import DecodedSource

    return {"batch_source": DecodedSource(args.cache)}


def cmd_bench(args) -> int:
    _check_names(args)
    check_outside_data(args, args.data)
    from fasteval.bench import bench_loop_options, run_bench
    from fasteval.evaluation.plan import make_plan, reference_plan
    from fasteval.output.bench_table import format_bench, plot_bench
    from fasteval.output.report import write_json

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FastevalError("--plot needs matplotlib: pip install 'fasteval[plot]'") from None
    from fasteval.distributed import format_ranks_bench, start_ranks

    with start_ranks(args.device, debug=args.debug) as ranks:  # under torchrun: each rank benches its shard
        samples, spec, device, model, config = ranks.step(_prepare, args, ranks)
        if len(samples) < ranks.world_size:
            raise FastevalError(f"bench under torchrun needs a sample per rank: {len(samples)} samples, "
                                f"{ranks.world_size} ranks")
        if args.explain:  # the timed loop's plan and the reference's, nothing evaluated
            plan = ranks.step(make_plan, ranks.shard(samples), model, spec, device,
                              bench_loop_options(fast_options(args)), scope=ranks.scope(samples))
            if not ranks.is_main:
                return 0
            return _explain(args, config, samples, plan.to_json(),
                            reference_plan(len(samples), args.batch_size, args.workers, "bench", spec).to_json())
        result = ranks.step(run_bench, ranks.shard(samples), model, spec, device, fast_options(args),
                            repeats=args.repeats, progress=not args.no_progress and ranks.is_main, eval_config=config,
                            measure_time_to_result=not args.no_time_to_result and not ranks.launched,
                            scope=ranks.scope(samples))
        result.update(ranks.bench_summary(result))
    if not ranks.is_main:
        return 0
    result["config"].update(arch=config["arch"], weights=config["weights"], preset=spec.name,
                            batch_size=config["batch_size"], batch_size_requested=config["batch_size_requested"])
    printed = _print_report(format_bench(result, verbose=args.verbose) + format_ranks_bench(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot_bench(result, args.plot)
    return 0 if printed else _stdout_closed(bool(args.json or args.plot))


def cmd_train(args) -> int:
    _check_names(args)
    from fasteval.training.command import train_command

    return train_command(args)


def cmd_synth(args) -> int:
    from fasteval.data.synth import synth_dataset

    out = synth_dataset(args.out, args.classes, args.per_class, args.size, args.seed, args.quality,
                        overwrite=args.overwrite)
    print(f"wrote {args.classes * args.per_class} images in {args.classes} classes to {out}")
    return 0


COMMANDS = {"eval": cmd_eval, "bench": cmd_bench, "train": cmd_train, "synth": cmd_synth}


def console_main() -> None:
    """The ``fasteval`` command (and ``python -m fasteval``): ``main``, then exit with its code, with
    Ctrl-C ignored from then on. The run has finished (or reported its interruption) and its outputs are
    written; an interrupt during the exit (DALI's unload, DataLoader finalizers) would only print a
    traceback. The exit skips the interpreter's teardown (``procs.exit_promptly``)."""
    import signal

    try:
        code = main()
    except KeyboardInterrupt:  # before main's own handler is in place (the argument parser, its imports)
        print("fasteval: interrupted", file=sys.stderr)
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_promptly(code)


def _end_progress_bars() -> None:
    """Close the progress bars a run left open when it stopped: each ends its line now, so the message
    that follows starts a line of its own (not glued to a bar, which would be drawn again after it)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _interrupted(exc: BaseException) -> int:
    """A run ended by Ctrl-C: its bars closed, its traceback freed quietly, one line (by rank 0 under torchrun)."""
    from fasteval.distributed import reports_error
    from fasteval.procs import drop_quietly

    _end_progress_bars()
    drop_quietly(exc)
    if reports_error(exc):
        print("fasteval: interrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    """Run a command. Any error is one line on stderr and exit code 2 (``--debug``: the traceback);
    Ctrl-C exits 130 and SIGTERM 143, both after cleaning up (temporary folders, worker processes)."""
    from fasteval.distributed import reports_error
    from fasteval.procs import interrupts_noted, sigterm_raises

    args = build_parser().parse_args(argv)
    interrupts: list[float] = []
    try:
        with sigterm_raises(), interrupts_noted() as interrupts:
            return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except Terminated as exc:
        _end_progress_bars()
        if reports_error(exc):
            print("fasteval: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except BrokenPipeError:  # stdout closed early (``| head``): no second error when Python flushes it at exit
        _to_devnull(sys.stdout)
        return _stdout_closed(False)
    except Exception as exc:
        if args.debug:
            raise
        if interrupts:  # Ctrl-C came first: this error is what it stopped (a DataLoader worker it ended)
            return _interrupted(exc)
        _end_progress_bars()
        if reports_error(exc):  # under torchrun: once, by rank 0 (fasteval/distributed.py)
            print(f"fasteval: error: {describe_error(exc)}", file=sys.stderr)
        return 2
