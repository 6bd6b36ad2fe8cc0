"""The figures of a compare.py grid: the math over calibration seeds (mean ± sd, Jaccard overlap of kept
indices), the papers' table (<name>.md), the plots (<name>.png, <name>_overlap.png) and the JSON.

Pure functions up to the writers: a cell is summarised from its per-seed runs (dicts of plain numbers),
nothing here loads a model. The sd is the sample standard deviation over seeds (ddof=1); one seed has none.
Also the one-row table of a single acur.py run that the exported repos' model cards carry (run_row_markdown).
"""
from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cache_store import atomic_write_bytes  # noqa: E402
from modules import registry  # noqa: E402

SCHEMA = "cur4llm.compare/2"  # /2: cells hold seed means, their sd and every seed's run (per_seed); accuracy
MAX_LEAF_COLUMNS = 12          # a group with more subtasks (mmlu's 57) is one column: its unweighted mean


# ---------------------------------------------------------------- math over seeds
def mean_sd(values) -> tuple[float, float | None]:
    """(mean, sample sd with ddof=1) of the per-seed values; sd None for a single value."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_sd of no values")
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if v.size > 1 else None)


def jaccard(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two index sets (1.0 for two empty sets)."""
    a, b = set(a), set(b)
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def mean_pairwise_jaccard(sets: list) -> float | None:
    """Mean Jaccard over every unordered pair of the sets; None for fewer than two sets."""
    pairs = list(itertools.combinations([set(s) for s in sets], 2))
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else None


def index_overlap(kept_by_seed: list[dict], sizes: dict[str, dict[str, int]]) -> dict | None:
    """Per layer, the mean pairwise Jaccard across seeds of each kept index set (rows, cols, groups) and
    their mean; then the mean over layers. kept_by_seed[i][layer][side] = the indices seed i kept; sizes
    [layer][side] = how many there are (a layer left dense keeps all of them). Layers dense in every seed
    are left out (their overlap is 1 by construction). None for fewer than two seeds or no index sets."""
    if len(kept_by_seed) < 2:
        return None
    per_layer = {}
    for layer in kept_by_seed[0]:
        if not all(layer in k for k in kept_by_seed):
            continue
        sides = kept_by_seed[0][layer]
        if all(len(k[layer][s]) == sizes[layer][s] for k in kept_by_seed for s in sides):
            continue  # dense in every seed
        row = {s: mean_pairwise_jaccard([k[layer][s] for k in kept_by_seed]) for s in sides}
        row["mean"] = sum(row.values()) / len(row)
        per_layer[layer] = row
    if not per_layer:
        return None
    sides = sorted({s for row in per_layer.values() for s in row if s != "mean"})
    return {"n_seeds": len(kept_by_seed), "pairs": math.comb(len(kept_by_seed), 2), "sides": sides,
            "per_layer": per_layer, "mean": float(np.mean([r["mean"] for r in per_layer.values()])),
            "by_side": {s: float(np.mean([r[s] for r in per_layer.values() if s in r])) for s in sides},
            "min_layer": min(per_layer, key=lambda k: per_layer[k]["mean"])}


# ---------------------------------------------------------------- accuracy figures of one lm-eval run
def acc_columns(leaves_of: dict[str, list[str]], max_leaves: int = MAX_LEAF_COLUMNS) -> list[str]:
    """The table's accuracy columns for the requested tasks/groups: a task is its own column, a group its
    subtasks (the papers' layout) unless it has more than max_leaves, then one column `<group>_mean`."""
    cols = []
    for name, leaves in leaves_of.items():
        grouped = len(leaves) > 1 or leaves[0] != name
        cols += [f"{name}_mean"] if grouped and len(leaves) > max_leaves else leaves
    return list(dict.fromkeys(cols))


