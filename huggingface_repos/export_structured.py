"""Exports of a structured model (kept MLP neurons and attention heads): plain models, no factored layers.

  uniform   -- every layer keeps the same widths: a stock Hugging Face repo (config.json without auto_map,
               smaller intermediate_size / num_attention_heads / num_key_value_heads, head_dim kept) that
               `AutoModelForCausalLM.from_pretrained(path)` loads, plus a GGUF file (`llama` architecture).
  per_layer -- widths per layer: a GGUF file (`deci` architecture, which llama.cpp builds layer by layer)
               and a Hugging Face repo that loads with trust_remote_code=True (modeling_structured.py, a
               thin subclass of the stock LLaMA that builds each layer at its width).
The model card says which engines load the export and with which command.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from export_gguf import GGUF_FAMILIES, is_uniform, layer_widths, write_gguf

TEMPLATE = Path(__file__).resolve().parent / "modeling_structured_template.py"
WIDTH_MODES = ("uniform", "per_layer")
PER_LAYER_ENGINES = "llama.cpp (the deci GGUF) and transformers with trust_remote_code=True"


class StructuredExportError(ValueError):
    """The export asked for cannot be made; the message is one line."""


def check_width_mode(model: torch.nn.Module, width_mode: str, plain_hf: bool = True) -> None:
    """Refuse a plain (no remote code) HF export of per-layer widths: stock transformers cannot build it."""
    if width_mode not in WIDTH_MODES:
        raise StructuredExportError(f"width mode must be one of {', '.join(WIDTH_MODES)}, got {width_mode!r}")
    widths = layer_widths(model)
    uniform = is_uniform(widths)
    if width_mode == "uniform" and not uniform:
        raise StructuredExportError("the model's layers have different widths: export it as per_layer")
    if width_mode == "uniform" and model.config.hidden_size % widths[0].heads:
        raise StructuredExportError(f"{widths[0].heads} query heads do not divide hidden_size "
                                    f"{model.config.hidden_size}: stock transformers refuses such a config; "
                                    "export it as per_layer")
    if width_mode == "per_layer" and plain_hf:
        raise StructuredExportError(f"per_layer widths cannot be a plain Hugging Face repo (stock transformers "
                                    f"has one width for every layer); {PER_LAYER_ENGINES} load it")


def _plain_config(model: torch.nn.Module) -> dict:
    """config.json of the uniform export: the stock config with the kept widths."""
    w = layer_widths(model)[0]
    cfg = model.config.to_dict()
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    cfg.update(intermediate_size=w.intermediate, num_attention_heads=w.heads, num_key_value_heads=w.kv_heads,
               head_dim=head_dim)
    for key in ("auto_map", "_name_or_path"):
        cfg.pop(key, None)
    return cfg


def write_uniform_repo(model: torch.nn.Module, tokenizer, out_dir: Path, save_dtype: torch.dtype) -> dict:
    """A stock HF repo: config with the kept widths, safetensors of the sliced weights."""
    check_width_mode(model, "uniform")
    from transformers import AutoConfig
    cfg = AutoConfig.for_model(**_plain_config(model))
    cfg.architectures = [type(model).__name__]
    cfg.dtype = str(save_dtype).replace("torch.", "")
    original, dtype = model.config, next(model.parameters()).dtype
    model.config = cfg
    try:
        model.to(save_dtype).save_pretrained(out_dir)
    finally:
        model.config = original
        model.to(dtype)
    tokenizer.save_pretrained(out_dir)
    return {"format": "hf", "remote_code": False, "config": "config.json"}


def write_per_layer_repo(model: torch.nn.Module, tokenizer, out_dir: Path, save_dtype: torch.dtype) -> dict:
    """An HF repo of per-layer widths: the stock weights and a thin subclass, loaded with trust_remote_code."""
    if model.config.model_type != "llama":
        raise StructuredExportError(f"per_layer HF repos are written for the llama family, not "
                                    f"{model.config.model_type!r}; the GGUF export covers {', '.join(GGUF_FAMILIES)}")
    cfg = model.config.to_dict()
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    cfg.update(model_type="structured_llama", head_dim=head_dim, architectures=["StructuredLlamaForCausalLM"],
               layer_widths=[w.__dict__ for w in layer_widths(model)],
               auto_map={"AutoConfig": "modeling_structured.StructuredLlamaConfig",
                         "AutoModelForCausalLM": "modeling_structured.StructuredLlamaForCausalLM"},
               dtype=str(save_dtype).replace("torch.", ""))
    cfg.pop("_name_or_path", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    state = {k: v.detach().to("cpu", save_dtype).contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    shutil.copyfile(TEMPLATE, out_dir / "modeling_structured.py")
    tokenizer.save_pretrained(out_dir)
    return {"format": "hf", "remote_code": True, "config": "config.json"}


def engine_commands(width_mode: str, gguf_name: str) -> list[tuple[str, str]]:
    """(engine, command) pairs for the model card."""
    rows = []
    if width_mode == "uniform":
        rows.append(("transformers (stock, no remote code)",
                     "AutoModelForCausalLM.from_pretrained(path)"))
    else:
        rows.append(("transformers (remote code)",
                     "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"))
    rows += [("llama.cpp", f"llama-cli -m {gguf_name} -p \"...\"  (perplexity: llama-perplexity -m {gguf_name} -f text.txt)"),
             ("llama-cpp-python", f"llama_cpp.Llama(model_path=\"{gguf_name}\")")]
    return rows


def export_structured(model: torch.nn.Module, tokenizer, out_dir: Path, width_mode: str, *,
                      save_dtype: torch.dtype = torch.bfloat16, gguf_dtype: str = "f16",
                      source_gguf: str | Path | None = None, name: str = "model") -> dict:
    """Write the HF repo and the GGUF file of a structured model into out_dir; returns what was written."""
    check_width_mode(model, width_mode, plain_hf=False)
    out_dir = Path(out_dir)
    gguf_name = f"{name.replace('/', '_')}-{gguf_dtype}.gguf"
    tok_dir = out_dir / ".tokenizer"
    tokenizer.save_pretrained(tok_dir)
    gguf_info = write_gguf(model, out_dir / gguf_name, tokenizer_dir=tok_dir, source_gguf=source_gguf,
                           dtype=gguf_dtype, name=name)
    shutil.rmtree(tok_dir)
    with torch.no_grad():
        hf = (write_uniform_repo if width_mode == "uniform" else write_per_layer_repo)(model, tokenizer, out_dir,
                                                                                   save_dtype)
    return {"width_mode": width_mode, "hf": hf, "gguf": {**gguf_info, "file": gguf_name},
            "engines": engine_commands(width_mode, gguf_name)}


def model_card(results: dict, info: dict, repo_dir: Path) -> str:
    """README.md of a structured export: what was kept, which engines load it (with the command), figures."""
    a, pr = results["args"], results.get("param_ratio", {})
    widths = info["gguf"]["widths"]
    mode = info["width_mode"]
    kept = (f"every layer keeps {widths[0]['intermediate']} MLP neurons, {widths[0]['heads']} query heads and "
            f"{widths[0]['kv_heads']} key/value heads" if mode == "uniform" else
            f"MLP neurons per layer {min(w['intermediate'] for w in widths)}-{max(w['intermediate'] for w in widths)}, "
            f"query heads {min(w['heads'] for w in widths)}-{max(w['heads'] for w in widths)} "
            "(`layer_widths` in config.json)")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [cur4llm, structured-cur, pruning, gguf]", "---", "", f"# {repo_dir.name}", "",
             f"`{a['model_id']}` compressed with CUR4LLM's structured CUR (method **{a.get('method')}**, widths "
             f"**{mode}**): whole MLP neurons and whole key/value groups (with their query heads) are kept, "
             "down_proj and o_proj refitted on calibration activations. The result is a plain, smaller model, "
             f"no factored layer: {kept}.", "",
             f"Parameter ratio of the compressed linears: target {pr.get('target')}, reached "
             f"{pr.get('reached', 1.0):.4f}.", "", "## Engines that load it", "", "| engine | command |", "|---|---|"]
    lines += [f"| {eng} | `{cmd}` |" for eng, cmd in info["engines"]]
    lines += ["", f"The GGUF file (`{info['gguf']['file']}`, architecture `{info['gguf']['architecture']}`) was "
              "written with the `gguf` package following llama.cpp's LLaMA conventions"
              + ("." if mode == "uniform" else "; `deci` is the llama.cpp architecture that builds every layer at "
                 "its own width (plain `llama` builds all layers at layer 0's). Stock transformers has one width "
                 "for all layers, hence the remote code (`modeling_structured.py`, a thin subclass of "
                 "LlamaForCausalLM); its static KV cache assumes one head count, so decode with the dynamic cache."),
              "", "## Perplexity (measured by acur.py on this model)", ""]
    for label, ppl in results.get("ppl", {}).items():
        lines.append(f"- {label}: " + ", ".join(f"{ds} {v:.3f}" for ds, v in ppl.items()))
    from tools.compare_table import run_row_markdown  # the row of tools/compare.py's table (accuracy too)
    row = run_row_markdown(results)
    if row:
        lines += ["", "## Results row (the layout of tools/compare.py's table)", ""] + row
    lines += ["", "Full results of the run: `acur_results.json`. Licence: that of the base model.", ""]
    return "\n".join(lines)


def write_structured_repo(model: torch.nn.Module, tokenizer, results: dict, repo_dir: Path, width_mode: str, *,
                          save_dtype: torch.dtype, source_gguf: str | Path | None = None) -> dict:
    """The whole export into a fresh sibling folder, then swapped in (never mixed with an older export):
    HF repo, GGUF file, model card, acur_results.json; returns the export record kept in the results."""
    from cache_store import staged_folder
    with staged_folder(repo_dir) as tmp:
        info = export_structured(model, tokenizer, tmp, width_mode, save_dtype=save_dtype, source_gguf=source_gguf,
                                 name=repo_dir.name)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["cur4llm_structured"] = {"base_model": results["args"]["model_id"], "method": results["args"].get("method"),
                                     "width_mode": width_mode, "param_ratio": results.get("param_ratio")}
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    export = {"repo_dir": str(repo_dir), "structured": info,
              "files": sorted({p.name for p in repo_dir.iterdir()} | {"README.md", "acur_results.json"})}
    results["export"] = export
    (repo_dir / "README.md").write_text(model_card(results, info, repo_dir))
    (repo_dir / "acur_results.json").write_text(json.dumps(results, indent=1, default=str))
    return export
