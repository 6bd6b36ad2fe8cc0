"""ACUR: compress a causal LM's linear layers with activation-aware CUR, then evaluate it.

    python acur.py --model_id smollm2-135m --act_aware --alpha 0.5 --param_ratio_target 0.9 \\
        --calib_dataset squad_wiki --eval_ppl new_wiki --use_cache

Stages: load -> calibration data -> activation statistics -> sensitivity -> per-layer ratio search
-> CUR replacement -> evaluation. Every stage passes plain dicts; the run ends in one JSON file
under output/ (schema in README_CUR4LLM.md).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import os
import json
import platform
import re
import signal
import sys
import time
from typing import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

import binary_search
import datautils
import evaluate_utils
import quantization
import selfgen_utils
import sensitivity as sens
import structured
from act_aware_utils import (block_covariances, calib_scales, calibrate_block, finite_fisher, input_covariances,
                             output_fisher, scales_of, sequential_calibration)
from acur_args import (build_parser, check_ppl_target, check_rank_align, cur_settings, lm_eval_tasks, lm_task_metadata,
                       method_settings, needs_covariance, needs_fisher, parse_kv_fractions, sensitivity_ratios,
                       validate_args, validate_stream_args)
from datautils import UsageError, code_digest, eval_datasets, fetch_texts, init_distributed, load_model
from evaluate_utils import (broken_result, evaluate_perplexity, nothing_compressed, perplexity_of_windows,
                            rank_align_warning, summarize_params)
import kv_compress
import model_loading
import streamed
from modules import registry
from modules.decompositions import release_pick_graphs
from modules.low_rank_linear import LayerStats, compress_linear
from modules.model_utils import LinearInfo, find_linears, materialized, replace_module

RESULT_SCHEMA = "cur4llm.result/1"


class Terminated(BaseException):
    """Raised in the main thread by main's SIGTERM handler (what schedulers send before preemption);
    a BaseException like KeyboardInterrupt, so no `except Exception` on the way swallows it."""


# What the running pipeline has finished and saved, for main's one-line interrupt report, and the run's
# warnings list (results["warnings"]), where the stages' cache loads record an entry they could not use.
_RUN_STATE: dict = {"stage": None, "saved": {}, "warnings": []}


def add_warning(results: dict, msg: str) -> None:
    """A loud WARNING line now, and the same text in results["warnings"] (the JSON keeps it)."""
    print(f"WARNING: {msg}", flush=True)
    results.setdefault("warnings", []).append(msg)


# ---------------------------------------------------------------- stages
def warn_on_report(results: dict, report: dict, trace: list[dict], args: argparse.Namespace) -> dict | None:
    """Record the finished compression's warnings (nothing compressed, ranks off the alignment) in the results;
    returns the nothing-compressed flag. One place for the in-memory and the streamed run."""
    flag = nothing_compressed(report, trace, args)
    if flag:
        results["nothing_compressed"] = flag
        add_warning(results, f"NOTHING COMPRESSED: {flag['reason']}; the model stays dense and the "
                             "perplexities below are the DENSE model's")
    align = rank_align_warning(report, args.rank_align)
    if align:
        add_warning(results, align)
    return flag


def select_linears(model, args) -> list[LinearInfo]:
    """The linears this run compresses: decoder-block linears (lm_head on request), optionally filtered."""
    try:
        linears = find_linears(model, include_lm_head=args.compress_lm_head)
    except ValueError as exc:  # an unknown layout (GPT-2's transformer.h): one line, before any heavy work
        raise UsageError(str(exc)) from None
    if getattr(args, "compress_kv_cache", False):  # KV-cache mode: k_proj / v_proj only
        try:
            kv_compress.check_kv_support(model)
        except ValueError as exc:
            raise UsageError(f"--compress_kv_cache: {exc}") from None
        linears = [i for i in linears if kv_compress.is_kv_linear(i.name)]
    if args.layer_filter:
        linears = [i for i in linears if re.search(args.layer_filter, i.name)]
        if not linears:
            raise UsageError(f"--layer_filter {args.layer_filter!r} matches no linear layer")
    if not registry.get(args.method).per_linear:
        try:  # blocks structured compression does not know fail here, in one line
            structured.find_units(model, linears, args.method)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return linears


def layer_scale(scales: dict | None, name: str):
    return scales.get(name) if scales else None


def compress_model(linears: list[LinearInfo], ratios: dict[str, float], scales: dict | None,
                   args, desc: str | None = "CUR replacement", covs: dict | None = None,
                   stats: dict[str, LayerStats] | None = None, sequential: tuple | None = None,
                   generator: torch.Generator | None = None, block_stream: tuple | None = None) -> dict[str, dict]:
    """Replace every linear whose ratio is below 1 by its low-rank module (--method; CURLinear for acur).
    covs: input covariances, for the data-aware methods; stats: everything calibration measured per
    layer (layer_stats). sequential = (model, calib_ids): methods the registry marks sequential are
    fitted block by block on the compressed model's own inputs. Returns a per-layer report.

    The streamed pipeline calls it once per block: `linears` = that block's, block_stream = (block,
    compressed stream, dense stream or None, the block's kwargs per batch) for the sequential methods
    (act_aware_utils.calibrate_block), and one `generator` carried across the blocks (the seeded picks
    of --selection sample then draw what the whole-model call draws)."""
    if not registry.get(args.method).per_linear:  # whole neurons and heads: the block walk of structured.py
        return structured.compress(sequential[0], linears, ratios, stats or {}, sequential[1], args, desc=desc)
    if getattr(args, "compress_kv_cache", False):  # ratios are rank fractions of the K/V width
        return kv_compress.compress_kv_linears(linears, ratios, scales, args.alpha, cur_settings(args), args.seed,
                                               desc=desc and desc + " (KV)")
    report = {}
    gen = generator if generator is not None else torch.Generator().manual_seed(args.seed)

    def fit(info: LinearInfo, st: LayerStats | None) -> None:
        m, n = info.module.weight.shape
        r = ratios.get(info.name, 1.0)
        row = {"ratio": r, "shape": [m, n], "params_dense": m * n, "rank": None,
               "params": m * n, "fallback": ""}
        if r < 1:
            with materialized(info.module):  # offloaded (--device_map auto): the real weight, loaded for the fit
                cur = compress_linear(info.module, r, scale=layer_scale(scales, info.name), alpha=args.alpha,
                                      cov=None if st is not None else layer_scale(covs, info.name), generator=gen,
                                      stats=st, **method_settings(args))
            row.update(rank=cur.rank, params=cur.param_count(), fallback=cur.fallback)
            if cur.fallback:
                print(f"WARNING: {info.name}: {cur.fallback}")
            replace_module(info, cur)
        report[info.name] = row

    try:
        if (sequential is not None or block_stream is not None) and registry.get(args.method).sequential:
            def fit_group(group: list[LinearInfo], measured: dict) -> None:
                for info in group:
                    base = (stats or {}).get(info.name) or LayerStats()
                    m = measured[info.name]
                    fit(info, dataclasses.replace(base, cov=m["cov"], cross=m["cross"], n_tokens=m["n_tokens"]))
            if block_stream is not None:
                block, h_c, h_d, block_kwargs = block_stream
                calibrate_block(block, linears, h_c, h_d, block_kwargs, fit_group)
            else:
                model, calib_ids = sequential
                sequential_calibration(model, linears, calib_ids, args.calib_batch_size, fit_group,
                                       desc=desc or "sequential calibration", cross=registry.get(args.method).correct)
            return {i.name: report[i.name] for i in linears}  # execution order
        for info in tqdm(linears, desc=desc, disable=desc is None):
            fit(info, (stats or {}).get(info.name))
        return report
    finally:
        release_pick_graphs()  # the cached fp64 Grams of the row picks are not the model's


def layer_stats(linears: list[LinearInfo], scales: dict | None, covs: dict | None, fisher: dict | None,
                n_tokens: int) -> dict[str, LayerStats]:
    """Everything calibration measured, per layer, as the registry's methods read it."""
    return {i.name: LayerStats(scale=layer_scale(scales, i.name), cov=layer_scale(covs, i.name),
                               row_weight=layer_scale(fisher, i.name), n_tokens=n_tokens) for i in linears}