def lm_figures(out: dict, columns: list[str]) -> dict:
    """What a cell keeps of evaluate_utils.evaluate_lm_tasks' output: acc (and lm-eval's stderr) per column,
    acc_norm where the task defines it, the mean accuracy over the columns, the groups' unweighted means."""
    acc, metrics = out["acc"], out.get("metrics", {})
    fig: dict = {"acc": {c: acc[c] for c in columns if c in acc}, "acc_stderr": {}, "acc_norm": {},
                 "acc_norm_stderr": {}}
    for c in columns:
        m = metrics.get(c, {})
        for key in ("acc_stderr", "acc_norm", "acc_norm_stderr"):
            if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]):
                fig[key][c] = float(m[key])
    for key in ("acc_norm", "acc_norm_stderr"):  # only where the task defines it
        if not fig[key]:
            del fig[key]
    fig["mean_acc"] = float(np.mean(list(fig["acc"].values()))) if fig["acc"] else None
    fig["groups"] = {k[:-len("_mean")]: v for k, v in acc.items() if k.endswith("_mean")}
    fig["n_samples"] = out.get("n_samples", {})
    if out.get("warnings"):
        fig["warnings"] = list(out["warnings"])
    return fig


# ---------------------------------------------------------------- a cell from its seeds
SEED_FIGURES = ("reached", "ppl", "acc", "acc_norm", "mean_acc", "groups")  # reported as mean ± sd


def _aggregate(runs: list[dict], key: str) -> tuple[object, object]:
    """(means, sds) of one figure over the runs that have it: a number, or a dict of numbers by name."""
    have = [r[key] for r in runs if r.get(key) not in (None, {})]
    if not have:
        return None, None
    if isinstance(have[0], dict):
        names = list(dict.fromkeys(k for h in have for k in h))
        pairs = {k: mean_sd([h[k] for h in have if k in h]) for k in names}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    return mean_sd(have)


def summarize_cell(method: str, target: float, runs: list[dict], overlap: dict | None = None) -> dict:
    """One table cell from its per-seed runs: the mean of every figure under the keys a one-seed cell always
    had (reached, ppl, ranks, ...), their sample sd (ddof=1; None for one seed) under "sd", each seed's run
    in "per_seed"."""
    cell: dict = {"method": method, "target": target, "seeds": [r["seed"] for r in runs], "n_seeds": len(runs)}
    sd: dict = {}
    for key in SEED_FIGURES:
        mean, spread = _aggregate(runs, key)
        if mean is not None:
            cell[key], sd[key] = mean, spread
    cell["sd"] = sd
    stderr, _ = _aggregate(runs, "acc_stderr")
    if stderr:
        cell["acc_stderr"] = stderr  # lm-eval's stderr over the items, averaged over the seeds
    cell["compressed_linears_dense"] = runs[0]["compressed_linears_dense"]
    cell["compressed_linears_kept"] = mean_sd([r["compressed_linears_kept"] for r in runs])[0]
    cell["fallbacks"] = sum(r["fallbacks"] for r in runs)
    cell["ranks"] = runs[0]["ranks"]  # the first seed's (every seed's: per_seed)
    for key in ("compress_s", "eval_s", "lm_eval_s"):
        cell[key] = round(sum(r.get(key, 0.0) for r in runs), 2)
    errors = [f"seed {r['seed']}: {r['lm_error']}" for r in runs if r.get("lm_error")]
    if errors:
        cell["lm_error"] = errors
    if overlap is not None:
        cell["overlap"] = overlap
    cell["per_seed"] = runs
    return cell


# ---------------------------------------------------------------- formatting
def _fmt(v: float) -> str:
    return f"{v:.2f}" if v == v and v < 1e5 else ("nan" if v != v else f"{v:.3g}")


def fmt_mean_sd(mean: float | None, sd: float | None = None, scale: float = 1.0, digits: int = 2) -> str:
    """`mean ± sd` (just the value without an sd); perplexities past 1e5 in 3 significant digits."""
    if mean is None:
        return "-"
    m = mean * scale
    big = m == m and abs(m) >= 1e5
    text = _fmt(m) if digits == 2 else (f"{m:.{digits}f}" if not big else f"{m:.3g}")
    if sd is None:
        return text
    s = sd * scale
    return f"{text} ± {(f'{s:.3g}' if big or s >= 1e5 else f'{s:.{digits}f}')}"


def _sd(cell: dict, key: str, name: str | None = None):
    sd = cell.get("sd", {}).get(key)
    return sd.get(name) if isinstance(sd, dict) and name is not None else (None if isinstance(sd, dict) else sd)


