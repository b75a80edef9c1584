#!/usr/bin/env bash
# The GPU proof, for one CUDA GPU with about 140 GB, in under 8 minutes (issue 12):
#   1. the AST budget table of benchmarks/ast_training.py (naive, fixed mask + KD, AST without decay, AST,
#      AST+SLoRB, all from the same Wanda 2:4 start) at the largest budget that fits: bf16, batch 64 x 256
#      tokens, 100 steps = 1.6M tokens per row (6x the CPU table);
#   2. `slimlm bench` of the AST model against dense on the semi-structured 2:4 kernels.
# Results: benchmarks/results/gpu/ (ast_budget.{json,md}, ast_budget_curves.png, bench.{json,png,txt}).
#
#   bash benchmarks/gpu_proof.sh                # on the GPU machine
#   DRY_RUN=1 bash benchmarks/gpu_proof.sh      # the same commands, tiny, on CPU (a smoke test)
# MODEL, DATA and OUT override the model (a built-in name or folder), the data folder and the results folder.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smollm2-135m}
DATA=${DATA:-../shared/data/sotu}
OUT=${OUT:-benchmarks/results/gpu}
RUNS=${RUNS:-runs/gpu-proof}
if [ "${DRY_RUN:-0}" = 1 ]; then
  device=cpu; steps=2; train="train.batch_size=1 data.seqlen=32 method.nsamples=2 data.eval_windows=2"
  windows="--test-windows 2"; bench="--batch-sizes 1 --seqlens 16 --layer-batches 4 --decode-tokens 2 --repeats 1"
else
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: run with DRY_RUN=1 for the CPU smoke test')"
  device=cuda; steps=100; train="train.batch_size=64 method.nsamples=128"
  windows=""; bench="--batch-sizes 1,8,32 --seqlens 128,512 --layer-batches 1,16,128,1024 --decode-tokens 32 --repeats 5"
fi
mkdir -p "$OUT"
start=$(date +%s)
python benchmarks/ast_training.py --data "$DATA" --steps "$steps" $windows --runs "$RUNS" --out "$OUT/ast_budget" \
  --oneshot none model="$MODEL" train.device="$device" $train
echo "table: $(( $(date +%s) - start )) s"
slimlm bench --model "$RUNS/ast" --dense "$MODEL" --device "$device" $bench \
  --json "$OUT/bench.json" --plot "$OUT/bench.png" | tee "$OUT/bench.txt"
echo "total: $(( $(date +%s) - start )) s"
