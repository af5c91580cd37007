#!/usr/bin/env bash
# The GPU work of a session on one lent H200, in stages, each time-boxed, each writing into $OUT as it ends (a stage
# that fails or runs out of time keeps what the earlier ones wrote).
#
# Before the first call, on this machine (repository root):
#   bash benchmarks/device_session.sh wheels       # .whl/: diffusers, omegaconf, optuna, pytest-xdist (+ deps)
#   ../shared/tools/device-cutedsl                  # .cutedsl/a and .cutedsl/b: flash-attn-4 in two parts
# Then three device calls, each within ~30 s of the previous one returning (the machine stays warm that long and
# keeps /tmp; the carry limit of 64 MiB per call is why there are three):
#   1) carry [".cutedsl/a"]   command: mkdir -p /tmp/cutedsl && cp .cutedsl/a/* /tmp/cutedsl/
#   2) carry [".cutedsl/b"]   command: bash .cutedsl/b/install.sh
#   3) carry [".whl"]         command: bash benchmarks/device_session.sh install verify
# Then, on the same warm machine (no carry), one call per line, since a call may run 10 minutes at most:
#   bash benchmarks/device_session.sh demo          # recalibrate the video demo and run it (on an H200 next: the
#                                                   # shipped recipe was calibrated on an H100)
#   bash benchmarks/device_session.sh host e2e      # host time per call
#   bash benchmarks/device_session.sh kernel
#   bash benchmarks/device_session.sh profile       # where the demo's time goes, and with --compile-blocks (the
#                                                   # layer_attention op: 5 syncs and flash-attn-4 dense steps
#                                                   # expected there, as eager; PROFILE_COMPILED=0 skips it)
#   bash benchmarks/device_session.sh demo-quick    # the shipped recipe and thresholds -1, 0 against dense
# (`host` also prints cProfile's top functions of patched forwards and the per-function breakdown.)
# To compare an earlier commit with the working tree on the same warm machine: benchmarks/device_ab.sh.
#
# Stages (give several; they run in this order of arguments):
#   install  wheels from .whl/ into /tmp/site; the project installed without dependencies
#   verify   GPU tests with a 150-case fuzz, and the CuTe protocol check             -> $OUT/gpu_tests.txt
#   crossover  benchmarks/dense_crossover.py: flash-attn-4 dense (direct launch, interface) vs SDPA, host time in  -> $OUT/dense_crossover.json
#   kernel   benchmarks/backends.py over the six shapes                              -> $OUT/backends.json
#   host     benchmarks/patch_overhead.py, 150 paired rounds of 2 forwards, then 30 of 20  -> $OUT/patch_overhead*.json
#   host-depth  the same with 30 layers (Wan2.1-1.3B's depth), 60 rounds of 2         -> $OUT/patch_overhead_layers30.json
#   host-thread  the same as host and host-depth, timed by the CPU time of the forwards' thread -> $OUT/patch_overhead_thread*.json
#   host-ablation  benchmarks/host_ablation.py: what each piece costs inside forwards (thread clock) -> $OUT/host_ablation.json
#   host-trace  patch_overhead.py --trace: each patcher function's own host time and the torch ops and CUDA API calls
#            inside it, under torch.profiler (where the launch's time goes below Python) -> $OUT/log.txt
#   e2e      benchmarks/e2e.py (Wan2.1-1.3B 480p, kept 1.0 / 0.5 / 0.25)              -> $OUT/e2e.json
#   demo     benchmarks/demo_video_gpu.sh, shipped weights, batched CFG, fused pointwise -> $OUT/demo/...
#   demo-quick  litepatch demo: shipped recipe, threshold -1 and 0 (batched CFG, fused)  -> $OUT/demo_quick*/
#   profile  benchmarks/demo_profile.py: where the video demo's time goes, fused pointwise and compiled blocks
#            -> $OUT/demo_profile*.json
# Environment: OUT (default $OUT of the device call, else bench-out/session), PY (default python3),
# STAGE_SECONDS (time box per stage, default 540), KERNEL_ARGS (extra backends.py arguments, e.g. "--shapes ...").
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-bench-out/session}
BOX=${STAGE_SECONDS:-540}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
status=0
run() {  # run NAME LOGFILE COMMAND...: time-boxed, output to the terminal and the log
  local name=$1 log=$2
  shift 2
  echo "=== $name ($(date +%T))" | tee -a "$log"
  timeout "$BOX" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name: exit $rc" | tee -a "$log"; status=1; }
}

