#!/usr/bin/env bash
# The GPU half of docs/performance.md in one go, most important first, each run time-boxed, so a
# short lease on one GPU gets the MFU figure even if it ends early. TensorFlow is not needed.
#
#   OUT=/tmp/gpu_bench scripts/gpu_benchmarks.sh [BUDGET_SECONDS]
#
# Needs jax with its CUDA plugin, flax, optax and ml-collections. Where ml-collections cannot be
# installed from a registry, put its wheel (pure Python) in .whl/ of the repository root first:
#   python3 -m pip download --no-deps ml_collections==1.1.0 -d .whl
# Each result lands as JSON in $OUT; the tables go to stdout and to $OUT/gpu_benchmarks.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_bench}
BUDGET=${1:-540}
mkdir -p "$OUT"
if ! python3 -c "import ml_collections" 2>/dev/null && ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/coyo_vit_site .whl/ml_collections-*.whl || exit 1
  export PYTHONPATH=/tmp/coyo_vit_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
deadline=$((SECONDS + BUDGET))

bench() {  # NAME ARGS...: one accelerator run, skipped when less than a minute is left
  local name=$1; shift
  local left=$((deadline - SECONDS))
  if (( left < 60 )); then echo "== $name: skipped, ${left}s left" | tee -a "$OUT/gpu_benchmarks.log"; return; fi
  echo "== $name ($left s left)" | tee -a "$OUT/gpu_benchmarks.log"
  timeout "$left" python3 -m benchmarks.accelerator "$@" --out "$OUT/$name.json" 2>&1 \
    | grep -v "^WARNING\|^I0000\|^W0000" | tee -a "$OUT/gpu_benchmarks.log"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu_benchmarks.log"
bench b16_bf16_b256 --variant B/16 --batch 256 --dtype bfloat16 --steps 10 --repeats 3
bench b16_bf16_b256_cudnn --variant B/16 --batch 256 --dtype bfloat16 --steps 10 --repeats 3 --attention_impl cudnn
bench b16_bf16_b256_scan_dots --variant B/16 --batch 256 --dtype bfloat16 --steps 10 --repeats 3 --scan --remat dots_with_no_batch_dims_saveable
bench l16_compile_unrolled --variant L/16 --batch 128 --dtype bfloat16 --compile_only
bench l16_compile_scan --variant L/16 --batch 128 --dtype bfloat16 --compile_only --scan
bench l16_bf16_b128 --variant L/16 --batch 128 --dtype bfloat16 --steps 5 --repeats 3
