#!/usr/bin/env bash
# The GPU runs behind experiments/measured/h200_quality_*: SmolLM2-135M in bf16 on one H200, the protocol
# of issue 18 (calibration squad_wiki 16 x 2048, --act_aware --alpha 0.5 --scaling_method abs_mean,
# evaluation new_wiki = held-out Wikipedia articles, 2048-token windows, all of them).
#   bash experiments/quality_h200.sh setup D # SmolLM2 from its GGUF (carried in two halves under D); the texts are in data/
#   bash experiments/quality_h200.sh fast    # closed-form allocation (fisher_error) + srid ablation
#   bash experiments/quality_h200.sh ppl     # every method with the ppl sensitivity (ASVD's protocol)
#   bash experiments/quality_h200.sh lowdata # 2 x 128 and 4 x 512 calibration tokens
#   bash experiments/quality_h200.sh devices # the device-parametrised tests (CUDA side of issue 18)
# JOBS (default 4): compare.py --jobs, method specs run in that many processes sharing the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output}
export CUR4LLM_HOME=${CUR4LLM_HOME:-/root/cur4llm_home} PYTHONUNBUFFERED=1
BASE=(--model_id smollm2-135m --dtype bfloat16 --act_aware --alpha 0.5 --scaling_method abs_mean
      --calib_dataset squad_wiki --n_calib_samples 16 --calib_seqlen 2048 --eval_ppl new_wiki --eval_seqlen 2048
      --use_cache --output_dir "$OUT")
RATIOS=0.9,0.8,0.7,0.6
FE=sensitivity_metric=fisher_error
JOBS=${JOBS:-4}
case "${1:-}" in
  setup)  # $2: folder holding SmolLM2-135M-Instruct.Q4_1.gguf's two halves (the texts are carried in data/)
    mkdir -p "$CUR4LLM_HOME/gguf"
    cat "$2"/gguf_part_aa "$2"/gguf_part_ab > "$CUR4LLM_HOME/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 -c "import offline_resources as o; print(o.offline_model_dir('smollm2-135m'))" ;;
  fast)
    python3 tools/compare.py --name h200_quality_fisher_error --jobs "$JOBS" --ratios $RATIOS --methods \
"wsvd:$FE,rowid:$FE,srid:$FE,srid:correct=1:$FE,srid:sequential=0:$FE,srid:fisher=0:$FE,srid:shrink=0:$FE,colid:$FE,asvd:$FE,acur:$FE" \
      -- "${BASE[@]}" ;;
  ppl)
    python3 tools/compare.py --name h200_quality_ppl --jobs "$JOBS" --ratios $RATIOS --methods "${2:-acur,acur:u_mode=data_aware,asvd,wsvd,rowid,colid,srid}" \
      -- "${BASE[@]}" --sensitivity_metric ppl ;;  # ppl's default candidates: 0.4, 0.5, ..., 0.9
  lowdata)
    for nl in "2 128" "4 512"; do set -- $nl
      python3 tools/compare.py --name "h200_quality_calib_${1}x${2}" --jobs "$JOBS" --ratios 0.9,0.8 \
        --methods "asvd:$FE,wsvd:$FE,rowid:$FE,srid:$FE,acur,asvd,wsvd,srid" \
        -- "${BASE[@]}" --n_calib_samples "$1" --calib_seqlen "$2"
    done ;;
  devices)
    python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_property_compress.py ;;
  *) echo "usage: $0 setup DIR | fast | ppl [METHODS] | lowdata | devices" >&2; exit 2 ;;
esac
