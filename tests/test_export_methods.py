"""Export of every --method (read from modules.registry.METHODS) and of the KV mode, for LLaMA, OPT and
Qwen2 (tiny random-initialised checkpoints: the numbers mean nothing, the code paths are the real ones).

Every repo is reloaded in ONE fresh Python process whose sys.path holds nothing of the project:
AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True) (and once with device_map="auto" and a
dtype), AutoTokenizer.from_pretrained(repo, trust_remote_code=True), a greedy generation, and the perplexity of the same
evaluation windows the pipeline measured in-process."""
from __future__ import annotations

import json
import sys

import pytest
import torch

import datautils
from conftest import ROOT, run_fresh_loader, tiny_args
from evaluate_utils import windows
from modules import registry

sys.path.insert(0, str(ROOT / "huggingface_repos"))
import build_acur_repo as bar  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_blas_thread")

METHODS = [m for m in registry.METHODS if registry.get(m).per_linear]  # whatever the registry lists today
# (the structured form gives a plain narrower model of the same class: nothing of this export's modeling code)
CASES = [("llama", m, False) for m in METHODS] + [("opt", "acur", False), ("qwen2", "acur", False),
                                                   ("qwen2", "acur", True)]
EVAL_SEQLEN, EVAL_WINDOWS = 64, 4

# fresh interpreter, no project on sys.path: load, tokenise, generate, perplexity of the given windows
CHILD = r"""
import io, logging, math, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging
project = sys.argv[3]
# the project's own folders are not importable (its virtualenv's site-packages may live inside it)
assert not any(p and (p == project or (p.startswith(project + "/") and "site-packages" not in p))
               for p in sys.path), sys.path
log = io.StringIO()
handler = logging.StreamHandler(log)
hf_logging.get_logger().addHandler(handler)
jobs = torch.load(sys.argv[1])


def measure(model, job, tok):  # (logits, perplexity, greedy tokens) of the job's windows and prompt
    with torch.no_grad():
        w = job["windows"]
        logits = model(w, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        gen = model.generate(job["prompt"], max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return logits, math.exp(nll.item()), gen


def layer_types(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if n in model.config.lowrank_layers}


out = {}
for repo, job in jobs.items():
    log.truncate(0); log.seek(0)
    tok = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    tok_log = log.getvalue()
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32).eval()
    logits, ppl, gen = measure(model, job, tok)
    layers = layer_types(model)
    fast = model.to_inference_form()  # the serving form: same perplexity and tokens
    _, fast_ppl, fast_gen = measure(model, job, tok)
    try:
        model.save_pretrained(repo + "-resaved")
        resave = "saved"
    except RuntimeError as e:
        resave = str(e)
    out[repo] = {"ppl": ppl, "gen": gen, "fast_ppl": fast_ppl, "fast_gen": fast_gen, "fast": fast, "resave": resave,
                 "fast_layers": sorted(set(layer_types(model).values())), "tok_class": type(tok).__name__,
                 "tok_log": tok_log, "tok_ids": tok("the model compresses", add_special_tokens=False)["input_ids"],
                 "class_module": type(model).__module__, "layer_types": layers,
                 "attn": sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith("self_attn")})}
    if job.get("compile"):  # the serving form under torch.compile: no graph break, the same logits
        torch._dynamo.reset()
        with torch.no_grad():
            lg_fast = model(job["windows"], use_cache=False).logits.float()
            lg_comp = torch.compile(model, fullgraph=True, dynamic=False)(job["windows"], use_cache=False).logits.float()
        out[repo]["compiled_diff"] = (lg_comp - lg_fast).abs().max().item()
    if job.get("auto"):
        m = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.bfloat16,
                                                 device_map="auto").eval()
        with torch.no_grad():
            lg = m(job["windows"][:1].to(m.device)).logits.float().cpu()
            g = m.generate(job["prompt"].to(m.device), max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
        fast_auto = m.to_inference_form()
        with torch.no_grad():
            lg_fast = m(job["windows"][:1].to(m.device)).logits.float().cpu()
        out[repo]["auto"] = {"dtypes": sorted({str(p.dtype) for p in m.parameters()}),
                             "max_diff": (lg - logits[:1]).abs().max().item(), "gen_len": g.shape[1],
                             "device": str(m.device), "fast": fast_auto,
                             "fast_diff": (lg_fast - lg).abs().max().item()}
out["modules"] = sorted(n for n in sys.modules if n.split(".")[0] in ("acur", "modules", "datautils", "build_acur_repo"))
torch.save(out, sys.argv[2])
"""


