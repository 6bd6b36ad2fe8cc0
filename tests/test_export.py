"""Export to a Hugging Face repo (huggingface_repos/build_acur_repo.py) and reload with trust_remote_code.

Round trips reload the repo in a FRESH Python process whose working directory is outside the project,
so the repo's copied configuration/modeling files must be self-contained."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_args

sys.path.insert(0, str(ROOT / "huggingface_repos"))
import build_acur_repo as bar  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One BLAS thread: on the shared 2-core machine, 2-thread LAPACK calls (SVD, pinv) stall ~1 s each
    under load, 100x slower than one thread; restored afterwards for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# Runs in a fresh interpreter: loads the repo in fp32, fp16 (device_map="auto", the README's call) and
# bf16 (old torch_dtype keyword), returns logits, greedy tokens and facts about the loaded model.
CHILD = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
repo, ids_path, out_path, n_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ids = torch.load(ids_path)
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32).eval()
load_s = time.perf_counter() - t0
tok = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
with torch.no_grad():
    logits = model(ids).logits
    gen = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.eos_token_id)
cur = {n: m for n, m in model.named_modules() if type(m).__name__ == "CURLinear"}
emb, head = model.get_input_embeddings(), model.get_output_embeddings()
out = {"logits": logits, "gen": gen, "load_s": load_s, "params": sum(p.numel() for p in model.parameters()),
       "class_module": type(model).__module__, "project_imported": "acur" in sys.modules,
       "cur_layers": sorted(cur), "ranks": {n: m.rank for n, m in cur.items()},
       "indices": {n: (m.col_indices.tolist(), m.row_indices.tolist()) for n, m in cur.items()},
       "tied": getattr(head, "weight", None) is not None and head.weight is emb.weight,
       "dense_linears": [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]}
for dtype, kw in ((torch.float16, dict(dtype=torch.float16, device_map="auto")),
                  (torch.bfloat16, dict(torch_dtype=torch.bfloat16))):
    m = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, **kw).eval()
    with torch.no_grad():
        lg = m(ids).logits.float()
        g = m.generate(ids[:, :8], max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    out[str(dtype)] = {"dtypes": sorted({str(p.dtype) for p in m.parameters()}), "finite": bool(lg.isfinite().all()),
                       "max_diff": (lg - logits).abs().max().item(), "gen_len": g.shape[1]}
torch.save(out, out_path)
"""


def reload_in_fresh_process(repo: Path, ids: torch.Tensor, tmp: Path, n_new: int) -> dict:
    ids_path, out_path = tmp / "ids.pt", tmp / "child.pt"
    torch.save(ids, ids_path)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp / "hf_modules"), "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(repo), str(ids_path), str(out_path), str(n_new)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out_path)


def in_memory_reference(model, ids: torch.Tensor, n_new: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    model.float().eval()
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, max_new_tokens=n_new, do_sample=False, use_cache=True, pad_token_id=eos)
    return logits, gen


def export(argv: list[str]):
    args = bar.build_parser().parse_args(argv)
    return bar.build_repo(args)


def kept_indices(model) -> dict:
    """{layer: (kept columns, kept rows)} of the in-memory model's CURLinear layers."""
    return {n: (m.col_indices.tolist(), m.row_indices.tolist()) for n, m in model.named_modules()
            if type(m).__name__ == "CURLinear"}


def check_round_trip(repo: Path, model, tok, tmp: Path, n_ids: int = 24, n_new: int = 8) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, len(tok), (1, n_ids))
    ref_logits, ref_gen = in_memory_reference(model, ids, n_new, tok.eos_token_id)
    t0 = time.perf_counter()
    child = reload_in_fresh_process(repo, ids, tmp, n_new)
    child["process_s"] = time.perf_counter() - t0
    child["max_abs_diff"] = (child["logits"] - ref_logits).abs().max().item()
    cfg = json.loads((repo / "config.json").read_text())
    assert child["class_module"].startswith("transformers_modules"), child["class_module"]
    assert not child["project_imported"]
    assert child["max_abs_diff"] <= 1e-4, child["max_abs_diff"]
    assert child["params"] == sum(p.numel() for p in model.parameters())
    assert torch.equal(child["gen"], ref_gen)
    assert child["cur_layers"] == sorted(cfg["lowrank_layers"])
    assert child["ranks"] == {n: s["rank"] for n, s in cfg["lowrank_layers"].items()}
    assert child["indices"] == kept_indices(model)  # the kept columns / rows come back from the weights
    assert not set(child["dense_linears"]) & set(cfg["lowrank_layers"])
    for dtype in ("torch.float16", "torch.bfloat16"):
        r = child[dtype]
        assert r["dtypes"] == [dtype], r
        assert r["finite"] and r["gen_len"] == 11, r
        assert r["max_diff"] < 0.5, r  # half precision, same model
    return child


