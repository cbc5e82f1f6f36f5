#!/usr/bin/env bash
# `fasteval train` on a CUDA machine: the sync-free loop test, then a short run end to end.
#   bash benchmarks/train_gpu_check.sh OUT_DIR
# Installs the working tree without dependencies, as gpu_check.sh does, and runs from an empty folder.
set -uo pipefail
OUT_DIR="$(mkdir -p "${1:?usage: benchmarks/train_gpu_check.sh OUT_DIR}" && cd "$1" && pwd)"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
export FASTEVAL_CACHE="$WORK/cache"
py() { (cd "$WORK" && python3 "$@"); }
py -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" > "$OUT_DIR/install.log" 2>&1 \
    || echo "pip install failed: see install.log"
py -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT_DIR/env.txt"
(cd "$WORK" && timeout 240 python3 -m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" -p no:cacheprovider -q \
    "$REPO/tests/test_train.py" -k "cuda or training_metrics" -rs) 2>&1 | tail -15 | tee "$OUT_DIR/pytest.txt"
py -m fasteval synth "$WORK/tr" --classes 10 --per-class 64 --size 100x100 > /dev/null
py -m fasteval synth "$WORK/va" --classes 10 --per-class 20 --size 100x100 --seed 1 > /dev/null
/usr/bin/time -f "whole command %e s" timeout 240 python3 -m fasteval train "$WORK/tr" "$WORK/va" --out "$WORK/run" \
    --epochs 3 --device cuda --no-progress --workers 8 --json "$OUT_DIR/train.json" 2>&1 | tail -8 | tee "$OUT_DIR/train.txt"
cp "$WORK/run/history.json" "$OUT_DIR/" 2>/dev/null
