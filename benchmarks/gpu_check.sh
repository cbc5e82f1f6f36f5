#!/usr/bin/env bash
# GPU check: run on a CUDA machine with no network, from the repository root or anywhere.
#   bash benchmarks/gpu_check.sh OUT_DIR
# Installs the working tree without dependencies (the GPU machines have torch, torchvision, triton,
# pytest and pytest-benchmark, not DALI: see docs/gpu.md for bringing DALI along in parts), measures what
# decides the fast path's speed (benchmarks/gpu_measure.py: import and CUDA start, the decode ceiling, each
# loader cold and warm, decode and model alone and together, bf16 against fp32, the exact recheck's share,
# the whole command against the reference's at 10,000 images), runs every test that can use the GPU,
# benchmarks the fused kernel, then `fasteval bench` on 2,000 generated ImageNet-like JPEGs, and prints a
# short summary (stage rates, end-to-end images/s, the ratio to the reference) naming every path it could
# not run. OUT_DIR (new or empty) receives four files, rewritten after every step so that a run cut short
# keeps them: gpu_check.log, measure.json, summary.json and details.tar.gz (every other log and JSON; a
# device call brings back at most 8 files).
# GPU_CHECK_BUDGET (seconds, default 540: 9 minutes) bounds the whole run: every command is cut at its end,
# and a step that needs more than is left is skipped, and said so. GPU_CHECK_STEPS picks the steps (default
# "measure cuda": what decides, and every test that can use the GPU; also "kernel" (the fused kernel's
# benchmark), "bench" (`fasteval bench`'s stages per loader), "precision" (the fast path's own whole
# command, bf16 and fp32, with their exact recheck, against the reference's), "sweep" (3 checkpoints on
# one decoded set), "distributed"
# (`fasteval bench` and `eval` under torchrun on every local GPU against one GPU where nvidia-smi -L lists
# several), "train" and "device" (the kernel's device-parametrised edge cases)).
# GPU_CHECK_MEASURE_BUDGET (default 330) caps the measure step; GPU_CHECK_REPEATS the bench repeats
# (default 1). GPU_CHECK_DALI_PARTS (default REPO/.dali_parts): where benchmarks/dali_wheel.py's parts
# were carried; when its manifest is there, the wheels are joined, checked and installed into a folder
# put first on PYTHONPATH. A dry run of the plumbing on a machine without a GPU: GPU_CHECK_CPU_DRY_RUN=1
# (the measure step's --cpu-dry-run), GPU_CHECK_INSTALL=0 (use the fasteval already importable),
# GPU_CHECK_CLASSES/GPU_CHECK_PER_CLASS (the bench's dataset where the measure step made none).
# Exits 1 where a step's command failed (gpu_check.log's last line names them), else 0.
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
D="$WORK/details"  # every log and JSON but the four in OUT_DIR; packed into OUT_DIR/details.tar.gz
mkdir -p "$D"
# `pack`: OUT_DIR/details.tar.gz from the details folder, replaced whole (a run cut short keeps the last one).
pack() {
    tar -czf "$OUT_DIR/details.tar.gz.tmp" -C "$WORK" details 2>/dev/null \
        && mv "$OUT_DIR/details.tar.gz.tmp" "$OUT_DIR/details.tar.gz"
}
trap 'pack; rm -rf "$WORK" ${SITE:+"$SITE"}' EXIT  # generated data, checkpoints, a hand-made site
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
STEPS=" ${GPU_CHECK_STEPS:-measure cuda} "
BUDGET="${GPU_CHECK_BUDGET:-540}"
# `step NAME SECONDS [WHAT]`: NAME was asked for and what is left of the budget holds SECONDS, the time
# the step (or WHAT of it) needs to be worth starting; else it is skipped, and listed. Its commands are
# cut at the budget's end anyway (tpy). `finished NAME` records a step that ran (whatever its outcome).
step() {
    [[ "$STEPS" == *" $1 "* ]] || return 1
    local left; left=$(left)
    if [ "$left" -lt "$2" ]; then
        log "SKIPPED: ${3:-step $1} (needs about $2 s; $left s left of GPU_CHECK_BUDGET=$BUDGET)"
        echo "${3:-$1} (needs about $2 s; $left s left of the budget)" >> "$D/skipped.txt"
        return 1
    fi
}
finished() { echo "$1" >> "$D/done.txt"; }
# `outcome WHAT RC`: logs WHAT's exit code; a failed one is listed, and the script exits 1 at its end.
outcome() {
    log "$1 exit code $2"
    [ "$2" -eq 0 ] || echo "$1 (exit code $2)" >> "$D/failed.txt"
}
# Tests in 4 processes where pytest-xdist is installed (the GPU has room; the host has the cores).
XDIST=()
if py -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi

