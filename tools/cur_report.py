"""What a CUR-compressed model kept, and what it cost: an interpretability report.

    python tools/cur_report.py -- --model_id smollm2-135m --act_aware --param_ratio_target 0.9 \\
        --calib_dataset squad_wiki --n_calib_samples 16 --calib_seqlen 512 --sensitivity_metric stable_rank \\
        --eval_ppl none --use_cache                       # compress in memory (any --method), then report
    python tools/cur_report.py --repo huggingface_repos/SmolLM2-135M-Instruct-acur90 -- --use_cache
                                                          # an exported repo (settings read from its config)
    python tools/cur_report.py --run_json output/<run>.json  # a finished acur.py run: heatmaps only

Per layer: which input columns and output rows were kept, the leverage mass they capture (the
leverage scores of the activation-scaled weight at the layer's rank, 1.0 = all of it; uniform picks
would capture k/n), the relative reconstruction error ||W - W_hat||_F / ||W||_F and, with
--output_error (or a data-aware method), the relative output error on calibration inputs
sqrt(tr(D Sigma D^T) / tr(W Sigma W^T)). Per block: how much q/k/v (and gate/up), which read the same
input, agree on the input channels they keep (Jaccard, beside what random picks would give).
Writes <output_dir>/<name>.txt (summary), .json (every number) and _kept.png, _layers.png,
_agreement.png, plus two heatmaps: _ranks.png (rows = decoder blocks, columns = linear kinds, colour =
kept parameter ratio, cells annotated with the rank or "dense") and _sensitivity.png (rows = layers,
columns = candidate ratios, colour = the sensitivity metric, log scale where it spans decades; NaN, inf
and missing cells drawn as such). --run_json draws only the two heatmaps, from a run's JSON.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import acur  # noqa: E402
import datautils  # noqa: E402
from modules import decompositions as dec, registry  # noqa: E402
from modules.cur_math import leverage_scores, safe_svd, scaled_weight  # noqa: E402

SCHEMA = "cur4llm.cur_report/1"
# sibling linears that read the same input tensor, per architecture naming
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
# linears that read the (normalised) residual stream: their input channels are the hidden channels
RESIDUAL_READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1")


# ---------------------------------------------------------------- per-layer numbers
def layer_record(name: str, W: torch.Tensor | None, W_hat: torch.Tensor | None, cols, rows, rank: int,
                 kind: str, scale: torch.Tensor | None, alpha: float, cov: torch.Tensor | None) -> dict:
    """Everything the report says about one layer (plain lists and floats)."""
    m, n = (W.shape if W is not None else W_hat.shape)
    rec = {"name": name, "kind": kind, "shape": [int(m), int(n)], "rank": int(rank),
           "cols": None if cols is None else [int(c) for c in cols],
           "rows": None if rows is None else [int(r) for r in rows]}
    if W is not None:
        svd = safe_svd(scaled_weight(W, scale, alpha))
        if svd.ok:
            k = max(1, min(rank, svd.S.numel()))
            if cols is not None:
                rec["col_leverage_mass"] = float(leverage_scores(svd.Vh.T, k)[list(cols)].sum())
                rec["col_uniform_mass"] = len(cols) / n
            if rows is not None:
                rec["row_leverage_mass"] = float(leverage_scores(svd.U, k)[list(rows)].sum())
                rec["row_uniform_mass"] = len(rows) / m
        if W_hat is not None:
            rec["rel_frobenius_error"] = dec.relative_output_error(W, W_hat)
            if cov is not None:
                rec["rel_output_error"] = dec.relative_output_error(W, W_hat, cov)
    return rec


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def chance_jaccard(a: int, b: int, n: int) -> float:
    """Expected Jaccard of two uniform random subsets of sizes a and b out of n (ratio of expectations)."""
    inter = a * b / n
    return inter / (a + b - inter) if a + b - inter > 0 else 1.0


def agreement(records: list[dict]) -> list[dict]:
    """Per block and sibling group (q/k/v, gate/up): pairwise Jaccard of the kept input columns of the
    compressed members (a member left dense keeps every column and is not compared)."""
    groups: dict = {}
    for r in records:
        mt = re.match(r"(.*\.(\d+)\.)(?:[\w.]*\.)?(\w+)$", r["name"])
        if r["cols"] is None or not mt:
            continue
        for group, members in GROUPS.items():
            if mt.group(3) in members:
                groups.setdefault((int(mt.group(2)), group, mt.group(1)), []).append(r)
    out = []
    for (block, group, _), sibs in sorted(groups.items()):
        if len(sibs) < 2:
            continue
        sibs.sort(key=lambda r: GROUPS[group].index(r["name"].rsplit(".", 1)[-1]))
        n_in = sibs[0]["shape"][1]
        pairs = {}
        for i, a in enumerate(sibs):
            for b in sibs[i + 1:]:
                key = f"{a['name'].rsplit('.', 1)[-1]}~{b['name'].rsplit('.', 1)[-1]}"
                pairs[key] = {"jaccard": jaccard(a["cols"], b["cols"]),
                              "chance": chance_jaccard(len(a["cols"]), len(b["cols"]), n_in)}
        common = set.intersection(*(set(r["cols"]) for r in sibs))
        out.append({"block": block, "group": group, "pairs": pairs, "kept_by_all": len(common), "n_in": n_in})
    return out


def channel_counts(records: list[dict]) -> dict:
    """How often each input channel of the hidden width is kept, over the layers that read it."""
    readers = [r for r in records if r["cols"] is not None and r["name"].rsplit(".", 1)[-1] in RESIDUAL_READERS]
    if not readers:  # unknown naming: every layer of the most common input width
        readers = [r for r in records if r["cols"] is not None]
    if not readers:
        return {}
    hidden = statistics.mode(r["shape"][1] for r in readers)
    layers = [r for r in readers if r["shape"][1] == hidden]
    counts = torch.zeros(hidden)
    for r in layers:
        counts[r["cols"]] += 1
    order = torch.argsort(-counts, stable=True)
    return {"width": hidden, "layers": len(layers), "counts": counts.tolist(),
            "top": [[int(i), int(counts[i])] for i in order[:12]],
            "never": int((counts == 0).sum())}


def summary_text(report: dict) -> str:
    recs = report["layers"]
    lines = [f"CUR report: {report['source']}", f"method {report['method']}; {len(recs)} compressed layers", ""]

    def mean(key):
        vals = [r[key] for r in recs if key in r]
        return (statistics.fmean(vals), len(vals)) if vals else (float("nan"), 0)

    for key, label in (("col_leverage_mass", "column leverage mass captured"),
                       ("col_uniform_mass", "  (uniform picks would capture)"),
                       ("row_leverage_mass", "row leverage mass captured"),
                       ("row_uniform_mass", "  (uniform picks would capture)"),
                       ("rel_frobenius_error", "relative Frobenius error"),
                       ("rel_output_error", "relative output error (calibration inputs)")):
        v, cnt = mean(key)
        if cnt:
            lines.append(f"{label:44s} mean {v:.4f} over {cnt} layers")
    lines.append("")
    lines.append(f"{'layer':44s} {'shape':>10s} {'rank':>5s} {'colLev':>7s} {'rowLev':>7s} {'relErr':>7s} {'outErr':>7s}")
    for r in recs:
        f = lambda k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
        lines.append(f"{r['name'][-44:]:44s} {r['shape'][0]:>4d}x{r['shape'][1]:<5d} {r['rank']:>5d} "
                     f"{f('col_leverage_mass'):>7s} {f('row_leverage_mass'):>7s} {f('rel_frobenius_error'):>7s} "
                     f"{f('rel_output_error'):>7s}")
    if report["agreement"]:
        lines += ["", "Agreement on kept input channels (Jaccard; chance in brackets):"]
        for group in ("qkv", "gate_up"):
            rows = [a for a in report["agreement"] if a["group"] == group]
            if not rows:
                continue
            keys = sorted({k for a in rows for k in a["pairs"]})
            for key in keys:
                have = [a["pairs"][key] for a in rows if key in a["pairs"]]
                j = statistics.fmean(p["jaccard"] for p in have)
                c = statistics.fmean(p["chance"] for p in have)
                lines.append(f"  {key:22s} mean {j:.3f} [{c:.3f}] over {len(have)} blocks")
    ch = report.get("channels") or {}
    if ch:
        lines += ["", f"Input channels of width {ch['width']} kept most often (over {ch['layers']} layers): "
                  + ", ".join(f"{i} ({c}x)" for i, c in ch["top"]),
                  f"channels never kept: {ch['never']} of {ch['width']}"]
    return "\n".join(lines) + "\n"


def plots(report: dict, stem: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    recs = report["layers"]
    ch = report.get("channels") or {}
    if ch:  # kept input channels: one row per layer reading the hidden width
        hidden = ch["width"]
        rows = [r for r in recs if r["cols"] is not None and r["shape"][1] == hidden
                and r["name"].rsplit(".", 1)[-1] in RESIDUAL_READERS] or \
            [r for r in recs if r["cols"] is not None and r["shape"][1] == hidden]
        img = torch.zeros(len(rows), hidden)
        for i, r in enumerate(rows):
            img[i, r["cols"]] = 1
        fig, ax = plt.subplots(figsize=(12, max(3, len(rows) * 0.06 + 1.5)))
        ax.imshow(img.numpy(), aspect="auto", interpolation="nearest", cmap="Greys")
        ax.set_xlabel("input channel (kept = dark)")
        ax.set_ylabel("layer reading the hidden state (execution order)")
        ax.set_title("kept input columns (hidden channels) per layer")
        fig.tight_layout()
        path = f"{stem}_kept.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    x = list(range(len(recs)))
    for key, label in (("rel_frobenius_error", "Frobenius"), ("rel_output_error", "output (calibration)")):
        if any(key in r for r in recs):
            axes[0].plot(x, [r.get(key, float("nan")) for r in recs], marker=".", label=label)
    axes[0].set_ylabel("relative error")
    axes[0].legend()
    axes[0].grid(True, alpha=0.3)
    for key, base, label in (("col_leverage_mass", "col_uniform_mass", "columns"),
                             ("row_leverage_mass", "row_uniform_mass", "rows")):
        if any(key in r for r in recs):
            line, = axes[1].plot(x, [r.get(key, float("nan")) for r in recs], marker=".", label=f"{label} kept")
            axes[1].plot(x, [r.get(base, float("nan")) for r in recs], linestyle=":", color=line.get_color(),
                         label=f"{label}: uniform picks")
    axes[1].set_ylabel("leverage mass captured")
    axes[1].set_xlabel("layer (execution order)")
    axes[1].legend(fontsize=8)
    axes[1].grid(True, alpha=0.3)
    fig.tight_layout()
    path = f"{stem}_layers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)
    if report["agreement"]:
        fig, ax = plt.subplots(figsize=(10, 4))
        keys = sorted({(a["group"], k) for a in report["agreement"] for k in a["pairs"]})
        for group, key in keys:
            rows = [a for a in report["agreement"] if a["group"] == group and key in a["pairs"]]
            line, = ax.plot([a["block"] for a in rows], [a["pairs"][key]["jaccard"] for a in rows], marker="o",
                            label=key)
            ax.plot([a["block"] for a in rows], [a["pairs"][key]["chance"] for a in rows], linestyle=":",
                    color=line.get_color())
        ax.set_xlabel("block")
        ax.set_ylabel("Jaccard of kept input columns (dotted: chance)")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = f"{stem}_agreement.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    files += heatmaps(report.get("run_layers"), report.get("sensitivity_table"), stem, report["method"])
    return files


# ---------------------------------------------------------------- heatmaps: chosen ranks, sensitivity table
# linear kinds in the order they run inside a decoder block (LLaMA naming, then OPT's)
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")
_BLOCK_NAME = re.compile(r".*\.(\d+)\.(?:[\w.]*\.)?(\w+)$")


def split_name(name: str) -> tuple[int | None, str]:
    """(decoder block, linear kind) of a module name: model.layers.3.self_attn.q_proj -> (3, "q_proj");
    a name outside the blocks (lm_head) -> (None, its last part)."""
    mt = _BLOCK_NAME.match(name)
    return (int(mt.group(1)), mt.group(2)) if mt else (None, name.rsplit(".", 1)[-1])


def _kind_order(kinds) -> list[str]:
    seen = list(dict.fromkeys(kinds))
    return sorted(seen, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), seen.index(k)))


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def rank_grid(layers: dict) -> dict:
    """The chosen-ranks heatmap's data from a run's per-layer report (acur.py's results["layers"]:
    {name: {"ratio", "shape", "rank", "params", "params_dense", ...}}).

    Rows: decoder blocks (ascending), then any layer outside the blocks by name; columns: linear kinds
    in execution order. values[i][j] = kept parameter ratio of that layer (params / params_dense, else
    its "ratio"; 1.0 for a layer left dense), NaN where the run has no such layer; ranks[i][j] = its
    rank (None when dense or missing); labels[i][j] = the cell's annotation (rank, "dense" or "missing")."""
    cells: dict = {}
    for name, row in layers.items():
        block, kind = split_name(name)
        cells[(block if block is not None else name, kind)] = row
    blocks = sorted({b for b, _ in cells if isinstance(b, int)}) + list(dict.fromkeys(
        b for b, _ in cells if not isinstance(b, int)))
    kinds = _kind_order(k for _, k in cells)
    values, ranks, labels = [], [], []
    for b in blocks:
        vrow, rrow, lrow = [], [], []
        for k in kinds:
            row = cells.get((b, k))
            if row is None:
                vrow.append(math.nan), rrow.append(None), lrow.append("missing")
                continue
            rank = row.get("rank")
            if row.get("params") is not None and row.get("params_dense"):
                v = _num(row["params"]) / _num(row["params_dense"])
            else:
                v = _num(row.get("ratio"))
            if rank is None and (v != v or v >= 1):
                v = 1.0
            vrow.append(v), rrow.append(None if rank is None else int(rank))
            lrow.append("dense" if rank is None else str(int(rank)))
        values.append(vrow), ranks.append(rrow), labels.append(lrow)
    return {"rows": [str(b) for b in blocks], "cols": kinds, "values": values, "ranks": ranks, "labels": labels}


