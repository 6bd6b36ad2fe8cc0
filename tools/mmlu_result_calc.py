"""Summarise acur.py results (output/*.json, schema cur4llm.result/1) into one table, as text and Markdown.

    python tools/mmlu_result_calc.py                 # every results file under output/
    python tools/mmlu_result_calc.py output/a.json output/runs/ --markdown table.md

Columns: run, model, target and reached parameter ratio (of the compressed linears; KV runs: KV-cache
ratio), perplexity per dataset (compressed, or dense for --raw_model runs), MMLU mean (the unweighted mean
of the 57 subject accuracies, as ASVD4LLM reported) and any other lm-eval accuracy. Files of another
schema are skipped with a note; an unreadable file is reported, never silently dropped.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SCHEMA = "cur4llm.result/1"


def collect_files(paths: list[str]) -> list[Path]:
    """JSON files named directly or found (non-recursively) in named directories, sorted, deduplicated."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.glob("*.json")))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    return list(dict.fromkeys(out))


def load_results(files: list[Path]) -> tuple[list[dict], list[str]]:
    """(results of our schema, notes about skipped files)."""
    rows, notes = [], []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            notes.append(f"{f}: unreadable ({type(exc).__name__}: {exc})")
            continue
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            notes.append(f"{f}: skipped (schema {data.get('schema') if isinstance(data, dict) else None!r})")
            continue
        data["_file"] = str(f)
        rows.append(data)
    return rows, notes


def summarize(result: dict) -> dict:
    """One table row of a results dict."""
    args = result.get("args", {})
    kv = bool(args.get("compress_kv_cache"))
    pr = result.get("param_ratio", {}) or {}
    ppl = result.get("ppl", {}) or {}
    ppl_vals = ppl.get("compressed") or ppl.get("dense") or {}
    if args.get("raw_model"):
        target = "dense"
    elif kv:
        target = f"kv {args.get('kv_cache_ratio_target')}"
    elif args.get("ppl_target", -1) not in (-1, None):
        target = f"ppl<={args.get('ppl_target')}"
    else:
        target = f"{args.get('param_ratio_target')}"
    lm = result.get("lm_eval", {}) or {}
    other = {k: v for k, v in lm.items() if not k.startswith("mmlu_") and k != "mmlu"}
    return {"run": Path(result.get("_file", "?")).stem, "model": args.get("model_id", "?"), "target": target,
            "reached": (result.get("kv_cache") or {}).get("reached") if kv else pr.get("reached"),
            "ppl": dict(ppl_vals), "mmlu_mean": lm.get("mmlu_mean"), "acc": other,
            "weight_quant": args.get("weight_quant") if args.get("weight_quant") not in (None, "none") else None}


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.2f}" if abs(v) >= 100 else f"{v:.{digits}f}")
    return str(v)


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells; perplexity and accuracy columns are the union over all runs."""
    ppl_cols = sorted({k for r in rows for k in r["ppl"]})
    acc_cols = sorted({k for r in rows for k in r["acc"]})
    quant = any(r["weight_quant"] for r in rows)
    header = ["run", "model", "target", "reached"] + (["quant"] if quant else []) + \
        [f"ppl {c}" for c in ppl_cols] + ["mmlu mean"] + [f"acc {c}" for c in acc_cols]
    cells = []
    for r in rows:
        cells.append([r["run"], r["model"], r["target"], _fmt(r["reached"])] + ([_fmt(r["weight_quant"])] if quant else [])
                     + [_fmt(r["ppl"].get(c)) for c in ppl_cols] + [_fmt(r["mmlu_mean"])]
                     + [_fmt(r["acc"].get(c)) for c in acc_cols])
    return header, cells


def render_text(header: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in cells])


def render_markdown(header: list[str], cells: list[list[str]]) -> str:
    esc = lambda v: v.replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(esc, c)) + " |" for c in cells]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", default=["output"], help="results files or directories (default output/)")
    p.add_argument("--markdown", default=None, help="also write the Markdown table to this file")
    p.add_argument("--sort", default="run", choices=["run", "model", "target", "reached"])
    a = p.parse_args(argv)
    try:
        files = collect_files(a.paths)
    except FileNotFoundError as exc:
        print(f"mmlu_result_calc.py: error: {exc}", file=sys.stderr)
        return 2
    results, notes = load_results(files)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if not results:
        print(f"mmlu_result_calc.py: error: no {SCHEMA} results in {', '.join(a.paths)}", file=sys.stderr)
        return 2
    rows = sorted((summarize(r) for r in results), key=lambda r: (str(r[a.sort]), r["run"]))
    header, cells = table(rows)
    print(render_text(header, cells))
    md = render_markdown(header, cells)
    print()
    print(md)
    if a.markdown:
        Path(a.markdown).write_text(md + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
