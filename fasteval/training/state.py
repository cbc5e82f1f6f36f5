"""Checkpoints, resume and the run folder's consistency under SIGINT/SIGTERM.

``best.pt`` and ``last.pt`` are dicts whose ``model_state_dict`` ``fasteval eval --weights`` loads
unchanged (fasteval/model/models.py read_state_dict); beside it: the epoch, the architecture, the class
names, the recipe, the validation preprocessing (which ``--resume`` keeps) and the history so far, and
in last.pt the optimizer, the scheduler and the RNG states. Every file is written to a temporary file
and renamed over the old one; the files of one epoch are written with SIGINT/SIGTERM held back, so an
interrupted run leaves the folder as its last finished epoch left it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from collections.abc import Iterator

import torch

from fasteval.data.preprocess import PreprocessSpec
from fasteval.errors import FastevalError
from fasteval.files import atomic_write

BEST, LAST, HISTORY, CURVES, PREDICTIONS = "best.pt", "last.pt", "history.json", "curves.png", "best_predictions.csv"
CLASSES = "best_classes.json"  # the best epoch's class report: per-class recall, confusion matrix, calibration
OUTPUTS = (BEST, LAST, HISTORY, CURVES, PREDICTIONS, CLASSES)
RESUME_ONLY = ("optimizer_state_dict", "scheduler_state_dict", "rng")  # in last.pt, not in best.pt
PREPROCESS = "preprocess"  # PreprocessSpec.record(); older checkpoints: preset, resize, crop, or nothing


def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA where present, Python's ``random``)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint(model, optimizer, scheduler, epoch: int, recipe: dict, classes: list[str], history: list[dict],
               spec: PreprocessSpec) -> dict:
    """Everything a resumed run needs, with the model's weights where ``fasteval eval`` looks."""
    return {"model_state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer_state_dict": optimizer.state_dict(), "scheduler_state_dict": scheduler.state_dict(),
            "epoch": epoch, "rng": rng_state(), "arch": recipe["arch"], "classes": list(classes),
            "recipe": recipe, PREPROCESS: spec.record(),
            "history": history}


def save(obj: dict, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed, then renamed over it."""
    with atomic_write(path, binary=True) as f:
        torch.save(obj, f)


def load(path: str) -> dict:
    """A run's checkpoint, read weights-only (a file can never run code)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FastevalError(f"cannot read {path} to resume: {exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    needed = ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "epoch", "rng", "arch",
              "classes", "recipe", "history")
    missing = [k for k in needed if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise FastevalError(f"{path} is not a fasteval train checkpoint (no {', '.join(missing)})")
    return obj


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are noted, not acted on; on leaving, the first one noted is handed to
    the handler that was in place (Ctrl-C's KeyboardInterrupt, ``sigterm_raises``' Terminated), so a
    group of writes is never cut in the middle. (Masking the signals would not do: the kernel hands a
    process's signal to any thread that does not mask it, and torch runs threads of its own.)
    Outside the main thread: no effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])
