"""How the pipeline sees a causal LM: its compressible linears and its decoder blocks.

`find_linears` is the one walker every stage uses. `decoder_parts` knows the two layouts this
tool supports natively (LLaMA-style `model.model.layers`, OPT-style `model.model.decoder.layers`)
so sensitivity can run only the blocks after a replaced layer.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn


@dataclass
class LinearInfo:
    name: str          # full dotted name, e.g. "model.layers.3.self_attn.q_proj"
    parent: nn.Module  # module that owns it
    attr: str          # attribute name on the parent
    module: nn.Module  # the nn.Linear (or its replacement)
    block: int         # index of the decoder block it sits in (-1 for lm_head)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (LLaMA-, Mistral-, Qwen-style or OPT-style)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    dec = getattr(inner, "decoder", None) if inner is not None else None
    if dec is not None and isinstance(getattr(dec, "layers", None), nn.ModuleList):
        return dec.layers
    raise ValueError(f"{type(model).__name__}: cannot find decoder layers "
                     "(expected model.model.layers or model.model.decoder.layers)")


SUPPORTED_LAYOUTS = ("decoder-only causal LMs whose blocks hold nn.Linear layers at model.model.layers (LLaMA, "
                     "Mistral, Qwen2, Gemma, Phi-3, ...) or model.model.decoder.layers (OPT)")


def check_architecture(config) -> None:
    """ValueError naming the supported layouts unless transformers builds a causal LM for this config whose
    decoder blocks find_linears walks and that holds nn.Linear layers (GPT-2's blocks are transformer.h of
    Conv1D). Built on the meta device from the config alone: no weights are read, no memory is used."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    kind = getattr(config, "model_type", None)
    why = None
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        why = "transformers has no causal-LM class for it"
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        try:
            if not find_linears(model):
                why = "its decoder blocks hold no nn.Linear"
        except ValueError:
            why = f"{type(model).__name__} keeps its blocks elsewhere"
    if why:
        raise ValueError(f"model_type {kind!r} is not supported ({why}); supported: {SUPPORTED_LAYOUTS}")


def find_linears(model: nn.Module, include_lm_head: bool = False,
                 types: tuple[type, ...] = (nn.Linear,)) -> list[LinearInfo]:
    """Every linear inside the decoder blocks, in execution order; lm_head only on request."""
    out: list[LinearInfo] = []
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for i, block in enumerate(layers):
        for sub_name, sub in block.named_modules():
            if isinstance(sub, types):
                parent_name, _, attr = sub_name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                out.append(LinearInfo(f"{prefix}.{i}.{sub_name}", parent, attr, sub, i))
    if include_lm_head:
        head = getattr(model, "lm_head", None)
        if isinstance(head, types):
            out.append(LinearInfo("lm_head", model, "lm_head", head, -1))
    return out


def replace_module(info: LinearInfo, new: nn.Module) -> None:
    """Swap info's module for `new`. When the old module is offloaded by accelerate (its weights on
    'meta', loaded at each forward by an AlignDevicesHook), `new` is offloaded the same way: its own
    tensors become its hook's CPU weights map, so the swapped-in module runs, and the dispatched
    model's GPU memory stays as accelerate planned it (the old module's entries are simply unused)."""
    old = info.module
    if is_offloaded_module(old) and not is_offloaded_module(new):
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module
        dev = old._hf_hook.execution_device
        new.to(dev)
        add_hook_to_module(new, AlignDevicesHook(execution_device=dev, offload=True, place_submodules=True))
    setattr(info.parent, info.attr, new)
    info.module = new


# ---------------------------------------------------------------- models dispatched by accelerate (device_map)
def is_offloaded_module(module: nn.Module) -> bool:
    """True when accelerate holds this module's weights off-device (params on 'meta', hook loads them)."""
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and bool(getattr(hook, "offload", False))