def case_id(case) -> str:
    family, method, kv = case
    return f"{family}-{method}" + ("-kv" if kv else "")


@pytest.fixture(scope="module")
def exported(request, tiny_llama_dir, tiny_opt_dir, tiny_qwen2_dir, tiny_text_file, tmp_path_factory):
    """Every case exported in-process, then all reloaded in one fresh process: {case id: (in-process, child)}."""
    tmp = tmp_path_factory.mktemp("export_methods")
    dirs = {"llama": tiny_llama_dir, "opt": tiny_opt_dir, "qwen2": tiny_qwen2_dir}
    prompt = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(3))
    local, jobs = {}, {}
    for case in CASES:
        family, method, kv = case
        repo = tmp / case_id(case)
        extra = ["--compress_kv_cache", "--kv_cache_ratio_target", "0.5"] if kv else ["--param_ratio_target", "0.8"]
        if (registry.get(method).scale == "required") or method == "acur":
            extra.append("--act_aware")
        argv = tiny_args(dirs[family], tiny_text_file, tmp / f"work-{case_id(case)}", *extra, "--method", method,
                         "--sensitivity_metric", "stable_rank", "--eval_seqlen", str(EVAL_SEQLEN),
                         "--eval_max_windows", str(EVAL_WINDOWS), "--repo_dir", str(repo))
        _, model, tok, res = bar.build_repo(bar.build_parser().parse_args(argv))
        ids = datautils.get_eval_ids(f"text:{tiny_text_file}", tok)
        model.float().eval()
        with torch.no_grad():
            gen = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                 pad_token_id=tok.eos_token_id, use_cache=True)
        local[case_id(case)] = {"repo": repo, "res": res, "gen": gen,
                                "types": {n: type(m).__name__ for n, m in model.named_modules()
                                          if n in res["layers"] and res["layers"][n]["rank"] is not None},
                                "tok_ids": tok("the model compresses", add_special_tokens=False)["input_ids"]}
        jobs[str(repo)] = {"windows": windows(ids, EVAL_SEQLEN, EVAL_WINDOWS), "prompt": prompt,
                           "auto": case == ("qwen2", "acur", False) or case == ("llama", "svd", False),
                           "compile": case == ("llama", "srid", False)}
    child = run_fresh_loader(CHILD, jobs, tmp)
    return {k: (v, child[str(v["repo"])]) for k, v in local.items()}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_random_export_reloads_and_reproduces_perplexity(case, exported):
    local, child = exported[case_id(case)]
    family, method, kv = case
    repo, res = local["repo"], local["res"]
    ppl = next(iter(res["ppl"]["compressed"].values()))
    assert child["ppl"] == pytest.approx(ppl, rel=1e-5, abs=1e-6), (child["ppl"], ppl)  # fp32 round-off only
    assert torch.equal(child["gen"], local["gen"])
    assert child["class_module"].startswith("transformers_modules")
    assert child["layer_types"] == local["types"] and local["types"]  # every low-rank layer rebuilt as itself
    # model.to_inference_form(): the serving form (acur_fast.py) gives the same perplexity and tokens
    assert child["fast_ppl"] == pytest.approx(child["ppl"], rel=1e-5), (child["fast_ppl"], child["ppl"])
    assert torch.equal(child["fast_gen"], child["gen"])
    n_low = len(local["types"])
    if kv:  # the low-rank KV attention reads its k/v factors itself: left as they are, and said so
        assert child["fast"]["converted"] == 0 and len(child["fast"]["skipped"]) == n_low
    else:
        assert child["fast"]["converted"] == n_low and child["fast"]["skipped"] == []
        assert set(child["fast_layers"]) <= {"FastPair", "FastRowID", "FastColID"}
        if registry.get(method).form != "colid":  # q/k/v and gate/up (or OPT's q/k/v) of every block stacked
            assert len(child["fast"]["groups"]) >= 2
    assert "to_inference_form" in child["resave"]  # a rewritten model refuses save_pretrained, in one line
    if case == ("llama", "srid", False):  # an exported row-ID repo's serving form compiles whole (fullgraph)
        assert child["compiled_diff"] < 1e-4, child["compiled_diff"]
    cfg = json.loads((repo / "config.json").read_text())
    assert cfg["acur"]["method"] == method and cfg["model_type"] == f"acur_{family}"
    assert {s["method"] for s in cfg["lowrank_layers"].values()} == {method}
    assert cfg["lowrank_kv_cache"] is kv
    if kv:
        assert child["attn"] == ["LowRankKVAttention"] and set(cfg["lowrank_layers"]) == set(local["types"])
        assert all(n.rpartition(".")[2] in ("k_proj", "v_proj") for n in cfg["lowrank_layers"])
    # the tokenizer: the base model's class (trust_remote_code only reads the config), no model-type warning, same ids
    assert child["tok_ids"] == local["tok_ids"]
    assert "model of type" not in child["tok_log"] and "custom code" not in child["tok_log"], child["tok_log"]
    if "auto" in child:
        a = child["auto"]
        assert a["dtypes"] == ["torch.bfloat16"] and a["gen_len"] == 10 and a["max_diff"] < 0.5, a
        # device_map="auto" + bf16: the inference form converts (or says which layers accelerate holds) and
        # computes the same logits to bf16 round-off (U folded into C in fp64 rounds once instead of twice)
        assert a["fast"]["converted"] + len(a["fast"]["skipped"]) == len(local["types"]), a["fast"]
        assert a["fast"]["converted"] == len(local["types"]), a["fast"]
        assert a["fast_diff"] < 0.1, a


