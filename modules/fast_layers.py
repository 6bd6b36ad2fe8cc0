"""Inference forms: compressed layers as plain matrix products, siblings sharing one first product.

The research forms keep what a decomposition found (CURLinear's actual columns C, core U and rows R;
RowIDLinear's kept rows and interpolation Z; ColIDLinear's kept columns), and some of them run as three
products or with a concatenation and gathers per call. `to_inference_form` rewrites a compressed model
for speed without changing its function (outputs agree to floating-point round-off; tested):

- CUR: U folded into C in fp32, so a call is two products (CU)(R x).
- SVD: two products, as stored.
- row ID: the kept outputs and the interpolated ones are written by two products straight into one
  buffer (kept first), then one gather puts them in the layer's order (no concatenation).
- column ID: one gather of the input into kept-then-other order, one multiply-add, one product.
- siblings, the layers that read the same input tensor (q/k/v of attention, gate/up of a gated MLP):
  their first factors are stacked into one matrix, so one product serves all of them, and each sibling
  slices its part. Siblings are found by running the model once, not by names, so any family works.

Ranks aligned to tensor-core tiles (acur.py --rank_align 64) matter as much: a width that is not a
multiple of 8 halves fp16 matmul throughput on the GPU (tools/bench_inference.py shows both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.cur_linear import CURLinear
from modules.kv_cache import LowRankKVAttention
from modules.low_rank_linear import ColIDLinear, RowIDLinear, SVDLinear
from modules.model_utils import find_linears, is_offloaded_module, replace_module

STACK_ALIGN = 8  # each sibling's slice of a stacked product starts on a 16-byte boundary in fp16


class StackedFirst(nn.Module):
    """The first factors of sibling layers as one matrix: x W^T is computed once per input tensor and
    each sibling slices its rows. The product is cached only while the same input tensor (same object,
    not modified in place since) is being consumed, and dropped when every sibling has taken its part."""

    def __init__(self, weight: torch.Tensor, members: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.members = members
        self._x: torch.Tensor | None = None
        self._version = -1
        self._out: torch.Tensor | None = None
        self._taken: set[int] = set()

    def take(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """The stacked product for input x; recomputed for a new or modified input."""
        if self._x is not x or self._version != x._version or slot in self._taken:
            self._out, self._x, self._version, self._taken = F.linear(x, self.weight), x, x._version, set()
        out = self._out
        self._taken.add(slot)
        if len(self._taken) == self.members:  # every sibling has its part: hold no activations
            self._out, self._x, self._taken = None, None, set()
        return out


class _FastBase(nn.Module):
    """A first product h = B x (own weight, or a slice of a StackedFirst), then the form's own second stage."""

    def __init__(self, first: torch.Tensor, out_features: int, bias: torch.Tensor | None, method: str):
        super().__init__()
        self.rank, self.in_features = first.shape
        self.out_features, self.method = out_features, method
        self.B = nn.Parameter(first, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.stack: StackedFirst | None = None
        self.slot, self.offset = 0, 0

    def join(self, stack: StackedFirst, slot: int, offset: int) -> None:
        """Use rows offset..offset+rank of a stacked first factor instead of an own weight."""
        self.stack, self.slot, self.offset = stack, slot, offset
        self.B = None

    def first_weight(self) -> torch.Tensor:
        return self.B if self.stack is None else self.stack.weight[self.offset:self.offset + self.rank]

    def first_product(self, x: torch.Tensor) -> torch.Tensor:
        """B x over x's last dimension (a strided slice of the stacked product when stacked)."""
        if self.stack is None:
            return F.linear(x, self.B)
        return self.stack.take(x, self.slot)[..., self.offset:self.offset + self.rank]

    def extra_repr(self) -> str:
        shared = f", stacked slot={self.slot}" if self.stack is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{shared}"


class FastPair(_FastBase):
    """y = A (B x) + b: SVD's two factors, or CUR with U folded into C (A = C U)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, method: str):
        super().__init__(B, A.shape[0], bias, method)
        self.A = nn.Parameter(A, requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        return self.A @ self.first_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.first_product(x), self.A, self.bias)


class FastRowID(_FastBase):
    """Row ID: h = R x (kept outputs) and Z h written into one buffer [h, Z h], one gather to the layer's order."""

    def __init__(self, R: torch.Tensor, Z: torch.Tensor, gather_index: torch.Tensor,
                 bias: torch.Tensor | None, method: str):
        super().__init__(R, R.shape[0] + Z.shape[0], bias, method)
        self.Z = nn.Parameter(Z, requires_grad=False)
        self.register_buffer("gather_index", gather_index)

    def dense_weight(self) -> torch.Tensor:
        R = self.first_weight()
        return torch.cat([R, self.Z @ R]).index_select(0, self.gather_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, k = x.reshape(-1, self.in_features), self.rank
        buf = x2.new_empty(x2.shape[0], self.out_features)
        if self.stack is None:
            torch.mm(x2, self.B.t(), out=buf[:, :k])  # strided output: cuBLAS writes it in place
        else:
            buf[:, :k].copy_(self.first_product(x).reshape(-1, k))
        if self.out_features > k:
            torch.mm(buf[:, :k], self.Z.t(), out=buf[:, k:])
        y = buf.index_select(1, self.gather_index)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class FastColID(nn.Module):
    """Column ID: x gathered once into kept-then-other order, z = x_kept + Z x_other (one multiply-add), y = C z."""

    def __init__(self, C: torch.Tensor, Z: torch.Tensor, perm: torch.Tensor, bias: torch.Tensor | None,
                 method: str):
        super().__init__()
        self.out_features, self.rank = C.shape
        self.in_features, self.method = perm.numel(), method
        self.C = nn.Parameter(C, requires_grad=False)
        self.Z = nn.Parameter(Z, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("perm", perm)

    def dense_weight(self) -> torch.Tensor:
        W = self.C.new_empty(self.out_features, self.in_features)
        W[:, self.perm] = torch.cat([self.C, self.C @ self.Z], dim=1)
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = x.reshape(-1, self.in_features).index_select(1, self.perm)
        k = self.rank
        z = torch.addmm(xp[:, :k], xp[:, k:], self.Z.t()) if self.in_features > k else xp
        return F.linear(z, self.C, self.bias).view(*x.shape[:-1], self.out_features)


FAST_CLASSES = (FastPair, FastRowID, FastColID)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@torch.no_grad()
def fast_layer(module: nn.Module) -> nn.Module | None:
    """The inference form of one compressed layer (None for a module that has none: dense, packed)."""
    bias = _detached(getattr(module, "bias", None))
    method = getattr(module, "method", "acur")
    if type(module) is CURLinear:
        A = (module.C.double() @ module.U.double()).to(module.C.dtype)
        return FastPair(A, module.R.detach(), bias, method)
    if type(module) is SVDLinear:
        return FastPair(module.A.detach(), module.B.detach(), bias, method)
    if type(module) is RowIDLinear:
        return FastRowID(module.R.detach(), module.Z.detach(), module.gather_index.clone(), bias, method)
    if type(module) is ColIDLinear:
        perm = torch.cat([module.col_indices, module.other_cols])
        return FastColID(module.C.detach(), module.Z.detach(), perm, bias, method)
    return None


def _sibling_sets(model: nn.Module, names: list[str], example: dict) -> list[list[str]]:
    """Groups (of two or more) of the named modules that read the very same input tensor in one forward."""
    mods = dict(model.named_modules())
    seen: dict[int, list[str]] = {}
    keep: list[torch.Tensor] = []  # held so no tensor id is reused during the pass
    hooks = []
    for name in names:
        def hook(mod, args, name=name):
            x = args[0]
            keep.append(x)
            seen.setdefault(id(x), []).append(name)
        hooks.append(mods[name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(**example)
    finally:
        for h in hooks:
            h.remove()
    groups, placed = [], set()
    for members in seen.values():
        uniq = [n for n in dict.fromkeys(members) if n not in placed]
        if len(uniq) > 1:
            groups.append(uniq)
            placed.update(uniq)
    return groups


@torch.no_grad()
def to_inference_form(model: nn.Module, fuse: bool = True, example: dict | None = None) -> dict:
    """Replace every compressed layer of `model` by its inference form, in place, and (fuse=True) stack
    the first factors of siblings. example: forward kwargs for finding siblings (default: two tokens).
    Returns {"converted": n, "groups": [[names]], "skipped": [names of compressed layers left as they were]}."""
    converted, skipped = [], []
    for info in find_linears(model, include_lm_head=True, types=(CURLinear, SVDLinear, RowIDLinear, ColIDLinear)):
        if is_offloaded_module(info.module) or isinstance(info.parent, LowRankKVAttention):
            # offloaded: its weights live off the device; low-rank KV: the attention reads its factors
            skipped.append(info.name)
            continue
        new = fast_layer(info.module)
        if new is None:  # a subclass with its own forward (e.g. a KV-cache layer)
            skipped.append(info.name)
            continue
        replace_module(info, new)
        converted.append(info.name)
    if skipped:
        print(f"[fast] left {len(skipped)} compressed layer(s) in their research form (offloaded, a low-rank "
              f"KV cache's k/v, or a subclass with its own forward): {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}", flush=True)
    groups: list[list[str]] = []
    if fuse and converted:
        stackable = [n for n in converted if isinstance(model.get_submodule(n), (FastPair, FastRowID))]
        if example is None:
            dev = next(model.parameters()).device
            example = {"input_ids": torch.tensor([[1, 2]], device=dev)}
        for group in _sibling_sets(model, stackable, example):
            layers = [model.get_submodule(n) for n in group]
            if len({(lay.B.device, lay.B.dtype, lay.in_features) for lay in layers}) != 1:
                continue
            rows, offsets, at = [], [], 0
            for lay in layers:
                pad = -lay.rank % STACK_ALIGN
                rows += [lay.B] + ([lay.B.new_zeros(pad, lay.in_features)] if pad else [])
                offsets.append(at)
                at += lay.rank + pad
            stack = StackedFirst(torch.cat(rows), len(layers))
            for slot, (lay, off) in enumerate(zip(layers, offsets)):
                lay.join(stack, slot, off)
            groups.append(group)
    return {"converted": len(converted), "groups": groups, "skipped": skipped}
