"""Where the model comes from: the checkpoint a run names, the device and dtype it runs in, and the model
loaded whole (from_pretrained, optionally dispatched by accelerate) or streamed block by block.

Streamed (issue 30): a model larger than the GPU or the host is never loaded whole. `open_streamed` builds
the model's skeleton on the meta device, materialises only the embeddings, final norm and lm_head, and
`StreamedModel.block(b)` reads one decoder block's tensors from the safetensors shards (safe_open, only
that block's tensors) onto the device. The checkpoint is checked before any compute: a .bin-only
checkpoint, a missing shard, a truncated shard or a tensor the model needs and no shard holds each fail
in one line naming the file.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from errors import UsageError
from hub_access import HubUnreachable, check_hub_reachable, offline_hint
from modules.model_utils import (LinearInfo, capture_block_inputs, check_architecture, decoder_layers, decoder_parts,
                                 find_linears)
from offline_resources import OFFLINE_MODELS, offline_model_dir

TokenizerCheck = Callable[[argparse.Namespace, object], None]


# ---------------------------------------------------------------- which checkpoint, device and dtype
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


# ---------------------------------------------------------------- the whole model, in memory
def load_config_and_tokenizer(args: argparse.Namespace, check_tokenizer: TokenizerCheck | None = None
                              ) -> tuple[str, object, object, dict]:
    """(path, config, tokenizer, fingerprint), every check that needs no weight done: a missing model, a
    window longer than the model's context, an unsupported layout, (check_tokenizer) a too-short user text."""
    from transformers import AutoConfig, AutoTokenizer
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
    if check_tokenizer is not None:
        check_tokenizer(args, tokenizer)
    fp["commit"] = getattr(config, "_commit_hash", None)
    return path, config, tokenizer, fp


def load_model(args: argparse.Namespace, check_tokenizer: TokenizerCheck | None = None
               ) -> tuple[torch.nn.Module, object, dict]:
    """(model, tokenizer, fingerprint). Clear one-line errors for a missing model or a too-long window;
    check_tokenizer(args, tokenizer) runs before the weights load (datautils passes its text check)."""
    from transformers import AutoModelForCausalLM
    path, _, tokenizer, fp = load_config_and_tokenizer(args, check_tokenizer)
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
    fp["dtype"] = str(dtype)
    return model, tokenizer, fp
