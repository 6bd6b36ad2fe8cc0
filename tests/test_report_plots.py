"""The pictures of a run (issue 17, item 4): the chosen-ranks and sensitivity heatmaps of tools/cur_report.py
(their data matrices from hand-made run JSON with known values, a missing layer and NaN / inf cells; the
PNGs written and valid) and the family styling of tools/compare.py's plot."""
from __future__ import annotations

import json
import math
import struct

import pytest

import acur
from conftest import tiny_args
from modules import registry
from tools import compare, cur_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN, INF = float("nan"), float("inf")


def _png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and IHDR chunk."""
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _valid_png(path, min_bytes: int = 5000) -> None:
    w, h = _png_size(path)
    assert w >= 200 and h >= 150
    assert path.stat().st_size >= min_bytes
    import matplotlib.image
    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == (h, w) and img.std() > 0.01  # not a blank canvas


def _row(rank, m=8, n=8, ratio=None):
    """One layer of acur.py's per-layer report (CUR parameter count at the rank; rank None = left dense)."""
    params = m * n if rank is None else registry.get("acur").param_count(m, n, rank)
    return {"ratio": 1.0 if rank is None else ratio or params / (m * n), "shape": [m, n], "params_dense": m * n,
            "rank": rank, "params": params, "fallback": ""}


def _layers() -> dict:
    """Two LLaMA blocks; block 1 has no k_proj (a missing layer), block 0's v_proj stays dense."""
    p = "model.layers.{}.{}"
    return {p.format(0, "self_attn.q_proj"): _row(2), p.format(0, "self_attn.k_proj"): _row(3),
            p.format(0, "self_attn.v_proj"): _row(None), p.format(0, "mlp.down_proj"): _row(4, 8, 16),
            p.format(1, "self_attn.q_proj"): _row(1), p.format(1, "self_attn.v_proj"): _row(2),
            p.format(1, "mlp.down_proj"): _row(5, 8, 16)}


def _table() -> dict:
    """Sensitivity {layer: {ratio: metric}} spanning decades, with a NaN, an inf and a missing candidate."""
    p = "model.layers.{}.{}"
    return {p.format(0, "self_attn.q_proj"): {"0.4": 1000.0, "0.6": 50.0, "0.9": 5.5},
            p.format(0, "self_attn.k_proj"): {"0.4": NAN, "0.6": 20.0, "0.9": 5.2},
            p.format(1, "mlp.down_proj"): {"0.4": INF, "0.9": 6.0}}  # no 0.6 candidate


def test_rank_grid_rows_blocks_columns_kinds_missing_and_dense_cells():
    g = cur_report.rank_grid(_layers())
    assert g["rows"] == ["0", "1"]
    assert g["cols"] == ["q_proj", "k_proj", "v_proj", "down_proj"]  # execution order, not dict order
    acur_spec = registry.get("acur")
    want = [[acur_spec.param_count(8, 8, 2) / 64, acur_spec.param_count(8, 8, 3) / 64, 1.0,
             acur_spec.param_count(8, 16, 4) / 128],
            [acur_spec.param_count(8, 8, 1) / 64, NAN, acur_spec.param_count(8, 8, 2) / 64,
             acur_spec.param_count(8, 16, 5) / 128]]
    for got_row, want_row in zip(g["values"], want):
        assert got_row == pytest.approx(want_row, nan_ok=True)
    assert math.isnan(g["values"][1][1])
    assert g["ranks"] == [[2, 3, None, 4], [1, None, 2, 5]]
    assert g["labels"] == [["2", "3", "dense", "4"], ["1", "missing", "2", "5"]]


def test_rank_grid_opt_names_and_layers_outside_the_blocks():
    layers = {"model.decoder.layers.0.self_attn.out_proj": _row(2), "model.decoder.layers.0.fc2": _row(3),
              "model.decoder.layers.0.fc1": _row(1), "model.decoder.layers.0.self_attn.q_proj": _row(2),
              "lm_head": _row(4)}
    g = cur_report.rank_grid(layers)
    assert g["cols"] == ["q_proj", "out_proj", "fc1", "fc2", "lm_head"]
    assert g["rows"] == ["0", "lm_head"]
    assert g["labels"][1] == ["missing"] * 4 + ["4"]
    # the per-layer ratio without a parameter count: the run's "ratio"
    assert cur_report.rank_grid({"m.layers.0.q_proj": {"ratio": 0.7, "rank": 5}})["values"] == [[0.7]]