def restore_model(linears: list[LinearInfo], originals: dict) -> None:
    for info in linears:
        replace_module(info, originals[info.name])
    structured.restore_widths(info.parent for info in linears)  # structured methods' width attributes


def cache_key(args, fp: dict, kind: str, linears: list[LinearInfo]) -> dict:
    key = {**fp, "kind": kind, "code": code_digest(kind), "dataset": args.calib_dataset,
           "n": args.n_calib_samples, "seqlen": args.calib_seqlen, "seed": args.seed, "bos": args.use_bos,
           "scaling": args.scaling_method if args.act_aware else "none"}
    if args.calib_dataset in datautils.OFFLINE_DATASETS or args.calib_dataset.startswith("text:"):
        # the local text itself, not its name: an edited file or a new carried text is a new key
        key["text"] = datautils.text_digest(datautils.get_text(args.calib_dataset, "train"))
    if kind == "sensitivity":
        key.update(metric=args.sensitivity_metric, alpha=args.alpha if args.act_aware else None,
                   ratios=sensitivity_ratios(args), layers=[i.name for i in linears],
                   **cur_settings(args))
        if getattr(args, "method", "acur") != "acur":  # acur keys stay as before: existing caches stay valid
            key.update(method=args.method)
        if not registry.get(args.method).per_linear:
            key.update(structured_selection=args.structured_selection)
        if needs_covariance(args):
            key.update(cov_damp=args.cov_damp)
        if getattr(args, "compress_kv_cache", False):
            key.update(kv_cache=True, ratios=parse_kv_fractions(args.kv_rank_fractions))
    return key


def cached_layer_tensors(kind: str, key: dict, args, linears, label: str, compute: Callable[[], dict]) -> dict:
    """datautils.cached_layer_tensors under --use_cache / --cache_dir; what it saves enters the interrupt report,
    a cache entry it cannot use the run's warnings."""
    return datautils.cached_layer_tensors(kind, key, [i.name for i in linears], label, compute, args.use_cache,
                                          args.cache_dir, _RUN_STATE["saved"], _RUN_STATE["warnings"])


def stage_scales(model, linears, calib_ids, args, fp) -> dict | None:
    if not args.act_aware:
        return None
    return cached_layer_tensors(
        "scales", cache_key(args, fp, "scales", linears), args, linears, "activation statistics",
        lambda: calib_scales(model, linears, calib_ids, args.scaling_method, args.calib_batch_size))


def stage_covariance(model, linears, calib_ids, args, fp) -> dict | None:
    """Input covariance E[x x^T] of every linear, only when the method or the metric reads it (cached)."""
    if not needs_covariance(args):
        return None
    return cached_layer_tensors(
        "covariance", {**cache_key(args, fp, "covariance", linears), "scaling": None}, args, linears,
        "input covariances", lambda: input_covariances(model, linears, calib_ids, args.calib_batch_size))


