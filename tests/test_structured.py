"""Structured CUR math (modules/structured.py) on small matrices with known answers, on every device."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from modules import structured as st

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _data(n_tokens: int, n: int, m: int, device: str, seed: int = 0):
    """(activations X (N x n) with unequal channel scales and correlations, weight W (m x n), C = X^T X / N)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * 0.3 + torch.eye(n, dtype=torch.float64)
    X = (torch.randn(n_tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, n, dtype=torch.float64)) @ mix
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return X.to(device), W.to(device), (X.T @ X / n_tokens).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_keeping_every_channel_reproduces_the_weight(device):
    _, W, C = _data(200, 12, 7, device)
    Wf = W.float()  # any dtype in, fp64 out, on the input's device
    out = st.refit(Wf, C, torch.arange(12, device=device))
    assert out.device.type == device and out.dtype == torch.float64
    torch.testing.assert_close(out, Wf.double(), rtol=0, atol=1e-10)
    assert abs(st.refit_error(W, C, torch.arange(12))) < 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_refit_is_the_least_squares_map_from_the_kept_activations(device):
    X, W, C = _data(300, 10, 6, device)
    kept = torch.tensor([0, 3, 4, 8], device=device)
    Y = X @ W.T
    lstsq = torch.linalg.lstsq(X[:, kept].cpu(), Y.cpu()).solution.T.to(device)
    torch.testing.assert_close(st.refit(W, C, kept), lstsq, rtol=1e-8, atol=1e-10)
    resid = float((Y - X[:, kept] @ lstsq.T).pow(2).sum()) / X.shape[0]
    assert st.refit_error(W, C, kept) == pytest.approx(resid, rel=1e-8)
    g = torch.rand(6, dtype=torch.float64, device=device) + 0.1  # outputs weighted by the loss's sensitivity
    weighted = float(((Y - X[:, kept] @ lstsq.T).pow(2) * g).sum()) / X.shape[0]
    assert st.refit_error(W, C, kept, row_weight=g) == pytest.approx(weighted, rel=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_refit_with_a_target_maps_the_compressed_activations_to_the_dense_output(device):
    """Sequential mode: h~ (what the compressed model feeds the block) is regressed onto W h (the dense output)."""
    X, W, _ = _data(400, 9, 5, device)
    Xc = X + 0.1 * torch.randn(X.shape, generator=torch.Generator().manual_seed(3), dtype=X.dtype).to(device)
    C, T = Xc.T @ Xc / 400, X.T @ Xc / 400  # E[h~ h~^T], E[h h~^T]
    kept = torch.tensor([1, 2, 5, 6, 7], device=device)
    lstsq = torch.linalg.lstsq(Xc[:, kept].cpu(), (X @ W.T).cpu()).solution.T.to(device)
    torch.testing.assert_close(st.refit(W, C, kept, T), lstsq, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_target", [False, True])
def test_intercept_refit_is_the_least_squares_fit_on_kept_activations_and_a_constant(device, with_target):
    """Channels with nonzero means (one removed channel's mean is large): the refit of the centred moments plus
    intercept() is torch.linalg.lstsq on [h~_S, 1]; its error is the centred refit_error and is below the one
    without intercept, which cannot restore the removed channel's mean output."""
    X, W, _ = _data(500, 10, 6, device)
    X = X + torch.linspace(-1.0, 2.0, 10, dtype=X.dtype, device=device)
    X[:, 7] += 5.0                                  # removed below: its mean output W[:, 7] * 5 is lost without b
    Xc = X + 0.1 * torch.randn(X.shape, generator=torch.Generator().manual_seed(4), dtype=X.dtype).to(device) + 0.3
    if not with_target:
        Xc = X
    N = X.shape[0]
    C, T = Xc.T @ Xc / N, X.T @ Xc / N             # E[h~ h~^T], E[h h~^T]
    mean, mean_d = Xc.mean(0), X.mean(0)
    kept = torch.tensor([0, 2, 3, 5, 9], device=device)
    Sc = st.centered(C, mean)
    target = st.centered(T, mean_d, mean) if with_target else None
    Wk = st.refit(W, Sc, kept, target)
    b = st.intercept(W, Wk, kept, mean, mean_d if with_target else None)
    assert Wk.device.type == b.device.type == device and b.shape == (6,)
    design = torch.cat([Xc[:, kept], torch.ones(N, 1, dtype=X.dtype, device=device)], 1)
    Y = X @ W.T
    sol = torch.linalg.lstsq(design.cpu(), Y.cpu()).solution.T.to(device)  # (m, |S| + 1): [W', b]
    torch.testing.assert_close(Wk, sol[:, :-1], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(b, sol[:, -1], rtol=1e-8, atol=1e-9)
    err = float((Y - design @ sol.T).pow(2).sum()) / N
    assert float((Y - Xc[:, kept] @ Wk.T - b).pow(2).sum()) / N == pytest.approx(err, rel=1e-8)
    if not with_target:
        assert st.refit_error(W, Sc, kept) == pytest.approx(err, rel=1e-8)
    plain = torch.linalg.lstsq(Xc[:, kept].cpu(), Y.cpu()).solution.T.to(device)
    assert err < 0.8 * float((Y - Xc[:, kept] @ plain.T).pow(2).sum()) / N


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("selection", st.SELECTIONS)
def test_exactly_k_active_neurons_are_found_and_cost_nothing(device, selection):
    n, k = 16, 5
    X, W, _ = _data(300, n, 8, device)
    active = torch.tensor([1, 4, 9, 10, 15], device=device)
    X[:, [j for j in range(n) if j not in active.tolist()]] = 0  # the other neurons never fire
    C = X.T @ X / 300
    lam = 1e-6 * float(C.diagonal().mean())
    Cd = C + lam * torch.eye(n, dtype=C.dtype, device=device)  # damped, as the stage passes it
    kept = st.select(W, Cd, k, selection=selection, lam=lam, raw_cov=C)
    assert kept.device.type == device and torch.equal(kept, active)
    Y = X @ W.T
    resid = Y - X[:, kept] @ st.refit(W, Cd, kept).T
    assert float(resid.abs().max()) < 1e-9 * float(Y.abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_errors_are_the_refit_errors_of_the_kept_sets(device):
    _, W, C = _data(400, 20, 9, device)
    g = torch.rand(9, dtype=torch.float64, device=device) + 0.2
    removed, err = st.greedy_removal(W, C, 15, row_weight=g, block=4)  # several lazy batches
    assert removed.device.type == device and len(set(removed.tolist())) == 15 and err.shape == (16,)
    for t in (1, 4, 7, 15):
        mask = torch.ones(20, dtype=torch.bool, device=device)
        mask[removed[:t]] = False
        exact = st.refit_error(W, C, torch.nonzero(mask).flatten(), row_weight=g)
        assert float(err[t]) == pytest.approx(exact, rel=1e-8, abs=1e-12)
    assert bool((err[1:] >= err[:-1] - 1e-12).all())  # removing more never helps
    torch.testing.assert_close(st.removal_curve(W, C, removed, row_weight=g), err, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_step_is_the_cheapest_removal_and_batching_changes_nothing(device):
    _, W, C = _data(300, 10, 6, device, seed=4)
    removed, err = st.greedy_removal(W, C, 3)
    costs = [st.refit_error(W, C, torch.tensor([i for i in range(10) if i != j])) for j in range(10)]
    assert int(removed[0]) == min(range(10), key=costs.__getitem__)  # brute force agrees on the first step
    best2 = min(itertools.combinations(range(10), 2), key=lambda r: st.refit_error(
        W, C, torch.tensor([i for i in range(10) if i not in r])))
    assert float(err[2]) >= st.refit_error(W, C, torch.tensor([i for i in range(10) if i not in best2])) - 1e-12
    r1, e1 = st.greedy_removal(W, C, 9, block=1)
    r64, e64 = st.greedy_removal(W, C, 9, block=64)
    rg, eg = st.greedy_removal(W, C, 9, groups=st.channel_groups(10, 1, device).flip(0))  # reversed, size-1 groups
    assert torch.equal(r1, r64) and torch.equal(9 - rg, r1)
    torch.testing.assert_close(e1, e64)
    torch.testing.assert_close(eg, e1)


@pytest.mark.parametrize("device", DEVICES)
def test_group_removal_matches_brute_force_and_its_curve(device):
    """KV groups of 2 query heads (head_dim 3): whole groups are dropped, each step the cheapest."""
    q, kv = st.kv_group_channels(4, 2, 3, device)
    assert q.shape == (4, 6) and kv.shape == (4, 3) and q[1].tolist() == list(range(6, 12)) and kv[2].tolist() == [6, 7, 8]
    _, W, C = _data(500, 24, 7, device, seed=2)
    removed, err = st.greedy_removal(W, C, 3, groups=q)
    costs = [st.refit_error(W, C, q[[i for i in range(4) if i != j]].flatten()) for j in range(4)]
    assert int(removed[0]) == min(range(4), key=costs.__getitem__)
    assert float(err[1]) == pytest.approx(min(costs), rel=1e-8)
    for t in (2, 3):
        rest = q[[i for i in range(4) if i not in removed[:t].tolist()]].flatten()
        assert float(err[t]) == pytest.approx(st.refit_error(W, C, rest), rel=1e-8)
    torch.testing.assert_close(st.removal_curve(W, C, removed, q), err, rtol=1e-8, atol=1e-12)
    kept = st.select(W, C, 2, groups=q)
    assert sorted(kept.tolist() + removed[:2].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("device", DEVICES)
def test_ridge_leverage_known_answer(device):
    c = torch.tensor([4.0, 1.0, 0.25, 9.0], dtype=torch.float64, device=device)
    lev = st.ridge_leverage(torch.diag(c), 1.0)
    torch.testing.assert_close(lev, c / (c + 1.0))  # diagonal C: c / (c + lam)
    assert st.leverage_removal(torch.diag(c), 2, 1.0).tolist() == [2, 1]  # least leverage goes first
    groups = torch.tensor([[0, 2], [1, 3]], device=device)  # group 0: 0.8 + 0.2, group 1: 0.5 + 0.9
    assert st.leverage_removal(torch.diag(c), 1, 1.0, groups).tolist() == [0]


# ---------------------------------------------------------------- the model walk (structured.py) on tiny random models
import acur  # noqa: E402
import structured  # noqa: E402
from conftest import tiny_args  # noqa: E402


def _run(model_dir, text, tmp, *extra):
    args = acur.build_parser().parse_args(tiny_args(model_dir, text, tmp, "--dtype", "float32", *extra))
    return acur.run_pipeline(args)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _calib_ids(model_dir, text, n=4, seqlen=64):
    from transformers import AutoTokenizer
    import datautils
    return datautils.get_calib_data(f"text:{text}", AutoTokenizer.from_pretrained(model_dir), n, seqlen, seed=0)


@pytest.mark.parametrize("family,method,layer_filter,target", [
    ("llama", "structured", "self_attn", 0.5),   # attention only: one of the two KV groups per block
    ("llama", "neurons", None, 0.6),
    ("llama", "structured", None, 0.45),
    ("qwen2", "structured", None, 0.5),          # q/k/v biases sliced with their rows
    ("opt", "neurons", None, 0.6),               # fc1 / fc2, ffn_dim
])
def test_uniform_widths_give_a_stock_model_whose_config_reloads(family, method, layer_filter, target, tiny_llama_dir,
                                                                 tiny_qwen2_dir, tiny_opt_dir, tiny_text_file, tmp_path):
    from transformers import AutoModelForCausalLM
    model_dir = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "opt": tiny_opt_dir}[family]
    dense_cls = type(AutoModelForCausalLM.from_pretrained(model_dir))
    extra = ("--layer_filter", layer_filter) if layer_filter else ()
    model, _, res = _run(model_dir, tiny_text_file, tmp_path, "--method", method, "--param_ratio_target", str(target),
                         "--structured_widths", "uniform", *extra)
    assert type(model) is dense_cls and all(type(m) is torch.nn.Linear for m in model.modules()
                                            if isinstance(m, torch.nn.Linear))
    assert res["param_ratio"]["reached"] <= target and res["param_ratio"]["reached"] > target - 0.1
    widths = res["structured"]["widths"]
    assert len({json.dumps(w, sort_keys=True) for w in widths.values()}) == 1  # the same in every block
    w = next(iter(widths.values()))
    cfg = model.config
    if "intermediate_size" in w:
        assert getattr(cfg, "intermediate_size", getattr(cfg, "ffn_dim", None)) == w["intermediate_size"] < 128
    if "num_key_value_heads" in w:
        assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim) == \
               (w["num_key_value_heads"], w["num_attention_heads"], 16)
    if layer_filter:
        assert w == {"num_key_value_heads": 1, "num_attention_heads": 2}
    ids = _calib_ids(model_dir, tiny_text_file)
    before = _logits(model, ids)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert type(reloaded) is dense_cls
    torch.testing.assert_close(_logits(reloaded, ids), before, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) == res["model"]["params_compressed"]


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_per_layer_widths_run_and_stay_within_the_target(family, tiny_llama_dir, tiny_opt_dir, tiny_qwen2_dir,
                                                         tiny_text_file, tmp_path):
    model_dir = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "opt": tiny_opt_dir}[family]
    model, _, res = _run(model_dir, tiny_text_file, tmp_path, "--method", "structured", "--param_ratio_target", "0.5")
    assert 0.45 < res["param_ratio"]["reached"] <= 0.5
    assert all(math.isfinite(v) for v in res["ppl"]["compressed"].values())
    on_disk = json.loads(open(res["output_file"]).read())
    assert on_disk["structured"]["widths_mode"] == "per_layer" and set(on_disk["structured"]["widths"]) == {"0", "1"}
    for unit, kept in on_disk["structured"]["kept_groups"].items():  # the kept groups are the model's widths
        attn = model.get_submodule(unit)
        if unit.endswith("self_attn"):
            d = attn.head_dim
            heads = len(kept) * (attn.num_key_value_groups if family != "opt" else 1)
            assert attn.q_proj.out_features == heads * d and attn.k_proj.out_features == len(kept) * d * (
                1 if family != "opt" else 1)
            if family == "opt":
                assert attn.num_heads == len(kept)
        else:
            assert (attn.down_proj if family != "opt" else attn.fc2).in_features == len(kept)


def test_per_layer_beats_uniform_on_the_calibration_loss(tiny_llama_dir, tiny_text_file, tmp_path):
    """Block 0's MLP made nearly silent: per_layer takes its neurons, uniform cuts both MLPs alike."""
    from transformers import AutoModelForCausalLM
    from evaluate_utils import perplexity_of_windows
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.02)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m").joinpath("tokenizer.json").write_bytes((tiny_llama_dir / "tokenizer.json").read_bytes())
    for f in tiny_llama_dir.glob("*token*"):
        (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    ids = _calib_ids(tmp_path / "m", tiny_text_file)
    ppl = {}
    for mode in structured.WIDTH_MODES:
        model, _, res = _run(tmp_path / "m", tiny_text_file, tmp_path, "--method", "neurons", "--param_ratio_target",
                             "0.6", "--structured_widths", mode)
        assert res["param_ratio"]["reached"] <= 0.6
        ppl[mode] = perplexity_of_windows(model, ids, 2, desc=None)
        widths = [w["intermediate_size"] for w in res["structured"]["widths"].values()]
        assert (widths[0] < widths[1]) if mode == "per_layer" else widths[0] == widths[1]
    assert ppl["per_layer"] <= ppl["uniform"]


def test_keeping_every_group_reproduces_the_dense_logits(tiny_llama_dir, tiny_text_file):
    from transformers import AutoModelForCausalLM
    from act_aware_utils import input_covariances
    from modules import registry
    from modules.model_utils import find_linears
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = _calib_ids(tiny_llama_dir, tiny_text_file)
    dense = _logits(model, ids)
    linears = find_linears(model)
    covs = input_covariances(model, linears, ids, 2)
    units = structured.find_units(model, linears, "structured")
    assert [u.kind for u in units] == ["mlp", "attn"] * 2
    for u in units:
        kept = structured.fit_unit(u, u.n_groups, covs[u.output.name], None, ids.numel(), None,
                                   registry.get("structured"), "greedy", 0.01)
        assert kept == list(range(u.n_groups))
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-4, atol=1e-4)


def test_table_keys_give_back_their_kept_counts():
    for n in (3, 128, 1536, 11008):
        assert all(structured._keep_of_key(float(structured._key(k, n)), n) == k for k in range(1, n + 1))


def test_whole_kv_groups_round_and_say_so(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    from modules.model_utils import find_linears
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    linears = find_linears(model)
    units = structured.find_units(model, linears, "structured")
    attn = units[1]
    assert (attn.n_groups, attn.heads_per_group) == (2, 2)  # 4 query heads in 2 KV groups
    widths, notes = structured.widths_of_ratios(units, {attn.output.name: 0.75})  # 3 of 4 query heads
    assert widths[attn.name] == 1 and len(notes) == 1 and "whole KV groups" in notes[0]
    assert attn.params(2) == sum(i.module.weight.numel() for i in attn.linears())  # a group's count is exact
    with pytest.raises(ValueError, match="all of .*mlp.*or none"):
        structured.find_units(model, [i for i in linears if not i.name.endswith("up_proj")], "neurons")
    assert [u.kind for u in structured.find_units(model, linears, "neurons")] == ["mlp", "mlp"]


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_unknown_block_layouts_fail_in_one_line(family, tmp_path, tiny_llama_dir, tiny_text_file, capsys):
    """GPT-2 (Conv1D, transformer.h) and Phi-3 (fused qkv_proj / gate_up_proj) stop before calibration."""
    from transformers import AutoModelForCausalLM, GPT2Config, Phi3Config
    cfg = (GPT2Config(vocab_size=320, n_embd=32, n_layer=1, n_head=2) if family == "gpt2" else
           Phi3Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, pad_token_id=0))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    for f in tiny_llama_dir.glob("*token*"):
        (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    capsys.readouterr()
    rc = acur.main(tiny_args(tmp_path / "m", tiny_text_file, tmp_path, "--method", "structured",
                             "--param_ratio_target", "0.8"))
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "it/s]" not in x]  # (progress bars aside)
    assert rc == 2 and len(err) == 1 and err[0].startswith("acur.py: error:")
    assert ("layers" in err[0]) if family == "gpt2" else ("knows LLaMA" in err[0])


def test_compare_restores_the_dense_model_between_structured_cells(tiny_llama_dir, tiny_text_file, tmp_path):
    """tools/compare.py runs structured cells on one loaded model: each starts from the dense model again."""
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "tools"))
    import compare
    flags = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--dtype", "float32", "--sensitivity_metric",
                      "fisher_error")
    _, specs, ratios, base = compare.parse_grid(["--methods", "structured,structured:structured_widths=uniform,srid",
                                                 "--ratios", "0.7,0.5", "--"] + flags)
    res = compare.run_grid(base, specs, ratios, dense=True)
    cells = {(c["method"], c["target"]): c for c in res["cells"]}
    assert all(c["reached"] <= c["target"] for c in res["cells"])
    for spec, mode in (("structured", "per_layer"), ("srid", None)):  # the same as a run of its own
        extra = ("--structured_widths", mode) if mode else ()
        _, _, alone = _run(tiny_llama_dir, tiny_text_file, tmp_path, "--method", spec, "--param_ratio_target", "0.5",
                           "--sensitivity_metric", "fisher_error", *extra)
        assert cells[spec, 0.5]["ppl"] == pytest.approx(alone["ppl"]["compressed"], rel=1e-6)