def has_offload(model: nn.Module) -> bool:
    """True when any parameter of the model is offloaded (on the 'meta' device)."""
    return any(p.device.type == "meta" for p in model.parameters())


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """The module with its real weights on its execution device inside the block (offloaded
    modules: loaded from accelerate's weights map, offloaded again on exit); others unchanged.
    Whatever reads a weight (decompositions, scores) goes through this: a 'meta' weight has no values."""
    if is_offloaded_module(module):
        from accelerate.utils import align_module_device
        with align_module_device(module):
            yield module
        return
    bad = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if bad:
        raise RuntimeError(f"{type(module).__name__}: parameter {bad[0]!r} is on 'meta' without an "
                           "accelerate offload hook on the module itself; cannot read its weight")
    yield module


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: the input embedding's execution device under a device_map
    (an offloaded embedding's parameters say 'meta'), else the first parameter's device."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    hook = getattr(emb, "_hf_hook", None) if emb is not None else None
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        dev = hook.execution_device
        return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for p in (emb.parameters() if emb is not None else model.parameters()):
        if p.device.type != "meta":
            return p.device
    return next(model.parameters()).device


def clone_module(module: nn.Module) -> nn.Module:
    """copy.deepcopy that shares accelerate hooks' weights maps (and tied-parameter maps) instead of
    copying them: the copy of an offloaded block loads the same dense weights from the same storage
    (a deepcopy would duplicate the whole offloaded state dict, or fail on disk-backed maps)."""
    memo: dict = {}
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for attr in ("weights_map", "tied_params_map"):
            obj = getattr(hook, attr, None) if hook is not None else None
            if obj is not None:
                memo[id(obj)] = obj
    return copy.deepcopy(module, memo)


@dataclass
class DecoderParts:
    """What runs after the decoder blocks: final norm (+ OPT's project_out) and lm_head."""
    layers: nn.ModuleList
    head_modules: list[nn.Module]  # applied in order to the last hidden state, lm_head last


def decoder_parts(model: nn.Module) -> DecoderParts | None:
    """Head modules for the two supported layouts; None when unknown (callers use full forwards)."""
    inner = getattr(model, "model", None)
    lm_head = getattr(model, "lm_head", None)
    if inner is None or lm_head is None:
        return None
    if isinstance(getattr(inner, "layers", None), nn.ModuleList) and hasattr(inner, "norm"):
        return DecoderParts(inner.layers, [inner.norm, lm_head])
    dec = getattr(inner, "decoder", None)
    if dec is not None and isinstance(getattr(dec, "layers", None), nn.ModuleList):
        mods = [m for m in (getattr(dec, "final_layer_norm", None), getattr(dec, "project_out", None))
                if m is not None]
        return DecoderParts(dec.layers, mods + [lm_head])
    return None


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList,
                         batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """(hidden state entering block 0, keyword arguments every block receives) for each batch.

    One embedding pass per batch, stopped at the last block: what lets a stage run blocks one at a
    time from cached inputs (masks and rotary embeddings are whatever the model computed). The blocks
    pass their input through unchanged meanwhile (their kwargs do not depend on it): the pass costs no
    block compute, where running blocks 0..n-2 cost most of a forward."""
    with passthrough(layers):
        return _capture_block_inputs(model, layers, batches)


def _identity_forward(hidden_states, *args, **kwargs):
    return hidden_states


@contextlib.contextmanager
def replaced_forwards(layers, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Each layer's forward set to wrap(its current forward), as an instance attribute; on exit the instance
    forward a layer had before (accelerate's hook wrapper under a device_map) is put back, or none is left."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = wrap(layer.forward)
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward


def passthrough(layers: nn.ModuleList) -> contextlib.AbstractContextManager:
    """Every block returns its input unchanged: a forward of the model then computes what the blocks
    receive (embeddings, masks, rotary tables) without running them."""
    return replaced_forwards(layers, lambda _forward: _identity_forward)


def _capture_block_inputs(model: nn.Module, layers: nn.ModuleList,
                          batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    hidden, kwargs = [], []
    for batch in batches:
        per_block: list[dict] = [None] * len(layers)
        first: list[torch.Tensor] = []

        def make_hook(i):
            def hook(_mod, args, kw):
                kw = dict(kw)
                h = args[0] if args else kw.pop("hidden_states")
                kw.pop("hidden_states", None)
                per_block[i] = kw
                if i == 0:
                    first.append(h.detach())
                if i == len(layers) - 1:
                    raise _StopForward
            return hook

        hooks = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            model(batch, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        hidden.append(first[0])
        kwargs.append(per_block)
    return hidden, kwargs


def run_block(block: nn.Module, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """A decoder block's output hidden state (blocks return a tensor or a tuple, by version)."""
    out = block(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out
