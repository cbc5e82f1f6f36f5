"""The reference evaluator against an independent, hand-written loop."""

from __future__ import annotations

import math
import multiprocessing
import os

import pytest
import torch
from PIL import Image

from fasteval.errors import FastevalError
from fasteval.evaluation.reference import evaluate_reference, reference_logits
from fasteval.data.samples import discover


def _hand_written(root: str, model, spec, batch_size: int):
    """Independent truth: own file listing, own batching, metrics in plain Python with float64."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items = []
    for label, name in enumerate(classes):
        for fname in sorted(os.listdir(os.path.join(root, name))):
            items.append((os.path.join(root, name, fname), label))
    transform = spec.torchvision_transform()
    top1 = top5 = 0
    loss_sum = 0.0
    preds = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in chunk])
        with torch.no_grad():
            logits = model(x).tolist()
        for row, (_, label) in zip(logits, chunk):
            best = 0
            for j, v in enumerate(row):
                if v > row[best]:
                    best = j
            ranked = sorted(range(len(row)), key=lambda j: (-row[j], j))
            top1 += best == label
            top5 += label in ranked[:5]
            m = max(row)
            loss_sum += m + math.log(sum(math.exp(v - m) for v in row)) - row[label]
            preds.append(best)
    return len(items), top1, top5, loss_sum, preds


@pytest.mark.parametrize("batch_size", [4, 7, 64])
def test_matches_hand_written_loop(small_data, small_spec, model_3cls, batch_size):
    n, top1, top5, loss_sum, preds = _hand_written(small_data, model_3cls, small_spec, batch_size)
    r = evaluate_reference(discover(small_data), model_3cls, small_spec, batch_size=batch_size, workers=0,
                           progress=False)
    assert (r.samples, r.correct_top1, r.correct_top5) == (n, top1, top5)
    assert r.predictions.tolist() == preds
    assert r.loss_sum == pytest.approx(loss_sum, rel=1e-6)
    assert r.loss == pytest.approx(loss_sum / n, rel=1e-6)
    assert float(r.losses.double().sum()) == pytest.approx(loss_sum, rel=1e-6)


def test_per_sample_mean_differs_from_mean_of_batch_means(small_data, small_spec, model_3cls):
    # 21 samples in batches of 4: the last batch holds 1 sample but weighs as much as a full one.
    r = evaluate_reference(discover(small_data), model_3cls, small_spec, batch_size=4, workers=0, progress=False)
    assert len(r.batch_losses) == 6
    assert r.to_dict()["loss_batch_mean_differs"]
    assert abs(r.loss - r.loss_batch_mean) > 1e-4
    sizes = [4] * 5 + [1]
    weighted = sum(b * s for b, s in zip(r.batch_losses, sizes)) / 21
    assert weighted == pytest.approx(r.loss, rel=1e-5)


def test_equal_batches_give_equal_means(small_data, small_spec, model_3cls):
    r = evaluate_reference(discover(small_data), model_3cls, small_spec, batch_size=7, workers=0, progress=False)
    assert r.loss_batch_mean == pytest.approx(r.loss, rel=1e-6)
    assert not r.to_dict()["loss_batch_mean_differs"]


def test_workers_do_not_change_results(small_data, small_spec, model_3cls):
    a = evaluate_reference(discover(small_data), model_3cls, small_spec, batch_size=5, workers=0, progress=False)
    b = evaluate_reference(discover(small_data), model_3cls, small_spec, batch_size=5, workers=2, progress=False)
    assert (a.correct_top1, a.correct_top5, a.loss_sum) == (b.correct_top1, b.correct_top5, b.loss_sum)


def _tree_with(tmp_path, bad: bool):
    for cls in ("a", "b", "c"):
        os.makedirs(tmp_path / cls)
        for i in range(2):
            Image.new("RGB", (50, 40), (1, 2, 3)).save(tmp_path / cls / f"ok{i}.jpg")
    if bad:
        (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return discover(tmp_path)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_named(tmp_path, small_spec, model_3cls, workers):
    samples, before = _tree_with(tmp_path, bad=True), set(multiprocessing.active_children())
    with pytest.raises(FastevalError, match=r"cannot decode image .*broken\.jpg") as info:
        evaluate_reference(samples, model_3cls, small_spec, batch_size=2, workers=workers, progress=False)
    # The error, still held here, keeps no DataLoader iterator alive: its workers have ended already (one
    # kept would cost 5 s a worker whenever it is collected).
    assert info.value.__traceback__ is not None and set(multiprocessing.active_children()) <= before
    # The recheck's loader (workers from a batch up on the CPU) too.
    with pytest.raises(FastevalError, match=r"broken\.jpg") as info:
        reference_logits(samples, list(range(len(samples))), model_3cls, small_spec, batch_size=2, workers=workers,
                         device=torch.device("cpu"))
    assert info.value.__traceback__ is not None and set(multiprocessing.active_children()) <= before


class _Fails(torch.nn.Module):
    def forward(self, x):
        seen = x.shape
        raise RuntimeError(f"the model fails on {seen}")


def test_a_model_error_ends_the_workers_and_keeps_the_models_frame(tmp_path, small_spec):
    """Only torch.utils.data's frames lose their locals: the model's stay for a post-mortem (pdb, %debug)."""
    samples, before = _tree_with(tmp_path, bad=False), set(multiprocessing.active_children())
    for run in (lambda: evaluate_reference(samples, _Fails(), small_spec, batch_size=2, workers=2, progress=False),
                lambda: reference_logits(samples, list(range(6)), _Fails(), small_spec, batch_size=2, workers=2,
                                         device=torch.device("cpu"))):
        with pytest.raises(RuntimeError, match="the model fails") as info:
            run()
        assert set(multiprocessing.active_children()) <= before
        frames = [entry.frame for entry in info.traceback if entry.frame.code.name == "forward"]
        assert frames and "seen" in frames[-1].f_locals
