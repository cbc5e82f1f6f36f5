"""Exact evaluation under torch.distributed, launched by torchrun: one result, whatever the world size.

Each rank evaluates one contiguous block of the one sample list (no padding duplicates, no drops;
a rank may get none), with the ordinary evaluators. Rank 0 then holds every per-sample tensor, in
sample order, and the counts and the float64 loss sum are computed from them exactly as in one
process. Every message between ranks goes through ``exchange``, which also carries each rank's
failure: a rank that fails tells the others at the next exchange, and every rank stops with the
failing rank's one line (printed by rank 0) instead of waiting in a collective. Collectives time
out after ``$FASTEVAL_DIST_TIMEOUT`` seconds. Only torch.distributed is used: torchrun launches,
the process group (NCCL on ``cuda:LOCAL_RANK``, gloo on the CPU) transports.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING

from fasteval.errors import FastevalError, Terminated, describe_error, first_line, printable

if TYPE_CHECKING:  # torch and the evaluators load when a rank starts: the CLI imports this module first
    from fasteval.data.samples import SampleList
    from fasteval.evaluation.exact import WholeRun
    from fasteval.evaluation.metrics import EvalResult

TIMEOUT_ENV = "FASTEVAL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # a collective waits this long for the slowest rank (its whole shard, at worst)
_error_said = False  # rank 0 printed a failing rank's line (once per process)
_SUMMED_EXTRA = ("nonfinite_rows", "pil_fallback_files")  # per-rank counts in EvalResult.extra


@dataclass(frozen=True)
class Launch:
    """What torchrun tells this process (its environment variables)."""

    rank: int
    world_size: int
    local_rank: int


def detect_launch(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """torchrun's environment, or None for a plain process (neither RANK nor WORLD_SIZE set)."""
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return None
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
    if missing:
        raise FastevalError(f"incomplete torch.distributed environment: {', '.join(missing)} not set "
                            f"(launch with torchrun)")
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise FastevalError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got RANK={environ.get('RANK')!r} "
                            f"WORLD_SIZE={environ.get('WORLD_SIZE')!r} LOCAL_RANK={environ.get('LOCAL_RANK')!r}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise FastevalError(f"invalid torch.distributed environment: RANK={rank} WORLD_SIZE={world} "
                            f"LOCAL_RANK={local}")
    return Launch(rank=rank, world_size=world, local_rank=local)


def timeout_seconds(environ: Mapping[str, str] = os.environ) -> float:
    """The collectives' timeout: ``$FASTEVAL_DIST_TIMEOUT`` seconds, else DEFAULT_TIMEOUT_S."""
    text = environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise FastevalError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def rank_device(name: str, launch: Launch) -> str:
    """The ``--device`` of one rank: ``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` (``auto`` without CUDA: the
    CPU). ``cuda:N`` other than ``cuda:LOCAL_RANK`` is refused: every rank of the node would share GPU N."""
    import torch

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if name not in ("auto", "cuda", f"cuda:{launch.local_rank}"):
        raise FastevalError(f"--device {name} under torchrun: each rank uses cuda:LOCAL_RANK; give --device cuda "
                            f"(or auto), and choose GPUs with CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        raise FastevalError(f"--device {name}: CUDA is not available on this machine")
    if launch.local_rank >= torch.cuda.device_count():
        raise FastevalError(f"LOCAL_RANK {launch.local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                            f"here: give --nproc-per-node at most {torch.cuda.device_count()}")
    return f"cuda:{launch.local_rank}"


def shard_bounds(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s block [start, stop) of the sample list: disjoint, covering, sizes differ by <= 1."""
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def calibration_share(counts: list[int], rank: int) -> tuple[list[int], int]:
    """The one-process calibration over every rank's main samples (``counts[r]`` of them on rank r, in
    rank order): the positions among rank ``rank``'s own, and how many the whole run has."""
    from fasteval.evaluation.exact import calibration_positions

    whole = calibration_positions(sum(counts))
    before = sum(counts[:rank])
    return [p - before for p in whole if before <= p < before + counts[rank]], len(whole)


def _short(exc: BaseException) -> str:
    """The first sentence of a collective's error, without gloo's source location (gloo and NCCL append
    paragraphs of advice)."""
    return re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc)).split(". ")[0][:200]


