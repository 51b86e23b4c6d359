#!/usr/bin/env bash
# The GPU half of docs/performance.md in one go, most important first, each run time-boxed, so a
# short lease on one GPU gets the MFU figure even if it ends early. TensorFlow is not needed.
#
#   OUT=/tmp/gpu_bench scripts/gpu_benchmarks.sh [BUDGET_SECONDS [RUN ...]]
#
# RUN names one measurement (see `run` below); none = all of them, most important first. Use a
# fresh OUT per invocation: the log and the archive in it are rewritten.
#
# Needs jax with its CUDA plugin, flax, optax and ml-collections. Where ml-collections cannot be
# installed from a registry, put its wheel (pure Python) in .whl/ of the repository root first:
#   python3 -m pip download --no-deps ml_collections==1.1.0 -d .whl
# Each result is a JSON, packed with the headline run's profiler trace and optimized HLO into
# $OUT/gpu_benchmarks.tar.gz at the end; the tables go to stdout and to $OUT/gpu_benchmarks.log.
# The default order puts what docs/performance.md has not measured yet right after the headline,
# then re-measures the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_bench}
BUDGET=${1:-540}
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "BUDGET_SECONDS must be a whole number of seconds, got '$BUDGET'" >&2; exit 2; }
ALL="b16_bf16_b256_auto l16_bf16_b128_auto b16_bf16_b256_previous_default l16_bf16_b128_previous_default
  b16_bf16_b512_auto l16_compile_unrolled l16_compile_scan b16_bf16_b256_no_gelu_recompute b16_bf16_b256_triton_gemm
  gemm_rewriter_dump block_parts b16_bf16_b256_pad_once16 attention b16_bf16_b256_per_block
  b16_bf16_b256_xla b16_bf16_b256_cudnn_ln b16_bf16_b256_scan_dots l16_bf16_b128_xla b16_bf16_b256_auto_xla_flags"