@pytest.mark.parametrize("case", [("llama", m, False) for m in METHODS], ids=case_id)
def test_random_export_stores_indices_as_tensors_not_config(case, exported):
    """config.json holds per-layer type/method/rank/shape only; kept indices are integer tensors in the weights."""
    from safetensors import safe_open
    local, _ = exported[case_id(case)]
    repo = local["repo"]
    cfg = json.loads((repo / "config.json").read_text())
    for spec in cfg["lowrank_layers"].values():
        assert set(spec) == {"type", "method", "rank", "in", "out", "bias"}
    with safe_open(str(repo / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name, spec in cfg["lowrank_layers"].items():
            assert f"{name}.weight" not in keys  # no dense copy of a compressed layer
            idx = [k for k in keys if k.startswith(name + ".") and k.rsplit(".", 1)[1] in
                   ("col_indices", "row_indices", "other_cols", "other_rows", "gather_index")]
            if spec["type"] in ("CURLinear", "RowIDLinear", "ColIDLinear"):
                assert idx, name  # the layers that keep actual columns / rows say which
            for k in idx:
                t = f.get_tensor(k)
                assert not t.is_floating_point() and t.dim() == 1
                kept = k.endswith(("col_indices", "row_indices"))
                assert not kept or t.numel() == spec["rank"]
                assert t.unique().numel() == t.numel()


def test_random_template_writes_any_family_without_new_files():
    """The per-family files come from the one template: Mistral and Gemma too, with their own classes."""
    names = {p.name for p in (ROOT / "huggingface_repos").iterdir() if p.suffix == ".py"}
    assert "modeling_acur_template.py" in names
    assert not [n for n in names if n.startswith(("modeling_acur_", "configuration_acur_")) and "template" not in n]
    for family, cls in (("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                        ("gemma", "GemmaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("opt", "OPTForCausalLM")):
        files = bar.family_files(family)
        stem = bar.family_names(family)["acur_base"]
        assert set(files) == {f"configuration_{stem}.py", f"modeling_{stem}.py"}
        modeling = files[f"modeling_{stem}.py"]
        assert f"from transformers import {cls}" in modeling and f"from .configuration_{stem} import" in modeling
        for src in files.values():
            compile(src, stem, "exec")
            assert "Base" not in src.replace("BaseModel", "")  # no placeholder left
        am = bar.auto_map(family)
        assert am["AutoModelForCausalLM"] == f"modeling_{stem}.Acur{cls.removesuffix('ForCausalLM')}ForCausalLM"