class RankFailed(FastevalError):
    """A rank failed: raised on every rank, with the failing rank's one line."""


class CommunicationFailed(FastevalError):
    """A collective failed: a rank died or did not answer within the timeout."""


class RankDied(FastevalError):
    """A rank's process ended without a word (a signal, a crash): torchrun stopped the others with SIGTERM,
    or their collective broke. Raised on the ranks of its machine that see it."""


# A rank whose collective broke waits this long for the rank that broke it to be seen ended: a killed
# process closes its sockets before it ends.
DEATH_WAIT_S = 2.0
# How a rank ends when torchrun stops it, or when its own collective broke: never the first to end.
_STOPPED = ("signal TERM", "exit code 143", "exit code 2")


def dataset_entries(samples: SampleList) -> list[tuple[str, int, int]]:
    """(path relative to the root, size in bytes, label) of every sample: what must match across ranks."""
    from fasteval.data.samples import relative_path
    from fasteval.data.sources import sample_size

    entries = []
    for path, label in samples.samples:
        try:
            size = sample_size(path)  # a tar member's own size
        except OSError:
            size = -1  # the header check names the file
        entries.append((relative_path(samples, path), size, label))
    return entries


def first_difference(mine: tuple[list[str], list[tuple[str, int, int]]],
                     theirs: tuple[list[str], list[tuple[str, int, int]]]) -> str | None:
    """How this rank's (classes, entries) differs from rank 0's, first difference first; None if equal."""
    (classes, entries), (classes0, entries0) = mine, theirs
    if classes != classes0:
        extra = sorted(set(classes) ^ set(classes0))
        return f"the class folders differ (e.g. {printable(extra[0]) if extra else 'their order'})"
    for (path, size, label), (path0, size0, label0) in zip(entries, entries0):
        if path != path0:
            first = min(path, path0)
            where = "here but not on rank 0" if first == path else "on rank 0 but not here"
            return f"the first differing file is {printable(first)} ({where})"
        if size != size0 or label != label0:
            return f"the first differing file is {printable(path)} ({size} bytes here, {size0} on rank 0)"
    if len(entries) != len(entries0):
        longer, where = (entries, "here but not on rank 0") if len(entries) > len(entries0) else \
            (entries0, "on rank 0 but not here")
        return f"the first differing file is {printable(longer[min(len(entries), len(entries0))][0])} ({where})"
    return None


