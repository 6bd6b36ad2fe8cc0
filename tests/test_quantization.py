"""Weight quantization (quantization.py, --weight_quant): error bounds on random matrices, the derived
output bound of an int8 CURLinear, AWQ's search, the pipeline stage on a tiny random model, and the
perplexity by bit width on the real SmolLM2 at ratio 0.9."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import acur
import quantization as qz
from modules.cur_linear import CURLinear
from modules.model_utils import find_linears
from tests.conftest import tiny_args

BITS = (8, 6, 5, 4, 3)


def _slack(w: torch.Tensor) -> float:
    """fp32 round-off allowance on top of the exact bound scale/2."""
    return 4 * torch.finfo(torch.float32).eps * float(w.abs().max())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [0, 128, 37])
def test_rtn_random_error_bound(bits, group_size):
    """|w - Q(w)| <= scale/2 with scale = (hi - lo)/(2^b - 1) of the element's group; the bound is
    attained up to a few percent (it is the right bound, not a loose one); at most 2^b levels per group."""
    torch.manual_seed(bits * 1000 + group_size)
    w = torch.randn(96, 300) * torch.rand(96, 1) * 3 + 0.2 * torch.randn(96, 1)
    deq = qz.rtn_quantize(w, bits, group_size)
    assert deq.shape == w.shape and deq.dtype == w.dtype
    g = group_size or w.shape[1]
    expected = torch.empty_like(w)
    for j0 in range(0, w.shape[1], g):
        blk = w[:, j0:j0 + g]
        lo, hi = blk.amin(1, keepdim=True).clamp_max(0), blk.amax(1, keepdim=True).clamp_min(0)
        expected[:, j0:j0 + g] = ((hi - lo) / (2 ** bits - 1) / 2).expand_as(blk)
        for row in range(0, 96, 17):
            assert deq[row, j0:j0 + g].unique().numel() <= 2 ** bits
    bound = qz.error_bound(w, bits, group_size)
    torch.testing.assert_close(bound, expected)
    err = (w - deq).abs()
    assert (err <= bound + _slack(w)).all(), float((err - bound).max())
    assert float((err / bound).max()) > 0.9


def test_rtn_random_error_shrinks_with_bits_and_groups():
    torch.manual_seed(1)
    w = torch.randn(128, 512)
    rel = {b: float((w - qz.rtn_quantize(w, b)).norm() / w.norm()) for b in BITS}
    assert all(rel[a] < rel[b] for a, b in zip(BITS, BITS[1:])), rel
    # each bit removed doubles the step: relative error about x2 per bit, x4 from int8 to int6
    assert 3 < rel[6] / rel[8] < 5 and rel[8] < 0.01
    assert qz.rtn_quantize(w, 4, 32).sub(w).norm() < qz.rtn_quantize(w, 4, 0).sub(w).norm()


def test_rtn_exact_cases():
    """Zero rows stay zero, constant rows and values already on the grid come back exactly."""
    w = torch.zeros(4, 48)
    w[1] = 0.37
    w[2] = -1.5
    w[3] = torch.arange(48) % 16 * 0.25  # every group of 16 holds the 16 levels of the 4-bit grid
    torch.testing.assert_close(qz.rtn_quantize(w, 4), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(qz.rtn_quantize(w, 4, 16), w, rtol=0, atol=1e-6)


def test_rtn_half_precision_and_bad_inputs():
    w = torch.randn(16, 64, dtype=torch.float16)
    deq = qz.rtn_quantize(w, 8)
    assert deq.dtype == torch.float16
    bound = qz.error_bound(w, 8) + 2 * float(w.abs().max()) * 2 ** -11  # + fp16 rounding of the result
    assert ((w.float() - deq.float()).abs() <= bound).all()
    with pytest.raises(ValueError):
        qz.rtn_quantize(torch.randn(3, 4, 5), 8)
    with pytest.raises(ValueError):
        qz.rtn_quantize(w, 0)
    with pytest.raises(ValueError, match="unknown --weight_quant"):
        qz.parse_method("rtn_int7")
    with pytest.raises(ValueError, match="quant_group_size"):
        qz.parse_method("rtn_int4", -1)
    assert qz.parse_method("none") is None
    assert qz.parse_method("awq_int4", 128) == qz.QuantSpec("awq_int4", "awq", 4, 128)


def test_awq_random_never_worse_and_helps_with_outlier_channels():
    """a = 0 is plain RTN, so the search never loses on ||(w - w_hat) diag(s)||_F; with a few
    high-activation channels it wins clearly, and its elementwise error obeys the scaled bound."""
    torch.manual_seed(2)
    w = torch.randn(64, 256)
    s = torch.rand(256) + 0.1
    s[torch.randperm(256)[:8]] *= 50
    deq, info = qz.awq_quantize(w, s, 4, 64)
    rtn = qz.rtn_quantize(w, 4, 64)
    weighted = lambda d: float(((w - d) * s).norm())  # noqa: E731
    assert info["act_err"] == pytest.approx(weighted(deq), rel=1e-4)
    assert info["act_err_rtn"] == pytest.approx(weighted(rtn), rel=1e-4)
    assert info["awq_exponent"] > 0 and weighted(deq) < 0.8 * weighted(rtn)
    sa = s ** info["awq_exponent"]
    bound = qz.error_bound(w * sa, 4, 64) / sa
    assert ((w - deq).abs() <= bound + _slack(w * sa) / sa).all()
    # uniform statistic: the search has nothing to exploit and returns RTN exactly
    deq_u, info_u = qz.awq_quantize(w, torch.ones(256), 4, 64)
    assert info_u["act_err"] == pytest.approx(info_u["act_err_rtn"])
    with pytest.raises(ValueError, match="unusable"):
        qz.awq_quantize(w, torch.full((256,), float("nan")), 4)


def _random_cur(m=96, n=160, ratio=0.6, seed=3) -> CURLinear:
    """CUR of a random full-rank Gaussian weight (a spectrum like a trained layer's, not low rank)."""
    torch.manual_seed(seed)
    lin = nn.Linear(n, m)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n) / n ** 0.5)
    return CURLinear.from_linear(lin, ratio)


