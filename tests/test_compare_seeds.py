"""tools/compare.py's papers' table (issue 29): lm-eval accuracy in every cell, calibration seeds with
mean ± sd, the kept-index overlap across seeds, merging split grids, bad input, and the model card's row.

The grids run on a tiny random-initialised LLaMA (conftest) with the offline lm-eval task bigbench_mc on a
few questions; the pure math (mean/sd, Jaccard) is checked against numpy and hand-made index sets."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import acur
import evaluate_utils
from conftest import tiny_args
from tools import compare, compare_table

LIMIT = 6  # bigbench_mc questions per evaluation in the tiny grids


# ---------------------------------------------------------------- pure math
def test_mean_sd_equals_numpy():
    vals = [31.25, 29.5, 33.0]
    m, s = compare_table.mean_sd(vals)
    assert m == np.mean(vals) and s == np.std(vals, ddof=1)
    assert compare_table.mean_sd([2.5]) == (2.5, None)  # one seed: no sd
    with pytest.raises(ValueError):
        compare_table.mean_sd([])


def test_jaccard_on_known_sets():
    assert compare_table.jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert compare_table.jaccard([0, 1], [0, 1]) == 1.0 and compare_table.jaccard([0], [1]) == 0.0
    assert compare_table.jaccard([], []) == 1.0
    # pairs (A,B) 2/4, (A,C) 1/5, (B,C) 2/4
    a, b, c = {0, 1, 2}, {1, 2, 3}, {2, 3, 4}
    assert compare_table.mean_pairwise_jaccard([a, b, c]) == pytest.approx((0.5 + 0.2 + 0.5) / 3)
    assert compare_table.mean_pairwise_jaccard([a]) is None


def test_index_overlap_per_layer_and_dense_layers():
    sizes = {"L0": {"rows": 6, "cols": 4}, "L1": {"rows": 6, "cols": 4}, "L2": {"rows": 6, "cols": 4}}
    seed0 = {"L0": {"rows": [0, 1, 2], "cols": [0, 1]}, "L1": {"rows": list(range(6)), "cols": list(range(4))},
             "L2": {"rows": list(range(6)), "cols": list(range(4))}}
    seed1 = {"L0": {"rows": [1, 2, 3], "cols": [0, 1]}, "L1": {"rows": [0, 1, 2], "cols": [3]},
             "L2": {"rows": list(range(6)), "cols": list(range(4))}}
    o = compare_table.index_overlap([seed0, seed1], sizes)
    assert set(o["per_layer"]) == {"L0", "L1"}  # L2 is dense in both seeds: left out
    assert o["per_layer"]["L0"] == {"rows": 0.5, "cols": 1.0, "mean": 0.75}
    assert o["per_layer"]["L1"] == {"rows": 0.5, "cols": 0.25, "mean": 0.375}  # dense in seed 0 = every index
    assert o["mean"] == pytest.approx((0.75 + 0.375) / 2) and o["min_layer"] == "L1"
    assert o["by_side"] == {"cols": pytest.approx(0.625), "rows": 0.5} and o["pairs"] == 1
    assert compare_table.index_overlap([seed0], sizes) is None


def test_acc_columns_and_lm_figures():
    leaves = {"suite": ["piqa_x", "arc_x"], "bigbench_mc": ["bigbench_mc"], "mmlu": [f"s{i}" for i in range(57)]}
    assert compare_table.acc_columns(leaves) == ["piqa_x", "arc_x", "bigbench_mc", "mmlu_mean"]
    out = {"acc": {"piqa_x": 0.6, "arc_x": 0.4, "suite_mean": 0.5},
           "metrics": {"piqa_x": {"acc": 0.6, "acc_stderr": 0.05, "acc_norm": 0.62, "acc_norm_stderr": 0.049},
                       "arc_x": {"acc": 0.4, "acc_stderr": 0.04}},
           "n_samples": {"piqa_x": 100, "arc_x": 100}}
    fig = compare_table.lm_figures(out, ["piqa_x", "arc_x"])
    assert fig["acc"] == {"piqa_x": 0.6, "arc_x": 0.4} and fig["mean_acc"] == pytest.approx(0.5)
    assert fig["acc_norm"] == {"piqa_x": 0.62} and fig["acc_stderr"] == {"piqa_x": 0.05, "arc_x": 0.04}
    assert fig["groups"] == {"suite": 0.5}


def _run(seed, ppl, acc, reached):
    return {"seed": seed, "reached": reached, "compressed_linears_dense": 100, "compressed_linears_kept": reached * 100,
            "ppl": {"wiki": ppl}, "acc": {"t1": acc, "t2": 1 - acc}, "acc_stderr": {"t1": 0.1, "t2": 0.1},
            "mean_acc": 0.5, "fallbacks": 0, "ranks": {"l": seed}, "compress_s": 1.0, "eval_s": 2.0}


def test_summarize_cell_mean_sd_and_markdown_cells():
    runs = [_run(0, 30.0, 0.61, 0.899), _run(1, 31.5, 0.58, 0.901), _run(2, 29.0, 0.66, 0.9)]
    cell = compare_table.summarize_cell("srid", 0.9, runs)
    for key, get in (("reached", lambda r: r["reached"]),):
        vals = [get(r) for r in runs]
        assert cell[key] == np.mean(vals) and cell["sd"][key] == np.std(vals, ddof=1)
    ppl = [r["ppl"]["wiki"] for r in runs]
    acc = [r["acc"]["t1"] for r in runs]
    assert cell["ppl"]["wiki"] == np.mean(ppl) and cell["sd"]["ppl"]["wiki"] == np.std(ppl, ddof=1)
    assert cell["acc"]["t1"] == np.mean(acc) and cell["sd"]["acc"]["t1"] == np.std(acc, ddof=1)
    assert cell["sd"]["mean_acc"] == 0.0 and cell["per_seed"] == runs and cell["seeds"] == [0, 1, 2]
    assert cell["compress_s"] == 3.0 and cell["ranks"] == {"l": 0}
    results = {"args": {"model_id": "tiny", "calib_dataset": "c", "n_calib_samples": 2, "calib_seqlen": 8, "seed": 0,
                        "act_aware": True, "scaling_method": "abs_mean", "alpha": 0.5, "sensitivity_metric": "ppl",
                        "eval_seqlen": 8, "eval_max_windows": 0},
               "datasets": ["wiki"], "methods": ["srid"], "ratios": [0.9], "calib_seeds": [0, 1, 2],
               "dense": {"wiki": 25.0}, "dense_lm": {"acc": {"t1": 0.7, "t2": 0.3}, "mean_acc": 0.5},
               "lm_eval": {"tasks": ["t1", "t2"], "limit": None}, "cells": [cell], "timings": {}}
    md = compare_table.markdown(results)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | ratio | reached | ppl wiki | acc t1 (%) | acc t2 (%) | mean acc (%)")
    assert rows[1] == "| dense | 1.0 | 1.000 | 25.00 | 70.00 | 30.00 | 50.00 |"  # dense first
    sd = np.std(ppl, ddof=1)
    assert rows[2].startswith(f"| srid | 0.9 | 0.900 ± 0.001 | {np.mean(ppl):.2f} ± {sd:.2f} | "
                              f"{100 * np.mean(acc):.2f} ± {100 * np.std(acc, ddof=1):.2f} |")
    assert "sample sd, ddof=1" in md
    one = compare_table.summarize_cell("srid", 0.9, runs[:1])  # one seed: the value alone
    assert one["sd"]["ppl"]["wiki"] is None
    md1 = compare_table.markdown(dict(results, calib_seeds=[0], cells=[one]))
    assert "| srid | 0.9 | 0.899 | 30.00 | 61.00 | 39.00 | 50.00 |" in md1


# ---------------------------------------------------------------- the grid on a tiny random model
def _grid_argv(model_dir, text, tmp, name, *extra, methods="rowid,asvd", seeds="2"):
    return (["--methods", methods, "--ratios", "0.7", "--calib_seeds", seeds, "--eval_tasks", "bigbench_mc",
             "--eval_limit", str(LIMIT), "--name", name, *extra, "--"]
            + tiny_args(model_dir, text, tmp, "--act_aware", "--sensitivity_metric", "stable_rank",
                        "--eval_max_windows", "2", "--use_cache"))


def _lm_eval_own(model, tokenizer, tasks, limit, metadata):
    """lm-eval's own simple_evaluate on the model (HFLM around it; only the task registry is ours)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    was = model.training
    model.eval()
    try:
        raw = simple_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), tasks=list(tasks),
                              num_fewshot=0, limit=limit, task_manager=evaluate_utils.lm_task_manager(metadata, tasks),
                              log_samples=False)
    finally:
        model.train(was)
    return {t: raw["results"][t]["acc,none"] for t in tasks}


