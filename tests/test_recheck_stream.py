"""The exact recheck overlapped with the fast pass (fasteval/evaluation/recheck_stream.py): the same results as
the serial schedule, its pool started once and never left behind, and no host sync in the pass's loop.

On this CPU the overlapped schedule is forced (``FastOptions(recheck="overlap")``); the plan chooses it by
itself only on a GPU whose loader decodes on the GPU (tested apart, on the decision)."""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import pickle
import sys
import threading
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))
from sync_trace import SyncRecorder, fake_cuda  # noqa: E402
from test_exact import near_tie_model  # noqa: E402

import fasteval.evaluation.exact as exact_module  # noqa: E402
import fasteval.evaluation.recheck_pool as recheck_pool  # noqa: E402
import fasteval.evaluation.recheck_stream as stream  # noqa: E402
from fasteval.data.batch import Batch  # noqa: E402
from fasteval.data.dataset import ImageDataset  # noqa: E402
from fasteval.data.loader_dali import dali_available  # noqa: E402
from fasteval.data.loaders import make_loader  # noqa: E402
from fasteval.data.samples import discover  # noqa: E402
from fasteval.errors import FastevalError  # noqa: E402
from fasteval.evaluation.exact import GPU_DECODE_CORES, recheck_pool_size, resolve_recheck  # noqa: E402
from fasteval.evaluation.fast import FastEvaluator, FastOptions, run_loop  # noqa: E402
from fasteval.evaluation.metrics import PER_SAMPLE_FIELDS  # noqa: E402
from fasteval.evaluation.recheck_pool import DecodePool  # noqa: E402
from fasteval.evaluation.reference import evaluate_reference  # noqa: E402
from fasteval.evaluation.validate import compare  # noqa: E402
from fasteval.kernels.accumulator import MetricsAccumulator  # noqa: E402
from fasteval.procs import alive  # noqa: E402

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
DALI = dali_available()


def _torchvision_source(kind, samples, spec, **kwargs):
    """The PIL DataLoader loader, as a batch source: on this small set the plan would read PIL's pixels in
    process (which the serial recheck reuses, so the overlap is not allowed there)."""
    kwargs.pop("placement", None)
    return make_loader("torchvision", samples, spec, **kwargs)


def _run(samples, model, spec, schedule, batch_size=8, passes=1, workers=1):
    """One fast run on the CPU with the recheck's schedule forced; DALI's CPU pipeline where installed."""
    options = FastOptions(loader="dali" if DALI else "torchvision", precision="bf16", compile=False,
                          batch_size=batch_size, workers=workers, recheck=schedule)
    source = {} if DALI else {"batch_source": _torchvision_source}
    evaluator = FastEvaluator(samples, copy.deepcopy(model), spec, CPU, options, passes=passes, **source)
    assert evaluator.plan.recheck_overlap == (schedule == "overlap")
    return evaluator, evaluator.run(progress=False)


SHARED_REPORT = ("tau", "max_logit_error", "gated", "rechecked", "changed_top1", "changed_top5",
                 "calibration_samples", "calibration_loss_error_mean", "calibration_loss_error_max")


def _same(a: list, b: list) -> bool:
    """Equal, NaN equal to NaN."""
    return len(a) == len(b) and all(x == y or (x != x and y != y) for x, y in zip(a, b))


def assert_same_results(samples, reference, serial, overlapped):
    """Counts, every per-sample output (NaN where NaN), the recheck's figures and the flips against the
    reference: the overlapped run is the serial one's, bit for bit."""
    assert (overlapped.correct_top1, overlapped.correct_top5) == (serial.correct_top1, serial.correct_top5)
    assert _same([overlapped.loss_sum, *overlapped.batch_losses], [serial.loss_sum, *serial.batch_losses])
    for name in PER_SAMPLE_FIELDS:
        torch.testing.assert_close(getattr(overlapped, name), getattr(serial, name), rtol=0, atol=0, equal_nan=True)
    a, b = serial.extra["exact"], overlapped.extra["exact"]
    assert _same([a[k] for k in SHARED_REPORT], [b[k] for k in SHARED_REPORT])
    assert (a["schedule"], b["schedule"]) == ("after the pass", "during the pass")
    flips = compare(samples, reference, serial)
    assert compare(samples, reference, overlapped)["flips"] == flips["flips"]
    assert (overlapped.correct_top1, overlapped.correct_top5) == (reference.correct_top1, reference.correct_top5)


