#!/usr/bin/env bash
# Issue 29's GPU table: SmolLM2-135M in bf16, calibration 16 x 2048 tokens of squad_wiki drawn with seeds 0, 1, 2,
# srid / wsvd / asvd / the seed's acur at 0.9 / 0.8 / 0.7 (fisher_error allocation), perplexity on new_wiki (every
# 2048-token window) and the offline suite cur4llm_zeroshot at its recommended limit (200 per task): every figure
# mean ± sd over the three seeds.
#
#   OUT=/some/dir GGUF_DIR=/dir/with/gguf_part_aa+ab CELLS="srid:0.9 srid:0.8 ..." bash experiments/paper_table_gpu.sh
#
# Each (method, ratio) cell is one compare.py process with all three seeds; JOBS of them share the GPU at once
# (default one per 15 GiB of GPU memory, 5 on an H100, 9 on an H200: on one H100, 12 at once ran out of memory,
# up to 14 GiB a process; 6 at once took 354 s for six cells, acur's the longest, but on 2026-12-08 6 at once lost
# the cell that also ran the dense lm-eval to an out-of-memory error, 4 at once did not). A 10-minute call on an
# H100 holds five or six cells, so the 12-cell grid takes two or three calls on the same warm machine: CELLS picks
# the cells of a call, DENSE=1 (the default) adds the dense row to the first cell.
# The statistics and the dense figures are cached in CACHE (default /root/paper_table_cache, outside OUT, which
# the device tool empties before each call), so the second call reuses them. A process is cut at LIMIT seconds
# (default 480) and keeps the seeds it finished. The device tool returns at most 8 files: the logs, tables and
# plots are written in WORK (default a new temporary folder) and packed into $OUT/paper_table_gpu.tgz (every 20 s
# and at the end, so a call cut by its limit still returns what was done); $OUT holds only that and the merged
# table. Join the parts of all calls here with
#   python tools/compare.py --merge part1/*.json part2/*.json --name paper_table_gpu --output_dir DIR
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
export CUR4LLM_HOME=${CUR4LLM_HOME:-$HOME/.cache/cur4llm} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-480}
# processes at once: one per 15 GiB of GPU memory (5 on an 80 GB H100, 9 on a 141 GB H200), unless JOBS is given
gpu_gib=$( (nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null || true) | head -1 | awk '{print int($1/1024)}')
JOBS=${JOBS:-$(( ${gpu_gib:-80} / 15 ))}
CACHE=${CACHE:-/root/paper_table_cache}
CELLS=${CELLS:-"srid:0.9 srid:0.8 srid:0.7 wsvd:0.9 wsvd:0.8 wsvd:0.7 asvd:0.9 asvd:0.8 asvd:0.7 acur:0.9 acur:0.8 acur:0.7"}
DENSE=${DENSE:-1}
mkdir -p "$CUR4LLM_HOME/gguf" "$CACHE"
GGUF="$CUR4LLM_HOME/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -n "${GGUF_DIR:-}" ] && [ ! -s "$GGUF" ]; then
  cat "$GGUF_DIR"/gguf_part_aa "$GGUF_DIR"/gguf_part_ab > "$GGUF"
fi
$PY -c "import offline_resources as o; print('model:', o.offline_model_dir('smollm2-135m'))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$WORK/paper_table_gpu_device.txt" || true
BASE=(--model_id smollm2-135m --dtype bfloat16 --act_aware --alpha 0.5 --scaling_method abs_mean
      --calib_dataset squad_wiki --n_calib_samples 16 --calib_seqlen 2048 --eval_ppl new_wiki --eval_seqlen 2048
      --sensitivity_metric fisher_error --eval_batch_size 8 --cache_dir "$CACHE" --output_dir "$WORK")
EVAL=(--eval_tasks cur4llm_zeroshot --eval_limit 200)
$PY -c "import lm_eval" 2>/dev/null || { EVAL=(); echo "lm_eval is not installed here: perplexity only" | tee "$WORK/paper_table_gpu_no_lm_eval.txt"; }
pack() { tar czf "$OUT/.pack.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/.pack.tmp" "$OUT/paper_table_gpu.tgz"; }
( while sleep 20; do pack; done ) & packer=$!
pids=(); first=1
for cell in $CELLS; do
  m=${cell%%:*}; r=${cell##*:}
  while [ "$(jobs -rp | wc -l)" -gt "$JOBS" ]; do sleep 2; done  # the packer is one of the jobs
  name="paper_table_gpu.$m.$r"
  dense=(--no_dense); [ "$first$DENSE" = 11 ] && dense=(); first=0
  timeout "$LIMIT" $PY tools/compare.py --name "$name" --methods "$m" --ratios "$r" --calib_seeds 3 \
    "${EVAL[@]}" "${dense[@]}" -- "${BASE[@]}" > "$WORK/$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "a part exited with $?"; done
kill "$packer" 2>/dev/null || true
have=(); for f in "$WORK"/paper_table_gpu.*.json; do [ -f "$f" ] && have+=("$f"); done
[ ${#have[@]} -gt 0 ] && $PY tools/compare.py --merge "${have[@]}" --name paper_table_gpu --output_dir "$WORK" \
  && cp "$WORK/paper_table_gpu.md" "$OUT/" && cat "$OUT/paper_table_gpu.md"
pack
ls -la "$OUT/paper_table_gpu.tgz"
