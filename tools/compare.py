"""CUR vs SVD side by side: a grid of methods x parameter ratios on one model, sharing calibration.

    python tools/compare.py --methods acur,acur:u_mode=data_aware,asvd,rowid,colid --ratios 0.9,0.8 -- \\
        --model_id smollm2-135m --act_aware --calib_dataset squad_wiki --n_calib_samples 16 \\
        --calib_seqlen 512 --sensitivity_metric stable_rank --eval_ppl new_wiki --eval_seqlen 512 --use_cache

Everything after the compare flags is an acur.py flag (--param_ratio_target comes from --ratios). The
model, calibration data, activation statistics and input covariances are computed once; every method
gets its own sensitivity (cached per method with --use_cache), search and decomposition, and the
model is restored between cells. A method spec is METHOD[:flag=value...] with flags among
selection, u_mode, cov_damp, alpha, rank_align, structured_widths, structured_selection (e.g.
acur:selection=deim:u_mode=data_aware, structured:structured_widths=uniform).
Writes <output_dir>/<name>.md (tables), .png (perplexity vs parameter ratio, one line per method)
and .json (every number, schema cur4llm.compare/1).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import acur  # noqa: E402
import datautils  # noqa: E402
from modules import registry  # noqa: E402

SCHEMA = "cur4llm.compare/1"
SPEC_FLAGS = ("selection", "u_mode", "cov_damp", "alpha", "rank_align", "sensitivity_metric", "structured_widths",
              "structured_selection")
DEFAULT_METHODS = "acur,acur:u_mode=data_aware,asvd,rowid,colid"
DEFAULT_RATIOS = "0.95,0.9,0.85,0.8"


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


def parse_grid(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], list[float], argparse.Namespace]:
    """(compare options, method specs, ratios, base acur.py arguments)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="All other flags are acur.py flags (see python acur.py --help).")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma list of METHOD[:flag=value...]")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help="comma list of parameter ratio targets")
    p.add_argument("--name", default=None, help="output file stem (default: compare_<model>_<time>)")
    p.add_argument("--no_dense", action="store_true", help="skip the dense model's perplexity")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the method specs in this many child processes at once (one GPU serves several "
                        "when the model is small), then merge their tables into one")
    p.add_argument("--uniform", action="store_true",
                   help="no sensitivity search: every linear at the target ratio (compares the decompositions "
                        "alone, without the allocation heuristic)")
    opts, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    opts.acur_flags = rest
    if opts.jobs < 1:
        raise acur.UsageError(f"--jobs must be >= 1, got {opts.jobs}")
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
            acur.validate_args(a)
    return opts, specs, sorted(ratios, reverse=True), base