def state_digest(model) -> str:
    """sha256 of a module's state (each entry's name, dtype, shape and bytes, in order)."""
    import torch

    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = value.to_dense() if value.layout != torch.strided else value
            value = (value.int_repr() if value.is_quantized else value).contiguous()
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Ranks:
    """One process evaluating every sample: every method is the identity. ``TorchrunRanks`` is one
    rank of a torchrun job; the commands call the same methods either way."""

    rank = 0
    world_size = 1
    backend: str | None = None
    is_main = True
    launched = False  # by torchrun

    def device_name(self, name: str) -> str:
        return name

    def step(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; under torchrun, every rank learns whether any rank failed in it."""
        return fn(*args, **kwargs)

    def exchange(self, payload=None) -> list:
        """Every rank's ``payload``, in rank order."""
        return [payload]

    def shard(self, samples: SampleList) -> SampleList:
        return samples

    def scope(self, samples: SampleList) -> WholeRun | None:
        """What the fast evaluator of this rank's shard decides over the whole run (None: itself)."""
        return None

    def check_same_data(self, samples: SampleList) -> None:
        """Stop every rank if one lists a different dataset from rank 0's."""

    def share_random_init(self, model) -> None:
        """Give every rank rank 0's randomly initialised weights (no ``--weights``), in place."""

    def check_same_model(self, model) -> None:
        """Stop every rank if one holds other weights than rank 0's (a caller's module, from Python)."""

    def gather(self, result: EvalResult, samples: SampleList, batch_size: int) -> EvalResult:
        """The whole run's result from every rank's result of its shard (on every rank)."""
        return result

    def bench_summary(self, bench: dict) -> dict:
        """``fasteval bench``'s figures across ranks (``distributed``), from each rank's bench of its shard."""
        return {}


class TorchrunRanks(Ranks):
    """One rank of a torchrun job, in an initialised process group."""

    def __init__(self, launch: Launch, backend: str, device: str, debug: bool = False,
                 places: list[tuple[str, int]] | None = None, announce: bool = True) -> None:
        """``announce``: rank 0 prints a failing rank's line as it learns of it (the command: torchrun may stop
        it before its error reaches the top); the library raises it to the caller and prints nothing."""
        import torch

        self.rank, self.world_size, self.backend = launch.rank, launch.world_size, backend
        self.is_main, self.launched = launch.rank == 0, True
        self.device, self.debug = device, debug
        self.announce = announce
        self.places = places  # every rank's (host name, pid): which process on this machine is which rank
        # Where tensors travel: NCCL moves CUDA tensors only, gloo CPU ones.
        self.comm_device = torch.device(device) if backend == "nccl" else torch.device("cpu")

    def device_name(self, name: str) -> str:
        return self.device

    def exchange(self, payload=None, error: str | None = None) -> list:
        """Every rank's ``payload`` (any picklable object), in rank order; raises RankFailed on every
        rank if one sent an ``error`` instead, CommunicationFailed if the group broke."""
        import torch.distributed as dist

        gathered: list = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, (error, payload))
        except Exception as exc:
            raise CommunicationFailed(f"rank {self.rank}: the other ranks stopped answering (one failed or did "
                                      f"not answer within {TIMEOUT_ENV}={timeout_seconds():g} s): "
                                      f"{_short(exc)}") from None
        errors = [(rank, message) for rank, (message, _) in enumerate(gathered) if message is not None]
        if errors:
            rank, message = errors[0]
            everywhere = len(errors) == self.world_size and len({m for _, m in errors}) == 1
            failed = RankFailed(message if everywhere else f"rank {rank}: {message}")
            if self.is_main and self.announce:  # at once: torchrun stops every rank as soon as one exits with an error
                global _error_said
                print(f"fasteval: error: {describe_error(failed)}", file=sys.stderr, flush=True)
                _error_said = True
            raise failed
        return [p for _, p in gathered]

    def step(self, fn, *args, **kwargs):
        try:
            value = fn(*args, **kwargs)
        except (RankFailed, CommunicationFailed):
            raise  # every rank knows already
        except Exception as exc:
            if self.debug:
                traceback.print_exc()
            try:
                self.exchange(error=describe_error(exc))
            except CommunicationFailed:
                exc.fasteval_report = True  # rank 0 may never hear of it: this rank says it
                raise exc from None
            raise AssertionError("unreachable: an exchange carrying an error raises")  # pragma: no cover
        self.exchange()
        return value

    def died(self, wait_s: float = 0.0) -> RankDied | None:
        """A rank of this machine whose process has ended, found within ``wait_s`` seconds, named with its
        signal or exit code where that can still be read (before torchrun reaps it); a rank gone already
        ended first (torchrun reaps a rank before it stops the others), though not always by a signal (a
        rank that timed out exits 2). None if every one runs: the run stopped for another reason (a
        timeout, the user's SIGTERM, a rank elsewhere)."""
        from fasteval.procs import process_end

        if not self.places:
            return None
        host = self.places[self.rank][0]
        others = [(rank, pid) for rank, (name, pid) in enumerate(self.places) if name == host and rank != self.rank]
        deadline = time.monotonic() + wait_s
        while True:
            ended = [(rank, pid, how) for rank, pid in others if (how := process_end(pid)) is not None]
            if ended or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if not ended:
            return None
        # Not one that torchrun stopped; a signal first (the rank that was killed), then one gone already.
        first = [e for e in ended if e[2] not in _STOPPED] or ended
        rank, pid, how = min(first, key=lambda e: (not e[2].startswith("signal"), e[2] != "", e[0]))
        if how.startswith("signal"):
            what = f"died ({how}; pid {pid})"
        else:
            code = how or "its exit code in torchrun's summary"
            what = f"ended first, without a word ({code}; pid {pid})"
        died = RankDied(f"rank {rank} {what}: the run stopped without a result")
        # A rank killed by a signal said nothing: where every rank before this one ended, this one says it.
        died.fasteval_report = how.startswith("signal") and all(r in {e[0] for e in ended} for r in range(self.rank))
        return died

    def bounds(self, num_samples: int) -> tuple[int, int]:
        return shard_bounds(num_samples, self.rank, self.world_size)

    def shard(self, samples: SampleList) -> SampleList:
        return samples.subset(list(range(*self.bounds(len(samples)))))

    def scope(self, samples: SampleList) -> WholeRun:
        return RankScope(self, len(samples))

    def check_same_data(self, samples: SampleList) -> None:
        """Rank 0's digest against each rank's; a differing rank raises, naming its first differing file."""
        mine = (samples.classes, dataset_entries(samples))
        digest = hashlib.sha256(repr(mine).encode()).hexdigest()
        digests = self.exchange(digest)
        if len(set(digests)) == 1:
            return
        theirs = self.exchange(mine if self.is_main else None)[0]  # only on a mismatch: rank 0's whole list
        if digest != digests[0]:
            raise FastevalError(f"this rank sees a different dataset under {printable(samples.root)} from rank 0's: "
                                f"{first_difference(mine, theirs)}; every rank must see the same files")

    def share_random_init(self, model) -> None:
        state = self.exchange(model.state_dict() if self.is_main else None)[0]
        if not self.is_main:
            model.load_state_dict(state)

    def check_same_model(self, model) -> None:
        """A digest of every state entry (name, dtype, shape, bytes) against rank 0's."""
        digest = state_digest(model)
        digests = self.exchange(digest)
        if digest != digests[0]:
            raise FastevalError("this rank holds other model weights than rank 0: every rank must evaluate the same "
                                "model (load the same checkpoint, or seed the initialisation)")

    def gather(self, result: EvalResult, samples: SampleList, batch_size: int) -> EvalResult:
        """Every rank's per-sample tensors (EvalResult's PER_SAMPLE_FIELDS, whichever it holds) by a padded
        all_gather, in rank order = sample order; counts and loss sum recomputed from them in sample order."""
        import torch
        import torch.distributed as dist

        from fasteval.evaluation.metrics import totals_from_samples

        mine = result.per_sample()
        info = self.exchange({"count": result.samples, "fields": {k: (v.dtype, tuple(v.shape[1:]))
                                                                  for k, v in mine.items()},
                              "extra": result.extra, "seconds": result.seconds, "warmup": result.warmup_seconds})
        counts = [i["count"] for i in info]
        if sum(counts) != len(samples):
            raise RuntimeError(f"the ranks evaluated {counts} samples, {sum(counts)} in all, of {len(samples)}")
        layout = next(i["fields"] for i in info if i["count"])
        if any(i["fields"] != layout for i in info if i["count"]):
            raise RuntimeError(f"the ranks' per-sample outputs differ: {[i['fields'] for i in info]}")
        longest = max(counts)
        fields = {}
        for name, (dtype, tail) in layout.items():
            local = mine.get(name, torch.empty((0, *tail), dtype=dtype))
            wire = local.to(torch.uint8) if dtype == torch.bool else local  # gloo moves no bool
            padded = torch.zeros((longest, *tail), dtype=wire.dtype, device=self.comm_device)
            padded[:len(wire)] = wire.to(self.comm_device)
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            try:
                dist.all_gather(parts, padded)
            except Exception as exc:
                raise CommunicationFailed(f"rank {self.rank}: gathering {name} failed: {_short(exc)}") from None
            fields[name] = torch.cat([p[:n] for p, n in zip(parts, counts)]).cpu().to(dtype)
        totals = totals_from_samples(torch.tensor(samples.labels, dtype=torch.int64), fields["predictions"],
                                     fields["topk_hits"], fields["losses"], batch_size)
        seconds = [i["seconds"] for i in info]
        extra = merge_extra([i["extra"] for i in info], counts)
        extra["distributed"] = {
            "world_size": self.world_size, "backend": self.backend, "samples_per_rank": counts,
            "seconds_per_rank": seconds,
            "images_per_sec_per_rank": [n / s if s > 0 else None for n, s in zip(counts, seconds)],
        }
        return replace(result, **totals, **fields, seconds=max(seconds),
                       warmup_seconds=max(i["warmup"] for i in info), extra=extra)

    def bench_summary(self, bench: dict) -> dict:
        """Each rank's loop images/s (its median run) and the job's: every sample over the slowest rank's
        loop seconds (the ranks run at once; their starts are not synchronised, so this is approximate)."""
        mine = {path: (bench[path]["samples"], bench[path]["seconds"]) for path in ("reference", "fast")}
        ranks = self.exchange(mine)
        summary = {"world_size": self.world_size, "backend": self.backend,
                   "samples_per_rank": [r["fast"][0] for r in ranks]}
        for path in ("reference", "fast"):
            runs = [r[path] for r in ranks]
            slowest = max(seconds for _, seconds in runs)
            summary[path] = {"images_per_sec_per_rank": [n / s if s > 0 else None for n, s in runs],
                             "images_per_sec_total": sum(n for n, _ in runs) / slowest if slowest > 0 else None}
        return {"distributed": summary}