@pytest.fixture(scope="module")
def tied(small_data, model_3cls, small_spec):
    """A sample placed between its fp32 and bf16 decisions (test_exact's construction), its reference run,
    and the serial schedule's run."""
    samples = discover(small_data)
    model, index = near_tie_model(samples, model_3cls, small_spec)
    reference = evaluate_reference(samples, copy.deepcopy(model), small_spec, batch_size=8, workers=0,
                                   progress=False)
    _, serial = _run(samples, model, small_spec, "after")
    return samples, model, index, reference, serial


def _sample_bytes(samples, spec) -> int:
    """One sample decoded by the reference's transform, in bytes."""
    return ImageDataset(samples, spec.torchvision_transform())[0][0].nbytes


@pytest.mark.parametrize("chunk, slack, budget", [(1, 2.0, None), (1, 0.0, None), (1, 1e9, None), (1024, 2.0, None),
                                                  (1, 1e9, 2)])
def test_overlap_gives_the_serial_results(tied, small_spec, monkeypatch, chunk, slack, budget):
    """21 samples in batches of 8 (a short last batch), a flip placed on purpose; margins copied back every
    batch or never during the pass (chunk 1024: every near-tie decoded after it); near-ties sent with the
    running estimate, with none of its slack (some missed, decoded after the pass), or with all (every sample
    sent: the unneeded skipped), or all within a budget of 2 samples' bytes (the rest decoded after the pass)."""
    samples, model, index, reference, serial = tied
    monkeypatch.setattr(stream, "CHUNK_SAMPLES", chunk)
    monkeypatch.setattr(stream, "STREAM_SLACK", slack)
    if budget is not None:
        monkeypatch.setattr(stream, "STREAM_BYTES", budget * _sample_bytes(samples, small_spec) + 1)
    _, overlapped = _run(samples, model, small_spec, "overlap")
    assert_same_results(samples, reference, serial, overlapped)
    assert overlapped.rechecked[index]
    exact = overlapped.extra["exact"]
    needed = exact["gated"]
    assert exact["streamed"] - exact["streamed_unneeded"] + exact["decoded_after_pass"] == needed
    if chunk > len(samples):
        assert exact["streamed"] == 0 and exact["decoded_after_pass"] == needed
    elif budget is not None:
        assert exact["stream_budget"] == budget and exact["streamed"] == budget
    elif slack == 1e9:  # every sample but the calibration's sent once the first chunk gave an estimate
        assert exact["streamed"] == len(samples) - exact["calibration_samples"] and exact["decoded_after_pass"] == 0
    elif slack == 0:  # only exact ties would be sent: the placed near-tie is decoded after the pass
        assert exact["decoded_after_pass"] >= 1
    else:
        assert exact["streamed"] >= 1
    assert exact["calibration_seconds"] > 0 and exact["hidden_seconds"] >= 0


def test_an_infinite_error_streams_only_the_budget_and_the_pool_holds_only_what_is_to_be_scored(
        tied, small_spec, monkeypatch, pools):
    """A non-finite difference on a calibration sample (faked: the error is inf) gates every sample. The pass
    sends 3 of them (its budget of decoded bytes), not all; after it the pool decodes the rest one batch ahead
    of none (``AHEAD_BATCHES`` 0) and each value is dropped once scored: before each batch is taken the pool
    holds at most the 3 sent and one batch of 4 (all 13 held at once before). The results are the serial
    schedule's under the same error."""
    samples, model, index, reference, _ = tied
    for module in (exact_module, stream):
        monkeypatch.setattr(module, "max_logit_error", lambda fast, ref: math.inf)
    monkeypatch.setattr(stream, "CHUNK_SAMPLES", 1)
    monkeypatch.setattr(stream, "AHEAD_BATCHES", 0)
    monkeypatch.setattr(stream, "STREAM_BYTES", 3 * _sample_bytes(samples, small_spec) + 1)
    held = []
    take = DecodePool.take

    def counted(self, indices):
        held.append(sum(d.value is not None for d in self.done().values()))
        return take(self, indices)

    monkeypatch.setattr(DecodePool, "take", counted)
    _, serial = _run(samples, model, small_spec, "after", batch_size=4)
    _, overlapped = _run(samples, model, small_spec, "overlap", batch_size=4)
    assert_same_results(samples, reference, serial, overlapped)
    exact = overlapped.extra["exact"]
    assert exact["tau"] == math.inf and exact["gated"] == len(samples) - exact["calibration_samples"] == 13
    assert exact["streamed"] == 3 and exact["decoded_after_pass"] == 10 and overlapped.rechecked.all()
    assert len(held) == 2 + 4 and max(held) <= 3 + 4  # calibration in 2 batches of 4, the 13 in 4
    assert len(pools) == 1 and _gone(pools[0])


