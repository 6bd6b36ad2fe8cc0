"""Compress a LLaMA or OPT checkpoint with acur.py's pipeline and save it as a Hugging Face repo that
loads with `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`.

    python huggingface_repos/build_acur_repo.py --model_id smollm2-135m --act_aware --alpha 0.5 \\
        --n_calib_samples 16 --scaling_method abs_mean --param_ratio_target 0.9 --use_cache

Every acur.py flag works here (same parser, same pipeline); this script adds the --repo_* flags and
--push. The repo holds safetensors weights (C, U, R of each compressed layer; no dense copies), the
tokenizer, the generation config, config.json with `cur_layers` and `auto_map`, the copied
configuration/modeling files, a model card README.md and acur_results.json.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import acur  # noqa: E402
import datautils  # noqa: E402
from acur import UsageError  # noqa: E402
from modules import decompositions, kv_cache  # noqa: E402
from modules.cur_linear import CURLinear  # noqa: E402
from modules.model_utils import find_linears  # noqa: E402

# model_type -> (configuration module, config class, modeling module, model class)
FAMILIES = {
    "llama": ("configuration_acur_llama", "AcurLlamaConfig", "modeling_acur_llama", "AcurLlamaForCausalLM"),
    "opt": ("configuration_acur_opt", "AcurOPTConfig", "modeling_acur_opt", "AcurOPTForCausalLM"),
}
# config keys that describe the base checkpoint rather than the exported one
_DROP_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path",
                     "quantization_config", "cur_layers", "acur")


def build_parser():
    """acur.py's parser plus the export flags."""
    p = acur.build_parser()
    p.description = "Compress with ACUR and export a Hugging Face repo (trust_remote_code)"
    g = p.add_argument_group("Hugging Face repo")
    g.add_argument("--repo_dir", default=None,
                   help="output folder (default huggingface_repos/<model-name>-acur<ratio*100>)")
    g.add_argument("--save_dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the saved weights; auto = the dtype the pipeline ran in")
    g.add_argument("--verify", action="store_true",
                   help="reload the repo in a fresh process and compare logits with the in-memory model")
    g.add_argument("--push", action="store_true", help="upload the repo with huggingface_hub")
    g.add_argument("--repo_name", default=None,
                   help="hub repo id for --push: 'user/name', or 'name' under your account; unset: the folder name")
    g.add_argument("--private", action="store_true", help="create the hub repo private (with --push)")
    return p