def test_sensitivity_grid_values_nan_inf_and_missing_candidates():
    g = cur_report.sensitivity_grid(_table())
    assert g["rows"] == ["0.q_proj", "0.k_proj", "1.down_proj"]
    assert g["cols"] == ["0.4", "0.6", "0.9"]  # sorted numerically, union over layers
    v = g["values"]
    assert v[0] == [1000.0, 50.0, 5.5]
    assert math.isnan(v[1][0]) and v[1][1:] == [20.0, 5.2]
    assert v[2][0] == INF and math.isnan(v[2][1]) and v[2][2] == 6.0
    assert g["labels"][2][1] == "missing" and g["labels"][1][0] == "nan"
    assert cur_report.colour_scale(v) == "log"  # 5.2 .. 1000: decades
    assert cur_report.colour_scale([[1.0, 2.0, NAN]]) == "linear"
    assert cur_report.colour_scale([[0.0, 0.001, 5.0]]) == "symlog"  # decades, but a zero: no plain log
    assert cur_report.colour_scale([[NAN, INF]]) == "linear"


def test_heatmaps_write_valid_pngs(tmp_path):
    files = cur_report.heatmaps(_layers(), _table(), tmp_path / "r", "hand-made")
    assert [p.rsplit("_", 1)[-1] for p in files] == ["ranks.png", "sensitivity.png"]
    for f in files:
        _valid_png(tmp_path / f.rsplit("/", 1)[-1])
    # a large table (a 7B model's 224 linears x 6 candidates) still draws, labelled by block
    big = {f"model.layers.{b}.mlp.{k}": {f"{r:.4g}": 10 ** ((b + r) % 4) for r in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}
           for b in range(32) for k in ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")}
    big["model.layers.3.mlp.up_proj"]["0.4"] = NAN
    (f,) = cur_report.heatmaps(None, big, tmp_path / "big")
    _valid_png(tmp_path / "big_sensitivity.png", min_bytes=20000)


def _run_json(tmp_path, table_in_run: bool = True) -> tuple:
    run = {"schema": "cur4llm.result/1", "args": {"model_id": "tiny", "param_ratio_target": 0.8},
           "method": "acur", "layers": _layers(), "sensitivity": {"from_cache": 0, "computed": 3}}
    if table_in_run:
        run["sensitivity"]["table"] = _table()
    else:  # older runs: the table lives only in the sensitivity cache the run names
        cache = tmp_path / "sens_cache.json"
        cache.write_text(json.dumps({"key": {}, "table": _table(), "complete": True}))
        run["sensitivity"]["cache"] = str(cache)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))  # NaN / Infinity as acur.write_results writes them
    return path


@pytest.mark.parametrize("table_in_run", [True, False])
def test_cur_report_run_json_draws_both_heatmaps(tmp_path, capsys, table_in_run):
    path = _run_json(tmp_path, table_in_run)
    assert cur_report.main(["--run_json", str(path), "--output_dir", str(tmp_path / "png")]) == 0
    for suffix in ("_ranks.png", "_sensitivity.png"):
        _valid_png(tmp_path / "png" / f"run{suffix}")
    assert "run_ranks.png" in capsys.readouterr().out


def test_cur_report_run_json_errors(tmp_path, capsys):
    bad = tmp_path / "cmp.json"
    bad.write_text(json.dumps({"cells": []}))
    assert cur_report.main(["--run_json", str(bad)]) == 2
    assert cur_report.main(["--run_json", str(tmp_path / "nope.json")]) == 2
    assert cur_report.main(["--run_json", str(_run_json(tmp_path)), "--", "--model_id", "x"]) == 2
    assert "error" in capsys.readouterr().err
    # a run without any sensitivity table: the ranks heatmap alone
    run = json.loads((tmp_path / "run.json").read_text())
    del run["sensitivity"]["table"]
    (tmp_path / "run2.json").write_text(json.dumps(run))
    assert cur_report.main(["--run_json", str(tmp_path / "run2.json")]) == 0
    assert (tmp_path / "run2_ranks.png").exists() and not (tmp_path / "run2_sensitivity.png").exists()