def stage_fisher(model, linears, calib_ids, args, fp) -> dict | None:
    """Output fisher (the loss's sensitivity to every output of every linear), when read (cached)."""
    if not needs_fisher(args):
        return None
    return cached_layer_tensors(
        "fisher", {**cache_key(args, fp, "fisher", linears), "scaling": None}, args, linears, "output fisher",
        lambda: output_fisher(model, linears, calib_ids, 1))


def sensitivity_cache(args, fp: dict, linears: list[LinearInfo]) -> tuple[dict, Path]:
    """(key, path) of the sensitivity table's cache file."""
    key = cache_key(args, fp, "sensitivity", linears)
    kv_mode = getattr(args, "compress_kv_cache", False)
    return key, datautils.cache_path(f"sensitivity_{'kv_' if kv_mode else ''}{args.sensitivity_metric}", key,
                                     args.cache_dir, ".json")


def stage_sensitivity(model, linears, calib_ids, scales, args, fp, covs: dict | None = None,
                      stats: dict | None = None) -> tuple[dict, dict]:
    """(table, info). With --use_cache the table is saved after every layer and resumed, under an
    exclusive lock beside the cache file: a second identical run waits, then reads the finished table
    instead of computing every layer again. (Not under torchrun: the ranks share the work already.)"""
    _, path = sensitivity_cache(args, fp, linears)
    lock = datautils.file_lock(path.with_name(path.name + ".lock"), "sensitivity") \
        if args.use_cache and sens.dist_rank_world()[1] == 1 else contextlib.nullcontext()
    with lock:
        try:
            return sensitivity_table(model, linears, calib_ids, scales, args, fp, covs, stats)
        finally:
            release_pick_graphs()


def sensitivity_table(model, linears, calib_ids, scales, args, fp, covs: dict | None = None,
                      stats: dict | None = None) -> tuple[dict, dict]:
    """(table, info) of stage_sensitivity, without the lock."""
    key, path = sensitivity_cache(args, fp, linears)
    kv_mode = getattr(args, "compress_kv_cache", False)
    done, info = {}, {"cache": str(path), "from_cache": 0, "computed": 0}
    if args.use_cache:
        blob = datautils.load_json_cache(path, key, _RUN_STATE["warnings"])
        if blob is not None:
            done = blob.get("table", {})
            print(f"[acur] sensitivity: {len(done)}/{len(linears)} layers from cache {path}")
            _RUN_STATE["saved"]["sensitivity"] = f"sensitivity {len(done)}/{len(linears)} layers in {path}"
    info["from_cache"] = len(done)

    def save(table):
        if args.use_cache:
            datautils.save_json_cache(path, key, {"table": table, "complete": len(table) == len(linears)})
            _RUN_STATE["saved"]["sensitivity"] = f"sensitivity {len(table)}/{len(linears)} layers in {path}"

    ratios = sensitivity_ratios(args)
    if not registry.get(args.method).per_linear:  # closed-form refit loss per unit (MLP / attention) and width
        units = structured.find_units(model, linears, args.method)
        fractions = ratios if args.sensitivity_ratios is not None else None
        table = structured.sensitivity(units, stats or {}, args, fractions, done, save)
    elif kv_mode:  # candidates are rank fractions of the K/V width
        table = kv_compress.kv_sensitivity(args.sensitivity_metric, model, linears, calib_ids,
                                           parse_kv_fractions(args.kv_rank_fractions), scales, stats, args.alpha,
                                           cur_settings(args), args.calib_batch_size, done, save)
    else:
        table = sens.sensitivity_table(args.sensitivity_metric, model, linears, calib_ids, ratios, scales, args.alpha,
                                       method_settings(args), args.calib_batch_size, fast=not args.no_fast_sensitivity,
                                       compile_blocks={"auto": None, "on": True, "off": False}[args.compile_blocks],
                                       covs=covs, stats=stats, done=done, on_progress=save)
    info["computed"] = len(table) - info["from_cache"]
    return table, info


def stage_search(model, linears, calib_ids, scales, table, args, covs: dict | None = None,
                 stats: dict | None = None) -> tuple[dict, list]:
    """Per-layer ratios from the sensitivity table: ASVD's sorted-triples cut for ppl-like scores, the
    Lagrangian allocation for the additive loss estimates of --sensitivity_metric fisher_error."""
    shapes = {i.name: tuple(i.module.weight.shape) for i in linears}
    additive = args.sensitivity_metric == "fisher_error"
    if getattr(args, "compress_kv_cache", False):
        try:
            search = binary_search.search_kv_ratio_allocated if additive else binary_search.search_kv_ratio
            return search(table, shapes, args.kv_cache_ratio_target, args.rank_align), []
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not registry.get(args.method).per_linear:
        units = structured.find_units(model, linears, args.method)
        try:
            return structured.search(units, linears, table, args.param_ratio_target, args.structured_widths,
                                     args.rank_align), []
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.param_ratio_target != -1:
        try:
            search = binary_search.search_param_ratio_allocated if additive else binary_search.search_param_ratio
            return search(table, shapes, args.param_ratio_target, args.rank_align, method=args.method), []
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    originals = {i.name: i.module for i in linears}

    def evaluate(ratios):
        compress_model(linears, ratios, scales, args, desc=None, covs=covs, stats=stats,
                       sequential=(model, calib_ids))
        try:
            return perplexity_of_windows(model, calib_ids, args.calib_batch_size, desc="ppl search")
        finally:
            restore_model(linears, originals)

    if additive:
        return binary_search.search_ppl_allocated(table, shapes, args.ppl_target, evaluate, args.rank_align,
                                                  args.method)
    return binary_search.search_ppl(table, shapes, args.ppl_target, evaluate)


