"""The built-in demo: a cached synthetic dataset and a ResNet-18 whose predictions mean something.

No pretrained weights can be assumed (machines may be offline), and a random classifier
would make the demo's accuracy and the reference-vs-fast agreement meaningless. So the
demo model is a seeded random-init ResNet-18 backbone whose linear head is fitted, by
multinomial logistic regression, on the backbone's features of a separate training split
of the same synthetic classes (different seed). The evaluation split is never seen.
Everything is deterministic and cached under ``$FASTEVAL_CACHE`` (default ``~/.cache/fasteval``).

The cache entry is built by one process at a time (a file lock), in a temporary folder that is
renamed into place once complete: readers only ever see a complete entry, and a published entry
is never deleted. Temporary folders of killed builders are removed by the next build.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fasteval.cache_dir import cache_base
from fasteval.errors import FastevalError
from fasteval.model.models import build_model
from fasteval.files import staged_folder
from fasteval.data.preprocess import PRESETS
from fasteval.evaluation.reference import reference_dataset
from fasteval.data.samples import discover
from fasteval.data.synth import synth_dataset

DEMO_VERSION = "v1"
DEMO_ARCH = "resnet18"
DEMO_CLASSES = 10
DEMO_PER_CLASS = 24
TRAIN_PER_CLASS = 12
EVAL_SEED = 0
TRAIN_SEED = 1000


def cache_dir() -> str:
    """The demo's cache entry: ``val/`` (the dataset) and the weights file."""
    return os.path.join(cache_base(), f"demo-{DEMO_VERSION}")


def _entry_files(entry: str) -> tuple[str, str]:
    return os.path.join(entry, "val"), os.path.join(entry, f"{DEMO_ARCH}-demo.pt")


def _features(model: nn.Module, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    samples = discover(root)
    dataset = reference_dataset(samples, PRESETS["imagenet"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=0)
    fc, model.fc = model.fc, nn.Identity()
    feats, labels = [], []
    with torch.no_grad():
        for images, target in loader:
            feats.append(model(images))
            labels.append(target)
    model.fc = fc
    return torch.cat(feats), torch.cat(labels)


def fit_head(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-3) -> None:
    """Fit ``model.fc`` by L2-regularised multinomial logistic regression (full-batch L-BFGS)."""
    torch.manual_seed(0)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    head = nn.Linear(x.shape[1], int(labels.max()) + 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), labels) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        # Fold the standardisation into the head: W (f - m) / s + b = (W / s) f + (b - W m / s).
        weight = head.weight / std
        model.fc.weight.copy_(weight)
        model.fc.bias.copy_(head.bias - weight @ mean)


def _build(work: str) -> None:
    """The demo's dataset and fitted model, written into ``work``."""
    val, weights = _entry_files(work)
    synth_dataset(val, DEMO_CLASSES, DEMO_PER_CLASS, seed=EVAL_SEED)
    train = synth_dataset(os.path.join(work, "train"), DEMO_CLASSES, TRAIN_PER_CLASS, seed=TRAIN_SEED)
    torch.manual_seed(0)
    model = build_model(DEMO_ARCH, num_classes=DEMO_CLASSES)
    fit_head(model, *_features(model, train))
    shutil.rmtree(train)
    torch.save(model.state_dict(), weights)


def _usable_base(base: str) -> str:
    """The cache folder, created if missing; one line naming it when that is impossible."""
    if os.path.exists(base) and not os.path.isdir(base):
        raise FastevalError(f"the demo cache {base} (FASTEVAL_CACHE) is not a folder")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError as exc:
        raise FastevalError(f"cannot create the demo cache {base} (FASTEVAL_CACHE): {exc.strerror or exc}") from None
    return base


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released when the process dies, however it dies)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise FastevalError(f"cannot write in the demo cache {os.path.dirname(path)} (FASTEVAL_CACHE): "
                            f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_demo(log=None) -> tuple[str, str]:
    """(dataset folder, weights file) of the demo, building them on first use."""
    entry = cache_dir()
    data_dir, weights = _entry_files(entry)
    if os.path.isdir(data_dir) and os.path.isfile(weights):
        return data_dir, weights
    base = _usable_base(cache_base())
    with _locked(os.path.join(base, f".demo-{DEMO_VERSION}.lock")):
        if os.path.isdir(data_dir) and os.path.isfile(weights):  # built while this process waited
            return data_dir, weights
        # sys.stderr read now, not when the module was imported (a test's captured stream may be closed by then)
        print(f"fasteval: building the demo dataset and model in {entry} (once)", file=log or sys.stderr)
        try:
            with staged_folder(entry) as work:
                _build(work)
        except OSError as exc:
            raise FastevalError(f"cannot build the demo in {base} (FASTEVAL_CACHE): {exc.strerror or exc}") from None
    return data_dir, weights
