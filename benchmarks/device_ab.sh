#!/usr/bin/env bash
# A/B on one warm device machine: an earlier commit against the working tree, through the same stages of
# benchmarks/device_session.sh, run one after the other (speed is compared only within one run on one machine).
#
# Here, before the device calls (repository root):
#   bash benchmarks/device_ab.sh prepare REF      # .whl/old.tar.gz: the tree of commit REF (git archive)
# On the device, in the call that carries .whl, after `bash benchmarks/device_session.sh install`:
#   bash benchmarks/device_ab.sh STAGE [STAGE...]  # e.g. host, or kernel with KERNEL_ARGS="--shapes flux-1024"
#   bash benchmarks/device_ab.sh alternate N [ARGS...]  # patch_overhead.py ARGS, N runs per side: new, old, new, ...
# Each side is installed (editable, no dependencies) before its stages run; the working tree is installed again at the
# end. Outputs: $OUT/old and $OUT/new, each as device_session.sh writes them; the summary lines are printed.
# `alternate` exists because the host drifts: in session 22 an old-then-new A/B and a new, old, new, old series on one
# warm H100 drifted by about 4 us per run, as much as the change measured; alternating sides spreads the drift over
# both, and the printed medians per side are over the runs (each run's own number is the median of its rounds).
set -uo pipefail
if [ "${1:-}" = prepare ]; then
  ref=${2:?usage: bash benchmarks/device_ab.sh prepare REF}
  mkdir -p .whl && git archive "$ref" | gzip > .whl/old.tar.gz && echo ".whl/old.tar.gz: $(git rev-parse --short "$ref")"
  exit
fi
[ $# -gt 0 ] || { echo "usage: bash benchmarks/device_ab.sh STAGE [STAGE...]  (or: prepare REF)"; exit 2; }
[ -f .whl/old.tar.gz ] || { echo "no .whl/old.tar.gz: run 'bash benchmarks/device_ab.sh prepare REF' here first"; exit 2; }
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
OUT=${OUT:-bench-out/ab}
new=$PWD
install_side() {  # the tree of side $1 installed (editable, no dependencies); prints its directory
  local dir; dir=$([ "$1" = old ] && echo /tmp/ab-old || echo "$new")
  (cd "$dir" && $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1) && echo "$dir"
}
[ -d /tmp/ab-old ] || { mkdir -p /tmp/ab-old && tar xzf .whl/old.tar.gz -C /tmp/ab-old && cp -r .whl /tmp/ab-old/; }
status=0
if [ "$1" = alternate ]; then
  runs=${2:?usage: bash benchmarks/device_ab.sh alternate N [patch_overhead.py ARGS...]}
  shift 2
  mkdir -p "$OUT"
  for i in $(seq 1 "$runs"); do
    for side in new old; do
      dir=$(install_side $side) || { status=1; continue; }
      echo "=== $side run $i ($(date +%T))"
      (cd "$dir" && $PY benchmarks/patch_overhead.py "$@" --json "$OUT/alternate_${side}_$i.json" 2>&1 \
        | grep -E "^(unpatched|patched)|SDPA") || status=1
    done
  done
  install_side new >/dev/null
  $PY - "$OUT" "$runs" <<'PYEOF'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
for side in ("old", "new"):
    added = {}
    for i in range(1, runs + 1):
        try:
            result = json.load(open(f"{out}/alternate_{side}_{i}.json"))
        except (OSError, ValueError):
            continue
        # the GPU run's rows, or --cpu's (median, low, high) ones
        for name, us in result.get("added_us_per_attention_call", result.get("added_host_us_per_call", {})).items():
            added.setdefault(name, []).append(us[0] if isinstance(us, list) else us)
    print(f"{side}: " + ", ".join(f"{name} median {statistics.median(v):+.0f} us over {len(v)} runs "
                                  f"({', '.join(f'{u:+.0f}' for u in v)})" for name, v in added.items()))
PYEOF
  exit $status
fi
for side in old new; do
  dir=$(install_side $side) || { status=1; continue; }
  echo "=== side $side ($dir)"
  (cd "$dir" && OUT=$OUT/$side bash benchmarks/device_session.sh "$@" 2>&1 \
     | grep -E "^(===|NVIDIA|unpatched|patched)|^  [A-Za-z].* us$") || status=1
done
install_side new >/dev/null
exit $status
