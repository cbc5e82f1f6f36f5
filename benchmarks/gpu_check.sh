#!/usr/bin/env bash
# GPU check: run on a CUDA machine with no network, from the repository root or anywhere.
#   bash benchmarks/gpu_check.sh OUT_DIR
# Installs the working tree without dependencies (the GPU machines have torch, torchvision,
# triton, pytest and pytest-benchmark, maybe not DALI), runs every test that can use the GPU,
# benchmarks the fused kernel, then `fasteval bench` on 2,000 generated ImageNet-like JPEGs with
# every loader that can run. Writes logs, JSON and summary.json into OUT_DIR (rewritten after every
# step, so a run cut short still leaves one), and prints which paths ran (DALI or not, the Triton
# kernel or its PyTorch twin), naming every path it could not run. GPU_CHECK_BUDGET (seconds, default
# 540: a device session's 10-minute command less its start) bounds the whole run: every command is cut
# at its end, and a step that needs more than is left is skipped, and said so. OUT_DIR must be new or empty. GPU_CHECK_CLASSES/GPU_CHECK_PER_CLASS size the dataset
# (a dry run of the plumbing on a CPU machine shrinks it). GPU_CHECK_STEPS picks the steps (default
# "cuda kernel bench precision": the tests, the kernel, the loop and the whole command against the
# reference; also "sweep" (3 checkpoints on one decoded set), "distributed" (`fasteval bench` and `eval`
# under torchrun on every local GPU against one GPU where nvidia-smi -L lists several, skipped with
# the reason where there is one), "train" and "device" (the kernel's device-parametrised edge cases);
# "precision": the fast path's own whole command, bf16 and fp32, with their exact recheck, against the reference's),
# GPU_CHECK_REPEATS the bench repeats (default 1: each cold command compiles from nothing).
# Works on Python 3.10 (no `python -P`).
set -uo pipefail
OUT_DIR="$(mkdir -p "${1:?usage: benchmarks/gpu_check.sh OUT_DIR}" && cd "$1" && pwd)"
if [ -n "$(ls -A "$OUT_DIR")" ]; then  # an earlier run's files would be read as this one's
    echo "gpu_check: OUT_DIR $OUT_DIR is not empty; give a new or empty folder" >&2
    exit 2
fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
LOG="$OUT_DIR/gpu_check.log"
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$LOG"; }
START=$(date +%s)
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK" ${SITE:+"$SITE"}' EXIT  # generated data, checkpoints, a hand-made site; results are in OUT_DIR
export FASTEVAL_CACHE="$WORK/cache"
# Python runs from an empty folder, so that the source folder (whose fasteval/ has no kernels/)
# is never imported in place of the installed package: what `python -P` does on 3.11+.
# `py ARGS...` runs Python there.
py() { (cd "$WORK" && "$PY" "$@"); }
# `left`: the seconds left of GPU_CHECK_BUDGET.
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# `tpy SECONDS ARGS...` is `py ARGS...` under a time limit, cut to what is left of GPU_CHECK_BUDGET.
tpy() {
    local limit=$1; shift
    local left; left=$(left)
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -lt 1 ] && { log "cut: no time left of GPU_CHECK_BUDGET for: $*"; return 124; }
    (cd "$WORK" && timeout "$limit" "$PY" "$@")
}
PYTEST=(-m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" -p no:cacheprovider)
STEPS=" ${GPU_CHECK_STEPS:-cuda kernel bench precision} "
BUDGET="${GPU_CHECK_BUDGET:-540}"
# `step NAME SECONDS [WHAT]`: NAME was asked for and what is left of the budget holds SECONDS, the time
# the step (or WHAT of it) needs to be worth starting; else it is skipped, and listed. Its commands are
# cut at the budget's end anyway (tpy). `finished NAME` records a step that ran (whatever its outcome).
step() {
    [[ "$STEPS" == *" $1 "* ]] || return 1
    local left; left=$(left)
    if [ "$left" -lt "$2" ]; then
        log "SKIPPED: ${3:-step $1} (needs about $2 s; $left s left of GPU_CHECK_BUDGET=$BUDGET)"
        echo "${3:-$1} (needs about $2 s; $left s left of the budget)" >> "$OUT_DIR/skipped.txt"
        return 1
    fi
}
finished() { echo "$1" >> "$OUT_DIR/done.txt"; }
# Tests in 4 processes where pytest-xdist is installed (the GPU has room; the host has the cores).
XDIST=()
if py -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi

nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"

# 1. Install without dependencies; where pip cannot, lay the package out by hand
#    (kernels/ becomes fasteval/kernels, as the wheel installs it).
if py -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" > "$OUT_DIR/install.log" 2>&1; then
    log "installed with pip (editable, no deps)"
else
    SITE="$(mktemp -d)"
    cp -r fasteval "$SITE/fasteval" && cp -r kernels "$SITE/fasteval/kernels"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    log "pip install failed (see install.log); using a copy on PYTHONPATH=$SITE"
fi
py - > "$OUT_DIR/environment.json" <<'PY'
import json, torch
from fasteval.output.report import environment
from fasteval.data.loader_dali import dali_available
env = environment("cuda" if torch.cuda.is_available() else "cpu")
env["dali_importable"] = dali_available()
print(json.dumps(env, indent=2))
PY
DALI=$(py -c "from fasteval.data.loader_dali import dali_available; print(int(dali_available()))" 2>/dev/null || echo 0)
log "DALI importable: $DALI"
# The summary of what has run so far, rewritten (atomically) after every step: a run cut short keeps one.
summarise() {
    py - "$OUT_DIR" "$DALI" "$(( $(date +%s) - START ))" "$STEPS" > "$OUT_DIR/summary.json.tmp" <<'PY' \
        && mv "$OUT_DIR/summary.json.tmp" "$OUT_DIR/summary.json"
import csv, json, os, re, sys
out, dali, seconds, steps = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4].split()


def read(name):
    path = os.path.join(out, name)
    return open(path).read() if os.path.exists(path) else ""


def outcomes(log):
    """Outcome counts of the `-rA` summary lines, per path named in the test ids."""
    counts = {}
    for outcome, times, test in re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (?:\[(\d+)\] )?(\S+)",
                                           log, re.M):
        params = set(re.split(r"[\[\]-]", test))  # the parameter ids, e.g. [dtype0-triton]
        paths = [p for p in ("triton", "torch", "dali", "decode_jpeg", "torchvision") if p in params] or ["other"]
        for p in paths:
            counts.setdefault(p, {}).setdefault(outcome.lower(), 0)
            counts[p][outcome.lower()] += int(times or 1)
    return counts


def lines(name):
    path = os.path.join(out, name)
    return open(path).read().splitlines() if os.path.exists(path) else []


skipped = lines("skipped.txt")
skipped_names = {line.split()[0] for line in skipped}
ran = [s for s in lines("done.txt") if s not in skipped_names]  # finished, whatever their outcome
pending = [s for s in steps if s not in ran and s not in skipped_names]  # not reached (yet, or ever)
summary = {"seconds": seconds, "steps": steps, "ran": ran, "pending": pending, "environment": json.load(open(os.path.join(out, "environment.json"))),
           "not_run": [] if dali else ["dali loader (DALI not installed)"]}
probe = read("triton_probe.txt").strip().splitlines()
summary["triton_probe"] = probe[-1] if probe else "no output"
for name in ("cuda_tests", "device_tests"):
    log = read(f"{name}.log").strip()
    summary[name] = log.splitlines()[-1] if log else "no output"
    summary[f"{name}_by_path"] = outcomes(log)
try:
    kb = json.load(open(os.path.join(out, "kernel_bench.json")))
    summary["kernel_median_us"] = {b["name"]: round(b["stats"]["median"] * 1e6, 2) for b in kb["benchmarks"]}
except Exception as exc:
    if "kernel" in ran:
        summary["not_run"].append(f"kernel benchmark ({exc})")
