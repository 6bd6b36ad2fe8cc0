"""The real offline model (SmolLM2-135M, LLaMA architecture) on real offline Wikipedia text."""
import json
import math

import pytest

import acur
import datautils

pytestmark = pytest.mark.integration


def test_offline_corpora_are_real_disjoint_wikipedia_text():
    """The carried texts, read through their checksums: 48 articles each, no title shared."""
    calib, ev = datautils.get_text("squad_wiki", "train"), datautils.get_text("new_wiki", "test")
    assert len(calib) == 1_455_525 and len(ev) == 1_212_732
    titles = lambda t: {line.strip(" =") for line in t.splitlines() if line.startswith(" = ")}
    assert len(titles(ev)) == 48 and len(titles(calib)) >= 48  # squad_wiki heads its sections the same way
    assert not titles(calib) & titles(ev)


def test_smollm2_reduced_real_run_ppl_sensitivity(smollm2_dir, tmp_path):
    """Blocks 0-3 (28 linears) with the real ppl sensitivity, compressed to 0.9, evaluated on new_wiki."""
    argv = ["--model_id", "smollm2-135m", "--act_aware", "--alpha", "0.5", "--param_ratio_target", "0.9",
            "--calib_dataset", "squad_wiki", "--n_calib_samples", "2", "--calib_seqlen", "128",
            "--sensitivity_ratios", "0.6,0.8,0.9", "--layer_filter", r"layers\.[0-3]\.",
            "--eval_ppl", "new_wiki", "--eval_seqlen", "512", "--eval_max_windows", "4", "--eval_dense",
            "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"), "--run_name", "smol"]
    _, _, res = acur.run_pipeline(acur.build_parser().parse_args(argv))
    dense, comp = res["ppl"]["dense"]["new_wiki"], res["ppl"]["compressed"]["new_wiki"]
    print(f"\nFIGS ppl sensitivity 0.9: dense {dense:.4f}, compressed {comp:.4f}")
    assert len(res["layers"]) == 28 and res["fallbacks"] == {}
    assert 0.88 <= res["param_ratio"]["reached"] <= 0.9
    # measured on this machine: dense 25.09, compressed 38.87 (see closing note); margins for BLAS variation
    assert 24.0 < dense < 26.5
    assert math.isfinite(comp) and dense < comp < 48.0
    assert json.load(open(res["output_file"]))["ppl"]["compressed"]["new_wiki"] == comp


def test_smollm2_srid_beats_asvd_and_the_seed_acur(tmp_path):
    """Issue 18's claim at small settings on the real model: with the same calibration (2 x 128 tokens)
    and the same allocation (fisher_error over the candidates 0.6/0.8/0.9/0.95), srid's held-out
    perplexity with every linear of the model compressed to 0.9 is clearly below asvd's and the seed ACUR's.

    The whole model, not a few blocks: srid's gain comes from fitting each block on the inputs the
    already-compressed blocks produce, so it shows when errors compound. On blocks 0-9 at 0.8 (this test
    until 2026-12-07) srid was only 0.91-0.93 x asvd (2026-12-04: a fresh machine failed the 0.9 bound),
    and at 0.7 it lost. Perplexity on 8 windows of 256 tokens of new_wiki, measured (2-core AMD EPYC,
    torch 2.13): dense 30.75 in every setting; acur 181.04, asvd 68.41 (spread < 0.01 %); srid 46.47 with
    the native AVX-512 kernels (1 or 2 threads), 46.09 with ATEN_CPU_CAPABILITY=avx2 or default (1 or 2
    threads): srid / asvd 0.674-0.679 (spread 0.005), srid / acur 0.255-0.257. The bounds 0.75 and 0.5
    leave 14x and over 100x those spreads."""
    from tools import compare
    argv = ["--model_id", "smollm2-135m", "--act_aware", "--alpha", "0.5", "--param_ratio_target", "0.9",
            "--calib_dataset", "squad_wiki", "--n_calib_samples", "2", "--calib_seqlen", "128",
            "--sensitivity_metric", "fisher_error", "--sensitivity_ratios", "0.6,0.8,0.9,0.95",
            "--eval_ppl", "new_wiki", "--eval_seqlen", "256", "--eval_max_windows", "8",
            "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")]
    base = acur.build_parser().parse_args(argv)
    res = compare.run_grid(base, ["acur", "asvd", "srid"], [0.9])
    ppl = {c["method"]: c["ppl"]["new_wiki"] for c in res["cells"]}
    dense = res["dense"]["new_wiki"]
    print(f"\nFIGS srid vs asvd vs acur: dense {dense:.4f}, " + ", ".join(f"{k} {v:.4f}" for k, v in ppl.items()))
    assert all(0.89 <= c["reached"] <= 0.9 for c in res["cells"])
    assert all(len(c["ranks"]) == 210 for c in res["cells"])  # every decoder linear of the 30 blocks
    assert dense < ppl["srid"] < 0.75 * ppl["asvd"], (dense, ppl)  # measured 0.674-0.679
    assert ppl["srid"] < 0.5 * ppl["acur"], (dense, ppl)           # measured 0.255-0.257
