"""The run's history: one record per finished epoch, and the summary of the best epoch.

Accuracies are percentages, as ``fasteval eval`` reports them; losses are per-sample means. The
best epoch is the one with the most validation top-1 hits (exact counts), ties to the earlier.
"""

from __future__ import annotations

from fasteval.evaluation.metrics import EvalResult, batch_mean_differs

# The keys, in order; the counts and the batch-mean loss follow them.
KEYS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "seconds")


def epoch_record(epoch: int, train: EvalResult, val: EvalResult, lr: float, seconds: float) -> dict:
    """One epoch's figures: ``train`` holds the training pass's counts and losses (over the
    training-mode logits of each batch), ``val`` the validation run's."""
    return {
        "epoch": epoch,
        "train_loss": train.loss,
        "train_top1": train.top1,
        "val_loss": val.loss,
        "val_top1": val.top1,
        "val_top5": val.top5,
        "lr": lr,
        "seconds": seconds,
        "train_samples": train.samples,
        "train_correct_top1": train.correct_top1,
        "train_loss_batch_mean": train.loss_batch_mean,
        "train_loss_batch_mean_differs": batch_mean_differs(train),
        "val_samples": val.samples,
        "val_correct_top1": val.correct_top1,
        "val_correct_top5": val.correct_top5,
        "val_loss_batch_mean": val.loss_batch_mean,
        "val_rechecked": int(val.rechecked.sum()) if val.rechecked is not None else 0,
    }


def best_epoch(history: list[dict]) -> dict | None:
    """The record with the most validation top-1 hits; the earliest among equals."""
    best = None
    for record in history:
        if best is None or record["val_correct_top1"] > best["val_correct_top1"]:
            best = record
    return best


def write_history(history: list[dict], path: str) -> None:
    """``history.json``: the list of epoch records, written atomically, NaN as null (strict JSON)."""
    from fasteval.output.report import write_json

    write_json(history, path)


def format_epoch(record: dict, epochs: int) -> str:
    """One line per epoch on stdout."""
    flag = " (batch-mean {:.4f}, differs: last batch short)".format(record["train_loss_batch_mean"]) \
        if record["train_loss_batch_mean_differs"] else ""
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}{flag} "
            f"top-1 {record['train_top1']:.2f} %  |  val loss {record['val_loss']:.4f} top-1 "
            f"{record['val_top1']:.2f} % ({record['val_correct_top1']}/{record['val_samples']}) top-5 "
            f"{record['val_top5']:.2f} %  |  lr {record['lr']:.3g}  {record['seconds']:.1f} s")