paths = []
for name in sorted(os.listdir(out)):
    m = re.fullmatch(r"bench_(\w+)\.json", name)
    if not m:
        continue
    b = json.load(open(os.path.join(out, name)))
    fast = b["fast"]
    summary[f"bench_{m.group(1)}"] = {
        "speedup": b["speedup"], "agreement": b["agreement"],
        "reference_images_per_sec": b["reference"]["images_per_sec"],
        "fast_images_per_sec": fast["images_per_sec"], "loader": fast["loader"],
        "metrics_backend": fast.get("metrics_backend"), "precision": fast["precision"], "compile": fast["compile"],
        "warmup_seconds": fast["warmup_seconds"], "stages": b["stages"], "verdict": b["verdict"],
        # The exact-count recheck runs after the main pass, inside the fast run's seconds.
        "exact_recheck": {k: fast.get("exact", {}).get(k) for k in
                          ("rechecked", "gated", "tau", "max_logit_error", "changed_top1", "seconds")},
        "exact_recheck_share_of_run": (fast.get("exact", {}).get("seconds") or 0) / fast["seconds"],
    }
    ttr = b.get("time_to_result")
    if ttr:  # the whole commands, the issue's measure: wall seconds, fast over reference, the default's route
        summary[f"bench_{m.group(1)}"]["time_to_result"] = {
            "ratio_cold": ttr.get("ratio_cold"), "ratio_warm": ttr.get("ratio_warm"),
            **{f"{path}_{when}_seconds": ttr[path][when]["wall_seconds"]
               for path in ("reference", "fast") for when in ("cold", "warm")},
            "fast_route_cold": ttr["fast"]["cold"].get("route"), "fast_route_warm": ttr["fast"]["warm"].get("route")}
    by_reference = lambda run: " (all by the reference's code)" if (ttr["fast"][run].get("route") or "").startswith(
        "every sample") else ""
    whole = (f", whole command {ttr['ratio_cold']:.2f}x cold{by_reference('cold')} / {ttr['ratio_warm']:.2f}x "
             f"warm{by_reference('warm')} the reference's" if ttr else "")
    paths.append(f"--loader {m.group(1)}: loader {fast['loader']}, metrics {fast.get('metrics_backend')}, "
                 f"{fast['precision']}, compile {fast['compile']}, loop {b['speedup']:.2f}x{whole}")
for loader in (["dali"] if dali else []) + ["torchvision"]:
    if "bench" in ran and f"bench_{loader}" not in summary and f"bench-{loader}" not in skipped_names:
        summary["not_run"].append(f"bench --loader {loader} (failed: see bench_{loader}.txt)")
summary["paths"] = paths
try:
    sw = json.load(open(os.path.join(out, "sweep.json")))
    summary["sweep"] = {"samples": sw["samples"], "decoded": sw["decoded"], "setup_seconds": sw["setup_seconds"],
                        "images_per_sec": [c["images_per_sec"] for c in sw["checkpoints"]],
                        "loader": sw["checkpoints"][0]["loader"], "precision": sw["checkpoints"][0]["precision"],
                        "compile": sw["checkpoints"][0]["compile"]}
except Exception as exc:
    if "sweep" in ran:
        summary["not_run"].append(f"sweep ({exc})")
