"""Every method, option and stage on every available device: CPU always, CUDA when present (CI has no GPU;
run this file on a GPU machine to prove the CUDA side). A tensor left on the wrong device fails here."""
import math

import pytest
import torch
from torch import nn

import acur
from act_aware_utils import input_covariances, output_fisher, sequential_calibration
from conftest import tiny_args
from modules import decompositions as dec, registry
from modules.low_rank_linear import LayerStats, compress_linear
from modules.model_utils import find_linears, replace_module

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _stats(n: int, seed: int = 0) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, n, generator=g) * torch.linspace(0.2, 3.0, n)
    return LayerStats(scale=x.abs().mean(0), cov=(x.T @ x / x.shape[0]), cross=(x.T @ (x + 0.05) / x.shape[0]),
                      row_weight=torch.rand(24, generator=g) + 0.1, n_tokens=x.shape[0])


COMBOS = [(m, s, u) for m in registry.METHODS if registry.get(m).per_linear for s in (registry.SELECTIONS if registry.get(m).form == "cur" else ("topk",))
          for u in (registry.U_MODES if registry.get(m).form == "cur" else ("pinv",))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method,selection,u_mode", COMBOS)
def test_compress_linear_every_method_option_on_device(device, method, selection, u_mode):
    torch.manual_seed(1)
    lin = nn.Linear(40, 24, bias=True).to(device)
    st = _stats(40)  # statistics stay on the CPU, as caches load them: methods must move them
    gen = torch.Generator().manual_seed(0)
    mod = compress_linear(lin, 0.6, method, scale=st.scale, cov=st.cov, selection=selection, u_mode=u_mode,
                          generator=gen, stats=st)
    assert all(p.device.type == device for p in list(mod.parameters()) + list(mod.buffers()))
    x = torch.randn(5, 40, device=device)
    y = mod(x)
    assert y.shape == (5, 24) and torch.isfinite(y).all()
    assert mod.param_count() <= 0.6 * 40 * 24
    # a real approximation: the output error is below the dense output's energy
    err = (mod.dense_weight().float() - lin.weight).norm() / lin.weight.norm()
    assert err < 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_pivoted_cholesky_residual_is_the_row_id_output_error_on_device(device):
    torch.manual_seed(0)
    W = torch.randn(12, 8, dtype=torch.float64, device=device)
    x = torch.randn(500, 8, dtype=torch.float64, device=device)
    cov = x.T @ x / 500
    order, res = dec.row_error_curve(W, 6, cov)
    assert order.device.type == device and res.device.type == device
    for k in (1, 3, 6):
        f = dec.row_id(W, k, cov, order)
        approx = W.clone()
        approx[f.others] = f.Z @ f.R
        err = float((((W - approx) @ cov) * (W - approx)).sum())
        assert math.isclose(float(res[k]), err, rel_tol=1e-8, abs_tol=1e-10)
    assert float(res[0]) == pytest.approx(float(((W @ cov) * W).sum()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,rank,k", [(200, 200, 150), (130, 40, 130), (64, 64, 64)])
def test_pivoted_cholesky_graph_equals_eager_and_cpu(device, m, rank, k):
    """The CUDA-graph block replay gives the picks and residuals of the kernels issued one by one, and of
    the CPU (rank-deficient Grams included: past the rank the lowest unpicked indices follow)."""
    g = torch.Generator().manual_seed(m + k)
    A = torch.randn(rank, m, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2.0, m, dtype=torch.float64)
    G = A.T @ A
    o_cpu, r_cpu = dec.pivoted_cholesky(G, k)
    for graph in (True, False):
        o, r = dec.pivoted_cholesky(G.to(device), k, cuda_graph=graph)
        assert o.device.type == device
        assert torch.equal(o.cpu(), o_cpu)
        torch.testing.assert_close(r.cpu(), r_cpu, rtol=1e-9, atol=1e-9 * float(r_cpu[0]))
    assert len(set(o_cpu.tolist())) == k  # distinct picks
    o2, r2 = dec.pivoted_cholesky(G.to(device), k)  # a second Gram of the same shape reuses the cached graph
    assert torch.equal(o2.cpu(), o_cpu)
    if device == "cuda":  # the cached graphs hold their fp64 Gram on the GPU until released
        held = torch.cuda.memory_allocated()
        dec.release_pick_graphs()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= held - m * m * 8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_output_fisher_with_checkpointed_blocks_equals_full_backward(device, family, tiny_llama_dir, tiny_opt_dir,
                                                                      tiny_text_file):
    """Recomputing blocks in the backward (the memory saving) changes no fisher value, and the blocks'
    forward is restored afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import datautils
    path = tiny_llama_dir if family == "llama" else tiny_opt_dir
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    ids = datautils.get_calib_data(f"text:{tiny_text_file}", AutoTokenizer.from_pretrained(path), 3, 32, seed=0)
    linears = find_linears(model)
    calls = []
    probe = linears[0].module.register_forward_hook(lambda *a: calls.append(1))
    full = output_fisher(model, linears, ids, 1, checkpoint=False)
    n_full = len(calls)
    ckpt = output_fisher(model, linears, ids, 1, checkpoint=True)
    probe.remove()
    assert n_full == 3 and len(calls) - n_full == 6  # the block really ran again in each backward
    assert full.keys() == ckpt.keys() and len(full) == len(linears)
    for name in full:
        assert float(full[name].sum()) > 0
        torch.testing.assert_close(ckpt[name], full[name], rtol=1e-5, atol=1e-12)
    from modules.model_utils import decoder_parts
    assert all("forward" not in vars(layer) for layer in decoder_parts(model).layers)


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_model_stages_on_device(device, tiny_llama_dir, tiny_text_file, tmp_path):
    """Calibration statistics, output fisher and sequential calibration keep every tensor on the device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import datautils
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = datautils.get_calib_data(f"text:{tiny_text_file}", tok, 4, 32, seed=0)
    linears = find_linears(model)
    covs = input_covariances(model, linears, ids, 2)
    fisher = output_fisher(model, linears, ids, 2)
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in fisher.values())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # weights untouched
    fitted = []

    def fit(group, measured):
        for info in group:
            m = measured[info.name]
            assert m["cov"].device.type == device and m["cross"].shape == m["cov"].shape
            st = LayerStats(cov=m["cov"], cross=m["cross"], n_tokens=m["n_tokens"], row_weight=fisher[info.name])
            replace_module(info, compress_linear(info.module, 0.7, "srid", stats=st))
            fitted.append(info.name)

    sequential_calibration(model, linears, ids, 2, fit)
    assert fitted == [i.name for i in linears]  # every linear, in execution order
    out = model(ids[:1].to(device)).logits
    assert torch.isfinite(out).all() and covs


@pytest.mark.parametrize("device", DEVICES)
def test_sequential_without_the_dense_stream_fits_the_same_srid(device, tiny_llama_dir, tiny_text_file):
    """srid reads no cross term: the compressed stream alone (no dense block copy, half the passes) gives
    bit-identical factors to the two-stream run, and hands the fit no cross statistic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import datautils
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = datautils.get_calib_data(f"text:{tiny_text_file}", tok, 4, 32, seed=0)
    runs = []
    for cross in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).to(device).eval()
        linears = find_linears(model)
        seen = []

        def fit(group, measured):
            for info in group:
                m = measured[info.name]
                seen.append(m["cross"] is not None)
                st = LayerStats(cov=m["cov"], cross=m["cross"], n_tokens=m["n_tokens"])
                replace_module(info, compress_linear(info.module, 0.7, "srid", stats=st))
        sequential_calibration(model, linears, ids, 2, fit, cross=cross)
        assert seen and all(x == cross for x in seen)
        runs.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(registry.METHODS))
def test_tiny_pipeline_every_method_on_device(device, method, tiny_llama_dir, tiny_text_file, tmp_path):
    """Sensitivity (fisher_error), search, compression and evaluation, per method, on the device."""
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--act_aware",
                     "--method", method, "--sensitivity_metric", "fisher_error", "--device", device,
                     "--dtype", "float32")
    _, _, res = acur.run_pipeline(acur.build_parser().parse_args(argv))
    assert 0.75 <= res["param_ratio"]["reached"] <= 0.8
    assert all(math.isfinite(v) for v in res["ppl"]["compressed"].values())


def test_kv_mode_with_fisher_error_reaches_the_kv_target(tiny_llama_dir, tiny_text_file, tmp_path):
    """KV-cache mode on the closed-form sensitivity: the allocation spends the cached-dims budget."""
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--compress_kv_cache", "--kv_cache_ratio_target",
                     "0.5", "--act_aware", "--sensitivity_metric", "fisher_error")
    _, _, res = acur.run_pipeline(acur.build_parser().parse_args(argv))
    assert 0.4 <= res["kv_cache"]["reached"] <= 0.5
    assert set(res["layers"]) and all(n.rsplit(".", 1)[1] in ("k_proj", "v_proj") for n in res["layers"])
    assert all(math.isfinite(v) for v in res["ppl"]["compressed"].values())