class TiesAndNaN(nn.Module):
    """A classifier with two classes of one head row (exact ties) and NaN logits for the brighter images."""

    def __init__(self, model: nn.Module, threshold: float) -> None:
        super().__init__()
        self.model, self.threshold = model, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        bright = x.float().mean(dim=(1, 2, 3)) > self.threshold
        return torch.where(bright[:, None], torch.full_like(logits, float("nan")), logits)


def test_overlap_gives_the_serial_results_on_ties_and_nan(small_data, model_3cls, small_spec, monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_SAMPLES", 1)
    samples = discover(small_data)
    base = copy.deepcopy(model_3cls)
    with torch.no_grad():
        base.fc.weight[2] = base.fc.weight[1]
        base.fc.bias[2] = base.fc.bias[1]
    # The threshold in the widest gap between the reference's image means, so both paths see the same NaN rows.
    from fasteval.data.dataset import ImageDataset

    data = ImageDataset(samples, small_spec.torchvision_transform())
    means = sorted(float(data[i][0].mean()) for i in range(len(samples)))
    gap = max(range(3, len(means) - 4), key=lambda i: means[i + 1] - means[i])
    model = TiesAndNaN(base, (means[gap] + means[gap + 1]) / 2).eval()
    reference = evaluate_reference(samples, copy.deepcopy(model), small_spec, batch_size=8, workers=0,
                                   progress=False)
    assert reference.losses.isnan().sum() == len(samples) - gap - 1
    _, serial = _run(samples, model, small_spec, "after")
    _, overlapped = _run(samples, model, small_spec, "overlap")
    assert_same_results(samples, reference, serial, overlapped)
    bright = torch.tensor([float(data[i][0].mean()) > model.threshold for i in range(len(samples))])
    assert overlapped.extra["nonfinite_rows"] == int(bright.sum()) == len(samples) - gap - 1
    assert overlapped.rechecked[bright].all()  # a NaN row's margin is 0: always rechecked


@pytest.mark.skipif(not DALI, reason="only DALI leaves files to the reference's code (PIL-only formats)")
def test_overlap_gives_the_serial_results_beside_the_files_the_fast_path_skips(kinds_data, small_spec, monkeypatch):
    import torchvision

    monkeypatch.setattr(stream, "CHUNK_SAMPLES", 1)
    samples = discover(kinds_data)
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=samples.num_classes).eval()
    reference = evaluate_reference(samples, copy.deepcopy(model), small_spec, batch_size=4, workers=0,
                                   progress=False)
    evaluator, serial = _run(samples, model, small_spec, "after", batch_size=4)
    assert evaluator.reference_only  # the 16-bit PNG
    _, overlapped = _run(samples, model, small_spec, "overlap", batch_size=4)
    assert_same_results(samples, reference, serial, overlapped)


# --- the pool's life ----------------------------------------------------------------------------------------


@pytest.fixture
def pools(monkeypatch):
    """Every DecodePool started, in order."""
    started = []
    real = DecodePool.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(DecodePool, "__init__", init)
    return started


def _gone(pool: DecodePool) -> bool:
    return pool.closed and all(p.exitcode is not None and not alive(p.pid) for p in pool.processes)


def test_the_pool_starts_once_a_run_and_ends_with_it(small_data, model_3cls, small_spec, pools):
    """And the run reports its size: one worker for --workers 1, beside the loader's thread(s)."""
    samples = discover(small_data)
    evaluator, result = _run(samples, model_3cls, small_spec, "overlap", passes=2)
    assert len(pools) == 1 and _gone(pools[0])
    exact = result.extra["exact"]
    assert exact["pool_workers"] == len(pools[0].processes) == 1
    assert exact["pool_reason"].startswith("1 PIL worker process(es)") and exact["pool_reason"].endswith("--workers 1")
    evaluator.run(progress=False)
    assert len(pools) == 2 and _gone(pools[1])