def stage_eval(model, tokenizer, args, label: str) -> dict[str, float]:
    out = {}
    bos = tokenizer.bos_token_id if args.use_bos else None
    for name in eval_datasets(args):
        ids = datautils.get_eval_ids(name, tokenizer)
        out[name] = evaluate_perplexity(model, ids, args.eval_seqlen, args.eval_batch_size,
                                        args.eval_max_windows, bos, desc=f"{label} ppl {name}")
        print(f"[acur] {label} perplexity {name}: {out[name]:.4f}")
    return out


def stage_eval_lm(model, tokenizer, args) -> tuple[dict, dict]:
    """({task: acc, ..., "<group>_mean": ..}, details) of the in-memory model through lm-eval's HFLM."""
    out = evaluate_utils.evaluate_lm_tasks(model, tokenizer, lm_eval_tasks(args), limit=args.eval_limit,
                                           batch_size=args.eval_batch_size, metadata=lm_task_metadata(args))
    info = {k: v for k, v in out.items() if k != "acc"}
    info.update(tasks=lm_eval_tasks(args), limit=args.eval_limit, num_fewshot=0,
                mc_task=(args.mc_task or datautils.DEFAULT_MC_TASK) if "bigbench_mc" in lm_eval_tasks(args) else None)
    return out["acc"], info


def prepare_selfgen(model, tokenizer, args, fp) -> tuple[str, dict]:
    """(text, info) of --calib_dataset selfgen: the dense model's own samples (cached with --use_cache)."""
    return selfgen_utils.prepare_selfgen_text(model, tokenizer, args.n_calib_samples, args.calib_seqlen, args.seed,
                                              args.calib_batch_size, args.cache_dir if args.use_cache else None, fp,
                                              warnings=_RUN_STATE["warnings"])


def stage_kv_cache(model, args) -> dict:
    """KV-cache mode: switch attention to the low-rank cache; report what it holds per token."""
    return kv_compress.enable_kv_cache(model, args.kv_cache_ratio_target)


def write_results(results: dict, args) -> Path:
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.run_name or "{}_{}_{}".format(
        dt.datetime.now().strftime("%Y%m%d-%H%M%S"), re.sub(r"[^\w.\-]", "_", args.model_id),
        "raw" if args.raw_model else f"kv{args.kv_cache_ratio_target}" if args.compress_kv_cache else
        (f"r{args.param_ratio_target}" if args.param_ratio_target != -1
                                      else f"ppl{args.ppl_target}"))
    path = out_dir / f"{name}.json"
    datautils.atomic_write_bytes(path, json.dumps(results, indent=1, default=str).encode())
    return path


# ---------------------------------------------------------------- streamed runs (streamed.py walks the blocks)
# arguments that change no per-block result of a streamed run (evaluation and where things go): a resume may differ
STREAM_KEY_SKIP = ("eval_ppl", "eval_seqlen", "eval_max_windows", "eval_batch_size", "eval_dense", "eval_mmlu",
                   "eval_tasks", "eval_limit", "mc_task", "output_dir", "cache_dir", "use_cache", "run_name", "stream",
                   "stream_dir", "device", "compile_blocks", "no_fast_sensitivity", "device_map", "max_memory",
                   "stream_ram_gib", "stream_micro_batch")
STREAM_KEY_LABELS = {"model_files": "the checkpoint (its config and weight files)",
                     "code": "the code (a source file streamed results depend on changed)",
                     "calib_text": "the calibration text"}


def wants_stream(args) -> bool:
    """--stream on; --stream auto when the weights would not fit the device's free memory (one printed line,
    and the options a streamed run cannot honour refused); in-memory otherwise."""
    if args.stream == "on":
        return True
    if args.stream == "off" or args.raw_model or getattr(args, "device_map", "none") == "auto" \
            or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    fits, why = model_loading.fits_in_memory(args)
    if fits:
        return False
    validate_stream_args(args, why)
    print(f"[acur] {why}: streaming the model block by block (--stream; --stream off loads it whole)", flush=True)
    return True


def stream_dir(args) -> Path:
    if args.stream_dir:
        return Path(args.stream_dir)
    model = args.model_id.rstrip("/")
    tag = hashlib.sha256(model.encode()).hexdigest()[:8]  # two checkpoints of one name get two folders
    name = re.sub(r"[^\w.\-]", "_", Path(model).name or model) + f"-{tag}" + (f"-{args.run_name}" if args.run_name else "")
    return Path(args.output_dir) / f"stream-{name}"


def stream_key(args, fp: dict) -> dict:
    """Every input a streamed run's per-block results depend on (RunFolder refuses another run's folder)."""
    key = {f"arg:{k}": v for k, v in vars(args).items() if k not in STREAM_KEY_SKIP}
    key.update(model_files=fp, code=code_digest("stream"))
    if args.calib_dataset in datautils.OFFLINE_DATASETS or args.calib_dataset.startswith("text:"):
        key["calib_text"] = datautils.text_digest(datautils.get_text(args.calib_dataset, "train"))
    return key


