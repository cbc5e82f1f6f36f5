"""``fasteval train``'s options: argparse only, so that building the parser stays light; the recipe's
defaults are fasteval/training/recipe.py's (the validation evaluator's options are ``eval``'s)."""

from __future__ import annotations

import argparse

from fasteval.options import non_empty_path, non_negative_int, positive_int

DEFAULT_PRESET = "seed"  # the validation preset of a new run (a resumed run keeps its own)


def _float_above(minimum: float, inclusive: bool):
    """An argparse type: a finite float > ``minimum`` (>= with ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or value != value or value in (float("inf"), float("-inf")) or value < minimum or (
                value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"expected a number {'>=' if inclusive else '>'} {minimum:g}, got {text!r}")
        return value

    return parse


def add_train_options(p: argparse.ArgumentParser) -> None:
    """``train``: the classic fine-tuning recipe's values as defaults (fasteval/training/recipe.py)."""
    p.add_argument("train", metavar="TRAIN_DIR", type=non_empty_path, help="training ImageFolder root")
    p.add_argument("val", metavar="VAL_DIR", type=non_empty_path,
                   help="validation ImageFolder root (the same class folders)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", type=non_empty_path,
                   help="run folder: best.pt, last.pt, history.json, curves.png, best_predictions.csv")
    p.add_argument("--arch", default="resnet18", help="torchvision classification model name (default resnet18)")
    p.add_argument("--weights", type=non_empty_path,
                   help="starting checkpoint, or DEFAULT for torchvision's pretrained weights; the head becomes "
                        "Sequential(Linear(features, classes)); omitted: random init")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs in all (default 10)")
    p.add_argument("--lr", type=_float_above(0, False), default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=_float_above(0, True), default=1e-2, help="AdamW weight decay (default 0.01)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="training batch size (default 32)")
    p.add_argument("--val-batch-size", type=positive_int, default=16, help="validation batch size (default 16)")
    p.add_argument("--step-size", type=positive_int, default=4, help="StepLR step size in epochs (default 4)")
    p.add_argument("--gamma", type=_float_above(0, False), default=0.6, help="StepLR factor (default 0.6)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="fixes initialisation, shuffling and augmentation (default 0)")
    p.add_argument("--preset", help=f"validation preprocessing: {DEFAULT_PRESET} (default: Resize(224) only) or "
                                    "imagenet; the training crop follows its input size; --resume keeps the run's")
    p.add_argument("--resize", type=positive_int, help="override the preset's shorter-side resize")
    p.add_argument("--crop", type=positive_int, help="override the preset's center crop")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its last.pt (to --epochs)")
    p.add_argument("--overwrite", action="store_true", help="replace the run files of a non-empty RUN_DIR")
    p.add_argument("--json", metavar="PATH", type=non_empty_path,
                   help="write the history, the best epoch, the configuration and the environment")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
