"""CUR vs SVD methods: the decomposition math on small matrices, the modules, the --method pipeline on
a tiny random model, tools/compare.py and tools/cur_report.py."""
from __future__ import annotations

import json
import sys
import math

import pytest
import torch

import acur
import binary_search
from act_aware_utils import input_covariances
from conftest import tiny_args
from modules import registry
from modules import decompositions as dec
from modules.cur_linear import CURLinear
from modules.low_rank_linear import (ColIDLinear, RowIDLinear, SVDLinear, compress_candidates,
                                     compress_linear, prepare_layer)
from modules.model_utils import find_linears


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def low_rank(m: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)


def spd(n: int, seed: int = 1) -> torch.Tensor:
    """A full-rank, anisotropic input covariance (correlated channels of different sizes)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -1.5, n, dtype=torch.float64))
    X = X @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return X.T @ X / X.shape[0]


def decaying(m: int, n: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -1, n, dtype=torch.float64))


def linear_of(W: torch.Tensor, bias: bool = True) -> torch.nn.Linear:
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=bias, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        if bias:
            lin.bias.copy_(torch.linspace(-1, 1, W.shape[0], dtype=W.dtype))
    return lin


# ---------------------------------------------------------------- selection
def naive_deim(V: torch.Tensor) -> list[int]:
    """DEIM exactly as Sorensen & Embree state it (solve at the picked rows each step)."""
    p = [int(torch.argmax(V[:, 0].abs()))]
    for j in range(1, V.shape[1]):
        c = torch.linalg.solve(V[p][:, :j], V[p, j])
        r = V[:, j] - V[:, :j] @ c
        p.append(int(torch.argmax(r.abs())))
    return p


def test_deim_matches_definition_and_is_prefix_consistent():
    U = torch.linalg.svd(decaying(40, 25), full_matrices=False)[0]
    order = dec.deim_order(U, 12)
    assert order.tolist() == naive_deim(U[:, :12])
    assert dec.deim_order(U, 5).tolist() == order[:5].tolist()


def test_deim_picks_independent_indices_and_cur_is_exact_on_rank_k():
    W = low_rank(30, 20, 5)
    for k in (5, 7):  # at and above the true rank
        f = dec.cur_decompose_ext(W, k, selection="deim", u_mode="pinv")
        assert len(set(f.cols.tolist())) == k and len(set(f.rows.tolist())) == k
        U, _, Vh = torch.linalg.svd(W)
        # the picked rows of the top-5 singular vectors are independent (nonsingular interpolation matrix)
        assert torch.linalg.matrix_rank(Vh[:5].T[f.cols[:k]]) == 5
        assert torch.linalg.matrix_rank(U[:, :5][f.rows]) == 5
        assert torch.allclose(f.C @ f.U @ f.R, W, atol=1e-9 * W.abs().max())


def test_pivoted_cholesky_order_equals_qr_column_pivoting():
    A = decaying(30, 18)
    R = A.clone()
    expected, picked = [], set()
    for _ in range(10):  # textbook Businger-Golub on the matrix itself
        norms = R.pow(2).sum(0)
        norms[list(picked)] = -1
        j = int(torch.argmax(norms))
        expected.append(j)
        picked.add(j)
        q = R[:, j] / R[:, j].norm()
        R = R - torch.outer(q, q @ R)
    assert dec.pivoted_qr_order(A, 10).tolist() == expected
    assert dec.pivoted_cholesky_order(A.T @ A, 10, block=3).tolist() == expected  # blocking changes nothing


# ---------------------------------------------------------------- U, SVD, ID
def test_data_aware_u_beats_plain_u_on_its_covariance():
    for seed in range(3):
        W, cov = decaying(24, 16, seed), spd(16, seed + 10)
        scale = cov.diagonal().sqrt()
        base = dec.cur_decompose_ext(W, 6, scale=scale, u_mode="pinv")
        errs = {}
        for mode in registry.U_MODES:
            f = dec.cur_decompose_ext(W, 6, scale=scale, u_mode=mode, cov=cov)
            assert torch.equal(f.cols, base.cols) and torch.equal(f.rows, base.rows)  # same C and R
            errs[mode] = dec.relative_output_error(W, f.C @ f.U @ f.R, cov)
        assert errs["data_aware"] <= errs["pinv"] + 1e-12
        assert errs["data_aware"] <= errs["act_weighted"] + 1e-12
        assert errs["data_aware"] < errs["pinv"] * 0.999  # strictly better on an anisotropic covariance


def test_svd_baselines_at_full_rank_reproduce_w():
    W, cov = decaying(20, 12), spd(12)
    scale = cov.diagonal().sqrt()
    cases = {"none": {}, "scale": {"scale_diag": scale}, "whiten": {"whiten": dec.whitening_factor(cov)}}
    for transform, kw in cases.items():
        f = dec.svd_factors(W, 12, transform, **kw)
        assert f.rank == 12
        assert torch.allclose(f.A @ f.B, W, atol=1e-10), transform


def test_whitened_svd_is_the_output_error_optimum():
    W, cov = decaying(20, 12), spd(12)
    lin = linear_of(W, bias=False)
    errs = {m: dec.relative_output_error(W, compress_linear(lin, 0.6, m, scale=cov.diagonal().sqrt(), cov=cov,
                                                            cov_damp=0.0).dense_weight().detach(), cov)
            for m in ("svd", "asvd", "wsvd")}
    k = registry.get("wsvd").rank(20, 12, 0.6)
    s = torch.linalg.svdvals(W @ dec.whitening_factor(cov))
    assert errs["wsvd"] == pytest.approx(math.sqrt(float(s[k:].pow(2).sum() / s.pow(2).sum())), rel=1e-6)
    assert errs["wsvd"] <= min(errs["svd"], errs["asvd"]) + 1e-12


def test_row_and_column_id_exact_on_rank_k():
    W, cov = low_rank(30, 20, 5), spd(20)
    for c in (None, cov):
        r = dec.row_id(W, 5, c)
        W_hat = torch.empty_like(W)
        W_hat[r.rows], W_hat[r.others] = r.R, r.Z @ r.R
        assert torch.allclose(W_hat, W, atol=1e-8 * W.abs().max())
        col = dec.col_id(W, 5, c)
        W_hat = torch.empty_like(W)
        W_hat[:, col.cols], W_hat[:, col.others] = col.C, col.C @ col.Z
        assert torch.allclose(W_hat, W, atol=1e-8 * W.abs().max())
    # data-aware Z keeps the picked outputs exactly: its rows at the picks are the identity
    Z = dec.data_aware_rows_fit(decaying(20, 12), torch.tensor([1, 4, 7]), spd(12))
    assert torch.allclose(Z[[1, 4, 7]], torch.eye(3, dtype=Z.dtype), atol=1e-9)


def test_row_id_data_aware_z_beats_frobenius_z():
    W, cov = decaying(24, 16), spd(16)
    rows = dec.row_id(W, 6, cov).rows
    err = {}
    for label, c in (("frobenius", None), ("data_aware", cov)):
        Z = dec.data_aware_rows_fit(W, rows, c)
        err[label] = dec.relative_output_error(W, Z @ W[rows], cov)
    assert err["data_aware"] < err["frobenius"]


# ---------------------------------------------------------------- parameter counting and modules
@pytest.mark.parametrize("method", list(registry.METHODS))
def test_params_for_ratio_within_budget_and_acur_unchanged(method):
    for m, n in ((64, 64), (32, 64), (128, 64), (64, 128), (7, 300)):
        for ratio in (0.05, 0.3, 0.5, 0.9, 0.99):
            for align in (1, 8):
                k = registry.get(method).rank(m, n, ratio, align)
                p = registry.get(method).params(m, n, ratio, align)
                assert p == registry.get(method).param_count(m, n, k)
                if registry.get(method).param_count(m, n, 1) <= ratio * m * n:
                    assert p <= ratio * m * n
                if method in ("acur", "cur"):  # the seed's count, bit for bit
                    assert k == registry.get("acur").rank(m, n, ratio, align)
                    assert binary_search.layer_params(m, n, ratio, align) == registry.get("acur").param_count(m, n, k)
                elif align == 1 and k < min(m, n):  # the largest rank that fits
                    assert registry.get(method).param_count(m, n, k + 1) > ratio * m * n
    assert registry.get(method).params(10, 20, 1.0) == 200


@pytest.mark.parametrize("method,kw,cls", [
    ("acur", {}, CURLinear), ("acur", {"selection": "deim", "u_mode": "data_aware"}, CURLinear),
    ("cur", {}, CURLinear), ("svd", {}, SVDLinear), ("asvd", {}, SVDLinear), ("wsvd", {}, SVDLinear),
    ("rowid", {}, RowIDLinear), ("colid", {}, ColIDLinear)])
def test_modules_forward_count_and_indices(method, kw, cls):
    W, cov = decaying(40, 24).float(), spd(24).float()
    lin = linear_of(W)
    mod = compress_linear(lin, 0.6, method, scale=cov.diagonal().sqrt(), cov=cov, **kw)
    assert isinstance(mod, cls) and mod.fallback == ""
    weights = sum(p.numel() for name, p in mod.named_parameters() if name != "bias")
    assert mod.param_count() == weights <= 0.6 * W.numel()
    x = torch.randn(2, 3, 24)
    expected = torch.nn.functional.linear(x, mod.dense_weight(), lin.bias)
    assert torch.allclose(mod(x), expected, atol=1e-5)
    if cls is RowIDLinear:  # kept outputs are exact actual rows of W
        assert torch.equal(mod.R, W[mod.row_indices])
        assert torch.allclose(mod(x)[..., mod.row_indices], lin(x)[..., mod.row_indices], atol=1e-5)
    if cls is ColIDLinear:
        assert torch.equal(mod.C, W[:, mod.col_indices])
    # candidates share one preparation and give the same modules as one-off calls
    cands = compress_candidates(lin, [0.3, 0.6], scale=cov.diagonal().sqrt(), cov=cov, method=method, **kw)
    assert torch.allclose(cands[1].dense_weight(), mod.dense_weight())


def test_acur_factory_is_the_seed_path():
    W = decaying(40, 24).float()
    lin, scale = linear_of(W), torch.rand(24) + 0.1
    for sel, u in (("topk", "pinv"), ("topk", "act_weighted"), ("sample", "pinv")):
        a = compress_linear(lin, 0.5, "acur", scale=scale, selection=sel, u_mode=u,
                            generator=torch.Generator().manual_seed(3))
        b = CURLinear.from_linear(lin, 0.5, scale, selection=sel, u_mode=u, generator=torch.Generator().manual_seed(3))
        for name in ("C", "U", "R", "col_indices", "row_indices"):
            assert torch.equal(getattr(a, name), getattr(b, name))


def test_bad_inputs_fail_loudly():
    lin = linear_of(decaying(10, 8).float())
    with pytest.raises(ValueError, match="activation statistic"):
        compress_linear(lin, 0.5, "asvd")
    with pytest.raises(ValueError, match="covariance"):
        compress_linear(lin, 0.5, "rowid")
    with pytest.raises(ValueError, match="unknown method"):
        registry.get("pca").params(4, 4, 0.5)
    bad = torch.eye(8)
    bad[0, 0] = float("nan")
    mod = compress_linear(lin, 0.5, "rowid", cov=bad)
    assert "non-finite input covariance" in mod.fallback  # recorded, not silent
    prep = prepare_layer(lin.weight.data, "asvd", scale=torch.full((8,), float("inf")))
    assert "non-finite activation statistic" in prep.fallback


# ---------------------------------------------------------------- pipeline on a tiny random model
def test_input_covariances_random_llama_shared_and_exact(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    linears = find_linears(model)
    ids = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    covs = input_covariances(model, linears, ids, batch_size=2)
    assert covs["model.layers.0.self_attn.q_proj"] is covs["model.layers.0.self_attn.v_proj"]
    assert covs["model.layers.0.mlp.gate_proj"] is covs["model.layers.0.mlp.up_proj"]
    assert covs["model.layers.0.mlp.down_proj"].shape == (128, 128)
    seen = []
    down = model.model.layers[1].mlp.down_proj
    h = down.register_forward_hook(lambda _m, i, _o: seen.append(i[0].reshape(-1, 128)))
    with torch.no_grad():
        model(ids)
    h.remove()
    X = torch.cat(seen).double()
    assert torch.allclose(covs["model.layers.1.mlp.down_proj"].double(), X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)


def _run(tiny_llama_dir, tiny_text_file, tmp_path, *extra):
    args = acur.build_parser().parse_args(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, *extra))
    return acur.run_pipeline(args)


# ranks and perplexity of the seed code (before --method existed) on the tiny random LLaMA
SEED_RUNS = {
    "plain": (("--param_ratio_target", "0.8", "--sensitivity_metric", "stable_rank"),
              [21, 14, 16, 21, 29, 29, 32, 21, 14, 16, 21, 29, 31, 29], 325.6579962956585),
    "act_sample": (("--act_aware", "--param_ratio_target", "0.75", "--selection", "sample", "--u_mode",
                    "act_weighted", "--sensitivity_metric", "stable_rank"),
                   [19, 14, 14, 16, 29, 29, 29, 19, 14, 14, 18, 29, 29, 29], 327.9176514285065),
}


@pytest.mark.parametrize("run", list(SEED_RUNS))
def test_method_acur_unchanged_random_llama(tiny_llama_dir, tiny_text_file, tmp_path, run):
    flags, ranks, ppl = SEED_RUNS[run]
    model, _, res = _run(tiny_llama_dir, tiny_text_file, tmp_path, *flags)
    assert res["method"] == "acur"
    assert [row["rank"] for row in res["layers"].values()] == ranks
    assert next(iter(res["ppl"]["compressed"].values())) == pytest.approx(ppl, rel=1e-5)
    for name, row in res["layers"].items():
        m, n = row["shape"]
        assert row["rank"] == registry.get("acur").rank(m, n, row["ratio"])
        assert row["params"] == registry.get("acur").param_count(m, n, row["rank"])
    _, _, res2 = _run(tiny_llama_dir, tiny_text_file, tmp_path, *flags, "--method", "acur")
    assert res2["ppl"]["compressed"] == res["ppl"]["compressed"]


def test_sensitivity_cache_key_has_method_except_acur(tiny_llama_dir, tiny_text_file, tmp_path):
    args = acur.build_parser().parse_args(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path,
                                                    "--param_ratio_target", "0.8"))
    assert "method" not in acur.cache_key(args, {}, "sensitivity", [])  # existing acur caches stay valid
    keys = set()
    for method in ("rowid", "colid", "svd"):
        args.method = method
        key = acur.cache_key(args, {}, "sensitivity", [])
        assert key["method"] == method
        keys.add(json.dumps(key, sort_keys=True))
    assert len(keys) == 3


@pytest.mark.parametrize("method", ["rowid", "asvd"])
def test_other_methods_pipeline_random_llama(tiny_llama_dir, tiny_text_file, tmp_path, method):
    model, _, res = _run(tiny_llama_dir, tiny_text_file, tmp_path, "--act_aware", "--method", method,
                         "--param_ratio_target", "0.7", "--sensitivity_ratios", "0.5,0.9", "--use_cache")
    assert res["method"] == method and res["args"]["method"] == method
    assert res["param_ratio"]["reached"] <= 0.7
    assert math.isfinite(next(iter(res["ppl"]["compressed"].values())))
    kinds = {type(i.module).__name__ for i in find_linears(model, types=(torch.nn.Module,))
             if i.name.endswith("proj")}
    assert kinds & {"RowIDLinear", "SVDLinear"}
    table = json.loads(open(res["sensitivity"]["cache"]).read())
    assert table["key"]["method"] == method and table["complete"]


def test_method_usage_errors(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--method", "asvd", "--param_ratio_target", "0.8")
    assert acur.main(argv) == 2
    assert "--act_aware" in capsys.readouterr().err
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--method", "wsvd", "--param_ratio_target", "0.8",
                     "--cov_damp", "-1")
    assert acur.main(argv) == 2
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--method", "rowid", "--param_ratio_target", "0.8",
                     "--weight_quant", "rtn_int8")
    assert acur.main(argv) == 2  # quantization knows CUR factors only: refused, not silently skipped
    assert "--weight_quant" in capsys.readouterr().err


# ---------------------------------------------------------------- tools
def test_compare_random_llama_writes_table_and_plot(tiny_llama_dir, tiny_text_file, tmp_path):
    from tools import compare
    argv = ["--methods", "acur:u_mode=data_aware,asvd,rowid", "--ratios", "0.9,0.6", "--name", "cmp", "--",
            *tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--act_aware", "--sensitivity_metric",
                       "stable_rank", "--eval_max_windows", "2")]
    assert compare.main(argv) == 0
    out = tmp_path / "output"
    md = (out / "cmp.md").read_text()
    for spec in ("acur:u_mode=data_aware", "asvd", "rowid", "dense"):
        assert f"| {spec} " in md
    assert (out / "cmp.png").stat().st_size > 5000
    res = json.loads((out / "cmp.json").read_text())
    assert len(res["cells"]) == 6 and all(c["reached"] <= c["target"] for c in res["cells"])
    assert compare.main(["--methods", "nope", "--", *tiny_args(tiny_llama_dir, tiny_text_file, tmp_path)]) == 2
    # --uniform: every linear at the target ratio, no sensitivity
    argv = ["--methods", "rowid", "--ratios", "0.6", "--uniform", "--no_dense", "--name", "cmpu", "--",
            *tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--eval_max_windows", "1")]
    assert compare.main(argv) == 0
    cell = json.loads((out / "cmpu.json").read_text())["cells"][0]
    shapes = {i.name: tuple(i.module.weight.shape) for i in find_linears(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_llama_dir))}
    assert cell["ranks"] == {k: registry.get("rowid").rank(*shapes[k], 0.6) for k in shapes}


def test_compare_jobs_merge_equals_one_process(tiny_llama_dir, tiny_text_file, tmp_path):
    """--jobs 2 runs the specs in two child processes; the merged table holds the same cells as one process."""
    from tools import compare
    flags = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--eval_max_windows", "1")
    base = ["--methods", "rowid,asvd:alpha=0.5", "--ratios", "0.7", "--uniform"]
    assert compare.main(base + ["--name", "one", "--", *flags, "--act_aware"]) == 0
    assert compare.main(base + ["--name", "two", "--jobs", "2", "--", *flags, "--act_aware"]) == 0
    out = tmp_path / "output"
    one, two = (json.loads((out / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["jobs"] == {"n": 2, "failed": []} and two["methods"] == one["methods"]
    cells = lambda r: {(c["method"], c["target"]): (c["ppl"], c["ranks"]) for c in r["cells"]}
    assert cells(two) == cells(one) and two["dense"] == one["dense"]
    assert (out / "two.part1.json").exists() and "| asvd:alpha=0.5 " in (out / "two.md").read_text()


def test_compare_jobs_failed_part_is_reported(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch):
    """A child that dies leaves its cells missing and says so in the table; the run exits 1, the other
    part's cells are kept."""
    from tools import compare
    real = compare.subprocess.Popen

    def popen(cmd, **kw):
        if "bad.part1" in cmd:
            cmd = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
        return real(cmd, **kw)
    monkeypatch.setattr(compare.subprocess, "Popen", popen)
    flags = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--eval_max_windows", "1")
    argv = ["--methods", "rowid,colid", "--ratios", "0.7", "--uniform", "--jobs", "2", "--name", "bad", "--", *flags]
    assert compare.main(argv) == 1
    out = tmp_path / "output"
    res = json.loads((out / "bad.json").read_text())
    assert [c["method"] for c in res["cells"]] == ["rowid"]
    assert res["jobs"]["failed"][0]["returncode"] == 3 and res["jobs"]["failed"][0]["methods"] == ["colid"]
    assert "**Part 1 failed** (exit 3" in (out / "bad.md").read_text()
    assert "boom" in (out / "bad.part1.log").read_text()