ranks = sorted(int(m.group(1)) for m in (re.fullmatch(r"ranks(\d+)_bench\.json", n) for n in os.listdir(out)) if m)
if ranks:
    dist = {}
    for n in ranks:
        b = json.load(open(os.path.join(out, f"ranks{n}_bench.json")))["distributed"]
        dist[f"ranks_{n}"] = {"samples_per_rank": b["samples_per_rank"],
                              "fast_images_per_sec_total": b["fast"]["images_per_sec_total"],
                              "fast_images_per_sec_per_rank": b["fast"]["images_per_sec_per_rank"],
                              "reference_images_per_sec_total": b["reference"]["images_per_sec_total"]}
    evals = {}
    for n in ranks:
        try:
            e = json.load(open(os.path.join(out, f"ranks{n}_eval.json")))
            evals[n] = {k: e[k] for k in ("samples", "correct_top1", "correct_top5", "loss_sum")}
        except Exception as exc:
            summary["not_run"].append(f"eval under torchrun on {n} GPU(s) ({exc})")
    if len(evals) == 2:
        one, many = evals[ranks[0]], evals[ranks[-1]]
        dist["eval"] = {"one_gpu": one, "all_gpus": many,
                        "counts_equal": all(one[k] == many[k] for k in ("samples", "correct_top1", "correct_top5")),
                        # equal to rounding only (docs/distributed.md): a sample's last bits can depend on its batch
                        "loss_sum_relative_difference": abs(one["loss_sum"] - many["loss_sum"])
                        / max(abs(one["loss_sum"]), 1e-12),
                        "predictions_equal": [r[:3] for r in csv.reader(open(os.path.join(out, f"ranks{ranks[0]}_eval.csv")))]
                        == [r[:3] for r in csv.reader(open(os.path.join(out, f"ranks{ranks[-1]}_eval.csv")))]}
    summary["distributed"] = dist
precision = {}
for run in ("bf16", "fp32", "reference"):
    try:
        r = json.load(open(os.path.join(out, f"precision_{run}.json")))
    except Exception:
        continue
    ex = r.get("exact") or {}
    wall = read(f"precision_{run}.wall").strip()
    precision[run] = {"correct_top1": r["correct_top1"], "seconds": r["seconds"], "route": r.get("route"),
                      "whole_command_seconds": float(wall) if wall else None,
                      "compile": r.get("compile"), "rechecked": ex.get("rechecked"), "gated": ex.get("gated"),
                      "tau": ex.get("tau")}
if precision:
    summary["precision"] = precision
try:
    summary["train"] = json.load(open(os.path.join(out, "train.json")))
except Exception as exc:
    if os.path.exists(os.path.join(out, "train.txt")):
        summary["not_run"].append(f"train ({exc}; see train.txt)")
summary["skipped_steps"] = skipped
print(json.dumps(summary, indent=2))
PY
}

# The Triton kernel on the GPU, once, outside pytest: whether it builds and launches here.
py - > "$OUT_DIR/triton_probe.txt" 2>&1 <<'PY'
import torch
from fasteval.kernels.fused_metrics import metrics_torch, metrics_triton
x = torch.randn(33, 1000, device="cuda")
y = torch.randint(0, 1000, (33,), device="cuda")
m, t = metrics_triton(x, y), metrics_torch(x, y)
assert torch.equal(m.pred, t.pred) and int(m.correct) == int(t.correct)
print("triton kernel: ran on", torch.cuda.get_device_name())
PY
log "$(tail -1 "$OUT_DIR/triton_probe.txt")"

# 2. Every test that can use the GPU: those marked `cuda`, and every test of a file that picks its
#    device with torch.cuda.is_available() (the kernel's device-parametrised edge cases).
GPU_FILES=$(grep -l "torch.cuda.is_available()" tests/test_*.py | tr '\n' ' ')
if step cuda 150; then
    tpy 150 "${PYTEST[@]}" "$REPO/tests" -m cuda -q -rA "${XDIST[@]}" > "$OUT_DIR/cuda_tests.log" 2>&1
    log "cuda-marked tests exit code $? ($(tail -1 "$OUT_DIR/cuda_tests.log"))"
    finished cuda
fi
# The kernel's edge cases on the GPU: each kernel variant is a Triton compile (over 150 s in all on an
# H200 machine's 16 cores, 2026-11-28), so this step is left out of the default list.
if step device 300; then
    log "device-parametrised test files: $GPU_FILES"
    # shellcheck disable=SC2046
    tpy 300 "${PYTEST[@]}" $(for f in $GPU_FILES; do echo "$REPO/$f"; done) -m "not cuda" -q -rA "${XDIST[@]}" \
        > "$OUT_DIR/device_tests.log" 2>&1
    log "device-parametrised tests exit code $? ($(tail -1 "$OUT_DIR/device_tests.log"))"
    finished device
fi

