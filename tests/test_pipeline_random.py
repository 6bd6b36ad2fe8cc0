"""acur.py end to end on tiny random-initialised LLaMA and OPT checkpoints (random weights: the numbers
mean nothing, the code paths are the real ones)."""
import json
import math

import pytest
import torch

import acur
import binary_search
import sensitivity
from conftest import tiny_args
from modules.cur_linear import CURLinear
from modules.model_utils import find_linears


def run(model_dir, text, tmp, *extra):
    args = acur.build_parser().parse_args(tiny_args(model_dir, text, tmp, *extra))
    return acur.run_pipeline(args)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_random_model_compresses_to_target_and_reuses_cache(family, tiny_llama_dir, tiny_opt_dir,
                                                            tiny_text_file, tmp_path, monkeypatch):
    model_dir = tiny_llama_dir if family == "llama" else tiny_opt_dir
    model, _, res = run(model_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--act_aware",
                        "--use_cache", "--eval_dense")
    reached = res["param_ratio"]["reached"]
    assert 0.78 <= reached <= 0.8
    assert all(math.isfinite(v) for v in res["ppl"]["compressed"].values())
    assert res["sensitivity"]["computed"] == len(res["layers"]) and res["sensitivity"]["from_cache"] == 0
    n_cur = sum(isinstance(i.module, CURLinear) for i in find_linears(model, types=(torch.nn.Linear, CURLinear)))
    assert n_cur == sum(1 for v in res["layers"].values() if v["rank"] is not None) > 0
    # the JSON on disk is the same result, in the documented schema
    on_disk = json.loads(open(res["output_file"]).read())
    assert on_disk["schema"] == "cur4llm.result/1" and on_disk["param_ratio"]["reached"] == reached
    assert set(on_disk["timings"]) >= {"load_model", "calibration", "sensitivity", "search", "compress", "eval"}

    # second run: sensitivity comes from the cache, nothing is recomputed, same ranks
    def boom(*a, **k):
        raise AssertionError("sensitivity recomputed despite --use_cache")
    monkeypatch.setattr(sensitivity.BlockRunner, "tail_ppl", boom)
    monkeypatch.setattr(sensitivity, "perplexity_of_windows", boom)
    _, _, res2 = run(model_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--act_aware",
                     "--use_cache")
    assert res2["sensitivity"]["computed"] == 0 and res2["sensitivity"]["from_cache"] == len(res["layers"])
    assert {k: v["rank"] for k, v in res2["layers"].items()} == {k: v["rank"] for k, v in res["layers"].items()}
    assert res2["ppl"]["compressed"] == res["ppl"]["compressed"]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_random_model_fast_sensitivity_equals_straightforward_loop(family, tiny_llama_dir, tiny_opt_dir,
                                                                   tiny_text_file, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer
    import datautils
    model_dir = tiny_llama_dir if family == "llama" else tiny_opt_dir
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = datautils.get_calib_data(f"text:{tiny_text_file}", tok, 5, 48, seed=1)
    linears = find_linears(model)
    ratios = [0.4, 0.7]
    kw = dict(rank_align=1, selection="topk", u_mode="pinv")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = sensitivity.sensitivity_ppl(model, linears, ids, ratios, None, 0.5, kw, batch_size=2, fast=True)
    slow = sensitivity.sensitivity_ppl(model, linears, ids, ratios, None, 0.5, kw, batch_size=2, fast=False)
    assert fast.keys() == slow.keys()
    for name in fast:
        for r in fast[name]:
            assert fast[name][r] == pytest.approx(slow[name][r], rel=1e-5)
    # and the model is left exactly as it was (the fast path writes candidates into the weights)
    assert all(type(i.module) is torch.nn.Linear for i in find_linears(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_random_model_compiled_blocks_match_eager_and_a_failing_compiler_falls_back(
        tiny_llama_dir, tiny_text_file, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import datautils
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = datautils.get_calib_data(f"text:{tiny_text_file}", tok, 4, 32, seed=2)
    linears = [i for i in find_linears(model) if i.name.endswith(("q_proj", "down_proj"))]
    kw = dict(rank_align=1, selection="topk", u_mode="pinv")
    eager = sensitivity.sensitivity_ppl(model, linears, ids, [0.5], None, 0.5, kw, batch_size=2,
                                        compile_blocks=False)
    compiled = sensitivity.sensitivity_ppl(model, linears, ids, [0.5], None, 0.5, kw, batch_size=2,
                                           compile_blocks=True)  # a real torch.compile (CPU inductor)
    for name in eager:
        assert compiled[name]["0.5"] == pytest.approx(eager[name]["0.5"], rel=1e-4)

    def broken_compile(module, **_):
        def run(*a, **k):
            raise RuntimeError("inductor: no C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    capsys.readouterr()
    fallback = sensitivity.sensitivity_ppl(model, linears, ids, [0.5], None, 0.5, kw, batch_size=2,
                                           compile_blocks=True)
    assert "torch.compile of the decoder blocks failed" in capsys.readouterr().out
    assert fallback == eager  # the eager blocks, bit for bit


def test_random_model_ppl_target_gives_model_within_target(tiny_llama_dir, tiny_text_file, tmp_path):
    _, _, dense = run(tiny_llama_dir, tiny_text_file, tmp_path / "d", "--raw_model")
    model, _, res = run(tiny_llama_dir, tiny_text_file, tmp_path, "--ppl_target", "1000", "--act_aware")
    trace = res["ppl_search_trace"]
    assert trace and all(set(t) == {"cut", "ppl"} for t in trace)
    accepted = [t["ppl"] for t in trace if t["ppl"] <= 1000]
    assert res["param_ratio"]["reached"] < 1.0  # something was compressed
    # the final model is the one of the final bound: its calibration ppl is within the target
    from evaluate_utils import perplexity_of_windows
    import datautils
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = datautils.get_calib_data(f"text:{tiny_text_file}", tok, 4, 64, seed=0)
    assert perplexity_of_windows(model, ids, 2, desc=None) <= 1000
    assert accepted


def test_random_model_stable_rank_metric_runs(tiny_llama_dir, tiny_text_file, tmp_path):
    _, _, res = run(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.7",
                    "--sensitivity_metric", "stable_rank", "--act_aware", "--u_mode", "act_weighted")
    assert 0.68 <= res["param_ratio"]["reached"] <= 0.7
    assert math.isfinite(res["ppl"]["compressed"][f"text:{tiny_text_file}"])


def test_binary_search_fills_headroom_and_never_exceeds_target():
    shapes = {f"l{i}": (64, 48 + 16 * i) for i in range(6)}
    table = {name: {"0.4": 10 + i * 3 + 0.5, "0.6": 5 + i, "0.8": 1 + i * 0.1}
             for i, name in enumerate(shapes)}
    for target in (0.45, 0.55, 0.7, 0.85, 0.95):
        ratios = binary_search.search_param_ratio(table, shapes, target)
        reached = binary_search.reached_ratio(ratios, shapes)
        assert target - 0.02 <= reached <= target
    with pytest.raises(ValueError, match="below what the candidate ratios"):
        binary_search.search_param_ratio(table, shapes, 0.1)


def test_binary_search_prefers_low_sensitivity_layers():
    shapes = {"a": (32, 32), "b": (32, 32)}
    table = {"a": {"0.5": 1.0}, "b": {"0.5": 100.0}}  # compressing b hurts
    ratios = binary_search.search_param_ratio(table, shapes, 0.76)
    assert ratios["a"] < 0.6 and ratios["b"] == 1.0
