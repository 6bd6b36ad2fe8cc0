"""Exports of structured models (kept neurons and heads): a stock HF repo (uniform widths), a remote-code HF
repo (per-layer widths) and GGUF files, loaded by the engines themselves in fresh processes.

The models here are sliced by hand (the first neurons / KV groups of each layer), so the exports are tested
apart from how the structured methods choose what to keep. llama.cpp runs where llama-cpp-python is
installed (`make engines` installs it from the wheel cached in .whl/): otherwise those tests skip."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "huggingface_repos"))

import export_gguf  # noqa: E402
import export_structured as xs  # noqa: E402


def slice_llama(model, widths: list[tuple[int, int]]) -> None:
    """Keep the first `neurons` MLP channels and the first `groups` KV groups (with their query heads) of
    each layer: what a structured method does, with a trivial choice."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, (neurons, groups) in zip(model.model.layers, widths):
        attn, mlp = layer.self_attn, layer.mlp
        kv_rows = torch.arange(groups * head_dim)
        q_rows = torch.arange(groups * q_per_kv * head_dim)

        def sub(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
            w = lin.weight.data
            w = w[rows] if rows is not None else w
            w = w[:, cols] if cols is not None else w
            new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
            new.weight.data = w.clone()
            if lin.bias is not None:
                new.bias.data = (lin.bias.data[rows] if rows is not None else lin.bias.data).clone()
            return new
        attn.q_proj, attn.k_proj, attn.v_proj = sub(attn.q_proj, q_rows), sub(attn.k_proj, kv_rows), sub(attn.v_proj, kv_rows)
        attn.o_proj = sub(attn.o_proj, cols=q_rows)
        keep = torch.arange(neurons)
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = sub(mlp.gate_proj, keep), sub(mlp.up_proj, keep), sub(mlp.down_proj, cols=keep)


def add_intercepts(model) -> None:
    """What bias=1 leaves: down_proj and o_proj with a bias (random here), the LLaMA config's mlp_bias and
    attention_bias switched on and every other bias they cover zero (structured.bias_flags)."""
    import structured
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        for lin in (layer.mlp.down_proj, layer.self_attn.o_proj):
            lin.bias = nn.Parameter(0.1 * torch.randn(lin.out_features, generator=g))
    flags = structured.bias_flags(model)
    assert flags == {"mlp_bias": True, "attention_bias": True}
    for attr, value in flags.items():
        setattr(model.config, attr, value)


def load_tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_llama_dir))


CHILD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
path, remote, ids = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3])
kw = {"trust_remote_code": True} if remote else {}
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
with torch.no_grad():
    logits = m(torch.tensor([ids])).logits[0]
out = {"class": type(m).__module__ + "." + type(m).__name__, "logits": logits.tolist(),
       "modules": sorted(k for k in sys.modules if k.split(".")[0] in ("acur", "datautils", "export_structured"))}