nvidia-smi > "$D/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"

# 0. DALI from the parts benchmarks/dali_wheel.py split (carried in back-to-back device calls, docs/gpu.md):
#    joined, checked against the manifest's hashes and installed into a folder first on PYTHONPATH.
PARTS="${GPU_CHECK_DALI_PARTS:-$REPO/.dali_parts}"
if [ -f "$PARTS/manifest.json" ]; then
    if "$PY" "$REPO/benchmarks/dali_wheel.py" join "$PARTS" "$WORK/dali_site" > "$D/dali_install.log" 2>&1; then
        export PYTHONPATH="$WORK/dali_site${PYTHONPATH:+:$PYTHONPATH}"
        log "DALI: installed from $PARTS into $WORK/dali_site (first on PYTHONPATH)"
    else
        log "DALI: not installed from $PARTS: $(tail -1 "$D/dali_install.log")"
    fi
fi

# 1. Install without dependencies; where pip cannot, lay the package out by hand
#    (kernels/ becomes fasteval/kernels, as the wheel installs it).
if [ "${GPU_CHECK_INSTALL:-1}" = 0 ]; then
    log "not installed (GPU_CHECK_INSTALL=0): the fasteval importable here"
elif py -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" > "$D/install.log" 2>&1; then
    log "installed with pip (editable, no deps)"
else
    SITE="$(mktemp -d)"
    cp -rL fasteval "$SITE/fasteval"  # -L: the fasteval/kernels link to kernels/ becomes the folder itself
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    log "pip install failed (see install.log); using a copy on PYTHONPATH=$SITE"
fi
# The environment, whether DALI imports, and the Triton kernel on the GPU once outside pytest (whether it
# builds and launches here), in one interpreter: each start imports torch.
py - "$D" <<'PY' 2>> "$D/triton_probe.txt"
import json, os, sys
import torch
from fasteval.output.report import environment
from fasteval.data.loader_dali import dali_available
out = sys.argv[1]
env = environment("cuda" if torch.cuda.is_available() else "cpu")
env["dali_importable"] = dali_available()
with open(os.path.join(out, "environment.json"), "w") as f:
    json.dump(env, f, indent=2)
with open(os.path.join(out, "triton_probe.txt"), "w") as f:
    from fasteval.kernels.fused_metrics import metrics_torch, metrics_triton
    x = torch.randn(33, 1000, device="cuda")
    y = torch.randint(0, 1000, (33,), device="cuda")
    m, t = metrics_triton(x, y), metrics_torch(x, y)
    assert torch.equal(m.pred, t.pred) and int(m.correct) == int(t.correct)
    print("triton kernel: ran on", torch.cuda.get_device_name(), file=f)
PY
DALI=$(py -c "import json, sys; print(int(json.load(open(sys.argv[1]))['dali_importable']))" "$D/environment.json" \
    2>/dev/null || echo 0)
log "DALI importable: $DALI"
log "$(tail -1 "$D/triton_probe.txt")"
# Loader workers: at most 16, and no more than /dev/shm holds the reference's batches for. Its DataLoader
# keeps about 2 float32 batches per worker there (154 MB per batch of 256 at 224x224): 16 workers need 5 GB.
WORKERS=$(( $(nproc) < 16 ? $(nproc) : 16 ))
SHM_MB=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
if [ -n "$SHM_MB" ]; then
    FIT=$(( SHM_MB * 10 / 12 / (2 * 154) ))
    [ "$FIT" -lt 1 ] && FIT=1
    if [ "$FIT" -lt "$WORKERS" ]; then
        log "/dev/shm has $SHM_MB MB free: --workers $FIT instead of $WORKERS (the reference's batches live there)"
        WORKERS=$FIT
    fi
fi
log "/dev/shm: ${SHM_MB:-unknown} MB free; --workers $WORKERS"

# The summary of what has run so far, rewritten (atomically) after every step: a run cut short keeps one.
summarise() {
    py - "$D" "$DALI" "$(( $(date +%s) - START ))" "$STEPS" "$OUT_DIR/measure.json" \
        > "$OUT_DIR/summary.json.tmp" <<'PY' \
        && mv "$OUT_DIR/summary.json.tmp" "$OUT_DIR/summary.json"
import csv, json, os, re, sys
out, dali, seconds, steps, measure = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4].split(), sys.argv[5]


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
try:
    environment = json.load(open(os.path.join(out, "environment.json")))
except Exception as exc:
    environment = {"error": f"no environment.json ({exc}): see triton_probe.txt"}