@pytest.mark.parametrize("flags", [{"sequential": False}, {"fisher": False, "shrink": False}, {"correct": True}])
def test_ablations_of_structured_run(flags, tiny_llama_dir, tiny_text_file, tmp_path):
    """compare.py's ablation flags (registry.variant): fitted on the dense statistics, unweighted picks, the
    dense-output target."""
    from modules import registry
    name = registry.variant("structured", **flags).name
    model, _, res = _run(tiny_llama_dir, tiny_text_file, tmp_path, "--method", name, "--param_ratio_target", "0.6")
    assert res["param_ratio"]["reached"] <= 0.6 and all(math.isfinite(v) for v in res["ppl"]["compressed"].values())
    assert res["structured"]["widths"]


@pytest.mark.parametrize("family,method,layer_filter,target", [("llama", "neurons", None, 0.6),
                                                               ("llama", "structured", "self_attn", 0.5),
                                                               ("opt", "neurons", None, 0.6)])
def test_intercept_model_reloads_in_stock_transformers(family, method, layer_filter, target, tiny_llama_dir,
                                                       tiny_opt_dir, tiny_text_file, tmp_path):
    """bias=1: the refitted down_proj (and o_proj) carry the intercept; LLaMA's config gets mlp_bias /
    attention_bias (every other bias zero), OPT's fc2 had one already: the saved model reloads through
    the stock class, no remote code, with the same logits."""
    from transformers import AutoModelForCausalLM
    from modules import registry
    model_dir = {"llama": tiny_llama_dir, "opt": tiny_opt_dir}[family]
    dense_cls = type(AutoModelForCausalLM.from_pretrained(model_dir))
    name = registry.variant(method, bias=True).name
    extra = ("--layer_filter", layer_filter) if layer_filter else ()
    model, _, res = _run(model_dir, tiny_text_file, tmp_path, "--method", name, "--param_ratio_target", str(target),
                         "--structured_widths", "uniform", *extra)
    assert not res["fallbacks"] and res["param_ratio"]["reached"] <= target
    blocks = model.model.layers if family == "llama" else model.model.decoder.layers
    attn = layer_filter == "self_attn"
    last = [b.self_attn.o_proj if attn else b.mlp.down_proj if family == "llama" else b.fc2 for b in blocks]
    assert all(m.bias is not None and float(m.bias.detach().abs().max()) > 0 for m in last)
    if family == "llama":
        assert (model.config.mlp_bias, model.config.attention_bias) == (not attn, attn)
        zero = [b.self_attn.q_proj if attn else b.mlp.gate_proj for b in blocks]
        assert all(float(m.bias.detach().abs().max()) == 0 for m in zero)
    ids = _calib_ids(model_dir, tiny_text_file)
    before = _logits(model, ids)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "auto_map" not in saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert type(reloaded) is dense_cls
    torch.testing.assert_close(_logits(reloaded, ids), before, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_intercept_falls_back_loudly_where_the_config_cannot_carry_it(tiny_qwen2_dir, tiny_text_file, tmp_path, capsys):
    """Qwen2 builds o_proj and down_proj without bias whatever its config says: no intercept, a WARNING and a
    fallback in the results per refitted layer; the model still reloads."""
    from transformers import AutoModelForCausalLM
    from modules import registry
    model, _, res = _run(tiny_qwen2_dir, tiny_text_file, tmp_path, "--method", registry.variant("structured", bias=True).name,
                         "--param_ratio_target", "0.5", "--structured_widths", "uniform")
    assert res["fallbacks"] and all("no intercept" in v for v in res["fallbacks"].values())
    assert "WARNING" in capsys.readouterr().out
    assert all(b.mlp.down_proj.bias is None and b.self_attn.o_proj.bias is None for b in model.model.layers)
    ids = _calib_ids(tiny_qwen2_dir, tiny_text_file)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def test_intercept_lowers_the_calibration_output_error(tiny_llama_dir, tiny_text_file):
    """Block 0's MLP cut to half its neurons on the tiny LLaMA's calibration activations (shifted so they have
    a mean to lose): the output error of down_proj with the intercept is below the one without."""
    import copy
    from transformers import AutoModelForCausalLM
    from modules import registry
    from modules.model_utils import find_linears
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = _calib_ids(tiny_llama_dir, tiny_text_file)
    mlp = model.model.layers[0].mlp
    got = []
    handle = mlp.down_proj.register_forward_pre_hook(lambda _m, inp: got.append(inp[0].reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    h = torch.cat(got).double() + 0.05  # SiLU-gated activations of a random model are nearly centred
    y = h @ mlp.down_proj.weight.detach().double().T
    errors = {}
    for bias in (False, True):
        m = copy.deepcopy(model)
        unit = structured.find_units(m, find_linears(m), "neurons")[0]
        structured.fit_unit(unit, unit.n_groups // 2, h.T @ h / len(h), None, len(h), None, registry.get("neurons"),
                            "greedy", 0.01, h.mean(0) if bias else None)
        sliced = m.model.layers[0].mlp
        assert sliced.down_proj.in_features == unit.n_groups // 2 and (sliced.down_proj.bias is not None) == bias
        cols = [int(torch.nonzero((mlp.gate_proj.weight == row).all(1))[0]) for row in sliced.gate_proj.weight]
        out = h[:, cols] @ sliced.down_proj.weight.detach().double().T
        if bias:
            out = out + sliced.down_proj.bias.detach().double()
        errors[bias] = float((y - out).pow(2).sum(1).mean())
    assert errors[True] < 0.98 * errors[False]
