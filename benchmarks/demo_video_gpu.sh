#!/usr/bin/env bash
# The video-scale demo on one GPU, in one call: train (time-boxed), calibrate, run `litepatch demo`.
#
# Usage (repository root, one H200, flash-attn-4 and the calibration wheels installed):
#   bash benchmarks/demo_video_gpu.sh                      # train + calibrate + demo (~9 min)
#   bash benchmarks/demo_video_gpu.sh path/to/weights.safetensors   # skip training: calibrate + demo
#
# Environment: OUT (default bench-out/demo_video), WORK (scratch, default /tmp/demo_video_work),
# TRAIN_SECONDS (training loop time box, default 240), FRONTIER_SECONDS (random-search time box,
# default 45; 240 when training is skipped), UNIFORM (uniform thresholds of the frontier), PY (default python),
# CALIB_ARGS / DEMO_ARGS (extra arguments, e.g. "--steps 2" for a CPU smoke run with tiny weights).
#
# Writes into $OUT (at most 8 files, each < 16 MB), each as soon as its stage ends, so a failing
# stage keeps what the earlier ones wrote:
#   demo_video_dit.safetensors  the trained weights (fp16, ~13 MB)  [training only]
#   train.json                  steps, time, loss, curriculum, reproduce command  [training only]
#   calibration.json            attention share, dense baselines, floor, calibration, frontier, comparison
#   demo-video.yaml             the calibrated recipe, for recipes/builtin/
#   time_vs_quality.png         generation time vs worst held-out PSNR (uniform, random, calibrated)
#   frames.png, kept_tiles.png  from `litepatch demo --model video` with that recipe
#   log.txt                     every stage's output, and the calibration report in markdown
set -uo pipefail
PY=${PY:-python}
OUT=${OUT:-bench-out/demo_video}
WORK=${WORK:-/tmp/demo_video_work}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
: > "$LOG"
status=0
stage() { echo "=== $1 ($(date +%T))" | tee -a "$LOG"; }

WEIGHTS=${1:-}
if [ -z "$WEIGHTS" ]; then
  FRONTIER_SECONDS=${FRONTIER_SECONDS:-45}
  UNIFORM=${UNIFORM:--10,-8,-6,-5,-4,-3,-2,-1,0}
  WEIGHTS="$OUT/demo_video_dit.safetensors"
  stage "train"
  $PY benchmarks/train_demo.py --model video --seed 0 --steps auto --max-seconds "${TRAIN_SECONDS:-240}" \
      --out "$WEIGHTS" --meta-json "$OUT/train.json" 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "training failed" | tee -a "$LOG"; exit 1; }
else
  FRONTIER_SECONDS=${FRONTIER_SECONDS:-240}
  UNIFORM=${UNIFORM:--12,-10,-8,-7,-6,-5,-4,-3,-2,-1,0}
  [ -f "$WEIGHTS" ] || { echo "no weights at $WEIGHTS" | tee -a "$LOG"; exit 1; }
fi

stage "calibrate"
$PY benchmarks/calibrate_demo.py --model video --weights "$WEIGHTS" --out "$WORK/calibration" \
    --frontier-seconds "$FRONTIER_SECONDS" --uniform="$UNIFORM" ${CALIB_ARGS:-} 2>&1 | tee -a "$LOG"
calib=${PIPESTATUS[0]}
for f in calibration.json demo-video.yaml time_vs_quality.png; do
  [ -f "$WORK/calibration/$f" ] && cp "$WORK/calibration/$f" "$OUT/"
done
RECIPE="$WORK/calibration/demo-video.yaml"
if [ "$calib" -ne 0 ] || [ ! -f "$RECIPE" ]; then
  echo "calibration failed (rc $calib); the demo runs the shipped demo-video recipe" | tee -a "$LOG"
  RECIPE=demo-video
  status=1
fi

stage "demo"
$PY -m litepatch.cli demo --model video --weights "$WEIGHTS" --recipe "$RECIPE" --out "$WORK/demo" ${DEMO_ARGS:-} 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for f in frames.png kept_tiles.png; do
  [ -f "$WORK/demo/$f" ] && cp "$WORK/demo/$f" "$OUT/"
done
stage "done (status $status)"
ls -la "$OUT" | tee -a "$LOG"
exit $status
