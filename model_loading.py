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


# ---------------------------------------------------------------- streamed: one block at a time
class TensorSource(Protocol):
    """Where a streamed model's tensors come from (a checkpoint's shards, or the bench's random weights)."""

    def names(self) -> set[str] | None:
        """Every tensor name it holds (None: it makes any tensor asked for)."""

    def get(self, name: str, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `name` (of the model's `shape`) on `device`, floating tensors in `dtype`."""


WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


def checkpoint_shards(folder: str | Path) -> dict[str, str]:
    """{tensor name: shard file name} of a local checkpoint folder's safetensors weights, every shard
    opened and checked first (UsageError in one line naming the file): a .bin-only checkpoint, a shard the
    index lists and the folder lacks, a truncated or damaged shard, a shard without the tensors listed."""
    from safetensors import safe_open
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc})") from None
    elif (folder / WEIGHTS_FILE).is_file():
        weight_map = None
    else:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        if bins:
            raise UsageError(f"{folder} holds PyTorch .bin weights only ({bins[0]}{', ...' if len(bins) > 1 else ''}): "
                             "a pickle is read whole, not tensor by tensor, so it cannot be streamed; convert it once "
                             "(AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT) writes safetensors) or "
                             "run without --stream")
        raise UsageError(f"{folder} holds no {WEIGHTS_FILE} and no {WEIGHTS_INDEX}: nothing to stream")
    files = sorted(set(weight_map.values())) if weight_map is not None else [WEIGHTS_FILE]
    out: dict[str, str] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise UsageError(f"shard {path} is missing (listed in {WEIGHTS_INDEX}); download the checkpoint again")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
        except Exception as exc:  # safetensors' own check of the header against the file's length
            raise UsageError(f"shard {path} is truncated or damaged ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); download it again") from None
        listed = {k for k, v in weight_map.items() if v == name} if weight_map is not None else keys
        lacking = sorted(listed - keys)
        if lacking:
            raise UsageError(f"shard {path} lacks {len(lacking)} tensor(s) its index lists (e.g. {lacking[0]}); "
                             "a different or partial file: download it again")
        out.update((k, name) for k in listed)
    return out