def _acc_cols(results: dict, key: str = "acc") -> list[str]:
    cols = list(results.get("acc_columns") or [])
    rows = [results.get("dense_lm") or {}] + results["cells"]
    for r in rows:
        for c in (r.get(key) or {}):
            if c not in cols:
                cols.append(c)
    return [c for c in cols if any(c in (r.get(key) or {}) for r in rows)]


def _table(results: dict, key: str) -> list[str]:
    """The papers' layout: method | ratio | reached | perplexity per text | accuracy per task | mean accuracy."""
    datasets, acc_cols = results["datasets"], _acc_cols(results, key)
    show_ppl, show_mean = key == "acc", key == "acc" and bool(acc_cols)
    n_seeds = len(results.get("calib_seeds") or [1])
    head = ["method", "ratio", "reached"] + ([f"ppl {d}" for d in datasets] if show_ppl else []) + \
        [f"{key} {c} (%)" for c in acc_cols] + (["mean acc (%)"] if show_mean else [])
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    if "dense" in results or results.get("dense_lm"):
        dl = results.get("dense_lm") or {}
        row = ["dense", "1.0", "1.000"] + ([fmt_mean_sd(results.get("dense", {}).get(d)) for d in datasets]
                                           if show_ppl else [])
        row += [fmt_mean_sd((dl.get(key) or {}).get(c), scale=100) for c in acc_cols]
        row += [fmt_mean_sd(dl.get("mean_acc"), scale=100)] if show_mean else []
        lines.append("| " + " | ".join(row) + " |")
    cells = {(c["method"], c["target"]): c for c in results["cells"]}
    for spec in results["methods"]:
        for r in results["ratios"]:
            c = cells.get((spec, r))
            if c is None:
                continue
            short = " †" if c.get("n_seeds", 1) < n_seeds else ""
            row = [spec, f"{r:g}{short}", fmt_mean_sd(c["reached"], _sd(c, "reached"), digits=3)]
            if show_ppl:
                row += [fmt_mean_sd(c["ppl"].get(d), _sd(c, "ppl", d)) if d in c.get("ppl", {}) else "-"
                        for d in datasets]
            vals = c.get(key) or {}
            failed = "failed" if c.get("lm_error") and not vals else "-"
            row += [fmt_mean_sd(vals[a], _sd(c, key, a), scale=100) if a in vals else failed for a in acc_cols]
            if show_mean:
                row.append(fmt_mean_sd(c.get("mean_acc"), _sd(c, "mean_acc"), scale=100)
                           if c.get("mean_acc") is not None else failed)
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _overlap_table(results: dict) -> list[str]:
    rows = [c for c in results["cells"] if c.get("overlap")]
    if not rows:
        return []
    sides = sorted({s for c in rows for s in c["overlap"]["sides"]})
    lines = ["## Kept-index overlap across calibration seeds", "",
             "Mean pairwise Jaccard |A∩B| / |A∪B| of the kept rows / columns / neuron groups of every layer across "
             "the seeds, averaged over the layers compressed in any seed (1 = every seed keeps the same indices; "
             "per layer in the JSON and in the `_overlap.png` heatmap). SVD forms keep no actual rows or columns.",
             "", "| method | ratio | " + " | ".join(sides) + " | mean | layers | lowest layer |",
             "|---|---:|" + "---:|" * (len(sides) + 2) + "---|"]
    for c in rows:
        o = c["overlap"]
        low = o["min_layer"]
        lines.append(f"| {c['method']} | {c['target']:g} | " + " | ".join(
            f"{o['by_side'][s]:.3f}" if s in o["by_side"] else "-" for s in sides)
            + f" | {o['mean']:.3f} | {len(o['per_layer'])} | {low} ({o['per_layer'][low]['mean']:.3f}) |")
    return lines + [""]


