"""What a CUR-compressed model kept, and what it cost: an interpretability report.

    python tools/cur_report.py -- --model_id smollm2-135m --act_aware --param_ratio_target 0.9 \\
        --calib_dataset squad_wiki --n_calib_samples 16 --calib_seqlen 512 --sensitivity_metric stable_rank \\
        --eval_ppl none --use_cache                       # compress in memory (any --method), then report
    python tools/cur_report.py --repo huggingface_repos/SmolLM2-135M-Instruct-acur90 -- --use_cache
                                                          # an exported repo (settings read from its config)

Per layer: which input columns and output rows were kept, the leverage mass they capture (the
leverage scores of the activation-scaled weight at the layer's rank, 1.0 = all of it; uniform picks
would capture k/n), the relative reconstruction error ||W - W_hat||_F / ||W||_F and, with
--output_error (or a data-aware method), the relative output error on calibration inputs
sqrt(tr(D Sigma D^T) / tr(W Sigma W^T)). Per block: how much q/k/v (and gate/up), which read the same
input, agree on the input channels they keep (Jaccard, beside what random picks would give).
Writes <output_dir>/<name>.txt (summary), .json (every number) and _kept.png, _layers.png,
_agreement.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
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
    return files


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
    acur.compress_model(linears, ratios, scales, args, covs=covs if need else None)
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
            "method": args.method, "records": records, "output_dir": args.output_dir}


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
            "layers": recs, "agreement": agreement(recs), "channels": channel_counts(recs)}


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Other flags are acur.py flags (pipeline mode) or overrides (--repo mode).")
    p.add_argument("--repo", default=None, help="an exported repo folder (huggingface_repos/build_acur_repo.py)")
    p.add_argument("--output_error", action="store_true",
                   help="also collect input covariances and report the relative output error")
    p.add_argument("--name", default=None, help="output file stem (default cur_report_<model>_<time>)")
    opts, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    t0 = time.perf_counter()
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