def test_cur_input_stats_random_match_measured_for_independent_gaussian_channels():
    """For independent zero-mean Gaussian inputs the derivation is exact: R x and U R x are Gaussian
    and mean|.| = sqrt(2/pi) * rms, so s_U = sqrt(R^2 s^2) is the measured abs-mean of R x."""
    cur = _random_cur()
    torch.manual_seed(4)
    sigma = torch.rand(160) * 2 + 0.05
    x = torch.randn(40000, 160) * sigma
    s = x.abs().mean(0)
    est = qz.cur_input_stats(cur, s)
    with torch.no_grad():
        rx = x @ cur.R.T
        urx = rx @ cur.U.T
    torch.testing.assert_close(est["R"], s)
    torch.testing.assert_close(est["U"], rx.abs().mean(0), rtol=0.03, atol=0)
    torch.testing.assert_close(est["C"], urx.abs().mean(0), rtol=0.03, atol=0)


def test_int8_random_curlinear_output_bound():
    """Derived bound. C'U'R' - CUR = dC U R + C' dU R + C' U' dR, so for an input x
        ||dy|| <= ||E_C|| ||U R x|| + |C'| ||E_U|| ||R x|| + |C'U'| ||E_R|| ||x||          (per sample)
               <= (||E_C|| |U||R| + |C'| ||E_U|| |R| + |C'U'| ||E_R||) ||x||                 (a priori)
    with |.| spectral norms, ||E_P|| = Frobenius norm of the elementwise bound scale/2 (>= |dP|),
    |C'| <= |C| + ||E_C||, |C'U'| <= |CU| + ||E_C|| |U| + |C'| ||E_U||. Everything on the right is
    known before quantizing. Worst-case alignment makes it ~25-60x the typical change, so the actual
    int8 change is also checked against the measured ~1% (random rounding errors add in quadrature)."""
    cur = _random_cur()
    P = {name: getattr(cur, name).detach().clone() for name in qz.CUR_PARTS}
    E = {name: float(qz.error_bound(P[name], 8).norm()) for name in P}
    nrm = {name: float(torch.linalg.matrix_norm(P[name], 2)) for name in P}
    c_q = nrm["C"] + E["C"]
    cu_q = float(torch.linalg.matrix_norm(P["C"] @ P["U"], 2)) + E["C"] * nrm["U"] + c_q * E["U"]
    torch.manual_seed(5)
    x = torch.randn(256, 160)
    with torch.no_grad():
        rx = x @ P["R"].T
        urx = rx @ P["U"].T
        y = cur(x)
        for name in qz.CUR_PARTS:
            getattr(cur, name).copy_(qz.rtn_quantize(P[name], 8))
        dy = (cur(x) - y).norm(dim=1)
    per_sample = E["C"] * urx.norm(dim=1) + c_q * E["U"] * rx.norm(dim=1) + cu_q * E["R"] * x.norm(dim=1)
    a_priori = (E["C"] * nrm["U"] * nrm["R"] + c_q * E["U"] * nrm["R"] + cu_q * E["R"]) * x.norm(dim=1)
    assert (dy > 0).all()
    assert (dy <= per_sample * (1 + 1e-4)).all() and (per_sample <= a_priori * (1 + 1e-4)).all()
    y_norm = (y - cur.bias.detach()).norm(dim=1)
    assert float((per_sample / y_norm).max()) < 1.0  # bound itself is below the signal
    assert float((dy / y_norm).mean()) < 0.02         # measured ~0.010