summarise
# 3. The fused kernel against eager and compiled PyTorch (B=256 C=1000 and B=1024 C=21843).
if step kernel 90; then
    tpy 90 "${PYTEST[@]}" "$REPO/benchmarks/bench_kernel.py" -m cuda -k "B256-C1000 or B1024-C21843" -q \
        --benchmark-only --benchmark-group-by=group --benchmark-columns=median,ops \
        --benchmark-json "$OUT_DIR/kernel_bench.json" > "$OUT_DIR/kernel_bench.txt" 2>&1
    log "kernel benchmark exit code $?"
    finished kernel
fi

summarise
# 4. fasteval bench on 2,000 ImageNet-like JPEGs with every loader that can run here (the size of the
#    H200 run of 2026-11-28: about 2.5 minutes a loader there, a cold compile included).
DATA="$WORK/imagenet_like"
synth_once() {
    [ -d "$DATA" ] && return
    tpy 120 -m fasteval synth "$DATA" --classes "${GPU_CHECK_CLASSES:-50}" --per-class "${GPU_CHECK_PER_CLASS:-40}" \
        > "$OUT_DIR/synth.log" 2>&1
    log "synth: $(tail -1 "$OUT_DIR/synth.log")"
}
if step bench 180; then
    synth_once
    # The reference's DataLoader keeps about 2 float32 batches per worker in /dev/shm (154 MB per batch
    # of 256 at 224x224): 16 workers need about 5 GB. Use no more workers than /dev/shm holds.
    WORKERS=$(( $(nproc) < 16 ? $(nproc) : 16 ))
    SHM_MB=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
    if [ -n "$SHM_MB" ]; then
        FIT=$(( SHM_MB * 10 / 12 / (2 * 154) ))
        if [ "$FIT" -lt "$WORKERS" ]; then
            log "/dev/shm has $SHM_MB MB free: --workers $FIT instead of $WORKERS (the reference's batches live there)"
            WORKERS=$FIT
        fi
    fi
    LOADERS="torchvision"
    if [ "$DALI" = "1" ]; then LOADERS="dali torchvision"; else log "SKIPPED: --loader dali (DALI is not installed here)"; fi
    for loader in $LOADERS; do
        [ "$loader" = torchvision ] || step bench 360 "bench-$loader" || continue  # a second loader only where both fit
        tpy 180 -m fasteval bench "$DATA" --loader "$loader" --batch-size 256 --workers "$WORKERS" \
            --repeats "${GPU_CHECK_REPEATS:-1}" --no-progress --json "$OUT_DIR/bench_$loader.json" > "$OUT_DIR/bench_$loader.txt" 2>&1
        log "bench --loader $loader exit code $?"
    done
    finished bench
fi

