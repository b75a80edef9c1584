#!/usr/bin/env bash
# CPU speed of the compressed SmolLM2-135M models against the dense one (issue 6), with `slimlm bench`.
# Run from the project root after benchmarks/quant.py (which writes runs/bench-quant/*). Results:
# benchmarks/results/bench/NAME.{json,png,txt}.
set -euo pipefail
out=benchmarks/results/bench
mkdir -p "$out"
layers="--layer-batches 1,16,128,512 --repeats 7"
model="--batch-sizes 1,4 --seqlens 128 --decode-tokens 8"
run() {  # NAME MODEL [extra options]
  local name=$1 model_dir=$2; shift 2
  slimlm bench --model "$model_dir" --dense smollm2-135m "$@" --json "$out/$name.json" --plot "$out/$name.png" \
    2> >(tr '\r' '\n' | grep -v 'row/s\|s/row\|it/s\]' >&2) | tee "$out/$name.txt"
}
if [ "${1:-}" != "--quantized-only" ]; then
  run ast-2of4 runs/bench-ast-wanda/ast $layers $model
  run lpaf-0.5 runs/bench-lpaf/smollm2-lpaf-0.5 $layers $model
fi
# the CPU int4/int8 weight-only kernels are far slower than fp32 matmuls at many rows (see the layer rows),
# so their whole-model rows use batch 1 and a 32-token prompt to finish on a shared 2-core machine
small="--batch-sizes 1 --seqlens 32 --decode-tokens 8"
run 2of4-int4-g64 runs/bench-quant/2of4-int4-rtn $layers $small
# the CPU int8 weight-only kernel needs one scale per output channel: a per-channel RTN model
# (slimlm quantize --model runs/bench-ast-wanda/ast --bits 8 --group-size -1 --method rtn
#  --output runs/bench-quant/2of4-int8-rtn-channel)
run 2of4-int8-channel runs/bench-quant/2of4-int8-rtn-channel $layers $small
