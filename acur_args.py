"""acur.py's command line: the one parser, the checks of every input, and the settings derived from it.

The checks run before anything heavy (a bad flag costs seconds, not a compression): each failure is one
UsageError line and exit code 2. check_rank_align and check_ppl_target are the two checks that need the
loaded model or one forward pass. huggingface_repos/build_acur_repo.py and tools/ extend the same parser.
"""
from __future__ import annotations

import argparse
import math
import os
import re

import torch

import datautils
import evaluate_utils
import kv_compress
import quantization
import sensitivity as sens
from act_aware_utils import SCALING_METHODS
from cache_store import unwritable
from datautils import UsageError, eval_datasets
from modules import registry
from modules.model_utils import LinearInfo


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
    g.add_argument("--device_map", default="none", choices=["none", "auto"],
                   help="auto: accelerate places the model over the GPUs, CPU and disk (offload) for a model that "
                        "does not fit on one device; every stage then runs through its dispatch hooks")
    g.add_argument("--stream", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="walk the model one decoder block at a time from its safetensors shards (a local checkpoint "
                        "folder), every per-block result written to --stream_dir so a killed run resumes there; "
                        "auto: when the weights would not fit the device's free memory (a printed line says so)")
    g.add_argument("--stream_dir", default=None,
                   help="run folder of --stream (default OUTPUT_DIR/stream-MODEL[-RUN_NAME]); the same arguments "
                        "resume the run in it, different ones are refused")
    g.add_argument("--stream_ram_gib", type=float, default=None,
                   help="host RAM for the stored block inputs of --stream's reverse pass (GiB; default: half the "
                        "available RAM, printed); what does not fit goes to the run folder; 0: always on disk")
    g.add_argument("--stream_micro_batch", type=int, default=0,
                   help="calibration samples per block recompute in --stream's reverse pass (output fisher and "
                        "input covariances): fewer hold less GPU memory, same sums to round-off; 0: automatic "
                        "(1 for the fisher, --calib_batch_size for the covariances unless the device is short)")
    g.add_argument("--max_memory", default=None,
                   help="with --device_map auto: memory per device for the placement, e.g. 0=20GiB,cpu=60GiB "
                        "(what does not fit is offloaded to the CPU, then to disk under --output_dir)")
    g = p.add_argument_group("compression target (give one)")
    g.add_argument("--param_ratio_target", type=float, default=-1,
                   help="kept fraction of the compressed linears' parameters, 0 < r <= 1")
    g.add_argument("--ppl_target", type=float, default=-1,
                   help="smallest model whose calibration perplexity stays at or below this")
    g.add_argument("--raw_model", action="store_true", help="no compression: evaluate the dense model")
    g.add_argument("--compress_kv_cache", action="store_true",
                   help="KV-cache mode: compress only k_proj/v_proj and cache their low-rank latents")
    g.add_argument("--kv_cache_ratio_target", type=float, default=-1,
                   help="with --compress_kv_cache: cached K/V dims / original K/V dims, 0 < r <= 1")
    g.add_argument("--kv_rank_fractions", default=",".join(map(str, kv_compress.KV_RANK_FRACTIONS)),
                   help="with --compress_kv_cache: candidate per-layer ranks as fractions of the K/V width")
    g = p.add_argument_group("ACUR")
    g.add_argument("--act_aware", action="store_true", help="choose columns/rows on W diag(s^alpha)")
    g.add_argument("--alpha", type=float, default=0.5, help="exponent of the activation statistic")
    g.add_argument("--scaling_method", default="abs_mean", choices=SCALING_METHODS)
    g.add_argument("--method", default="acur", choices=list(registry.METHODS),
                   help="acur: three-factor CUR (activation-aware with --act_aware); cur: plain CUR; svd / asvd "
                        "(needs --act_aware) / wsvd (whitened by the input covariance): truncated SVD; rowid / "
                        "colid: one-sided interpolative decompositions keeping actual rows / columns")
    g.add_argument("--structured_widths", default="per_layer", choices=["per_layer", "uniform"],
                   help="--method neurons / structured: per_layer = widths allocated across blocks and between "
                        "attention and MLP by the closed-form refit loss; uniform = the same widths in every "
                        "block (a stock config with a smaller intermediate_size / head count)")
    g.add_argument("--structured_selection", default="greedy", choices=["greedy", "leverage"],
                   help="--method neurons / structured: which neurons / KV groups to keep: greedy = backward "
                        "elimination on the refitted output error; leverage = ridge leverage (MoDeGPT)")
    g.add_argument("--selection", default="topk", choices=registry.SELECTIONS,
                   help="CUR picks: topk: deterministic top leverage; sample: Mahoney-Drineas sampling (seeded); "
                        "deim: DEIM on the singular vectors")
    g.add_argument("--u_mode", default="pinv", choices=registry.U_MODES,
                   help="pinv: U = C+ W R+; act_weighted: U = C+ (WS)(RS)+; data_aware: U minimising the "
                        "layer's output error on calibration inputs (input covariance)")
    g.add_argument("--cov_damp", type=float, default=registry.DEFAULT_COV_DAMP,
                   help="data-aware fits use Sigma + cov_damp * mean(diag Sigma) * I")
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
    g.add_argument("--sensitivity_ratios", default=None,
                   help="candidate per-layer parameter ratios, comma separated (default: "
                        f"{','.join(map(str, sens.DEFAULT_RATIOS))}; fisher_error: 0.10 to 0.98 in steps of 0.02 where "
                        "the loss curve comes from one factorization, else steps of 0.06)")
    g.add_argument("--no_fast_sensitivity", action="store_true",
                   help="straightforward full-model loop instead of the exact cached-block path")
    g.add_argument("--compile_blocks", default="auto", choices=["auto", "on", "off"],
                   help="run the ppl sensitivity's decoder blocks through torch.compile (auto: on CUDA); "
                        "changes round-off only, falls back to eager with a warning if compiling fails")
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
    g = p.add_argument_group("accuracy (lm-eval 0.4 on the in-memory model; dense numbers: --raw_model)")
    g.add_argument("--eval_mmlu", action="store_true",
                   help="MMLU: the 57 subjects, 0-shot; results lm_eval.mmlu_mean = unweighted subject mean (ASVD)")
    g.add_argument("--eval_tasks", default="",
                   help="comma list of lm-eval tasks/groups; offline: cur4llm_zeroshot (the carried 6-task suite, "
                        "recommended --eval_limit 200), bigbench_mc; with the hub: paper_zeroshot, arc_easy, ...")
    g.add_argument("--eval_limit", type=float, default=None,
                   help="cap on examples per task (a fraction if < 1); for quick checks, not for reported numbers")
    g.add_argument("--mc_task", default=None,
                   help="carried multiple-choice task (data/mc/NAME.json, BIG-bench JSON layout) behind the offline "
                        f"task bigbench_mc (default {datautils.DEFAULT_MC_TASK}; carried: "
                        f"{', '.join(datautils.mc_tasks())}); giving it adds bigbench_mc to the tasks")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="output")
    g.add_argument("--run_name", default=None, help="results file name (default: time, model, target)")
    return p



