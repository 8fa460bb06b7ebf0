#!/usr/bin/env bash
# Train the bundled digits checkpoints: ViT and DeepViT (micro width: dim 64, 4 heads, MLP ratio 2, 32 px, patch 4 =
# 65 tokens) at depths 4, 8, 16 and 32 on scikit-learn's digits, on the CPU, with the `digits` preset (40 epochs; see
# collapse_probe/train/config.py), plus two extra seeds of both families at depth 16 and a plateau check (both
# 32-block models at 80 epochs, logs only, not bundled).
#
# Run from the repository root with collapse-probe importable (pip install -e . or PYTHONPATH=$PWD).
#   bash checkpoints/train_digits.sh                       # the whole queue, 2 runs at a time, 1 thread each
#   JOBS="vit_micro:8:42" bash checkpoints/train_digits.sh  # one run (NAME:DEPTH:SEED[:EPOCHS])
#   RUNS=/tmp/digits DEST=checkpoints PYTHON=python PARALLEL=2 bash checkpoints/train_digits.sh
#
# Longest runs first, so that two workers finish together. Each run writes RUNS/<file>/{config.json,last.pt,log.csv,
# collapse.csv,final.safetensors} and is started with --resume: rerunning the script continues an interrupted run from
# its last.pt and skips finished ones (their final.safetensors is just copied again). When a bundled run ends, its
# final.safetensors (raw or EMA weights, whichever had the better validation top-1; recorded in its metadata) is copied
# to DEST/<file>.safetensors and its config.json, log.csv and collapse.csv to DEST/logs/<file>/. Validation = a fixed,
# stratified 20 % of digits (360 images, split seed 0).
#
# Measured wall times (two runs side by side, one thread each) are in checkpoints/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RUNS=${RUNS:-runs/digits}
DEST=${DEST:-checkpoints}
PARALLEL=${PARALLEL:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # two single-threaded runs side by side use two cores best
# NAME:DEPTH:SEED[:EPOCHS]; a fourth field marks a run outside the bundled set (its logs go to DEST/logs only)
JOBS=${JOBS:-"deepvit_micro:32:42 vit_micro:32:42 deepvit_micro:16:42 vit_micro:16:42 deepvit_micro:16:1
  vit_micro:16:1 deepvit_micro:16:2 vit_micro:16:2 deepvit_micro:8:42 vit_micro:8:42 deepvit_micro:4:42 vit_micro:4:42
  deepvit_micro:32:42:80 vit_micro:32:42:80"}

run() {  # run NAME:DEPTH:SEED[:EPOCHS]
  IFS=: read -r name depth seed epochs <<< "$1"
  file="${name}_d${depth}"
  [ "$seed" = 42 ] || file="${file}_s${seed}"
  extra=()
  if [ -n "${epochs:-}" ]; then file="${file}_e${epochs}"; extra=(--epochs "$epochs"); fi
  start=$(date +%s)
  "$PYTHON" -m collapse_probe train --preset digits --model "$name" --depth "$depth" --set "seed=$seed" "${extra[@]}" \
    --output "$RUNS/$file" --resume --no-progress > "$RUNS/$file.log" 2>&1
  mkdir -p "$DEST/logs/$file"
  cp "$RUNS/$file"/{config.json,log.csv,collapse.csv} "$DEST/logs/$file/"
  [ -n "${epochs:-}" ] || cp "$RUNS/$file/final.safetensors" "$DEST/$file.safetensors"
  echo "$file done in $(( $(date +%s) - start )) s" | tee -a "$RUNS/times.txt"
}
export -f run
export PYTHON RUNS DEST

mkdir -p "$RUNS"
printf '%s\n' $JOBS | xargs -P "$PARALLEL" -I{} bash -c 'run "$@"' _ {}
"$PYTHON" checkpoints/summarize.py "$DEST"