def format_ranks_bench(bench: dict) -> str:
    """The lines ``fasteval bench`` adds under torchrun (nothing for one process)."""
    d = bench.get("distributed")
    if not d:
        return ""

    def rates(values):
        return " ".join("-" if v is None else f"{v:,.1f}" for v in values)

    lines = [f"torchrun: {d['world_size']} ranks ({d['backend']}), samples per rank "
             f"{' '.join(str(n) for n in d['samples_per_rank'])}; the table above is rank 0's shard",
             "time to result: not measured under torchrun"]
    for path in ("reference", "fast"):
        total = d[path]["images_per_sec_total"]
        lines.append(f"{path} loop images/s: per rank {rates(d[path]['images_per_sec_per_rank'])}; total "
                     f"{'-' if total is None else f'{total:,.1f}'} (every sample / the slowest rank's seconds)")
    return "\n" + "\n".join(lines)


class RankScope:
    """A ``WholeRun`` (fasteval/evaluation/exact.py) for one rank's shard. The fast evaluator's whole-run decisions from one rank's shard: the small-dataset rule on the whole
    size, the one-process calibration samples (each evaluated by the rank that holds it), and the largest
    logit error over every rank (so tau, and which samples count as near-ties, is the one-process one)."""

    sharded = True

    def __init__(self, ranks: TorchrunRanks, total_samples: int) -> None:
        self.ranks, self.total_samples = ranks, total_samples

    def total(self, local: int) -> int:
        return self.total_samples

    def calibration(self, main: list[int]) -> tuple[list[int], int]:
        positions, whole = calibration_share(self.ranks.exchange(len(main)), self.ranks.rank)
        return [main[p] for p in positions], whole

    def max_error(self, error: float) -> float:
        return max(self.ranks.exchange(error))