# ---------------------------------------------------------------- parsed values
def parse_fractions(text: str, flag: str = "--sensitivity_ratios") -> list[float]:
    """Sorted distinct numbers in (0, 1) from a comma list; UsageError naming `flag` otherwise."""
    try:
        values = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"{flag} must be numbers, got {text!r}") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise UsageError(f"{flag} must be in (0, 1), got {text!r}")
    return values


def parse_ratios(text: str) -> list[float]:
    """The candidate ratios of --sensitivity_ratios."""
    return parse_fractions(text, "--sensitivity_ratios")


def parse_kv_fractions(text: str) -> list[float]:
    """The candidate rank fractions of --kv_rank_fractions (KV-cache mode)."""
    return parse_fractions(text, "--kv_rank_fractions")


def sensitivity_ratios(args: argparse.Namespace) -> list[float]:
    """The candidate ratios: --sensitivity_ratios, else the metric's default grid."""
    if args.sensitivity_ratios is not None:
        return parse_ratios(args.sensitivity_ratios)
    if args.sensitivity_metric == "fisher_error":
        return list(sens.fisher_error_ratios(args.method))
    return list(sens.DEFAULT_RATIOS)


def lm_eval_tasks(args: argparse.Namespace) -> list[str]:
    """lm-eval tasks of this run: --eval_tasks, plus mmlu (--eval_mmlu) and bigbench_mc (--mc_task)."""
    tasks = [t.strip() for t in (getattr(args, "eval_tasks", "") or "").split(",") if t.strip()]
    extra = ([evaluate_utils.MMLU_GROUP] if getattr(args, "eval_mmlu", False) else []) + \
        (["bigbench_mc"] if getattr(args, "mc_task", None) else [])
    return list(dict.fromkeys(tasks + extra))