@pytest.fixture
def tiny_cur_model(tiny_llama_dir):
    """Tiny random LLaMA with its q_proj and down_proj layers replaced by CURLinear."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for info in find_linears(model):
        if info.name.endswith(("q_proj", "down_proj")):
            setattr(info.parent, info.attr, CURLinear.from_linear(info.module, 0.6))
    return model


def test_quantize_model_random_tiny(tiny_cur_model):
    model = tiny_cur_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    emb = model.get_input_embeddings().weight.detach().clone()
    rep = qz.quantize_model(model, "rtn_int6", 16, include_lm_head=True)
    infos = find_linears(model, include_lm_head=True, types=(nn.Linear, CURLinear))
    assert sum(isinstance(i.module, CURLinear) for i in infos) == 4
    assert set(rep["layers"]) == {i.name for i in infos if i.name != "lm_head"}
    assert rep["skipped"] == {"lm_head": "weight tied to the input embeddings (left unquantized)"}
    assert rep["bits"] == 6 and rep["group_size"] == 16 and rep["simulated"]
    assert torch.equal(model.get_input_embeddings().weight, emb)
    n_changed = 0
    for info in infos:
        if info.name == "lm_head":
            continue
        names = qz.CUR_PARTS if isinstance(info.module, CURLinear) else ("weight",)
        for part in names:
            key = f"{info.name}.{part}"
            new, old = dict(model.named_parameters())[key], before[key]
            bound = qz.error_bound(old, 6, 16)
            assert ((new - old).abs() <= bound + _slack(old)).all(), key
            n_changed += int(not torch.equal(new, old))
    assert n_changed == 4 * 3 + (14 - 4)  # 4 CUR layers x 3 parts + 10 plain linears
    norms = [n for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in norms)
    assert 6 < rep["packed_bits_per_weight_estimate"] < 8


def test_quantize_model_random_awq_fallback_is_recorded(tiny_cur_model):
    infos = find_linears(tiny_cur_model, types=(nn.Linear, CURLinear))
    torch.manual_seed(6)
    scales = {i.name: torch.rand(i.module.in_features) + 0.1 for i in infos[1:]}  # first layer has none
    rep = qz.quantize_model(tiny_cur_model, "awq_int4", 16, scales)
    assert rep["fallbacks"] == {infos[0].name: "no usable activation statistic: plain RTN used"}
    assert not any("awq_exponent" in v for v in rep["layers"][infos[0].name].values())
    cur_name = next(i.name for i in infos[1:] if isinstance(i.module, CURLinear))
    assert set(rep["layers"][cur_name]) == {"R", "U", "C"}
    assert all("awq_exponent" in v for v in rep["layers"][cur_name].values())
    with pytest.raises(ValueError, match="act_aware"):
        qz.quantize_model(tiny_cur_model, "awq_int4", 16, None)


def test_quantize_model_random_awq_nonfinite_derived_stat_falls_back(tiny_cur_model):
    infos = find_linears(tiny_cur_model, types=(nn.Linear, CURLinear))
    cur = next(i for i in infos if isinstance(i.module, CURLinear))
    with torch.no_grad():
        cur.module.R[0, 0] = float("inf")  # R x (the input of U) has no finite statistic any more
    scales = {i.name: torch.rand(i.module.in_features) + 0.1 for i in infos}
    rep = qz.quantize_model(tiny_cur_model, "awq_int4", 16, scales)
    assert rep["fallbacks"] == {f"{cur.name}.U": "derived statistic not finite: plain RTN used",
                                f"{cur.name}.C": "derived statistic not finite: plain RTN used"}
    assert rep["non_finite_layers"] == [cur.name]


def test_pipeline_random_weight_quant_rtn_int8(tiny_llama_dir, tiny_text_file, tmp_path):
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8",
                     "--sensitivity_metric", "stable_rank", "--weight_quant", "rtn_int8", "--run_name", "q")
    assert acur.main(argv) == 0
    res = json.loads((tmp_path / "output" / "q.json").read_text())
    q = res["quantization"]
    assert (q["method"], q["bits"], q["group_size"], q["simulated"]) == ("rtn_int8", 8, 0, True)
    assert q["mean_rel_err"] < 0.01 and len(q["layers"]) == 14
    assert any(set(v) == {"R", "U", "C"} for v in q["layers"].values())
    assert "quantize" in res["timings"]
    assert math.isfinite(res["ppl"]["compressed"][f"text:{tiny_text_file}"])


def test_pipeline_random_awq_int4(tiny_llama_dir, tiny_text_file, tmp_path):
    args = acur.build_parser().parse_args(tiny_args(
        tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--act_aware",
        "--sensitivity_metric", "stable_rank", "--weight_quant", "awq_int4", "--quant_group_size", "32"))
    _, _, res = acur.run_pipeline(args)
    q = res["quantization"]
    assert (q["kind"], q["bits"], q["group_size"]) == ("awq", 4, 32) and not q["fallbacks"]
    assert q["awq_mean_exponent"] is not None
    assert qz.quantize_model(nn.Linear(2, 2), "none") == {"method": "none", "bits": None, "group_size": None}


@pytest.mark.parametrize("extra, msg", [
    (["--weight_quant", "awq_int4"], "needs --act_aware"),
    (["--weight_quant", "awq_int4", "--act_aware", "--scaling_method", "fisher"], "needs --act_aware"),
    (["--weight_quant", "rtn_int4", "--quant_group_size", "-8"], "quant_group_size must be >= 0"),
    (["--quant_group_size", "128"], "needs --weight_quant"),
])
def test_cli_quant_usage_errors(extra, msg, capsys):
    assert acur.main(["--model_id", "smollm2-135m", "--param_ratio_target", "0.9", *extra]) == 2
    assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        acur.build_parser().parse_args(["--model_id", "x", "--weight_quant", "rtn_int7"])


# --------------------------------------------------------------- real model
@pytest.mark.integration
def test_smollm2_ratio09_perplexity_by_bit_width(tmp_path):
    """SmolLM2, blocks 0-3 compressed to 0.9 with the fisher_error allocation (stable-rank allocation at 0.9
    gives perplexity in the millions, which makes a bit-width comparison meaningless; fisher_error is better
    than the ppl sensitivity here and a minute cheaper on a cold cache), then
    none / int8 / int6 / int4 g128 / awq int4 g128 on the same model (restored between variants); every
    decoder linear is quantized, compressed or not. Group 128, not 32: the weights come from Q4_1 blocks
    of 32, so 4-bit g32 would be lossless on the dense layers. Sensitivity and statistics are cached in
    the project cache (keys hold every input), so reruns skip them."""
    import datautils
    from evaluate_utils import evaluate_perplexity
    argv = ["--model_id", "smollm2-135m", "--act_aware", "--alpha", "0.5", "--param_ratio_target", "0.9",
            "--calib_dataset", "squad_wiki", "--n_calib_samples", "2", "--calib_seqlen", "128",
            "--sensitivity_metric", "fisher_error",
            "--sensitivity_ratios", "0.6,0.8,0.9", "--layer_filter", r"layers\.[0-3]\.",
            "--eval_ppl", "new_wiki", "--eval_seqlen", "512", "--eval_max_windows", "4", "--use_cache",
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path), "--eval_dense"]
    args = acur.build_parser().parse_args(argv)
    model, tok, res = acur.run_pipeline(args)
    assert 0.88 < res["param_ratio"]["reached"] <= 0.9
    # the pipeline's activation statistics come back from its cache (same key, same layer names)
    _, fp = datautils.resolve_model(args)
    fp.update(commit=res["model"]["commit"], dtype=res["model"]["dtype"])
    selected = [i for i in find_linears(model, types=(nn.Linear, CURLinear)) if re.search(args.layer_filter, i.name)]
    scales = acur.stage_scales(model, selected, None, args, fp)
    selected = {i.name for i in selected}
    scales = {k: v for k, v in scales.items() if k in selected}  # a cached superset may hold all 210
    assert len(scales) == 28
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ids = datautils.get_eval_ids("new_wiki", tok)
    ppl = {"dense": res["ppl"]["dense"]["new_wiki"], "none": res["ppl"]["compressed"]["new_wiki"]}
    reps = {}
    for label, method, g in [("int8", "rtn_int8", 0), ("int6", "rtn_int6", 0), ("int4 g128", "rtn_int4", 128),
                             ("awq int4 g128", "awq_int4", 128)]:
        model.load_state_dict(saved)
        reps[label] = qz.quantize_model(model, method, g, scales)
        ppl[label] = evaluate_perplexity(model, ids, 512, 1, 4, desc=label)
    model.load_state_dict(saved)
    print("\nFIGS SmolLM2 blocks 0-3 at ratio 0.9, perplexity (new_wiki, 4 x 512):", json.dumps(ppl))
    assert len(reps["int8"]["layers"]) == 210
    # statistics exist only for the 28 filtered layers: the other 182 fall back to RTN, recorded
    assert len(reps["awq int4 g128"]["fallbacks"]) == 210 - 28
    # measured (2-core CPU): dense 25.89, none 32.63, int8 32.77, int6 34.01, int4 g128 43.95, awq int4 g128 42.18
    # (with the ppl sensitivity: none 44.79, int8 44.64, int6 47.76, int4 g128 68.49, awq int4 g128 69.39)
    assert ppl["none"] < 2 * ppl["dense"]
    dev = {k: abs(math.log(ppl[k] / ppl["none"])) for k in ("int8", "int6", "int4 g128")}
    assert dev["int8"] < dev["int6"] < dev["int4 g128"]
    assert dev["int8"] < 0.015                               # measured 0.004
    assert dev["int6"] < 0.15                                # measured 0.042
    assert ppl["none"] < ppl["int4 g128"] < 2 * ppl["none"]  # measured x1.35
    assert ppl["awq int4 g128"] < 2 * ppl["none"]            # measured x1.29 (AWQ on 28 of 210 layers)