def check_repo_files(repo: Path, results: dict, family: str) -> dict:
    from safetensors import safe_open
    names = {p.name for p in repo.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
            f"configuration_acur_{family}.py", f"modeling_acur_{family}.py", "acur_layers.py", "acur_kv_cache.py",
            "acur_packed.py", "acur_fast.py", "acur_results.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    cfg = json.loads((repo / "config.json").read_text())
    assert cfg["model_type"] == f"acur_{family}"  # its own: without trust_remote_code transformers refuses
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith(f"modeling_acur_{family}.")
    assert cfg["auto_map"]["AutoConfig"].startswith(f"configuration_acur_{family}.")
    with safe_open(repo / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for name, spec in cfg["lowrank_layers"].items():
            assert f"{name}.weight" not in keys  # no dense copy of a compressed layer
            assert {f"{name}.C", f"{name}.U", f"{name}.R"} <= keys
            assert "cols" not in spec and "rows" not in spec  # indices live in the weights, not the config
            cols, rows = f.get_tensor(f"{name}.col_indices"), f.get_tensor(f"{name}.row_indices")
            assert cols.dtype == rows.dtype == torch.int64
            assert cols.numel() == rows.numel() == spec["rank"]
            assert cols.unique().numel() == spec["rank"] and int(cols.max()) < spec["in"]
            assert int(rows.max()) < spec["out"]
    card = (repo / "README.md").read_text()
    m = results["model"]
    assert f"{m['params_total']:,}" in card and f"{m['params_compressed']:,}" in card
    for ds, v in results["ppl"]["compressed"].items():
        assert f"{v:.3f}" in card, ds
    sizes = results["export"]["sizes"]
    assert sizes["compressed_weight_bytes"] == (repo / "model.safetensors").stat().st_size
    return sizes


# ---------------------------------------------------------------- tiny random models
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_export_random_tiny_round_trip(family, request, tiny_text_file, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    repo = tmp_path / f"tiny-{family}-acur80"
    t0 = time.perf_counter()
    repo_dir, model, tok, results = export(tiny_args(model_dir, tiny_text_file, tmp_path,
                                                     "--act_aware", "--param_ratio_target", "0.8",
                                                     "--sensitivity_metric", "stable_rank",
                                                     "--repo_dir", str(repo)))
    build_s = time.perf_counter() - t0
    assert repo_dir == repo
    sizes = check_repo_files(repo, results, family)
    assert sizes["compressed_weight_bytes"] < sizes["dense_checkpoint_bytes"]
    child = check_round_trip(repo, model, tok, tmp_path)
    if family == "llama":
        assert child["tied"]  # tied embeddings survive the export (lm_head not compressed)
    print(f"\n[{family}] build {build_s:.1f} s, reload {child['load_s']:.2f} s, max diff {child['max_abs_diff']:.2e}")


def test_export_random_tiny_llama_lm_head_untied(tiny_llama_dir, tiny_text_file, tmp_path):
    """A compressed lm_head of a tied model: config says untied, the embedding stays dense, round trip holds."""
    repo = tmp_path / "tiny-head"
    _, model, tok, results = export(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--act_aware",
                                              "--param_ratio_target", "0.8", "--sensitivity_metric",
                                              "stable_rank", "--compress_lm_head", "--eval_ppl", "none",
                                              "--repo_dir", str(repo)))
    cfg = json.loads((repo / "config.json").read_text())
    assert "lm_head" in cfg["lowrank_layers"] and cfg["tie_word_embeddings"] is False
    ids = torch.randint(3, len(tok), (1, 12))
    ref, _ = in_memory_reference(model, ids, 1, tok.eos_token_id)
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32)
    assert type(loaded.lm_head).__name__ == "CURLinear"
    with torch.no_grad():
        assert (loaded(ids).logits - ref).abs().max().item() <= 1e-4


def test_export_random_bad_config_layer_fails_clearly(tiny_llama_dir, tiny_text_file, tmp_path):
    from transformers import AutoModelForCausalLM
    repo = tmp_path / "tiny-bad"
    export(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8",
                     "--sensitivity_metric", "stable_rank", "--eval_ppl", "none", "--repo_dir", str(repo)))
    cfg_path = repo / "config.json"
    cfg = json.loads(cfg_path.read_text())
    good = dict(cfg)
    spec = next(iter(cfg["lowrank_layers"].values()))
    cfg["lowrank_layers"] = {**cfg["lowrank_layers"], "model.layers.7.mlp.up_proj": spec}  # only 2 blocks exist
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.7\.mlp\.up_proj.*not a linear layer"):
        AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    name = next(iter(good["lowrank_layers"]))
    layers = good["lowrank_layers"]
    bad_shape = {**layers, name: {**layers[name], "in": layers[name]["in"] + 1}}
    cfg_path.write_text(json.dumps({**good, "lowrank_layers": bad_shape}))
    with pytest.raises(ValueError, match="but the .* layer is"):
        AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    cfg_path.write_text(json.dumps({**good, "lowrank_layers": {**layers, name: {**layers[name], "type": "Foo"}}}))
    with pytest.raises(ValueError, match="has type 'Foo'"):
        AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    # corrupt kept indices in the weights (a repeated column) fail at load, not later in a matmul
    cfg_path.write_text(json.dumps(good))
    from safetensors.torch import load_file, save_file
    weights = repo / "model.safetensors"
    tensors = load_file(weights)
    cols = tensors[f"{name}.col_indices"].clone()
    cols[1] = cols[0]
    save_file({**tensors, f"{name}.col_indices": cols}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"col_indices in the weights is not a set of distinct indices"):
        AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)