summary = {"seconds": seconds, "steps": steps, "ran": ran, "pending": pending, "environment": environment,
           "not_run": [] if dali else ["dali loader (DALI not installed)"]}
try:  # the figures that decide (benchmarks/gpu_measure.py), with its own summary lines
    m = json.load(open(measure))
    summary["measure"] = {"summary": m.get("summary"), "lines": m.get("summary_lines"), "elapsed_s": m.get("elapsed_s"),
                          "steps": {k: v.get("status") for k, v in m.get("steps", {}).items()}}
except Exception as exc:
    if "measure" in ran:
        summary["not_run"].append(f"measure (no measure.json: {exc})")
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
    pack
}

summarise
# 1b. What decides (benchmarks/gpu_measure.py): measure.json in OUT_DIR after each of its steps, the whole
#     commands' output in the details. Its data: 2,000 ImageNet-like JPEGs hard-linked up to 10,000; the
#     2,000 are the bench's data too.
MEASURE_DATA="$WORK/measure_data"
if step measure 120; then
    MB="${GPU_CHECK_MEASURE_BUDGET:-330}"
    [ "$(left)" -lt "$MB" ] && MB=$(left)
    DRY=(); [ "${GPU_CHECK_CPU_DRY_RUN:-0}" = 1 ] && DRY=(--cpu-dry-run)
    # The measure's own budget ends 10 s before its cut, so that it writes its summary.
    tpy "$MB" "$REPO/benchmarks/gpu_measure.py" "$OUT_DIR" --budget "$(( MB - 10 ))" --data "$MEASURE_DATA" \
        --logs "$D" --workers "$WORKERS" "${DRY[@]}" > "$D/measure.txt" 2>&1
    outcome measure $?
    log "measure done in $(( $(date +%s) - START )) s from the start"
    finished measure
fi

summarise
# 2. Every test that can use the GPU: those marked `cuda`, and every test of a file that picks its
#    device with torch.cuda.is_available() (the kernel's device-parametrised edge cases).
GPU_FILES=$(grep -l "torch.cuda.is_available()" tests/test_*.py | tr '\n' ' ')
if step cuda 150; then
    tpy 150 "${PYTEST[@]}" "$REPO/tests" -m cuda -q -rA "${XDIST[@]}" > "$D/cuda_tests.log" 2>&1
    outcome "cuda-marked tests" $?
    log "cuda-marked tests: $(tail -1 "$D/cuda_tests.log")"
    finished cuda
fi
# The kernel's edge cases on the GPU: each kernel variant is a Triton compile (over 150 s in all on an
# H200 machine's 16 cores, 2026-11-28), so this step is left out of the default list.
if step device 300; then
    log "device-parametrised test files: $GPU_FILES"
    # shellcheck disable=SC2046
    tpy 300 "${PYTEST[@]}" $(for f in $GPU_FILES; do echo "$REPO/$f"; done) -m "not cuda" -q -rA "${XDIST[@]}" \
        > "$D/device_tests.log" 2>&1
    log "device-parametrised tests exit code $? ($(tail -1 "$D/device_tests.log"))"
    finished device
fi

summarise
# 3. The fused kernel against eager and compiled PyTorch (B=256 C=1000 and B=1024 C=21843).
if step kernel 90; then
    tpy 90 "${PYTEST[@]}" "$REPO/benchmarks/bench_kernel.py" -m cuda -k "B256-C1000 or B1024-C21843" -q \
        --benchmark-only --benchmark-group-by=group --benchmark-columns=median,ops \
        --benchmark-json "$D/kernel_bench.json" > "$D/kernel_bench.txt" 2>&1
    outcome "kernel benchmark" $?
    finished kernel
fi

