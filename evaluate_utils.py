"""Perplexity by the ASVD4LLM protocol: test text joined with "\\n\\n", tokenised once, cut into
non-overlapping windows of `seqlen` tokens, perplexity = exp(mean token NLL over the windows).
Also lm-eval accuracy on the in-memory model, and the checks of a finished run's results (nothing
compressed, broken perplexities) that keep a bad number from passing for a result."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from modules.model_utils import input_device


def windows(ids: torch.Tensor, seqlen: int, max_windows: int = 0, bos_token_id: int | None = None
            ) -> torch.Tensor:
    """Non-overlapping windows (n, seqlen) of a 1-D id tensor; with a BOS id each window starts with it."""
    body = seqlen - 1 if bos_token_id is not None else seqlen
    n = ids.numel() // body
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows and max_windows > 0:
        n = min(n, max_windows)
    w = ids[: n * body].view(n, body)
    if bos_token_id is not None:
        w = torch.cat([torch.full((n, 1), bos_token_id, dtype=w.dtype), w], dim=1)
    return w


def token_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (fp32) and the number of predicted tokens."""
    loss, count = token_nll_tensor(logits, input_ids)
    return float(loss.item()), count


def token_nll_tensor(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """token_nll_sum with the sum left on the device (no host sync: loops add these up and read once)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = input_ids[:, 1:].to(logits.device)
    loss = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                       shift_labels.reshape(-1), reduction="sum")
    return loss, shift_labels.numel()


@torch.no_grad()
def perplexity_of_windows(model: nn.Module, windows_ids: torch.Tensor, batch_size: int = 1,
                          desc: str | None = "perplexity") -> float:
    """exp(mean NLL) of a model over a (n, seqlen) batch of windows. NaN is returned as NaN."""
    device = input_device(model)
    total, count = 0.0, 0
    starts = range(0, windows_ids.shape[0], batch_size)
    for i in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        batch = windows_ids[i:i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits
        s, c = token_nll_sum(logits, batch)
        total, count = total + s, count + c
    return nll_to_ppl(total / count)


def nll_to_ppl(mean_nll: float) -> float:
    """exp(mean NLL); NaN stays NaN (reported, never hidden), overflow becomes inf."""
    if math.isnan(mean_nll):
        return float("nan")
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


def evaluate_perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int = 2048, batch_size: int = 1,
                        max_windows: int = 0, bos_token_id: int | None = None,
                        desc: str = "perplexity") -> float:
    """Perplexity of a model on one tokenised test text (1-D ids)."""
    return perplexity_of_windows(model, windows(ids, seqlen, max_windows, bos_token_id), batch_size, desc)


# ================================================================ lm-eval tasks (MMLU, offline multiple choice, any task)
# Accuracy of the in-memory (compressed) model through lm-eval 0.4: HFLM wraps the model object itself, so
# what is scored is exactly what acur.py built (no save/reload round trip). ASVD4LLM reported MMLU as the
# unweighted mean of the 57 hendrycksTest subject accuracies, 0-shot; lm-eval 0.4's "mmlu" group weights
# subjects by size, so both are kept: `<group>_mean` (ASVD's number) and the group's own acc in the info.
ROOT_DIR = Path(__file__).resolve().parent
LM_TASK_DIR = ROOT_DIR / "tools" / "lm_tasks"  # offline tasks: bigbench_mc, cur4llm_zeroshot
MMLU_GROUP = "mmlu"
MMLU_N_SUBJECTS = 57
_TASK_MANAGERS: dict[str, object] = {}
_LOCAL_NAMES: dict[str, set[str]] = {}  # per local TaskManager: the names it can build alone


def lm_task_metadata(mc_task: str | None = None, seed: int | None = None) -> dict:
    """lm-eval metadata read by the offline `bigbench_mc` task (carried task name, shuffle seed)."""
    meta = {}
    if mc_task:
        meta["bigbench_task"] = mc_task
    if seed is not None:
        meta["bigbench_seed"] = int(seed)
    return meta


def _local_names(tm) -> set[str]:
    """Names a local-only TaskManager can build: its tasks, and its groups whose members (recursively) are
    local too (paper_zeroshot lives in tools/lm_tasks but names lm-eval's hub tasks)."""
    from lm_eval.tasks._index import Kind
    index, memo = tm.task_index, {}

    def local(name: str, seen: frozenset = frozenset()) -> bool:
        if name not in memo:
            entry = index.get(name)
            if entry is None or name in seen:
                memo[name] = False
            elif entry.kind == Kind.GROUP:
                members = (entry.cfg or {}).get("task") or []
                memo[name] = all(isinstance(m, str) and local(m, seen | {name}) for m in members)
            else:
                memo[name] = True
        return memo[name]
    return {n for n in index if local(n)}


def lm_task_manager(metadata: dict | None = None, tasks: list[str] | None = None):
    """lm-eval TaskManager over tools/lm_tasks plus, unless every task is local, lm-eval's built-in tasks.
    Built once per (metadata, scope): indexing lm-eval's ~15k task YAMLs takes 10-60 s on a CPU box, and the
    offline tasks (bigbench_mc, the cur4llm_zeroshot suite) never need it."""
    from lm_eval.tasks import TaskManager
    local_key = json.dumps([metadata or {}, "local"], sort_keys=True)
    if local_key not in _TASK_MANAGERS:
        _TASK_MANAGERS[local_key] = TaskManager(include_path=str(LM_TASK_DIR), include_defaults=False,
                                                metadata=metadata or None)
        _LOCAL_NAMES[local_key] = _local_names(_TASK_MANAGERS[local_key])
    local = _TASK_MANAGERS[local_key]
    if tasks is not None and set(tasks) <= _LOCAL_NAMES[local_key]:
        return local
    if tasks is not None and not set(tasks) & set(local.all_tasks):
        metadata = None  # only the local tasks read metadata: share one index (e.g. with check_lm_tasks)
    key = json.dumps([metadata or {}, "all"], sort_keys=True)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=str(LM_TASK_DIR), metadata=metadata or None)
    return _TASK_MANAGERS[key]


def unknown_tasks_message(unknown: list[str]) -> str:
    """One line: what is unknown, what runs offline, how to list lm-eval's own tasks."""
    from offline_resources import ZEROSHOT_GROUP, ZEROSHOT_TASKS
    return (f"unknown lm-eval task(s): {', '.join(unknown)}; offline, the repo carries the suite "
            f"'{ZEROSHOT_GROUP}' ({', '.join(ZEROSHOT_TASKS)}) and 'bigbench_mc' (--mc_task); with the "
            f"hub: 'paper_zeroshot' or any task of `lm-eval ls tasks --include_path {LM_TASK_DIR.relative_to(ROOT_DIR)}`")


def check_lm_tasks(tasks: list[str], metadata: dict | None = None) -> None:
    """Raise ValueError (one line) naming every task/group lm-eval does not know, the offline suite and how
    to list lm-eval's tasks (cheap next to evaluating). Names do not depend on metadata: one index serves
    every check."""
    known = set(lm_task_manager(None, tasks).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(unknown_tasks_message(unknown))


def leaf_tasks(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    """The scored tasks under a task or (nested) group name, in lm-eval's order."""
    if name not in group_subtasks or not group_subtasks[name]:
        return [name]
    out = []
    for child in group_subtasks[name]:
        out.extend(leaf_tasks(child, group_subtasks))
    return out


def _numeric_metrics(row: dict) -> dict[str, float]:
    """{"acc": .., "acc_stderr": ..} from lm-eval's {"acc,none": .., "acc_stderr,none": ..}."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "," in k:
            metric, filt = k.split(",", 1)
            out[metric if filt == "none" else f"{metric},{filt}"] = float(v)
    return out


def summarize_lm_results(raw: dict, requested: list[str]) -> dict:
    """Flat accuracies from simple_evaluate's output: {"acc": {leaf: acc, "<group>_mean": unweighted mean},
    "metrics": all numeric metrics per task/group, "n_samples", "leaves" per requested name, "warnings"}."""
    results, subtasks = raw.get("results", {}), raw.get("group_subtasks", {}) or {}
    acc, metrics, warnings, leaves_of = {}, {}, [], {}
    for name, row in results.items():
        metrics[name] = _numeric_metrics(row)
    for req in requested:
        leaves = leaf_tasks(req, subtasks)
        leaves_of[req] = leaves
        for leaf in leaves:
            m = metrics.get(leaf, {})
            if "acc" in m:
                acc[leaf] = m["acc"]
            elif leaf not in acc:
                warnings.append(f"{leaf}: no acc metric (has {', '.join(m) or 'nothing'}); see metrics")
        if len(leaves) > 1 or leaves[0] != req:
            vals = [acc[x] for x in leaves if x in acc]
            if len(vals) != len(leaves):
                warnings.append(f"{req}: only {len(vals)}/{len(leaves)} subtasks report acc")
            if vals:
                acc[f"{req}_mean"] = sum(vals) / len(vals)
    n_samples = {k: v.get("effective", v.get("original")) for k, v in (raw.get("n-samples") or {}).items()}
    return {"acc": acc, "metrics": metrics, "n_samples": n_samples, "leaves": leaves_of, "warnings": warnings}


def evaluate_lm_tasks(model: nn.Module, tokenizer, tasks: list[str], limit: float | None = None,
                      batch_size: int = 1, num_fewshot: int = 0, metadata: dict | None = None) -> dict:
    """Score an in-memory model on lm-eval 0.4 tasks/groups through HFLM(pretrained=model, tokenizer=...).

    Returns summarize_lm_results(...) plus "seconds". MMLU: tasks=["mmlu"] gives the 57 subjects and
    acc["mmlu_mean"] (a loud warning if lm-eval resolves a different number of subjects)."""
    import time

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    if not tasks:
        raise ValueError("no lm-eval tasks given")
    tm = lm_task_manager(metadata, list(tasks))
    unknown = [t for t in tasks if t not in set(tm.all_tasks)]
    if unknown:
        raise ValueError(unknown_tasks_message(unknown))
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    t0 = time.perf_counter()
    try:
        raw = simple_evaluate(lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                              bootstrap_iters=1000, log_samples=False)
    finally:
        model.train(was_training)
    out = summarize_lm_results(raw, list(tasks))
    out["seconds"] = round(time.perf_counter() - t0, 3)
    if MMLU_GROUP in tasks and len(out["leaves"][MMLU_GROUP]) != MMLU_N_SUBJECTS:
        out["warnings"].append(f"mmlu resolved to {len(out['leaves'][MMLU_GROUP])} subjects, "
                               f"not {MMLU_N_SUBJECTS}: mmlu_mean is not comparable to ASVD's")
    for w in out["warnings"]:
        print(f"WARNING: lm-eval: {w}")
    return out


# ---------------------------------------------------------------- checks of a finished run's results
def summarize_params(report: dict) -> dict:
    """Dense and kept parameters of the compressed linears (a compress_model report), and their ratio."""
    dense = sum(r["params_dense"] for r in report.values())
    kept = sum(r["params"] for r in report.values())
    return {"compressed_linears_dense": dense, "compressed_linears_kept": kept,
            "reached": kept / dense if dense else 1.0}


def rank_align_warning(report: dict[str, dict], rank_align: int) -> str | None:
    """Compressed layers whose rank budget was below --rank_align got an unaligned rank: say how many."""
    ranks = {k: v["rank"] for k, v in report.items() if v["rank"] is not None}
    off = sorted(k for k, r in ranks.items() if r % rank_align)
    if rank_align == 1 or not off:
        return None
    return (f"--rank_align {rank_align} not honoured in {len(off)} of {len(ranks)} compressed layers (their "
            f"rank budget is below it, e.g. {off[0]} got rank {ranks[off[0]]}): those ranks are unaligned")


def nothing_compressed(report: dict[str, dict], trace: list[dict], args: argparse.Namespace) -> dict | None:
    """A flag (with the reason) when the search kept every layer dense: the perplexities that follow
    are the dense model's, and must not pass for a compressed one."""
    if any(r["rank"] is not None for r in report.values()):
        return None
    if args.ppl_target != -1:
        tried = [t for t in trace if t["ppl"] == t["ppl"]]
        mild = max(tried, key=lambda t: t["cut"]) if tried else None
        reason = (f"--ppl_target {args.ppl_target} is unreachable: the mildest compression tried (cut "
                  f"{mild['cut']}) gave calibration perplexity {mild['ppl']:.4g}" if mild else
                  f"--ppl_target {args.ppl_target} is unreachable: every compression tried gave NaN perplexity")
    else:
        reason = "no layer was compressed (the target keeps every layer dense)"
    return {"reason": reason, "ppl_target": args.ppl_target if args.ppl_target != -1 else None}


BROKEN_FACTOR = 10.0     # compressed ppl above 10x the dense reference: broken
BROKEN_ABSOLUTE = 1e4    # without a dense reference: broken above this perplexity


def broken_result(results: dict, args: argparse.Namespace) -> dict | None:
    """The broken-result flag of a compressed run, or None: some perplexity is non-finite or far above
    dense. Reference: the dense perplexity of the same text (--eval_dense), else the dense calibration
    perplexity (measured in --ppl_target runs), else only the non-finite / absolute check.

    Thresholds: > 10x the reference is ln(10) = 2.3 nats more loss per token, while usable low-rank
    compressions stay within ~1.1-3x of dense (ASVD, SVD-LLM tables): a 10x model has stopped modelling
    text, it is never a trade-off worth reporting as one. > 1e4 without a reference: no working LM scores
    that on natural text (9.2 nats a token, about uniform guessing over 10,000 tokens)."""
    ppl = results.get("ppl", {})
    dense, calib = ppl.get("dense", {}), results.get("ppl_calibration", {})
    measured = [(f"{ds} perplexity", v, dense.get(ds, calib.get("dense")),
                 "dense" if ds in dense else "dense calibration")
                for ds, v in ppl.get("compressed", {}).items()]
    if "compressed" in calib:
        measured.append(("calibration perplexity", calib["compressed"], calib.get("dense"), "dense calibration"))
    bad = []
    for what, v, ref, ref_kind in measured:
        if not math.isfinite(v):
            bad.append({"metric": what, "ppl": v, "reference": ref, "why": "non-finite"})
        elif ref is not None and math.isfinite(ref) and v > BROKEN_FACTOR * ref:
            bad.append({"metric": what, "ppl": v, "reference": ref,
                        "why": f"{v / ref:,.0f}x the {ref_kind} perplexity {ref:.4g}"})
        elif (ref is None or not math.isfinite(ref)) and v > BROKEN_ABSOLUTE:
            bad.append({"metric": what, "ppl": v, "reference": None, "why": f"above {BROKEN_ABSOLUTE:g}"})
    if not bad:
        return None
    layers = {k: v for k, v in results.get("layers", {}).items() if v["rank"] is not None}
    low = min(layers, key=lambda k: layers[k]["ratio"]) if layers else None
    cause = [f"--method {args.method}", f"--sensitivity_metric {args.sensitivity_metric}"
             + (" (a heuristic; ppl is the ASVD protocol)" if args.sensitivity_metric != "ppl" else "")]
    if low:
        cause.append(f"lowest layer ratio {layers[low]['ratio']:.3g} ({low}, rank {layers[low]['rank']})")
    cause.append(f"reached param ratio {results.get('param_ratio', {}).get('reached', 1.0):.4f}")
    if results.get("fallbacks"):
        cause.append(f"{len(results['fallbacks'])} layers took fallbacks")
    if args.weight_quant != "none":
        cause.append(f"--weight_quant {args.weight_quant}")
    summary = ("compressed model looks BROKEN: " + "; ".join(f"{b['metric']} {b['ppl']:.4g} ({b['why']})" for b in bad)
               + "; likely cause: " + ", ".join(cause)
               + "; try a larger target, --sensitivity_metric ppl or another --method")
    return {"checks": bad, "method": args.method, "sensitivity_metric": args.sensitivity_metric,
            "lowest_layer_ratio": layers[low]["ratio"] if low else None, "lowest_layer": low,
            "threshold": f">{BROKEN_FACTOR:g}x dense, or >{BROKEN_ABSOLUTE:g} without a dense reference, or non-finite",
            "summary": summary}