def test_export_random_usage_errors(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    base = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8")
    # not a layout the pipeline walks (GPT-2: transformer.h of Conv1D)
    from transformers import GPT2Config
    gpt = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt)
    argv = base.copy()
    argv[argv.index("--model_id") + 1] = str(gpt)
    assert bar.main(argv) == 2
    assert "model_type 'gpt2'" in capsys.readouterr().err
    # a folder that is not an earlier export is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert bar.main(base + ["--repo_dir", str(tmp_path / "mine")]) == 2
    assert "not an ACUR export" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").exists()
    # a bad --method argument is refused before any compression work (every valid method exports:
    # tests/test_export_methods.py)
    monkeypatch.setattr(bar.acur, "run_pipeline", lambda *a, **k: pytest.fail("compressed before refusing"))
    assert bar.main(base + ["--method", "asvd"]) == 2  # asvd without --act_aware
    assert "--method asvd scales by activations" in capsys.readouterr().err
    monkeypatch.undo()
    # --raw_model has nothing to export
    assert bar.main(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--raw_model")) == 2
    assert "--raw_model" in capsys.readouterr().err
    # --push: no token, then no network; both before any compression work
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    t0 = time.perf_counter()
    assert bar.main(base + ["--push"]) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")

    def offline(self, *a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", offline)
    assert bar.main(base + ["--push"]) == 2
    assert "cannot reach the Hugging Face hub" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30  # refused up front, not after compressing


def test_export_random_push_with_mocked_hub(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    """--push after a full export (the hub itself is mocked: no network here); a failed upload keeps the repo."""
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, *a, **k: {"name": "alice"})
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **k: calls.append(("create", repo_id, k)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **k: calls.append(("upload", k["repo_id"], k["folder_path"])))
    repo = tmp_path / "tiny-push-acur80"
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8",
                     "--sensitivity_metric", "stable_rank", "--eval_ppl", "none", "--repo_dir", str(repo),
                     "--push", "--private")
    assert bar.main(argv) == 0
    assert calls == [("create", "alice/tiny-push-acur80", {"exist_ok": True, "private": True}),
                     ("upload", "alice/tiny-push-acur80", str(repo))]
    assert 'from_pretrained("alice/tiny-push-acur80"' in (repo / "README.md").read_text()
    assert "pushed: https://huggingface.co/alice/tiny-push-acur80" in capsys.readouterr().out

    def refused(self, **k):
        raise PermissionError("403 Forbidden")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refused)
    assert bar.main(argv + ["--repo_name", "bob/x"]) == 2
    err = capsys.readouterr().err
    assert "--push to bob/x failed (PermissionError: 403 Forbidden)" in err and str(repo) in err
    assert (repo / "model.safetensors").exists()