class SafetensorsCheckpoint:
    """A local checkpoint's safetensors shards, read one tensor at a time (safe_open: a memory map, so
    only the tensors asked for are read). Checked whole when opened (checkpoint_shards)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.weight_map = checkpoint_shards(self.folder)
        self._open: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        from safetensors import safe_open
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.folder / file), framework="pt", device="cpu")
        t = self._open[file].get_tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise UsageError(f"{self.folder / file}: tensor {name} has shape {tuple(t.shape)}, the config's model "
                             f"expects {tuple(shape)}")
        # to the device first, then converted there: a checkpoint in another dtype (bf16 read as fp16) is not
        # converted on the host tensor by tensor; the same values either way (IEEE rounding)
        return t.to(device=device).to(dtype=dtype if t.is_floating_point() else t.dtype)

    def close(self) -> None:
        self._open.clear()


class StreamedModel:
    """A causal LM whose decoder blocks stay in the checkpoint until asked for.

    The skeleton is built on the meta device from the config (accelerate's init_empty_weights, so
    computed buffers such as rotary tables are real); the embeddings, final norm, lm_head and any other
    tensor outside the blocks are materialised on `device` at once; `block(b)` returns a fresh copy of
    block b with its tensors read from the source, to be dropped by the caller when done."""

    def __init__(self, config, source: TensorSource, device: torch.device, dtype: torch.dtype):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        self.config, self.source, self.device, self.dtype = config, source, torch.device(device), dtype
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.model.config.use_cache = False
        self.layers = decoder_layers(self.model)
        self.prefix = next(n for n, m in self.model.named_modules() if m is self.layers)
        self.parts = decoder_parts(self.model)
        if self.parts is None:
            raise UsageError(f"{type(self.model).__name__}: streaming needs a known decoder layout "
                             "(model.model.layers with a final norm, or OPT's model.model.decoder.layers)")
        self._keys = self._key_map()
        self._load_outside_blocks()

    @property
    def n_blocks(self) -> int:
        return len(self.layers)

    def _key_map(self) -> dict[str, str]:
        """Model tensor name -> source name (checkpoints may omit the base model prefix, as OPT's do);
        UsageError naming the first tensor the source lacks (a tied lm_head may be absent)."""
        have = self.source.names()
        base = getattr(self.model, "base_model_prefix", "") or ""
        tied = self._tied_names()
        out: dict[str, str] = {}
        for name in self.model.state_dict():
            if have is None:
                out[name] = name
                continue
            options = [name] + ([name[len(base) + 1:]] if base and name.startswith(base + ".") else
                                [f"{base}.{name}"] if base else [])
            found = next((o for o in options if o in have), None)
            if found is not None:
                out[name] = found
            elif name not in tied:
                where = getattr(self.source, "folder", "the checkpoint")
                raise UsageError(f"{where}: no shard holds tensor {name!r}, which the config's "
                                 f"{type(self.model).__name__} needs")
        return out

    def _tied_names(self) -> set[str]:
        """Names of tensors tied to another one (a tied lm_head): transformers ties them after loading."""
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        return set(tied)

    def _load_outside_blocks(self) -> None:
        from accelerate.utils import set_module_tensor_to_device
        block_prefix = self.prefix + "."
        tied = self._tied_names()
        shapes = {n: t.shape for n, t in self.model.state_dict().items()}
        for name in shapes:
            if name.startswith(block_prefix) or name in tied:
                continue
            value = self.source.get(self._keys[name], shapes[name], self.device, self.dtype)
            set_module_tensor_to_device(self.model, name, self.device, value=value)
        if tied:  # set_module_tensor_to_device made a new embedding parameter: tie the head to it again
            self.model.tie_weights()
        for mod_name, mod in self.model.named_modules():
            if mod_name == self.prefix or mod_name.startswith(block_prefix):
                continue
            for b_name, buf in list(mod._buffers.items()):  # computed buffers (rotary tables)
                if buf is not None and buf.device.type != "meta" and buf.device != self.device:
                    mod._buffers[b_name] = buf.to(self.device)
        meta = [n for n, p in self.model.named_parameters() if p.device.type == "meta" and not n.startswith(block_prefix)]
        if meta:
            raise RuntimeError(f"streamed model: {meta[0]} was not materialised")

    def block_bytes(self, b: int = 0) -> int:
        """Bytes of block b's tensors in the run's dtype."""
        size = torch.empty(0, dtype=self.dtype).element_size()
        return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
                   for t in self.layers[b].state_dict().values())

    def total_bytes(self) -> int:
        """Bytes of the whole model in the run's dtype (what loading it whole would take)."""
        size = torch.empty(0, dtype=self.dtype).element_size()
        return sum(p.numel() * size for p in self.model.parameters())

    def block(self, b: int) -> nn.Module:
        """A fresh copy of decoder block b on the device, its tensors read from the source."""
        blk = copy.deepcopy(self.layers[b])
        shapes = {k: t.shape for k, t in blk.state_dict().items()}
        state = {k: self.source.get(self._keys[f"{self.prefix}.{b}.{k}"], shapes[k], self.device, self.dtype)
                 for k in shapes}
        blk.load_state_dict(state, strict=True, assign=True)
        blk.to(self.device)
        blk.requires_grad_(False)
        return blk

    def block_linears(self, block: nn.Module, b: int, names: set[str] | None = None,
                      types: tuple[type, ...] = (nn.Linear,)) -> list[LinearInfo]:
        """LinearInfo of block b's linears as find_linears names them, pointing into the copy `block`
        (only those in `names` when given), in find_linears' order."""
        out = []
        for sub_name, sub in block.named_modules():
            if isinstance(sub, types):
                name = f"{self.prefix}.{b}.{sub_name}"
                if names is None or name in names:
                    parent_name, _, attr = sub_name.rpartition(".")
                    out.append(LinearInfo(name, block.get_submodule(parent_name) if parent_name else block,
                                          attr, sub, b))
        return out

    def linears(self, include_lm_head: bool = False) -> list[LinearInfo]:
        """find_linears of the skeleton: names, shapes and blocks (the modules themselves are on meta)."""
        return find_linears(self.model, include_lm_head=include_lm_head)

    @torch.no_grad()
    def capture(self, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
        """capture_block_inputs of the skeleton: block 0's input and every block's keyword arguments."""
        return capture_block_inputs(self.model, self.layers, [b.to(self.device) for b in batches])

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output (final norm, OPT's project_out, lm_head)."""
        for mod in self.parts.head_modules:
            hidden = mod(hidden)
        return hidden


def open_streamed(args: argparse.Namespace, check_tokenizer: TokenizerCheck | None = None
                  ) -> tuple[StreamedModel, object, dict]:
    """(streamed model, tokenizer, fingerprint) of a local safetensors checkpoint: config, tokenizer and
    every shard checked, the skeleton built, only the tensors outside the blocks read."""
    path, config, tokenizer, fp = load_config_and_tokenizer(args, check_tokenizer)
    if not os.path.isdir(path):
        raise UsageError(f"--stream reads a local checkpoint folder; {args.model_id!r} is not one (download it "
                         "first, e.g. huggingface-cli download MODEL --local-dir DIR)")
    device, dtype = pick_device_dtype(args)
    smodel = StreamedModel(config, SafetensorsCheckpoint(path), device, dtype)
    fp["dtype"] = str(dtype)
    return smodel, tokenizer, fp


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device (CUDA: the driver's count; CPU: MemAvailable), None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


FIT_FRACTION = 0.8  # of the free memory, for the weights: the rest holds activations and decompositions


def model_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in `dtype`, counted on the meta device (no weight is read)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * torch.empty(0, dtype=dtype).element_size()


def fits_in_memory(args: argparse.Namespace) -> tuple[bool, str]:
    """(fits, why) for --stream auto: the model's weights in the run's dtype against FIT_FRACTION of the
    device's free memory. Hub ids and unknown devices count as fitting (the in-memory path decides)."""
    from transformers import AutoConfig
    path, _ = resolve_model(args)
    if not os.path.isdir(path):
        return True, "not a local checkpoint"
    device, dtype = pick_device_dtype(args)
    free = free_memory(device)
    if free is None:
        return True, "free memory unknown"
    try:
        need = model_bytes(AutoConfig.from_pretrained(path), dtype)
    except Exception:  # the in-memory loader reports a bad config in its own words
        return True, "config unreadable"
    why = f"the weights take {need / 2**30:.1f} GiB in {str(dtype).replace('torch.', '')}, {device.type} has " \
          f"{free / 2**30:.1f} GiB free"
    return need <= FIT_FRACTION * free, why
