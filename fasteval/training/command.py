"""``fasteval train``: options checked before any work, then the run, its report and its files."""

from __future__ import annotations

import os
import sys

from fasteval.errors import FastevalError
from fasteval.options import warn_many_workers
from fasteval.training import state
from fasteval.training.options import DEFAULT_PRESET


def check_run_folder(out: str, resume: bool, overwrite: bool) -> None:
    """A new or empty RUN_DIR; a non-empty one only with ``--overwrite``; ``--resume`` needs its last.pt."""
    from fasteval.files import check_output_folder

    if resume:
        if overwrite:
            raise FastevalError("--resume and --overwrite contradict each other: choose one")
        last = os.path.join(out, state.LAST)
        if not os.path.isfile(last):
            raise FastevalError(f"--resume: {out} holds no {state.LAST} to resume from")
        check_output_folder(out, "--out", overwrite=True)
        return
    check_output_folder(out, "--out", overwrite)


def check_options(args) -> None:
    """Every option of ``train``, before anything heavy runs."""
    from fasteval.data.preprocess import get_spec
    from fasteval.devices import resolve_device
    from fasteval.model.inference import resolve_precision
    from fasteval.files import check_distinct, check_not_inside, check_output_file

    if args.precision == "fp16":
        raise FastevalError("--precision fp16 is not supported by fasteval train (it would need loss scaling); "
                            "use bf16 or fp32")
    get_spec(args.preset or DEFAULT_PRESET, args.resize, args.crop)
    resolve_precision(args.precision, resolve_device(args.device))
    warn_many_workers(args.workers)
    weights = args.weights if args.weights and os.path.isfile(args.weights) else None  # not DEFAULT
    check_not_inside({"--out": args.out, "--json": args.json},
                     {"TRAIN_DIR": args.train, "VAL_DIR": args.val, "--weights": weights}, clears=("--out",))
    check_run_folder(args.out, args.resume, args.overwrite)
    if args.json:
        check_output_file(args.json, "--json")
        check_distinct({"--json": args.json, **{f"RUN_DIR/{name}": os.path.join(args.out, name)
                                                for name in state.OUTPUTS}})
    if args.weights and args.weights != "DEFAULT":
        from fasteval.model.models import read_state_dict

        read_state_dict(args.weights)  # a missing or unreadable file answers now


def train_precision(requested: str, device) -> str:
    """bf16 where it is native and fast (autocast), else fp32; fp16 (auto on older GPUs) becomes fp32."""
    from fasteval.model.inference import resolve_precision

    resolved = resolve_precision(requested, device)
    return "fp32" if resolved == "fp16" else resolved


def preprocessing(args, resume: dict | None):
    """The validation preprocessing: the flags' for a new run; a resumed run's own, as its last.pt records
    it (one history, one preprocessing), a flag that contradicts it refused. A checkpoint of an older
    fasteval records none: the flags' then, said in one line."""
    from dataclasses import replace

    from fasteval.data.preprocess import get_spec, spec_from_record

    kept = resume.get(state.PREPROCESS) if resume is not None else None
    if kept is None:
        given = " ".join(f"--{k} {v}" for k, v in (("preset", args.preset), ("resize", args.resize),
                                                    ("crop", args.crop)) if v is not None)
        spec = replace(get_spec(args.preset or DEFAULT_PRESET, args.resize, args.crop),
                       source=f"train's validation: {given or f'the default preset {DEFAULT_PRESET}'}"
                              + (f" (preset {DEFAULT_PRESET})" if given and args.preset is None else ""))
        if resume is not None:
            print(f"fasteval: warning: --resume: {args.out}/{state.LAST} does not record its preprocessing (an older "
                  f"fasteval made it); validating with {_describe(spec.name, spec.resize, spec.crop)}", file=sys.stderr)
        return spec
    given = {"preset": args.preset, "resize": args.resize, "crop": args.crop}
    conflicts = [f"--{name} {value}" for name, value in given.items() if value is not None and value != kept[name]]
    if conflicts:
        raise FastevalError(f"--resume: {args.out}/{state.LAST} was trained with "
                            f"{_describe(kept['preset'], kept['resize'], kept['crop'])}, not {' '.join(conflicts)}; "
                            f"a resumed run keeps its preprocessing: drop {'it' if len(conflicts) == 1 else 'them'}")
    return replace(spec_from_record(kept, f"{args.out}/{state.LAST}"),
                   source=f"recorded in {args.out}/{state.LAST}: a resumed run keeps its preprocessing")


def _describe(preset: str, resize: int, crop: int | None) -> str:
    return f"--preset {preset} --resize {resize} " + (f"--crop {crop}" if crop is not None else "(no crop)")


def prepare(args, spec):
    """The two sample lists (the same classes) and the device, all checked against the validation ``spec``."""
    from fasteval.data.preprocess import check_batchable
    from fasteval.data.probe import check_headers
    from fasteval.data.samples import check_not_samples, discover
    from fasteval.devices import resolve_device

    train, val = discover(args.train), discover(args.val)
    for samples in (train, val):
        check_not_samples(samples, {"--json": args.json})
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        detail = f"e.g. {only[0]!r} is in one only" if only else "in another order"
        raise FastevalError(f"TRAIN_DIR {args.train} and VAL_DIR {args.val} have different class folders ({detail})")
    check_batchable(spec, val.paths)  # the seed preset (no crop) refuses mixed aspect ratios, as eval does
    check_headers(train)
    check_headers(val)
    device = resolve_device(args.device, make_current=True)
    return train, val, device