for stage in "$@"; do
  case $stage in
    wheels)  # on this machine: the device has torch, numpy, pillow and pytest, not these (setuptools: the editable
             # install below builds without isolation, so without a network)
      rm -rf .whl && mkdir -p .whl
      $PY -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "diffusers>=0.42,<0.43" "omegaconf>=2.3" "optuna>=4.0" pytest-xdist "setuptools>=68" wheel
      # the device's own: numpy, pillow, pytest; huggingface_hub too (its transformers 5.17 refuses hub 2.x, and
      # diffusers' model imports go through that check)
      rm -f .whl/numpy-* .whl/pillow-* .whl/pytest-[0-9]* .whl/pluggy-* .whl/iniconfig-* .whl/pygments-* \
        .whl/huggingface_hub-*
      grep -qxF '/.whl/' .gitignore || echo "warning: .whl/ is not ignored by git"
      du -sh .whl ;;
    install)
      run install "$OUT/install.txt" bash -c "$PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && $PY -m pip install -q --no-deps --no-build-isolation -e . \
        && $PY -c 'import diffusers, omegaconf, optuna, xdist, flash_attn.cute, litepatch.kernels.cute_fwd; print(\"ready\")'" ;;
    verify)
      run "GPU tests" "$OUT/gpu_tests.txt" env LITEPATCH_FUZZ_CASES=150 $PY -m pytest -q -n 8 tests/gpu
      run "CuTe protocol" "$OUT/gpu_tests.txt" $PY -m pytest -q tests/unit/test_cute_protocol.py ;;
    crossover)
      run crossover "$OUT/log.txt" $PY benchmarks/dense_crossover.py --json "$OUT/dense_crossover.json" ;;
    kernel)
      run kernel "$OUT/log.txt" $PY benchmarks/backends.py --json "$OUT/backends.json" ${KERNEL_ARGS:-} ;;
    host)
      run host "$OUT/log.txt" $PY benchmarks/patch_overhead.py --profile --breakdown --json "$OUT/patch_overhead.json"
      # blocks of 20 forwards between syncs: the host queues ahead, so a per-forward sync (the timestep read) shows
      run host-long-blocks "$OUT/log.txt" $PY benchmarks/patch_overhead.py --iters 20 --rounds 30 \
        --json "$OUT/patch_overhead_blocks20.json" ;;
    host-depth)  # the tiny Wan at Wan2.1-1.3B's depth (30 blocks): per-forward costs shared by as many layers as it has
                 # (the deferred commits' one launch per forward among them)
      run host-depth "$OUT/log.txt" $PY benchmarks/patch_overhead.py --layers 30 --rounds 60 \
        --json "$OUT/patch_overhead_layers30.json" ;;
    host-thread)  # the same two depths timed by the forwards' thread CPU time (quartiles of +-10 us per call where the
                  # wall clock read +-100 on a shared host; session 23)
      run host-thread "$OUT/log.txt" $PY benchmarks/patch_overhead.py --clock thread --rounds 40 \
        --json "$OUT/patch_overhead_thread.json"
      run host-thread-depth "$OUT/log.txt" $PY benchmarks/patch_overhead.py --clock thread --layers 30 --rounds 30 \
        --json "$OUT/patch_overhead_thread_layers30.json" ;;
    host-ablation)  # each piece of the patched path taken out in turn, with a control (benchmarks/host_ablation.py)
      run host-ablation "$OUT/log.txt" $PY benchmarks/host_ablation.py --rounds 60 --json "$OUT/host_ablation.json" ;;
    host-trace)  # torch.profiler over 100 patched forwards per threshold (-inf, -4): the ops and CUDA calls inside
                 # each patcher function, and the time each function keeps for itself (Python, the TVM-FFI call)
      run host-trace "$OUT/log.txt" $PY benchmarks/patch_overhead.py --rounds 10 --trace ;;
    e2e)
      run e2e "$OUT/log.txt" $PY benchmarks/e2e.py --threshold=-1e30 --fractions 1.0 0.5 0.25 --json "$OUT/e2e.json" ;;
    demo)
      run demo "$OUT/log.txt" env OUT="$OUT/demo" CALIB_ARGS="--cfg-mode batched --fuse-pointwise" \
        DEMO_ARGS="--cfg-mode batched --fuse-pointwise" \
        FRONTIER_SECONDS="${FRONTIER_SECONDS:-90}" \
        bash benchmarks/demo_video_gpu.sh litepatch/assets/demo_video_dit.safetensors ;;
    demo-quick)  # the shipped recipe and two uniform thresholds through `litepatch demo` (about a minute each), no
                 # calibration: the end-to-end speed-up against both dense baselines, quality and tiles skipped
      for extra in "" "--threshold=-1" "--threshold=0"; do
        dir="$OUT/demo_quick${extra:+_${extra#--threshold=}}"
        mkdir -p "$dir"
        run "demo ${extra:-recipe}" "$OUT/log.txt" $PY -c "import sys; from litepatch.cli import main; sys.exit(main())" \
          demo --model video --cfg-mode batched --fuse-pointwise $extra --out "$dir"
      done ;;
    profile)
      run profile "$OUT/log.txt" $PY benchmarks/demo_profile.py --cfg-mode batched --fuse-pointwise \
        --json "$OUT/demo_profile_fused.json"
      if [ "${PROFILE_COMPILED:-1}" = 1 ]; then  # compiled blocks: traced calls plan when they run (README)
        run profile-compiled "$OUT/log.txt" $PY benchmarks/demo_profile.py --cfg-mode batched --compile-blocks \
          --json "$OUT/demo_profile_compiled.json"
      fi ;;
    *)
      echo "unknown stage $stage (wheels install verify crossover kernel host host-depth host-thread host-ablation host-trace e2e demo demo-quick profile)"; status=1 ;;
  esac
done
exit $status
