#!/usr/bin/env bash
# Train the bundled digits checkpoints: ViT and DeepViT (micro width: dim 64, 4 heads, 32 px, patch 4) at depths
# 4, 8, 16 and 32 on scikit-learn's digits, on the CPU, with the `digits` preset (see collapse_probe/train/config.py).
#
# Run from the repository root with collapse-probe importable (pip install -e . or PYTHONPATH=$PWD).
#   bash checkpoints/train_digits.sh                 # all depths (depth 8 first), 2 runs at a time, 1 thread each
#   DEPTHS="8" bash checkpoints/train_digits.sh      # one pair
#   RUNS=/tmp/digits DEST=checkpoints PYTHON=python bash checkpoints/train_digits.sh
#
# Each run writes RUNS/<name>_d<depth>/{config.json,last.pt,log.csv,collapse.csv,final.safetensors}; the script then
# copies final.safetensors (raw or EMA weights, whichever had the better validation top-1; recorded in its metadata)
# to checkpoints/<name>_d<depth>.safetensors and rewrites checkpoints/summary.csv. Seed 42; validation = a fixed,
# stratified 20% of digits (360 images, split seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RUNS=${RUNS:-runs/digits}
DEPTHS=${DEPTHS:-"8 4 16 32"}
EPOCHS=${EPOCHS:-15}
DEST=${DEST:-checkpoints}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # two single-threaded runs side by side use two cores best

run() {  # run NAME DEPTH
  "$PYTHON" -m collapse_probe train --preset digits --model "$1" --depth "$2" --epochs "$EPOCHS" \
    --output "$RUNS/$1_d$2" --resume --no-progress > "$RUNS/$1_d$2.log" 2>&1
  cp "$RUNS/$1_d$2/final.safetensors" "$DEST/$1_d$2.safetensors"
}

mkdir -p "$RUNS"
for d in $DEPTHS; do
  start=$(date +%s)
  run vit_micro "$d" & a=$!
  run deepvit_micro "$d" & b=$!
  wait $a; wait $b
  echo "depth $d done in $(( $(date +%s) - start )) s"
  "$PYTHON" checkpoints/summarize.py "$DEST"
done