def test_export_default_repo_dir_names():
    args = bar.build_parser().parse_args(["--model_id", "smollm2-135m", "--param_ratio_target", "0.9"])
    assert bar.default_repo_dir(args, 0.9) == ROOT / "huggingface_repos" / "SmolLM2-135M-Instruct-acur90"
    assert bar.default_repo_dir(args, 0.29).name.endswith("-acur29")
    args.model_id = "facebook/opt-125m"
    assert bar.default_repo_dir(args, 0.85).name == "opt-125m-acur85"
    # the export flags sit on acur.py's own parser
    import acur
    assert {a.dest for a in acur.build_parser()._actions} < {a.dest for a in bar.build_parser()._actions}


# ---------------------------------------------------------------- real SmolLM2 (offline)
@pytest.mark.integration
def test_export_smollm2_round_trip(smollm2_dir, tmp_path):
    repo = tmp_path / "SmolLM2-135M-Instruct-acur90"
    t0 = time.perf_counter()
    _, model, tok, results = export(["--model_id", "smollm2-135m", "--act_aware", "--param_ratio_target", "0.9",
                                     "--calib_dataset", "squad_wiki", "--n_calib_samples", "2",
                                     "--calib_seqlen", "128", "--sensitivity_metric", "stable_rank",
                                     "--eval_ppl", "new_wiki", "--eval_seqlen", "256", "--eval_max_windows", "2",
                                     "--use_cache", "--output_dir", str(tmp_path / "output"),
                                     "--repo_dir", str(repo)])
    build_s = time.perf_counter() - t0
    sizes = check_repo_files(repo, results, "llama")
    cfg = json.loads((repo / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 3 and cfg["tie_word_embeddings"] is True  # GQA, tied
    compressed = {n for n, r in results["layers"].items() if r["rank"] is not None}
    assert set(cfg["lowrank_layers"]) == compressed and len(compressed) > 50
    assert (repo / "config.json").stat().st_size < 50_000  # indices in the weights: was 862 KB
    assert sizes["compressed_weight_bytes"] < 0.95 * sizes["dense_checkpoint_bytes"]
    gen_cfg = json.loads((repo / "generation_config.json").read_text())
    assert gen_cfg.get("eos_token_id") == tok.eos_token_id
    prompt = tok("The capital of France is a city where", return_tensors="pt").input_ids
    ids = torch.cat([prompt, torch.randint(100, 40000, (1, 8), generator=torch.Generator().manual_seed(0))], 1)
    n_new = 8
    ref_logits, ref_gen = in_memory_reference(model, ids, n_new, tok.eos_token_id)
    t1 = time.perf_counter()
    child = reload_in_fresh_process(repo, ids, tmp_path, n_new)
    process_s = time.perf_counter() - t1
    diff = (child["logits"] - ref_logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert child["params"] == sum(p.numel() for p in model.parameters())
    assert torch.equal(child["gen"], ref_gen)
    assert child["tied"] and child["indices"] == kept_indices(model)
    for dtype in ("torch.float16", "torch.bfloat16"):
        assert child[dtype]["dtypes"] == [dtype] and child[dtype]["finite"], child[dtype]
    print(f"\n[smollm2] build {build_s:.1f} s; weights {sizes['compressed_weight_bytes']:,} B vs dense checkpoint "
          f"{sizes['dense_checkpoint_bytes']:,} B ({sizes['compressed_weight_bytes'] / sizes['dense_checkpoint_bytes']:.3f}); "
          f"repo total {sizes['repo_total_bytes']:,} B; from_pretrained {child['load_s']:.2f} s "
          f"(fresh process incl. imports and 3 loads {process_s:.1f} s); max |logit diff| {diff:.2e}; "
          f"fp16 diff {child['torch.float16']['max_diff']:.3f}, bf16 diff {child['torch.bfloat16']['max_diff']:.3f}")