@pytest.fixture(scope="module")
def seeded_grid(tiny_llama_dir, tiny_text_file, tmp_path_factory):
    """rowid and asvd at 0.7 over 2 calibration seeds with bigbench_mc; every lm-eval call of the grid is
    also run through lm-eval's own simple_evaluate on the same (compressed) model at the same moment."""
    tmp = tmp_path_factory.mktemp("seeded_grid")
    own = []
    real = evaluate_utils.evaluate_lm_tasks

    def spy(model, tokenizer, tasks, limit=None, batch_size=1, num_fewshot=0, metadata=None):
        out = real(model, tokenizer, tasks, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot,
                   metadata=metadata)
        own.append((out["acc"], _lm_eval_own(model, tokenizer, tasks, limit, metadata)))
        return out
    mp = pytest.MonkeyPatch()
    mp.setattr(evaluate_utils, "evaluate_lm_tasks", spy)
    try:
        t0 = time.perf_counter()
        rc = compare.main(_grid_argv(tiny_llama_dir, tiny_text_file, tmp, "seeds"))
        print(f"\ntiny seeded grid: {time.perf_counter() - t0:.1f} s")
    finally:
        mp.undo()
    res = json.loads((tmp / "output" / "seeds.json").read_text())
    return rc, res, own, tmp


