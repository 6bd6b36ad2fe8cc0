"""Where a run's inputs come from: text for calibration and evaluation, the model, and the caches.

Datasets:
  wikitext2, ptb, c4   -- the Hugging Face hub datasets ASVD4LLM used (need the hub).
  squad_wiki           -- offline: 48 Wikipedia articles, the calibration text of the offline job.
  new_wiki             -- offline: 48 other Wikipedia articles (SQuADShifts new_wiki), the evaluation
                          text of the offline job; no title overlap with squad_wiki.
  text:PATH            -- a user's own UTF-8 text file.
The offline texts, tasks and model come from offline_resources.py (the repo carries the texts and tasks);
the caches and atomic writes live in cache_store.py (re-exported here for existing callers).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from cache_store import (CACHE_DIR, CACHE_SOURCES, atomic_write_bytes, cache_path,  # noqa: F401  (moved)
                         cached_layer_tensors, code_digest, file_lock, load_json_cache, load_tensor_cache,
                         save_json_cache, save_tensor_cache)
from modules.model_utils import check_architecture
from offline_resources import (DEFAULT_MC_TASK, MC_SEED, OFFLINE_MODELS, OFFLINE_TEXTS,  # noqa: F401
                               OfflineResourceError, chance_accuracy, home_dir, mc_docs, mc_tasks,
                               offline_model_dir, offline_text, pip_download, squad_text)

HUB_DATASETS = ("wikitext2", "ptb", "c4")
OFFLINE_DATASETS = tuple(OFFLINE_TEXTS)
GENERATED_DATASETS = ("selfgen",)  # the model's own samples: selfgen_utils.py writes them, the caller passes them in
DATASETS = HUB_DATASETS + OFFLINE_DATASETS + GENERATED_DATASETS  # plus "text:PATH"


def set_seed(seed: int) -> None:
    """Seed python's random, numpy and torch (ASVD4LLM left python's random unseeded)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- text of a dataset
def check_dataset_name(name: str) -> None:
    """Raise ValueError for an unknown dataset or a missing/empty text file (cheap, before heavy work)."""
    if name.startswith("text:"):
        p = Path(name[5:])
        if not p.is_file():
            raise ValueError(f"text file not found: {p}")
        if p.stat().st_size == 0:
            raise ValueError(f"text file is empty: {p}")
        return
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} or text:PATH")


# ---------------------------------------------------------------- hub access
HUB_PROBE_TIMEOUT_S = 3.0  # one probe; datasets/transformers themselves retry for ~25 s when offline
_HUB_PROBE: dict[str, str] = {}  # endpoint -> "" (reachable) or why not, once per process


class HubUnreachable(ValueError):
    """The Hugging Face hub cannot be reached (or offline mode is on) and a hub resource was asked for."""