summarise
# 4b. A checkpoint sweep: 3 ResNet-18 checkpoints on one decoded set (GPU_CHECK_SWEEP_COPIES x 1,000
#     256x256 JPEGs, default 10,000; GPU_CHECK_SWEEP_PER_CLASS shrinks the 1,000 for a dry run: copies of one generated set, so the decoding work is real), batch 256,
#     bf16, compiled once, --exact off so that the passes time the model. Reports images/s per checkpoint;
#     the 2nd and 3rd read the decoded set from the GPU's memory (target: > 20,000 images/s on an H100-class GPU).
if step sweep 240; then
    SWEEP="$WORK/sweep"
    COPIES="${GPU_CHECK_SWEEP_COPIES:-10}"
    tpy 120 -m fasteval synth "$SWEEP/base" --classes 10 --per-class "${GPU_CHECK_SWEEP_PER_CLASS:-100}" --size 256x256 \
        > "$OUT_DIR/sweep_synth.log" 2>&1
    mkdir -p "$SWEEP/data"
    for c in $(seq 1 "$COPIES"); do
        for d in "$SWEEP"/base/*/; do cp -r "$d" "$SWEEP/data/$(basename "$d")_$c"; done
    done
    tpy 60 - "$SWEEP" "$(( COPIES * 10 ))" <<'PY'
import sys, torch, torchvision
for seed in (1, 2, 3):
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18(num_classes=int(sys.argv[2])).state_dict(), f"{sys.argv[1]}/ckpt{seed}.pt")
PY
    tpy 240 -m fasteval eval "$SWEEP/data" --weights "$SWEEP"/ckpt1.pt "$SWEEP"/ckpt2.pt "$SWEEP"/ckpt3.pt \
        --batch-size 256 --workers "$(( $(nproc) < 16 ? $(nproc) : 16 ))" --compile on --exact off --no-progress \
        --json "$OUT_DIR/sweep.json" > "$OUT_DIR/sweep.txt" 2>&1
    log "sweep exit code $?"
    py - "$OUT_DIR/sweep.json" <<'PY' | tee -a "$LOG"
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except Exception as exc:
    print(f"sweep: no result ({exc})")
    raise SystemExit(0)
rates = [round(c["images_per_sec"]) for c in s["checkpoints"]]
print(f"sweep: {s['samples']} samples, decoded {s['decoded']['placement']} ({s['decoded']['reason']}), loader "
      f"{s['checkpoints'][0]['loader']}, {s['checkpoints'][0]['precision']}, setup {s['setup_seconds']:.1f} s; "
      f"images/s per checkpoint {rates}; after the first: {min(rates[1:])} (target > 20000)")
PY
    finished sweep
fi

summarise
# 5. Under torchrun (NCCL, one rank per GPU): bench on 1 GPU against every local GPU, and eval on both, whose
#    counts must be equal (the JSON's `distributed` says how the samples were split).
if step distributed 300; then
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU " || true)
    if [ "${NGPU:-0}" -gt 1 ]; then
        synth_once
        # One seeded model for both runs (no --weights would be a random model per command).
        CKPT="$WORK/resnet18_seeded.pt"
        tpy 60 -c "import sys, torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.resnet18(
num_classes=int(sys.argv[2])).state_dict(), sys.argv[1])" "$CKPT" "${GPU_CHECK_CLASSES:-50}"
        for n in 1 "$NGPU"; do
            RUN=(-m torch.distributed.run --standalone --nproc-per-node "$n" -m fasteval)
            W=$(( $(nproc) / n > 8 ? 8 : ($(nproc) / n > 0 ? $(nproc) / n : 1) ))
            tpy 240 "${RUN[@]}" bench "$DATA" --weights "$CKPT" --batch-size 256 --workers "$W" --repeats 1 --no-progress \
                --json "$OUT_DIR/ranks${n}_bench.json" > "$OUT_DIR/ranks${n}_bench.txt" 2>&1
            log "torchrun --nproc-per-node $n fasteval bench exit code $?"
            tpy 180 "${RUN[@]}" eval "$DATA" --weights "$CKPT" --batch-size 256 --workers "$W" --no-progress \
                --json "$OUT_DIR/ranks${n}_eval.json" --predictions "$OUT_DIR/ranks${n}_eval.csv" \
                > "$OUT_DIR/ranks${n}_eval.txt" 2>&1
            log "torchrun --nproc-per-node $n fasteval eval exit code $?"
        done
    else
        log "SKIPPED: distributed (nvidia-smi -L lists ${NGPU:-0} GPU(s): one GPU against several needs at least 2)"
        echo "distributed (nvidia-smi -L lists ${NGPU:-0} GPU(s); it needs at least 2)" >> "$OUT_DIR/skipped.txt"
    fi
    finished distributed
fi

# 5a. Precision against the exact recheck (step "precision"): the fast path's whole command with
#     --precision bf16 and fp32 (warm caches: each after one untimed run), and the reference's, on the
#     bench set with one seeded model. On a GPU whose loop is bound by decoding, fp32 may cost the
#     loop little while its smaller logit error gates fewer near-ties: this measures whether it does.
#     --compile off (what auto chooses for a set this small) also skips the route: the bench's default
#     command may send 2,000 images to the reference's code (route.py's GPU assumptions), and this is
#     where the fast path's own whole command is measured against the reference's.
summarise
if step precision 150; then
    synth_once
    CKPT="$WORK/resnet18_seeded.pt"
    [ -f "$CKPT" ] || tpy 60 -c "import sys, torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.resnet18(
num_classes=int(sys.argv[2])).state_dict(), sys.argv[1])" "$CKPT" "${GPU_CHECK_CLASSES:-50}"
    W=$(( $(nproc) < 16 ? $(nproc) : 16 ))
    for run in bf16 fp32 reference; do
        OPT=(--precision "$run" --compile off); [ "$run" = reference ] && OPT=(--reference)
        ARGS=(-m fasteval eval "$DATA" --weights "$CKPT" --batch-size 256 --workers "$W" --no-progress "${OPT[@]}")
        tpy 120 "${ARGS[@]}" > /dev/null 2>&1  # warm: the page cache, Triton's kernel cache, the meta facts
        T0=$(date +%s.%N)
        tpy 120 "${ARGS[@]}" --json "$OUT_DIR/precision_$run.json" > "$OUT_DIR/precision_$run.txt" 2>&1
        RC=$?
        py -c "print(round($(date +%s.%N) - $T0, 2))" > "$OUT_DIR/precision_$run.wall"
        log "eval --precision $run: exit code $RC, $(cat "$OUT_DIR/precision_$run.wall") s whole command"
    done
    py - "$OUT_DIR" <<'PY' | tee -a "$LOG"
import json, os, sys
for run in ("bf16", "fp32", "reference"):
    try:
        r = json.load(open(os.path.join(sys.argv[1], f"precision_{run}.json")))
    except Exception as exc:
        print(f"precision {run}: no result ({exc})")
        continue
    ex = r.get("exact") or {}
    print(f"precision {run}: top-1 {r['correct_top1']}, route {str(r.get('route'))[:60]}, compile {r.get('compile')}, "
          f"rechecked {ex.get('rechecked')} (gated {ex.get('gated')}, tau {ex.get('tau')}), run {r['seconds']:.2f} s")
PY
    finished precision
fi

summarise
# 5b. `fasteval train` end to end on the GPU: 3 short epochs (its no-sync batch loop test is a `cuda` test).
if step train 240; then
    tpy 60 -m fasteval synth "$WORK/tr" --classes 10 --per-class 64 --size 100x100 > /dev/null 2>&1
    tpy 60 -m fasteval synth "$WORK/va" --classes 10 --per-class 20 --size 100x100 --seed 1 > /dev/null 2>&1
    START_TRAIN=$(date +%s)
    tpy 240 -m fasteval train "$WORK/tr" "$WORK/va" --out "$WORK/run" --epochs 3 --device cuda --no-progress \
        --workers 8 --json "$OUT_DIR/train.json" > "$OUT_DIR/train.txt" 2>&1
    log "train exit code $? in $(( $(date +%s) - START_TRAIN )) s ($(tail -1 "$OUT_DIR/train.txt"))"
    finished train
fi

# 6. The summary, with the paths that ran.
summarise
py - "$OUT_DIR/summary.json" <<'PY' | tee -a "$LOG"
import json, sys
s = json.load(open(sys.argv[1]))
print("paths that ran:")
print(f"  DALI: {'installed' if s['environment'].get('dali_importable') else 'not installed (DALI paths not run)'}")
print(f"  Triton kernel probe: {s['triton_probe']}")
for name in ("cuda_tests", "device_tests"):
    print(f"  {name}: {s[name]}")
    for path, counts in sorted(s[f"{name}_by_path"].items()):
        print(f"    {path}: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}")
for line in s["paths"]:
    print(f"  bench {line}")
for name, run in s.get("distributed", {}).items():
    print(f"  torchrun {name}: {json.dumps(run)}")
for item in s["not_run"]:
    print(f"  NOT RUN: {item}")
for item in s.get("skipped_steps", []):
    print(f"  SKIPPED: {item}")
for item in s.get("pending", []):
    print(f"  NOT REACHED: {item}")
PY
log "done in $(( $(date +%s) - START )) s; summary in $OUT_DIR/summary.json"