def test_the_pool_grows_to_the_workers_once_the_pass_is_over(small_data, model_3cls, small_spec, pools,
                                                              monkeypatch):
    """During the pass the pool takes what the loader leaves (one worker on these 2 cores beside its 2); after
    it, the loader's cores are free and the pool grows to --workers 2 for what is left: the serial results."""
    monkeypatch.setattr(stream, "recheck_batch", lambda count, batch, workers, device: 4)  # several batches after
    samples = discover(small_data)
    _, serial = _run(samples, model_3cls, small_spec, "after", workers=2)
    _, overlapped = _run(samples, model_3cls, small_spec, "overlap", workers=2)
    exact = overlapped.extra["exact"]
    assert exact["pool_workers"] == 1 and exact["pool_workers_after_pass"] == len(pools[0].processes) == 2
    assert exact["decoded_after_pass"] + exact["streamed"] >= exact["gated"] > 0
    assert _gone(pools[0])
    assert (overlapped.correct_top1, overlapped.correct_top5) == (serial.correct_top1, serial.correct_top5)
    torch.testing.assert_close(overlapped.predictions, serial.predictions, rtol=0, atol=0)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_the_pool_ends_when_the_pass_fails(small_data, model_3cls, small_spec, pools, error):
    """Ctrl-C (or an error) in the middle of the pass, with near-ties queued: no worker is left behind."""
    samples = discover(small_data)
    options = FastOptions(loader="dali" if DALI else "torchvision", precision="bf16", compile=False, batch_size=8,
                          workers=2, recheck="overlap")
    source = {} if DALI else {"batch_source": _torchvision_source}
    evaluator = FastEvaluator(samples, copy.deepcopy(model_3cls), small_spec, CPU, options, **source)
    batches = list(evaluator.loader)

    class Interrupted:
        name = "interrupted"

        def __iter__(self):
            yield batches[0]
            pools[0].submit([(i, 0.0) for i in range(len(samples))] * 3)  # work queued, none of it needed
            raise error("stop")

    evaluator.loader = Interrupted()
    with pytest.raises(error):
        evaluator.run(progress=False)
    assert len(pools) == 1 and _gone(pools[0])


def test_a_worker_lost_leaves_its_samples_to_this_process(small_data, small_spec):
    """A worker killed with its task: ``take`` returns without it, and the caller decodes it itself."""
    import signal

    from fasteval.data.dataset import ImageDataset

    samples = discover(small_data)
    with DecodePool(ImageDataset(samples, small_spec.torchvision_transform()), 1) as pool:
        pool.submit([(0, 0.0)])
        first = pool.take([0])
        os.kill(pool.processes[0].pid, signal.SIGKILL)
        pool.processes[0].join()
        pool.submit([(1, 0.0)])
        assert pool.take([0, 1]).keys() == {0}
    assert torch.equal(first[0].value, ImageDataset(samples, small_spec.torchvision_transform())[0][0])
    assert _gone(pool)


def test_a_receiver_error_is_raised_in_the_callers_thread(small_data, small_spec, monkeypatch):
    """The receiving thread fails on a result (an unpickling error) while the worker lives on: ``take``
    raises it as one FastevalError line instead of waiting for a result that cannot come."""
    def broken(item):
        raise pickle.UnpicklingError("invalid load key, 'x'.")

    monkeypatch.setattr(recheck_pool, "_unpack", broken)
    raised = []
    with DecodePool(ImageDataset(discover(small_data), small_spec.torchvision_transform()), 1) as pool:
        pool.submit([(0, 0.0)])

        def take():
            try:
                pool.take([0])
            except FastevalError as exc:
                raised.append(exc)

        waiting = threading.Thread(target=take, daemon=True)
        waiting.start()
        waiting.join(120)  # a guard, not a timing: without the fix the wait never ends
        assert not waiting.is_alive(), "take() waits for a receiver that has died"
        assert pool.processes[0].is_alive()
    assert len(raised) == 1 and "UnpicklingError: invalid load key" in str(raised[0])
    assert len(str(raised[0]).splitlines()) == 1 and isinstance(raised[0].__cause__, pickle.UnpicklingError)
    assert _gone(pool)


class Unpicklable:
    """A dataset that cannot be pickled (its lambda): only a forked worker can have it."""

    def __init__(self, dataset) -> None:
        self.dataset, self.hook = dataset, lambda: None

    def __getitem__(self, index):
        return self.dataset[index]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork start method is requested on Linux")