def run_grid(base: argparse.Namespace, specs: list[str], ratios: list[float], dense: bool = True,
             uniform: bool = False, on_cell=None) -> dict:
    """Every (method spec, ratio) cell on one loaded model; returns the results dict (no files written).
    uniform: every linear at the target ratio (sensitivity and search skipped). on_cell(results) runs
    after every finished cell (main writes the files there, so a cut run keeps what it measured)."""
    t_start = time.perf_counter()
    datautils.set_seed(base.seed)
    acur.fetch_texts(base)
    model, tokenizer, fp = acur.load_model(base)
    linears = acur.select_linears(model, base)
    originals = {i.name: i.module for i in linears}
    calib_text = None
    if base.calib_dataset in datautils.GENERATED_DATASETS:
        calib_text, _ = acur.prepare_selfgen(model, tokenizer, base, fp)
    timings: dict = {}
    t0 = time.perf_counter()
    calib_ids = datautils.get_calib_data(base.calib_dataset, tokenizer, base.n_calib_samples, base.calib_seqlen,
                                         base.seed, base.use_bos, calib_text)
    scales = acur.stage_scales(model, linears, calib_ids, base, fp)
    timings["calibration"] = round(time.perf_counter() - t0, 2)
    spec_args = {spec: parse_spec(spec, base) for spec in specs}
    covs = fisher = None
    cov_user = next((a for a in spec_args.values() if acur.needs_covariance(a)), None)
    if cov_user is not None:
        t0 = time.perf_counter()
        covs = acur.stage_covariance(model, linears, calib_ids, cov_user, fp)
        timings["covariance"] = round(time.perf_counter() - t0, 2)
    fisher_user = next((a for a in spec_args.values() if acur.needs_fisher(a)), None)
    if fisher_user is not None:
        t0 = time.perf_counter()
        fisher = acur.stage_fisher(model, linears, calib_ids, fisher_user, fp)
        timings["fisher"] = round(time.perf_counter() - t0, 2)
    stats = acur.layer_stats(linears, scales, covs, fisher, calib_ids.numel())
    results: dict = {"schema": SCHEMA, "args": vars(base).copy(), "model": fp, "methods": specs,
                     "ratios": ratios, "datasets": acur.eval_datasets(base), "timings": timings, "cells": [],
                     "allocation": "uniform" if uniform else f"sensitivity {base.sensitivity_metric}"}
    if dense:
        t0 = time.perf_counter()
        results["dense"] = acur.stage_eval(model, tokenizer, base, "dense")
        timings["eval_dense"] = round(time.perf_counter() - t0, 2)
    for spec in specs:
        args = spec_args[spec]
        t0 = time.perf_counter()
        if not uniform:
            table, sens_info = acur.stage_sensitivity(model, linears, calib_ids, scales, args, fp, covs, stats)
            acur.restore_model(linears, originals)
            timings[f"sensitivity {spec}"] = round(time.perf_counter() - t0, 2)
            results.setdefault("sensitivity", {})[spec] = sens_info
        for r in ratios:
            t0 = time.perf_counter()
            args.param_ratio_target = r
            if uniform:
                ratios_l = {i.name: r for i in linears}
            else:
                ratios_l, _ = acur.stage_search(model, linears, calib_ids, scales, table, args, covs, stats)
            try:
                report = acur.compress_model(linears, ratios_l, scales, args, desc=f"{spec} @ {r}", covs=covs,
                                             stats=stats, sequential=(model, calib_ids))
                t1 = time.perf_counter()
                ppl = acur.stage_eval(model, tokenizer, args, f"{spec} @ {r}")
            finally:
                acur.restore_model(linears, originals)
            cell = {"method": spec, "target": r, **acur.summarize_params(report), "ppl": ppl,
                    "fallbacks": sum(1 for v in report.values() if v["fallback"]),
                    "ranks": {k: v["rank"] for k, v in report.items()},
                    "compress_s": round(t1 - t0, 2), "eval_s": round(time.perf_counter() - t1, 2)}
            results["cells"].append(cell)
            print(f"[compare] {spec} @ {r}: reached {cell['reached']:.4f}  "
                  + "  ".join(f"{d} {v:.3f}" for d, v in ppl.items()), flush=True)
            if on_cell is not None:
                on_cell(results)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    results["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    return results


def _fmt(v: float) -> str:
    return f"{v:.2f}" if v == v and v < 1e5 else ("nan" if v != v else f"{v:.3g}")


def markdown(results: dict) -> str:
    """One table per evaluation dataset: methods x ratios, cells = perplexity (reached ratio)."""
    a = results["args"]
    lines = [f"# CUR vs SVD: {a['model_id']}", "",
             f"Calibration {a['calib_dataset']} ({a['n_calib_samples']} x {a['calib_seqlen']} tokens, seed {a['seed']}), "
             f"act_aware={a['act_aware']} ({a['scaling_method']}, alpha {a['alpha']}), "
             + ("every linear at the target ratio (uniform, no sensitivity search)"
                if results.get("allocation") == "uniform" else
                f"sensitivity {a['sensitivity_metric']} (per method where the method says)")
             + f"; perplexity windows of "
             f"{a['eval_seqlen']} tokens" + (f" (first {a['eval_max_windows']})" if a["eval_max_windows"] else "") + ".",
             "Cells: perplexity (reached parameter ratio of the compressed linears). Lower is better.", ""]
    cells = {(c["method"], c["target"]): c for c in results["cells"]}
    for ds in results["datasets"]:
        lines.append(f"## {ds}")
        lines.append("")
        head = "| method | " + " | ".join(f"{r:g}" for r in results["ratios"]) + " |"
        lines += [head, "|" + "---|" * (len(results["ratios"]) + 1)]
        if "dense" in results:
            lines.append(f"| dense (1.0) | {_fmt(results['dense'][ds])} |" + " |" * (len(results["ratios"]) - 1))
        for spec in results["methods"]:
            row = [f"{_fmt(cells[spec, r]['ppl'][ds])} ({cells[spec, r]['reached']:.3f})"
                   if (spec, r) in cells else "-" for r in results["ratios"]]
            lines.append(f"| {spec} | " + " | ".join(row) + " |")
        lines.append("")
    if results.get("unfinished"):
        lines += ["**Unfinished run**: the cells above are those measured so far.", ""]
    for f in results.get("jobs", {}).get("failed", []):
        lines += [f"**Part {f['part']} failed** (exit {f['returncode']}, log {f['log']}): "
                  f"cells of {', '.join(f['methods'])} may be missing.", ""]
    t = results["timings"]
    lines.append("Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    per_cell = [f"{c['method']}@{c['target']:g} {c['compress_s'] + c['eval_s']:.1f}" for c in results["cells"]]
    lines.append("")
    lines.append("Per cell, compress + eval (s): " + ", ".join(per_cell))
    return "\n".join(lines) + "\n"


def method_family(spec: str) -> str:
    """'SVD' for a method spec of the registry's svd form (svd, asvd, wsvd), 'CUR' for the forms that keep
    actual rows/columns (acur, cur, rowid, colid, srid; ablations like srid[sequential=0] too)."""
    name = spec.split(":")[0].split("[")[0]
    try:
        return "SVD" if registry.get(name).form == "svd" else "CUR"
    except ValueError:
        return "CUR"


FAMILY_STYLE = {"SVD": {"linestyle": "--", "marker": "s"}, "CUR": {"linestyle": "-", "marker": "o"}}
DENSE_STYLE = {"color": "black", "linestyle": (0, (6, 3)), "linewidth": 1.2}


def line_styles(specs: list[str]) -> dict[str, dict]:
    """Per method spec: its family and matplotlib keywords. SVD family dashed with square markers in blues
    and greens, CUR family solid with circle markers in reds, oranges and purples: family by line style
    and marker, method by colour."""
    import matplotlib
    palettes = {"SVD": [matplotlib.colormaps["tab20c"](i) for i in (0, 8, 1, 9, 2, 10, 3, 11)],
                "CUR": [matplotlib.colormaps["tab10"](i) for i in (3, 1, 4, 5, 6, 8)] +
                       [matplotlib.colormaps["tab20b"](i) for i in (12, 13, 14, 15, 16, 17)]}
    used = {"SVD": 0, "CUR": 0}
    out = {}
    for spec in specs:
        fam = method_family(spec)
        pal = palettes[fam]
        out[spec] = {"family": fam, "color": pal[used[fam] % len(pal)], **FAMILY_STYLE[fam]}
        used[fam] += 1
    return out


def plot(results: dict, path: Path) -> None:
    """Perplexity (log) vs reached parameter ratio, one line per method, one panel per dataset. Dense is a
    black dashed horizontal line labelled with its perplexity; the SVD family (svd, asvd, wsvd) is drawn
    dashed with square markers, the CUR family (acur, cur, rowid, colid, srid) solid with circles; the
    legend groups the methods by family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter
    datasets = results["datasets"]
    styles = line_styles(results["methods"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(8.5 * len(datasets), 4.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        drawn: dict[str, list] = {"CUR": [], "SVD": []}
        for spec in results["methods"]:
            pts = sorted((c["reached"], c["ppl"][ds]) for c in results["cells"] if c["method"] == spec)
            if pts:
                st = styles[spec]
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], color=st["color"],
                                linestyle=st["linestyle"], marker=st["marker"], label=spec)
                drawn[st["family"]].append(line)
        handles = []
        if "dense" in results:
            dense = results["dense"][ds]
            handles.append(ax.axhline(dense, label=f"dense (1.0): {_fmt(dense)}", **DENSE_STYLE))
            ax.annotate(f"dense {_fmt(dense)}", xy=(0.99, dense), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=8, ha="right")
        for fam, title in (("CUR", "CUR family (actual rows/cols): solid, circles"),
                           ("SVD", "SVD family: dashed, squares")):
            if drawn[fam]:
                handles.append(Line2D([], [], linestyle="none", label=title))  # a legend header
                handles += drawn[fam]
        ax.set_yscale("log")
        ax.set_xlabel("parameter ratio of the compressed linears (kept fraction)")
        ax.set_ylabel(f"perplexity ({ds}, lower is better)")
        ax.set_title(results["args"]["model_id"])
        ax.grid(True, which="both", alpha=0.3)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        leg = ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for text in leg.get_texts():
            if "family" in text.get_text():
                text.set_fontweight("bold")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(results: dict, output_dir: str, name: str | None, plot_too: bool = True) -> dict[str, str]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(results["args"], name)
    paths = {"markdown": out / f"{stem}.md", "plot": out / f"{stem}.png", "json": out / f"{stem}.json"}
    results["files"] = {k: str(v) for k, v in paths.items()}
    datautils.atomic_write_bytes(paths["markdown"], markdown(results).encode())
    if plot_too:
        plot(results, paths["plot"])
    datautils.atomic_write_bytes(paths["json"], json.dumps(results, indent=1, default=str).encode())
    return results["files"]


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
              (["--uniform"] if opts.uniform else []) + ["--"] + opts.acur_flags
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


def merge_results(parts: list[dict], specs: list[str]) -> dict:
    """One results dict from compare runs of the same model and flags on different method specs."""
    merged = copy.deepcopy(parts[0])
    merged.pop("part", None)
    merged["methods"], merged["cells"], merged["timings"], merged["sensitivity"] = list(specs), [], {}, {}
    for i, part in enumerate(parts):
        i = part.get("part", i)  # the part's own number, also when an earlier part left no results
        if part["args"] | {"method": None} != parts[0]["args"] | {"method": None}:
            raise ValueError("merge_results: parts ran with different acur.py flags")
        merged["cells"] += part["cells"]
        merged["sensitivity"].update(part.get("sensitivity", {}))
        merged["timings"].update({(k if k.startswith("sensitivity ") else f"{k} (part {i})"): v
                                  for k, v in part["timings"].items()})
        if "dense" in part:
            merged["dense"] = part["dense"]
    return merged


def output_stem(results_args: dict, name: str | None) -> str:
    return name or "compare_{}_{}".format(re.sub(r"[^\w.\-]", "_", results_args["model_id"])[-40:],
                                          dt.datetime.now().strftime("%Y%m%d-%H%M%S"))


def main(argv: list[str] | None = None) -> int:
    try:
        opts, specs, ratios, base = parse_grid(argv)
        stem = output_stem(vars(base), opts.name)
        if opts.jobs > 1:
            results = run_jobs(opts, specs, base, stem)
        else:
            def keep(partial: dict) -> None:
                write_outputs(dict(partial, timings=dict(partial["timings"]), unfinished=True), base.output_dir,
                              stem, plot_too=False)
            results = run_grid(base, specs, ratios, dense=not opts.no_dense, uniform=opts.uniform, on_cell=keep)
    except acur.UsageError as exc:
        print(f"compare.py: error: {exc}", file=sys.stderr)
        return 2
    files = write_outputs(results, base.output_dir, stem)
    print(markdown(results))
    print("\n".join(f"{k}: {v}" for k, v in files.items()))
    return 1 if results.get("jobs", {}).get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