def stream_rows(args, scales: dict | None, n_tokens: int) -> Callable:
    """rows(infos, measured) of streamed.py: this block's sensitivity rows, as stage_sensitivity computes them
    for the whole table (measured: {"abs": activation statistics} or {"cov": .., "fisher": ..})."""
    ratios, settings = sensitivity_ratios(args), method_settings(args)

    def rows(infos: list[LinearInfo], measured: dict) -> dict:
        if "abs" in measured:  # weight-only metrics, in the statistics pass: this block's scales only
            block_scales = scales_of(measured["abs"], args.scaling_method) if args.act_aware else None
            return sens.sensitivity_table(args.sensitivity_metric, None, infos, None, ratios, block_scales,
                                          args.alpha, settings, bar=False)
        fisher, _ = finite_fisher(measured["fisher"])
        stats = layer_stats(infos, scales, measured["cov"], fisher, n_tokens)
        return sens.sensitivity_table(args.sensitivity_metric, None, infos, None, ratios, scales, args.alpha,
                                      settings, stats=stats, bar=False)
    return rows


def stream_fit_block(block, infos: list[LinearInfo], h_c, h_d, block_kwargs: list[dict], gen: torch.Generator, *,
                     ratios: dict, scales: dict | None, stats: dict, args) -> dict:
    """compress_model on one streamed block: sequential methods on the carried streams (calibrate_block),
    the others with the block's dense input covariances measured first when they read them."""
    sub = {i.name: stats[i.name] for i in infos}
    if registry.get(args.method).sequential:
        return compress_model(infos, ratios, scales, args, desc=None, stats=sub, generator=gen,
                              block_stream=(block, h_c, h_d, block_kwargs))
    covs = None
    if h_d is not None:  # as input_covariances measures them, the dense stream advanced through the dense block
        covs = block_covariances(block, infos, h_d, block_kwargs, on_device=True)
        sub = {name: dataclasses.replace(st, cov=covs[name]) for name, st in sub.items()}
    return compress_model(infos, ratios, scales, args, desc=None, covs=covs, stats=sub, generator=gen)


def stream_eval(sm, tokenizer, args, progress, blocks: Callable, label: str) -> dict[str, float]:
    """stage_eval, block by block."""
    out = {}
    bos = tokenizer.bos_token_id if args.use_bos else None
    for name in eval_datasets(args):
        ids = evaluate_utils.windows(datautils.get_eval_ids(name, tokenizer), args.eval_seqlen, args.eval_max_windows, bos)
        out[name] = streamed.perplexity(sm, ids, args.eval_batch_size, blocks, progress, f"{label} ppl {name}")
        print(f"[acur] {label} perplexity {name}: {out[name]:.4f}")
    return out


def stream_plan(args) -> dict:
    """Which passes a streamed run makes and which streams its compression carries."""
    spec = registry.get(args.method)
    fisher = needs_fisher(args)
    weight_metric = args.sensitivity_metric in ("stable_rank", "spectral")
    return {"statistics": args.act_aware or weight_metric or fisher, "store_inputs": fisher, "reverse": fisher,
            "covariances": args.sensitivity_metric == "fisher_error", "weight_rows": weight_metric,
            "compressed_stream": spec.sequential,
            "dense_stream": spec.correct if spec.sequential else spec.needs_covariance(args.u_mode)}


def open_stream_folder(sm, args, key: dict, path: Path) -> tuple[streamed.RunFolder, dict]:
    """(run folder, disk figures): the folder opened (refused when it holds another run), the disk a run will
    need printed before it starts, refused when the folder's file system has less free."""
    plan = stream_plan(args)
    disk = streamed.disk_needed(sm, args.n_calib_samples, args.calib_seqlen, plan["store_inputs"],
                                int(plan["dense_stream"]), args.param_ratio_target)  # (only the dense stream is carried)
    budget = stream_ram_budget(args, disk, plan["store_inputs"])
    folder = streamed.RunFolder(path, key, STREAM_KEY_LABELS, ram_budget=budget)
    free = folder.free_bytes()
    print(f"[acur] stream: run folder {folder.path} ({'resumed' if folder.resumed else 'new'}); disk needed up to "
          f"{disk['need'] / 2**30:.2f} GiB (statistics {disk['statistics'] / 2**30:.2f} GiB, compressed blocks and "
          f"carried inputs {disk['compress'] / 2**30:.2f} GiB), {free / 2**30:.1f} GiB free there", flush=True)
    if disk["need"] > free:
        raise UsageError(f"--stream needs up to {disk['need'] / 2**30:.1f} GiB in {folder.path}, only "
                         f"{free / 2**30:.1f} GiB free there; choose another --stream_dir")
    return folder, disk


RAM_FRACTION = 0.5  # of the available host RAM, for the stored inputs by default (the rest: blocks, the writer)


def stream_ram_budget(args, disk: dict, store_inputs: bool) -> int:
    """Bytes of host RAM the stored block inputs may take (--stream_ram_gib, else RAM_FRACTION of the available
    RAM), with a printed line saying where they will be: in RAM, partly on disk, or on disk."""
    if not store_inputs:
        return 0
    if args.stream_ram_gib is not None:
        budget, why = int(args.stream_ram_gib * 2**30), "--stream_ram_gib"
    else:
        free = model_loading.free_memory(torch.device("cpu")) or 0
        budget, why = int(RAM_FRACTION * free), f"half of the {free / 2**30:.1f} GiB of RAM available"
    need = disk["stored_inputs"]
    where = ("in RAM" if need <= budget else "on disk" if budget < disk["boundary"] else
             f"in RAM up to {budget // disk['boundary']} block(s) at a time, the rest on disk")
    print(f"[acur] stream: stored block inputs {need / 2**30:.2f} GiB {where} (RAM budget {budget / 2**30:.2f} GiB: "
          f"{why})", flush=True)
    return budget