def recipe_from(args, resume: dict | None):
    """The recipe from the flags; when resuming, the checkpoint's recipe, with the flags' --epochs."""
    from dataclasses import replace

    from fasteval.training.recipe import Recipe

    if resume is not None:
        kept = Recipe(**resume["recipe"])
        ignored = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in Recipe.__dataclass_fields__
                   if name != "epochs" and getattr(args, name) != getattr(Recipe(), name)
                   and getattr(args, name) != getattr(kept, name)]
        if ignored:
            print(f"fasteval: warning: --resume continues with the run's own recipe; ignored: {', '.join(ignored)}",
                  file=sys.stderr)
        return replace(kept, epochs=args.epochs)
    return Recipe(arch=args.arch, weights=args.weights, epochs=args.epochs, lr=args.lr,
                  weight_decay=args.weight_decay, batch_size=args.batch_size, val_batch_size=args.val_batch_size,
                  step_size=args.step_size, gamma=args.gamma, seed=args.seed)


def train_command(args) -> int:
    from fasteval.files import locked_folder

    check_options(args)
    if args.explain:  # nothing written: RUN_DIR is neither created nor locked
        return _explain(args)
    with locked_folder(args.out, "--out"):  # one run writes RUN_DIR at a time; a new one is removed on failure
        return _train(args)


def _explain(args) -> int:
    """``train --explain``: the plan each epoch's validation would follow; nothing trained or written."""
    from fasteval.output.report import explain_report
    from fasteval.training.loop import RunOptions, Trainer

    spec = preprocessing(args, None)
    recipe = recipe_from(args, None)
    train, val, device = prepare(args, spec)
    options = RunOptions(out=args.out, device=device, precision=train_precision(args.precision, device),
                         loader=args.loader, compile=args.compile, exact=args.exact, workers=args.workers,
                         progress=False)
    trainer = Trainer(train, val, spec, recipe, options, None)
    config = {"path": os.path.abspath(args.val), "arch": recipe.arch, "weights": recipe.weights,
              "device": str(device)}
    text, _ = explain_report(f"fasteval train (validation, {recipe.epochs} epoch(s))", config, val,
                             trainer.validation_plan().to_json())
    print(text)
    return 0


def _train(args) -> int:
    """The run, RUN_DIR held: checked again now that no other run can change it, then trained."""
    from fasteval.output.report import environment, write_json
    from fasteval.training.history import best_epoch
    from fasteval.training.loop import RunOptions, Trainer

    check_run_folder(args.out, args.resume, args.overwrite)
    resume = state.load(os.path.join(args.out, state.LAST)) if args.resume else None
    spec = preprocessing(args, resume)
    recipe = recipe_from(args, resume)
    if resume is not None and resume["epoch"] >= recipe.epochs:
        raise FastevalError(f"--resume: {args.out}/{state.LAST} has finished {resume['epoch']} epochs already; "
                            f"give --epochs above {resume['epoch']} to train more")
    train, val, device = prepare(args, spec)
    if resume is not None and resume["classes"] != train.classes:
        raise FastevalError(f"--resume: {args.out}/{state.LAST} was trained on other classes than {args.train}")
    if recipe.weights is None and resume is None:
        print("fasteval: no --weights: training starts from a random initialisation", file=sys.stderr)
    precision = train_precision(args.precision, device)
    options = RunOptions(out=args.out, device=device, precision=precision, loader=args.loader,
                         compile=args.compile, exact=args.exact, workers=args.workers,
                         progress=not args.no_progress)
    trainer = Trainer(train, val, spec, recipe, options, resume)  # the model built, sizes and memory checked
    if args.overwrite:  # once the model is built (--weights DEFAULT may fail offline)
        for name in state.OUTPUTS:  # an old run's files never mix with this one's
            if os.path.exists(os.path.join(args.out, name)):
                os.unlink(os.path.join(args.out, name))
    if resume is not None:
        print(f"resuming {args.out} after epoch {resume['epoch']} (its recipe and preprocessing; "
              f"--epochs {recipe.epochs})")
    history = trainer.run()
    best = best_epoch(history)
    v = trainer.validation
    if v.get("loader") == "none":
        print(f"validation: every sample by the reference's code ({v['exact'].get('reason')})")
    elif v:
        print(f"validation: {v['loader']} loader, {v['precision']}, "
              f"{'compiled' if v['compile'] else 'eager'} ({v['compile_reason']}), exact counts "
              f"{'on' if v['exact'].get('enabled') else 'off'}")
    print(f"best: epoch {best['epoch']}, validation top-1 {best['val_top1']:.3f} % ({best['val_correct_top1']}/"
          f"{best['val_samples']}), top-5 {best['val_top5']:.3f} %, loss {best['val_loss']:.4f}  ->  "
          f"{os.path.join(args.out, state.BEST)}")
    if args.json:
        config = {"train": os.path.abspath(args.train), "val": os.path.abspath(args.val),
                  "out": os.path.abspath(args.out),
                  "preset": spec.name, "resize": spec.resize, "crop": spec.crop, "precision": precision,
                  "device": str(device), "workers": args.workers, "classes": train.num_classes,
                  "loader": args.loader, "compile": args.compile, "exact": args.exact,
                  "validation": trainer.validation}
        write_json({"recipe": recipe.to_dict(), "best": best, "history": history, "config": config,
                    "environment": environment(device)}, args.json)
    return 0
