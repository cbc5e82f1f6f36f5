"""``fasteval train`` on tiny synthetic data: exact training metrics, validation equal to the reference's
on best.pt, the true best epoch, resume equal to an uninterrupted run, refusals before any work, and a
SIGTERM that leaves a consistent run folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from fasteval.cli import main
from fasteval.data.synth import synth_dataset

# Small inputs, batch 4 (18 training samples: the last batch is short), eager, fp32, PIL decode; the
# learning rate steps every second epoch, so that a resumed run needs the scheduler's own state.
COMMON = ["--resize", "40", "--crop", "32", "--batch-size", "4", "--val-batch-size", "4", "--workers", "0",
          "--compile", "off", "--precision", "fp32", "--loader", "torchvision", "--no-progress", "--step-size", "2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    train = synth_dataset(root / "train", classes=3, per_class=6, size="64x64", seed=11)
    val = synth_dataset(root / "val", classes=3, per_class=5, size="64x64", seed=12)
    return str(train), str(val), root


def _train(folders, out, *extra) -> int:
    train, val, _ = folders
    return main(["train", train, val, "--out", str(out), *COMMON, *extra])


def _history(out) -> list[dict]:
    with open(os.path.join(out, "history.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def run_dir(folders):
    """Three epochs, uninterrupted (shared by the tests that read a finished run)."""
    out = folders[2] / "run"
    assert _train(folders, out, "--epochs", "3", "--json", str(folders[2] / "run.json")) == 0
    return str(out)


def test_training_metrics_equal_per_sample_recomputation(folders):
    """The epoch's loss, top-1 and mean of batch means equal plain torch ops on the training-mode logits of
    every batch, captured independently by a forward hook (bf16 autocast: the logits are bf16)."""
    from fasteval.data.preprocess import get_spec
    from fasteval.data.samples import discover
    from fasteval.evaluation.metrics import batch_mean_differs
    from fasteval.training.loop import RunOptions, Trainer
    from fasteval.training.recipe import Recipe

    train, val, root = folders
    trainer = Trainer(discover(train), discover(val), get_spec("imagenet", 40, 32), Recipe(batch_size=4),
                      RunOptions(out=str(root), device=torch.device("cpu"), precision="bf16", workers=0,
                                 progress=False))
    logits, labels = [], []
    trainer.model.register_forward_hook(lambda module, inputs, output: logits.append(output.detach().clone()))
    batches = trainer.batches

    def recorded(epoch):
        for images, y in batches(epoch):
            labels.append(y.clone())
            yield images, y

    trainer.batches = recorded
    result = trainer.train_epoch(1)
    assert logits[0].dtype == torch.bfloat16
    per_sample = F.cross_entropy(torch.cat(logits).float(), torch.cat(labels), reduction="none").double()
    assert [len(y) for y in labels] == [4, 4, 4, 4, 2]
    assert result.samples == 18
    assert result.correct_top1 == int((torch.cat(logits).float().argmax(1) == torch.cat(labels)).sum())
    assert result.loss == pytest.approx(float(per_sample.mean()), rel=1e-6)
    batch_means = [float(F.cross_entropy(x.float(), y)) for x, y in zip(logits, labels)]
    assert result.loss_batch_mean == pytest.approx(sum(batch_means) / len(batch_means), rel=1e-6)
    assert batch_mean_differs(result)  # the short last batch biases the tutorial's figure


def test_a_bad_file_mid_epoch_ends_the_workers_with_the_error(tmp_path):
    """Library use (the command checks every file first): an error raised in the epoch's DataLoader leaves no
    worker alive while the error is held (a notebook keeps the last one)."""
    import multiprocessing

    from fasteval.data.preprocess import get_spec
    from fasteval.data.samples import discover
    from fasteval.errors import FastevalError
    from fasteval.training.loop import RunOptions, Trainer
    from fasteval.training.recipe import Recipe

    train = synth_dataset(tmp_path / "train", classes=3, per_class=5, size="64x64", seed=13)  # 16 with the bad one
    val = synth_dataset(tmp_path / "val", classes=3, per_class=2, size="64x64", seed=14)
    first_class = sorted(os.listdir(train))[0]
    with open(os.path.join(train, first_class, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated")
    trainer = Trainer(discover(train), discover(val), get_spec("imagenet", 40, 32), Recipe(batch_size=4),
                      RunOptions(out=str(tmp_path / "runs"), device=torch.device("cpu"), precision="fp32", workers=2,
                                 progress=False))
    before = set(multiprocessing.active_children())
    with pytest.raises(FastevalError, match="broken.jpg") as info:
        trainer.train_epoch(1)
    assert info.value.__traceback__ is not None and set(multiprocessing.active_children()) <= before


def test_run_folder_holds_the_history_and_the_true_best(run_dir, folders):
    from fasteval.training.history import KEYS

    history = _history(run_dir)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for record in history:
        assert list(record)[:len(KEYS)] == list(KEYS)
        assert record["val_top1"] == pytest.approx(100 * record["val_correct_top1"] / 15)
        assert record["train_top1"] == pytest.approx(100 * record["train_correct_top1"] / 18)
    assert [r["lr"] for r in history] == pytest.approx([1e-3, 1e-3, 6e-4])  # StepLR(2, gamma 0.6)
    top = max(r["val_correct_top1"] for r in history)
    expected = next(r["epoch"] for r in history if r["val_correct_top1"] == top)
    best = torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)
    last = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)
    assert best["epoch"] == expected and last["epoch"] == 3
    assert [r["epoch"] for r in last["history"]] == [1, 2, 3] and "optimizer_state_dict" not in best
    try:
        import matplotlib  # noqa: F401  (an optional extra: without it, no curves and one warning)
        assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 1000
    except ImportError:
        assert not os.path.exists(os.path.join(run_dir, "curves.png"))
    assert not [n for n in os.listdir(run_dir) if n.startswith(".")]  # no temporary file left
    with open(folders[2] / "run.json") as f:
        summary = json.load(f)
    assert summary["best"]["epoch"] == expected and len(summary["history"]) == 3
    assert summary["config"]["validation"]["loader"].startswith("pil-cpu")  # a small validation set


def test_best_epoch_ties_go_to_the_earlier():
    from fasteval.training.history import best_epoch

    history = [{"epoch": e, "val_correct_top1": c} for e, c in ((1, 5), (2, 7), (3, 7), (4, 3))]
    assert best_epoch(history)["epoch"] == 2
    assert best_epoch([]) is None


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_validation_equals_eval_reference_on_the_checkpoint(run_dir, folders, tmp_path, name):
    """``fasteval eval --reference`` loads the checkpoint unchanged (its Sequential head included) and
    finds the same counts as the epoch's validation; the loss to float rounding."""
    _, val, _ = folders
    ckpt = torch.load(os.path.join(run_dir, name), weights_only=True)
    record = next(r for r in _history(run_dir) if r["epoch"] == ckpt["epoch"])
    out, predictions = tmp_path / "ref.json", tmp_path / "ref.csv"
    assert main(["eval", val, "--weights", os.path.join(run_dir, name), "--reference", "--resize", "40", "--crop",
                 "32", "--batch-size", "4", "--workers", "0", "--no-progress", "--json", str(out),
                 "--predictions", str(predictions)]) == 0
    ref = json.loads(out.read_text())
    assert (ref["correct_top1"], ref["correct_top5"]) == (record["val_correct_top1"], record["val_correct_top5"])
    assert ref["loss"] == pytest.approx(record["val_loss"], rel=1e-4)
    if name == "best.pt":  # the best epoch's per-sample outputs, kept for the class report
        import csv

        def column(path, key):
            with open(path, newline="") as f:
                return [row[key] for row in csv.DictReader(f)]

        kept = os.path.join(run_dir, "best_predictions.csv")
        assert column(kept, "path") == column(predictions, "path")
        assert column(kept, "prediction") == column(predictions, "prediction")
        # The best epoch's class report: the reference's on the same checkpoint.
        classes = json.loads((open(os.path.join(run_dir, "best_classes.json")).read()))
        assert classes["epoch"] == ckpt["epoch"]
        for key in ("confusion_matrix", "per_class", "balanced_accuracy"):
            assert classes[key] == ref[key], key