def hub_offline_mode() -> bool:
    """True when the user asked the HF libraries to stay offline (they then fail fast on their own)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def offline_hint() -> str:
    return (f"offline, use a model alias ({', '.join(OFFLINE_MODELS)}) or a local checkpoint dir and the offline "
            f"texts ({', '.join(OFFLINE_DATASETS)}, or text:PATH); with the resource already in your "
            "Hugging Face cache, set HF_HUB_OFFLINE=1")


def check_hub_reachable(what: str) -> None:
    """Probe the hub endpoint once (HUB_PROBE_TIMEOUT_S) before a hub download, so no access fails in
    seconds with a hint instead of after the libraries' retries. Raises HubUnreachable.

    Skipped under HF_HUB_OFFLINE (the libraries then read only their cache, without retries). Any HTTP
    answer, even an error status, counts as reachable."""
    if hub_offline_mode():
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if endpoint not in _HUB_PROBE:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"),
                                   timeout=HUB_PROBE_TIMEOUT_S).close()
            _HUB_PROBE[endpoint] = ""
        except urllib.error.HTTPError:
            _HUB_PROBE[endpoint] = ""
        except (OSError, ValueError) as exc:  # URLError, timeout, refused, bad URL
            reason = getattr(exc, "reason", exc)
            _HUB_PROBE[endpoint] = f"{type(reason).__name__}: {str(reason)[:120]}"
    if _HUB_PROBE[endpoint]:
        raise HubUnreachable(f"{what} needs the Hugging Face hub, unreachable at {endpoint} "
                             f"({_HUB_PROBE[endpoint]}); {offline_hint()}")


def _hub_text(name: str, split: str) -> str:
    check_hub_reachable(f"dataset {name}")
    from datasets import load_dataset  # imported late: slow import, and only the hub path needs it
    if name == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return "\n\n".join(ds["text"])
    if name == "ptb":
        ptb_split = "train" if split == "train" else "validation"
        try:
            ds = load_dataset("ptb_text_only", "penn_treebank", split=ptb_split)
        except RuntimeError as exc:  # datasets >= 4 runs no loading scripts: use the hub's parquet export
            if "script" not in str(exc).lower():
                raise
            ds = load_dataset("ptb_text_only", "penn_treebank", split=ptb_split, revision="refs/convert/parquet")
        return "\n\n".join(ds["sentence"])
    if name == "c4":
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else \
            "en/c4-validation.00000-of-00008.json.gz"
        ds = load_dataset("allenai/c4", data_files={split: shard}, split=split)
        if split != "train":
            ds = ds.select(range(min(1100, len(ds))))  # GPTQ/ASVD protocol: first 1100 documents
        return "\n\n".join(ds["text"])
    raise ValueError(name)


# Each text is fetched once and tokenised once per process (a run used to read and tokenise its texts up to
# three times: the early availability check, the user-text length check, then calibration / evaluation).
_TEXTS: dict[tuple, str] = {}
_IDS: dict[tuple, torch.Tensor] = {}


def clear_memo() -> None:
    """Forget the texts and token ids read so far in this process."""
    _TEXTS.clear()
    _IDS.clear()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _text_key(name: str, split: str) -> tuple:
    """Memo key of a dataset's text: a user file is the same text for both splits, and is re-read if edited."""
    if name.startswith("text:"):
        st = Path(name[5:]).stat()
        return (name, st.st_mtime_ns, st.st_size)
    return (name, split)


def _read_text(name: str, split: str) -> str:
    if name.startswith("text:"):
        return Path(name[5:]).read_text(encoding="utf-8")
    if name in OFFLINE_DATASETS:
        return offline_text(name)
    return _hub_text(name, split)


def get_text(name: str, split: str) -> str:
    """Raw text of a dataset. split: 'train' (calibration) or 'test' (evaluation). Memoised in-process.

    selfgen text is written by the dense model during a run: it is not read by name but passed to
    get_calib_data(..., text=...) (acur.run_pipeline does)."""
    check_dataset_name(name)
    if name in GENERATED_DATASETS:
        if split != "train":
            raise ValueError(f"{name} is calibration data only (the model's own samples); evaluate on another text")
        raise ValueError(f"the {name} text is generated by the model during a run (selfgen_utils."
                         "prepare_selfgen_text): pass it as get_calib_data(..., text=...)")
    key = _text_key(name, split)
    if key not in _TEXTS:
        _TEXTS[key] = _read_text(name, split)
    return _TEXTS[key]


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D tensor of token ids (no special tokens: windows are cut from it)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _tokenizer_key(tokenizer) -> tuple:
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))


def token_ids(name: str, split: str, tokenizer, text: str | None = None) -> torch.Tensor:
    """Token ids of a dataset's text (or of the given text), tokenised once per (text, tokenizer) in-process.

    The returned tensor is shared: read it, never modify it in place."""
    tkey = ("given", text_digest(text)) if text is not None else _text_key(name, split)
    key = (tkey, _tokenizer_key(tokenizer))
    if key not in _IDS:
        _IDS[key] = tokenize_text(tokenizer, text if text is not None else get_text(name, split))
    return _IDS[key]