def lm_task_metadata(args: argparse.Namespace) -> dict:
    """What lm-eval's task configs read: the offline BIG-bench task and the seed."""
    return evaluate_utils.lm_task_metadata(getattr(args, "mc_task", None), args.seed)


def cur_settings(args: argparse.Namespace) -> dict:
    """The CUR options every decomposition of the run shares."""
    return dict(rank_align=args.rank_align, selection=args.selection, u_mode=args.u_mode)


def method_settings(args: argparse.Namespace) -> dict:
    """What modules.low_rank_linear.compress_linear needs besides the layer, its ratio, scale and covariance."""
    return dict(method=getattr(args, "method", "acur"), cov_damp=getattr(args, "cov_damp", 0.01),
                **cur_settings(args))


def needs_covariance(args: argparse.Namespace) -> bool:
    """Whether the method or the metric reads the input covariances (else they are not measured)."""
    return registry.get(args.method).needs_covariance(args.u_mode) or args.sensitivity_metric == "fisher_error"


def needs_fisher(args: argparse.Namespace) -> bool:
    """Whether the method or the metric reads the output fisher (else it is not measured)."""
    return registry.get(args.method).fisher or args.sensitivity_metric == "fisher_error"



# ---------------------------------------------------------------- checks before loading
def validate_args(args: argparse.Namespace) -> None:
    """Cheap checks of every input, before anything is loaded. Raises UsageError."""
    has_ratio, has_ppl = args.param_ratio_target != -1, args.ppl_target != -1
    if has_ratio and not (0 < args.param_ratio_target <= 1) or math.isnan(args.param_ratio_target):
        raise UsageError(f"--param_ratio_target must be in (0, 1], got {args.param_ratio_target}")
    if has_ppl and not args.ppl_target > 0:
        raise UsageError(f"--ppl_target must be > 0, got {args.ppl_target}")
    validate_kv_args(args)
    validate_device_args(args)
    validate_device_map_args(args)
    validate_output_args(args)
    if getattr(args, "stream", "auto") == "on":
        validate_stream_args(args)
    if not args.raw_model and not args.compress_kv_cache and has_ratio == has_ppl:
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
    sensitivity_ratios(args)
    validate_method_args(args)
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
    validate_lm_eval_args(args)
    model_id = args.model_id
    if model_id not in datautils.OFFLINE_MODELS and not os.path.isdir(model_id):
        looks_like_path = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
        if looks_like_path or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", model_id):
            raise UsageError(f"model not found: {model_id!r} is neither a local directory, an offline "
                             f"alias ({', '.join(datautils.OFFLINE_MODELS)}) nor a hub id")


