"""fasteval's ``eval --arch timm:NAME`` beside timm's own validate.py, on one ImageFolder, in fp32.

    python benchmarks/timm_validate.py DATA --model NAME [--weights FILE] [--validate-py PATH/validate.py]

timm's side runs twice: its validate.py as a subprocess where ``--validate-py`` gives it (a checkout of
pytorch-image-models; ``--checkpoint FILE --num-classes N --no-prefetcher``, on the CPU: fp32), and
validate.py's own loader in this process (``create_model`` + ``load_checkpoint`` + ``resolve_data_config(...,
use_test_size=True)`` + ``create_dataset`` + ``create_loader(use_prefetcher=False)``, eager fp32), which also
gives its prediction for every file. fasteval's side is the command as a user runs it, with no preprocessing
option: the model's pretrained configuration decides. timm's folder reader takes fewer file kinds than
ImageFolder (.png, .jpg, .jpeg): where DATA holds others, every run reads a linked copy of the files both
take. Printed: samples, top-1 and top-5 counts of each, the files whose top-1 prediction differs, and the
seconds of each (a subprocess's with its start-up: not a speed comparison). Without ``--weights``, a seeded
model of NAME with a head centred on DATA's features (a random head predicts one class for every image) is
written first. Needs timm (``pip install 'fasteval[timm]'``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def common_files(data: str, work: str) -> tuple[str, int]:
    """DATA, or where timm's folder reader skips some of its files, a tree of links to the files it reads
    (which ImageFolder reads too); and how many it skips."""
    from timm.data import create_dataset
    from torchvision.datasets import ImageFolder

    read = create_dataset(root=data, name="", split="validation").filenames(basename=False, absolute=False)
    skipped = len(ImageFolder(data).samples) - len(read)
    if not skipped:
        return data, 0
    root = os.path.join(work, "common")
    for relative in read:
        os.makedirs(os.path.dirname(os.path.join(root, relative)), exist_ok=True)
        os.symlink(os.path.abspath(os.path.join(data, relative)), os.path.join(root, relative))
    return root, skipped


def centred_weights(name: str, data: str, num_classes: int, path: str) -> None:
    """A seeded ``name`` whose head is centred on ``data``'s features (timm's eval transform), saved as
    timm's train.py saves a checkpoint (``state_dict`` beside the run's state)."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes).eval()
    transform = create_transform(**resolve_data_config({}, model=model, use_test_size=True))
    total, count = 0, 0
    with torch.no_grad():
        for images, _ in DataLoader(ImageFolder(data, transform=transform), batch_size=32):
            total = total + model.forward_head(model.forward_features(images), pre_logits=True).sum(0)
            count += len(images)
        head = model.get_classifier()
        head.bias.copy_(-head.weight @ (total / count))
    torch.save({"epoch": 0, "arch": name, "state_dict": model.state_dict()}, path)


def timm_loader_run(name: str, data: str, weights: str, num_classes: int, batch_size: int) -> dict:
    """validate.py's model, data config and loader (no prefetcher, fp32, eager), with per-file predictions."""
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.models import create_model, load_checkpoint

    start = time.perf_counter()
    model = create_model(name, pretrained=False, num_classes=num_classes)
    load_checkpoint(model, weights, use_ema=False)
    config = resolve_data_config({}, model=model, use_test_size=True)
    dataset = create_dataset(root=data, name="", split="validation")
    loader = create_loader(dataset, input_size=config["input_size"], batch_size=batch_size, use_prefetcher=False,
                           interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
                           num_workers=0, crop_pct=config["crop_pct"], crop_mode=config["crop_mode"])
    model.eval()
    top1 = top5 = 0
    predictions = []
    with torch.inference_mode():
        for images, labels in loader:
            logits = model(images)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += int((top[:, 0] == labels).sum())
            top5 += int((top == labels[:, None]).any(dim=1).sum())
            predictions += top[:, 0].tolist()
    files = dataset.filenames(basename=False, absolute=False)
    return {"samples": len(predictions), "top1": top1, "top5": top5, "predictions": dict(zip(files, predictions)),
            "seconds": time.perf_counter() - start, "config": config}


