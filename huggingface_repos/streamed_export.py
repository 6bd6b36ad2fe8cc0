"""The export of a streamed run (issue 30): the compressed model's weights written from the run folder one
decoder block at a time, so the host never holds more than one block of it (plus the embeddings and head,
which the streamed model holds anyway).

Why a file per block: safetensors writes a file from a complete dict of tensors, so a shard of several
blocks would hold all of them at once. One shard holds the tensors outside the blocks (embeddings, final
norm, lm_head), then one shard per block, listed in model.safetensors.index.json as save_pretrained lists
its shards; from_pretrained loads the result exactly as it loads the in-memory export's single file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

import streamed
from cache_store import new_file_mode
from errors import UsageError
from model_loading import WEIGHTS_INDEX, StreamedModel
from modules.model_utils import run_block

Tensors = dict[str, torch.Tensor]


def compressed_skeleton(sm: StreamedModel, folder: streamed.RunFolder) -> nn.Module:
    """sm.model with every block replaced (in place) by its compressed block on the meta device: the
    low-rank classes, ranks and names the export's config and code are written from, no block tensor read."""
    for b in range(sm.n_blocks):
        sm.layers[b] = streamed.compressed_skeleton_block(sm, folder, b)
    return sm.model


def _as_saved(t: torch.Tensor, save_dtype: torch.dtype) -> torch.Tensor:
    """As build_export_model stores a tensor: floats in the save dtype, on the CPU, contiguous."""
    return (t.to(save_dtype) if t.is_floating_point() else t).detach().cpu().contiguous()


def state_groups(sm: StreamedModel, folder: streamed.RunFolder, save_dtype: torch.dtype) -> Iterator[Tensors]:
    """The compressed model's state dict in groups: first the tensors outside the blocks, then block by
    block (read from the run folder when its turn comes). The generator keeps no reference to a group once
    it has handed it out, so a caller that drops each group holds one at a time."""
    inner = sm.prefix + "."
    yield {k: _as_saved(v, save_dtype) for k, v in sm.model.state_dict().items()
           if not k.startswith(inner) and v.device.type != "meta"}
    for b in range(sm.n_blocks):
        yield {f"{sm.prefix}.{b}.{k}": _as_saved(v, save_dtype) for k, v in folder.load("block", b).items()}


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def write_shards(groups: Iterator[Tensors], n_groups: int, out: Path, expected: dict[str, torch.Size],
                 drop: set[str], progress: Callable[[int], None] | None = None) -> dict:
    """Write each group of tensors as one safetensors shard (save_pretrained's names and metadata) and the
    index; returns the index. `expected` is the export model's {name: shape}: a tensor it lacks or of another
    shape, or a name it has and no group gave, is a UsageError (the repo would not load). `drop`: names not
    stored (tied to another tensor)."""
    from safetensors.torch import save_file
    weight_map: dict[str, str] = {}
    total = 0
    params = 0
    i = 0
    for group in groups:  # (not enumerate: its reused result tuple would hold the last group while the next loads)
        i += 1
        group = {k: v for k, v in group.items() if k not in drop}
        bad = sorted(k for k in group if k not in expected)
        if bad:
            raise UsageError(f"the compressed model does not fit the repo format (unexpected {bad[:5]})")
        shape = next((k for k, v in group.items() if tuple(v.shape) != tuple(expected[k])), None)
        if shape is not None:
            raise UsageError(f"the compressed model does not fit the repo format ({shape}: shape "
                             f"{tuple(group[shape].shape)}, the repo's model expects {tuple(expected[shape])})")
        name = shard_name(i, n_groups)
        save_file(group, str(out / name), metadata={"format": "pt"})
        os.chmod(out / name, new_file_mode())
        weight_map.update(dict.fromkeys(group, name))
        total += sum(v.numel() * v.element_size() for v in group.values())
        params += sum(v.numel() for v in group.values())
        del group  # (the generator's copy is gone already: one group held at a time)
        if progress is not None:
            progress(i)
    missing = sorted(set(expected) - drop - set(weight_map))
    if missing:
        raise UsageError(f"the compressed model does not fit the repo format (missing {missing[:5]})")
    index = {"metadata": {"total_parameters": params, "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.chmod(out / WEIGHTS_INDEX, new_file_mode())
    return index


@torch.no_grad()
def reference_logits(sm: StreamedModel, folder: streamed.RunFolder, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the compressed model in fp32 (as build_acur_repo's verify compares them), block by block
    from the run folder: the embeddings' output and every block and head module taken to fp32."""
    import copy
    hidden, kwargs = sm.capture([ids])
    h = hidden[0].float()
    for b in range(sm.n_blocks):
        block = streamed.compressed_block(sm, folder, b).float()
        h = run_block(block, h, kwargs[0][b])
        del block
    for mod in sm.parts.head_modules:
        h = copy.deepcopy(mod).float()(h)
    return h.cpu()
