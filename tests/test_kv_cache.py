"""Low-rank KV cache (modules/kv_cache.py), acur.py's KV mode, tools/bench_kv.py.

Fast tests use the tiny random-initialised LLaMA/OPT checkpoints of conftest (random weights: the
numbers mean nothing, the code paths are the real ones); the SmolLM2 test is marked integration."""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import acur
import binary_search
import datautils
from conftest import tiny_args
import kv_compress
from modules import kv_cache as kv
from modules import kv_ranks
from modules.cur_linear import CURLinear
from modules.model_utils import find_linears
from modules.runtime_text import runtime_source

LOGIT_ATOL = 1e-4  # fp32 tiny models: cached decode vs full no-cache forward (measured < 1e-6)


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def kv_compressed(model_dir, fraction=0.5, dense_first_k=True):
    """Tiny model with every k/v projection at `fraction` of its width (block 0's K left dense, to
    cover a block mixing a dense and a low-rank side), low-rank cache enabled."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    linears = [i for i in find_linears(model) if kv_ranks.is_kv_linear(i.name)]
    fr = {i.name: fraction for i in linears}
    if dense_first_k:
        fr[linears[0].name] = 1.0
    kv_compress.compress_kv_linears(linears, fr, None, 0.5, {"rank_align": 1}, desc=None)
    assert kv.enable_lowrank_kv_cache(model) == list(range(model.config.num_hidden_layers))
    return model


def padded_batch(model, seed=0):
    """Two prompts, the first left-padded by 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_random_lowrank_cache_generate_matches_no_cache_run(family, tiny_llama_dir, tiny_opt_dir, monkeypatch):
    model = kv_compressed(tiny_llama_dir if family == "llama" else tiny_opt_dir)
    assert not any(m.training for m in model.modules())  # the wrappers follow the model's eval mode
    absorbed = []  # decode steps must take the path that never rebuilds V
    real = kv.LowRankKVAttention._absorbed_attention
    monkeypatch.setattr(kv.LowRankKVAttention, "_absorbed_attention",
                        lambda self, *a: absorbed.append(self.layer_idx) or real(self, *a))
    ids, mask = padded_batch(model)
    n_new, pad = 10, model.config.pad_token_id or 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
        seq = out.sequences
        full_mask = torch.cat([mask, torch.ones(2, n_new, dtype=mask.dtype)], 1)
        kw = {}
        if family == "llama":  # the positions generate() derives from the mask
            kw["position_ids"] = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
        ref = model(seq, attention_mask=full_mask, use_cache=False, **kw).logits[:, ids.shape[1] - 1:-1]
    got = torch.stack(out.logits, 1)
    assert len(absorbed) == (n_new - 1) * model.config.num_hidden_layers  # every step after the prefill
    assert torch.equal(ref.argmax(-1), seq[:, ids.shape[1]:])  # same greedy tokens
    assert (got - ref).abs().max().item() < LOGIT_ATOL

    # the cache of that run really held latents: (b, 1, s, rank) per low-rank side (+ positions for RoPE)
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    for i, (layer, block) in enumerate(zip(cache.layers, model.model.layers if family == "llama"
                                           else model.model.decoder.layers)):
        attn = block.self_attn
        assert isinstance(layer, kv.LowRankKVLayer)
        assert layer.values.shape == (2, 1, 12, attn.v_proj.rank)
        if i == 0:  # dense K side: the usual (b, kv heads, s, head_dim), no positions
            assert layer.keys.shape[1] > 1 and layer.keys.shape[-1] == attn.head_dim and layer.positions is None
        else:
            assert layer.keys.shape == (2, 1, 12, attn.k_proj.rank)
            assert (layer.positions is not None) == (family == "llama")

    # and the tokens equal those of transformers' own attention + K/V cache on the same compressed weights
    with torch.no_grad():
        kv.disable_lowrank_kv_cache(model)
        stock = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                               do_sample=False, pad_token_id=pad)
    assert torch.equal(stock, seq)


