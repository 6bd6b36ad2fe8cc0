"""Compress a decoder-only checkpoint (LLaMA, OPT, Qwen2, Mistral, ...) with acur.py's pipeline, any --method,
and save it as a Hugging Face repo that loads with `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`.

    python huggingface_repos/build_acur_repo.py --model_id smollm2-135m --act_aware --alpha 0.5 \\
        --n_calib_samples 16 --scaling_method abs_mean --param_ratio_target 0.9 --use_cache

Every acur.py flag works here (same parser, same pipeline); this script adds the --repo_* flags and
--push. The repo holds safetensors weights (the factors of each compressed layer and its kept indices as
integer tensors; no dense copies), the tokenizer, the generation config, config.json with `lowrank_layers`
(per-layer type, method, rank, shape) and `auto_map`, the configuration/modeling files written per family
from modeling_acur_template.py, the layer classes (acur_layers.py, copied from modules/ with
inspect.getsource), the KV runtime (acur_kv_cache.py) and the packed-weight runtime (acur_packed.py), a model
card README.md and acur_results.json.

A streamed run (--stream) is exported from its run folder one block a shard (streamed_export.py): the
host never holds the whole compressed model, and the repo equals the in-memory export's.

With --weight_quant the safetensors hold the quantized matrices packed (int8 codes, or two 4-bit codes per
byte, with their scales and zero points; `packed_quant` in config.json), not floats: real bytes. The
model card and the export summary say what the weight files hold and their size against the dense checkpoint.
"""
from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import acur  # noqa: E402
import datautils  # noqa: E402
import quantization  # noqa: E402
from acur import UsageError  # noqa: E402
from cache_store import staged_folder, unwritable  # noqa: E402
from modules import fast_layers, kv_cache, packed_linear  # noqa: E402
from modules.model_utils import check_architecture, find_linears  # noqa: E402
from modules import registry  # noqa: E402
from modules.runtime_text import runtime_source  # noqa: E402
from tools.compare_table import run_row_markdown  # noqa: E402

import export_gguf  # noqa: E402
import export_structured  # noqa: E402
import model_loading  # noqa: E402
import streamed  # noqa: E402
import streamed_export  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

TEMPLATE = HERE / "modeling_acur_template.py"  # the one source of every family's configuration/modeling files
# config keys that describe the base checkpoint rather than the exported one
_DROP_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path",
                     "quantization_config", "cur_layers", "lowrank_layers", "lowrank_kv_cache", "acur")


def build_parser():
    """acur.py's parser plus the export flags."""
    p = acur.build_parser()
    p.description = "Compress with ACUR and export a Hugging Face repo (trust_remote_code)"
    g = p.add_argument_group("Hugging Face repo")
    g.add_argument("--repo_dir", default=None,
                   help="output folder (default huggingface_repos/<model-name>-acur<ratio*100>)")
    g.add_argument("--save_dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the saved weights; auto = the dtype the pipeline ran in")
    g.add_argument("--save_simulated_quant", action="store_true",
                   help="with --weight_quant: store the dequantized floats (the simulated model, as research runs "
                        "measure it) instead of the packed integer codes and scales")
    g.add_argument("--verify", action="store_true",
                   help="reload the repo in a fresh process and compare logits with the in-memory model")
    g.add_argument("--push", action="store_true", help="upload the repo with huggingface_hub")
    g.add_argument("--repo_name", default=None,
                   help="hub repo id for --push: 'user/name', or 'name' under your account; unset: the folder name")
    g.add_argument("--private", action="store_true", help="create the hub repo private (with --push)")
    g.add_argument("--plain_hf", action="store_true",
                   help="structured methods: the HF repo must load in stock transformers without remote code "
                        "(uniform widths only; per_layer is refused and says which engines load it)")
    g.add_argument("--gguf_dtype", default="f16", choices=["f16", "f32"],
                   help="structured methods: dtype of the GGUF file's matrices (norms stay f32)")
    return p


