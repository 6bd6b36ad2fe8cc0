#!/usr/bin/env bash
# Issue 29's GPU table: SmolLM2-135M in bf16, calibration 16 x 2048 tokens of squad_wiki drawn with seeds 0, 1, 2,
# srid / wsvd / asvd / the seed's acur at 0.9 / 0.8 / 0.7 (fisher_error allocation), perplexity on new_wiki (every
# 2048-token window) and the offline suite cur4llm_zeroshot at its recommended limit (200 per task): every figure
# mean ± sd over the three seeds.
#
#   OUT=/some/dir GGUF_DIR=/dir/with/gguf_part_aa+ab bash experiments/paper_table_gpu.sh
#
# One 10-minute GPU call cannot hold 36 cells run one after another, so the grid runs as 12 compare.py processes
# at once on the one GPU, one per (method, ratio), each with all three seeds (the dense row in the first only),
# and `compare.py --merge` joins their JSONs into one table: $OUT/paper_table_gpu.{md,json,png}. Each process is
# cut at LIMIT seconds (default 480) and keeps the cells it finished (a cut cell is missing from the table, and
# the merged JSON says unfinished).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
export CUR4LLM_HOME=${CUR4LLM_HOME:-$HOME/.cache/cur4llm} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-480}
mkdir -p "$CUR4LLM_HOME/gguf"
if [ -n "${GGUF_DIR:-}" ]; then
  cat "$GGUF_DIR"/gguf_part_aa "$GGUF_DIR"/gguf_part_ab > "$CUR4LLM_HOME/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
$PY -c "import offline_resources as o; print('model:', o.offline_model_dir('smollm2-135m'))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/paper_table_gpu_device.txt" || true
BASE=(--model_id smollm2-135m --dtype bfloat16 --act_aware --alpha 0.5 --scaling_method abs_mean
      --calib_dataset squad_wiki --n_calib_samples 16 --calib_seqlen 2048 --eval_ppl new_wiki --eval_seqlen 2048
      --sensitivity_metric fisher_error --eval_batch_size 8 --cache_dir "$OUT/cache" --output_dir "$OUT")
EVAL=(--eval_tasks cur4llm_zeroshot --eval_limit 200)
$PY -c "import lm_eval" 2>/dev/null || { EVAL=(); echo "lm_eval is not installed here: perplexity only" | tee "$OUT/paper_table_gpu_no_lm_eval.txt"; }
pids=(); parts=()
for m in srid wsvd asvd acur; do
  for r in 0.9 0.8 0.7; do
    name="paper_table_gpu.$m.$r"; parts+=("$OUT/$name.json")
    dense=(--no_dense); [ "$m$r" = srid0.9 ] && dense=()
    timeout "$LIMIT" $PY tools/compare.py --name "$name" --methods "$m" --ratios "$r" --calib_seeds 3 \
      "${EVAL[@]}" "${dense[@]}" -- "${BASE[@]}" > "$OUT/$name.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p" || echo "a part exited with $?"; done
have=(); for f in "${parts[@]}"; do [ -f "$f" ] && have+=("$f"); done
$PY tools/compare.py --merge "${have[@]}" --name paper_table_gpu --output_dir "$OUT"
cat "$OUT/paper_table_gpu.md"