def sensitivity_grid(table: dict) -> dict:
    """The sensitivity heatmap's data from a sensitivity table {layer: {ratio: metric}} (the run JSON's
    results["sensitivity"]["table"] or the sensitivity cache's "table"). Rows: layers in the table's
    (execution) order, labelled block.kind; columns: every candidate ratio, ascending; values: the
    metric as a float (NaN / inf as stored; NaN, labelled "missing", where a layer lacks a candidate)."""
    cols = sorted({_num(r) for row in table.values() for r in row}, key=lambda x: (x != x, x))
    rows, values, labels = [], [], []
    for name, row in table.items():
        by_ratio = {_num(r): _num(v) for r, v in row.items()}
        block, kind = split_name(name)
        rows.append(f"{block}.{kind}" if block is not None else name)
        values.append([by_ratio.get(c, math.nan) for c in cols])
        labels.append([f"{by_ratio[c]:.3g}" if c in by_ratio else "missing" for c in cols])
    return {"rows": rows, "cols": [f"{c:g}" for c in cols], "values": values, "labels": labels,
            "names": list(table)}


def colour_scale(values) -> str:
    """'log' when the finite values are positive and span at least a decade, 'symlog' when they span
    decades but include values <= 0, else 'linear'."""
    finite = [v for row in values for v in row if math.isfinite(v)]
    if not finite:
        return "linear"
    pos = [v for v in finite if v > 0]
    if not pos or max(finite) / min(pos) < 10:
        return "linear"
    return "log" if len(pos) == len(finite) else "symlog"