def test_the_pool_forks_whatever_start_method_the_caller_set(small_data, small_spec):
    samples = discover(small_data)
    dataset = ImageDataset(samples, small_spec.torchvision_transform())
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        with DecodePool(Unpicklable(dataset), 1) as pool:
            pool.submit([(3, 0.0)])
            value = pool.take([3])[3].value
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert torch.equal(value, dataset[3][0])


def test_the_pool_takes_the_cores_the_loader_leaves():
    """16 usable cores: beside DALI's 14 decoding threads and the main thread, one worker; beside 8 DataLoader
    workers, 7 of --workers 8; never more than --workers, never fewer than 1."""
    assert recheck_pool_size(8, 14, cores=16)[0] == 1
    assert recheck_pool_size(8, 8, cores=16)[0] == 7
    assert recheck_pool_size(2, 8, cores=16)[0] == 2
    assert recheck_pool_size(8, 8, cores=4)[0] == 1
    assert recheck_pool_size(0, 1, cores=2)[0] == 1
    size, reason = recheck_pool_size(8, 14, cores=16)
    assert reason == "1 PIL worker process(es): 16 usable core(s) less the loader's 14 and the main thread's 1 " \
                     "leave 1; --workers 8"


# --- the plan's decision ------------------------------------------------------------------------------------


def test_the_schedule_is_the_plans():
    decide = dict(device_type="cuda", cpu_decoding=False, pass_pixels=False, sharded=False, workers=8)
    assert resolve_recheck("auto", **decide)[0]
    assert "decoded during the pass by PIL worker processes" in resolve_recheck("auto", **decide)[1]
    for change, words in ((dict(device_type="cpu"), "the CPU the cores are the model's"),
                          (dict(cpu_decoding=True), "decodes with PIL"), (dict(sharded=True), "torchrun"),
                          (dict(workers=0), "--workers 0"), (dict(pass_pixels=True), "pixels decoded for the pass")):
        overlap, reason = resolve_recheck("auto", **{**decide, **change})
        assert not overlap and reason.startswith("after the pass") and words in reason
    assert resolve_recheck("overlap", **{**decide, "device_type": "cpu"})[0]
    assert not resolve_recheck("overlap", **{**decide, "pass_pixels": True})[0]
    assert not resolve_recheck("after", **decide)[0]
    with pytest.raises(FastevalError, match="schedule"):
        resolve_recheck("sometimes", **decide)


def test_the_cpu_plan_keeps_the_recheck_after_the_pass(small_data, model_3cls, small_spec):
    from fasteval.evaluation.plan import make_plan

    plan = make_plan(discover(small_data), model_3cls, small_spec, CPU, FastOptions(loader="torchvision"))
    assert not plan.recheck_overlap and "after the pass" in plan.exact.reason


def test_a_gpu_plan_decoding_on_the_gpu_overlaps_the_recheck(small_data, model_3cls, small_spec, monkeypatch):
    """On a (faked) H100 with nvJPEG's loader: overlapped; not with --workers 0, on a torchrun rank, with the
    recheck asked after the pass, or with --exact off."""
    from fasteval.evaluation.exact import WholeRun
    from fasteval.evaluation.plan import make_plan

    class Rank(WholeRun):
        sharded = True

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3 (fake)")
    samples = discover(small_data, quiet=True)

    def plan(scope=None, **options):
        return make_plan(samples, model_3cls, small_spec, CUDA,
                         FastOptions(**{"compile": "off", "loader": "torchvision", "workers": 4, **options}), scope=scope)

    gpu = plan()
    assert gpu.loader.value == "torchvision-gpu" and gpu.recheck_overlap
    # The pool's size is the plan's, beside the loader's threads: the nvJPEG loader's (its decode-ahead thread
    # and byte readers, GPU_DECODE_CORES), DALI's decoding threads with DALI
    assert gpu.recheck_pool == recheck_pool_size(4, GPU_DECODE_CORES) and gpu.recheck_pool[0] >= 1
    assert recheck_pool_size(16, GPU_DECODE_CORES, cores=16)[0] == 13  # the H100 machines' 16 cores
    assert "near-ties decoded during the pass by PIL worker processes" in gpu.exact.reason
    assert gpu.exact.reason.endswith(f"; {gpu.recheck_pool[1]}")
    dali = plan(loader="dali")
    assert dali.dali_settings is not None and dali.recheck_overlap
    assert dali.recheck_pool == recheck_pool_size(4, dali.dali_settings.threads)
    assert not plan(exact="off").recheck_pool[0] and not plan(workers=0).recheck_pool[0]
    assert not plan(workers=0).recheck_overlap and not plan(scope=Rank()).recheck_overlap
    assert not plan(recheck="after").recheck_overlap and not plan(exact="off").recheck_overlap