def markdown(results: dict) -> str:
    """The papers' table (method | ratio | perplexity per text | accuracy per task | mean accuracy), dense
    first, cells `mean ± sd` over the calibration seeds; acc_norm and the kept-index overlap below it."""
    a = results["args"]
    seeds = results.get("calib_seeds") or [a["seed"]]
    lm = results.get("lm_eval") or {}
    draw = (f"{len(seeds)} calibration draws (seeds {', '.join(map(str, seeds))})" if len(seeds) > 1
            else f"seed {seeds[0]}")
    lines = [f"# CUR vs SVD: {a['model_id']}", "",
             f"Calibration {a['calib_dataset']} ({a['n_calib_samples']} x {a['calib_seqlen']} tokens, {draw}), "
             f"act_aware={a['act_aware']} ({a['scaling_method']}, alpha {a['alpha']}), "
             + ("every linear at the target ratio (uniform, no sensitivity search)"
                if results.get("allocation") == "uniform" else
                f"sensitivity {a['sensitivity_metric']} (per method where the method says)")
             + f"; perplexity windows of {a['eval_seqlen']} tokens"
             + (f" (first {a['eval_max_windows']})" if a["eval_max_windows"] else "") + ".",
             "Ratio: kept fraction of the compressed linears' parameters (the target; reached = what the allocation "
             "reached). Perplexity: lower is better."
             + (f" Accuracy (%): lm-eval {lm.get('version', '0.4')} `acc`, {lm.get('num_fewshot', 0)}-shot, "
                + (f"first {lm['limit']:g} examples per task" if lm.get("limit") else "every example")
                + ", higher is better; mean acc = unweighted mean of the accuracy columns." if lm.get("tasks") else ""),
             ("Cells: mean ± sd over the seeds (sample sd, ddof=1); every seed's value is in the JSON (per_seed)."
              if len(seeds) > 1 else "Cells: one calibration draw (no sd; --calib_seeds N gives mean ± sd)."), ""]
    lines += _table(results, "acc") + [""]
    if any(c.get("n_seeds", 1) < len(seeds) for c in results["cells"]):
        lines += ["† fewer seeds than asked (the run was cut): mean over the seeds measured.", ""]
    dl = results.get("dense_lm") or {}
    if dl.get("acc_stderr"):
        lines += ["lm-eval stderr of the dense accuracies (over the items, not the seeds): "
                  + ", ".join(f"{t} ±{100 * v:.2f}" for t, v in dl["acc_stderr"].items()) + ".", ""]
    if _acc_cols(results, "acc_norm"):
        lines += ["## acc_norm (tasks that define it)", ""] + _table(results, "acc_norm") + [""]
    lines += _overlap_table(results)
    if results.get("unfinished"):
        lines += ["**Unfinished run**: the cells above are those measured so far"
                  + (f" ({results['stopped']['reason']})" if results.get("stopped") else "") + ".", ""]
    for st in results.get("parts_stopped", []):
        lines += [f"**Part {st['part']} stopped** at {st['where']}: {st['reason']}.", ""]
    for f in results.get("failures", []):
        lines += [f"**Failed** {f['where']}: {f['error']}", ""]
    for f in results.get("jobs", {}).get("failed", []):
        lines += [f"**Part {f['part']} failed** (exit {f['returncode']}, log {f['log']}): "
                  f"cells of {', '.join(f['methods'])} may be missing.", ""]
    t = results["timings"]
    lines.append("Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    per_cell = [f"{c['method']}@{c['target']:g} {c['compress_s'] + c['eval_s'] + c.get('lm_eval_s', 0):.1f}"
                for c in results["cells"]]
    lines.append("")
    lines.append("Per cell, compress + eval, summed over the seeds (s): " + ", ".join(per_cell))
    return "\n".join(lines) + "\n"