# ---------------------------------------------------------------- checks before any heavy work
def model_family(args) -> str:
    """'llama' or 'opt' from the checkpoint's config; UsageError for anything else."""
    from transformers import AutoConfig
    path, _ = acur.resolve_model(args)
    try:
        cfg = AutoConfig.from_pretrained(path, revision=args.revision)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model not found or hub unreachable: {args.model_id!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if cfg.model_type not in FAMILIES:
        raise UsageError(f"build_acur_repo.py exports {' and '.join(FAMILIES)} checkpoints; "
                         f"{args.model_id!r} has model_type {cfg.model_type!r}")
    return cfg.model_type


def model_name(model_id: str) -> str:
    """Folder-friendly name of the base model: the offline alias's real name, else the last path part."""
    if model_id in datautils.OFFLINE_MODELS:
        return datautils.OFFLINE_MODELS[model_id]["dirname"]
    return Path(os.path.expanduser(model_id).rstrip("/")).name


def default_repo_dir(args, ratio: float) -> Path:
    tag = "acurkv" if getattr(args, "compress_kv_cache", False) else "acur"  # KV mode: ratio of the cache
    return HERE / f"{model_name(args.model_id)}-{tag}{int(round(ratio * 100))}"


def check_repo_dir(path: Path) -> None:
    """Refuse to replace a folder that is not an earlier ACUR export (never delete a user's files)."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    cfg = path / "config.json"
    try:
        is_export = path.is_dir() and "cur_layers" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        is_export = False
    if not is_export:
        raise UsageError(f"--repo_dir {path} exists and is not an ACUR export; choose another folder")


def hub_client(args):
    """(HfApi, repo id) for --push, checked before compressing: token present and the hub reachable."""
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise UsageError("--push needs the huggingface_hub package (pip install huggingface_hub)") from None
    token = get_token()
    if not token:
        raise UsageError("--push needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    api = HfApi(token=token)
    repo_id = args.repo_name
    if not repo_id or "/" not in repo_id:
        try:
            user = api.whoami()["name"]
        except Exception as exc:  # offline, proxy, bad token: all end the run the same way
            raise UsageError(f"--push: cannot reach the Hugging Face hub or the token is invalid "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        repo_id = f"{user}/{repo_id}" if repo_id else user + "/"
    return api, repo_id


# ---------------------------------------------------------------- export
def family_classes(family: str):
    """The repo's own config and model classes (huggingface_repos/ is a namespace package)."""
    import importlib
    cfg_mod, cfg_cls, mdl_mod, mdl_cls = FAMILIES[family]
    return (getattr(importlib.import_module(f"huggingface_repos.{cfg_mod}"), cfg_cls),
            getattr(importlib.import_module(f"huggingface_repos.{mdl_mod}"), mdl_cls))


def cur_layer_specs(model) -> dict[str, dict]:
    """{layer name: {rank, in, out, bias, cols, rows}} for every CURLinear of the compressed model."""
    specs = {}
    for info in find_linears(model, include_lm_head=True, types=(CURLinear,)):
        m = info.module
        specs[info.name] = {"rank": m.rank, "in": m.in_features, "out": m.out_features,
                            "bias": m.bias is not None, "cols": m.col_indices.tolist(),
                            "rows": m.row_indices.tolist()}
    return specs


def export_config(model, family: str, specs: dict, results: dict, save_dtype: torch.dtype):
    cfg_cls, _ = family_classes(family)
    cfg_mod, _, mdl_mod, mdl_cls = FAMILIES[family]
    base = {k: v for k, v in model.config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
    cfg = cfg_cls.from_dict(base)
    cfg.cur_layers = specs
    cfg.acur = {"base_model": results["args"]["model_id"], "method": "ACUR (activation-aware CUR)",
                "param_ratio": results.get("param_ratio"), "schema": results.get("schema"),
                "settings": card_settings(results["args"])}
    cfg.architectures = [mdl_cls]
    cfg.auto_map = {"AutoConfig": f"{cfg_mod}.{cfg_cls.__name__}",
                    "AutoModelForCausalLM": f"{mdl_mod}.{mdl_cls}"}
    cfg.use_cache = True  # the pipeline turns it off for perplexity runs
    cfg.lowrank_kv_cache = bool(results["args"].get("compress_kv_cache"))  # modeling file caches k/v latents
    if results.get("kv_cache"):
        cfg.acur["kv_cache"] = results["kv_cache"]
    cfg.dtype = save_dtype
    if "lm_head" in specs:
        cfg.tie_word_embeddings = False  # the compressed head no longer shares the embedding
    return cfg


def build_export_model(model, family: str, cfg, save_dtype: torch.dtype):
    """The repo's model class holding the compressed model's tensors (built on meta, no dense copy)."""
    _, mdl_cls = family_classes(family)
    foreign = sorted({type(m).__name__ for m in model.modules()
                      if type(m).__module__.startswith("modules.")
                      and not isinstance(m, (CURLinear, kv_cache.LowRankKVAttention))})  # KV mode: rebuilt from config
    if foreign:
        raise UsageError(f"the compressed model holds {', '.join(foreign)}; the repo format knows only "
                         "CURLinear (and dense nn.Linear)")
    with torch.device("meta"):
        out = mdl_cls(cfg)
    state = {k: (v.to(save_dtype) if v.is_floating_point() else v).detach().cpu()
             for k, v in model.state_dict().items()}
    expected = set(out.state_dict())
    if cfg.tie_word_embeddings:
        tied = set(getattr(out, "_tied_weights_keys", None) or {})
        state = {k: v for k, v in state.items() if k not in tied}
        expected -= tied
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UsageError(f"the compressed model does not fit the repo format (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}); modules other than Linear/CURLinear?")
    out.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        out.tie_weights()
    meta = [n for n, t in list(out.named_parameters()) + list(out.named_buffers()) if t.is_meta]
    if meta:
        # non-persistent buffers (rotary inv_freq) are rebuilt at load; take them from the source model
        src = dict(model.named_buffers())
        for n in meta:
            if n not in src:
                raise UsageError(f"export left {n} uninitialised")
            parent, _, attr = n.rpartition(".")
            out.get_submodule(parent).register_buffer(attr, src[n].detach().cpu().clone(), persistent=False)
    out.generation_config = model.generation_config
    return out.eval()


def dir_bytes(path: Path, suffixes=(".safetensors", ".bin")) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.suffix in suffixes)


def size_report(args, results: dict, repo_dir: Path, save_dtype: torch.dtype) -> dict:
    """Dense vs compressed bytes: weight files on disk, and dense parameters at the saved dtype."""
    src, _ = acur.resolve_model(args)
    elem = torch.tensor([], dtype=save_dtype).element_size()
    rep = {"compressed_weight_bytes": dir_bytes(repo_dir),
           "dense_bytes_at_save_dtype": results["model"]["params_total"] * elem,
           "dense_checkpoint_bytes": dir_bytes(Path(src)) if os.path.isdir(src) else None,
           "repo_total_bytes": sum(f.stat().st_size for f in repo_dir.rglob("*") if f.is_file()),
           "save_dtype": str(save_dtype).replace("torch.", "")}
    rep["ratio_vs_dense_at_save_dtype"] = rep["compressed_weight_bytes"] / rep["dense_bytes_at_save_dtype"]
    return rep


_SETTING_KEYS = ("param_ratio_target", "ppl_target", "act_aware", "alpha", "scaling_method", "selection",
                 "u_mode", "rank_align", "compress_lm_head", "calib_dataset", "n_calib_samples",
                 "calib_seqlen", "seed", "use_bos", "sensitivity_metric", "sensitivity_ratios", "dtype",
                 "weight_quant", "quant_group_size", "compress_kv_cache", "kv_cache_ratio_target")


def card_settings(a: dict) -> dict:
    return {k: a[k] for k in _SETTING_KEYS if k in a}


def model_card(args, results: dict, sizes: dict, repo_dir: Path, family: str, verify: dict | None,
               load_id: str | None = None) -> str:
    """README.md of the repo: base model, method, settings, parameter counts, perplexity, bytes.
    load_id: what the usage snippet loads (the hub id when pushing, else the folder name)."""
    a, m, pr = results["args"], results["model"], results.get("param_ratio", {})
    base = a["model_id"]
    if base in datautils.OFFLINE_MODELS:
        s = datautils.OFFLINE_MODELS[base]
        base_text = (f"{s['dirname']} (offline alias `{base}`: the {Path(s['member']).name} GGUF of PyPI "
                     f"package {s['package']}=={s['version']}, converted to an fp32 HF checkpoint)")
    else:
        base_text = f"`{base}`"
    hub_base = base if "/" in base and not os.path.isdir(os.path.expanduser(base)) else None
    load_id = load_id or repo_dir.name
    mb = lambda b: f"{b / 2**20:,.1f} MiB" if b is not None else "n/a"  # noqa: E731
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [cur4llm, acur, cur-decomposition, compression]"]
    if hub_base:
        lines.append(f"base_model: {hub_base}")
    lines += ["---", "", f"# {repo_dir.name}", "",
              f"**{base_text}** compressed with **ACUR**, activation-aware CUR decomposition (CUR4LLM). "
              "Every compressed linear layer stores actual columns C and rows R of its original weight and a "
              "small core U (y = C U R x + b); `config.json` lists, per layer, the rank and the indices of the "
              "kept columns and rows (`cur_layers`).", "",
              "## Load", "", "```python", "import torch",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{load_id}", trust_remote_code=True,',
              '                                             dtype=torch.float16, device_map="auto")',
              f'tokenizer = AutoTokenizer.from_pretrained("{load_id}")', "```", "",
              "The custom code (`modeling_acur_{0}.py`, `configuration_acur_{0}.py`) builds the CUR layers "
              "before the weights load, so the dense weights are never materialised.".format(family), "",
              "## Parameters and size", "", "| | dense | compressed |", "|---|---:|---:|",
              f"| parameters (whole model) | {m['params_total']:,} | {m.get('params_compressed', m['params_total']):,} |",
              f"| parameters (compressed linears) | {pr.get('compressed_linears_dense', 0):,} | "
              f"{pr.get('compressed_linears_kept', 0):,} |",
              f"| weight bytes at {sizes['save_dtype']} | {mb(sizes['dense_bytes_at_save_dtype'])} | "
              f"{mb(sizes['compressed_weight_bytes'])} |", "",
              f"Parameter ratio of the compressed linears: target {pr.get('target')}, reached "
              f"{pr.get('reached', 1.0):.4f}; {len(results.get('layers', {}))} linears considered, "
              f"{sum(1 for r in results.get('layers', {}).values() if r['rank'] is not None)} compressed.", ""]
    if results.get("kv_cache"):
        kv = results["kv_cache"]
        lines += [f"**KV cache:** k_proj/v_proj only; the cache holds their rank-k latents (U R x) instead of K "
                  f"and V (`config.lowrank_kv_cache`): {kv['bytes_per_token_dense']:,} -> "
                  f"{kv['bytes_per_token_compressed']:,} bytes per token at {kv['dtype']} (cached dims ratio "
                  f"{kv['reached']:.4f}, target {kv['ratio_target']}).", ""]
    if a.get("weight_quant", "none") != "none":
        lines += [f"**Quantization** `{a['weight_quant']}` was simulated (quantize-dequantize): the weights are "
                  "stored as dequantized floats, so the files do not shrink by the bit width.", ""]
    if results.get("fallbacks"):
        lines += [f"**Fallbacks:** {len(results['fallbacks'])} layers fell back to uniform selection "
                  "(see acur_results.json).", ""]
    if results.get("broken_result"):  # acur.broken_result: never publish a broken model as a normal one
        lines += [f"**WARNING: broken result.** {results['broken_result']['summary']}", ""]
    lines += ["## Perplexity (measured by acur.py on this model)", ""]
    ppl = results.get("ppl", {})
    if ppl:
        lines += [f"Windows of {a['eval_seqlen']} tokens"
                  + (f", at most {a['eval_max_windows']} per dataset" if a.get("eval_max_windows") else "")
                  + ", mean NLL over non-overlapping windows.", "", "| dataset | "
                  + " | ".join(ppl) + " |", "|---|" + "---:|" * len(ppl)]
        for ds in sorted({d for v in ppl.values() for d in v}):
            lines.append(f"| {ds} | " + " | ".join(f"{v[ds]:.3f}" if ds in v else "" for v in ppl.values()) + " |")
    else:
        lines.append("Not measured (run with --eval_ppl).")
    lines += ["", "## Settings", "", "```json", json.dumps(card_settings(a), indent=1), "```", ""]
    if verify:
        lines += [f"Round trip checked at export: reloaded in a fresh process in {verify['load_s']:.2f} s, "
                  f"max |logit difference| {verify['max_abs_logit_diff']:.2e} (fp32).", ""]
    lines += ["Full results of the run: `acur_results.json`. Licence: that of the base model.", ""]
    return "\n".join(lines)


_VERIFY_CHILD = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
repo, ids_path, out_path = sys.argv[1:4]
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32).eval()
load_s = time.perf_counter() - t0
with torch.no_grad():
    logits = model(torch.load(ids_path)).logits
