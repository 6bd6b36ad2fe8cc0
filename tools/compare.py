"""CUR vs SVD side by side: a grid of methods x parameter ratios on one model, sharing calibration.

    python tools/compare.py --methods acur,acur:u_mode=data_aware,asvd,rowid,colid --ratios 0.9,0.8 -- \\
        --model_id smollm2-135m --act_aware --calib_dataset squad_wiki --n_calib_samples 16 \\
        --calib_seqlen 512 --sensitivity_metric stable_rank --eval_ppl new_wiki --eval_seqlen 512 --use_cache

Everything after the compare flags is an acur.py flag (--param_ratio_target comes from --ratios). The
model is loaded once; per calibration seed the calibration data, activation statistics and input
covariances are computed once; every method gets its own sensitivity (cached per method and seed with
--use_cache), search and decomposition, and the model is restored between cells. A method spec is
METHOD[:flag=value...] with flags among selection, u_mode, cov_damp, alpha, rank_align, structured_widths,
structured_selection (e.g. acur:selection=deim:u_mode=data_aware, structured:structured_widths=uniform).

--eval_tasks LIST (--eval_limit N): every cell, dense included, is also scored by lm-eval 0.4 on the in-memory
model (acc, acc_norm where defined, lm-eval's stderr; dense once per grid, cached with --use_cache).
--calib_seeds N: every cell compressed N times, calibration drawn with seeds 0..N-1; every figure is
reported as mean ± sd (sample sd, ddof=1) with each seed's value kept, and for the methods that keep actual
rows / columns / neurons the per-layer Jaccard overlap of the kept indices across seeds.
--merge A.json B.json ... --name all: one table from grids split by method (e.g. over several GPU calls).

Writes <output_dir>/<name>.md (the papers' table), .png (perplexity and mean accuracy vs parameter ratio,
one line per method, error bars over seeds), _overlap.png (kept-index overlap heatmap, with seeds) and .json
(every number, schema cur4llm.compare/2; tools/compare_table.py writes them).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import acur  # noqa: E402
import datautils  # noqa: E402
import evaluate_utils  # noqa: E402
from cache_store import tensors_digest  # noqa: E402
from modules import registry  # noqa: E402
from compare_table import (DENSE_STYLE, FAMILY_STYLE, SCHEMA, acc_columns, index_overlap, line_styles,  # noqa: E402,F401
                           lm_figures, markdown, method_family, output_stem, plot, plot_overlap, summarize_cell,
                           write_outputs)

SPEC_FLAGS = ("selection", "u_mode", "cov_damp", "alpha", "rank_align", "sensitivity_metric", "structured_widths",
              "structured_selection")
DEFAULT_METHODS = "acur,acur:u_mode=data_aware,asvd,rowid,colid"
DEFAULT_RATIOS = "0.95,0.9,0.85,0.8"
# flags that do not change a figure: grids differing only in these merge (a GPU call's output folder moves)
MERGE_IGNORED_ARGS = ("method", "param_ratio_target", "output_dir", "cache_dir", "run_name", "use_cache")


def parse_spec(spec: str, base: argparse.Namespace) -> argparse.Namespace:
    """acur.py arguments of one method spec METHOD[:flag=value...] (values typed like the defaults).
    Flags sequential / fisher / shrink (0 or 1) switch one idea of a method off or on: an ablation
    (the method runs as registry.variant, named e.g. srid[sequential=0])."""
    method, *pairs = spec.split(":")
    if method not in registry.METHODS:
        raise acur.UsageError(f"unknown method {method!r} in {spec!r}; choose from {', '.join(registry.METHODS)}")
    args = copy.deepcopy(base)
    args.method = method
    ablate = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if sep and key in registry.ABLATION_FLAGS and value in ("0", "1"):
            ablate[key] = value == "1"
            continue
        if not sep or key not in SPEC_FLAGS:
            raise acur.UsageError(f"bad method option {pair!r} in {spec!r}: use flag=value with flag in "
                                  f"{', '.join(SPEC_FLAGS + registry.ABLATION_FLAGS)}")
        default = getattr(base, key)
        try:
            setattr(args, key, type(default)(value))
        except ValueError:
            raise acur.UsageError(f"bad value for {key} in {spec!r}: {value!r}") from None
    if ablate:
        args.method = registry.variant(method, **ablate).name
    return args


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="All other flags are acur.py flags (see python acur.py --help).")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma list of METHOD[:flag=value...]")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help="comma list of parameter ratio targets")
    p.add_argument("--name", default=None, help="output file stem (default: compare_<model>_<time>)")
    p.add_argument("--no_dense", action="store_true", help="skip the dense model's perplexity and accuracy")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the method specs in this many child processes at once (one GPU serves several "
                        "when the model is small), then merge their tables into one")
    p.add_argument("--uniform", action="store_true",
                   help="no sensitivity search: every linear at the target ratio (compares the decompositions "
                        "alone, without the allocation heuristic)")
    p.add_argument("--calib_seeds", type=int, default=None,
                   help="compress every cell N times, calibration drawn with seeds 0..N-1; figures are mean ± sd "
                        "(sample sd) over the seeds (default: one draw with acur.py's --seed)")
    p.add_argument("--eval_tasks", default=None,
                   help="comma list of lm-eval tasks/groups every cell (dense too) is scored on (acur.py's flag)")
    p.add_argument("--eval_limit", type=float, default=None,
                   help="examples per lm-eval task (a fraction if < 1; acur.py's flag)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge compare JSONs of the same grid split by method into one table (--name; written "
                        "beside the first JSON unless --output_dir DIR follows) and exit; no model is loaded")
    return p


def parse_grid(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], list[float], argparse.Namespace]:
    """(compare options, method specs, ratios, base acur.py arguments). Every check runs here, before any
    model is loaded (unknown lm-eval tasks included)."""
    opts, rest = compare_parser().parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    for flag in ("eval_tasks", "eval_limit"):  # compare flags that are acur.py's: passed on (to --jobs children too)
        if getattr(opts, flag) is not None:
            rest += [f"--{flag}", str(getattr(opts, flag))]
    opts.acur_flags = rest
    if opts.jobs < 1:
        raise acur.UsageError(f"--jobs must be >= 1, got {opts.jobs}")
    if opts.calib_seeds is not None and opts.calib_seeds < 1:
        raise acur.UsageError(f"--calib_seeds must be >= 1 (seeds 0..N-1), got {opts.calib_seeds}")
    if any(a.split("=")[0] in ("--param_ratio_target", "--ppl_target") for a in rest):
        raise acur.UsageError("give the ratios with --ratios, not --param_ratio_target / --ppl_target")
    try:
        ratios = [float(x) for x in opts.ratios.split(",") if x.strip()]
    except ValueError:
        raise acur.UsageError(f"--ratios must be numbers, got {opts.ratios!r}") from None
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise acur.UsageError(f"--ratios must be in (0, 1], got {opts.ratios!r}")
    specs = [s.strip() for s in opts.methods.split(",") if s.strip()]
    if not specs or len(set(specs)) != len(specs):
        raise acur.UsageError(f"--methods must list distinct method specs, got {opts.methods!r}")
    try:
        base = acur.build_parser().parse_args(rest + ["--param_ratio_target", str(ratios[0])])
    except SystemExit as exc:
        raise acur.UsageError(f"bad acur.py flags: {' '.join(rest)}") from exc
    if base.weight_quant != "none" or base.compress_kv_cache or base.raw_model:
        raise acur.UsageError("compare.py compares decompositions: drop --weight_quant / --compress_kv_cache / --raw_model")
    if not acur.eval_datasets(base):
        raise acur.UsageError("compare.py needs at least one --eval_ppl dataset")
    for spec in specs:
        for r in ratios:
            a = parse_spec(spec, base)
            a.param_ratio_target = r
            acur.validate_args(a)  # unknown --eval_tasks and a bad --eval_limit fail here (one line)
    return opts, specs, sorted(ratios, reverse=True), base


def calib_seeds(opts: argparse.Namespace, base: argparse.Namespace) -> list[int]:
    """0..N-1 with --calib_seeds N; else the one --seed (a grid as before the flag existed)."""
    return list(range(opts.calib_seeds)) if opts.calib_seeds is not None else [base.seed]


# ---------------------------------------------------------------- what one cell measures besides perplexity
def kept_indices(linears, report: dict) -> tuple[dict, dict]:
    """({layer: {side: kept indices}}, {layer: {side: how many there are}}) of a compressed model, before it
    is restored: the index buffers of CURLinear (row_indices, col_indices), RowIDLinear (rows) and ColIDLinear
    (cols), and the kept groups of every structured unit (its report row). A layer the allocation left dense
    keeps every index of the sides its method picks; SVD forms keep none ({})."""
    kept, sizes = {}, {}
    units = {row["unit"]: row for row in report.values() if "unit" in row}
    if units:  # structured forms: whole neurons / KV groups per unit
        for name, row in units.items():
            kept[name], sizes[name] = {"groups": list(row["kept"])}, {"groups": row["groups"]}
        return kept, sizes
    sides = {}
    for info in linears:
        for side, attr in (("rows", "row_indices"), ("cols", "col_indices")):
            if isinstance(getattr(info.module, attr, None), torch.Tensor):
                sides[side] = attr
    for info in linears:
        row = report.get(info.name)
        if row is None or not sides:
            continue
        m, n = row["shape"]
        sizes[info.name] = {s: (m if s == "rows" else n) for s in sides}
        kept[info.name] = {s: (getattr(info.module, attr).tolist() if row["rank"] is not None
                               else list(range(sizes[info.name][s]))) for s, attr in sides.items()}
    return kept, sizes


def lm_code_version() -> str:
    """sha256 (16 hex) of what an offline lm-eval score depends on besides the model: lm-eval's version, this
    repo's evaluation code, the task folder and the carried data's checksums."""
    import lm_eval
    h = hashlib.sha256(f"lm_eval {getattr(lm_eval, '__version__', '?')}".encode())
    task_dir = Path(getattr(evaluate_utils, "LM_TASK_DIR", ROOT / "tools" / "bigbench_mc"))
    files = [ROOT / "evaluate_utils.py", ROOT / "offline_resources.py", ROOT / "data" / "SHA256SUMS"]
    files += sorted(p for p in task_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
        if task_dir.is_dir() else []
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def evaluate_tasks(model, tokenizer, base, tasks: list[str], meta: dict) -> dict:
    """evaluate_utils.evaluate_lm_tasks: lm-eval's simple_evaluate on the in-memory model."""
    return evaluate_utils.evaluate_lm_tasks(model, tokenizer, tasks, limit=base.eval_limit,
                                            batch_size=base.eval_batch_size, metadata=meta)