def test_random_lowrank_cache_beam_search_and_eager_match_stock(tiny_llama_dir):
    """Beam search reorders the cache (positions included); eager attention takes the same paths."""
    model = kv_compressed(tiny_llama_dir, 0.4)
    ids, mask = padded_batch(model, seed=1)
    with torch.no_grad():
        for impl in ("sdpa", "eager"):
            model.config._attn_implementation = impl
            kv.enable_lowrank_kv_cache(model)
            ours = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
            kv.disable_lowrank_kv_cache(model)
            stock = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
            assert torch.equal(ours, stock), impl


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_random_measured_cache_bytes_equal_expected_at_chosen_ranks(family, tiny_llama_dir, tiny_opt_dir):
    model = kv_compressed(tiny_llama_dir if family == "llama" else tiny_opt_dir, 0.3)
    blocks = model.model.layers if family == "llama" else model.model.decoder.layers
    # expected by hand from the ranks: 4 bytes (fp32) per cached dim, + an int32 position per low-rank K (RoPE)
    by_hand = 0
    for i, block in enumerate(blocks):
        a = block.self_attn
        k_dims = a.k_proj.out_features if i == 0 else a.k_proj.rank
        by_hand += 4 * (k_dims + a.v_proj.rank) + (4 if family == "llama" and i > 0 else 0)
    exp = kv_compress.kv_bytes_per_token(model)
    assert exp["compressed"] == by_hand
    assert exp["dense"] == 4 * sum(b.self_attn.k_proj.out_features + b.self_attn.v_proj.out_features for b in blocks)
    ids = torch.randint(3, model.config.vocab_size, (3, 17))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        assert kv.cache_nbytes(out.past_key_values) == 3 * 17 * by_hand
        model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)  # one decode step
        assert kv.cache_nbytes(out.past_key_values) == 3 * 18 * by_hand
        kv.disable_lowrank_kv_cache(model)  # transformers' own cache holds full K and V
        assert kv.cache_nbytes(model(ids, use_cache=True).past_key_values) == 3 * 17 * exp["dense"]