MICRO_FRACTION = 0.25  # of the device's free memory, for a covariance micro-batch's activations and product


def stream_micro_batches(args, sm, covariances: bool) -> tuple[int, int]:
    """(fisher, covariance) calibration samples per block recompute of the reverse pass: --stream_micro_batch
    for both, or automatic: 1 for the fisher (output_fisher's batches), --calib_batch_size for the
    covariances, halved while streamed.reverse_micro_bytes exceeds MICRO_FRACTION of the free device
    memory. Printed in one line with the estimate."""
    n = args.n_calib_samples
    if args.stream_micro_batch < 0:
        raise UsageError(f"--stream_micro_batch must be 0 (automatic) or a number of samples, got "
                         f"{args.stream_micro_batch}")
    if args.stream_micro_batch:
        m = min(args.stream_micro_batch, n)
        fisher, cov, why = m, m, "--stream_micro_batch"
    else:
        fisher, cov = 1, min(args.calib_batch_size, n)
        free = model_loading.free_memory(sm.device)
        while free is not None and cov > 1 and \
                streamed.reverse_micro_bytes(sm, cov, args.calib_seqlen)["covariance"] > MICRO_FRACTION * free:
            cov = (cov + 1) // 2
        why = "automatic" + (f", {free / 2**30:.1f} GiB free on {sm.device.type}" if free is not None else "")
    est = streamed.reverse_micro_bytes(sm, max(fisher, cov), args.calib_seqlen)
    print(f"[acur] stream: reverse pass in micro-batches of {fisher} sample(s) for the output fisher"
          + (f", {cov} for the input covariances" if covariances else "")
          + f" ({why}; activations and covariance products up to {est['covariance' if covariances else 'fisher'] / 2**30:.2f} "
            "GiB a recompute)", flush=True)
    return fisher, cov


def stored_inputs_report(folder: streamed.RunFolder) -> dict:
    """Where the stored block inputs went: RAM budget and peak (bytes), entries held in RAM and written."""
    return {"ram_budget_bytes": folder.ram_budget, "ram_peak_bytes": folder.ram_peak,
            "in_ram": folder.ram_entries, "on_disk": folder.disk_entries}


def stream_passes(args, n_eval: int) -> int:
    """Passes over the blocks a streamed run makes (the progress bar's total is this times the blocks)."""
    plan = stream_plan(args)
    return int(plan["statistics"]) + int(plan["reverse"]) + 1 + n_eval


def stream_compress(sm, linears: list[LinearInfo], calib_ids: torch.Tensor, args, folder: streamed.RunFolder,
                    progress: streamed.StreamProgress, results: dict, timed: Callable) -> dict[str, dict]:
    """The compression stages of a streamed run (statistics, reverse, search, compress), their results
    recorded in `results` as run_pipeline records them; returns the per-layer report."""
    plan = stream_plan(args)
    names = [i.name for i in linears]
    n_tokens = calib_ids.numel()
    abs_stats, table = {}, {}
    if plan["statistics"]:
        abs_stats, table = timed("statistics", streamed.statistics_pass, sm, names, calib_ids,
                                 args.calib_batch_size, folder, progress, args.act_aware, plan["store_inputs"],
                                 stream_rows(args, None, n_tokens) if plan["weight_rows"] else None)
    scales = scales_of(abs_stats, args.scaling_method) if args.act_aware else None
    fisher = None
    if plan["reverse"]:
        micro = stream_micro_batches(args, sm, plan["covariances"])
        results.setdefault("stream", {})["micro_batch"] = {"fisher": micro[0], "covariance": micro[1]}
        fisher, rows_b = timed("reverse", streamed.reverse_pass, sm, names, calib_ids, args.calib_batch_size,
                               folder, progress, plan["covariances"],
                               stream_rows(args, scales, n_tokens) if plan["covariances"] else None, micro)
        table = table or rows_b
        fisher, uniform = finite_fisher(fisher)
        if uniform:
            add_warning(results, f"output fisher not finite in {len(uniform)} layer(s), weighted uniformly: "
                                 f"{', '.join(uniform)}")
    table = {name: table[name] for name in names}  # the in-memory table's order (the allocation reads it)
    stats = layer_stats(linears, scales, None, fisher, n_tokens)
    ratios, _ = timed("search", stage_search, sm.model, linears, calib_ids, scales, table, args)
    gen = torch.Generator().manual_seed(args.seed)
    fit = functools.partial(stream_fit_block, ratios=ratios, scales=scales, stats=stats, args=args)
    report = timed("compress", streamed.compress_pass, sm, names, calib_ids, args.calib_batch_size, folder,
                   progress, fit, plan["compressed_stream"], plan["dense_stream"], gen)
    results["method"] = args.method
    results["sensitivity"] = {"from_cache": 0, "computed": len(table), "stream_dir": str(folder.path), "table": table}
    results["layers"] = report
    results["param_ratio"] = {"target": args.param_ratio_target, **summarize_params(report)}
    results["fallbacks"] = {k: v["fallback"] for k, v in report.items() if v["fallback"]}
    return report


