"""Bad input, caches, interruption, determinism, numerical safety (each test able to fail)."""
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import acur
import datautils
from conftest import ROOT, tiny_args
from evaluate_utils import perplexity_of_windows


def run(model_dir, text, tmp, *extra):
    return acur.run_pipeline(acur.build_parser().parse_args(tiny_args(model_dir, text, tmp, *extra)))


BAD_BEFORE_LOADING = [
    (["--param_ratio_target", "0"], "param_ratio_target"),
    (["--param_ratio_target", "1.2"], "param_ratio_target"),
    (["--param_ratio_target", "-0.5"], "param_ratio_target"),
    (["--param_ratio_target", "nan"], "param_ratio_target"),
    (["--ppl_target", "0"], "ppl_target"),
    (["--ppl_target", "-3"], "ppl_target"),
    ([], "exactly one"),
    (["--param_ratio_target", "0.9", "--ppl_target", "30"], "exactly one"),
    (["--param_ratio_target", "0.9", "--alpha", "-1"], "alpha"),
    (["--param_ratio_target", "0.9", "--n_calib_samples", "0"], "n_calib_samples"),
    (["--param_ratio_target", "0.9", "--calib_dataset", "wikitext3"], "unknown dataset"),
    (["--param_ratio_target", "0.9", "--eval_ppl", "nope"], "unknown dataset"),
    (["--param_ratio_target", "0.9", "--calib_dataset", "text:/no/such/file.txt"], "not found"),
    (["--param_ratio_target", "0.9", "--sensitivity_ratios", "0.5,1.5"], "sensitivity_ratios"),
    (["--param_ratio_target", "0.9", "--layer_filter", "(["], "regex"),
]


@pytest.mark.parametrize("extra,needle", BAD_BEFORE_LOADING)
def test_bad_input_exits_2_with_one_line_before_loading(extra, needle, tiny_llama_dir, tiny_text_file, tmp_path,
                                                        monkeypatch, capsys):
    monkeypatch.setattr(acur, "load_model", lambda *a: pytest.fail("heavy work started on bad input"))
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, *extra)
    assert acur.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("acur.py: error:") and needle in err[0]


def test_bad_input_unknown_choice_is_argparse_error(tiny_llama_dir, tiny_text_file, tmp_path):
    for extra in (["--scaling_method", "abs_median"], ["--sensitivity_metric", "loss"]):
        with pytest.raises(SystemExit) as exc:
            acur.main(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.9", *extra))
        assert exc.value.code == 2


def test_bad_input_empty_or_short_text_and_missing_model(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    cases = [
        (["--calib_dataset", f"text:{empty}"], "empty"),
        (["--calib_dataset", f"text:{short}"], "fewer than one window"),
        (["--calib_seqlen", "4096"], "exceeds the model's context"),
    ]
    for extra, needle in cases:
        assert acur.main(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.9",
                                   *extra)) == 2, extra
        assert needle in capsys.readouterr().err
    argv = tiny_args(tmp_path / "no_such_model", tiny_text_file, tmp_path, "--param_ratio_target", "0.9")
    assert acur.main(argv) == 2
    assert "model not found" in capsys.readouterr().err


def test_corrupt_and_foreign_caches_are_reported_and_recomputed(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    _, _, ref = run(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--act_aware",
                    "--use_cache")
    cache_dir = tmp_path / "cache"
    files = sorted(cache_dir.iterdir())
    assert any(f.suffix == ".json" for f in files) and any(f.suffix == ".pt" for f in files)
    for f in files:
        f.write_bytes(f.read_bytes()[:40])  # truncated = corrupt
    capsys.readouterr()
    _, _, res = run(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--act_aware",
                    "--use_cache")
    out = capsys.readouterr().out
    assert out.count("WARNING: ignoring cache") == 2
    assert res["sensitivity"]["computed"] == len(res["layers"])
    assert res["ppl"]["compressed"] == ref["ppl"]["compressed"]
    # a cache whose stored key differs (e.g. copied from another run) is not trusted either
    sens_file = Path(res["sensitivity"]["cache"])
    blob = json.loads(sens_file.read_text())
    blob["key"]["seed"] = 999
    sens_file.write_text(json.dumps(blob))
    _, _, res3 = run(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--act_aware",
                     "--use_cache")
    assert res3["sensitivity"]["from_cache"] == 0


def test_cache_name_changes_with_every_input():
    base = {"model": "m", "dataset": "wikitext2", "n": 32, "seqlen": 2048, "seed": 1, "scaling": "abs_mean",
            "alpha": 0.5, "ratios": [0.5]}
    p0 = datautils.cache_path("sensitivity", base)
    for k, v in [("dataset", "c4"), ("n", 16), ("seqlen", 1024), ("seed", 2), ("scaling", "abs_max"),
                 ("alpha", 1.0), ("ratios", [0.6]), ("model", "m2")]:
        assert datautils.cache_path("sensitivity", {**base, k: v}) != p0, k


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cur4llm_pwned",))


def test_cache_with_code_is_never_executed(tmp_path, capsys):
    if os.path.exists("/tmp/cur4llm_pwned"):
        os.unlink("/tmp/cur4llm_pwned")
    key = {"model": "m"}
    path = tmp_path / "evil.pt"
    torch.save({"key": json.dumps(key, sort_keys=True), "tensors": {"x": _Evil()}}, path)
    assert datautils.load_tensor_cache(path, key) is None
    assert not os.path.exists("/tmp/cur4llm_pwned")
    assert "ignoring cache" in capsys.readouterr().out


KILL_AFTER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})  # the parent's: BLAS round-off depends on the thread count
import datautils, acur
n = {{"saves": 0}}
orig = datautils.save_json_cache
def save_then_die(*a, **k):
    orig(*a, **k)
    n["saves"] += 1
    if n["saves"] == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # as if the machine died right here