def calib_overlap_warning(name: str, n_tokens: int, n_samples: int, seqlen: int) -> str | None:
    """A warning when n_samples windows of seqlen tokens ask for more tokens than the text holds.

    A warning, not an error: windows are cut at random offsets (ASVD's protocol), so they may overlap
    anyway; asking for more than the text only makes repeats certain. The statistics stay valid
    averages over the text, just over fewer distinct tokens than requested, and a small own text
    (text:PATH) is a legitimate choice. The user must know, so it is printed and recorded."""
    asked = n_samples * seqlen
    if asked <= n_tokens:
        return None
    return (f"calibration asks for {n_samples} x {seqlen} = {asked:,} tokens but {name} holds only "
            f"{n_tokens:,}: the windows overlap (about {n_tokens / seqlen:.1f} distinct windows' worth); "
            "lower --n_calib_samples or --calib_seqlen, or use a larger text")


def get_calib_data(name: str, tokenizer, n_samples: int, seqlen: int, seed: int,
                   use_bos: bool = False, text: str | None = None,
                   warnings: list[str] | None = None) -> torch.Tensor:
    """n_samples windows of seqlen tokens cut at seeded random offsets of the training text.

    text: the calibration text itself when the run made it (selfgen); otherwise it is read by name.
    warnings: where a calib_overlap_warning is appended (it is printed either way)."""
    ids = token_ids(name, "train", tokenizer, text)
    body = seqlen - 1 if use_bos else seqlen
    if ids.numel() <= body:
        raise ValueError(f"dataset {name} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    overlap = calib_overlap_warning(name, ids.numel(), n_samples, body)
    if overlap:
        print(f"WARNING: {overlap}", flush=True)
        if warnings is not None:
            warnings.append(overlap)
    rng = random.Random(seed)
    rows = []
    for _ in range(n_samples):
        start = rng.randint(0, ids.numel() - body - 1)
        row = ids[start:start + body]
        if use_bos:
            row = torch.cat([torch.tensor([tokenizer.bos_token_id]), row])
        rows.append(row)
    return torch.stack(rows)


def get_eval_ids(name: str, tokenizer) -> torch.Tensor:
    """Test text joined as in ASVD4LLM and tokenised once (shared tensor: read only)."""
    return token_ids(name, "test", tokenizer)


# ---------------------------------------------------------------- the model a run loads, and its inputs checked first
class UsageError(ValueError):
    """Bad input found before any heavy work: acur.py reports it as one line, exit code 2."""


def resolve_model(args: argparse.Namespace) -> tuple[str, dict]:
    """Local path (or hub id) to load, and the fingerprint that keys every cache."""
    if args.model_id in OFFLINE_MODELS:
        path = str(offline_model_dir(args.model_id))
    else:
        path = os.path.expanduser(args.model_id)
    fp = {"model": args.model_id, "revision": args.revision}
    if os.path.isdir(path):
        h = hashlib.sha256()
        for f in sorted(Path(path).iterdir()):
            if f.name == "config.json":
                h.update(f.read_bytes())
            elif f.suffix in (".safetensors", ".bin", ".json") or f.name.endswith(".index.json"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        fp["files"] = h.hexdigest()[:16]
    return path, fp


def pick_device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """--device / --dtype resolved: one GPU per rank under torchrun; float16 on CUDA, float32 on CPU."""
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
    if args.dtype == "auto":
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return dev, dtype


def init_distributed(args: argparse.Namespace) -> int:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1) join the process group (nccl on GPU, gloo
    on CPU) so the ppl sensitivity is split over the ranks. Returns this process's rank (0 alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch.distributed as dist
    if not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and (args.device == "auto" or args.device.startswith("cuda"))
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return dist.get_rank()


def parse_max_memory(spec: str | None) -> dict | None:
    """--max_memory "0=20GiB,cpu=60GiB" as from_pretrained's max_memory ({0: "20GiB", "cpu": "60GiB"})."""
    if spec is None:
        return None
    out: dict = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, sep, value = (t.strip() for t in item.partition("="))
        if not sep or not re.fullmatch(r"\d+|cpu|disk|mps|xpu:?\d*|npu:?\d*", key) \
                or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", value, re.IGNORECASE):
            raise ValueError(f"expected DEVICE=SIZE items like 0=20GiB,cpu=60GiB, got {item!r}")
        out[int(key) if key.isdigit() else key] = int(value) if value.isdigit() else value
    if not out:
        raise ValueError("empty")
    return out


def dispatch_kwargs(args: argparse.Namespace) -> dict:
    """from_pretrained's placement arguments of --device_map auto: accelerate's plan under --max_memory,
    disk offload into a fresh folder under --output_dir (removed when the process exits)."""
    import atexit
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="offload-", dir=out_dir)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return {"device_map": "auto", "max_memory": parse_max_memory(getattr(args, "max_memory", None)),
            "offload_folder": folder}


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, object, dict]:
    """(model, tokenizer, fingerprint). Clear one-line errors for a missing model or a too-long window."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    path, fp = resolve_model(args)
    on_hub = not os.path.isdir(path)
    try:
        if on_hub:
            check_hub_reachable(f"model {args.model_id!r}")
        config = AutoConfig.from_pretrained(path, revision=args.revision)
    except HubUnreachable as exc:
        raise UsageError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"model not found or hub unreachable: {args.model_id!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                         + (f"; {offline_hint()}" if on_hub else "")) from None
    max_pos = getattr(config, "max_position_embeddings", None)
    for flag in ("calib_seqlen", "eval_seqlen"):
        if max_pos and getattr(args, flag) > max_pos:
            raise UsageError(f"--{flag} {getattr(args, flag)} exceeds the model's context of {max_pos} tokens")
    try:  # a layout the pipeline cannot walk fails here, from the config, before any weight loads
        check_architecture(config)
    except ValueError as exc:
        raise UsageError(f"{args.model_id}: {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(path, revision=args.revision)
    check_user_texts(args, tokenizer)
    device, dtype = pick_device_dtype(args)
    if getattr(args, "device_map", "none") == "auto":  # dispatched: accelerate's hooks move weights and inputs
        model = AutoModelForCausalLM.from_pretrained(path, revision=args.revision, dtype=dtype, **dispatch_kwargs(args))
        model.eval()
        print(f"[acur] device_map auto: {getattr(model, 'hf_device_map', None) or 'one device'}")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, revision=args.revision, dtype=dtype,
                                                     device_map=str(device) if device.type == "cuda" else None)
        model.to(device).eval()
    model.config.use_cache = False
    fp["commit"] = getattr(config, "_commit_hash", None)
    fp["dtype"] = str(dtype)
    return model, tokenizer, fp


def eval_datasets(args: argparse.Namespace) -> list[str]:
    """The perplexity datasets of --eval_ppl (empty or 'none': none)."""
    return [d.strip() for d in args.eval_ppl.split(",") if d.strip() and d.strip() != "none"]


def fetch_texts(args: argparse.Namespace) -> None:
    """Fetch every dataset the run needs before any heavy work, so a missing dataset (no hub access)
    fails in seconds instead of after a long compression."""
    needed = [] if args.raw_model or args.calib_dataset in GENERATED_DATASETS else \
        [(args.calib_dataset, "train")]  # selfgen text is written by the model later
    for name, split in needed + [(d, "test") for d in eval_datasets(args)]:
        try:
            get_text(name, split)
        except HubUnreachable as exc:
            raise UsageError(str(exc)) from None
        except Exception as exc:  # any failure to fetch: hub down, file unreadable, bad format
            hint = f"; {offline_hint()}" if name in HUB_DATASETS else ""
            raise UsageError(f"dataset {name} ({split}) unavailable: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''}{hint}") from None


def check_user_texts(args: argparse.Namespace, tokenizer) -> None:
    """A user's text file must hold at least one window (checked before the weights load)."""
    for name, seqlen in [(args.calib_dataset, args.calib_seqlen)] + [(d, args.eval_seqlen) for d in eval_datasets(args)]:
        if name.startswith("text:"):
            n = token_ids(name, "test", tokenizer).numel()
            if n <= seqlen:
                raise UsageError(f"{name} has {n} tokens, fewer than one window of {seqlen}")
