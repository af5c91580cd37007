#!/usr/bin/env bash
# A/B on one warm device machine: an earlier commit against the working tree, through the same stages of
# benchmarks/device_session.sh, run one after the other (speed is compared only within one run on one machine).
#
# Here, before the device calls (repository root):
#   bash benchmarks/device_ab.sh prepare REF      # .whl/old.tar.gz: the tree of commit REF (git archive)
# On the device, in the call that carries .whl, after `bash benchmarks/device_session.sh install`:
#   bash benchmarks/device_ab.sh STAGE [STAGE...]  # e.g. host, or kernel with KERNEL_ARGS="--shapes flux-1024"
# Each side is installed (editable, no dependencies) before its stages run; the working tree is installed again at the
# end. Outputs: $OUT/old and $OUT/new, each as device_session.sh writes them; the summary lines are printed.
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
[ -d /tmp/ab-old ] || { mkdir -p /tmp/ab-old && tar xzf .whl/old.tar.gz -C /tmp/ab-old && cp -r .whl /tmp/ab-old/; }
status=0
for side in old new; do
  dir=$([ $side = old ] && echo /tmp/ab-old || echo "$new")
  echo "=== side $side ($dir)"
  (cd "$dir" && $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
     && OUT=$OUT/$side bash benchmarks/device_session.sh "$@" 2>&1 \
     | grep -E "^(===|NVIDIA|unpatched|patched)|^  [A-Za-z].* us$") || status=1
done
cd "$new" && $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
exit $status
