#!/usr/bin/env bash
# Issue 28's GPU grid: structured CUR (whole neurons and KV groups kept, down_proj / o_proj refitted) beside
# srid and wsvd, on SmolLM2-135M in bf16 on one GPU, the protocol of issue 18: calibration squad_wiki 16 x 2048
# tokens (--act_aware --alpha 0.5 --scaling_method abs_mean, which srid and wsvd do not read), perplexity on
# new_wiki (held-out Wikipedia articles) over all its 2048-token windows, ratios 0.9 / 0.8 / 0.7 = kept
# fraction of the compressed linears' parameters, allocation by the closed-form loss (fisher_error).
#
#   OUT=/some/dir bash experiments/structured_gpu.sh         # the grid, one compare.py run (~5 min on one H100)
#   OUT=/some/dir bash experiments/structured_gpu.sh tests   # tests/test_structured.py on cpu and cuda first
#   N_CALIB=2 CALIB_LEN=128 NAME=structured_gpu_2x128 OUT=... bash experiments/structured_gpu.sh   # little calibration
#
# Specs (JOBS processes share the GPU, default one per spec): structured per_layer / uniform (MLPs and
# attentions), neurons per_layer / uniform (MLPs only, the CEO prototype's setting in its uniform form), srid
# and wsvd. The whole compare.py is cut at LIMIT seconds (default 450): compare.py then stops its children and
# writes the cells measured so far. Outputs: $OUT/structured_gpu.{md,json,png} (every cell's perplexity,
# reached ratio and per-linear widths), structured_gpu.part<i>.{log,json} per process, the device name.
# The model: the offline SmolLM2 (offline_resources.offline_model_dir); a machine without network needs its
# GGUF in place first: GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf, or GGUF_DIR=dir with the two halves
# gguf_part_aa / gguf_part_ab (as experiments/quality_h200.sh setup takes them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
export CUR4LLM_HOME=${CUR4LLM_HOME:-$HOME/.cache/cur4llm} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
JOBS=${JOBS:-6}
LIMIT=${LIMIT:-450}

mkdir -p "$CUR4LLM_HOME/gguf"
if [ -n "${GGUF:-}" ]; then
  cp "$GGUF" "$CUR4LLM_HOME/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
elif [ -n "${GGUF_DIR:-}" ]; then
  cat "$GGUF_DIR"/gguf_part_aa "$GGUF_DIR"/gguf_part_ab > "$CUR4LLM_HOME/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
$PY -c "import offline_resources as o; print('model:', o.offline_model_dir('smollm2-135m'))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/structured_gpu_device.txt" || true

if [ "${1:-grid}" = tests ]; then
  $PY -m pytest -q -p no:cacheprovider tests/test_structured.py 2>&1 | tee "$OUT/structured_gpu_tests.log"
fi

BASE=(--model_id smollm2-135m --dtype bfloat16 --act_aware --alpha 0.5 --scaling_method abs_mean
      --calib_dataset squad_wiki --n_calib_samples "${N_CALIB:-16}" --calib_seqlen "${CALIB_LEN:-2048}" --eval_ppl new_wiki --eval_seqlen 2048
      --sensitivity_metric fisher_error --use_cache --cache_dir "$OUT/cache" --output_dir "$OUT")
METHODS="structured,structured:structured_widths=uniform,neurons,neurons:structured_widths=uniform,srid,wsvd"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # JOBS processes share the host's cores
timeout "$LIMIT" $PY tools/compare.py --name "${NAME:-structured_gpu}" --jobs "$JOBS" --ratios 0.9,0.8,0.7 --methods "$METHODS" \
  -- "${BASE[@]}" 2>&1 | tee "$OUT/structured_gpu.log"