def test_cur_report_random_llama(tiny_llama_dir, tiny_text_file, tmp_path):
    from tools import cur_report
    argv = ["--output_error", "--name", "rep", "--",
            *tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--act_aware", "--sensitivity_metric",
                       "stable_rank", "--param_ratio_target", "0.7")]
    assert cur_report.main(argv) == 0
    out = tmp_path / "output"
    rep = json.loads((out / "rep.json").read_text())
    assert len(rep["layers"]) == 14
    for r in rep["layers"]:
        assert len(r["cols"]) == r["rank"] and 0 < r["col_leverage_mass"] <= 1 + 1e-6
        assert 0 <= r["rel_output_error"] < 1.5 and 0 <= r["rel_frobenius_error"] < 1.5
    assert {a["group"] for a in rep["agreement"]} == {"qkv", "gate_up"}
    assert "leverage mass" in (out / "rep.txt").read_text()
    for suffix in ("_kept.png", "_layers.png", "_agreement.png", "_ranks.png", "_sensitivity.png"):
        assert (out / f"rep{suffix}").exists()
    assert set(rep["run_layers"]) == set(rep["sensitivity_table"]) and len(rep["run_layers"]) == 14


def test_cur_report_random_llama_exported_repo(tiny_llama_dir, tiny_text_file, tmp_path):
    import sys
    from conftest import ROOT
    from tools import cur_report
    sys.path.insert(0, str(ROOT / "huggingface_repos"))
    import build_acur_repo
    repo = tmp_path / "repo"
    flags = ("--act_aware", "--param_ratio_target", "0.8", "--sensitivity_metric", "stable_rank")
    assert build_acur_repo.main(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, *flags,
                                          "--repo_dir", str(repo))) == 0
    exported = json.loads((repo / "config.json").read_text())["lowrank_layers"]
    from safetensors import safe_open
    with safe_open(str(repo / "model.safetensors"), "pt") as f:  # kept indices live in the weights
        kept = {n: (f.get_tensor(f"{n}.col_indices").tolist(), f.get_tensor(f"{n}.row_indices").tolist())
                for n in exported}
    out = tmp_path / "report_out"
    assert cur_report.main(["--repo", str(repo), "--name", "rrep", "--", "--output_dir", str(out),
                            "--cache_dir", str(tmp_path / "cache")]) == 0
    rep = json.loads((out / "rrep.json").read_text())
    assert {r["name"] for r in rep["layers"]} == set(exported)
    assert set(rep["run_layers"]) == set(exported) and (out / "rrep_ranks.png").exists()
    for r in rep["layers"]:
        assert (r["cols"], r["rows"]) == kept[r["name"]]
        assert 0 < r["col_leverage_mass"] <= 1 + 1e-6 and 0 <= r["rel_frobenius_error"] < 1.5
    assert cur_report.main(["--repo", str(tmp_path)]) == 2  # not an export: one-line error


def test_spectral_sensitivity_counts_the_rank_of_the_chosen_method():
    import sensitivity
    from modules.model_utils import LinearInfo
    torch.manual_seed(4)
    info = LinearInfo("l", None, "x", torch.nn.Linear(48, 40), 0)
    # ratio 0.5 of 40x48: SVD keeps k=10 (k(m+n) params), CUR only k=9 (k(m+n)+k^2): more tail energy
    cur = sensitivity.sensitivity_spectral([info], [0.5], None, 0.5, method="acur")
    svd = sensitivity.sensitivity_spectral([info], [0.5], None, 0.5, method="svd")
    s = torch.linalg.svdvals(info.module.weight.detach()).double().pow(2)
    assert cur["l"]["0.5"] == pytest.approx(float(s[9:].sum() / s.sum()))
    assert svd["l"]["0.5"] == pytest.approx(float(s[10:].sum() / s.sum()))