def validate_py_run(script: str, name: str, data: str, weights: str, num_classes: int, batch_size: int,
                    samples: int, work: str) -> dict:
    """timm's validate.py itself; its top-1/top-5 percentages turned back into counts."""
    results = os.path.join(work, "validate_py.json")
    command = [sys.executable, script, data, "--model", name, "--checkpoint", weights, "--num-classes",
               str(num_classes), "--no-prefetcher", "--workers", "0", "--batch-size", str(batch_size),
               "--device", "cpu", "--results-file", results, "--results-format", "json"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    with open(results) as f:
        found = json.load(f)
    found = found[0] if isinstance(found, list) else found
    return {"samples": samples, "top1": round(found["top1"] * samples / 100),
            "top5": round(found["top5"] * samples / 100), "seconds": seconds}


def fasteval_run(name: str, data: str, weights: str, work: str) -> dict:
    """``fasteval eval DATA --arch timm:NAME --weights FILE``, its counts and per-file predictions."""
    report, predictions = os.path.join(work, "fasteval.json"), os.path.join(work, "predictions.csv")
    command = [sys.executable, "-m", "fasteval", "eval", data, "--arch", f"timm:{name}", "--weights", weights,
               "--no-progress", "--json", report, "--predictions", predictions]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    with open(report) as f:
        result = json.load(f)
    with open(predictions, newline="") as f:
        per_file = {row["path"]: int(row["prediction"]) for row in csv.DictReader(f)}
    return {"samples": result["samples"], "top1": result["correct_top1"], "top5": result["correct_top5"],
            "predictions": per_file, "seconds": seconds, "preprocessing": result["config"].get("preprocessing"),
            "precision": result.get("precision"), "by_reference": (result.get("exact") or {}).get("all_by_reference"),
            "rechecked": (result.get("exact") or {}).get("rechecked")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--model", required=True, help="a timm model name, with or without its pretrained tag")
    parser.add_argument("--weights", help="a checkpoint file (default: a seeded model centred on DATA)")
    parser.add_argument("--validate-py", help="timm's validate.py, run as a subprocess")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    classes = sorted(e.name for e in os.scandir(args.data) if e.is_dir())
    with tempfile.TemporaryDirectory() as work:
        data, skipped = common_files(args.data, work)
        weights = args.weights or os.path.join(work, "centred.pth.tar")
        if not args.weights:
            centred_weights(args.model, data, len(classes), weights)
        timm_run = timm_loader_run(args.model, data, weights, len(classes), args.batch_size)
        runs = {"timm (validate.py's loader, fp32)": timm_run}
        if args.validate_py:
            runs["timm validate.py (subprocess)"] = validate_py_run(args.validate_py, args.model, data, weights,
                                                                    len(classes), args.batch_size,
                                                                    timm_run["samples"], work)
        ours = runs["fasteval eval --arch timm:NAME"] = fasteval_run(args.model, data, weights, work)
    config = timm_run["config"]
    print(f"{args.model} on {args.data}: {timm_run['samples']} images, {len(classes)} classes"
          + (f" ({skipped} other files left out: timm's folder reader does not read their kind)" if skipped else ""))
    print(f"timm's data config: input {config['input_size']}, crop_pct {config['crop_pct']}, crop_mode "
          f"{config['crop_mode']}, {config['interpolation']}, mean {config['mean']}, std {config['std']}")
    route = ("every sample by the reference's code (its plan's choice for this size)" if ours["by_reference"] else
             f"fast path in {ours['precision']}, {ours['rechecked']} sample(s) rechecked by the reference's code")
    print(f"fasteval's preprocessing: {ours['preprocessing']}; {route}")
    print(f"{'run':<36} {'samples':>7} {'top-1':>6} {'top-5':>6} {'seconds':>8}")
    for label, run in runs.items():
        print(f"{label:<36} {run['samples']:>7} {run['top1']:>6} {run['top5']:>6} {run['seconds']:>8.2f}")
    differing = sorted(path for path, predicted in timm_run["predictions"].items()
                       if ours["predictions"].get(path) != predicted)
    missing = set(timm_run["predictions"]) ^ set(ours["predictions"])
    print(f"per-file top-1 predictions: {len(timm_run['predictions']) - len(differing)} of "
          f"{len(timm_run['predictions'])} equal" + (f"; differ: {', '.join(differing[:10])}" if differing else "")
          + (f"; listed by one side only: {len(missing)}" if missing else ""))
    same = not differing and not missing and all((r["samples"], r["top1"], r["top5"]) ==
                                                 (ours["samples"], ours["top1"], ours["top5"]) for r in runs.values())
    print("same counts, file by file" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