def run_row_markdown(results: dict) -> list[str]:
    """The compare table's row of one acur.py run (its results JSON), for a model card: method | ratio |
    reached | perplexity per text | accuracy per task | mean accuracy, the dense row first when measured.
    [] when the run measured neither perplexity nor accuracy."""
    ppl, acc = results.get("ppl", {}), results.get("lm_eval") or {}
    info = results.get("lm_eval_info") or {}
    comp = ppl.get("compressed", {})
    if not comp and not acc:
        return []
    datasets = list(dict.fromkeys(list(comp) + list(ppl.get("dense", {}))))
    cols = acc_columns(info["leaves"]) if info.get("leaves") else [k for k in acc if not k.endswith("_mean")]
    cols = [c for c in cols if c in acc]
    head = ["model", "ratio", "reached"] + [f"ppl {d}" for d in datasets] + [f"acc {c} (%)" for c in cols] + \
        (["mean acc (%)"] if cols else [])
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    if ppl.get("dense"):
        lines.append("| dense | 1.0 | 1.000 | " + " | ".join(fmt_mean_sd(ppl["dense"].get(d)) for d in datasets)
                     + " |" + " - |" * (len(cols) + bool(cols)))
    pr = results.get("param_ratio", {})
    row = [results.get("method") or results["args"].get("method", "acur"), f"{pr.get('target')}",
           f"{pr.get('reached', 1.0):.3f}"] + [fmt_mean_sd(comp.get(d)) for d in datasets]
    row += [fmt_mean_sd(acc[c], scale=100) for c in cols]
    row += [fmt_mean_sd(float(np.mean([acc[c] for c in cols])), scale=100)] if cols else []
    lines.append("| " + " | ".join(row) + " |")
    stderr = {c: (info.get("metrics", {}).get(c) or {}).get("acc_stderr") for c in cols}
    notes = [f"{c} ±{100 * v:.2f}" for c, v in stderr.items() if v is not None]
    if cols:
        lim = info.get("limit")
        lines += ["", f"Accuracy: lm-eval 0-shot `acc`" + (f" on the first {lim:g} examples per task" if lim else "")
                  + (f"; lm-eval stderr {', '.join(notes)}" if notes else "") + "."]
    return lines


# ---------------------------------------------------------------- plots
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


def _points(results: dict, spec: str, figure) -> list[tuple]:
    """(reached, reached sd, value, value sd) of a method's cells, by reached ratio; figure(cell) ->
    (value, sd) or None."""
    pts = []
    for c in results["cells"]:
        if c["method"] == spec and figure(c) is not None and figure(c)[0] is not None:
            v, s = figure(c)
            pts.append((c["reached"], _sd(c, "reached") or 0.0, v, s or 0.0))
    return sorted(pts)


