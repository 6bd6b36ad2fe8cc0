#!/usr/bin/env bash
# Issue 30 on one GPU in one call (the device tool: 10 minutes, 8 files back): the device tests of the code the
# streamed pipeline runs, one layer fit's memory at the 70B shape, the 70B shape streamed on BLOCKS blocks (the issue
# extrapolates from at least 8), then the 7B shape streamed beside the in-memory run, each cut to the TOTAL seconds left.
#   OUT=/dir TOTAL=585 BLOCKS=8 bash experiments/stream_bench_gpu.sh       (ONLY=7b: the 7B comparison alone)
# PROFILE=1 adds --profile_stream: the time of every part of each pass (fisher recompute, covariance products,
# sensitivity rows, reads, writes, ...) per thread, printed after the stage table; the parts synchronise the
# device, so take the stage times from a run without it.
cd "$(dirname "$0")/.."
TOTAL=${TOTAL:-585}; BLOCKS=${BLOCKS:-8}
set -u; OUT=${OUT:?set OUT to the output folder}; mkdir -p "$OUT"
T0=$(date +%s); left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch, transformers, sys; print(torch.__version__, transformers.__version__, sys.version.split()[0])" | tee -a $OUT/device.txt
timeout 70 python3 -m pytest -q tests/test_devices.py tests/test_fast_layers.py tests/test_cur_math.py -k "cuda or all_finite" 2>&1 | tail -3 | tee $OUT/device_tests.txt
echo "\$ python tools/bench_layer_memory.py --shape llama-2-70b" > $OUT/layer_memory_70b.txt
timeout 90 python3 tools/bench_layer_memory.py --shape llama-2-70b >> $OUT/layer_memory_70b.txt 2>&1; cat $OUT/layer_memory_70b.txt
C="--method srid --sensitivity_metric fisher_error --n_calib_samples 16 --seqlen 2048 --dtype bfloat16 --eval_windows 8${PROFILE:+ --profile_stream}"
L=$(left); echo "70B budget $L s"; [ "$L" -gt 60 ] || exit 0
if [ "${ONLY:-all}" != 7b ]; then
echo "\$ python tools/bench_pipeline.py --stream --shape llama-2-70b --blocks $BLOCKS $C" > $OUT/stream_70b.log
timeout $L python3 tools/bench_pipeline.py --stream --shape llama-2-70b --blocks $BLOCKS $C --json_out $OUT/stream_70b.json 2>&1 | tr '\r' '\n' | grep -v "block/s\|it/s\|s/block\|s/it" >> $OUT/stream_70b.log; echo "rc=$?" >> $OUT/stream_70b.log
tail -$([ -n "${PROFILE:-}" ] && echo 50 || echo 16) $OUT/stream_70b.log
fi
L=$(left); echo "7B budget $L s"; [ "$L" -gt 200 ] || exit 0
echo "\$ python tools/bench_pipeline.py --stream --shape llama-2-7b $C --in_memory_too" > $OUT/stream_7b.log
timeout $L python3 tools/bench_pipeline.py --stream --shape llama-2-7b $C --in_memory_too --json_out $OUT/stream_7b.json 2>&1 | tr '\r' '\n' | grep -v "block/s\|it/s\|s/block\|s/it" >> $OUT/stream_7b.log
tail -$([ -n "${PROFILE:-}" ] && echo 50 || echo 14) $OUT/stream_7b.log