def run_streamed(args, results: dict, timed: Callable) -> tuple[None, object, dict]:
    """run_pipeline for a model walked block by block (streamed.py): the same stages and results, the per-block
    ones in the run folder (resumed when it holds this run's blocks). Returns (None, tokenizer, results): the
    compressed model is the folder's blocks (streamed.assemble puts a small one together)."""
    validate_stream_args(args)
    sm, tokenizer, fp = timed("load_model", model_loading.open_streamed, args, datautils.check_user_texts)
    results["model"] = {**fp, "class": type(sm.model).__name__, "streamed": True,
                        "params_total": sum(p.numel() for p in sm.model.parameters())}
    linears = select_linears(sm.model, args)  # the skeleton's: names, shapes, blocks
    check_rank_align(linears, args)
    calib_ids = timed("calib_data", datautils.get_calib_data, args.calib_dataset, tokenizer, args.n_calib_samples,
                      args.calib_seqlen, args.seed, args.use_bos, warnings=results["warnings"])
    folder, disk = open_stream_folder(sm, args, stream_key(args, fp), stream_dir(args))
    _RUN_STATE["saved"]["stream"] = f"streamed run's finished blocks in {folder.path}"
    n_eval = len(eval_datasets(args)) * (1 + int(args.eval_dense))
    progress = streamed.StreamProgress(stream_passes(args, n_eval) * sm.n_blocks, sm.n_blocks)
    results["stream"] = {"dir": str(folder.path), "resumed": folder.resumed, "disk_bytes": disk}
    try:
        if args.eval_dense:
            results.setdefault("ppl", {})["dense"] = timed("eval_dense", stream_eval, sm, tokenizer, args, progress,
                                                           sm.block, "dense")
        report = stream_compress(sm, linears, calib_ids, args, folder, progress, results, timed)
        flag = warn_on_report(results, report, [], args)
        results.setdefault("ppl", {})["compressed"] = timed(
            "eval", stream_eval, sm, tokenizer, args, progress, lambda b: streamed.compressed_block(sm, folder, b),
            "UNCOMPRESSED (dense)" if flag else "compressed")
        results["stream"]["block_seconds"] = progress.block_seconds
        results["stream"]["stored_inputs"] = stored_inputs_report(folder)
    finally:
        progress.close()
        folder.close()  # every write asked for is on disk (or its error raised) before the run returns
    broken = broken_result(results, args)
    if broken:
        results["broken_result"] = broken
        add_warning(results, broken["summary"])
    results["output_file"] = str(write_results(results, args))
    return None, tokenizer, results


def run_pipeline(args) -> tuple[torch.nn.Module, object, dict]:
    """Every stage of acur.py on parsed arguments; returns (compressed model, tokenizer, results)."""
    validate_args(args)
    rank = init_distributed(args)
    datautils.set_seed(args.seed)
    timings: dict[str, float] = {}
    results: dict = {"schema": RESULT_SCHEMA, "args": vars(args).copy(),
                     "env": {"python": platform.python_version(), "torch": torch.__version__,
                             "started": dt.datetime.now().isoformat(timespec="seconds")},
                     "timings": timings, "warnings": []}
    _RUN_STATE.update(stage=None, saved={}, warnings=results["warnings"])

    def timed(stage, fn, *a, **kw):
        _RUN_STATE["stage"] = stage
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        timings[stage] = round(time.perf_counter() - t0, 3)
        print(f"[acur] stage {stage}: {timings[stage]:.1f} s")
        return out

    timed("fetch_data", fetch_texts, args)
    if wants_stream(args):
        return run_streamed(args, results, timed)
    model, tokenizer, fp = timed("load_model", load_model, args)
    results["model"] = {**fp, "class": type(model).__name__,
                        "params_total": sum(p.numel() for p in model.parameters())}
    if args.device_map == "auto":  # where accelerate put each part
        results["model"]["device_map"] = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    linears = select_linears(model, args)
    if not args.raw_model:
        check_rank_align(linears, args)
    if args.eval_dense or args.raw_model:
        results.setdefault("ppl", {})["dense"] = timed("eval_dense", stage_eval, model, tokenizer, args, "dense")
    if args.raw_model:
        results["param_ratio"] = {"target": 1.0, "reached": 1.0}
        if lm_eval_tasks(args):
            results["lm_eval"], results["lm_eval_info"] = timed("eval_lm", stage_eval_lm, model, tokenizer, args)
        if rank == 0:
            results["output_file"] = str(write_results(results, args))
        return model, tokenizer, results

    calib_text = None  # read by name, except selfgen: the dense model writes its own calibration text
    if args.calib_dataset in datautils.GENERATED_DATASETS:
        calib_text, results["selfgen"] = timed("selfgen", prepare_selfgen, model, tokenizer, args, fp)
    calib_ids = timed("calib_data", datautils.get_calib_data, args.calib_dataset, tokenizer,
                      args.n_calib_samples, args.calib_seqlen, args.seed, args.use_bos, calib_text,
                      warnings=results["warnings"])
    if args.ppl_target != -1:  # one forward pass: an unreachable target fails before the sensitivity
        dense_calib = timed("dense_calib_ppl", perplexity_of_windows, model, calib_ids, args.calib_batch_size,
                            desc="dense calibration ppl")
        results["ppl_calibration"] = {"dense": dense_calib}
        check_ppl_target(args.ppl_target, dense_calib, args.calib_dataset)
    scales = timed("calibration", stage_scales, model, linears, calib_ids, args, fp)
    covs = timed("covariance", stage_covariance, model, linears, calib_ids, args, fp) if needs_covariance(args) else None
    fisher = timed("fisher", stage_fisher, model, linears, calib_ids, args, fp) if needs_fisher(args) else None
    fisher, uniform = finite_fisher(fisher) if fisher else (fisher, [])
    if uniform:  # recorded in the JSON, not only printed
        add_warning(results, f"output fisher not finite in {len(uniform)} layer(s), weighted uniformly: {', '.join(uniform)}")
    stats = layer_stats(linears, scales, covs, fisher, calib_ids.numel())
    table, sens_info = timed("sensitivity", stage_sensitivity, model, linears, calib_ids, scales, args, fp, covs,
                             stats)
    if rank != 0:  # the other ranks only shared the sensitivity; rank 0 finishes and writes the run
        return model, tokenizer, results
    ratios, trace = timed("search", stage_search, model, linears, calib_ids, scales, table, args, covs, stats)
    report = timed("compress", compress_model, linears, ratios, scales, args, covs=covs, stats=stats,
                   sequential=(model, calib_ids))
    results["method"] = args.method
    results["sensitivity"] = {**sens_info, "table": table}  # the table itself: tools/cur_report.py --run_json
    if trace:
        results["ppl_search_trace"] = trace
    results["layers"] = report
    results["param_ratio"] = {"target": args.param_ratio_target if args.param_ratio_target != -1 else None,
                              **summarize_params(report)}
    results["model"]["params_compressed"] = sum(p.numel() for p in model.parameters())
    results["fallbacks"] = {k: v["fallback"] for k, v in report.items() if v["fallback"]}
    if not registry.get(args.method).per_linear:  # per-layer widths; same widths everywhere: a stock config
        results["structured"] = structured.summary(report, args.structured_widths, args.structured_selection)
        results["structured"]["config_notes"] = structured.apply_config(model, report)
    if trace and "ppl_calibration" in results:  # the final model is the smallest accepted cut
        accepted = [t for t in trace if t["ppl"] <= args.ppl_target]
        if accepted:
            results["ppl_calibration"]["compressed"] = min(accepted, key=lambda t: t["cut"])["ppl"]
    flag = warn_on_report(results, report, trace, args)
    if args.compress_kv_cache:
        results["kv_cache"] = stage_kv_cache(model, args)
    results["quantization"] = timed("quantize", quantization.quantize_model, model, args.weight_quant,
                                    args.quant_group_size, scales, include_lm_head=args.compress_lm_head)
    results.setdefault("ppl", {})["compressed"] = timed("eval", stage_eval, model, tokenizer, args,
                                                        "UNCOMPRESSED (dense)" if flag else "compressed")
    broken = broken_result(results, args)
    if broken:
        results["broken_result"] = broken
        add_warning(results, broken["summary"])
    if lm_eval_tasks(args):
        results["lm_eval"], results["lm_eval_info"] = timed("eval_lm", stage_eval_lm, model, tokenizer, args)
    results["output_file"] = str(write_results(results, args))
    return model, tokenizer, results


