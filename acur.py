"""ACUR: compress a causal LM's linear layers with activation-aware CUR, then evaluate it.

    python acur.py --model_id smollm2-135m --act_aware --alpha 0.5 --param_ratio_target 0.9 \\
        --calib_dataset squad_wiki --eval_ppl new_wiki --use_cache

Stages: load -> calibration data -> activation statistics -> sensitivity -> per-layer ratio search
-> CUR replacement -> evaluation. Every stage passes plain dicts; the run ends in one JSON file
under output/ (schema in README_CUR4LLM.md).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import binary_search
import datautils
import quantization
import sensitivity as sens
from act_aware_utils import SCALING_METHODS, calib_scales
from evaluate_utils import evaluate_perplexity, perplexity_of_windows
from modules.cur_linear import CURLinear
from modules.cur_math import SELECTIONS, U_MODES, cur_param_count
from modules.model_utils import LinearInfo, find_linears, replace_module

RESULT_SCHEMA = "cur4llm.result/1"
ALGO_VERSION = 1  # bump when a change alters cached sensitivities


class UsageError(ValueError):
    """Bad input found before any heavy work: reported as one line, exit code 2."""


# ---------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The one parser of acur.py; huggingface_repos/build_acur_repo.py extends it."""
    p = argparse.ArgumentParser(description="Activation-aware CUR compression of causal LMs",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model_id", required=True,
                   help="HF hub id, local checkpoint dir, or an offline alias: " + ", ".join(datautils.OFFLINE_MODELS))
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="model dtype; auto = float16 on CUDA, float32 on CPU. Decompositions are fp32 anyway")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g = p.add_argument_group("compression target (give one)")
    g.add_argument("--param_ratio_target", type=float, default=-1,
                   help="kept fraction of the compressed linears' parameters, 0 < r <= 1")
    g.add_argument("--ppl_target", type=float, default=-1,
                   help="smallest model whose calibration perplexity stays at or below this")
    g.add_argument("--raw_model", action="store_true", help="no compression: evaluate the dense model")
    g = p.add_argument_group("ACUR")
    g.add_argument("--act_aware", action="store_true", help="choose columns/rows on W diag(s^alpha)")
    g.add_argument("--alpha", type=float, default=0.5, help="exponent of the activation statistic")
    g.add_argument("--scaling_method", default="abs_mean", choices=SCALING_METHODS)
    g.add_argument("--selection", default="topk", choices=SELECTIONS,
                   help="topk: deterministic top leverage; sample: Mahoney-Drineas sampling (seeded)")
    g.add_argument("--u_mode", default="pinv", choices=U_MODES,
                   help="pinv: U = C+ W R+; act_weighted: U = C+ (WS)(RS)+")
    g.add_argument("--rank_align", type=int, default=1, help="round ranks down to a multiple of this")
    g.add_argument("--compress_lm_head", action="store_true", help="also compress lm_head (tied on many models)")
    g.add_argument("--layer_filter", default=None,
                   help="regex: compress only linears whose full name matches (e.g. 'mlp|layers\\.[0-9]\\.')")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib_dataset", default="wikitext2",
                   help=f"one of {', '.join(datautils.DATASETS)} or text:PATH")
    g.add_argument("--n_calib_samples", type=int, default=32)
    g.add_argument("--calib_seqlen", type=int, default=2048)
    g.add_argument("--calib_batch_size", type=int, default=4, help="samples per forward pass")
    g.add_argument("--seed", type=int, default=233, help="seeds python random, numpy and torch")
    g.add_argument("--use_bos", action="store_true", help="start every window with the BOS token")
    g = p.add_argument_group("sensitivity")
    g.add_argument("--sensitivity_metric", default="ppl", choices=sens.METRICS)
    g.add_argument("--sensitivity_ratios", default=",".join(map(str, sens.DEFAULT_RATIOS)),
                   help="candidate per-layer parameter ratios, comma separated")
    g.add_argument("--no_fast_sensitivity", action="store_true",
                   help="straightforward full-model loop instead of the exact cached-block path")
    g.add_argument("--use_cache", action="store_true", help="reuse/write caches under --cache_dir")
    g.add_argument("--cache_dir", default=str(datautils.CACHE_DIR))
    g = p.add_argument_group("quantization (simulated: quantize-dequantize, after CUR)")
    g.add_argument("--weight_quant", default="none", choices=quantization.METHODS,
                   help="round-to-nearest (rtn_) or activation-aware scale search (awq_, needs --act_aware) "
                        "of C, U, R and the uncompressed decoder linears, asymmetric, b bits")
    g.add_argument("--quant_group_size", type=int, default=0,
                   help="input columns per quantization group; 0 = one group per output channel")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_ppl", default="wikitext2,ptb",
                   help="comma list of datasets for perplexity; empty or 'none' to skip")
    g.add_argument("--eval_seqlen", type=int, default=2048, help="perplexity window length")
    g.add_argument("--eval_max_windows", type=int, default=0, help="cap on windows per dataset (0 = all)")
    g.add_argument("--eval_batch_size", type=int, default=1)
    g.add_argument("--eval_dense", action="store_true", help="also evaluate the model before compression")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="output")
    g.add_argument("--run_name", default=None, help="results file name (default: time, model, target)")
    return p


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--sensitivity_ratios must be numbers, got {text!r}") from None
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise UsageError(f"--sensitivity_ratios must be in (0, 1), got {text!r}")
    return ratios