def merge_extra(extras: list[dict], counts: list[int]) -> dict:
    """One run's ``extra`` from every rank's: counts summed, the recheck's reports merged, the rest
    (loader, precision, compile...) from the first rank that evaluated samples."""
    from fasteval.evaluation.exact import merge_reports

    base = dict(next((e for e, n in zip(extras, counts) if n), extras[0]))
    for key in _SUMMED_EXTRA:
        if key in base:
            base[key] = sum(e.get(key, 0) for e in extras)
    if "plan" in base:  # the plan's per-rank count: the whole run's is the sum over the ranks
        by_reference = dict(base["plan"]["by_reference"], value=sum(e["plan"]["by_reference"]["value"]
                                                                     for e in extras if "plan" in e))
        base["plan"] = {**base["plan"], "by_reference": by_reference}
    if "exact" in base:
        base["exact"] = merge_reports([e["exact"] for e in extras])
    return base


_groups_made = 0  # process groups this process has made: each rendezvous under a key prefix of its own


def _init_group(backend: str, launch: Launch, timeout: timedelta, options: dict) -> None:
    """torch.distributed's default group from torchrun's store, under a key prefix of its own: a group made
    again in the same processes (a second ``fasteval.evaluate`` after the first removed its group, or after the
    script removed its own) would otherwise read the previous group's addresses from the store and fail to
    connect, now and then."""
    import torch.distributed as dist

    global _groups_made
    _groups_made += 1
    store, _, _ = next(dist.rendezvous("env://", rank=launch.rank, world_size=launch.world_size, timeout=timeout))
    dist.init_process_group(backend, store=dist.PrefixStore(f"fasteval/{_groups_made}", store), rank=launch.rank,
                            world_size=launch.world_size, timeout=timeout, **options)