def test_random_kv_search_reaches_target_and_refuses_unreachable():
    shapes = {f"l{i}.k_proj": (64, 128) for i in range(4)} | {f"l{i}.v_proj": (64, 128) for i in range(4)}
    g = torch.Generator().manual_seed(0)
    table = {n: {f"{f:.4g}": float(torch.rand(1, generator=g)) * (1 - f) for f in kv_ranks.KV_RANK_FRACTIONS}
             for n in shapes}
    for target in (0.95, 0.7, 0.5, 0.2):
        fr = binary_search.search_kv_ratio(table, shapes, target)
        reached = binary_search.kv_reached_ratio(fr, shapes)
        assert target - 1 / 64 <= reached <= target  # within one rank of one layer below the target
    with pytest.raises(ValueError, match="below what the candidate"):
        binary_search.search_kv_ratio(table, shapes, 0.01)
    assert kv_ranks.kv_rank(64, 128, 0.5) == 32 and kv_ranks.kv_rank(64, 128, 0.5, rank_align=8) == 32
    assert kv_ranks.kv_rank(64, 128, 0.01) == 1 and kv_ranks.kv_cached_dims(64, 128, 1.0) == 64


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_random_acur_kv_mode_end_to_end(family, tiny_llama_dir, tiny_opt_dir, tiny_text_file, tmp_path, monkeypatch):
    model_dir = tiny_llama_dir if family == "llama" else tiny_opt_dir
    metric = "ppl" if family == "llama" else "spectral"  # stable_rank: export and SmolLM2 tests
    argv = tiny_args(model_dir, tiny_text_file, tmp_path, "--act_aware", "--compress_kv_cache",
                     "--kv_cache_ratio_target", "0.5", "--sensitivity_metric", metric, "--use_cache",
                     "--kv_rank_fractions", "0.1,0.3,0.5,0.7,0.9")
    model, tok, res = acur.run_pipeline(acur.build_parser().parse_args(argv))
    assert set(res["layers"]) == {i.name for i in find_linears(model, types=(torch.nn.Linear, CURLinear))
                                  if kv_ranks.is_kv_linear(i.name)}
    curs = [i for i in find_linears(model, types=(torch.nn.Linear, CURLinear)) if isinstance(i.module, CURLinear)]
    assert curs and all(kv_ranks.is_kv_linear(i.name) for i in curs)
    k = res["kv_cache"]
    dims = sum(r["shape"][0] for r in res["layers"].values())
    assert 0.5 - 16 / dims <= k["reached"] <= 0.5 and k["ratio_target"] == 0.5
    assert k["reached"] == sum(r["cached_dims"] for r in res["layers"].values()) / dims
    assert k["bytes_per_token_compressed"] < 0.6 * k["bytes_per_token_dense"]
    assert all(math.isfinite(v) for v in res["ppl"]["compressed"].values())
    on_disk = json.loads(open(res["output_file"]).read())
    assert on_disk["kv_cache"] == k and "_kv0.5" in res["output_file"]
    # the returned model generates with the low-rank cache, which holds the expected bytes
    ids = tok("the model compresses", return_tensors="pt").input_ids
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert kv.cache_nbytes(cache) == ids.shape[1] * k["bytes_per_token_compressed"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4

    # second run: the KV sensitivity (its own cache file) is reused, nothing recomputed, same ranks
    import sensitivity
    monkeypatch.setattr(sensitivity.BlockRunner, "__init__", lambda *a, **kw: pytest.fail("KV sensitivity recomputed"))
    monkeypatch.setattr(torch.linalg, "svdvals", lambda *a, **kw: pytest.fail("KV sensitivity recomputed"))
    _, _, res2 = acur.run_pipeline(acur.build_parser().parse_args(argv))
    assert res2["sensitivity"]["from_cache"] == len(res["layers"]) and res2["sensitivity"]["computed"] == 0
    assert f"sensitivity_kv_{metric}" in res2["sensitivity"]["cache"]
    assert {n: r["rank"] for n, r in res2["layers"].items()} == {n: r["rank"] for n, r in res["layers"].items()}


def test_random_kv_spectral_sensitivity_is_the_svd_tail_at_kv_ranks(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    linears = [i for i in find_linears(model) if kv_ranks.is_kv_linear(i.name)]
    scales = {i.name: torch.rand(i.module.in_features, generator=torch.Generator().manual_seed(3)) + 0.1
              for i in linears}
    table = kv_compress.kv_sensitivity_spectral(linears, [0.25, 0.5, 0.75], scales, 0.5)
    info = linears[1]
    s = torch.linalg.svdvals((info.module.weight.detach() * (scales[info.name] ** 0.5 + 1e-6)).double()).pow(2)
    m, n = info.module.weight.shape
    for f in (0.25, 0.5, 0.75):
        k = kv_ranks.kv_rank(m, n, f)
        assert table[info.name][f"{f:.4g}"] == pytest.approx(float(s[k:].sum() / s.sum()), rel=1e-6)
    assert all(row["0.25"] > row["0.5"] > row["0.75"] >= 0 for row in table.values())


@pytest.mark.parametrize("extra, message", [
    (["--compress_kv_cache", "--kv_cache_ratio_target", "0.5", "--ppl_target", "30"], "--ppl_target is not supported"),
    (["--kv_cache_ratio_target", "0.5", "--param_ratio_target", "0.9"], "needs --compress_kv_cache"),
    (["--compress_kv_cache"], "needs --kv_cache_ratio_target"),
    (["--compress_kv_cache", "--kv_cache_ratio_target", "0"], "must be in (0, 1]"),
    (["--compress_kv_cache", "--kv_cache_ratio_target", "0.5", "--param_ratio_target", "0.9"], "drop --param_ratio_target"),
    (["--compress_kv_cache", "--kv_cache_ratio_target", "0.5", "--kv_rank_fractions", "0.5,1.2"], "--kv_rank_fractions"),
    (["--compress_kv_cache", "--kv_cache_ratio_target", "0.5", "--method", "svd"], "needs --method acur"),
])
def test_kv_mode_usage_errors(extra, message, tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    assert acur.main(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_runtime_section_is_self_contained():
    """The code exported repos get imports only torch/transformers and provides the entry points."""
    src = runtime_source(kv)
    assert "from modules" not in src and "import acur" not in src and "sensitivity" not in src
    ns: dict = {"__name__": "exported_kv_cache"}
    exec(compile(src, "acur_kv_cache.py", "exec"), ns)
    assert {"enable_lowrank_kv_cache", "LowRankKVAttention", "LowRankKVLayer", "cache_nbytes"} <= set(ns)



def _imported_modules(path) -> set[str]:
    import ast
    tree = ast.parse(Path(path).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add(node.module or "")
    return out


def test_kv_runtime_file_imports_no_pipeline():
    """modules/kv_cache.py is the runtime only: the pipeline part (sensitivity, evaluation) is kv_compress.py."""
    imported = _imported_modules(kv.__file__)
    assert not imported & {"sensitivity", "evaluate_utils", "acur", "kv_compress", "binary_search"}, imported
    assert not any(m.startswith("modules") for m in imported), imported
    assert {"kv_sensitivity_ppl", "compress_kv_linears", "kv_bytes_per_token", "check_kv_support"} <= set(vars(kv_compress))
    assert not {"kv_sensitivity_ppl", "compress_kv_linears", "kv_rank"} & set(vars(kv))


def test_search_counts_kv_dims_without_transformers():
    """binary_search (and the KV rank arithmetic it uses) imports neither transformers nor the KV runtime."""
    import subprocess
    import sys
    from conftest import ROOT
    code = ("import sys, binary_search; from modules import kv_ranks; "
            "bad = [m for m in ('transformers', 'modules.kv_cache') if m in sys.modules]; "
            "r = binary_search.kv_reached_ratio({'a.k_proj': 0.5}, {'a.k_proj': (64, 128), 'a.v_proj': (64, 128)}); "
            "print(bad, r, kv_ranks.kv_cached_dims(64, 128, 0.5))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "0.75", "32"]

def test_random_bench_kv_measures_expected_bytes(capsys):
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("bench_kv", ROOT / "tools" / "bench_kv.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(bench.build_parser().parse_args(["--shape", "tiny", "--ratios", "1,0.5", "--context", "32",
                                                      "--new_tokens", "3", "--device", "cpu"]))
    assert [r["ratio"] for r in rows] == [1.0, 0.5]
    for r in rows:
        assert r["bytes_per_token_measured"] == r["bytes_per_token_expected"] and r["decode_tok_s"] > 0
    assert rows[1]["bytes_per_token_measured"] < 0.6 * rows[0]["bytes_per_token_measured"]
    assert "| KV ratio |" in capsys.readouterr().out
    assert bench.main(["--shape", "tiny", "--ratios", "0.5,2"]) == 2


# measured on this machine (fp32, new_wiki, 2 windows of 512, stable_rank KV sensitivity, 2x128 calibration,
# --u_mode act_weighted); dense SmolLM2 on the same windows: see SMOLLM2_DENSE_PPL
SMOLLM2_DENSE_PPL = 24.77
SMOLLM2_KV_PPL = {0.9: 26.97, 0.7: 84.68, 0.5: 314.58}


@pytest.mark.integration
def test_smollm2_kv_mode_perplexity_and_cache(smollm2_dir, tmp_path):
    """acur.py's KV-mode stages on the real model, loaded once for the three targets."""
    dense_bytes = 30 * (192 + 192) * 4  # 30 blocks, K and V of 3 KV heads x 64, fp32
    args = acur.build_parser().parse_args([
        "--model_id", "smollm2-135m", "--act_aware", "--alpha", "0.5", "--scaling_method", "abs_mean",
        "--compress_kv_cache", "--kv_cache_ratio_target", "0.9", "--u_mode", "act_weighted",
        "--calib_dataset", "squad_wiki", "--n_calib_samples", "2", "--calib_seqlen", "128",
        "--sensitivity_metric", "stable_rank", "--eval_ppl", "new_wiki", "--eval_seqlen", "512",
        "--eval_max_windows", "2", "--cache_dir", str(tmp_path / "cache")])
    acur.validate_args(args)
    model, tok, fp = acur.load_model(args)
    linears = acur.select_linears(model, args)
    assert len(linears) == 60 and all(kv_ranks.is_kv_linear(i.name) for i in linears)
    calib = datautils.get_calib_data(args.calib_dataset, tok, 2, 128, args.seed, False)
    scales = acur.stage_scales(model, linears, calib, args, fp)
    table, _ = acur.stage_sensitivity(model, linears, calib, scales, args, fp)
    originals = {i.name: i.module for i in linears}
    dense_ppl = acur.stage_eval(model, tok, args, "dense")["new_wiki"]
    measured = {}
    for target in (0.9, 0.7, 0.5):
        args.kv_cache_ratio_target = target
        fractions, _ = acur.stage_search(model, linears, calib, scales, table, args)
        acur.compress_model(linears, fractions, scales, args, desc=None)
        k = acur.stage_kv_cache(model, args)
        measured[target] = ppl = acur.stage_eval(model, tok, args, "kv")["new_wiki"]
        print(f"KV ratio {target}: reached {k['reached']:.4f}, ppl {ppl:.2f} (dense {dense_ppl:.2f}), "
              f"bytes/token {k['bytes_per_token_dense']} -> {k['bytes_per_token_compressed']}")
        assert k["bytes_per_token_dense"] == dense_bytes
        assert target - 0.01 <= k["reached"] <= target
        # cached dims x 4 bytes, + one int32 position per block whose K is low-rank (RoPE after rebuilding)
        assert k["bytes_per_token_compressed"] == k["dims_cached"] * 4 + k["bytes_per_token_positions"]
        assert k["bytes_per_token_positions"] <= 30 * 4
        if SMOLLM2_KV_PPL[target] is not None:
            assert dense_ppl < ppl <= 1.25 * SMOLLM2_KV_PPL[target]
        if target != 0.5:
            kv.disable_lowrank_kv_cache(model)
            acur.restore_model(linears, originals)
    print(f"\nFIGS kv dense {dense_ppl:.4f}, " + ", ".join(f"{t}: {v:.4f}" for t, v in measured.items()))
    if SMOLLM2_DENSE_PPL is not None:
        assert dense_ppl == pytest.approx(SMOLLM2_DENSE_PPL, rel=1e-3)
    # real weights: the low-rank cache's greedy decode equals the no-cache run of the same model
    ids = tok("The capital of France is a city that", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        ref = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1:-1]
    assert torch.equal(ref.argmax(-1), out.sequences[:, ids.shape[1]:])
    # fp32 over 30 blocks; the decode step sums (P Z) C^T where the no-cache run sums P (Z C^T): measured
    # max |difference| 1.2e-3 on logits of magnitude ~10 (about 1e-4 relative)
    assert (torch.stack(out.logits, 1) - ref).abs().max().item() < 5e-3


# fresh interpreter, outside the project: load each exported repo, decode with its cache, report what it held
EXPORT_CHILD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
out = {}
for repo in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        cache = model(ids, use_cache=True).past_key_values
    blocks = model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers
    out[repo] = {"seq": gen.sequences, "logits": torch.stack(gen.logits, 1),
                 "attn": sorted({type(b.self_attn).__name__ for b in blocks}),
                 "attn_module": type(blocks[0].self_attn).__module__, "layer": type(cache.layers[-1]).__name__,
                 "keys": tuple(cache.layers[-1].keys.shape), "values": tuple(cache.layers[-1].values.shape),
                 "nbytes": sum(t.numel() * t.element_size() for l in cache.layers
                               for t in (l.keys, l.values, getattr(l, "positions", None)) if t is not None)}
out["project_imported"] = any(m in sys.modules for m in ("acur", "modules", "modules.kv_cache"))
torch.save(out, sys.argv[2])
"""


def test_random_export_round_trip_keeps_lowrank_cache(tiny_llama_dir, tiny_opt_dir, tiny_text_file, tmp_path):
    """KV-mode LLaMA and OPT repos from build_acur_repo.py reload (fresh process, no project on the path) with
    the low-rank cache and decode exactly like the in-memory model."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "huggingface_repos"))
    import build_acur_repo as bar
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    expected = {}
    for family, model_dir in (("llama", tiny_llama_dir), ("opt", tiny_opt_dir)):
        repo = tmp_path / f"repo_{family}"
        argv = tiny_args(model_dir, tiny_text_file, tmp_path / family, "--act_aware", "--compress_kv_cache",
                         "--kv_cache_ratio_target", "0.5", "--sensitivity_metric", "stable_rank",
                         "--eval_ppl", "none", "--repo_dir", str(repo))
        _, model, tok, res = bar.build_repo(bar.build_parser().parse_args(argv))
        cfg = json.loads((repo / "config.json").read_text())
        assert cfg["lowrank_kv_cache"] is True and cfg["acur"]["kv_cache"]["reached"] == res["kv_cache"]["reached"]
        assert (repo / "acur_kv_cache.py").read_text() == runtime_source(kv)
        assert "bytes per token" in (repo / "README.md").read_text()
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        last = (model.model.decoder.layers if family == "opt" else model.model.layers)[-1].self_attn
        expected[str(repo)] = (ref, last.k_proj.rank, last.v_proj.rank, res["kv_cache"]["bytes_per_token_compressed"])
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"),
                           *expected], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(tmp_path / "out.pt")
    assert not child["project_imported"]
    for repo, (ref, k_rank, v_rank, bpt) in expected.items():
        c = child[repo]
        assert c["attn_module"].startswith("transformers_modules")
        assert c["attn"] == ["LowRankKVAttention"] and c["layer"] == "LowRankKVLayer"
        assert c["keys"] == (1, 1, 9, k_rank) and c["values"] == (1, 1, 9, v_rank)
        assert c["nbytes"] == 9 * bpt
        assert torch.equal(c["seq"], ref.sequences)
        assert (c["logits"] - torch.stack(ref.logits, 1)).abs().max().item() < 1e-4