def test_acur_run_json_holds_the_sensitivity_table_and_draws(tiny_llama_dir, tiny_text_file, tmp_path):
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.7",
                     "--sensitivity_metric", "stable_rank", "--eval_ppl", "none", "--run_name", "r")
    _, _, res = acur.run_pipeline(acur.build_parser().parse_args(argv))
    on_disk = json.loads(open(res["output_file"]).read())
    table = on_disk["sensitivity"]["table"]
    assert set(table) == set(on_disk["layers"]) and all(len(v) == 6 for v in table.values())
    assert cur_report.main(["--run_json", res["output_file"]]) == 0
    g = cur_report.rank_grid(on_disk["layers"])
    assert len(g["rows"]) == 2 and g["cols"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]
    assert all(v == v for row in g["values"] for v in row)  # every linear of both blocks is in the run
    for suffix in ("_ranks.png", "_sensitivity.png"):
        _valid_png(tmp_path / "output" / f"r{suffix}")


# ---------------------------------------------------------------- compare plot
def test_compare_families_follow_the_registry_form():
    fam = {m: compare.method_family(m) for m in registry.METHODS if "[" not in m}
    assert {m for m, f in fam.items() if f == "SVD"} == {"svd", "asvd", "wsvd"}
    assert {m for m, f in fam.items() if f == "CUR"} >= {"acur", "cur", "rowid", "colid", "srid"}
    assert compare.method_family("acur:u_mode=data_aware") == "CUR"
    assert compare.method_family("srid[sequential=0]") == "CUR"
    assert compare.method_family("wsvd:sensitivity_metric=fisher_error") == "SVD"
    st = compare.line_styles(["acur", "asvd", "srid", "wsvd", "svd"])
    assert all(st[m]["linestyle"] == "--" and st[m]["marker"] == "s" for m in ("asvd", "wsvd", "svd"))
    assert all(st[m]["linestyle"] == "-" and st[m]["marker"] == "o" for m in ("acur", "srid"))
    assert len({st[m]["color"] for m in st}) == len(st)  # every method its own colour


def test_compare_plot_marks_dense_and_both_families(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = ["acur", "asvd", "srid", "wsvd"]
    res = {"datasets": ["new_wiki", "ptb"], "methods": methods, "args": {"model_id": "tiny"},
           "dense": {"new_wiki": 18.8, "ptb": 30.0},
           "cells": [{"method": m, "target": r, "reached": r - 0.001, "ppl": {"new_wiki": 20 + 40 * (1 - r) * (i + 1),
                                                                                "ptb": 35 + 9 * (1 - r) * (i + 1)}}
                     for i, m in enumerate(methods) for r in (0.9, 0.8, 0.6)]}
    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):  # what the plot drew, read before it is closed
        ax = fig.axes[0]
        seen["lines"] = {ln.get_label(): (ln.get_linestyle(), ln.get_marker()) for ln in ax.get_lines()}
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        return real_savefig(fig, *a, **k)
    monkeypatch.setattr(plt.Figure, "savefig", spy)
    compare.plot(res, tmp_path / "c.png")
    _valid_png(tmp_path / "c.png")
    lines, legend = seen["lines"], seen["legend"]
    assert lines["asvd"] == ("--", "s") and lines["wsvd"] == ("--", "s")
    assert lines["acur"] == ("-", "o") and lines["srid"] == ("-", "o")
    dense = [k for k in lines if k.startswith("dense")]
    assert dense == ["dense (1.0): 18.80"] and lines[dense[0]][1] in ("None", "", None)
    assert any("CUR family" in t for t in legend) and any("SVD family" in t for t in legend)
    # the legend groups the methods under their family's header
    assert legend.index("acur") > [i for i, t in enumerate(legend) if "CUR family" in t][0]
    assert legend.index("asvd") > [i for i, t in enumerate(legend) if "SVD family" in t][0]