def print_summary(results: dict) -> None:
    print("=" * 72)
    print(f"model: {results['args']['model_id']}   params: {results['model']['params_total']:,}"
          + (f" -> {results['model']['params_compressed']:,}" if "params_compressed" in results["model"] else ""))
    pr = results.get("param_ratio", {})
    print(f"param ratio of compressed linears: target {pr.get('target')}  reached {pr.get('reached', 1.0):.4f}")
    if results.get("kv_cache"):
        kv = results["kv_cache"]
        print(f"KV cache dims (cached / original): target {kv['ratio_target']}  reached {kv['reached']:.4f}; "
              f"bytes/token {kv['bytes_per_token_dense']:,} -> {kv['bytes_per_token_compressed']:,} ({kv['dtype']})")
    for label, vals in results.get("ppl", {}).items():
        if label == "compressed" and results.get("nothing_compressed"):
            label = "UNCOMPRESSED (nothing compressed: dense)"
        for ds, v in vals.items():
            print(f"perplexity {label:10s} {ds:12s} {v:.4f}")
    for task, acc in results.get("lm_eval", {}).items():
        if not task.startswith(evaluate_utils.MMLU_GROUP + "_") or task == "mmlu_mean":  # subjects: see JSON
            print(f"accuracy   {task:23s} {acc:.4f}")
    if results.get("fallbacks"):
        print(f"FALLBACKS TAKEN in {len(results['fallbacks'])} layers (see results JSON)")
    for w in results.get("warnings", []):
        print(f"WARNING: {w}")
    print("stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items()))
    print(f"results: {results['output_file']}")


def interrupt_message(signame: str, args) -> str:
    """The one line printed on SIGINT/SIGTERM: the stage, what is saved, how to resume."""
    stage = _RUN_STATE.get("stage") or "startup"
    saved = list(_RUN_STATE.get("saved", {}).values())
    if saved:
        how = "" if "stream" in _RUN_STATE.get("saved", {}) else " (with --use_cache)"
        return (f"acur.py: interrupted by {signame} during stage {stage}; saved: {'; '.join(saved)}; "
                f"resume: run the same command again{how}")
    if args.use_cache:
        return f"acur.py: interrupted by {signame} during stage {stage}; nothing saved yet; rerun the same command"
    return (f"acur.py: interrupted by {signame} during stage {stage}; nothing saved (no --use_cache); rerun "
            "with --use_cache to keep finished stages and sensitivity layers across interrupts")


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (one line), 130 SIGINT / 143 SIGTERM (one line, caches kept)."""
    args = build_parser().parse_args(argv)
    try:  # SIGINT already raises KeyboardInterrupt; SIGTERM gets the same treatment
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        _, _, results = run_pipeline(args)
    except UsageError as exc:
        print(f"acur.py: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        signame = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
        print(f"\n{interrupt_message(signame, args)}", file=sys.stderr, flush=True)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if "output_file" in results:  # rank 0 (or the only process)
        print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