def test_recheck_batch_is_reference_logits_batching(small_data, small_spec, monkeypatch):
    """The overlapped schedule scores in the batches ``reference_logits`` builds its DataLoader with."""
    import fasteval.evaluation.reference as reference

    samples = discover(small_data)
    seen = []

    class Stop(Exception):
        pass

    def loader(dataset, batch_size, **kwargs):
        seen.append(batch_size)
        raise Stop

    monkeypatch.setattr(reference, "DataLoader", loader)
    for device in (CPU, CUDA):
        for workers in (0, 1, 2, 3, 8):
            for count in (1, 3, 4, 7, 8, 9, 12, 16, 21):
                with pytest.raises(Stop):
                    reference.reference_logits(samples, list(range(count)), nn.Identity(), small_spec,
                                               batch_size=5, workers=workers, device=device)
                assert seen.pop() == stream.recheck_batch(count, 5, workers, device), (device, workers, count)


# --- no host sync in the pass (fake CUDA) -------------------------------------------------------------------


class DeviceToHost(TorchDispatchMode):
    """Logs each device-to-host ``copy_``: the function of recheck_stream.py that made it, and whether it is
    non-blocking into (the recorder's emulated) pinned memory, i.e. queues a copy and returns without waiting."""

    def __init__(self, trace: SyncRecorder) -> None:
        super().__init__()
        self.trace, self.copies = trace, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ == "copy_" and args[1].device.type == "cuda" and args[0].device.type == "cpu":
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            where = next((f.name for f in reversed(traceback.extract_stack()) if f.filename == stream.__file__), "?")
            self.copies.append((where, bool(non_blocking) and self.trace.is_pinned(args[0])))
        return func(*args, **kwargs)


class Pending:
    """A CUDA event whose copies have not completed: the watch polls and goes on."""

    made = 0

    def __init__(self) -> None:
        Pending.made += 1

    @staticmethod
    def query() -> bool:
        return False


def test_the_watch_makes_no_host_sync_in_the_pass(monkeypatch):
    """10 batches of 4 (the last of 2) on fake CUDA tensors, margins copied back every 3 batches: no value read
    back (the recorder raises on one), only non-blocking copies into pinned memory, one per chunk (and one for
    each chunk holding a calibration row), one event each."""
    Pending.made = 0
    with fake_cuda() as trace:
        with torch.device(CUDA):
            model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 10)).eval()
        images = torch.empty(4, 3, 16, 16, device=CUDA)
        labels = torch.zeros(4, dtype=torch.int64, device=CUDA)
        batches = [Batch(images, labels, 4)] * 9 + [Batch(images, labels, 2)]
        acc = MetricsAccumulator(38, CUDA, backend="torch", keep_logits=[0, 20, 37])
        sent = []
        watch = stream.MarginWatch(acc, list(range(38)), torch.zeros(3, 10), sent.extend, CUDA, event=Pending,
                                   chunk=12)
        with trace.recording() as events, DeviceToHost(trace) as log, torch.inference_mode():
            run_loop(batches, model, acc, after_batch=watch)
        # The recorder lists every device-to-host copy as a sync; each is the watch's, queued into pinned memory.
        assert [e.reason for e in events] == ["device-to-host copy"] * 5, trace.report()
        assert log.copies == [("_launch", True)] * 5  # margins per chunk; calibration rows 0 and 20 in two of them
        assert watch.launches == Pending.made == 3  # after 12, 24 and 36 samples
        assert sent == [] and len(watch.pending) == 3


# --- bench ------------------------------------------------------------------------------------------------


def test_bench_shows_how_much_of_the_recheck_was_hidden():
    from test_bench_table import _bench, _row

    from fasteval.output.bench_table import WIDTH, format_bench

    b = _bench()
    assert "near-ties, in the loop's time" in _row(format_bench(b), "exact recheck")
    b["fast"]["exact"].update(schedule="during the pass", hidden_seconds=3.456, seconds=0.25, rechecked=2500)
    table = format_bench(b)
    row = " ".join(line.strip() for line in table.split("exact recheck", 1)[1].splitlines()[:3])
    assert "2500 samples" in row and "3.46 s of decoding hidden in the pass, 0.25 s before and after it" in row
    assert max(len(line) for line in table.splitlines()) <= WIDTH