print(json.dumps(out))
"""


def run_child(path: Path, remote: bool, ids: list[int]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), "1" if remote else "0", json.dumps(ids)],
                          capture_output=True, text=True, timeout=300, cwd=path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rotary_interleave_matches_pairwise_rope():
    """GGUF's LLaMA rope rotates consecutive pairs; HF's rotates (i, i + d/2): the row order maps one onto
    the other, head by head."""
    d, heads = 8, 3
    w = torch.arange(heads * d * 2, dtype=torch.float32).reshape(heads * d, 2)
    out = export_gguf.interleave_rotary(w, d)
    for h in range(heads):
        for i in range(d // 2):
            assert torch.equal(out[h * d + 2 * i], w[h * d + i])
            assert torch.equal(out[h * d + 2 * i + 1], w[h * d + d // 2 + i])


@pytest.mark.parametrize("bias", [False, True])
def test_uniform_export_loads_in_stock_transformers(tiny_llama_dir, tmp_path, bias):
    model, tok = load_tiny(tiny_llama_dir)
    slice_llama(model, [(96, 1), (96, 1)])
    if bias:
        add_intercepts(model)
    ids = tok("the quick brown fox jumps over the lazy dog", add_special_tokens=False).input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    info = xs.export_structured(model, tok, tmp_path / "repo", "uniform", save_dtype=torch.float32, gguf_dtype="f32")
    cfg = json.loads((tmp_path / "repo" / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["model_type"] == "llama"
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (96, 2, 1, 16)
    assert (cfg["mlp_bias"], cfg["attention_bias"]) == (bias, bias)
    assert not list((tmp_path / "repo").glob("*.py"))  # no code: nothing to trust
    child = run_child(tmp_path / "repo", remote=False, ids=ids)
    assert child["class"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM" and child["modules"] == []
    torch.testing.assert_close(torch.tensor(child["logits"]), ref, rtol=1e-5, atol=1e-5)
    assert info["gguf"]["architecture"] == "llama"


def test_per_layer_export_loads_with_remote_code_and_refuses_plain(tiny_llama_dir, tmp_path):
    model, tok = load_tiny(tiny_llama_dir)
    slice_llama(model, [(112, 2), (48, 1)])
    with pytest.raises(xs.StructuredExportError, match="llama.cpp .* load it"):
        xs.check_width_mode(model, "per_layer", plain_hf=True)
    with pytest.raises(xs.StructuredExportError, match="export it as per_layer"):
        xs.export_structured(model, tok, tmp_path / "bad", "uniform")
    assert not (tmp_path / "bad").exists()
    ids = tok("pack my box with five dozen liquor jugs", add_special_tokens=False).input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    info = xs.export_structured(model, tok, tmp_path / "repo", "per_layer", save_dtype=torch.float32, gguf_dtype="f32")
    child = run_child(tmp_path / "repo", remote=True, ids=ids)
    assert child["class"].endswith("StructuredLlamaForCausalLM")
    torch.testing.assert_close(torch.tensor(child["logits"]), ref, rtol=1e-5, atol=1e-5)
    import gguf
    reader = gguf.GGUFReader(str(tmp_path / "repo" / info["gguf"]["file"]))
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.feed_forward_length"].contents() == [112, 48]
    assert reader.fields["deci.attention.head_count"].contents() == [4, 2]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [2, 1]


def test_gguf_export_refuses_unknown_family(tiny_opt_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_opt_dir)
    with pytest.raises(export_gguf.GGUFExportError, match="knows the llama family, not 'opt'"):
        export_gguf.write_gguf(model, tmp_path / "x.gguf", tokenizer_dir=tiny_opt_dir)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- llama.cpp itself (make engines)
def llama_cpp_logits(gguf_path: Path, ids: list[int]) -> torch.Tensor:
    """Logits of every position from llama.cpp, fed the token ids directly (its tokenizer is not tested)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: `make engines`")
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(64, len(ids)), logits_all=True, verbose=False,
                          n_threads=1, seed=0)
    try:
        llm.eval(ids)
        return torch.tensor(llm.scores[:len(ids)], dtype=torch.float32)
    finally:
        llm.close()  # freed now, not at interpreter exit (where llama.cpp's library may be gone already)


@pytest.mark.parametrize("widths, mode", [([(96, 1), (96, 1)], "uniform"), ([(112, 2), (48, 1)], "per_layer")])
@pytest.mark.parametrize("bias", [False, True])
def test_llama_cpp_runs_the_gguf_like_transformers(tiny_llama_dir, tmp_path, widths, mode, bias):
    """The f32 GGUF in llama.cpp gives the HF model's logits to float round-off, so the same greedy tokens
    and the same perplexity (with bias: llama.cpp reads blk.N.ffn_down.bias / attn_output.bias)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: `make engines`")
    model, tok = load_tiny(tiny_llama_dir)
    slice_llama(model, widths)
    if bias:
        add_intercepts(model)
    ids = tok("the quick brown fox jumps over the lazy dog and then runs far away", add_special_tokens=False).input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    info = xs.export_structured(model, tok, tmp_path / "repo", mode, save_dtype=torch.float32, gguf_dtype="f32")
    if bias:
        import gguf
        names = {t.name for t in gguf.GGUFReader(str(tmp_path / "repo" / info["gguf"]["file"])).tensors}
        assert {"blk.0.ffn_down.bias", "blk.1.attn_output.bias"} <= names
    got = llama_cpp_logits(tmp_path / "repo" / info["gguf"]["file"], ids)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(ids[1:]))
    assert abs(nll(got).item() - nll(ref).item()) < 1e-4


# ---------------------------------------------------------------- the whole path: build_acur_repo.py --method structured
PPL_CHILD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
path, remote, windows = sys.argv[1], sys.argv[2] == "1", torch.tensor(json.loads(sys.argv[3]))
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **({"trust_remote_code": True} if remote else {})).eval()
with torch.no_grad():
    nll = torch.stack([m(w[None], labels=w[None]).loss for w in windows]).mean()
print(json.dumps({"ppl": nll.exp().item(), "class": type(m).__name__, "cfg": m.config.to_dict().get("auto_map")}))
"""