def test_resume_gives_the_uninterrupted_history(run_dir, folders, capsys):
    """One epoch, then ``--resume`` to three: the same history as three epochs straight (bar the times):
    model, optimizer, scheduler (its step count decides the third epoch's rate) and the seeded batches
    all continue. Recipe flags given to a resume are ignored, and named in one warning line."""
    out = folders[2] / "resumed"
    assert _train(folders, out, "--epochs", "1") == 0
    assert len(_history(out)) == 1
    capsys.readouterr()
    assert _train(folders, out, "--epochs", "3", "--resume", "--lr", "5", "--seed", "7") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "ignored" in line]
    assert warnings == ["fasteval: warning: --resume continues with the run's own recipe; ignored: --lr 5.0, --seed 7"]

    def timeless(history):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    assert timeless(_history(out)) == timeless(_history(run_dir))


def test_resume_keeps_the_runs_preprocessing(folders, tmp_path, capsys):
    """A run trained with --preset imagenet --resize 40 --crop 32 and resumed without those flags validates
    its next epochs as it validated the first (last.pt records them); a resume that names another
    preprocessing is refused in one line naming the flag, and the run folder is left as it was."""
    out, report = tmp_path / "run", tmp_path / "r.json"
    no_sizes = COMMON[4:]  # COMMON without its --resize 40 --crop 32
    assert _train(folders, out, "--epochs", "1", "--preset", "imagenet") == 0
    train, val, _ = folders
    assert main(["train", train, val, "--out", str(out), *no_sizes, "--epochs", "2", "--resume",
                 "--json", str(report)]) == 0
    config = json.loads(report.read_text())["config"]
    assert (config["preset"], config["resize"], config["crop"]) == ("imagenet", 40, 32)
    assert torch.load(out / "last.pt", weights_only=True)["preprocess"] == {
        "preset": "imagenet", "resize": 40, "crop": 32, "interpolation": "bilinear", "antialias": True,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # the whole transform
    capsys.readouterr()
    files = {name: (out / name).read_bytes() for name in os.listdir(out)}
    for extra, named in ((["--crop", "36"], "--crop 36"), (["--preset", "seed"], "--preset seed"),
                         (["--preset", "imagenet", "--resize", "48", "--crop", "32"], "--resize 48")):
        assert main(["train", train, val, "--out", str(out), *no_sizes, "--epochs", "3", "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert err == (f"fasteval: error: --resume: {out}/last.pt was trained with --preset imagenet --resize 40 "
                       f"--crop 32, not {named}; a resumed run keeps its preprocessing: drop it\n")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == files


def test_outputs_inside_the_datasets_are_refused_before_any_work(folders, tmp_path, capsys):
    """RUN_DIR or --json inside TRAIN_DIR or VAL_DIR (a link or '..' does not hide it): one line naming the
    option, exit 2, neither dataset touched (curves.png in a class folder would be a sample)."""
    train, val = tmp_path / "train", tmp_path / "val"
    shutil.copytree(folders[0], train)
    shutil.copytree(folders[1], val)
    (tmp_path / "link").symlink_to(val / "class_000")

    def tree():
        return sorted((d, sorted(files), os.stat(d).st_mtime_ns) for d, _, files in os.walk(tmp_path))

    before = tree()
    for option, path, inside in (("--out", val / "class_001", "VAL_DIR"), ("--out", tmp_path / "link" / "run", "VAL_DIR"),
                                 ("--json", tmp_path / "link" / ".." / "r.json", "VAL_DIR"),
                                 ("--json", train / "class_002" / "r.json", "TRAIN_DIR")):
        extra = [option, str(path)] + (["--out", str(tmp_path / "run")] if option == "--json" else [])
        assert main(["train", str(train), str(val), *COMMON, "--epochs", "1", *extra]) == 2
        err = capsys.readouterr().err
        folder = val if inside == "VAL_DIR" else train
        assert err.startswith(f"fasteval: error: {option} {path} is inside {inside} {folder}: ") and err.count("\n") == 1
        assert tree() == before


@pytest.mark.slow
def test_a_second_run_never_writes_a_run_folder_in_use(folders, tmp_path, capsys):
    """While one run trains into RUN_DIR, another (even with --overwrite) is refused in one line naming
    --out, and RUN_DIR stays the first run's alone; a killed run leaves no lock behind (the kernel drops
    it): --resume continues at once."""
    train, val, _ = folders
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "fasteval", "train", train, val, "--out", str(out), *COMMON,
                              "--epochs", "40"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "history.json").exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    try:
        assert first.poll() is None, "the first run ended early"
        assert _train(folders, out, "--epochs", "1", "--overwrite", "--seed", "5") == 2
        err = capsys.readouterr().err
        assert err == (f"fasteval: error: --out {out} is being written by another fasteval run (pid {first.pid}); "
                       f"wait for it to end, or choose another --out\n")
    finally:
        first.kill()
        first.wait()
    done = len(_history(out))
    assert torch.load(out / "last.pt", weights_only=True)["recipe"]["seed"] == 0  # the first run's, not seed 5
    assert _train(folders, out, "--epochs", str(done + 1), "--resume") == 0
    assert len(_history(out)) == done + 1 and not [n for n in os.listdir(out) if n.startswith(".")]


def test_live_weights_reach_both_evaluator_models(folders):
    """``FastEvaluator.load_weights`` maps the training model (Sequential head) onto the evaluator's channels-last
    fast model (Fp32Head around the Linear) and its reference model: parameters and BatchNorm buffers."""
    import copy

    from fasteval.data.preprocess import get_spec
    from fasteval.data.samples import discover
    from fasteval.evaluation.fast import FastEvaluator, FastOptions
    from fasteval.training.recipe import training_model

    _, val, _ = folders
    torch.manual_seed(0)
    first = training_model("resnet18", None, 3)
    evaluator = FastEvaluator(discover(val), copy.deepcopy(first).eval(), get_spec("imagenet", 40, 32),
                              torch.device("cpu"), FastOptions(loader="torchvision", precision="fp32", compile="off",
                                                               batch_size=4, workers=0))
    torch.manual_seed(1)
    second = training_model("resnet18", None, 3).train()
    second(torch.randn(8, 3, 32, 32))  # BatchNorm running statistics that differ from the first model's
    evaluator.load_weights(second)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = copy.deepcopy(second).eval()(x)
        assert torch.allclose(evaluator.model(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)
        assert torch.allclose(evaluator.reference_model(x), expected, atol=1e-6)
    assert second.training  # the training model's mode is left alone


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_wait_for_the_epoch_files(signum):
    """Within ``signals_held`` SIGTERM/SIGINT do not interrupt; each is delivered on leaving, to the handler
    in place (Terminated, KeyboardInterrupt)."""
    from fasteval.errors import Terminated
    from fasteval.procs import sigterm_raises
    from fasteval.training.state import signals_held

    done = []
    with pytest.raises(Terminated if signum == signal.SIGTERM else KeyboardInterrupt), sigterm_raises():
        with signals_held():
            os.kill(os.getpid(), signum)
            time.sleep(0.05)
            done.append("written")
        done.append("after")  # never reached: the signal arrives as the block ends
    assert done == ["written"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_starting_checkpoint_keeps_its_body_and_gets_the_recipe_head(tmp_path):
    """A checkpoint with another number of classes: its body is loaded, its head replaced by
    Sequential(Linear(512, n)); one with the dataset's classes keeps its head weights too."""
    import torchvision

    from fasteval.training.recipe import training_model

    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "five.pt"
    torch.save({"model_state_dict": source.state_dict()}, path)
    model = training_model("resnet18", str(path), 3)
    assert isinstance(model.fc, torch.nn.Sequential) and model.fc[0].out_features == 3
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    same = training_model("resnet18", str(path), 5)
    assert torch.equal(same.fc[0].weight, source.fc.weight)


def test_refusals_come_before_any_work(folders, tmp_path, capsys):
    train, val, root = folders
    other = synth_dataset(tmp_path / "other", classes=2, per_class=2, size="64x64", seed=1)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    cases = [
        (["--out", str(full)], "not empty"),
        (["--out", str(tmp_path / "new"), "--resume"], "no last.pt"),
        (["--out", str(tmp_path / "new"), "--precision", "fp16"], "fp16"),
        (["--out", str(tmp_path / "new"), "--weights", str(tmp_path / "missing.pt")], "not found"),
    ]
    for extra, words in cases:
        assert main(["train", train, val, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    # 18 samples in batches of 17: a last batch of one, which BatchNorm cannot train on at 32x32.
    assert main(["train", train, val, "--out", str(tmp_path / "new"), *COMMON, "--batch-size", "17"]) == 2
    err = capsys.readouterr().err
    assert "last training batch would hold 1 sample" in err and "Traceback" not in err
    assert main(["train", train, str(other), "--out", str(tmp_path / "new")]) == 2
    assert "different class folders" in capsys.readouterr().err
    assert (full / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()
    with pytest.raises(SystemExit):
        main(["train", train, val, "--out", str(tmp_path / "new"), "--lr", "nan"])


def test_input_size_and_memory_refusals_create_no_run_folder(folders, tmp_path, capsys, monkeypatch):
    """As eval refuses them, in one line, before RUN_DIR exists: a model that does not take the input
    size (ViT-B/16 at 32x32), a training step or a validation pass that does not fit the memory."""
    from fasteval import memory
    from fasteval.model.footprint import parameter_bytes
    from fasteval.training.recipe import training_model

    train, val, _ = folders
    out = tmp_path / "rv"

    def refused(*extra) -> str:
        assert main(["train", train, val, "--out", str(out), *COMMON, *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and not out.exists()
        return err.strip().splitlines()[-1]

    assert "--arch vit_b_16 does not accept 32x32 inputs (--resize 40 --crop 32)" in refused("--arch", "vit_b_16")
    line = refused("--resize", "8000", "--crop", "8000")  # meta only: nothing of that size is allocated
    assert line.startswith("fasteval: error: fasteval train --resize 8000 --crop 8000 --batch-size 4: a training "
                           "step needs") and line.endswith("lower --batch-size or --resize/--crop")
    # At 224x224, 15 validation images in one batch need more than a training step of 2: the stem's conv and
    # batch norm outputs alone are 2 x 15 x 64 x 112 x 112 float32 (91.9 MiB); a training step of 2 peaks near
    # 50 MiB (what it keeps for its backward pass, gradients in flight). Beside the model's tensors (weights, gradients, AdamW's moments, the
    # validation copy: 5 x its parameters), 75 MiB more refuses validation only.
    model_bytes = 5 * parameter_bytes(training_model("resnet18", None, 3))
    monkeypatch.setattr(memory, "host_memory", lambda: model_bytes + 75 * 2**20)
    line = refused("--resize", "256", "--crop", "224", "--batch-size", "2", "--val-batch-size", "15")
    assert "--resize 256 --crop 224 --val-batch-size 15: validation needs" in line, line
    assert f"more than this machine's {(model_bytes + 75 * 2**20) / 2**20:.1f} MiB" in line
    assert line.endswith("lower --val-batch-size or --resize/--crop")


def test_a_failure_before_the_first_epoch_leaves_no_empty_run_folder(folders, tmp_path, capsys, monkeypatch):
    from fasteval.training.loop import Trainer

    def fail(self):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Trainer, "run", fail)
    out = tmp_path / "rv"
    assert _train(folders, out, "--epochs", "1") == 2
    assert "out of memory" in capsys.readouterr().err and not out.exists()
    out.mkdir()  # a folder the user made is kept
    assert _train(folders, out, "--epochs", "1") == 2
    assert out.is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupt_leaves_a_consistent_run_folder(folders, tmp_path, signum, code):
    """SIGTERM or Ctrl-C after the first epoch: exit 143/130, and the folder holds whole epochs only
    (history.json, last.pt and best.pt agree), no temporary file; ``--resume`` then continues from it."""
    train, val, _ = folders
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fasteval", "train", train, val, "--out", str(out), *COMMON,
                             "--epochs", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 240
    while not (out / "history.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err.decode()
    assert "Traceback" not in err.decode()
    history = _history(out)
    last = torch.load(out / "last.pt", weights_only=True)
    best = torch.load(out / "best.pt", weights_only=True)
    assert 1 <= len(history) < 40 and [r["epoch"] for r in history] == list(range(1, len(history) + 1))
    assert last["epoch"] == len(history) and [r["epoch"] for r in last["history"]] == [r["epoch"] for r in history]
    from fasteval.training.history import best_epoch
    assert best["epoch"] == best_epoch(history)["epoch"]
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    assert _train(folders, out, "--epochs", str(len(history) + 1), "--resume") == 0
    assert len(_history(out)) == len(history) + 1


@pytest.mark.cuda
def test_training_loop_has_no_host_sync_on_cuda(folders):
    """The batch loop (transfer, forward, backward, AdamW step, metrics) in CUDA's sync-debug mode:
    any synchronising call raises."""
    from fasteval.data.preprocess import get_spec
    from fasteval.data.samples import discover
    from fasteval.evaluation.metrics import TOPK
    from fasteval.kernels.accumulator import MetricsAccumulator
    from fasteval.training.loop import RunOptions, Trainer
    from fasteval.training.recipe import Recipe

    train, val, root = folders
    device = torch.device("cuda")
    trainer = Trainer(discover(train), discover(val), get_spec("imagenet", 40, 32), Recipe(batch_size=4),
                      RunOptions(out=str(root), device=device, precision="bf16", workers=2, progress=False))
    trainer.model.train()
    batches = list(trainer.batches(1))  # decoded and pinned beforehand: the loader's threads are not on trial
    warm = MetricsAccumulator(4, device, topk=TOPK, backend=trainer.metrics_backend)
    trainer.train_steps(batches[:1], warm)  # first-call setup (cuDNN, Triton, optimizer state)
    acc = MetricsAccumulator(len(trainer.train_samples), device, topk=TOPK, backend=trainer.metrics_backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_steps(batches, acc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    totals = acc.result()
    assert totals["count"] == 18 and 0 <= totals["correct"] <= 18