def plot(results: dict, path: Path) -> None:
    """Perplexity (log) per text and mean accuracy against the reached parameter ratio, one line per method,
    error bars = sd over the calibration seeds (both axes). Dense is a black dashed horizontal line labelled
    with its value; the SVD family (svd, asvd, wsvd) dashed with square markers, the CUR family (acur, cur,
    rowid, colid, srid) solid with circles; the legend groups the methods by family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter
    panels = [("ppl", ds) for ds in results["datasets"]]
    if any(c.get("mean_acc") is not None for c in results["cells"]):
        panels.append(("acc", None))
    styles = line_styles(results["methods"])
    fig, axes = plt.subplots(1, len(panels), figsize=(8.5 * len(panels), 4.8), squeeze=False)
    for ax, (kind, ds) in zip(axes[0], panels):
        if kind == "ppl":
            figure = lambda c: (c["ppl"][ds], _sd(c, "ppl", ds)) if ds in c.get("ppl", {}) else None  # noqa: E731
            dense = results.get("dense", {}).get(ds)
        else:
            figure = lambda c: (100 * c["mean_acc"], 100 * (_sd(c, "mean_acc") or 0)) \
                if c.get("mean_acc") is not None else None  # noqa: E731
            dm = (results.get("dense_lm") or {}).get("mean_acc")
            dense = 100 * dm if dm is not None else None
        drawn: dict[str, list] = {"CUR": [], "SVD": []}
        for spec in results["methods"]:
            pts = _points(results, spec, figure)
            if not pts:
                continue
            st = styles[spec]
            x, xe, y, ye = (np.array([p[i] for p in pts]) for i in range(4))
            line, = ax.plot(x, y, color=st["color"], linestyle=st["linestyle"], marker=st["marker"], label=spec)
            if (xe > 0).any() or (ye > 0).any():
                ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="none", ecolor=st["color"], capsize=3, linewidth=1)
            drawn[st["family"]].append(line)
        handles = []
        if dense is not None:
            handles.append(ax.axhline(dense, label=f"dense (1.0): {_fmt(dense)}", **DENSE_STYLE))
            ax.annotate(f"dense {_fmt(dense)}", xy=(0.99, dense), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=8, ha="right")
        for fam, title in (("CUR", "CUR family (actual rows/cols): solid, circles"),
                           ("SVD", "SVD family: dashed, squares")):
            if drawn[fam]:
                handles.append(Line2D([], [], linestyle="none", label=title))  # a legend header
                handles += drawn[fam]
        ax.set_xlabel("parameter ratio of the compressed linears (kept fraction)")
        values = [p[2] for spec in results["methods"] for p in _points(results, spec, figure)]
        values = [v for v in values + ([dense] if dense is not None else []) if math.isfinite(v)]
        if kind == "ppl" and values and min(values) > 0 and max(values) / min(values) > 3:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        if kind == "ppl":
            ax.set_ylabel(f"perplexity ({ds}, lower is better)")
        else:
            ax.set_ylabel("mean accuracy, % (higher is better)")
        n_seeds = len(results.get("calib_seeds") or [1])
        ax.set_title(results["args"]["model_id"] + (f" (error bars: sd over {n_seeds} calibration seeds)"
                                                    if n_seeds > 1 else ""))
        ax.grid(True, which="both", alpha=0.3)
        leg = ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for text in leg.get_texts():
            if "family" in text.get_text():
                text.set_fontweight("bold")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _short_layer(name: str) -> str:
    return re.sub(r"^model\.(decoder\.)?", "", name).replace("layers.", "")


def plot_overlap(results: dict, path: Path) -> bool:
    """Heatmap of the per-layer kept-index overlap (mean pairwise Jaccard across seeds): layers down,
    method @ ratio across. False (nothing written) when no cell has an overlap."""
    cells = [c for c in results["cells"] if c.get("overlap")]
    if not cells:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = list(dict.fromkeys(k for c in cells for k in c["overlap"]["per_layer"]))
    grid = np.full((len(layers), len(cells)), np.nan)
    for j, c in enumerate(cells):
        for i, layer in enumerate(layers):
            row = c["overlap"]["per_layer"].get(layer)
            if row is not None:
                grid[i, j] = row["mean"]
    fig, ax = plt.subplots(figsize=(3.5 + 1.1 * len(cells), 2.0 + min(0.13 * len(layers), 40)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(cells)), [f"{c['method']} @ {c['target']:g}" for c in cells], rotation=45, ha="right",
                  fontsize=8)
    step = max(1, len(layers) // 80)
    ax.set_yticks(range(0, len(layers), step), [_short_layer(x) for x in layers[::step]], fontsize=6)
    n = cells[0]["overlap"]["n_seeds"]
    ax.set_title(f"{results['args']['model_id']}: kept-index overlap across {n} calibration seeds\n"
                 "(mean pairwise Jaccard per layer; blank = left dense in every seed)", fontsize=9)
    fig.colorbar(im, ax=ax, label="Jaccard (1 = same rows/columns kept)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


# ---------------------------------------------------------------- files
def output_stem(results_args: dict, name: str | None) -> str:
    return name or "compare_{}_{}".format(re.sub(r"[^\w.\-]", "_", results_args["model_id"])[-40:],
                                          dt.datetime.now().strftime("%Y%m%d-%H%M%S"))


def write_outputs(results: dict, output_dir: str, name: str | None, plot_too: bool = True) -> dict[str, str]:
    """<stem>.md, .json and (plot_too) .png plus, when seeds give an overlap, <stem>_overlap.png; all atomic."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(results["args"], name)
    paths = {"markdown": out / f"{stem}.md", "plot": out / f"{stem}.png", "json": out / f"{stem}.json"}
    if any(c.get("overlap") for c in results["cells"]):
        paths["overlap_plot"] = out / f"{stem}_overlap.png"
    results["files"] = {k: str(v) for k, v in paths.items()}
    atomic_write_bytes(paths["markdown"], markdown(results).encode())
    if plot_too:
        plot(results, paths["plot"])
        if "overlap_plot" in paths:
            plot_overlap(results, paths["overlap_plot"])
    atomic_write_bytes(paths["json"], json.dumps(results, indent=1, default=str).encode())
    return results["files"]