def validate_device_args(args: argparse.Namespace) -> None:
    """--device names a device this machine has: a missing GPU used to surface as a traceback at load."""
    if args.device == "auto":
        return
    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {args.device!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here (torch {torch.__version__} sees "
                             "no GPU); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return
    try:  # any other backend (mps, xpu, ...): the cheapest real use of it
        torch.empty(0, device=dev)
    except Exception as exc:
        raise UsageError(f"--device {args.device} is not usable here ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None


def validate_output_args(args: argparse.Namespace) -> None:
    """Every folder the run writes into accepts new files, checked before any heavy work: a read-only
    --output_dir or --cache_dir used to end a finished compression in a traceback, its results lost."""
    places = [("--output_dir", args.output_dir)] + ([("--cache_dir", args.cache_dir)] if args.use_cache else []) \
        + ([("--stream_dir", args.stream_dir)] if getattr(args, "stream_dir", None) and args.stream != "off" else [])
    for flag, folder in places:
        why = unwritable(folder)
        if why:
            raise UsageError(f"{flag} {folder} is not writable ({why}); choose another folder")


def stream_refusals(args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    """(flag, refused, why) of every option a streamed run cannot honour (it never holds the whole model)."""
    structured_method = not registry.get(args.method).per_linear
    return [
        ("--sensitivity_metric ppl", args.sensitivity_metric == "ppl",
         "each candidate would run every later block; use fisher_error, stable_rank or spectral"),
        ("--ppl_target", args.ppl_target != -1, "the search evaluates whole models; give --param_ratio_target"),
        ("--raw_model", args.raw_model, "nothing to compress"),
        ("--compress_kv_cache", args.compress_kv_cache, "not streamed yet"),
        ("--weight_quant", args.weight_quant != "none", "not streamed yet"),
        ("--compress_lm_head", args.compress_lm_head, "not streamed yet"),
        (f"--method {args.method}", structured_method, "structured widths are not streamed yet"),
        ("--scaling_method " + args.scaling_method, args.act_aware and args.scaling_method in ("fisher", "fisher_abs_mean"),
         "weight-gradient scales are not streamed; use abs_mean or abs_max"),
        ("--selection sample", args.selection == "sample",
         "the sensitivity's sampled picks draw from one random stream in layer order, which a reverse pass cannot "
         "replay; use topk or deim"),
        ("--device_map auto", getattr(args, "device_map", "none") == "auto", "streaming already places one block at a time"),
        ("torchrun", int(os.environ.get("WORLD_SIZE", "1")) > 1, "one process walks the blocks"),
        ("lm-eval tasks", bool(lm_eval_tasks(args)), "they need the whole model in memory"),
        ("--calib_dataset selfgen", args.calib_dataset in datautils.GENERATED_DATASETS, "generation needs the whole model"),
    ]


def validate_stream_args(args: argparse.Namespace, why: str = "") -> None:
    """--stream on (or auto, once it chose streaming: `why` says the model does not fit): UsageError naming
    the first option a streamed run cannot honour."""
    for flag, bad, reason in stream_refusals(args):
        if bad:
            lead = f"the model does not fit in memory ({why}; --stream off loads it anyway) and " if why else ""
            raise UsageError(f"{lead}{flag} is not supported with --stream ({reason})")


def validate_device_map_args(args: argparse.Namespace) -> None:
    """--device_map auto / --max_memory: what runs on a dispatched (offloaded) model and what is refused:
    the refused stages write into or take gradients of weights that accelerate keeps on 'meta'."""
    auto = getattr(args, "device_map", "none") == "auto"
    if getattr(args, "max_memory", None) is not None:
        if not auto:
            raise UsageError("--max_memory needs --device_map auto")
        try:
            datautils.parse_max_memory(args.max_memory)
        except ValueError as exc:
            raise UsageError(f"--max_memory: {exc}") from None
    if not auto:
        return
    refused = [("--device", args.device != "auto", "accelerate places the model itself"),
               ("--compress_kv_cache", args.compress_kv_cache, "the KV-cache mode rewrites attention weights in place"),
               ("--weight_quant", args.weight_quant != "none", "quantization rewrites the factors in place"),
               ("--compress_lm_head", args.compress_lm_head, "lm_head is tied to offloaded embeddings"),
               ("--scaling_method", args.act_aware and args.scaling_method in ("fisher", "fisher_abs_mean"),
                "weight gradients do not reach offloaded weights; use abs_mean or abs_max"),
               ("--compile_blocks on", args.compile_blocks == "on", "compiled blocks cannot run accelerate's hooks"),
               ("torchrun", int(os.environ.get("WORLD_SIZE", "1")) > 1, "one process holds the dispatched model")]
    for flag, bad, why in refused:
        if bad:
            raise UsageError(f"{flag} is not supported with --device_map auto ({why})")


def validate_kv_args(args: argparse.Namespace) -> None:
    """KV-cache mode has its own target and candidates; a ppl target is refused, as in ASVD4LLM."""
    if not args.compress_kv_cache:
        if args.kv_cache_ratio_target != -1:
            raise UsageError("--kv_cache_ratio_target needs --compress_kv_cache")
        return
    if args.ppl_target != -1:
        raise UsageError("--ppl_target is not supported with --compress_kv_cache (as in ASVD4LLM); "
                         "give --kv_cache_ratio_target")
    if args.param_ratio_target != -1 or args.raw_model:
        raise UsageError("--compress_kv_cache searches on --kv_cache_ratio_target; drop "
                         + ("--raw_model" if args.raw_model else "--param_ratio_target"))
    t = args.kv_cache_ratio_target
    if t == -1:
        raise UsageError("--compress_kv_cache needs --kv_cache_ratio_target (cached K/V dims / original, 0 < r <= 1)")
    if not 0 < t <= 1:  # NaN fails too
        raise UsageError(f"--kv_cache_ratio_target must be in (0, 1], got {t}")
    if args.compress_lm_head:
        raise UsageError("--compress_lm_head does not apply with --compress_kv_cache (only k_proj/v_proj are compressed)")
    parse_kv_fractions(args.kv_rank_fractions)


def validate_method_args(args: argparse.Namespace) -> None:
    """The method's own needs: activation scales, a CUR form for KV mode and quantization."""
    if registry.get(args.method).scale == "required" and not args.act_aware:
        raise UsageError(f"--method {args.method} scales by activations: add --act_aware")
    if not args.cov_damp >= 0:
        raise UsageError(f"--cov_damp must be >= 0, got {args.cov_damp}")
    if not registry.get(args.method).per_linear:
        validate_structured_args(args)
    if args.method != "acur":
        if args.compress_kv_cache:
            raise UsageError(f"--compress_kv_cache builds CUR latents: it needs --method acur, not {args.method}")
        if args.weight_quant != "none" and registry.get(args.method).form != "cur":
            raise UsageError(f"--weight_quant quantizes CUR factors: not supported with --method {args.method}")
    if args.compress_kv_cache and not registry.is_seed_cur("acur", args.selection, args.u_mode):
        raise UsageError(f"--compress_kv_cache supports --selection {'/'.join(registry.SEED_SELECTIONS)} and "
                         f"--u_mode {'/'.join(registry.SEED_U_MODES)}")


def validate_structured_args(args: argparse.Namespace) -> None:
    """--method neurons / structured slice whole neurons and heads of the decoder blocks in place."""
    refused = [("--ppl_target", args.ppl_target != -1, "give --param_ratio_target"),
               ("--compress_lm_head", args.compress_lm_head, "lm_head has no neurons to keep"),
               ("--device_map auto", getattr(args, "device_map", "none") == "auto", "the blocks are resized in place"),
               ("--sensitivity_metric " + args.sensitivity_metric, args.sensitivity_metric not in ("ppl", "fisher_error"),
                "widths are allocated by the closed-form refit loss (fisher_error)")]
    for flag, bad, why in refused:
        if bad:
            raise UsageError(f"{flag} is not supported with --method {args.method} ({why})")


def validate_quant_args(args: argparse.Namespace) -> None:
    """--weight_quant / --quant_group_size: a known spec, on a compressed model, AWQ on magnitudes."""
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


def validate_lm_eval_args(args: argparse.Namespace) -> None:
    """Unknown task names, a bad --eval_limit or a non-multiple-choice --mc_task fail before any heavy work."""
    if "selfgen" in eval_datasets(args):
        raise UsageError("selfgen is calibration data only; evaluate perplexity on another text")
    limit = getattr(args, "eval_limit", None)
    if limit is not None and not limit > 0:
        raise UsageError(f"--eval_limit must be > 0, got {limit}")
    tasks = lm_eval_tasks(args)
    if not tasks:
        return
    if getattr(args, "mc_task", None):
        if not re.fullmatch(r"\w+", args.mc_task):
            raise UsageError(f"--mc_task must be a task name, got {args.mc_task!r}")
        try:
            datautils.mc_docs(args.mc_task, args.seed)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            raise UsageError(f"--mc_task {args.mc_task}: {exc}") from None
    try:
        evaluate_utils.check_lm_tasks(tasks, lm_task_metadata(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from None



# ---------------------------------------------------------------- checks that need the model or one measurement
def check_rank_align(linears: list[LinearInfo], args: argparse.Namespace) -> None:
    """UsageError when --rank_align exceeds the largest rank any compressed layer can take (at most its
    smallest dimension): the alignment could apply nowhere, the run would silently ignore it."""
    if args.rank_align == 1 or not linears:
        return
    kv = getattr(args, "compress_kv_cache", False)

    def top_rank(info: LinearInfo) -> int:
        m, n = info.module.weight.shape
        return min(m, n) if kv else registry.get(args.method).rank(m, n, 1.0, 1)
    best = max(linears, key=top_rank)
    if args.rank_align > top_rank(best):
        raise UsageError(f"--rank_align {args.rank_align} exceeds every compressed layer's largest possible "
                         f"rank (at most {top_rank(best)}, in {best.name} of shape "
                         f"{tuple(best.module.weight.shape)}): it could never apply")


def check_ppl_target(target: float, dense_calib: float, dataset: str) -> None:
    """UsageError (before sensitivity) for a --ppl_target below the dense model's own calibration
    perplexity: every candidate the search tries removes parameters from the dense model, so such a
    target asks for a compressed model better than the full one; the search would only end with
    nothing compressed. Costs one forward pass over the calibration windows."""
    if not dense_calib <= target:  # NaN too
        raise UsageError(f"--ppl_target {target} cannot be reached: the dense model's own calibration "
                         f"perplexity on {dataset} is {dense_calib:.4g}; give a target above it")