torch.save({"logits": logits, "load_s": load_s,
            "params": sum(p.numel() for p in model.parameters())}, out_path)
"""


def verify_repo(repo_dir: Path, model, tokenizer) -> dict:
    """Reload the repo in a fresh Python process (fp32) and compare logits on a short text."""
    import tempfile
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids[:, :32]
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out_path = Path(tmp) / "ids.pt", Path(tmp) / "out.pt"
        torch.save(ids, ids_path)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _VERIFY_CHILD, str(repo_dir), str(ids_path), str(out_path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"reloading {repo_dir} failed:\n{proc.stderr[-3000:]}")
        child = torch.load(out_path)
    p = next(model.parameters())
    with torch.no_grad():
        ref = model.float()(ids.to(p.device)).logits.cpu()
    model.to(p.dtype)
    return {"load_s": child["load_s"], "process_s": time.perf_counter() - t0,
            "max_abs_logit_diff": (child["logits"] - ref).abs().max().item(),
            "params_equal": child["params"] == sum(q.numel() for q in model.parameters())}


def write_repo(model, tokenizer, results: dict, args, family: str, repo_dir: Path,
               hub_id: str | None = None) -> dict:
    """Save everything into a fresh sibling folder, then swap it in (no mix with an older export)."""
    save_dtype = next(model.parameters()).dtype if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    specs = cur_layer_specs(model)
    if not specs:
        raise UsageError("no layer was compressed: nothing to export (ratio target 1.0?)")
    cfg = export_config(model, family, specs, results, save_dtype)
    export = build_export_model(model, family, cfg, save_dtype)
    tmp = repo_dir.with_name(repo_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    cfg_mod, _, mdl_mod, _ = FAMILIES[family]
    for mod in (cfg_mod, mdl_mod):
        shutil.copy2(HERE / f"{mod}.py", tmp / f"{mod}.py")
    (tmp / "acur_kv_cache.py").write_text(kv_cache.runtime_source())  # imported by the modeling file
    old = repo_dir.with_name(repo_dir.name + f".old{os.getpid()}")
    if repo_dir.exists():
        repo_dir.rename(old)
    tmp.rename(repo_dir)
    shutil.rmtree(old, ignore_errors=True)
    sizes = size_report(args, results, repo_dir, save_dtype)
    verify = verify_repo(repo_dir, model, tokenizer) if args.verify else None
    export_info = {"repo_dir": str(repo_dir), "family": family, "sizes": sizes, "verify": verify,
                   "cur_layers": len(specs)}
    results["export"] = export_info
    (repo_dir / "README.md").write_text(model_card(args, results, sizes, repo_dir, family, verify, hub_id))
    (repo_dir / "acur_results.json").write_text(json.dumps(results, indent=1, default=str))
    return export_info


def push_repo(api, repo_id: str, repo_dir: Path, private: bool) -> str:
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(repo_dir), repo_id=repo_id,
                          commit_message=f"ACUR export {repo_dir.name}")
    except Exception as exc:  # network or permission: one clear line, the local repo stays
        raise UsageError(f"--push to {repo_id} failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); the repo is saved "
                         f"locally at {repo_dir}") from None
    return f"https://huggingface.co/{repo_id}"


def build_repo(args) -> tuple[Path, torch.nn.Module, object, dict]:
    """Entry: checks, acur.run_pipeline, export (+ verify, + push).
    Returns (repo dir, in-memory compressed model, tokenizer, results) like run_pipeline."""
    if args.raw_model:
        raise UsageError("--raw_model exports nothing compressed; use the base checkpoint as it is")
    acur.validate_args(args)
    if decompositions.method_form(args.method) != "cur":
        raise UsageError(f"--method {args.method} makes {decompositions.method_form(args.method)} layers; the repo "
                         "format knows only CUR layers (--method acur or cur)")
    family = model_family(args)
    if args.repo_dir:
        check_repo_dir(Path(args.repo_dir))
    elif args.param_ratio_target != -1 or args.compress_kv_cache:
        check_repo_dir(default_repo_dir(args, args.kv_cache_ratio_target if args.compress_kv_cache
                                        else args.param_ratio_target))
    hub = hub_client(args) if args.push else None
    model, tokenizer, results = acur.run_pipeline(args)
    ratio = (args.kv_cache_ratio_target if args.compress_kv_cache else
             args.param_ratio_target if args.param_ratio_target != -1 else results["param_ratio"]["reached"])
    repo_dir = Path(args.repo_dir) if args.repo_dir else default_repo_dir(args, ratio)
    check_repo_dir(repo_dir)
    api, repo_id = hub if hub is not None else (None, None)
    if repo_id and repo_id.endswith("/"):
        repo_id += repo_dir.name
    export = write_repo(model, tokenizer, results, args, family, repo_dir, repo_id)
    if api is not None:
        export["pushed_to"] = push_repo(api, repo_id, repo_dir, args.private)
    return repo_dir, model, tokenizer, results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        repo_dir, _, _, results = build_repo(args)
    except UsageError as exc:
        print(f"build_acur_repo.py: error: {exc}", file=sys.stderr)
        return 2
    acur.print_summary(results)
    ex = results["export"]
    s = ex["sizes"]
    print(f"repo: {repo_dir}  ({ex['cur_layers']} CUR layers)")
    print(f"weight bytes: compressed {s['compressed_weight_bytes']:,} vs dense {s['dense_bytes_at_save_dtype']:,} "
          f"at {s['save_dtype']} ({s['ratio_vs_dense_at_save_dtype']:.3f})"
          + (f"; dense checkpoint on disk {s['dense_checkpoint_bytes']:,}" if s["dense_checkpoint_bytes"] else ""))
    if ex.get("verify"):
        v = ex["verify"]
        print(f"verify: reload {v['load_s']:.2f} s in a fresh process, max |logit diff| "
              f"{v['max_abs_logit_diff']:.2e}, params equal: {v['params_equal']}")
    if ex.get("pushed_to"):
        print(f"pushed: {ex['pushed_to']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