def draw_heatmap(grid: dict, path: str, title: str, cbar_label: str, scale: str = "linear",
                 annotate: list | None = None, cmap: str = "viridis", vmax: float | None = None,
                 xlabel: str = "", ylabel: str = "", row_groups: list | None = None) -> str:
    """One heatmap PNG of grid["values"] (rows x cols). Non-finite cells are drawn visibly, not left to
    the colour map: NaN (or missing) hatched grey, +inf black, -inf white with a black frame, each with
    its word; annotate: a per-cell text matrix (drawn where the cells are big enough); row_groups:
    [(first row, label)] to label and separate groups of rows (blocks) instead of every row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import colors
    from matplotlib.patches import Patch, Rectangle
    vals = np.array(grid["values"], dtype=float).reshape(len(grid["rows"]), len(grid["cols"]))
    n_rows, n_cols = vals.shape
    finite = np.isfinite(vals)
    fin = vals[finite]
    lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    if vmax is not None:
        hi = max(hi, vmax)
    if scale == "log":
        norm = colors.LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
    elif scale == "symlog":
        pos = fin[fin > 0]
        norm = colors.SymLogNorm(linthresh=float(pos.min()) if pos.size else 1.0, vmin=lo, vmax=hi)
    else:
        norm = colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)
    cm = matplotlib.colormaps[cmap].with_extremes(bad=(0, 0, 0, 0))  # non-finite cells: patches below
    row_h = 0.3 if n_rows <= 48 else max(0.07, 14 / n_rows)
    fig_h = min(60.0, row_h * n_rows + 2)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n_cols + 3), fig_h))
    im = ax.imshow(np.ma.masked_invalid(vals), aspect="auto", interpolation="nearest", cmap=cm, norm=norm)
    fs = 7 if n_rows <= 40 else max(3, int(280 / n_rows))
    kinds = {}
    for i, j in zip(*np.nonzero(~finite)):
        v = vals[i, j]
        word = "missing" if annotate is not None and annotate[i][j] == "missing" else \
            ("NaN" if v != v else ("inf" if v > 0 else "-inf"))
        face, hatch, edge, ink = {"NaN": ("0.85", "xxx", "0.5", "black"), "missing": ("0.85", "xxx", "0.5", "black"),
                                  "inf": ("black", None, "black", "white"),
                                  "-inf": ("white", None, "black", "black")}[word]
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=face, hatch=hatch, edgecolor=edge, lw=0.5))
        ax.text(j, i, word, ha="center", va="center", fontsize=fs, color=ink)
        kinds[word] = Patch(facecolor=face, hatch=hatch, edgecolor=edge, label=word)
    if annotate is not None and n_rows <= 80:
        for i in range(n_rows):
            for j in range(n_cols):
                if finite[i, j] and annotate[i][j] and annotate[i][j] != "missing":
                    r, g, b, _ = cm(norm(vals[i, j]))
                    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                    ax.text(j, i, annotate[i][j], ha="center", va="center", fontsize=fs, color=ink)
    ax.set_xticks(range(n_cols), grid["cols"], rotation=30 if n_cols > 6 else 0, fontsize=8)
    if row_groups and n_rows > 48:
        every = max(1, len(row_groups) // 40)
        ax.set_yticks([g[0] for g in row_groups[::every]], [g[1] for g in row_groups[::every]], fontsize=7)
        for start, _ in row_groups[1:]:
            ax.axhline(start - 0.5, color="white", lw=0.6)
    else:
        step = max(1, n_rows // 120)
        ax.set_yticks(range(0, n_rows, step), grid["rows"][::step], fontsize=min(8, fs + 1))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    bar = fig.colorbar(im, ax=ax, fraction=0.06, pad=0.03)
    bar.set_label(cbar_label + (f" ({scale} scale)" if scale != "linear" else ""), fontsize=8)
    if kinds:
        fig.legend(handles=list(kinds.values()), loc="lower center", ncol=len(kinds), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / fig_h if kinds else 0, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmaps(layers: dict | None, table: dict | None, stem: Path | str, title: str = "") -> list[str]:
    """<stem>_ranks.png (per-layer kept ratio, annotated with the rank) and <stem>_sensitivity.png (the
    sensitivity table, log colours where it spans decades), for whichever of the two is given."""
    files = []
    if layers:
        grid = rank_grid(layers)
        files.append(draw_heatmap(grid, f"{stem}_ranks.png", f"chosen ranks {title}".strip(),
                                  "kept parameter ratio", annotate=grid["labels"], xlabel="linear (cells: rank)",
                                  ylabel="decoder block",
                                  vmax=1.0))
    if table:
        grid = sensitivity_grid(table)
        scale = colour_scale(grid["values"])
        labels = grid["labels"] if len(grid["rows"]) <= 40 else \
            [["missing" if t == "missing" else "" for t in row] for row in grid["labels"]]
        groups, last = [], object()
        for i, name in enumerate(grid["names"]):
            block = split_name(name)[0]
            if block != last:
                groups.append((i, f"block {block}" if block is not None else name))
                last = block
        files.append(draw_heatmap(grid, f"{stem}_sensitivity.png",
                                  f"sensitivity per candidate ratio {title}".strip(),
                                  "metric (higher = more sensitive)", scale=scale, cmap="YlOrRd", annotate=labels,
                                  xlabel="candidate ratio (kept fraction of the layer's parameters)",
                                  ylabel="layer (execution order)", row_groups=groups))
    return files


def load_run(path: Path) -> dict:
    """What the heatmaps need from an acur.py run JSON: the per-layer report and the sensitivity table
    (stored in the run, else read from the sensitivity cache the run names)."""
    try:
        res = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise acur.UsageError(f"--run_json {path}: {exc}") from None
    if not isinstance(res, dict) or not isinstance(res.get("layers"), dict):
        raise acur.UsageError(f"--run_json {path}: no per-layer 'layers' report (not an acur.py run JSON)")
    sens = res.get("sensitivity") or {}
    table = sens.get("table")
    if table is None and sens.get("cache") and Path(sens["cache"]).exists():
        try:
            table = json.loads(Path(sens["cache"]).read_text()).get("table")
        except ValueError:
            table = None
    args = res.get("args") or {}
    title = f"{Path(str(args.get('model_id', ''))).name} {res.get('method', args.get('method', ''))} " \
            f"target {args.get('param_ratio_target', '')}"
    return {"layers": res["layers"], "table": table, "title": title}


def records_layers(records: list[dict], method: str) -> dict:
    """A per-layer report in acur.py's format from cur_report's records (exported repos: compressed
    layers only; parameters counted by the method's registry form)."""
    try:
        spec = registry.get(method)
    except ValueError:
        spec = registry.get("acur")
    out = {}
    for r in records:
        m, n = r["shape"]
        out[r["name"]] = {"shape": [m, n], "rank": r["rank"], "params": spec.param_count(m, n, r["rank"]),
                          "params_dense": m * n}
    return out


# ---------------------------------------------------------------- sources
def _dense(module) -> torch.Tensor:
    if hasattr(module, "dense_weight"):
        return module.dense_weight().detach()
    return module.weight.detach()


def from_pipeline(args, want_cov: bool) -> dict:
    """Compress in memory with acur.py's stages (any --method) and describe every replaced layer."""
    acur.validate_args(args)
    datautils.set_seed(args.seed)
    acur.fetch_texts(args)
    model, tokenizer, fp = acur.load_model(args)
    linears = acur.select_linears(model, args)
    originals = {i.name: i.module for i in linears}
    calib_ids = datautils.get_calib_data(args.calib_dataset, tokenizer, args.n_calib_samples, args.calib_seqlen,
                                         args.seed, args.use_bos)
    scales = acur.stage_scales(model, linears, calib_ids, args, fp)
    need = registry.get(args.method).needs_covariance(args.u_mode)
    covs = acur.stage_covariance(model, linears, calib_ids, _cov_args(args), fp) if need or want_cov else None
    table, _ = acur.stage_sensitivity(model, linears, calib_ids, scales, args, fp, covs if need else None)
    ratios, _ = acur.stage_search(model, linears, calib_ids, scales, table, args, covs if need else None)
    run_layers = acur.compress_model(linears, ratios, scales, args, covs=covs if need else None)
    scale_used = scales if registry.get(args.method).scale != "none" else None
    records = []
    for info in linears:
        mod = info.module
        if mod is originals[info.name]:
            continue
        cols, rows = getattr(mod, "col_indices", None), getattr(mod, "row_indices", None)
        records.append(layer_record(info.name, originals[info.name].weight.detach(), _dense(mod),
                                    None if cols is None else cols.tolist(), None if rows is None else rows.tolist(),
                                    mod.rank, type(mod).__name__, acur.layer_scale(scale_used, info.name),
                                    args.alpha, acur.layer_scale(covs, info.name)))
    return {"source": f"{args.model_id} compressed in memory (target {args.param_ratio_target})",
            "method": args.method, "records": records, "output_dir": args.output_dir,
            "run_layers": run_layers, "sensitivity_table": table}


def _cov_args(args):
    """Arguments that make acur.stage_covariance collect covariances whatever the method."""
    a = argparse.Namespace(**vars(args))
    if not registry.get(a.method).needs_covariance(a.u_mode):
        a.method = "rowid"
    return a


def from_repo(repo: Path, overrides: list[str], want_cov: bool) -> dict:
    """An exported repo: layers from config.json's lowrank_layers, factors and kept indices from its safetensors,
    the dense weights (and calibration) from the base model named in its config."""
    from safetensors import safe_open
    cfg_path = repo / "config.json"
    if not cfg_path.exists():
        raise acur.UsageError(f"--repo {repo}: no config.json (not an exported repo)")
    cfg = json.loads(cfg_path.read_text())
    layers = cfg.get("lowrank_layers", cfg.get("cur_layers"))  # cur_layers: exports before the template
    if layers is None or "acur" not in cfg:
        raise acur.UsageError(f"--repo {repo}: config.json has no lowrank_layers/acur entry (not an ACUR export)")
    meta = cfg["acur"]
    settings = dict(meta.get("settings", {}))
    args = acur.build_parser().parse_args(["--model_id", meta["base_model"], "--eval_ppl", "none"] + overrides)
    given = {a.split("=")[0][2:] for a in overrides if a.startswith("--")}
    for k, v in settings.items():  # the export's calibration settings, unless overridden on the command line
        if hasattr(args, k) and k not in given:
            setattr(args, k, v)
    if "eval_seqlen" not in given:
        args.eval_seqlen = args.calib_seqlen  # nothing is evaluated; keeps load_model's context check quiet
    model, tokenizer, fp = acur.load_model(args)
    linears = {i.name: i for i in acur.find_linears(model, include_lm_head=True)}
    scales = covs = None
    if args.act_aware or want_cov:
        calib_ids = datautils.get_calib_data(args.calib_dataset, tokenizer, args.n_calib_samples,
                                             args.calib_seqlen, args.seed, args.use_bos)
        infos = [linears[n] for n in layers if n in linears]
        scales = acur.stage_scales(model, infos, calib_ids, args, fp)
        if want_cov:
            covs = acur.stage_covariance(model, infos, calib_ids, _cov_args(args), fp)
    files = sorted(repo.glob("*.safetensors"))
    if not files:
        raise acur.UsageError(f"--repo {repo}: no safetensors weights")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                kind = key.rsplit(".", 1)[-1]
                if kind in ("C", "U", "R"):
                    tensors[key] = fh.get_tensor(key).float()
                elif kind in ("col_indices", "row_indices"):
                    tensors[key] = fh.get_tensor(key).tolist()
    records = []
    for name, spec in layers.items():
        W = linears[name].module.weight.detach().float() if name in linears else None
        try:
            W_hat = tensors[f"{name}.C"] @ tensors[f"{name}.U"] @ tensors[f"{name}.R"]
        except KeyError:
            W_hat = None
        if W is None and W_hat is None:
            continue
        cols, rows = tensors.get(f"{name}.col_indices", spec.get("cols")), tensors.get(f"{name}.row_indices", spec.get("rows"))
        records.append(layer_record(name, W, W_hat, cols, rows, spec["rank"], spec.get("type", "CURLinear"),
                                    acur.layer_scale(scales, name), args.alpha, acur.layer_scale(covs, name)))
    return {"source": f"repo {repo} (base {meta['base_model']})", "method": settings.get("method", "acur"),
            "records": records, "output_dir": args.output_dir}


def build_report(source: dict) -> dict:
    recs = source["records"]
    return {"schema": SCHEMA, "source": source["source"], "method": source["method"],
            "created": dt.datetime.now().isoformat(timespec="seconds"),
            "layers": recs, "agreement": agreement(recs), "channels": channel_counts(recs),
            # per-layer ratios/ranks (every selected linear, dense ones too; an exported repo: its compressed
            # layers) and the sensitivity table, for the heatmaps
            "run_layers": source.get("run_layers") or records_layers(recs, source["method"]),
            "sensitivity_table": source.get("sensitivity_table")}


def write_report(report: dict, output_dir: str, name: str) -> dict[str, str]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / name
    files = {"summary": f"{stem}.txt", "json": f"{stem}.json"}
    datautils.atomic_write_bytes(Path(files["summary"]), summary_text(report).encode())
    files["plots"] = plots(report, stem)
    report["files"] = files
    datautils.atomic_write_bytes(Path(files["json"]), json.dumps(report, indent=1).encode())
    return files


def run_json_main(opts, rest: list[str]) -> int:
    """--run_json: the heatmaps of a finished run, from its JSON alone."""
    if rest or opts.repo:
        print("cur_report.py: error: --run_json takes no acur.py flags and no --repo", file=sys.stderr)
        return 2
    path = Path(opts.run_json)
    try:
        run = load_run(path)
    except acur.UsageError as exc:
        print(f"cur_report.py: error: {exc}", file=sys.stderr)
        return 2
    out = Path(opts.output_dir) if opts.output_dir else path.parent
    out.mkdir(parents=True, exist_ok=True)
    files = heatmaps(run["layers"], run["table"], out / (opts.name or path.stem), run["title"])
    if run["table"] is None:
        print("cur_report.py: the run holds no sensitivity table (and its cache file is gone): ranks only")
    print("files: " + ", ".join(files))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Other flags are acur.py flags (pipeline mode) or overrides (--repo mode).")
    p.add_argument("--repo", default=None, help="an exported repo folder (huggingface_repos/build_acur_repo.py)")
    p.add_argument("--output_error", action="store_true",
                   help="also collect input covariances and report the relative output error")
    p.add_argument("--name", default=None, help="output file stem (default cur_report_<model>_<time>; "
                   "with --run_json: the JSON's own stem)")
    p.add_argument("--run_json", default=None,
                   help="an acur.py run's JSON (output/<run>.json): only draw its heatmaps, <stem>_ranks.png and "
                        "<stem>_sensitivity.png, without loading a model")
    p.add_argument("--output_dir", default=None, help="with --run_json: where the PNGs go (default: beside it)")
    opts, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    t0 = time.perf_counter()
    if opts.run_json:
        return run_json_main(opts, rest)
    if opts.output_dir is not None:
        rest += ["--output_dir", opts.output_dir]
    try:
        if opts.repo:
            source = from_repo(Path(opts.repo), rest, opts.output_error)
        else:
            try:
                args = acur.build_parser().parse_args(rest)
            except SystemExit as exc:
                raise acur.UsageError("give acur.py flags (--model_id ... --param_ratio_target ...) or --repo") from exc
            source = from_pipeline(args, opts.output_error)
    except acur.UsageError as exc:
        print(f"cur_report.py: error: {exc}", file=sys.stderr)
        return 2
    if not source["records"]:
        print("cur_report.py: error: the model has no compressed layer to report on", file=sys.stderr)
        return 2
    report = build_report(source)
    name = opts.name or "cur_report_{}".format(dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    files = write_report(report, source["output_dir"], name)
    print(summary_text(report))
    print(f"files: {files['summary']}, {files['json']}, " + ", ".join(files["plots"]))
    print(f"time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
