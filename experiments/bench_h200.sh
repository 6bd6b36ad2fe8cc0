#!/usr/bin/env bash
# The GPU speed runs behind experiments/measured/h200_bench_*: random weights of LLaMA-2-7B's shapes on one H200.
#   bash experiments/bench_h200.sh pipeline   # issue 14: calibration .. compression with fisher_error + srid
#   bash experiments/bench_h200.sh inference  # issue 17: dense vs every layer form at ratio 0.8, research and fast
#   FORMS=compiled bash experiments/bench_h200.sh inference  # the same, decoder blocks torch.compile'd
# Outputs go to $OUT (default output/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
case "${1:-}" in
  pipeline)
    timeout "${LIMIT:-300}" python3 tools/bench_pipeline.py --shape llama-2-7b --sensitivity_metric fisher_error \
      --method "${METHOD:-srid}" --eval_windows 32 --json_out "$OUT/h200_bench_pipeline_7b_${METHOD:-srid}.json" \
      2>&1 | tr '\r' '\n' | grep -v "it/s\]$\|s/it\]$" > "$OUT/h200_bench_pipeline_7b_${METHOD:-srid}.log"
    grep "^\[bench\]" "$OUT/h200_bench_pipeline_7b_${METHOD:-srid}.log" ;;
  inference)
    timeout "${LIMIT:-235}" python3 tools/bench_inference.py --shape llama-2-7b --reps "${REPS:-2}" --prefill_batches 1 \
      --rank_aligns "${ALIGNS:-64}" --decode_tokens "${DECODE_TOKENS:-32}" --inference_forms "${FORMS:-research,fast}" --layer_tokens 1,16 --json_out "$OUT/h200_bench_inference_methods_llama-2-7b.json" \
      > "$OUT/h200_bench_inference_methods_llama-2-7b.txt" 2>&1
    tail -45 "$OUT/h200_bench_inference_methods_llama-2-7b.txt" ;;
  *) echo "usage: $0 pipeline | inference" >&2; exit 2 ;;
esac
