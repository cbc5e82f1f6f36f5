#!/usr/bin/env bash
# GPU check: run on a CUDA machine with no network, from the repository root or anywhere.
#   bash benchmarks/gpu_check.sh OUT_DIR
# Installs the working tree without dependencies (the GPU machines have torch, torchvision,
# triton, pytest and pytest-benchmark, maybe not DALI), runs the `cuda` tests, benchmarks the
# fused kernel, then `fasteval bench` on 5,000 generated ImageNet-like JPEGs with every loader
# that can run. Writes logs, JSON and summary.json into OUT_DIR, naming every path it could not
# run. Meant to finish in under 8 minutes. GPU_CHECK_CLASSES/GPU_CHECK_PER_CLASS shrink the
# dataset for a dry run of the plumbing on a CPU machine.
set -uo pipefail
OUT_DIR="$(mkdir -p "${1:?usage: benchmarks/gpu_check.sh OUT_DIR}" && cd "$1" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LOG="$OUT_DIR/gpu_check.log"
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$LOG"; }
START=$(date +%s)

nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"

# 1. Install without dependencies; where pip cannot, lay the package out by hand
#    (kernels/ becomes fasteval/kernels, as the wheel installs it).
if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT_DIR/install.log" 2>&1; then
    log "installed with pip (editable, no deps)"
else
    SITE="$(mktemp -d)"
    cp -r fasteval "$SITE/fasteval" && cp -r kernels "$SITE/fasteval/kernels"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    log "pip install failed (see install.log); using a copy on PYTHONPATH=$SITE"
fi
"$PY" -P - > "$OUT_DIR/environment.json" <<'PY'
import json, torch
from fasteval.report import environment
from fasteval.loader_dali import dali_available
env = environment("cuda" if torch.cuda.is_available() else "cpu")
env["dali_importable"] = dali_available()
print(json.dumps(env, indent=2))
PY
DALI=$("$PY" -P -c "from fasteval.loader_dali import dali_available; print(int(dali_available()))" 2>/dev/null || echo 0)
log "DALI importable: $DALI"

# 2. The cuda-marked tests (-P: never import the source folder in place of the installed package).
WORK="$(mktemp -d)"
export FASTEVAL_CACHE="$WORK/cache"
timeout 240 "$PY" -P -m pytest tests -m cuda -q -p no:cacheprovider -rA > "$OUT_DIR/cuda_tests.log" 2>&1
log "cuda tests exit code $? ($(tail -1 "$OUT_DIR/cuda_tests.log"))"

# 3. The fused kernel against eager and compiled PyTorch (B=256 C=1000 and B=1024 C=21843).
timeout 150 "$PY" -P -m pytest benchmarks/bench_kernel.py -m cuda -k "B256-C1000 or B1024-C21843" -q \
    -p no:cacheprovider --benchmark-only --benchmark-group-by=group --benchmark-columns=median,ops \
    --benchmark-json "$OUT_DIR/kernel_bench.json" > "$OUT_DIR/kernel_bench.txt" 2>&1
log "kernel benchmark exit code $?"

# 4. fasteval bench on 5,000 ImageNet-like JPEGs with every loader that can run here.
DATA="$WORK/imagenet_like"
"$PY" -P -m fasteval synth "$DATA" --classes "${GPU_CHECK_CLASSES:-50}" --per-class "${GPU_CHECK_PER_CLASS:-100}" \
    > "$OUT_DIR/synth.log" 2>&1
log "synth: $(tail -1 "$OUT_DIR/synth.log")"
WORKERS=$(( $(nproc) < 16 ? $(nproc) : 16 ))
LOADERS="torchvision"
if [ "$DALI" = "1" ]; then LOADERS="dali torchvision"; else log "SKIPPED: --loader dali (DALI is not installed here)"; fi
for loader in $LOADERS; do
    timeout 200 "$PY" -P -m fasteval bench "$DATA" --loader "$loader" --batch-size 256 --workers "$WORKERS" \
        --repeats 3 --no-progress --json "$OUT_DIR/bench_$loader.json" > "$OUT_DIR/bench_$loader.txt" 2>&1
    log "bench --loader $loader exit code $?"
done

# 5. One summary.
"$PY" -P - "$OUT_DIR" "$DALI" "$(( $(date +%s) - START ))" > "$OUT_DIR/summary.json" <<'PY'
import json, os, re, sys
out, dali, seconds = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
summary = {"seconds": seconds, "environment": json.load(open(os.path.join(out, "environment.json"))),
           "not_run": [] if dali else ["dali loader (DALI not installed)"]}
tests = open(os.path.join(out, "cuda_tests.log")).read().strip().splitlines()
summary["cuda_tests"] = tests[-1] if tests else "no output"
try:
    kb = json.load(open(os.path.join(out, "kernel_bench.json")))
    summary["kernel_median_us"] = {b["name"]: round(b["stats"]["median"] * 1e6, 2) for b in kb["benchmarks"]}
except Exception as exc:
    summary["not_run"].append(f"kernel benchmark ({exc})")
for name in sorted(os.listdir(out)):
    m = re.fullmatch(r"bench_(\w+)\.json", name)
    if not m:
        continue
    b = json.load(open(os.path.join(out, name)))
    summary[f"bench_{m.group(1)}"] = {
        "speedup": b["speedup"], "agreement": b["agreement"],
        "reference_images_per_sec": b["reference"]["images_per_sec"],
        "fast_images_per_sec": b["fast"]["images_per_sec"], "loader": b["fast"]["loader"],
        "precision": b["fast"]["precision"], "compile": b["fast"]["compile"],
        "warmup_seconds": b["fast"]["warmup_seconds"], "stages": b["stages"], "verdict": b["verdict"],
    }
for loader in (["dali"] if dali else []) + ["torchvision"]:
    if f"bench_{loader}" not in summary:
        summary["not_run"].append(f"bench --loader {loader} (failed: see bench_{loader}.txt)")
print(json.dumps(summary, indent=2))
PY
log "done in $(( $(date +%s) - START )) s; summary in $OUT_DIR/summary.json"