def eval_datasets(args) -> list[str]:
    return [d.strip() for d in args.eval_ppl.split(",") if d.strip() and d.strip() != "none"]


def validate_args(args) -> None:
    """Cheap checks of every input, before anything is loaded. Raises UsageError."""
    has_ratio, has_ppl = args.param_ratio_target != -1, args.ppl_target != -1
    if has_ratio and not (0 < args.param_ratio_target <= 1) or math.isnan(args.param_ratio_target):
        raise UsageError(f"--param_ratio_target must be in (0, 1], got {args.param_ratio_target}")
    if has_ppl and not args.ppl_target > 0:
        raise UsageError(f"--ppl_target must be > 0, got {args.ppl_target}")
    if not args.raw_model and has_ratio == has_ppl:
        raise UsageError("give exactly one of --param_ratio_target and --ppl_target (or --raw_model)")
    if not args.alpha >= 0:
        raise UsageError(f"--alpha must be >= 0, got {args.alpha}")
    for flag in ("n_calib_samples", "calib_seqlen", "calib_batch_size", "eval_seqlen",
                 "eval_batch_size", "rank_align"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.calib_seqlen < 2 or args.eval_seqlen < 2:
        raise UsageError("sequence lengths must be >= 2 (one predicted token)")
    if args.eval_max_windows < 0:
        raise UsageError(f"--eval_max_windows must be >= 0, got {args.eval_max_windows}")
    parse_ratios(args.sensitivity_ratios)
    validate_quant_args(args)
    if args.layer_filter is not None:
        try:
            re.compile(args.layer_filter)
        except re.error as exc:
            raise UsageError(f"--layer_filter is not a valid regex: {exc}") from None
    for name in [args.calib_dataset] + eval_datasets(args):
        try:
            datautils.check_dataset_name(name)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    model_id = args.model_id
    if model_id not in datautils.OFFLINE_MODELS and not os.path.isdir(model_id):
        looks_like_path = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
        if looks_like_path or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", model_id):
            raise UsageError(f"model not found: {model_id!r} is neither a local directory, an offline "
                             f"alias ({', '.join(datautils.OFFLINE_MODELS)}) nor a hub id")


def validate_quant_args(args) -> None:
    try:
        spec = quantization.parse_method(args.weight_quant, args.quant_group_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if spec is None:
        if args.quant_group_size:
            raise UsageError("--quant_group_size needs --weight_quant other than none")
        return
    if args.raw_model:
        raise UsageError("--weight_quant quantizes a CUR-compressed model; it is not supported with --raw_model")
    if spec.kind == "awq" and not (args.act_aware and args.scaling_method in quantization.AWQ_SCALINGS):
        raise UsageError(f"--weight_quant {args.weight_quant} needs --act_aware with --scaling_method "
                         f"{' or '.join(quantization.AWQ_SCALINGS)} (activation magnitudes)")


# ---------------------------------------------------------------- model
def resolve_model(args) -> tuple[str, dict]:
    """Local path (or hub id) to load, and the fingerprint that keys every cache."""
    if args.model_id in datautils.OFFLINE_MODELS:
        path = str(datautils.offline_model_dir(args.model_id))
    else:
        path = os.path.expanduser(args.model_id)
    fp = {"model": args.model_id, "revision": args.revision}
    if os.path.isdir(path):
        h = hashlib.sha256()
        for f in sorted(Path(path).iterdir()):
            if f.name == "config.json":
                h.update(f.read_bytes())
            elif f.suffix in (".safetensors", ".bin", ".json") or f.name.endswith(".index.json"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        fp["files"] = h.hexdigest()[:16]
    return path, fp


def pick_device_dtype(args) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if args.dtype == "auto":
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return dev, dtype


def load_model(args):
    """(model, tokenizer, fingerprint). Clear one-line errors for a missing model or a too-long window."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    path, fp = resolve_model(args)
    try:
        config = AutoConfig.from_pretrained(path, revision=args.revision)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model not found or hub unreachable: {args.model_id!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    max_pos = getattr(config, "max_position_embeddings", None)
    for flag in ("calib_seqlen", "eval_seqlen"):
        if max_pos and getattr(args, flag) > max_pos:
            raise UsageError(f"--{flag} {getattr(args, flag)} exceeds the model's context of {max_pos} tokens")
    tokenizer = AutoTokenizer.from_pretrained(path, revision=args.revision)
    check_user_texts(args, tokenizer)
    device, dtype = pick_device_dtype(args)
    model = AutoModelForCausalLM.from_pretrained(path, revision=args.revision, dtype=dtype,
                                                 device_map=str(device) if device.type == "cuda" else None)
    model.to(device).eval()
    model.config.use_cache = False
    fp["commit"] = getattr(config, "_commit_hash", None)
    fp["dtype"] = str(dtype)
    return model, tokenizer, fp


def check_user_texts(args, tokenizer) -> None:
    """A user's text file must hold at least one window (checked before the weights load)."""
    for name, seqlen in [(args.calib_dataset, args.calib_seqlen)] + [(d, args.eval_seqlen) for d in eval_datasets(args)]:
        if name.startswith("text:"):
            n = datautils.tokenize_text(tokenizer, datautils.get_text(name, "test")).numel()
            if n <= seqlen:
                raise UsageError(f"{name} has {n} tokens, fewer than one window of {seqlen}")


# ---------------------------------------------------------------- stages
def select_linears(model, args) -> list[LinearInfo]:
    """The linears this run compresses: decoder-block linears (lm_head on request), optionally filtered."""
    linears = find_linears(model, include_lm_head=args.compress_lm_head)
    if args.layer_filter:
        linears = [i for i in linears if re.search(args.layer_filter, i.name)]
        if not linears:
            raise UsageError(f"--layer_filter {args.layer_filter!r} matches no linear layer")
    return linears


def cur_settings(args) -> dict:
    return dict(rank_align=args.rank_align, selection=args.selection, u_mode=args.u_mode)


def layer_scale(scales: dict | None, name: str):
    return scales.get(name) if scales else None


def compress_model(linears: list[LinearInfo], ratios: dict[str, float], scales: dict | None,
                   args, desc: str | None = "CUR replacement") -> dict[str, dict]:
    """Replace every linear whose ratio is below 1 by its CURLinear. Returns a per-layer report."""
    report = {}
    gen = torch.Generator().manual_seed(args.seed)
    for info in tqdm(linears, desc=desc, disable=desc is None):
        m, n = info.module.weight.shape
        r = ratios.get(info.name, 1.0)
        row = {"ratio": r, "shape": [m, n], "params_dense": m * n, "rank": None,
               "params": m * n, "fallback": ""}
        if r < 1:
            cur = CURLinear.from_linear(info.module, r, layer_scale(scales, info.name), args.alpha,
                                        generator=gen, **cur_settings(args))
            row.update(rank=cur.rank, params=cur.param_count(), fallback=cur.fallback)
            if cur.fallback:
                print(f"WARNING: {info.name}: {cur.fallback}")
            replace_module(info, cur)
        report[info.name] = row
    return report


def restore_model(linears: list[LinearInfo], originals: dict) -> None:
    for info in linears:
        replace_module(info, originals[info.name])


def cache_key(args, fp: dict, kind: str, linears: list[LinearInfo]) -> dict:
    key = {**fp, "kind": kind, "algo": ALGO_VERSION, "dataset": args.calib_dataset,
           "n": args.n_calib_samples, "seqlen": args.calib_seqlen, "seed": args.seed, "bos": args.use_bos,
           "scaling": args.scaling_method if args.act_aware else "none"}
    if kind == "sensitivity":
        key.update(metric=args.sensitivity_metric, alpha=args.alpha if args.act_aware else None,
                   ratios=parse_ratios(args.sensitivity_ratios), layers=[i.name for i in linears],
                   **cur_settings(args))
    return key


def stage_scales(model, linears, calib_ids, args, fp) -> dict | None:
    if not args.act_aware:
        return None
    key = cache_key(args, fp, "scales", linears)
    path = datautils.cache_path("scales", key, args.cache_dir)
    if args.use_cache:
        cached = datautils.load_tensor_cache(path, key)
        if cached is not None and set(cached) >= {i.name for i in linears}:
            print(f"[acur] activation statistics from cache {path}")
            return cached
    scales = calib_scales(model, linears, calib_ids, args.scaling_method, args.calib_batch_size)
    if args.use_cache:
        datautils.save_tensor_cache(path, key, scales)
    return scales


def stage_sensitivity(model, linears, calib_ids, scales, args, fp) -> tuple[dict, dict]:
    """(table, info). With --use_cache the table is saved after every layer and resumed."""
    key = cache_key(args, fp, "sensitivity", linears)
    path = datautils.cache_path(f"sensitivity_{args.sensitivity_metric}", key, args.cache_dir, ".json")
    done, info = {}, {"cache": str(path), "from_cache": 0, "computed": 0}
    if args.use_cache:
        blob = datautils.load_json_cache(path, key)
        if blob is not None:
            done = blob.get("table", {})
            print(f"[acur] sensitivity: {len(done)}/{len(linears)} layers from cache {path}")
    info["from_cache"] = len(done)

    def save(table):
        if args.use_cache:
            datautils.save_json_cache(path, key, {"table": table, "complete": len(table) == len(linears)})

    ratios = parse_ratios(args.sensitivity_ratios)
    if args.sensitivity_metric == "ppl":
        table = sens.sensitivity_ppl(model, linears, calib_ids, ratios, scales, args.alpha,
                                     cur_settings(args), args.calib_batch_size,
                                     fast=not args.no_fast_sensitivity, done=done, on_progress=save)
    else:
        table = sens.sensitivity_stable_rank(linears, ratios, scales, args.alpha, done=done, on_progress=save)
    info["computed"] = len(table) - info["from_cache"]
    return table, info


def stage_search(model, linears, calib_ids, scales, table, args) -> tuple[dict, list]:
    shapes = {i.name: tuple(i.module.weight.shape) for i in linears}
    if args.param_ratio_target != -1:
        try:
            return binary_search.search_param_ratio(table, shapes, args.param_ratio_target, args.rank_align), []
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    originals = {i.name: i.module for i in linears}

    def evaluate(ratios):
        compress_model(linears, ratios, scales, args, desc=None)
        try:
            return perplexity_of_windows(model, calib_ids, args.calib_batch_size, desc="ppl search")
        finally:
            restore_model(linears, originals)

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


def summarize_params(report: dict) -> dict:
    dense = sum(r["params_dense"] for r in report.values())
    kept = sum(r["params"] for r in report.values())
    return {"compressed_linears_dense": dense, "compressed_linears_kept": kept,
            "reached": kept / dense if dense else 1.0}


def write_results(results: dict, args) -> Path:
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.run_name or "{}_{}_{}".format(
        dt.datetime.now().strftime("%Y%m%d-%H%M%S"), re.sub(r"[^\w.\-]", "_", args.model_id),
        "raw" if args.raw_model else (f"r{args.param_ratio_target}" if args.param_ratio_target != -1
                                      else f"ppl{args.ppl_target}"))
    path = out_dir / f"{name}.json"
    datautils.atomic_write_bytes(path, json.dumps(results, indent=1, default=str).encode())
    return path


def run_pipeline(args) -> tuple[torch.nn.Module, object, dict]:
    """Every stage of acur.py on parsed arguments; returns (compressed model, tokenizer, results)."""
    validate_args(args)
    datautils.set_seed(args.seed)
    timings: dict[str, float] = {}
    results: dict = {"schema": RESULT_SCHEMA, "args": vars(args).copy(),
                     "env": {"python": platform.python_version(), "torch": torch.__version__,
                             "started": dt.datetime.now().isoformat(timespec="seconds")},
                     "timings": timings}

    def timed(stage, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        timings[stage] = round(time.perf_counter() - t0, 3)
        print(f"[acur] stage {stage}: {timings[stage]:.1f} s")
        return out

    model, tokenizer, fp = timed("load_model", load_model, args)
    results["model"] = {**fp, "class": type(model).__name__,
                        "params_total": sum(p.numel() for p in model.parameters())}
    linears = select_linears(model, args)
    if args.eval_dense or args.raw_model:
        results.setdefault("ppl", {})["dense"] = timed("eval_dense", stage_eval, model, tokenizer, args, "dense")
    if args.raw_model:
        results["param_ratio"] = {"target": 1.0, "reached": 1.0}
        results["output_file"] = str(write_results(results, args))
        return model, tokenizer, results

    calib_ids = timed("calib_data", datautils.get_calib_data, args.calib_dataset, tokenizer,
                      args.n_calib_samples, args.calib_seqlen, args.seed, args.use_bos)
    scales = timed("calibration", stage_scales, model, linears, calib_ids, args, fp)
    table, sens_info = timed("sensitivity", stage_sensitivity, model, linears, calib_ids, scales, args, fp)
    ratios, trace = timed("search", stage_search, model, linears, calib_ids, scales, table, args)
    report = timed("compress", compress_model, linears, ratios, scales, args)
    results["sensitivity"] = sens_info
    if trace:
        results["ppl_search_trace"] = trace
    results["layers"] = report
    results["param_ratio"] = {"target": args.param_ratio_target if args.param_ratio_target != -1 else None,
                              **summarize_params(report)}
    results["model"]["params_compressed"] = sum(p.numel() for p in model.parameters())
    results["fallbacks"] = {k: v["fallback"] for k, v in report.items() if v["fallback"]}
    results["quantization"] = timed("quantize", quantization.quantize_model, model, args.weight_quant,
                                    args.quant_group_size, scales, include_lm_head=args.compress_lm_head)
    results.setdefault("ppl", {})["compressed"] = timed("eval", stage_eval, model, tokenizer, args, "compressed")
    results["output_file"] = str(write_results(results, args))
    return model, tokenizer, results


def print_summary(results: dict) -> None:
    print("=" * 72)
    print(f"model: {results['args']['model_id']}   params: {results['model']['params_total']:,}"
          + (f" -> {results['model']['params_compressed']:,}" if "params_compressed" in results["model"] else ""))
    pr = results.get("param_ratio", {})
    print(f"param ratio of compressed linears: target {pr.get('target')}  reached {pr.get('reached', 1.0):.4f}")
    for label, vals in results.get("ppl", {}).items():
        for ds, v in vals.items():
            print(f"perplexity {label:10s} {ds:12s} {v:.4f}")
    if results.get("fallbacks"):
        print(f"FALLBACKS TAKEN in {len(results['fallbacks'])} layers (see results JSON)")
    print("stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items()))
    print(f"results: {results['output_file']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _, _, results = run_pipeline(args)
    except UsageError as exc:
        print(f"acur.py: error: {exc}", file=sys.stderr)
        return 2
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
