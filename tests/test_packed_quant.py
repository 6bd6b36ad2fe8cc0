"""Real bytes for --weight_quant: packed storage (modules/packed_linear.py), the codes recovered from the simulated
model (quantization.codes_of / packed_twin), and exported repos that hold int8 / uint8 codes and load packed in a
FRESH Python process (no project on sys.path) with the logits and perplexity of the in-process simulated model.

Tiny random-initialised LLaMA (tests/conftest.py): the numbers mean nothing, the code paths are the real ones."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from torch import nn

import datautils
import quantization as qz
from conftest import ROOT, run_fresh_loader, tiny_args
from evaluate_utils import windows
from modules import packed_linear as pl
from modules.cur_linear import CURLinear
from modules.model_utils import find_linears, replace_module

sys.path.insert(0, str(ROOT / "huggingface_repos"))
import build_acur_repo as bar  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_blas_thread")
EVAL_SEQLEN, EVAL_WINDOWS = 64, 4


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Fallback warnings are once per process: forget the ones earlier tests raised."""
    pl._WARNED.clear()
    yield


def random_codes(rows: int, cols: int, bits: int, group_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = pl.n_groups(cols, group_size)
    q = torch.randint(0, 2 ** bits, (rows, cols), generator=g)
    z = torch.randint(0, 2 ** bits, (rows, groups), generator=g)
    s = torch.rand(rows, groups, generator=g) * 0.02 + 1e-3
    return q, z, s


# ---------------------------------------------------------------- storage and kernels
@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
@pytest.mark.parametrize("cols", [1, 7, 64])
def test_pack_codes_round_trip_and_dtypes(bits, cols):
    q, z, _ = random_codes(5, cols, bits, 0)
    qweight, qzero = pl.pack_codes(q, z, bits)
    if bits <= 4:  # two codes per byte
        assert qweight.dtype == torch.uint8 and qweight.shape == (5, (cols + 1) // 2) and qzero.dtype == torch.uint8
        assert torch.equal(pl.unpack_codes(qweight, bits, cols).long(), q)
    else:
        assert qweight.dtype == torch.int8 and qweight.shape == (5, cols) and qzero.dtype == torch.int8
        assert torch.equal(pl.unpack_codes(qweight, bits, cols).long() + 128, q)
    with pytest.raises(ValueError, match="codes outside"):
        pl.pack_codes(q + 2 ** bits, z, bits)


KERNEL_CASES = [  # bits, rows, cols, group size, expected backend
    (4, 100, 300, 32, "int4_tinygemm"), (4, 21, 21, 0, "int4_tinygemm"), (4, 64, 200, 128, "int4_tinygemm"),
    (3, 50, 70, 64, "int4_tinygemm"), (4, 40, 96, 96, "int4_tinygemm"),
    (8, 100, 320, 0, "int8_pack"), (8, 100, 300, 0, "int8_cast"), (6, 33, 17, 0, "int8_cast"),
    (8, 40, 96, 32, "dequant"), (4, 40, 100, 37, "dequant")]


@pytest.mark.parametrize("bits,rows,cols,group_size,backend", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_packed_matrix_kernel_equals_dequantized(bits, rows, cols, group_size, backend, dtype):
    """Every backend multiplies by (q - z) * scale: fp32 round-off in fp32, the dtype's round-off otherwise. Shapes
    that no kernel takes fall back to dequantizing, recorded and warned."""
    q, z, s = random_codes(rows, cols, bits, group_size, seed=rows + cols)
    m = pl.PackedMatrix(rows, cols, bits, group_size, dtype=torch.float32).set_codes(q, z, s)
    g = pl.group_width(cols, group_size)
    expected = ((q - z.repeat_interleave(g, 1)[:, :cols]) * s.repeat_interleave(g, 1)[:, :cols]).float()
    assert torch.equal(m.dequantized(), expected)
    x = torch.randn(2, 3, cols, generator=torch.Generator().manual_seed(1))
    ref = x @ expected.t()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = m(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 3, rows)
    assert m.backend == backend, m.fallback
    rel = float((y.float() - ref).norm() / ref.norm())
    assert rel < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype], rel
    fell_back = [w for w in caught if "dequantizing in every forward" in str(w.message)]
    assert bool(fell_back) == (backend == "dequant") == bool(m.fallback)


def test_packed_matrix_awq_scale_bias_and_rebuild_on_dtype_change():
    q, z, s = random_codes(24, 64, 4, 32)
    inv = torch.rand(64) + 0.5
    lin = pl.PackedLinear(64, 24, 4, 32, awq=True, bias=True).float()
    lin.set_codes(q, z, s, inv)
    with torch.no_grad():
        lin.bias.copy_(torch.randn(24))
    W = lin.dense_weight()
    torch.testing.assert_close(W, lin.dequantized() * inv)
    x = torch.randn(5, 64)
    torch.testing.assert_close(lin(x), x @ W.t() + lin.bias, rtol=1e-5, atol=1e-5)
    assert lin.backend == "int4_tinygemm" and lin.kernel_bytes() > 0
    lin.half()  # integer codes stay, scales and bias follow; the kernel is rebuilt for the new dtype
    assert lin.qweight.dtype == torch.uint8 and lin.qscale.dtype == torch.float16
    assert lin(x.half()).dtype == torch.float16 and lin._key[1] == torch.float16
    torch.testing.assert_close(lin(x.half()).float(), x @ W.t() + lin.bias.float(), rtol=5e-3, atol=5e-3)
    assert set(lin.state_dict()) == {"qweight", "qzero", "qscale", "qinv", "bias"}  # kernel copies are not saved
    with pytest.raises(ValueError, match="inv given"):
        pl.PackedMatrix(4, 8, 4).set_codes(*random_codes(4, 8, 4, 0), inv=torch.ones(8))


# ---------------------------------------------------------------- codes from the simulated model
def tiny_cur_model(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for info in find_linears(model)[:5]:  # some CUR layers, the others stay dense nn.Linear
        replace_module(info, CURLinear.from_linear(info.module, 0.8))
    stats = {i.name: torch.rand(i.module.in_features) + 0.1
             for i in find_linears(model, types=(nn.Linear, CURLinear))}
    return model.to(dtype), stats


@pytest.mark.parametrize("method,group_size", [("rtn_int8", 0), ("rtn_int4", 32), ("awq_int4", 32), ("awq_int8", 0),
                                               ("rtn_int6", 0), ("rtn_int4", 0)])
def test_packed_twin_recovers_codes_and_logits_in_process(method, group_size):
    """The simulated weight is exactly (q - z) * scale of the recorded grid (RTN: bit for bit), so to_packed gives
    a model whose logits equal the simulated model's to fp32 round-off."""
    model, stats = tiny_cur_model()
    qz.quantize_model(model, method, group_size, stats)
    mods = qz.quantized_modules(model)
    assert len(mods) == 14 and sum(isinstance(m, CURLinear) for m in mods.values()) == 5
    for mod in mods.values():
        twin, off = qz.packed_twin(mod)
        assert off < 1e-3  # fp32: the codes come back exactly
        if method.startswith("rtn"):
            if isinstance(mod, CURLinear):
                for p in "CUR":
                    assert torch.equal(getattr(twin, p).dequantized(), getattr(mod, p).data)
            else:
                assert torch.equal(twin.dequantized(), mod.weight.data)
        else:
            torch.testing.assert_close(twin.dense_weight(), mod.dense_weight() if isinstance(mod, CURLinear)
                                       else mod.weight.data, rtol=1e-5, atol=1e-7)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        rep = qz.to_packed(model)
        counts = pl.prepare_packed(model)
        out = model(ids).logits
    assert rep["layers"] == 14 and "dequant" not in counts, counts
    assert (out - ref).abs().max().item() < 1e-5


def test_codes_recovered_from_half_precision_simulation():
    """fp16 rounds the simulated weight by < 0.13 steps at 8 bits: the codes still come back exactly (checked with
    fp32 scales; an fp16 export also rounds the scales, round-off of the same size)."""
    model, stats = tiny_cur_model(torch.float16)
    qz.quantize_model(model, "rtn_int8", 0, stats)
    for mod in qz.quantized_modules(model).values():
        twin, off = qz.packed_twin(mod, torch.float32)
        assert off < 0.2
        parts = [(getattr(twin, p), getattr(mod, p)) for p in "CUR"] if isinstance(mod, CURLinear) else [(twin, mod.weight)]
        for packed, w in parts:
            assert torch.equal(packed.dequantized().half(), w.data)


# ---------------------------------------------------------------- exported repos, fresh process
CASES = [("rtn_int8", 0), ("rtn_int4", 32), ("awq_int4", 32)]

# fresh interpreter, no project on sys.path: load packed (fp32 and fp16), logits, perplexity, greedy tokens
CHILD = r"""
import math, sys, warnings, torch
from transformers import AutoModelForCausalLM
project = sys.argv[3]
assert not any(p and (p == project or (p.startswith(project + "/") and "site-packages" not in p))
               for p in sys.path), sys.path
jobs, out = torch.load(sys.argv[1]), {}
for repo, job in jobs.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            w = job["windows"]
            logits = model(w, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
            gen = model.generate(job["prompt"], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    packed = {n: type(m).__name__ for n, m in model.named_modules() if n in (model.config.packed_quant or {}).get("layers", {})}
    half = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.float16,
                                                device_map="auto").eval()
    with torch.no_grad():
        lh = half(job["windows"][:1], use_cache=False).logits.float()
    out[repo] = {"logits": logits, "ppl": math.exp(nll.item()), "gen": gen, "packed_types": packed,
                 "backends": getattr(model, "packed_backends", None), "half_backends": getattr(half, "packed_backends", None),
                 "buffer_dtypes": sorted({str(b.dtype) for n, b in model.named_buffers() if n.endswith("qweight")}),
                 "fallback_warnings": [str(x.message) for x in caught if "dequantiz" in str(x.message)],
                 "half_max_diff": (lh - logits[:1]).abs().max().item(), "half_finite": bool(lh.isfinite().all()),
                 "class_module": type(model).__module__}
out["modules"] = sorted(n for n in sys.modules if n.split(".")[0] in ("acur", "modules", "quantization", "build_acur_repo"))
torch.save(out, sys.argv[2])
"""


def case_id(case) -> str:
    return f"{case[0]}-g{case[1]}"


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tiny_text_file, tmp_path_factory):
    """Every case exported packed (and rtn_int8 also as floats, --save_simulated_quant), all reloaded in one fresh
    process: {case id: (in-process facts, child facts)}."""
    tmp = tmp_path_factory.mktemp("packed_export")
    prompt = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(3))
    local, jobs = {}, {}
    for case in CASES + [("rtn_int8", 0, "float")]:  # ratio 0.9: 3 of the 14 linears stay dense (packed too)
        method, group_size = case[:2]
        cid = case_id(case) + ("-float" if len(case) > 2 else "")
        repo = tmp / cid
        argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp / f"work-{cid}", "--act_aware", "--param_ratio_target",
                         "0.9", "--sensitivity_metric", "stable_rank", "--eval_seqlen", str(EVAL_SEQLEN),
                         "--eval_max_windows", str(EVAL_WINDOWS), "--weight_quant", method, "--repo_dir", str(repo),
                         *(["--quant_group_size", str(group_size)] if group_size else []),
                         *(["--save_simulated_quant"] if len(case) > 2 else []))
        _, model, tok, res = bar.build_repo(bar.build_parser().parse_args(argv))
        ids = datautils.get_eval_ids(f"text:{tiny_text_file}", tok)
        w = windows(ids, EVAL_SEQLEN, EVAL_WINDOWS)
        model.float().eval()
        with torch.no_grad():
            logits = model(w, use_cache=False).logits.float()
            gen = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        local[cid] = {"repo": repo, "res": res, "logits": logits, "gen": gen,
                      "quantized": sorted(qz.quantized_modules(model))}
        jobs[str(repo)] = {"windows": w, "prompt": prompt}
    child = run_fresh_loader(CHILD, jobs, tmp)
    return {k: (v, child[str(v["repo"])]) for k, v in local.items()}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_packed_export_files_hold_integer_codes(case, exported):
    """The safetensors hold int8 / uint8 codes (no float copy of any quantized matrix, no dense weight of a
    compressed layer) and are smaller than the float export of the same model."""
    from safetensors import safe_open
    local, _ = exported[case_id(case)]
    repo, res = local["repo"], local["res"]
    cfg = json.loads((repo / "config.json").read_text())
    pq = cfg["packed_quant"]
    assert pq["format"] == pl.PACKED_FORMAT and pq["bits"] == int(case[0][-1]) and pq["group_size"] == case[1]
    assert sorted(pq["layers"]) == local["quantized"]
    assert any(set(v["parts"]) == {"W"} for v in pq["layers"].values())  # dense linears are packed too
    code_dtype = torch.int8 if pq["bits"] > 4 else torch.uint8
    with safe_open(str(repo / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name, layer in pq["layers"].items():
            assert f"{name}.weight" not in keys and not {f"{name}.{p}" for p in "CUR"} & keys
            for part, spec in layer["parts"].items():
                pre = f"{name}." if part == "W" else f"{name}.{part}."
                assert f.get_tensor(pre + "qweight").dtype == code_dtype
                assert f.get_tensor(pre + "qzero").dtype == code_dtype
                assert f.get_tensor(pre + "qscale").dtype == torch.float32
                assert (pre + "qinv" in keys) == spec["awq"]
        if case[0].startswith("awq"):
            assert any(k.endswith(".qinv") for k in keys)
    sizes = res["export"]["sizes"]
    files = sizes["files"]
    assert files["dense_weights_of_compressed_layers"] == []
    assert files["by_kind"]["packed_codes"] > 0 and files["by_kind"]["factors"] == 0  # LLaMA: no biases
    float_sizes = exported["rtn_int8-g0-float"][0]["res"]["export"]["sizes"]
    assert sizes["compressed_weight_bytes"] < float_sizes["compressed_weight_bytes"] < sizes["dense_checkpoint_bytes"]
    # the compressed layers' share shrinks by the bit width (scales and zeros on top)
    quant_bytes = files["by_kind"]["packed_codes"] + files["by_kind"]["packed_scales"]
    assert quant_bytes < float_sizes["files"]["by_kind"]["factors"] * (0.42 if pq["bits"] == 8 else 0.3)
    card = (repo / "README.md").read_text()
    assert "stored packed" in card and bar.size_line(sizes) in card and "no compressed layer keeps a dense weight" in card
    assert "simulated (quantize-dequantize; exported" in (exported["rtn_int8-g0-float"][0]["repo"] / "README.md").read_text()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_packed_export_fresh_process_equals_simulation(case, exported):
    """Loaded packed, run on torch's int8 / int4 kernels (no dequantize fallback on CPU for these shapes): logits,
    perplexity and greedy tokens of the in-process simulated model, to fp32 round-off."""
    local, child = exported[case_id(case)]
    assert child["class_module"].startswith("transformers_modules")
    diff = (child["logits"] - local["logits"]).abs().max().item()
    assert diff < 1e-4, diff
    ppl = next(iter(local["res"]["ppl"]["compressed"].values()))  # what the pipeline measured (simulated)
    assert child["ppl"] == pytest.approx(ppl, rel=1e-5), (child["ppl"], ppl)
    assert torch.equal(child["gen"], local["gen"])
    assert set(child["packed_types"].values()) == {"PackedCURLinear", "PackedLinear"}
    expected = {"int4_tinygemm"} if case[0].endswith("int4") else {"int8_pack", "int8_cast"}
    assert set(child["backends"]) <= expected and set(child["half_backends"]) <= expected, child
    assert child["fallback_warnings"] == []
    assert child["buffer_dtypes"] == ["torch.int8" if case[0].endswith("int8") else "torch.uint8"]
    assert child["half_finite"] and child["half_max_diff"] < 0.5  # fp16 kernels, same model


def test_packed_export_float_copy_still_loads(exported):
    """--save_simulated_quant keeps the research path: floats in the files, the same logits."""
    local, child = exported["rtn_int8-g0-float"]
    assert json.loads((local["repo"] / "config.json").read_text()).get("packed_quant") is None
    assert child["backends"] is None and (child["logits"] - local["logits"]).abs().max().item() < 1e-4


def test_packed_fallback_is_loud():
    """A group size no kernel takes (40: tinygemm groups are multiples of 32): prepare_packed warns, counts the
    fallback in model.packed_backends, and the model still computes the simulated logits."""
    model, stats = tiny_cur_model()
    qz.quantize_model(model, "rtn_int4", 40, stats)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        qz.to_packed(model)
        with pytest.warns(RuntimeWarning, match="dequantize in every forward"):
            counts = pl.prepare_packed(model)
        out = model(ids).logits
    assert counts.get("dequant", 0) > 0 and model.packed_backends == counts
    assert (out - ref).abs().max().item() < 1e-5


def test_packed_export_refuses_kv_mode(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--compress_kv_cache", "--kv_cache_ratio_target", "0.5",
                     "--weight_quant", "rtn_int8", "--repo_dir", str(tmp_path / "kv"))
    assert bar.main(argv) == 2
    assert "--save_simulated_quant" in capsys.readouterr().err


def test_bench_packed_smoke(capsys):
    """tools/bench_packed.py end to end on CPU: packed smaller than simulated, same perplexity, kernels named."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_packed
    rep = bench_packed.run(bench_packed.build_parser().parse_args(
        ["--device", "cpu", "--shape", "tiny-llama", "--decode_tokens", "2", "--decode_batches", "1", "--reps", "1",
         "--ppl_windows", "1", "--ppl_seqlen", "32", "--prompt_len", "4", "--quant", "rtn_int8:0,rtn_int4:32",
         "--layer_tokens", "1"]))
    bench_packed.print_report(rep)
    m = rep["models"]
    for tag in ("rtn_int8", "rtn_int4_g32"):
        sim, packed = m[f"{tag} simulated"], m[f"{tag} packed"]
        assert packed["disk_mib"] < 0.6 * sim["disk_mib"] and packed["ppl_rel_diff_vs_simulated"] < 1e-5
        assert "dequant" not in packed["kernels"] and packed["max_logit_diff_vs_simulated"] < 1e-4
    assert "one layer, device us per call" in capsys.readouterr().out


@pytest.mark.integration
def test_smollm2_packed_equals_simulated(smollm2):
    """The real SmolLM2, every linear quantized (the quantized dense baseline acur.py builds at
    --param_ratio_target 1 with --weight_quant), int4 g128 and int8: the packed model's perplexity equals the
    simulated one's to fp32 round-off, on tinygemm / int8pack. (Quantized directly, not through run_pipeline:
    at ratio 1 the pipeline adds nothing but a stable-rank table, and this is the suite's slowest real test.)"""
    import copy
    base, tok = smollm2
    w = windows(datautils.get_eval_ids("new_wiki", tok), 64, 1)
    for method, group_size, backend in (("rtn_int4", 128, "int4_tinygemm"), ("rtn_int8", 0, "int8_pack")):
        model = copy.deepcopy(base)  # the session's model stays unquantized
        assert len(qz.quantize_model(model, method, group_size)["layers"]) == 210
        with torch.no_grad():
            ref = model(w, use_cache=False).logits
            assert qz.to_packed(model)["layers"] == 210
            assert pl.prepare_packed(model) == {backend: 210}
            out = model(w, use_cache=False).logits
        nll = [nn.functional.cross_entropy(x[0, :-1], w[0, 1:]).item() for x in (ref, out)]
        print(f"\nFIGS packed {method}: nll {nll[0]:.7f} vs {nll[1]:.7f} (diff {abs(nll[1] - nll[0]):.2e}), "
              f"max |logit diff| {(out - ref).abs().max().item():.2e}")
        assert abs(nll[1] - nll[0]) < 1e-5 and (out - ref).abs().max().item() < 1e-3, (nll, method)
        del model


def test_int8_backend_order_follows_the_device():
    """int8pack first on the CPU (its fast kernel), the cast first on CUDA, where torch's int8pack kernel
    measured 25x slower than the dense layer (experiments/measured/h200_bench_packed_llama-1b.txt)."""
    m = pl.PackedMatrix(8, 32, 8, 0, dtype=torch.float32)
    assert m._candidates(torch.device("cpu")) == ["int8_pack", "int8_cast", "dequant"]
    assert m._candidates(torch.device("cuda")) == ["int8_cast", "int8_pack", "dequant"]
    assert pl.PackedMatrix(8, 32, 4, 0, dtype=torch.float32)._candidates(torch.device("cuda"))[0] == "int4_tinygemm"