summarise
# 4. fasteval bench on 2,000 ImageNet-like JPEGs (the measure step's, where it made them) with every loader
#    that can run here: the stages and the timed loop; the whole command is the measure step's.
DATA="$MEASURE_DATA/base"
synth_once() {
    [ -d "$DATA" ] && return
    DATA="$WORK/imagenet_like"
    [ -d "$DATA" ] && return
    tpy 120 -m fasteval synth "$DATA" --classes "${GPU_CHECK_CLASSES:-50}" --per-class "${GPU_CHECK_PER_CLASS:-40}" \
        > "$D/synth.log" 2>&1
    log "synth: $(tail -1 "$D/synth.log")"
}
if step bench 90; then
    synth_once
    LOADERS="torchvision"
    if [ "$DALI" = "1" ]; then LOADERS="dali torchvision"; else log "SKIPPED: --loader dali (DALI is not installed here)"; fi
    first=1
    for loader in $LOADERS; do
        [ "$first" = 1 ] || step bench 120 "bench-$loader" || continue  # a second loader only where it fits
        first=0
        tpy 150 -m fasteval bench "$DATA" --loader "$loader" --batch-size 256 --workers "$WORKERS" \
            --repeats "${GPU_CHECK_REPEATS:-1}" --no-time-to-result --no-progress --json "$D/bench_$loader.json" \
            > "$D/bench_$loader.txt" 2>&1
        outcome "bench --loader $loader" $?
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
        > "$D/sweep_synth.log" 2>&1
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
        --json "$D/sweep.json" > "$D/sweep.txt" 2>&1
    log "sweep exit code $?"
    py - "$D/sweep.json" <<'PY' | tee -a "$LOG"
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
num_classes=int(sys.argv[2])).state_dict(), sys.argv[1])" "$CKPT" "$(find "$DATA" -mindepth 1 -maxdepth 1 -type d | wc -l)"
        for n in 1 "$NGPU"; do
            RUN=(-m torch.distributed.run --standalone --nproc-per-node "$n" -m fasteval)
            W=$(( $(nproc) / n > 8 ? 8 : ($(nproc) / n > 0 ? $(nproc) / n : 1) ))
            tpy 240 "${RUN[@]}" bench "$DATA" --weights "$CKPT" --batch-size 256 --workers "$W" --repeats 1 --no-progress \
                --json "$D/ranks${n}_bench.json" > "$D/ranks${n}_bench.txt" 2>&1
            log "torchrun --nproc-per-node $n fasteval bench exit code $?"
            tpy 180 "${RUN[@]}" eval "$DATA" --weights "$CKPT" --batch-size 256 --workers "$W" --no-progress \
                --json "$D/ranks${n}_eval.json" --predictions "$D/ranks${n}_eval.csv" \
                > "$D/ranks${n}_eval.txt" 2>&1
            log "torchrun --nproc-per-node $n fasteval eval exit code $?"
        done
    else
        log "SKIPPED: distributed (nvidia-smi -L lists ${NGPU:-0} GPU(s): one GPU against several needs at least 2)"
        echo "distributed (nvidia-smi -L lists ${NGPU:-0} GPU(s); it needs at least 2)" >> "$D/skipped.txt"
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
num_classes=int(sys.argv[2])).state_dict(), sys.argv[1])" "$CKPT" "$(find "$DATA" -mindepth 1 -maxdepth 1 -type d | wc -l)"
    W="$WORKERS"
    for run in bf16 fp32 reference; do
        OPT=(--precision "$run" --compile off); [ "$run" = reference ] && OPT=(--reference)
        ARGS=(-m fasteval eval "$DATA" --weights "$CKPT" --batch-size 256 --workers "$W" --no-progress "${OPT[@]}")
        tpy 120 "${ARGS[@]}" > /dev/null 2>&1  # warm: the page cache, Triton's kernel cache, the meta facts
        T0=$(date +%s.%N)
        tpy 120 "${ARGS[@]}" --json "$D/precision_$run.json" > "$D/precision_$run.txt" 2>&1
        RC=$?
        py -c "print(round($(date +%s.%N) - $T0, 2))" > "$D/precision_$run.wall"
        log "eval --precision $run: exit code $RC, $(cat "$D/precision_$run.wall") s whole command"
    done
    py - "$D" <<'PY' | tee -a "$LOG"
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
        --workers 8 --json "$D/train.json" > "$D/train.txt" 2>&1
    log "train exit code $? in $(( $(date +%s) - START_TRAIN )) s ($(tail -1 "$D/train.txt"))"
    finished train
fi

# 6. The summary, with the paths that ran.
summarise
py - "$OUT_DIR/summary.json" <<'PY' | tee -a "$LOG"
import json, sys
s = json.load(open(sys.argv[1]))
print("what decides (measure.json):")
for line in (s.get("measure") or {}).get("lines") or ["no measure.json"]:
    print(f"  {line}")
print("paths that ran:")
print(f"  DALI: {'installed' if s['environment'].get('dali_importable') else 'not installed (DALI paths not run)'}")
print(f"  Triton kernel probe: {s['triton_probe']}")
for name in ("cuda_tests", "device_tests"):
    print(f"  {name}: {s[name]}")
    for path, counts in sorted(s[f"{name}_by_path"].items()):
        print(f"    {path}: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}")
for name, us in (s.get("kernel_median_us") or {}).items():
    print(f"  kernel {name}: {us} us")
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
log "done in $(( $(date +%s) - START )) s; summary in $OUT_DIR/summary.json, every log in $OUT_DIR/details.tar.gz"
if [ -s "$D/failed.txt" ]; then
    log "FAILED: $(paste -sd ';' "$D/failed.txt")"
    exit 1
fi