# ---------------------------------------------------------------- checks before any heavy work
def model_family(args) -> str:
    """The checkpoint's model_type, when the pipeline can walk its layout (model_utils.check_architecture);
    UsageError otherwise. Checked on the meta device: no weights are read."""
    from transformers import AutoConfig
    path, _ = datautils.resolve_model(args)
    try:
        cfg = AutoConfig.from_pretrained(path, revision=args.revision)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model not found or hub unreachable: {args.model_id!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    try:
        check_architecture(cfg)
    except ValueError as exc:
        raise UsageError(f"{args.model_id}: {exc}") from None
    return cfg.model_type


def model_name(model_id: str) -> str:
    """Folder-friendly name of the base model: the offline alias's real name, else the last path part."""
    if model_id in datautils.OFFLINE_MODELS:
        return datautils.OFFLINE_MODELS[model_id]["dirname"]
    return Path(os.path.expanduser(model_id).rstrip("/")).name


def default_repo_dir(args, ratio: float) -> Path:
    method = getattr(args, "method", "acur")
    tag = "acurkv" if getattr(args, "compress_kv_cache", False) else method  # KV mode: ratio of the cache
    return HERE / f"{model_name(args.model_id)}-{tag}{int(round(ratio * 100))}"


# what an export written before acur_results.json listed its files ("export": {"files"}) can hold: the names
# this script and save_pretrained write; anything else in the folder is the user's
_EXPORT_NAMES = re.compile(r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                           r"model\.safetensors\.index\.json|tokenizer\w*\.(json|model)|special_tokens_map\.json|"
                           r"added_tokens\.json|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)|"
                           r"(configuration|modeling)_acur_\w+\.py|acur_\w+\.(py|json)|README\.md|__pycache__")


def export_files(path: Path) -> set[str] | None:
    """The names an earlier export says it wrote (acur_results.json), or None when it does not say."""
    try:
        files = json.loads((path / "acur_results.json").read_text())["export"]["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(files) if isinstance(files, list) else None


def check_repo_dir(path: Path) -> None:
    """Refuse to replace a folder that is not an earlier ACUR export, or an export that holds files this
    script did not write: re-exporting replaces the whole folder, and a user's file is never deleted."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    cfg = path / "config.json"
    try:
        keys = json.loads(cfg.read_text()) if path.is_dir() else {}
        is_export = ("lowrank_layers" in keys or "cur_layers" in keys  # cur_layers: exports before the template
                     or "cur4llm_structured" in keys)
    except (OSError, ValueError):
        is_export = False
    if not is_export:
        raise UsageError(f"--repo_dir {path} exists and is not an ACUR export; choose another folder")
    written = export_files(path)
    foreign = sorted(p.name for p in path.iterdir()
                     if (p.name not in written if written is not None else not _EXPORT_NAMES.fullmatch(p.name)))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UsageError(f"--repo_dir {path} holds {path / foreign[0]}{more}, which build_acur_repo.py did not "
                         "write; re-exporting replaces the whole folder: move it out or choose another folder")


def check_structured_export(args) -> None:
    """A structured export (plain model + GGUF) knows the LLaMA family's blocks; per_layer widths cannot be a
    plain HF repo. Both said in one line before any heavy work."""
    from transformers import AutoConfig
    path, _ = datautils.resolve_model(args)
    model_type = AutoConfig.from_pretrained(path, revision=args.revision).model_type
    if model_type not in export_gguf.GGUF_FAMILIES:
        raise UsageError(f"structured exports (plain HF repo + GGUF) are written for the "
                         f"{', '.join(export_gguf.GGUF_FAMILIES)} family, not {model_type!r}; acur.py compresses "
                         "it all the same")
    if args.plain_hf and args.structured_widths == "per_layer":
        raise UsageError(f"--plain_hf with --structured_widths per_layer: stock transformers has one width for "
                         f"every layer; {export_structured.PER_LAYER_ENGINES} load it (or use "
                         "--structured_widths uniform)")


def offline_gguf(args) -> Path | None:
    """The GGUF the offline model was converted from: its tokenizer is copied verbatim into the export's GGUF."""
    spec = datautils.OFFLINE_MODELS.get(args.model_id)
    path = datautils.home_dir() / "gguf" / Path(spec["member"]).name if spec else None
    return path if path is not None and path.exists() else None


def check_repo_parent(folder: Path) -> None:
    """The export is written beside its folder, then swapped in: that parent must accept new files."""
    why = unwritable(folder)
    if why:
        raise UsageError(f"cannot write the export into {folder} ({why}); choose another --repo_dir")


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


# ---------------------------------------------------------------- export: code of the repo
def family_names(model_type: str) -> dict[str, str]:
    """Placeholder -> name for one family: its transformers config and model classes, the exported class
    prefix and the file suffix (llama -> AcurLlama / acur_llama, opt -> AcurOPT / acur_opt)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    return {"AcurBase": "Acur" + model_cls.removesuffix("ForCausalLM"),
            "acur_base": "acur_" + re.sub(r"\W", "_", model_type),
            "BaseConfig": CONFIG_MAPPING_NAMES[model_type], "BaseForCausalLM": model_cls}


def template_section(name: str) -> str:
    text = TEMPLATE.read_text()
    begin, end = f"# ===== BEGIN {name} =====\n", f"# ===== END {name} ====="
    return text[text.index(begin) + len(begin):text.index(end)]


def family_files(model_type: str) -> dict[str, str]:
    """{file name: source} of the configuration and modeling files of one family, from the one template."""
    names = family_names(model_type)
    out = {}
    for section, stem in (("CONFIGURATION", "configuration"), ("MODELING", "modeling")):
        src = template_section(section)
        src = re.sub(r"\bAcurBase", names["AcurBase"], src).replace("acur_base", names["acur_base"])
        src = re.sub(r"\bBaseConfig\b", names["BaseConfig"], src)
        src = re.sub(r"\bBaseForCausalLM\b", names["BaseForCausalLM"], src)
        left = re.findall(r"\bBase(?:Config|ForCausalLM)\b|AcurBase|acur_base", src)
        if left:
            raise RuntimeError(f"template placeholders left in {stem}: {sorted(set(left))}")
        out[f"{stem}_{names['acur_base']}.py"] = src
    return out


def auto_map(model_type: str) -> dict[str, str]:
    n = family_names(model_type)
    return {"AutoConfig": f"configuration_{n['acur_base']}.{n['AcurBase']}Config",
            "AutoModelForCausalLM": f"modeling_{n['acur_base']}.{n['AcurBase']}ForCausalLM"}


def lowrank_layer_classes(model) -> list[type]:
    """The project's low-rank layer classes in the compressed model, with their project base classes,
    bases first. UsageError for a project module the repo format cannot rebuild (no in/out/rank)."""
    classes: list[type] = []
    for m in model.modules():
        t = type(m)
        if not t.__module__.startswith("modules.") or isinstance(m, kv_cache.LowRankKVAttention):
            continue  # dense layers are transformers'; KV mode's attention wrapper is rebuilt from the config
        if not all(hasattr(m, a) for a in ("in_features", "out_features", "rank")):
            raise UsageError(f"the compressed model holds {t.__name__}, which the repo format cannot rebuild "
                             "(it needs in_features, out_features and rank)")
        for base in reversed(t.__mro__):
            if base.__module__.startswith("modules.") and base not in classes:
                classes.append(base)
    return classes


def runtime_class_source(cls: type, copied: set[str]) -> str:
    """Source of a layer class for the repo: inspect.getsource, minus methods that use project names the
    repo lacks (factories such as from_linear, param_count). __init__ and forward must be self-contained."""
    src = inspect.getsource(cls)
    node = ast.parse(src).body[0]
    project = vars(sys.modules[cls.__module__])
    allowed = set(dir(builtins)) | {"torch", "nn", "F", "math"} | copied
    lines = src.splitlines(keepends=True)
    drop = []
    for fn in node.body:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        missing = sorted(u for u in used if u in project and u not in allowed)
        if missing:
            if fn.name in ("__init__", "forward"):
                raise UsageError(f"{cls.__name__}.{fn.name} uses {', '.join(missing)} from {cls.__module__}: "
                                 "the exported repo cannot carry it")
            first = min([fn.lineno] + [d.lineno for d in fn.decorator_list]) - 1
            while first > 0 and not lines[first - 1].strip():  # with the blank lines above it
                first -= 1
            drop.append((first, fn.end_lineno))
    for a, b in sorted(drop, reverse=True):
        del lines[a:b]
    return "".join(lines)


def layers_source(classes: list[type]) -> str:
    """acur_layers.py: the layer classes the repo uses, copied from the project's one source of each."""
    names = {c.__name__ for c in classes}
    parts = ['"""Low-rank layers of this repo, copied by CUR4LLM build_acur_repo.py from the project\'s modules/\n'
             '(' + ", ".join(f"{c.__module__}.{c.__name__}" for c in classes) + ') with inspect.getsource."""\n'
             "from __future__ import annotations\n\nimport math  # noqa: F401\n\nimport torch  # noqa: F401\n"
             "from torch import nn\nfrom torch.nn import functional as F  # noqa: F401\n"]
    parts += [runtime_class_source(c, names) for c in classes]
    parts.append("LAYER_CLASSES = {" + ", ".join(f"{c.__name__!r}: {c.__name__}" for c in classes
                                                if not c.__name__.startswith("_")) + "}\n")
    return "\n\n".join(p.rstrip("\n") + "\n" for p in parts)


def import_repo_code(folder: Path, module: str):
    """Import a module of the repo being written (relative imports inside it resolve to its folder)."""
    pkg = f"_acur_export_{uuid.uuid4().hex[:8]}"
    package = types.ModuleType(pkg)
    package.__path__ = [str(folder)]
    sys.modules[pkg] = package
    try:
        return importlib.import_module(f"{pkg}.{module}")
    finally:  # the classes stay usable; the names leave sys.modules
        for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
            del sys.modules[name]


def write_repo_code(folder: Path, model, family: str) -> list[str]:
    """Write the configuration/modeling files and the runtime modules (acur_layers, acur_kv_cache, acur_packed,
    acur_fast); returns their names."""
    files = family_files(family)
    files["acur_layers.py"] = layers_source(lowrank_layer_classes(model))
    files["acur_kv_cache.py"] = runtime_source(kv_cache)  # imported by the modeling file
    files["acur_packed.py"] = runtime_source(packed_linear)  # imported by the modeling file
    files["acur_fast.py"] = runtime_source(fast_layers)  # model.to_inference_form()
    for name, src in files.items():
        (folder / name).write_text(src)
    return sorted(files)


# ---------------------------------------------------------------- export: config and weights
def lowrank_layer_specs(model, method: str) -> dict[str, dict]:
    """{layer name: {type, method, rank, in, out, bias}} for every low-rank layer of the compressed model.
    The kept indices are not here: they are integer buffers of the layers, saved in the safetensors."""
    classes = tuple(c for c in lowrank_layer_classes(model) if not c.__name__.startswith("_"))
    specs = {}
    for info in find_linears(model, include_lm_head=True, types=classes):
        m = info.module
        specs[info.name] = {"type": type(m).__name__, "method": getattr(m, "method", method), "rank": m.rank,
                            "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    return specs


def export_config(model, cfg_cls, family: str, specs: dict, results: dict, save_dtype: torch.dtype,
                  packed: dict | None = None):
    n = family_names(family)
    base = {k: v for k, v in model.config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
    cfg = cfg_cls.from_dict(base)
    cfg.lowrank_layers = specs
    method = results["args"].get("method", "acur")
    cfg.acur = {"base_model": results["args"]["model_id"], "method": method,
                "param_ratio": results.get("param_ratio"), "schema": results.get("schema"),
                "settings": card_settings(results["args"])}
    cfg.architectures = [f"{n['AcurBase']}ForCausalLM"]
    cfg.auto_map = auto_map(family)
    cfg.use_cache = True  # the pipeline turns it off for perplexity runs
    cfg.lowrank_kv_cache = bool(results["args"].get("compress_kv_cache"))  # modeling file caches k/v latents
    cfg.packed_quant = packed  # modeling file installs packed layers for these names
    if results.get("kv_cache"):
        cfg.acur["kv_cache"] = results["kv_cache"]
    cfg.dtype = save_dtype
    if "lm_head" in specs:
        cfg.tie_word_embeddings = False  # the compressed head no longer shares the embedding
    return cfg


def build_export_model(model, mdl_cls, cfg, save_dtype: torch.dtype):
    """The repo's model class holding the compressed model's tensors (built on meta, no dense copy). With
    cfg.packed_quant the quantized layers' floats are replaced by their packed codes and scales."""
    with torch.device("meta"):
        out = mdl_cls(cfg)
    state = {k: (v.to(save_dtype) if v.is_floating_point() else v).detach().cpu()
             for k, v in model.state_dict().items()}
    if cfg.packed_quant:
        mods = quantization.quantized_modules(model)
        owned = {k for k in state for n in mods if k.startswith(n + ".")}
        state = {k: v for k, v in state.items() if k not in owned}
        worst = 0.0
        for name, mod in mods.items():
            twin, off = quantization.packed_twin(mod, save_dtype)
            state.update({f"{name}.{k}": v for k, v in twin.state_dict().items()})
            worst = max(worst, off)
        if worst > 0.25:  # the model dtype rounded the grid: codes may sit one step from the simulation
            print(f"WARNING: packed export: a dequantized weight lies {worst:.2f} steps off its grid (the run's "
                  "dtype is coarser than the grid); the packed model differs from the simulated one by up to a step")
    expected = set(out.state_dict())
    if cfg.tie_word_embeddings:
        tied = set(getattr(out, "_tied_weights_keys", None) or {})
        state = {k: v for k, v in state.items() if k not in tied}
        expected -= tied
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UsageError(f"the compressed model does not fit the repo format (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
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


def safetensors_entries(folder: Path) -> dict[str, tuple[str, list[int], int]]:
    """{tensor name: (dtype, shape, bytes)} of every .safetensors file in folder, read from the headers."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for k, v in header.items():
            if k != "__metadata__":
                out[k] = (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0])
    return out


FILE_KINDS = ("factors", "indices", "packed_codes", "packed_scales", "other")


def weight_file_report(folder: Path, compressed: set[str]) -> dict:
    """What the weight files hold, by kind, from their headers: the factors (and biases) and kept indices of
    the compressed layers, packed codes and their scales / zero points, and everything else (embeddings,
    norms, dense layers). `dense_weights_of_compressed_layers` lists any `<layer>.weight` of a compressed or
    packed layer: it must be empty (the files hold only the factors)."""
    kinds = dict.fromkeys(FILE_KINDS, 0)
    dense_left, dtypes = [], {}
    for key, (dt, _, nbytes) in safetensors_entries(folder).items():
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in compressed),
                     None)
        leaf = parts[-1]
        if owner is None:
            kind = "other"
        elif leaf == "weight" and key == owner + ".weight":
            kind = "other"
            dense_left.append(key)
        elif leaf == "qweight":
            kind = "packed_codes"
        elif leaf in ("qscale", "qzero", "qinv"):
            kind = "packed_scales"
        elif dt.startswith(("I", "U", "BOOL")):
            kind = "indices"
        else:
            kind = "factors"
        kinds[kind] += nbytes
        dtypes[dt] = dtypes.get(dt, 0) + nbytes
    return {"bytes": sum(kinds.values()), "by_kind": kinds, "by_dtype": dtypes,
            "dense_weights_of_compressed_layers": dense_left}


def size_report(args, results: dict, repo_dir: Path, save_dtype: torch.dtype, compressed: set[str]) -> dict:
    """Dense vs compressed bytes: weight files on disk (and what they hold, by kind), the dense checkpoint
    on disk when it is a local folder, and the dense parameters at the saved dtype."""
    src, _ = datautils.resolve_model(args)
    elem = torch.tensor([], dtype=save_dtype).element_size()
    rep = {"compressed_weight_bytes": dir_bytes(repo_dir),
           "dense_bytes_at_save_dtype": results["model"]["params_total"] * elem,
           "dense_checkpoint_bytes": dir_bytes(Path(src)) if os.path.isdir(src) else None,
           "repo_total_bytes": sum(f.stat().st_size for f in repo_dir.rglob("*") if f.is_file()),
           "save_dtype": str(save_dtype).replace("torch.", ""),
           "files": weight_file_report(repo_dir, compressed)}
    rep["ratio_vs_dense_at_save_dtype"] = rep["compressed_weight_bytes"] / rep["dense_bytes_at_save_dtype"]
    rep["ratio_vs_dense_checkpoint"] = (rep["compressed_weight_bytes"] / rep["dense_checkpoint_bytes"]
                                        if rep["dense_checkpoint_bytes"] else None)
    return rep


def size_line(sizes: dict) -> str:
    """One sentence: the weight files' size against the dense checkpoint's, and what they hold."""
    mb = lambda b: f"{b / 2**20:,.2f} MiB" if b >= 2**20 else f"{b / 2**10:,.1f} KiB"  # noqa: E731
    ratio = sizes.get("ratio_vs_dense_at_save_dtype",
                      sizes["compressed_weight_bytes"] / max(sizes["dense_bytes_at_save_dtype"], 1))
    vs = [f"{ratio:.1%} of the dense weights at {sizes['save_dtype']} ({mb(sizes['dense_bytes_at_save_dtype'])})"]
    if sizes.get("dense_checkpoint_bytes"):
        vs.insert(0, f"{sizes['ratio_vs_dense_checkpoint']:.1%} of the dense checkpoint on disk "
                     f"({mb(sizes['dense_checkpoint_bytes'])})")
    f = sizes.get("files")
    if f is None:  # a size report without the files' breakdown (written before it existed)
        return f"Weight files: {mb(sizes['compressed_weight_bytes'])}, " + ", ".join(vs) + "."
    k = f["by_kind"]
    held = [f"{label} {mb(k[key])}" for key, label in (("factors", "factors and biases"), ("indices", "kept indices"),
                                                       ("packed_codes", "packed codes"),
                                                       ("packed_scales", "scales and zero points"))
            if k[key]]
    check = ("no compressed layer keeps a dense weight" if not f["dense_weights_of_compressed_layers"] else
             f"DENSE WEIGHTS LEFT: {', '.join(f['dense_weights_of_compressed_layers'][:3])}")
    return (f"Weight files: {mb(sizes['compressed_weight_bytes'])}, " + ", ".join(vs) + ". Compressed layers: "
            + ", ".join(held) + f"; everything else (embeddings, norms, dense layers) {mb(k['other'])}; {check}.")


METHOD_TEXT = {"acur": "activation-aware CUR: actual columns C and rows R of each weight and a small core U, "
                        "y = C U R x + b",
               "cur": "CUR: actual columns C and rows R of each weight and a small core U, y = C U R x + b",
               "svd": "truncated SVD, y = A B x + b", "asvd": "activation-scaled SVD (ASVD), y = A B x + b",
               "wsvd": "whitened SVD, y = A B x + b", "rowid": "row interpolative decomposition (actual rows)",
               "colid": "column interpolative decomposition (actual columns)"}
_SETTING_KEYS = ("method", "param_ratio_target", "ppl_target", "act_aware", "alpha", "scaling_method", "selection",
                 "u_mode", "cov_damp", "rank_align", "compress_lm_head", "calib_dataset", "n_calib_samples",
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
              f"**{base_text}** compressed with CUR4LLM, method **{a.get('method', 'acur')}** "
              f"({METHOD_TEXT.get(a.get('method', 'acur'), 'low-rank factors')}). `config.json` lists, per layer, "
              "the layer type, method and rank (`lowrank_layers`); the safetensors hold the factors and, as "
              "integer tensors, the indices of the kept columns / rows.", "",
              "## Load", "", "```python", "import torch",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{load_id}", trust_remote_code=True,',
              '                                             dtype=torch.float16, device_map="auto")',
              f'tokenizer = AutoTokenizer.from_pretrained("{load_id}", trust_remote_code=True)', "```", "",
              "The custom code (`modeling_{0}.py`, `configuration_{0}.py`, `acur_layers.py`) builds the low-rank "
              "layers before the weights load, so the dense weights are never materialised. `config.json` has "
              "the model type `{0}` of its own: without `trust_remote_code=True`, transformers stops with an "
              "error instead of building the dense model with random weights in place of the low-rank layers "
              "(the tokenizer itself is the base model's, no custom code; `trust_remote_code=True` only lets "
              "AutoTokenizer read the config).".format(family_names(family)["acur_base"]), "",
              "For serving, `model.to_inference_form()` rewrites the low-rank layers in place for speed with the "
              "same outputs (`acur_fast.py`: CUR's U folded into C, q/k/v and gate/up computed together); "
              "decode with a static KV cache and CUDA graphs to see the bytes saved; the rewritten model also "
              "compiles with `torch.compile` (no graph break), which fuses row ID's gathers away. A "
              "rewritten model cannot be saved again: save the one you loaded.", "",
              "## Parameters and size", "", "| | dense | compressed |", "|---|---:|---:|",
              f"| parameters (whole model) | {m['params_total']:,} | {m.get('params_compressed', m['params_total']):,} |",
              f"| parameters (compressed linears) | {pr.get('compressed_linears_dense', 0):,} | "
              f"{pr.get('compressed_linears_kept', 0):,} |",
              f"| weight bytes at {sizes['save_dtype']} | {mb(sizes['dense_bytes_at_save_dtype'])} | "
              f"{mb(sizes['compressed_weight_bytes'])} |", "", size_line(sizes), "",
              f"Parameter ratio of the compressed linears: target {pr.get('target')}, reached "
              f"{pr.get('reached', 1.0):.4f}; {len(results.get('layers', {}))} linears considered, "
              f"{sum(1 for r in results.get('layers', {}).values() if r['rank'] is not None)} compressed.", ""]
    if results.get("kv_cache"):
        kv = results["kv_cache"]
        lines += [f"**KV cache:** k_proj/v_proj only; the cache holds their rank-k latents (U R x) instead of K "
                  f"and V (`config.lowrank_kv_cache`): {kv['bytes_per_token_dense']:,} -> "
                  f"{kv['bytes_per_token_compressed']:,} bytes per token at {kv['dtype']} (cached dims ratio "
                  f"{kv['reached']:.4f}, target {kv['ratio_target']}).", ""]
    pq = results.get("export", {}).get("packed_quant")
    if pq:
        g = f"groups of {pq['group_size']} input columns" if pq["group_size"] else "one group per output channel"
        codes = "4-bit codes two per byte (uint8)" if pq["bits"] <= 4 else "int8 codes (one per byte)"
        lines += [f"**Quantization** `{a['weight_quant']}` ({g}), stored packed: {codes}, a scale (at "
                  f"{sizes['save_dtype']}) and an integer zero point per group"
                  + (", and for AWQ a scale per input channel" if a["weight_quant"].startswith("awq") else "")
                  + " (`packed_quant` in config.json). `acur_packed.py` runs them with torch's int4 (tinygemm) / "
                  "int8 weight-only kernels where the device and dtype allow, and otherwise dequantizes in every "
                  "forward with a warning (`model.packed_backends` counts the kernels in use). The perplexities "
                  "below were measured on the simulated model (quantize-dequantize), which the packed one equals up "
                  "to round-off.", ""]
    elif a.get("weight_quant", "none") != "none":
        lines += [f"**Quantization** `{a['weight_quant']}` was simulated (quantize-dequantize; exported with "
                  "--save_simulated_quant): the weights are stored as dequantized floats, so the files do not "
                  "shrink by the bit width.", ""]
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
    row = run_row_markdown(results)  # the row of tools/compare.py's table (accuracy with --eval_tasks)
    if row:
        lines += ["", "## Results row (the layout of tools/compare.py's table)", ""] + row
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
packed = sum(m.rows * m.cols for m in model.modules() if hasattr(m, "qweight") and hasattr(m, "rows"))
torch.save({"logits": logits, "load_s": load_s,  # a packed matrix stands for rows x cols parameters
            "params": sum(p.numel() for p in model.parameters()) + packed}, out_path)
"""


def verify_repo(repo_dir: Path, model, tokenizer, reference=None, params: int | None = None) -> dict:
    """Reload the repo in a fresh Python process (fp32) and compare logits on a short text with the in-memory
    model's, or (a streamed run: model None) with reference(ids), whose parameters number `params`."""
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
    if model is None:
        ref = reference(ids)
    else:
        p = next(model.parameters())
        with torch.no_grad():
            ref = model.float()(ids.to(p.device)).logits.cpu()
        model.to(p.dtype)
        params = sum(q.numel() for q in model.parameters())
    return {"load_s": child["load_s"], "process_s": time.perf_counter() - t0,
            "max_abs_logit_diff": (child["logits"] - ref).abs().max().item(),
            "params_equal": child["params"] == params}


def write_repo(model, tokenizer, results: dict, args, family: str, repo_dir: Path,
               hub_id: str | None = None) -> dict:
    """Save everything into a fresh sibling folder, then swap it in (no mix with an older export)."""
    save_dtype = next(model.parameters()).dtype if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    specs = lowrank_layer_specs(model, results["args"].get("method", "acur"))
    if not specs:
        raise UsageError("no layer was compressed: nothing to export (ratio target 1.0?)")
    packed = None if getattr(args, "save_simulated_quant", False) else quantization.packed_spec(model)
    with staged_folder(repo_dir) as tmp:
        code_files = write_repo_code(tmp, model, family)
        stem = family_names(family)["acur_base"]  # the export is built from the very files the repo carries
        cfg_cls = getattr(import_repo_code(tmp, f"configuration_{stem}"), family_names(family)["AcurBase"] + "Config")
        mdl_cls = getattr(import_repo_code(tmp, f"modeling_{stem}"), family_names(family)["AcurBase"] + "ForCausalLM")
        cfg = export_config(model, cfg_cls, family, specs, results, save_dtype, packed)
        export = build_export_model(model, mdl_cls, cfg, save_dtype)
        export.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    verify = (lambda: verify_repo(repo_dir, model, tokenizer)) if args.verify else None
    return finish_repo(args, results, family, repo_dir, specs, packed, save_dtype, code_files, verify, hub_id)


def finish_repo(args, results: dict, family: str, repo_dir: Path, specs: dict, packed: dict | None,
                save_dtype: torch.dtype, code_files: list[str], verify, hub_id: str | None) -> dict:
    """The size report, the optional round trip (verify: a callable), the model card and acur_results.json."""
    sizes = size_report(args, results, repo_dir, save_dtype, set(specs) | set((packed or {}).get("layers", {})))
    if sizes["files"]["dense_weights_of_compressed_layers"]:
        raise RuntimeError(f"export kept dense weights of compressed layers: "
                           f"{sizes['files']['dense_weights_of_compressed_layers'][:5]}")
    verify = verify() if verify is not None else None
    export_info = {"repo_dir": str(repo_dir), "family": family, "sizes": sizes, "verify": verify,
                   "lowrank_layers": len(specs), "code_files": code_files,  # files: what a re-export may replace
                   "files": sorted({p.name for p in repo_dir.iterdir()} | {"README.md", "acur_results.json"}),
                   "packed_quant": ({k: packed[k] for k in ("format", "bits", "group_size")} | {"layers": len(packed["layers"])}
                                    if packed else None)}
    results["export"] = export_info
    (repo_dir / "README.md").write_text(model_card(args, results, sizes, repo_dir, family, verify, hub_id))
    (repo_dir / "acur_results.json").write_text(json.dumps(results, indent=1, default=str))
    return export_info


def write_streamed_repo(tokenizer, results: dict, args, family: str, repo_dir: Path,
                        hub_id: str | None = None) -> dict:
    """write_repo for a streamed run (issue 30): the compressed model is the run folder's blocks, never put
    together. Config and code come from its skeleton on the meta device; the weights are written one block a
    shard (streamed_export), so the host holds one block of them at a time; the rest is write_repo's."""
    sm, _, fp = model_loading.open_streamed(args)
    folder = streamed.RunFolder(acur.stream_dir(args), acur.stream_key(args, fp), acur.STREAM_KEY_LABELS)
    try:
        missing = next((b for b in range(sm.n_blocks) if not folder.done("block", b)), None)
        if missing is not None:
            raise UsageError(f"streamed run folder {folder.path}: block {missing} is not compressed yet; run the "
                             "same command again to finish the run before exporting")
        model = streamed_export.compressed_skeleton(sm, folder)
        save_dtype = sm.dtype if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
        specs = lowrank_layer_specs(model, results["args"].get("method", "acur"))
        if not specs:
            raise UsageError("no layer was compressed: nothing to export (ratio target 1.0?)")
        with staged_folder(repo_dir) as tmp:
            code_files = write_repo_code(tmp, model, family)
            names = family_names(family)
            cfg_cls = getattr(import_repo_code(tmp, f"configuration_{names['acur_base']}"), names["AcurBase"] + "Config")
            mdl_cls = getattr(import_repo_code(tmp, f"modeling_{names['acur_base']}"), names["AcurBase"] + "ForCausalLM")
            cfg = export_config(model, cfg_cls, family, specs, results, save_dtype)
            with torch.device("meta"):
                out = mdl_cls(cfg)
            expected = {k: v.shape for k, v in out.state_dict().items()}
            tied = set(getattr(out, "_tied_weights_keys", None) or {}) if cfg.tie_word_embeddings else set()
            bar = tqdm(total=sm.n_blocks + 1, desc="export shards", unit="shard", dynamic_ncols=True)
            try:
                streamed_export.write_shards(streamed_export.state_groups(sm, folder, save_dtype), sm.n_blocks + 1,
                                             tmp, expected, tied, lambda i: bar.update(1))
            finally:
                bar.close()
            # what save_pretrained writes beside the weights: config (dtype, architectures) and generation config
            out.config.dtype = str(save_dtype).split(".")[1]
            out.config.architectures = [type(out).__name__]
            out.config.save_pretrained(tmp)
            if out.can_generate():
                source_generation_config(args, model).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        verify = None
        if args.verify:  # the parameters the reloaded model must have (a tied head counts once)
            params = sum(p.numel() for n, p in out.named_parameters() if n not in tied)
            verify = lambda: verify_repo(repo_dir, None, tokenizer,  # noqa: E731
                                         lambda ids: streamed_export.reference_logits(sm, folder, ids), params)
        return finish_repo(args, results, family, repo_dir, specs, None, save_dtype, code_files, verify, hub_id)
    finally:
        folder.close()


def source_generation_config(args, model):
    """The generation config from_pretrained gives the dense checkpoint (its generation_config.json, else the
    one built from its config), which the in-memory export saves."""
    from transformers import GenerationConfig
    path, _ = datautils.resolve_model(args)
    try:
        return GenerationConfig.from_pretrained(path, revision=args.revision)
    except OSError:
        return model.generation_config


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
    if getattr(args, "device_map", "none") == "auto":  # the offloaded factors sit in hooks' weights maps, not in .weight
        raise UsageError("--device_map auto is not supported by build_acur_repo.py (export reads every weight)")
    acur.validate_args(args)
    ratio = args.kv_cache_ratio_target if args.compress_kv_cache else args.param_ratio_target
    if ratio == 1:
        raise UsageError(f"--{'kv_cache' if args.compress_kv_cache else 'param'}_ratio_target 1.0 keeps every layer "
                         "dense: nothing to export; give a ratio below 1")
    if args.weight_quant != "none" and args.compress_kv_cache and not args.save_simulated_quant:
        raise UsageError("a packed export of --compress_kv_cache is not supported yet (the KV runtime reads float "
                         "factors); add --save_simulated_quant to store the dequantized floats")
    structured = registry.get(args.method).form == "structured"
    if structured:
        check_structured_export(args)
    family = model_family(args)
    planned = Path(args.repo_dir) if args.repo_dir else default_repo_dir(args, ratio) if ratio != -1 else None
    if planned is not None:  # None: a --ppl_target run's default folder is named after the ratio it reaches
        check_repo_dir(planned)
    check_repo_parent(planned.absolute().parent if planned is not None else HERE)
    hub = hub_client(args) if args.push else None
    model, tokenizer, results = acur.run_pipeline(args)
    repo_dir = planned or default_repo_dir(args, results["param_ratio"]["reached"])
    check_repo_dir(repo_dir)
    api, repo_id = hub if hub is not None else (None, None)
    if repo_id and repo_id.endswith("/"):
        repo_id += repo_dir.name
    if structured:
        save_dtype = next(model.parameters()).dtype if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
        export = export_structured.write_structured_repo(model, tokenizer, results, repo_dir, args.structured_widths,
                                                         save_dtype=save_dtype, source_gguf=offline_gguf(args))
    elif model is None:  # a streamed run: its compressed blocks are in the run folder
        export = write_streamed_repo(tokenizer, results, args, family, repo_dir, repo_id)
    else:
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
    if "structured" in ex:
        st = ex["structured"]
        print(f"repo: {repo_dir}  (structured, {st['width_mode']} widths; GGUF {st['gguf']['file']}, "
              f"architecture {st['gguf']['architecture']})")
        for engine, cmd in st["engines"]:
            print(f"  {engine}: {cmd}")
        return 0
    s = ex["sizes"]
    print(f"repo: {repo_dir}  ({ex['lowrank_layers']} low-rank layers, method {results['args']['method']})")
    print(f"weight bytes: compressed {s['compressed_weight_bytes']:,} vs dense {s['dense_bytes_at_save_dtype']:,} "
          f"at {s['save_dtype']} ({s['ratio_vs_dense_at_save_dtype']:.3f})"
          + (f"; dense checkpoint on disk {s['dense_checkpoint_bytes']:,}" if s["dense_checkpoint_bytes"] else ""))
    print(size_line(s))
    if ex.get("packed_quant"):
        pq = ex["packed_quant"]
        print(f"packed: {pq['layers']} quantized layers stored as {pq['bits']}-bit codes"
              + (f", groups of {pq['group_size']}" if pq["group_size"] else ", per output channel"))
    if ex.get("verify"):
        v = ex["verify"]
        print(f"verify: reload {v['load_s']:.2f} s in a fresh process, max |logit diff| "
              f"{v['max_abs_logit_diff']:.2e}, params equal: {v['params_equal']}")
    if ex.get("pushed_to"):
        print(f"pushed: {ex['pushed_to']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