def test_grid_accuracy_equals_lm_eval_own_run(seeded_grid, tiny_llama_dir):
    rc, res, own, _ = seeded_grid
    assert rc == 0 and res["schema"] == "cur4llm.compare/2"
    assert len(own) == 1 + 2 * 2  # dense once, then 2 cells x 2 seeds
    for ours, theirs in own:
        assert ours["bigbench_mc"] == theirs["bigbench_mc"]  # exactly lm-eval's own number
    # the dense figure against a separately loaded model, scored by lm-eval alone
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    acc = _lm_eval_own(model, AutoTokenizer.from_pretrained(tiny_llama_dir), ["bigbench_mc"], float(LIMIT),
                       res["lm_eval"]["metadata"])
    assert res["dense_lm"]["acc"]["bigbench_mc"] == acc["bigbench_mc"]
    assert res["dense_lm"]["n_samples"] == {"bigbench_mc": LIMIT} and "bigbench_mc" in res["dense_lm"]["acc_stderr"]
    per_seed = [r["acc"]["bigbench_mc"] for c in res["cells"] for r in c["per_seed"]]
    assert per_seed == [o[0]["bigbench_mc"] for o in own[1:]]


def test_seeds_change_the_calibration_draw(seeded_grid):
    _, res, _, tmp = seeded_grid
    cal = res["calibration"]
    assert res["calib_seeds"] == [0, 1] and set(cal) == {"0", "1"}
    assert cal["0"]["ids_sha256"] != cal["1"]["ids_sha256"]  # other windows of the text
    assert cal["0"]["scales_sha256"] != cal["1"]["scales_sha256"]  # other activation statistics
    scales = [torch.load(p, weights_only=True) for p in sorted((tmp / "cache").glob("*_scales_*.pt"))]
    assert len(scales) == 2  # cached per seed
    a, b = (s["tensors"] for s in scales)
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)
    for c in res["cells"]:
        assert [r["seed"] for r in c["per_seed"]] == [0, 1]
        p = [r["ppl"][res["datasets"][0]] for r in c["per_seed"]]
        assert p[0] != p[1]  # the compressed models differ (ranks may, too)


def test_cells_are_mean_and_sample_sd_of_the_seeds(seeded_grid):
    _, res, _, _ = seeded_grid
    ds = res["datasets"][0]
    for c in res["cells"]:
        runs = c["per_seed"]
        for value, sd, per in ((c["reached"], c["sd"]["reached"], [r["reached"] for r in runs]),
                               (c["ppl"][ds], c["sd"]["ppl"][ds], [r["ppl"][ds] for r in runs]),
                               (c["acc"]["bigbench_mc"], c["sd"]["acc"]["bigbench_mc"],
                                [r["acc"]["bigbench_mc"] for r in runs]),
                               (c["mean_acc"], c["sd"]["mean_acc"], [r["mean_acc"] for r in runs])):
            assert value == np.mean(per) and sd == np.std(per, ddof=1)
        assert c["n_seeds"] == 2 and all(math.isfinite(r["ppl"][ds]) for r in runs)