def dense_lm_eval(model, tokenizer, base, fp: dict, tasks: list[str], meta: dict, warnings: list) -> dict:
    """The dense model's lm-eval output, once per grid; with --use_cache read from / saved to a checksummed
    JSON cache keyed by the model, tasks, limit, metadata, batch size, device and code version."""
    key = {**fp, "kind": "lm_eval_dense", "tasks": tasks, "limit": base.eval_limit, "metadata": meta,
           "num_fewshot": 0, "batch_size": base.eval_batch_size, "device": next(model.parameters()).device.type,
           "code": lm_code_version()}
    path = datautils.cache_path("lm_eval_dense", key, base.cache_dir, ".json")
    if base.use_cache:
        blob = datautils.load_json_cache(path, key, warnings)
        if blob is not None:
            print(f"[compare] dense lm-eval accuracies from cache {path}")
            return dict(blob["out"], from_cache=str(path))
    out = evaluate_tasks(model, tokenizer, base, tasks, meta)
    if base.use_cache:
        datautils.save_json_cache(path, key, {"out": out})
    return out


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# ---------------------------------------------------------------- the grid
def run_grid(base: argparse.Namespace, specs: list[str], ratios: list[float], dense: bool = True,
             uniform: bool = False, on_cell=None, seeds: list[int] | None = None) -> dict:
    """Every (method spec, ratio) cell on one loaded model, once per calibration seed (default: --seed
    alone); returns the results dict (no files written). uniform: every linear at the target ratio
    (sensitivity and search skipped). on_cell(results) runs after every finished cell (main writes the files
    there, so a cut or failed run keeps what it measured); a failure or interrupt is recorded in the results
    (results["stopped"]), on_cell runs once more, and the exception propagates.

    lm-eval tasks (--eval_tasks): scored on every cell with the task metadata of --seed (the same questions and
    choice order for every cell and seed); a cell whose scoring fails keeps its perplexity, the failure is
    recorded (cell lm_error, results failures) and the grid goes on."""
    t_start = time.perf_counter()
    seeds = [base.seed] if seeds is None else list(seeds)
    datautils.set_seed(base.seed)
    acur.fetch_texts(base)
    model, tokenizer, fp = acur.load_model(base)
    linears = acur.select_linears(model, base)
    originals = {i.name: i.module for i in linears}
    tasks, meta = acur.lm_eval_tasks(base), acur.lm_task_metadata(base)
    spec_args = {spec: parse_spec(spec, base) for spec in specs}
    timings: dict = {}
    results: dict = {"schema": SCHEMA, "args": vars(base).copy(), "model": fp, "methods": specs,
                     "ratios": ratios, "datasets": acur.eval_datasets(base), "calib_seeds": seeds,
                     "timings": timings, "cells": [], "failures": [], "warnings": [], "calibration": {},
                     "allocation": "uniform" if uniform else f"sensitivity {base.sensitivity_metric}"}
    if tasks:
        import lm_eval
        results["lm_eval"] = {"tasks": tasks, "limit": base.eval_limit, "metadata": meta, "num_fewshot": 0,
                              "version": getattr(lm_eval, "__version__", "?")}
    runs: dict[tuple, list] = {}
    kept: dict[tuple, tuple[list, dict]] = {}
    overlaps: dict[tuple, dict | None] = {}
    suffix = (lambda s: f" (seed {s})") if len(seeds) > 1 else (lambda s: "")

    def publish() -> None:
        results["cells"] = [summarize_cell(spec, r, runs[spec, r], overlaps.get((spec, r)))
                            for spec in specs for r in ratios if runs.get((spec, r))]
        if on_cell is not None:
            on_cell(results)

    def columns(out: dict) -> list[str]:
        if "acc_columns" not in results:
            results["acc_columns"] = acc_columns(out["leaves"])
        return results["acc_columns"]

    where = "loading"
    bar = tqdm(total=len(seeds) * len(specs) * len(ratios), desc="compare: seeds x cells", unit="cell")
    try:
        if dense:
            where = "dense"
            t0 = time.perf_counter()
            results["dense"] = acur.stage_eval(model, tokenizer, base, "dense")
            timings["eval_dense"] = round(time.perf_counter() - t0, 2)
            if tasks:
                t0 = time.perf_counter()
                try:
                    out = dense_lm_eval(model, tokenizer, base, fp, tasks, meta, results["warnings"])
                    results["dense_lm"] = dict(lm_figures(out, columns(out)), seconds=out.get("seconds"),
                                               from_cache=out.get("from_cache"))
                except Exception as exc:  # recorded; the compressed cells are still measured
                    results["failures"].append({"where": "dense lm-eval", "error": error_line(exc)})
                    print(f"[compare] dense lm-eval FAILED: {error_line(exc)}", file=sys.stderr, flush=True)
                timings["lm_eval_dense"] = round(time.perf_counter() - t0, 2)
        for seed in seeds:
            where = f"calibration seed {seed}"
            sargs = copy.deepcopy(base)
            sargs.seed = seed
            datautils.set_seed(seed)
            t0 = time.perf_counter()
            calib_text = None
            if base.calib_dataset in datautils.GENERATED_DATASETS:
                calib_text, _ = acur.prepare_selfgen(model, tokenizer, sargs, fp)
            calib_ids = datautils.get_calib_data(base.calib_dataset, tokenizer, base.n_calib_samples,
                                                 base.calib_seqlen, seed, base.use_bos, calib_text)
            scales = acur.stage_scales(model, linears, calib_ids, sargs, fp)
            timings["calibration" + suffix(seed)] = round(time.perf_counter() - t0, 2)
            seed_args = {spec: parse_spec(spec, sargs) for spec in specs}
            covs = fisher = None
            cov_user = next((a for a in seed_args.values() if acur.needs_covariance(a)), None)
            if cov_user is not None:
                t0 = time.perf_counter()
                covs = acur.stage_covariance(model, linears, calib_ids, cov_user, fp)
                timings["covariance" + suffix(seed)] = round(time.perf_counter() - t0, 2)
            fisher_user = next((a for a in seed_args.values() if acur.needs_fisher(a)), None)
            if fisher_user is not None:
                t0 = time.perf_counter()
                fisher = acur.stage_fisher(model, linears, calib_ids, fisher_user, fp)
                timings["fisher" + suffix(seed)] = round(time.perf_counter() - t0, 2)
            stats = acur.layer_stats(linears, scales, covs, fisher, calib_ids.numel())
            results["calibration"][str(seed)] = {"ids_sha256": tensors_digest({"ids": calib_ids})[:16],
                                                 "scales_sha256": tensors_digest(scales)[:16] if scales else None}
            for spec in specs:
                args = seed_args[spec]
                t0 = time.perf_counter()
                if not uniform:
                    where = f"sensitivity {spec}{suffix(seed)}"
                    table, sens_info = acur.stage_sensitivity(model, linears, calib_ids, scales, args, fp, covs, stats)
                    acur.restore_model(linears, originals)
                    timings[f"sensitivity {spec}{suffix(seed)}"] = round(time.perf_counter() - t0, 2)
                    results.setdefault("sensitivity", {})[spec + suffix(seed)] = sens_info
                for r in ratios:
                    where = f"{spec} @ {r}{suffix(seed)}"
                    bar.set_postfix_str(where)
                    t0 = time.perf_counter()
                    args.param_ratio_target = r
                    if uniform:
                        ratios_l = {i.name: r for i in linears}
                    else:
                        ratios_l, _ = acur.stage_search(model, linears, calib_ids, scales, table, args, covs, stats)
                    lm_out, lm_error = None, None
                    try:
                        report = acur.compress_model(linears, ratios_l, scales, args, desc=f"{spec} @ {r}", covs=covs,
                                                     stats=stats, sequential=(model, calib_ids))
                        cell_kept = kept_indices(linears, report) if len(seeds) > 1 else None
                        t1 = time.perf_counter()
                        ppl = acur.stage_eval(model, tokenizer, args, where)
                        t2 = time.perf_counter()
                        if tasks:
                            try:
                                lm_out = evaluate_tasks(model, tokenizer, base, tasks, meta)
                            except Exception as exc:  # the cell keeps its perplexity; the grid goes on
                                lm_error = error_line(exc)
                                results["failures"].append({"where": f"lm-eval {where}", "error": lm_error})
                                print(f"[compare] lm-eval of {where} FAILED: {lm_error}", file=sys.stderr, flush=True)
                    finally:
                        acur.restore_model(linears, originals)
                    run = {"seed": seed, **evaluate_utils.summarize_params(report), "ppl": ppl,
                           "fallbacks": sum(1 for v in report.values() if v["fallback"]),
                           "ranks": {k: v["rank"] for k, v in report.items()},
                           "compress_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2)}
                    if tasks:
                        run["lm_eval_s"] = round(time.perf_counter() - t2, 2)
                        if lm_out is not None:
                            run.update(lm_figures(lm_out, columns(lm_out)))
                        else:
                            run["lm_error"] = lm_error
                    runs.setdefault((spec, r), []).append(run)
                    if cell_kept is not None and cell_kept[0]:
                        kept.setdefault((spec, r), ([], cell_kept[1]))[0].append(cell_kept[0])
                        overlaps[spec, r] = index_overlap(*kept[spec, r])
                    bar.update(1)
                    print(f"[compare] {where}: reached {run['reached']:.4f}  "
                          + "  ".join(f"{d} {v:.3f}" for d, v in ppl.items())
                          + (f"  mean acc {run['mean_acc']:.4f}" if run.get("mean_acc") is not None else ""),
                          flush=True)
                    publish()
    except BaseException as exc:  # a failure or an interrupt: record where, keep every finished cell, re-raise
        reason = ("interrupted (SIGINT)" if isinstance(exc, KeyboardInterrupt) else
                  "terminated (SIGTERM)" if isinstance(exc, acur.Terminated) else f"failed: {error_line(exc)}")
        results["unfinished"] = True
        results["stopped"] = {"where": where, "reason": reason}
        if not isinstance(exc, (KeyboardInterrupt, acur.Terminated)):
            results["failures"].append({"where": where, "error": error_line(exc)})
        timings["total"] = round(time.perf_counter() - t_start, 2)
        publish()
        raise
    finally:
        bar.close()
    timings["total"] = round(time.perf_counter() - t_start, 2)
    results["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    return results


# ---------------------------------------------------------------- several grids into one
def run_jobs(opts: argparse.Namespace, specs: list[str], base: argparse.Namespace, stem: str) -> dict:
    """--jobs N: the specs split round-robin over N child compare.py runs sharing the device, merged
    into one results dict. A child that fails leaves its cells missing ('-' in the table) and its log
    (<stem>.part<i>.log) behind; the merged results say which parts failed."""
    out = Path(base.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = [g for g in (specs[i::opts.jobs] for i in range(opts.jobs)) if g]
    t0 = time.perf_counter()
    procs = []
    for i, group in enumerate(groups):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--methods", ",".join(group), "--ratios", opts.ratios,
               "--name", f"{stem}.part{i}"] + (["--no_dense"] if i or opts.no_dense else []) + \
              (["--uniform"] if opts.uniform else []) + \
              (["--calib_seeds", str(opts.calib_seeds)] if opts.calib_seeds is not None else []) + \
              ["--"] + opts.acur_flags
        log = open(out / f"{stem}.part{i}.log", "w")
        procs.append((i, group, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        print(f"[compare] part {i}: {', '.join(group)} (log {out / f'{stem}.part{i}.log'})", flush=True)
    parts, failed, cut = [], [], None

    def stop(signum, frame):
        raise acur.Terminated(signal.Signals(signum).name)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for _, _, _, proc in procs:
            proc.wait()
    except (KeyboardInterrupt, acur.Terminated) as exc:  # cut: stop the children, keep what they measured
        cut = type(exc).__name__ if isinstance(exc, KeyboardInterrupt) else str(exc)
        for _, _, _, proc in procs:
            proc.terminate()
        for _, _, _, proc in procs:
            proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    for i, group, log, proc in procs:
        rc = proc.returncode
        log.close()
        path = out / f"{stem}.part{i}.json"
        if path.exists():
            parts.append(dict(json.loads(path.read_text()), part=i))
        if rc != 0:
            failed.append({"part": i, "methods": group, "returncode": rc, "log": str(out / f"{stem}.part{i}.log")})
            print(f"[compare] part {i} FAILED (exit {rc}): see {out / f'{stem}.part{i}.log'}", file=sys.stderr)
    if not parts:
        raise RuntimeError(f"every compare.py part failed: {failed}")
    merged = merge_results(parts, specs)
    merged["timings"]["total"] = round(time.perf_counter() - t0, 2)
    merged["jobs"] = {"n": len(groups), "failed": failed}
    if cut:
        merged["unfinished"] = True
        print(f"[compare] stopped by {cut}: the merged table holds the cells measured so far", file=sys.stderr)
    return merged


def merge_results(parts: list[dict], specs: list[str] | None = None) -> dict:
    """One results dict from compare runs of the same model, flags and calibration seeds on different method
    specs (--jobs parts, or grids split over several calls; schema /1 JSONs too). specs: the method order
    (default: each part's methods in turn). Raises ValueError for parts that do not belong together."""
    if not parts:
        raise ValueError("merge_results: nothing to merge")
    first = parts[0]

    def comparable(p: dict) -> dict:
        return {k: v for k, v in p["args"].items() if k not in MERGE_IGNORED_ARGS}
    seeds_of = lambda p: p.get("calib_seeds") or [p["args"]["seed"]]  # noqa: E731
    merged = copy.deepcopy(first)
    for key in ("part", "stopped", "files", "finished", "merged_from"):  # per part: not the merged grid's
        merged.pop(key, None)
    merged.update(schema=SCHEMA, cells=[], timings={}, sensitivity={}, failures=[], warnings=[])
    merged["methods"] = list(specs) if specs is not None else list(dict.fromkeys(m for p in parts for m in p["methods"]))
    merged["ratios"] = sorted({r for p in parts for r in p["ratios"]}, reverse=True)
    merged["unfinished"] = any(p.get("unfinished") for p in parts) or None
    seen = set()
    for i, part in enumerate(parts):
        i = part.get("part", i)  # the part's own number, also when an earlier part left no results
        diff = sorted(k for k in set(comparable(part)) | set(comparable(first))
                      if comparable(part).get(k) != comparable(first).get(k))
        if diff:
            raise ValueError(f"parts ran with different acur.py flags ({', '.join(diff)}): not one grid")
        if seeds_of(part) != seeds_of(first):
            raise ValueError(f"parts ran with different calibration seeds ({seeds_of(first)} vs {seeds_of(part)})")
        for c in part["cells"]:
            if (c["method"], c["target"]) in seen:
                raise ValueError(f"cell {c['method']} @ {c['target']:g} is in more than one part")
            seen.add((c["method"], c["target"]))
        merged["cells"] += part["cells"]
        merged["sensitivity"].update(part.get("sensitivity", {}))
        merged["timings"].update({(k if k.startswith("sensitivity ") else f"{k} (part {i})"): v
                                  for k, v in part["timings"].items()})
        merged["failures"] += part.get("failures", [])
        if part.get("stopped"):
            merged.setdefault("parts_stopped", []).append(dict(part["stopped"], part=i))
        merged["warnings"] += part.get("warnings", [])
        for key in ("dense", "dense_lm", "acc_columns", "lm_eval"):
            if key in part and key not in merged:
                merged[key] = part[key]
        merged.setdefault("calibration", {}).update(part.get("calibration", {}))
    if merged["unfinished"] is None:
        merged.pop("unfinished")
    order = {m: j for j, m in enumerate(merged["methods"])}
    merged["cells"].sort(key=lambda c: (order.get(c["method"], len(order)), -c["target"]))
    return merged


def merge_main(paths: list[str], rest: list[str], name: str | None) -> int:
    """--merge: read the JSONs, merge them, write <name>.md/.json/.png."""
    rest = [a for a in rest if a != "--"]
    extra = argparse.ArgumentParser(prog="compare.py --merge")
    extra.add_argument("--output_dir", default=None)
    try:
        flags, unknown = extra.parse_known_args(rest)
        if unknown:
            raise acur.UsageError(f"--merge takes JSON files, --name and --output_dir only, not {' '.join(unknown)}")
        parts = []
        for p in paths:
            try:
                parts.append(json.loads(Path(p).read_text()))
            except (OSError, ValueError) as exc:
                raise acur.UsageError(f"--merge: cannot read {p} ({type(exc).__name__})") from None
            if not str(parts[-1].get("schema", "")).startswith("cur4llm.compare/"):
                raise acur.UsageError(f"--merge: {p} is not a compare.py JSON")
        try:
            merged = merge_results(parts)
        except ValueError as exc:
            raise acur.UsageError(f"--merge: {exc}") from None
    except acur.UsageError as exc:
        print(f"compare.py: error: {exc}", file=sys.stderr)
        return 2
    merged["merged_from"] = [str(p) for p in paths]
    files = write_outputs(merged, flags.output_dir or str(Path(paths[0]).parent), name or "merged")
    print(markdown(merged))
    print("\n".join(f"{k}: {v}" for k, v in files.items()))
    return 1 if merged.get("failures") else 0


def _raise_terminated(signum, frame):
    raise acur.Terminated()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 a part, a cell's lm-eval or the grid failed (finished cells kept); 2 bad input
    (one line, before any model is loaded); 130 SIGINT / 143 SIGTERM (finished cells kept)."""
    pre, rest = compare_parser().parse_known_args(argv)
    if pre.merge:
        return merge_main(pre.merge, rest, pre.name)
    latest: dict = {}
    try:
        opts, specs, ratios, base = parse_grid(argv)
        stem = output_stem(vars(base), opts.name)
        if opts.jobs > 1:
            results = run_jobs(opts, specs, base, stem)
        else:
            def keep(partial: dict) -> None:
                latest["results"] = partial
                write_outputs(dict(partial, timings=dict(partial["timings"]), unfinished=True), base.output_dir,
                              stem, plot_too=False)
            try:
                previous = signal.signal(signal.SIGTERM, _raise_terminated)
            except ValueError:  # not the main thread
                previous = None
            try:
                results = run_grid(base, specs, ratios, dense=not opts.no_dense, uniform=opts.uniform, on_cell=keep,
                                   seeds=calib_seeds(opts, base))
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
    except acur.UsageError as exc:
        print(f"compare.py: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, acur.Terminated, Exception) as exc:
        if "results" not in latest:
            raise
        partial = latest["results"]
        if not isinstance(exc, (KeyboardInterrupt, acur.Terminated)):
            traceback.print_exc()
        files = write_outputs(partial, base.output_dir, stem)
        print(f"compare.py: {partial['stopped']['reason']} at {partial['stopped']['where']}; the "
              f"{len(partial['cells'])} finished cells are in {files['json']}", file=sys.stderr, flush=True)
        return 143 if isinstance(exc, acur.Terminated) else 130 if isinstance(exc, KeyboardInterrupt) else 1
    files = write_outputs(results, base.output_dir, stem)
    print(markdown(results))
    print("\n".join(f"{k}: {v}" for k, v in files.items()))
    return 1 if results.get("jobs", {}).get("failed") or results.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