shift || true
(( $# == 0 )) && set -- $ALL  # everything, most important first
for name in "$@"; do
  [[ $name =~ ^[a-z0-9_]+$ && " $(echo $ALL) " == *" $name "* ]] || { echo "unknown run '$name'; valid: $(echo $ALL)" >&2; exit 2; }
done
mkdir -p "$OUT"
PROFILES=/tmp/coyo_vit_profile
rm -rf "$PROFILES"  # a trace left by an earlier invocation must not be packed as this one's
if ! python3 -c "import ml_collections" 2>/dev/null && ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/coyo_vit_site .whl/ml_collections-*.whl || exit 1
  export PYTHONPATH=/tmp/coyo_vit_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
deadline=$((SECONDS + BUDGET))

timed() {  # NAME COMMAND...: runs it within the time left, skipped when under a minute is left
  local name=$1; shift
  local left=$((deadline - SECONDS))
  if (( left < 60 )); then echo "== $name: skipped, ${left}s left" | tee -a "$OUT/gpu_benchmarks.log"; return; fi
  echo "== $name ($left s left)" | tee -a "$OUT/gpu_benchmarks.log"
  timeout "$left" "$@" 2>&1 | grep --line-buffered -v "^WARNING\|^I0000\|^W0000\|cuda_timer.cc" | tee -a "$OUT/gpu_benchmarks.log"
}
bench() {  # NAME ARGS...: one benchmarks.accelerator run, its JSON named NAME
  local name=$1; shift
  timed "$name" python3 -m benchmarks.accelerator "$@" --out "$OUT/$name.json"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu_benchmarks.log"
python3 -c "import jax, flax, optax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$OUT/gpu_benchmarks.log"
B16="--variant B/16 --dtype bfloat16 --steps 10 --repeats 3"
L16="--variant L/16 --dtype bfloat16 --batch 128"
run() {  # NAME: one named measurement (the names are the JSON files' names)
  case $1 in
    attention) timed attention python3 -m benchmarks.attention --variant B/16 --batch 256 --out "$OUT/attention.json" ;;
    # Candidates for the MLP, the q/k/v projections and the head, each against the model's form.
    block_parts) timed block_parts python3 -m benchmarks.block_parts --variant B/16 --batch 256 --out "$OUT/block_parts.json" ;;
    # The headline figure, then where its time goes (a 3-step trace summed by kernel, and the
    # optimized HLO that says what each fusion computes).
    # The count of each cuBLASLt epilogue says whether the GELU and the biases went into the GEMMs.
    b16_bf16_b256_auto) bench "$1" $B16 --batch 256 --attention_impl auto --profile_dir "$PROFILES/$1" \
      --dump_hlo "$OUT/$1.hlo.txt"
      [[ -f $OUT/$1.hlo.txt ]] && echo "cuBLASLt epilogues in the step: $(grep -o '"epilogue":"[A-Z_]*"' \
        "$OUT/$1.hlo.txt" | sort | uniq -c | tr -s ' \n' ' ')" | tee -a "$OUT/gpu_benchmarks.log" ;;
    # The defaults before run 5: Triton GEMM fusions (XLA's own choice) and the GELU keeping tanh.
    b16_bf16_b256_previous_default) XLA_FLAGS="--xla_gpu_enable_triton_gemm=true" \
      bench "$1" $B16 --batch 256 --no-gelu_recompute ;;
    l16_bf16_b128_previous_default) XLA_FLAGS="--xla_gpu_enable_triton_gemm=true" \
      bench "$1" $L16 --steps 5 --repeats 3 --no-gelu_recompute ;;
    # One default undone at a time: the GELU keeping tanh (no BIAS_GELU_AUX epilogue), Triton GEMMs.
    b16_bf16_b256_no_gelu_recompute) bench "$1" $B16 --batch 256 --no-gelu_recompute ;;
    b16_bf16_b256_triton_gemm) XLA_FLAGS="--xla_gpu_enable_triton_gemm=true" bench "$1" $B16 --batch 256 ;;
    # Which GEMMs get which epilogue: the HLO before and after each GEMM-related pass of a
    # one-block B/16 step (small, compile only).
    gemm_rewriter_dump) XLA_FLAGS="--xla_dump_to=$OUT/xla_dump --xla_dump_hlo_module_re=.*step.* --xla_dump_hlo_pass_re=gemm-fusion|cublas-gemm-rewriter|float-normalization.*|call-inliner" \
      bench "$1" --variant B/16 --dtype bfloat16 --batch 8 --depth 1 --compile_only ;;
    # Padding inside each block (q/k/v to 198, sliced back) instead of the tokens once (default).
    b16_bf16_b256_per_block) bench "$1" $B16 --batch 256 --attention_pad_multiple 1 ;;
    # cuDNN's LayerNorm kernels.
    b16_bf16_b256_cudnn_ln) XLA_FLAGS="--xla_gpu_enable_cudnn_layer_norm=true" bench "$1" $B16 --batch 256 ;;
    b16_bf16_b256_pad_once16) bench "$1" $B16 --batch 256 --attention_pad_multiple 16 ;;
    b16_bf16_b256_xla) bench "$1" $B16 --batch 256 --attention_impl xla ;;
    b16_bf16_b512_auto) bench "$1" $B16 --batch 512 ;;
    b16_bf16_b256_scan_dots) bench "$1" $B16 --batch 256 --scan --remat dots_with_no_batch_dims_saveable ;;
    b16_bf16_b256_auto_xla_flags) XLA_FLAGS="--xla_gpu_enable_cublaslt=true --xla_gpu_enable_cudnn_layer_norm=true --xla_gpu_experimental_enable_fusion_block_level_rewriter=true" \
      bench "$1" $B16 --batch 256 --attention_impl auto ;;
    l16_compile_unrolled) bench "$1" $L16 --compile_only ;;
    l16_compile_scan) bench "$1" $L16 --compile_only --scan ;;
    l16_bf16_b128_auto) bench "$1" $L16 --steps 5 --repeats 3 --attention_impl auto ;;
    l16_bf16_b128_xla) bench "$1" $L16 --steps 5 --repeats 3 --attention_impl xla ;;
  esac
}
for name in "$@"; do run "$name"; done

# At most 8 files come back from some hosts: pack the JSONs, HLO dumps and raw traces (one per
# profiled run, named after it) into one archive.
for dir in "$PROFILES"/*/; do
  trace=$(ls -t "$dir"plugins/profile/*/*.trace.json.gz 2>/dev/null | head -1)
  [[ -n $trace ]] && cp "$trace" "$OUT/$(basename "$dir").trace.json.gz"
done
(cd "$OUT" && tar -czf gpu_benchmarks.tar.gz $(ls -d *.json *.hlo.txt *.trace.json.gz xla_dump/*.txt 2>/dev/null) \
  && rm -rf *.json *.hlo.txt *.trace.json.gz xla_dump)
if [[ -f $OUT/gpu_benchmarks.tar.gz ]]; then
  echo "results: $OUT/gpu_benchmarks.tar.gz, $OUT/gpu_benchmarks.log"
else
  echo "no run wrote a result; the log: $OUT/gpu_benchmarks.log"
fi