def fresh_ppl(repo: Path, windows: torch.Tensor, remote: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", PPL_CHILD, str(repo), "1" if remote else "0",
                           json.dumps(windows.tolist())], capture_output=True, text=True, timeout=600, cwd=repo,
                          stdin=subprocess.DEVNULL, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def in_process_ppl(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.stack([model(w[None], labels=w[None]).loss for w in windows]).mean().exp().item()


@pytest.mark.parametrize("mode", ["uniform", "per_layer"])
def test_build_acur_repo_structured_round_trip(tiny_llama_dir, tiny_text_file, tmp_path, mode):
    """--method structured through build_acur_repo.py: the repo holds a plain model that its engine loads in a
    fresh process with the in-process perplexity; the GGUF and the card come with it."""
    import build_acur_repo as bar
    from conftest import tiny_args
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--method", "structured", "--structured_widths", mode,
                     "--param_ratio_target", "0.8", "--repo_dir", str(tmp_path / "repo"), "--save_dtype", "float32")
    repo, model, tok, res = bar.build_repo(bar.build_parser().parse_args(argv))
    assert 0.7 < res["param_ratio"]["reached"] <= 0.8
    files = sorted(p.name for p in repo.iterdir())
    assert "README.md" in files and any(f.endswith(".gguf") for f in files)
    assert ("modeling_structured.py" in files) == (mode == "per_layer")
    windows = torch.tensor(tok(tiny_text_file.read_text()[:4000]).input_ids[:4 * 64]).reshape(4, 64)
    child = fresh_ppl(repo, windows, remote=mode == "per_layer")
    assert child["class"] == ("LlamaForCausalLM" if mode == "uniform" else "StructuredLlamaForCausalLM")
    assert child["ppl"] == pytest.approx(in_process_ppl(model.float(), windows), rel=1e-5)
    card = (repo / "README.md").read_text()
    assert "llama.cpp" in card and ("trust_remote_code=True" in card) == (mode == "per_layer")
    # a second export into the same folder replaces it (the tool wrote every file there)
    bar.build_repo(bar.build_parser().parse_args(argv))


def test_structured_export_refuses_before_compute(tiny_llama_dir, tiny_opt_dir, tiny_text_file, tmp_path, capsys):
    import build_acur_repo as bar
    from conftest import tiny_args
    base = ("--method", "structured", "--param_ratio_target", "0.8", "--repo_dir", str(tmp_path / "repo"))
    assert bar.main(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, *base, "--plain_hf")) == 2
    assert "llama.cpp (the deci GGUF) and transformers with trust_remote_code=True load it" in capsys.readouterr().err
    assert bar.main(tiny_args(tiny_opt_dir, tiny_text_file, tmp_path, *base, "--structured_widths", "uniform")) == 2
    assert "written for the llama family, not 'opt'" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists() and not (tmp_path / "output").exists()


@pytest.mark.integration
@pytest.mark.engines
def test_smollm2_structured_uniform_in_stock_transformers_and_llama_cpp(tmp_path):
    """The real model: --method structured, uniform widths, ratio 0.8. Stock transformers (no remote code, fresh
    process) reproduces the in-process perplexity on held-out text; where llama-cpp-python is installed, the f32
    GGUF in llama.cpp gives the same perplexity to float round-off and the same greedy tokens."""
    import build_acur_repo as bar
    import datautils
    argv = ["--model_id", "smollm2-135m", "--method", "structured", "--structured_widths", "uniform",
            "--param_ratio_target", "0.8", "--calib_dataset", "squad_wiki", "--n_calib_samples", "4",
            "--calib_seqlen", "256", "--sensitivity_metric", "fisher_error", "--eval_ppl", "new_wiki",
            "--eval_seqlen", "256", "--eval_max_windows", "4", "--save_dtype", "float32", "--gguf_dtype", "f32",
            "--repo_dir", str(tmp_path / "repo"), "--output_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache")]
    repo, model, tok, res = bar.build_repo(bar.build_parser().parse_args(argv))
    windows = datautils.get_eval_ids("new_wiki", tok)[:4 * 256].reshape(4, 256)
    ours = in_process_ppl(model.float(), windows)
    assert ours == pytest.approx(res["ppl"]["compressed"]["new_wiki"], rel=1e-4)
    child = fresh_ppl(repo, windows, remote=False)
    assert child["class"] == "LlamaForCausalLM" and child["cfg"] is None
    assert child["ppl"] == pytest.approx(ours, rel=1e-5)
    if __import__("importlib").util.find_spec("llama_cpp") is None:
        return
    gguf_file = repo / res["export"]["structured"]["gguf"]["file"]
    nll = []
    for w in windows:
        lg = llama_cpp_logits(gguf_file, w.tolist())
        nll.append(torch.nn.functional.cross_entropy(lg[:-1], w[1:]))
        with torch.no_grad():
            ref = model(w[None]).logits[0]
        assert (lg.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99
    assert torch.stack(nll).mean().exp().item() == pytest.approx(ours, rel=1e-3)