def test_overlap_for_index_keeping_methods_only(seeded_grid):
    _, res, _, tmp = seeded_grid
    cells = {c["method"]: c for c in res["cells"]}
    assert "overlap" not in cells["asvd"]  # SVD keeps no actual rows or columns
    o = cells["rowid"]["overlap"]
    assert o["sides"] == ["rows"] and len(o["per_layer"]) == 14 and o["n_seeds"] == 2
    assert all(0 <= v["rows"] <= 1 for v in o["per_layer"].values())
    assert o["mean"] == pytest.approx(np.mean([v["mean"] for v in o["per_layer"].values()]))
    out = tmp / "output"
    for f in ("seeds.png", "seeds_overlap.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / f).stat().st_size > 5000
    md = (out / "seeds.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| dense | 1.0 | 1.000 |")
    assert rows[2].startswith("| rowid | 0.7 | ") and rows[2].count(" ± ") == 4  # reached, ppl, acc, mean acc
    assert "Kept-index overlap" in md and "| rowid | 0.7 | " in md.split("Kept-index overlap")[1]


def test_merge_of_grids_split_by_method(seeded_grid, tiny_llama_dir, tiny_text_file):
    """Two calls, one method each (as a GPU grid split over 10-minute calls), merged with --merge: the same
    cells as the one grid."""
    _, whole, _, tmp = seeded_grid
    assert compare.main(_grid_argv(tiny_llama_dir, tiny_text_file, tmp, "part_a", methods="rowid")) == 0
    assert compare.main(_grid_argv(tiny_llama_dir, tiny_text_file, tmp, "part_b", "--no_dense", methods="asvd")) == 0
    out = tmp / "output"
    part_a = json.loads((out / "part_a.json").read_text())
    assert part_a["dense_lm"]["from_cache"]  # the dense accuracies are computed once, then cached
    assert part_a["dense_lm"]["acc"] == whole["dense_lm"]["acc"]
    assert compare.main(["--merge", str(out / "part_a.json"), str(out / "part_b.json"), "--name", "all"]) == 0
    merged = json.loads((out / "all.json").read_text())
    assert merged["methods"] == ["rowid", "asvd"] and merged["calib_seeds"] == [0, 1]
    key = lambda c: (c["method"], c["target"], json.dumps(c["ppl"]), json.dumps(c["acc"]))  # noqa: E731
    assert sorted(map(key, merged["cells"])) == sorted(map(key, whole["cells"]))
    assert merged["dense"] == whole["dense"] and "| asvd | 0.7 |" in (out / "all.md").read_text()
    assert (out / "all_overlap.png").exists()


# ---------------------------------------------------------------- failures keep the finished cells
def test_failing_task_mid_grid_keeps_finished_cells(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    calls = []
    real = evaluate_utils.evaluate_lm_tasks

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # dense, rowid @ 0.7 seed 0, then this one fails
            raise RuntimeError("task data vanished")
        return real(*a, **k)
    monkeypatch.setattr(evaluate_utils, "evaluate_lm_tasks", flaky)
    argv = _grid_argv(tiny_llama_dir, tiny_text_file, tmp_path, "flaky", methods="rowid", seeds="3")
    assert compare.main(argv) == 1  # finished, with a recorded failure
    res = json.loads((tmp_path / "output" / "flaky.json").read_text())
    cell = res["cells"][0]
    assert [("acc" in r, r.get("lm_error")) for r in cell["per_seed"]] == \
        [(True, None), (False, "RuntimeError: task data vanished"), (True, None)]
    assert cell["n_seeds"] == 3 and len(cell["ppl"]) == 1 and cell["lm_error"] == ["seed 1: RuntimeError: task data vanished"]
    accs = [r["acc"]["bigbench_mc"] for r in cell["per_seed"] if "acc" in r]
    assert cell["acc"]["bigbench_mc"] == np.mean(accs)  # over the seeds that have it
    assert res["failures"] == [{"where": "lm-eval rowid @ 0.7 (seed 1)", "error": "RuntimeError: task data vanished"}]
    assert "**Failed** lm-eval rowid @ 0.7 (seed 1)" in (tmp_path / "output" / "flaky.md").read_text()


def test_failure_mid_grid_keeps_finished_cells(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    """Not a task: the grid itself fails (here the perplexity of the second cell): exit 1, one line, the first
    cell and the failure in the JSON."""
    calls = []
    real = acur.stage_eval

    def broken(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # dense, rowid @ 0.8, then rowid @ 0.6
            raise FloatingPointError("perplexity exploded")
        return real(*a, **k)
    monkeypatch.setattr(acur, "stage_eval", broken)
    argv = ["--methods", "rowid", "--ratios", "0.8,0.6", "--uniform", "--name", "cut", "--",
            *tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--eval_max_windows", "1")]
    capsys.readouterr()
    assert compare.main(argv) == 1
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "it/s]" not in x and "cell/s]" not in x
           and not x.startswith(("compare: ", "\r"))]
    assert err[-1].startswith("compare.py: failed: FloatingPointError: perplexity exploded at rowid @ 0.6")
    res = json.loads((tmp_path / "output" / "cut.json").read_text())
    assert [c["target"] for c in res["cells"]] == [0.8] and res["unfinished"]
    assert res["stopped"]["where"] == "rowid @ 0.6"
    assert res["failures"][-1]["error"] == "FloatingPointError: perplexity exploded"
    assert (tmp_path / "output" / "cut.png").exists()


# ---------------------------------------------------------------- bad input: one line, before any model loads
@pytest.mark.parametrize("flags,needle", [
    (["--calib_seeds", "0"], "--calib_seeds must be >= 1"),
    (["--calib_seeds", "-2"], "--calib_seeds must be >= 1"),
    (["--eval_tasks", "bigbench_mc", "--eval_limit", "-5"], "--eval_limit must be > 0"),
    (["--eval_tasks", "no_such_task_xyz"], "no_such_task_xyz"),
])
def test_bad_input_is_one_line_before_loading(flags, needle, tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch,
                                              capsys):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(acur, "load_model", no_load)
    capsys.readouterr()
    argv = ["--methods", "rowid", "--ratios", "0.7", *flags, "--", *tiny_args(tiny_llama_dir, tiny_text_file, tmp_path)]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compare.py: error:") and needle in err[0], err


def test_merge_refuses_different_grids(tmp_path, capsys):
    base = {"schema": "cur4llm.compare/2", "args": {"seed": 0, "n_calib_samples": 4, "method": "acur"},
            "methods": ["acur"], "ratios": [0.9], "cells": [], "timings": {}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(base))
    b.write_text(json.dumps(dict(base, args={"seed": 0, "n_calib_samples": 8, "method": "srid"})))
    capsys.readouterr()
    assert compare.main(["--merge", str(a), str(b), "--name", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_calib_samples" in err[0]
    b.write_text(json.dumps(dict(base, calib_seeds=[0, 1])))
    assert compare.main(["--merge", str(a), str(b), "--name", "m"]) == 2
    assert "calibration seeds" in capsys.readouterr().err


# ---------------------------------------------------------------- the model cards carry the run's row
def _run_results():
    return {"args": {"model_id": "tiny", "method": "srid", "eval_seqlen": 512, "eval_max_windows": 8},
            "method": "srid", "model": {"params_total": 1000, "params_compressed": 900},
            "param_ratio": {"target": 0.9, "reached": 0.8987, "compressed_linears_dense": 500,
                            "compressed_linears_kept": 449},
            "layers": {}, "ppl": {"dense": {"new_wiki": 25.09}, "compressed": {"new_wiki": 38.87}},
            "lm_eval": {"piqa_x": 0.625, "arc_x": 0.5, "suite_mean": 0.5625},
            "lm_eval_info": {"leaves": {"suite": ["piqa_x", "arc_x"]}, "limit": 160,
                             "metrics": {"piqa_x": {"acc": 0.625, "acc_stderr": 0.038}}}}


def test_run_row_markdown():
    rows = compare_table.run_row_markdown(_run_results())
    assert rows[0] == "| model | ratio | reached | ppl new_wiki | acc piqa_x (%) | acc arc_x (%) | mean acc (%) |"
    assert rows[2] == "| dense | 1.0 | 1.000 | 25.09 | - | - | - |"
    assert rows[3] == "| srid | 0.9 | 0.899 | 38.87 | 62.50 | 50.00 | 56.25 |"
    assert "stderr piqa_x ±3.80" in rows[-1]
    assert compare_table.run_row_markdown({"args": {}, "ppl": {}}) == []


def test_model_cards_carry_the_row():
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "huggingface_repos"))
    import build_acur_repo
    import export_structured
    res = _run_results()
    row = compare_table.run_row_markdown(res)[3]
    sizes = {"save_dtype": "float32", "dense_bytes_at_save_dtype": 4000, "compressed_weight_bytes": 3600}
    card = build_acur_repo.model_card(None, res, sizes, Path("tiny-srid90"), "llama", None)
    assert row in card and "## Results row" in card
    info = {"gguf": {"widths": [{"intermediate": 64, "heads": 4, "kv_heads": 2}], "file": "m.gguf",
                     "architecture": "llama"}, "width_mode": "uniform", "engines": []}
    assert row in export_structured.model_card(res, info, Path("tiny-structured"))


# ---------------------------------------------------------------- the real model, CI-sized
@pytest.mark.integration
def test_smollm2_seeded_grid_with_accuracy(smollm2_dir, tmp_path):
    """The demo-sized grid at CI settings on the real SmolLM2-135M: srid and the seed's acur at 0.9, 2
    calibration seeds (2 x 128 tokens of squad_wiki each; fisher_error allocation over the candidates
    0.6/0.8/0.9/0.95), the linears of blocks 0-3 only (28 of 210), perplexity on 4 windows of new_wiki,
    bigbench_mc (PIQA) on 20 questions. Structure and finite figures; the time is printed.

    Measured on the shared 2-core CPU busy with other jobs: 443 s (load ~3; dense acc 0.70 on the 20, srid and
    acur 0.675 ± 0.035); with 40 questions, load 3-7: 907 s (dense ppl 25.89,
    acc 0.725; srid 27.55 ± 0.33, acur 32.01 ± 0.03; kept-index overlap 0.58 / 0.61); the whole model at those
    settings 1,824 s (srid 36.23 ± 0.51, acur 219.6 ± 1.1; overlap 0.62 / 0.66). lm-eval's forwards of PIQA's
    long choices are ~40 s an evaluation at that load, 5 evaluations a grid."""
    argv = ["--methods", "srid,acur", "--ratios", "0.9", "--calib_seeds", "2", "--eval_tasks", "bigbench_mc",
            "--eval_limit", "20", "--name", "smol_seeds", "--",
            "--model_id", "smollm2-135m", "--act_aware", "--alpha", "0.5", "--sensitivity_metric", "fisher_error",
            "--sensitivity_ratios", "0.6,0.8,0.9,0.95", "--layer_filter", r"layers\.[0-3]\.",
            "--calib_dataset", "squad_wiki", "--n_calib_samples", "2", "--calib_seqlen", "128",
            "--eval_ppl", "new_wiki", "--eval_seqlen", "512", "--eval_max_windows", "4", "--eval_batch_size", "8",
            "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")]
    t0 = time.perf_counter()
    assert compare.main(argv) == 0
    took = time.perf_counter() - t0
    res = json.loads((tmp_path / "smol_seeds.json").read_text())
    cells = {c["method"]: c for c in res["cells"]}
    print(f"\nFIGS SmolLM2 seeded grid (2 seeds, srid + acur @ 0.9, bigbench_mc 20): {took:.0f} s; dense ppl "
          f"{res['dense']['new_wiki']:.3f} acc {res['dense_lm']['acc']['bigbench_mc']:.3f}; " + "; ".join(
              f"{m} ppl {c['ppl']['new_wiki']:.3f} ± {c['sd']['ppl']['new_wiki']:.3f}, acc "
              f"{c['acc']['bigbench_mc']:.3f} ± {c['sd']['acc']['bigbench_mc']:.3f}, overlap {c['overlap']['mean']:.3f}"
              for m, c in cells.items()))
    assert set(cells) == {"srid", "acur"} and res["calib_seeds"] == [0, 1]
    assert res["dense_lm"]["n_samples"] == {"bigbench_mc": 20}
    for c in cells.values():
        assert c["n_seeds"] == 2 and all(0.88 <= r["reached"] <= 0.9 for r in c["per_seed"])
        assert all(math.isfinite(v) for r in c["per_seed"] for v in (r["ppl"]["new_wiki"], r["acc"]["bigbench_mc"]))
        assert math.isfinite(c["sd"]["ppl"]["new_wiki"]) and 0 <= c["acc"]["bigbench_mc"] <= 1
        assert all(len(r["ranks"]) == 28 for r in c["per_seed"])
        assert 0 < c["overlap"]["mean"] <= 1 and 1 <= len(c["overlap"]["per_layer"]) <= 28
    assert (tmp_path / "smol_seeds_overlap.png").exists() and " ± " in (tmp_path / "smol_seeds.md").read_text()