datautils.save_json_cache = save_then_die
sys.exit(acur.main(sys.argv[1:]))
"""


def test_kill_mid_sensitivity_then_resume_gives_identical_results(tiny_llama_dir, tiny_text_file, tmp_path):
    args = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path / "a", "--param_ratio_target", "0.8",
                     "--act_aware", "--use_cache", "--run_name", "killed")
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER.format(root=str(ROOT), threads=torch.get_num_threads()), *args],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = [json.loads(p.read_text()) for p in (tmp_path / "a" / "cache").glob("*sensitivity*.json")]
    assert len(partial) == 1 and len(partial[0]["table"]) == 5 and partial[0]["complete"] is False
    _, _, resumed = run(tiny_llama_dir, tiny_text_file, tmp_path / "a", "--param_ratio_target", "0.8",
                        "--act_aware", "--use_cache")
    assert resumed["sensitivity"]["from_cache"] == 5
    assert resumed["sensitivity"]["computed"] == len(resumed["layers"]) - 5
    _, _, fresh = run(tiny_llama_dir, tiny_text_file, tmp_path / "b", "--param_ratio_target", "0.8",
                      "--act_aware", "--use_cache")
    assert json.loads(Path(resumed["sensitivity"]["cache"]).read_text())["table"] == \
        json.loads(Path(fresh["sensitivity"]["cache"]).read_text())["table"]
    assert resumed["layers"] == fresh["layers"] and resumed["ppl"] == fresh["ppl"]


@pytest.mark.parametrize("selection", ["topk", "sample"])
def test_same_seed_gives_identical_ranks_and_perplexities(selection, tiny_llama_dir, tiny_text_file, tmp_path):
    runs = [run(tiny_llama_dir, tiny_text_file, tmp_path / str(i), "--param_ratio_target", "0.75", "--act_aware",
                "--selection", selection)[2] for i in range(2)]
    assert runs[0]["layers"] == runs[1]["layers"]
    assert runs[0]["ppl"] == runs[1]["ppl"]


@pytest.mark.parametrize("target", ["0.6", "0.5"])
def test_low_ratio_runs_to_the_end(target, tiny_opt_dir, tiny_text_file, tmp_path):
    _, _, res = run(tiny_opt_dir, tiny_text_file, tmp_path, "--param_ratio_target", target,
                    "--sensitivity_ratios", "0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    assert res["param_ratio"]["reached"] <= float(target)
    ppl = list(res["ppl"]["compressed"].values())[0]
    assert not math.isnan(ppl)


def test_nan_perplexity_is_reported_as_nan(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model.model.norm.weight.data[0] = float("nan")
    ppl = perplexity_of_windows(model, torch.randint(0, 100, (2, 16)), desc=None)
    assert math.isnan(ppl)


def test_decomposition_runs_in_fp32_for_half_models(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    from modules.cur_linear import CURLinear
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    lin = model.model.layers[0].mlp.down_proj
    cur = CURLinear.from_linear(lin, 0.5, act_scale=torch.full((lin.in_features,), 1e30))  # overflows in bf16
    assert cur.C.dtype == torch.bfloat16 and torch.isfinite(cur.U.float()).all() and cur.fallback == ""
