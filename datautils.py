"""Where a run's text comes from: calibration windows and evaluation ids, read and tokenised once.

Datasets:
  wikitext2, ptb, c4   -- the Hugging Face hub datasets ASVD4LLM used (need the hub).
  squad_wiki           -- offline: 48 Wikipedia articles, the calibration text of the offline job.
  new_wiki             -- offline: 48 other Wikipedia articles (SQuADShifts new_wiki), the evaluation
                          text of the offline job; no title overlap with squad_wiki.
  text:PATH            -- a user's own UTF-8 text file.
Concerns of their own, re-exported here for existing callers: the offline texts, tasks and model
(offline_resources.py), the caches and atomic writes (cache_store.py), the hub probe (hub_access.py), the
model's loading, whole or streamed (model_loading.py), UsageError (errors.py). What stays here: dataset
names, texts, token ids, calibration windows, and the run's own text checks (fetch_texts, check_user_texts).
"""
from __future__ import annotations

import argparse
import hashlib
import random
from pathlib import Path

import numpy as np
import torch

import model_loading
from cache_store import (CACHE_DIR, CACHE_SOURCES, atomic_write_bytes, cache_path,  # noqa: F401  (moved)
                         cached_layer_tensors, code_digest, file_lock, load_json_cache, load_tensor_cache,
                         save_json_cache, save_tensor_cache)
from errors import UsageError  # noqa: F401  (moved)
from hub_access import (HUB_PROBE_TIMEOUT_S, HubUnreachable, check_hub_reachable, hub_offline_mode,  # noqa: F401
                        offline_hint)
from model_loading import (dispatch_kwargs, init_distributed, parse_max_memory, pick_device_dtype,  # noqa: F401
                           resolve_model)
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


# ---------------------------------------------------------------- the model (model_loading.py), with this file's text check
def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, object, dict]:
    """model_loading.load_model with the check that a user's text holds a window (texts are this file's)."""
    return model_loading.load_model(args, check_tokenizer=check_user_texts)


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