@contextmanager
def start_ranks(device: str, *, debug: bool = False, environ: Mapping[str, str] = os.environ,
                announce: bool = True) -> Iterator[Ranks]:
    """This process's place in the run: ``Ranks()`` without torchrun; under torchrun, a process group
    (NCCL on ``cuda:LOCAL_RANK``, else gloo) joined with a timeout and destroyed on the way out."""
    launch = detect_launch(environ)
    if launch is None:
        yield Ranks()
        return
    import torch
    import torch.distributed as dist

    name = rank_device(device, launch)
    backend = "nccl" if name.startswith("cuda") else "gloo"
    timeout = timedelta(seconds=timeout_seconds(environ))
    options = {}
    if backend == "nccl":
        torch.cuda.set_device(torch.device(name))
        options["device_id"] = torch.device(name)

    def cannot_join(exc: Exception) -> FastevalError:
        return FastevalError(f"rank {launch.rank}: cannot join the torchrun process group ({backend}): "
                             f"{first_line(exc)[:300]}")

    try:
        _init_group(backend, launch, timeout, options)
    except Exception as exc:
        raise cannot_join(exc) from None
    try:
        try:  # every rank's (host, pid): which process is which rank, if one dies
            places: list = [None] * launch.world_size
            dist.all_gather_object(places, (socket.gethostname(), os.getpid()))
        except Exception as exc:
            raise cannot_join(exc) from None
        ranks = TorchrunRanks(launch, backend, name, debug, places, announce)
        try:
            yield ranks
        except (Terminated, CommunicationFailed) as exc:
            # torchrun stops every rank with SIGTERM once one has ended, and a collective breaks when a rank
            # ends: where a rank of this machine did, that is the news (else the user's SIGTERM, a timeout).
            died = ranks.died(wait_s=DEATH_WAIT_S if isinstance(exc, CommunicationFailed) else 0.0)
            if died is None:
                raise
            raise died from None
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass


@contextmanager
def library_ranks(device: str, *, environ: Mapping[str, str] = os.environ) -> Iterator[Ranks]:
    """This process's place in a run called from Python (``fasteval.evaluate``): where the caller's script
    has initialised torch.distributed already (a torchrun job's usual first lines), that process group,
    left as it was on the way out; else as ``start_ranks`` (a group of its own under torchrun, made and
    destroyed here; one process without it)."""
    launch = detect_launch(environ)
    if launch is None or launch.world_size == 1:
        yield Ranks()
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        with start_ranks(device, environ=environ, announce=False) as ranks:
            yield ranks
        return
    if dist.get_rank() != launch.rank or dist.get_world_size() != launch.world_size:
        raise FastevalError(f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                            f"is not torchrun's (RANK {launch.rank}, WORLD_SIZE {launch.world_size})")
    name = rank_device(device, launch)
    backend = dist.get_backend()
    if backend == "nccl" and not name.startswith("cuda"):
        raise FastevalError(f"device={device!r}: the process group is NCCL's, which moves CUDA tensors only; "
                            f"evaluate on the GPU (device='cuda') or initialise the group with gloo")
    if backend == "nccl":  # NCCL's object gather runs on the current device: this rank's, as start_ranks sets it
        import torch

        torch.cuda.set_device(torch.device(name))
    places: list = [None] * launch.world_size
    dist.all_gather_object(places, (socket.gethostname(), os.getpid()))
    yield TorchrunRanks(launch, backend, name, places=places, announce=False)


def reports_error(exc: BaseException, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process prints ``exc``: one process always; under torchrun rank 0 (every rank has
    the failing rank's line), or a failing rank that could not tell rank 0."""
    if _error_said:
        return False  # the run's error was printed: torchrun's SIGTERM that may follow is no news
    if getattr(exc, "fasteval_report", False):
        return True
    return environ.get("RANK", "0") == "0"
