"""Inference forms: compressed layers as plain matrix products, siblings sharing one first product.

The research forms keep what a decomposition found (CURLinear's actual columns C, core U and rows R;
RowIDLinear's kept rows and interpolation Z; ColIDLinear's kept columns), and some of them run as three
products or with a concatenation and gathers per call. `to_inference_form` rewrites a compressed model
for speed without changing its function (outputs agree to floating-point round-off; tested):

- CUR: U folded into C (the product taken in fp64, rounded once), so a call is two products (CU)(R x).
- SVD: two products, as stored.
- row ID: the kept outputs and the interpolated ones are written by two products straight into one
  buffer (kept first), then one gather puts them in the layer's order (no concatenation).
- column ID: one gather of the input into kept-then-other order, one multiply-add, one product.
- siblings, the layers that read the same input tensor (q/k/v of attention, gate/up of a gated MLP),
  are computed together: their first factors stacked into one matrix (one product serves all), and one
  gather for all row-ID members; column-ID siblings share one gather of their input. Neighbouring
  siblings of one shape (q/k/v, gate/up) run their second products as one batched product (bmm).
  Siblings are found by running the model once, not by names, so any family works.

Ranks aligned to tensor-core tiles (acur.py --rank_align 64) matter as much: a width that is not a
multiple of 8 halves fp16 matmul throughput on the GPU (tools/bench_inference.py shows both). Measured
(H200, LLaMA-2-7B shape, ratio 0.8, CUDA-graph decode; README_CUR4LLM "Inference forms"): CUR and SVD
become faster than dense, row and column ID reach 0.97-1.01x, held back by their gathers.

Under torch.compile (no graph break) row ID and the groups trace functional paths instead, so the compiler
fuses the gathers into the neighbouring kernels; compiled, every form decodes and prefills faster than
compiled dense (row ID 1.10x, column ID 1.03x at batch 1; README_CUR4LLM "Compiled").
"""
from __future__ import annotations

# ===== BEGIN FAST RUNTIME (self-contained: torch only; exported repos carry it as acur_fast.py) =====
import torch
import torch.nn.functional as F
from torch import nn

STACK_ALIGN = 8  # each sibling's slice of a stacked product starts on a 16-byte boundary in fp16
BATCHED_MAX_TOKENS = 64  # bundles run batched for up to this many tokens (decode); per member above (prefill),
                         # where the batched products measured slower (H200: 38.6k against 43.8k tok/s)


def _compiling() -> bool:
    """Inside torch.compile's trace: the layers take plain functional paths (no in-place writes into
    views, no Python-side caches), which the compiler fuses: gathers into their neighbours' kernels."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


class _Member(nn.Module):
    """An inference-form layer that may join a group of siblings (slot `slot` of `group`), which may then
    hold some of its factors."""

    def __init__(self):
        super().__init__()
        self.group: _SharedInputGroup | None = None
        self.slot = 0

    def factor(self, name: str) -> torch.Tensor | None:
        """A factor or the bias: the layer's own, or its slice of its bundle's stack."""
        own = getattr(self, name)
        if own is not None or self.group is None or self.slot not in self.group.bundle_of:
            return own
        return self.group.bundled(name, self.slot)

    def extra_repr(self) -> str:
        shared = f", sibling slot={self.slot}" if self.group is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{shared}"


class _FastBase(_Member):
    """A first product h = B x, then the form's own second stage; or, in a SiblingGroup, its slice of
    the group's outputs."""

    def __init__(self, first: torch.Tensor, out_features: int, bias: torch.Tensor | None, method: str):
        super().__init__()
        self.rank, self.in_features = first.shape
        self.out_features, self.method = out_features, method
        self.B = nn.Parameter(first, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def first_weight(self) -> torch.Tensor:
        if self.group is None:
            return self.B
        off = self.group.offsets[self.slot]
        return self.group.weight[off:off + self.rank]


class FastPair(_FastBase):
    """y = A (B x) + b: SVD's two factors, or CUR with U folded into C (A = C U)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, method: str):
        super().__init__(B, A.shape[0], bias, method)
        self.A = nn.Parameter(A, requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        return self.factor("A") @ self.first_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            return self.group.take(x, self.slot)
        return F.linear(F.linear(x, self.B), self.A, self.bias)


class FastRowID(_FastBase):
    """Row ID: h = R x (kept outputs) and Z h written into one buffer [h, Z h], one gather to the layer's order."""

    def __init__(self, R: torch.Tensor, Z: torch.Tensor, gather_index: torch.Tensor,
                 bias: torch.Tensor | None, method: str):
        super().__init__(R, R.shape[0] + Z.shape[0], bias, method)
        self.Z = nn.Parameter(Z, requires_grad=False)
        self.register_buffer("gather_index", gather_index)

    def dense_weight(self) -> torch.Tensor:
        R = self.first_weight()
        return torch.cat([R, self.factor("Z") @ R]).index_select(0, self.gather_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            return self.group.take(x, self.slot)
        x2, k = x.reshape(-1, self.in_features), self.rank
        if _compiling():  # one expression: the compiler writes both products into one buffer and fuses the gather
            h = F.linear(x2, self.B)
            y = (torch.cat([h, F.linear(h, self.Z)], dim=1) if self.out_features > k else h)[:, self.gather_index]
            y = y if self.bias is None else y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        buf = x2.new_empty(x2.shape[0], self.out_features)
        torch.mm(x2, self.B.t(), out=buf[:, :k])  # strided output: cuBLAS writes it in place
        if self.out_features > k:
            torch.mm(buf[:, :k], self.Z.t(), out=buf[:, k:])
        y = buf[:, self.gather_index]  # advanced indexing: 1 us faster per call than index_select on an H200
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def _runs(keys: list) -> list[tuple[int, int]]:
    """(first index, length) of each run of consecutive equal keys."""
    runs: list[tuple[int, int]] = []
    for i, key in enumerate(keys):
        if runs and keys[runs[-1][0]] == key:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


class _SharedInputGroup(nn.Module):
    """Layers reading one input tensor, computed together at the first member's call; each member takes
    its own output. The outputs are held only while the same input tensor (same object, not modified in
    place since) is being consumed, and dropped once every member has taken its part.

    Neighbouring members of one kind and shape (q/k/v of full attention, k/v of grouped-query attention,
    gate/up) form a bundle: their factors are stacked and run as batched products (bmm), one kernel
    where there were two or three (measured on an H200: experiments/measured/h200_bmm_siblings.txt).
    The group then owns the bundle's factors, as `<factor>_<first slot>`, and the members hold none."""

    def __init__(self, n_members: int):
        super().__init__()
        self.n_members = n_members
        self.bundle_of: dict[int, tuple[int, int]] = {}
        self.computed = 0  # how many times the group's outputs were computed (tests count it)
        self._x: torch.Tensor | None = None
        self._version = -1
        self._outs: list[torch.Tensor] | None = None
        self._taken: set[int] = set()

    def _bundle(self, members: list[nn.Module], keys: list, factors) -> list[tuple[int, int]]:
        """Stack the factors (`factors(member)`: attribute names) of each run of members with equal keys
        into the group's parameters, taken from the members. Returns the units: (first slot, members)."""
        units = _runs(keys)
        for s0, count in units:
            if count == 1:
                continue
            run = members[s0:s0 + count]
            for name in factors(run[0]):
                parts = [getattr(lay, name) for lay in run]
                stacked = None if parts[0] is None else nn.Parameter(torch.stack(parts), requires_grad=False)
                self.register_parameter(f"{name}_{s0}", stacked)
                for lay in run:
                    setattr(lay, name, None)
            self.bundle_of.update({s0 + g: (s0, g) for g in range(count)})
        return units

    def bundled(self, name: str, slot: int) -> torch.Tensor | None:
        """Member `slot`'s factor `name`, from its bundle's stack."""
        s0, g = self.bundle_of[slot]
        stacked = getattr(self, f"{name}_{s0}")
        return None if stacked is None else stacked[g]

    def _units_for(self, tokens: int) -> list[tuple[int, int]]:
        """Bundles batched for decode-sized inputs; above BATCHED_MAX_TOKENS every member alone."""
        return self._units if tokens <= BATCHED_MAX_TOKENS else [(slot, 1) for slot in range(self.n_members)]

    def take(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """Member `slot`'s output for input x; all outputs are recomputed for a new or modified input.
        Under torch.compile the cache is traced too (the compiler replays it), by identity only: it cannot
        read _version, and _sibling_sets grouped only siblings whose input was unmodified between them."""
        traced = _compiling()
        if self._x is not x or slot in self._taken or (not traced and self._version != x._version):
            if not traced:
                self.computed += 1
            self._outs, self._x, self._taken = self._compute(x, traced), x, set()
            self._version = -1 if traced else x._version
        out = self._outs[slot]
        self._taken.add(slot)
        if len(self._taken) == self.n_members:  # every member has its part: hold no activations
            self._outs, self._x, self._taken = None, None, set()
        return out

    def _compute(self, x: torch.Tensor, traced: bool) -> list[torch.Tensor]:
        raise NotImplementedError


def _batched(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h (G, tokens, k) times each of weight (G, out, k) transposed, plus bias (G, out): (G, tokens, out)."""
    w = weight.transpose(1, 2)
    return torch.bmm(h, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, w)


class SiblingGroup(_SharedInputGroup):
    """Sibling FastPair / FastRowID layers: one product for all their first factors, each member's (or
    bundle's) second product, and one gather for all row-ID members."""

    def __init__(self, members: list[_FastBase]):
        super().__init__(len(members))
        n = members[0].in_features
        rows, self.offsets, at = [], [], 0
        for lay in members:
            pad = -lay.rank % STACK_ALIGN  # each slice starts on a 16-byte boundary in fp16
            rows += [lay.first_weight()] + ([lay.first_weight().new_zeros(pad, n)] if pad else [])
            self.offsets.append(at)
            at += lay.rank + pad
        self.width = at
        self.weight = nn.Parameter(torch.cat(rows), requires_grad=False)
        # pre-gather buffer: [stacked first product | Z part of each row-ID member]; one gather maps it
        # to [outputs of row-ID member 0 | member 1 | ...] in each layer's own order
        self.z_offsets, self.out_offsets, index = {}, {}, []
        out_at = 0
        for slot, lay in enumerate(members):
            if isinstance(lay, FastRowID):
                k, off = lay.rank, self.offsets[slot]
                self.z_offsets[slot] = at
                g = lay.gather_index
                index.append(torch.where(g < k, g + off, g - k + at))
                at += lay.out_features - k
                self.out_offsets[slot] = out_at
                out_at += lay.out_features
        self.buffer_width = at
        self.register_buffer("gather_index", torch.cat(index) if index else torch.zeros(0, dtype=torch.long,
                                                                                          device=self.weight.device))
        for slot, lay in enumerate(members):
            lay.group, lay.slot, lay.B = self, slot, None
        # a pair bundle's biases are stacked with its factors (one batched multiply-add); a row-ID
        # member adds its own bias after the gather
        keys = [(type(lay), lay.rank, lay.out_features, lay.bias is None) for lay in members]
        self._units = self._bundle(members, keys, lambda lay: ("A", "bias") if isinstance(lay, FastPair) else ("Z",))
        # each single member's second stage, by reference to its own parameters: the members own the
        # group, not the other way round (no reference cycle, so a dropped model frees its memory at once)
        self._slots = [(isinstance(lay, FastPair), lay.A if isinstance(lay, FastPair) else lay.Z, lay.bias,
                        lay.rank, lay.out_features) for lay in members]

    def _single(self, slot: int) -> tuple:
        """A member's second stage, run alone: its own factors, or its slices of its bundle's."""
        pair, second, bias, rank, out_features = self._slots[slot]
        if slot in self.bundle_of:
            second = self.bundled("A" if pair else "Z", slot)
            bias = self.bundled("bias", slot) if pair else bias
        return pair, second, bias, rank, out_features

    def _compute(self, x: torch.Tensor, traced: bool = False) -> list[torch.Tensor]:
        """traced: build the pre-gather buffer by concatenation instead of writes into its views."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.weight.shape[1])
        tokens = x2.shape[0]
        if traced:
            first = F.linear(x2, self.weight)
            zs = []
        else:
            buf = x2.new_empty(tokens, self.buffer_width)
            first = torch.mm(x2, self.weight.t(), out=buf[:, :self.width])
        outs: list[torch.Tensor | None] = [None] * self.n_members
        for s0, count in self._units_for(tokens):
            pair, second, bias, rank, out_features = self._single(s0) if count == 1 else self._slots[s0]
            off = self.offsets[s0]
            if count == 1:
                h = first[:, off:off + rank]
            else:  # the bundle's slices of the first product, equally spaced: (count, tokens, rank)
                stride = self.offsets[s0 + 1] - off
                h = first[:, off:off + count * stride].view(tokens, count, stride)[..., :rank].transpose(0, 1)
            if pair and count == 1:
                outs[s0] = F.linear(h, second, bias).view(*lead, out_features)
            elif pair:
                y = _batched(h, getattr(self, f"A_{s0}"), getattr(self, f"bias_{s0}"))
                outs[s0:s0 + count] = [y[g].view(*lead, out_features) for g in range(count)]
            elif out_features > rank:
                width = out_features - rank
                if count == 1 and traced:
                    zs.append(F.linear(h, second))
                elif count == 1:
                    z = self.z_offsets[s0]
                    torch.mm(h, second.t(), out=buf[:, z:z + width])
                elif traced:
                    zs.append(_batched(h, getattr(self, f"Z_{s0}"), None).transpose(0, 1).reshape(tokens, count * width))
                else:  # written in place for one token (a decode step); for more, bmm copies into the view
                    z = self.z_offsets[s0]
                    torch.bmm(h, getattr(self, f"Z_{s0}").transpose(1, 2),
                              out=buf[:, z:z + count * width].view(tokens, count, width).transpose(0, 1))
        if traced and self.out_offsets:
            buf = torch.cat([first] + zs, dim=1)
        if self.out_offsets:
            y = buf[:, self.gather_index]  # advanced indexing: 1 us faster per call than index_select on an H200
            for slot, o in self.out_offsets.items():
                bias, out_features = self._slots[slot][2], self._slots[slot][4]
                part = y[:, o:o + out_features]
                if bias is not None:
                    part = part + bias
                outs[slot] = part.view(*lead, out_features)
        return outs


class FastColID(_Member):
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

    def factor(self, name: str) -> torch.Tensor | None:
        """As _Member's; in a group, the input order (perm) is the member's slice of the group's."""
        if name == "perm" and self.perm is None:
            return self.group.perm[self.slot * self.in_features:(self.slot + 1) * self.in_features]
        return super().factor(name)

    def dense_weight(self) -> torch.Tensor:
        C, Z = self.factor("C"), self.factor("Z")
        W = C.new_empty(self.out_features, self.in_features)
        W[:, self.factor("perm")] = torch.cat([C, C @ Z], dim=1)
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            return self.group.take(x, self.slot)
        xp = x.reshape(-1, self.in_features)[:, self.perm]
        k = self.rank
        z = torch.addmm(xp[:, :k], xp[:, k:], self.Z.t()) if self.in_features > k else xp
        return F.linear(z, self.C, self.bias).view(*x.shape[:-1], self.out_features)


class ColIDGroup(_SharedInputGroup):
    """Sibling FastColID layers: one gather of the shared input for all members, then per bundle one
    batched multiply-add (z = x_kept + Z x_other) and one batched product (y = C z)."""

    def __init__(self, members: list[FastColID]):
        super().__init__(len(members))
        self.in_features = members[0].in_features
        self.register_buffer("perm", torch.cat([lay.perm for lay in members]))
        for slot, lay in enumerate(members):
            lay.group, lay.slot, lay.perm = self, slot, None
        keys = [(lay.rank, lay.out_features, lay.bias is None) for lay in members]
        self._units = self._bundle(members, keys, lambda lay: ("C", "Z", "bias"))
        # single members' factors by reference, as in SiblingGroup (no reference cycle)
        self._slots = [(lay.C, lay.Z, lay.bias, lay.rank, lay.out_features) for lay in members]

    def _compute(self, x: torch.Tensor, traced: bool = False) -> list[torch.Tensor]:
        lead, n = x.shape[:-1], self.in_features
        x2 = x.reshape(-1, n)
        tokens = x2.shape[0]
        xp = x2[:, self.perm]  # every member's kept-then-other order, side by side
        outs: list[torch.Tensor | None] = [None] * self.n_members
        for s0, count in self._units_for(tokens):
            C, Z, bias, k, out_features = self._slots[s0]
            if count == 1 and s0 in self.bundle_of:  # run alone (many tokens): its slices of the bundle's
                C, Z, bias = (self.bundled(name, s0) for name in ("C", "Z", "bias"))
            if count == 1:
                xs = xp[:, s0 * n:(s0 + 1) * n]
                z = torch.addmm(xs[:, :k], xs[:, k:], Z.t()) if n > k else xs
                outs[s0] = F.linear(z, C, bias).view(*lead, out_features)
                continue
            xs = xp[:, s0 * n:(s0 + count) * n].view(tokens, count, n).transpose(0, 1)
            Z = getattr(self, f"Z_{s0}")
            z = torch.baddbmm(xs[..., :k], xs[..., k:], Z.transpose(1, 2)) if n > k else xs
            y = _batched(z, getattr(self, f"C_{s0}"), getattr(self, f"bias_{s0}"))
            outs[s0:s0 + count] = [y[g].view(*lead, out_features) for g in range(count)]
        return outs


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


# the research layer classes, by name: the project's modules/ and an exported repo's acur_layers.py alike
RESEARCH_CLASSES = ("CURLinear", "SVDLinear", "RowIDLinear", "ColIDLinear")


@torch.no_grad()
def fast_layer(module: nn.Module) -> nn.Module | None:
    """The inference form of one compressed layer (None for a module that has none: dense, packed)."""
    bias = _detached(getattr(module, "bias", None))
    method = getattr(module, "method", "acur")
    kind = type(module).__name__
    if kind == "CURLinear":
        A = (module.C.double() @ module.U.double()).to(module.C.dtype)
        return FastPair(A, module.R.detach(), bias, method)
    if kind == "SVDLinear":
        return FastPair(module.A.detach(), module.B.detach(), bias, method)
    if kind == "RowIDLinear":
        return FastRowID(module.R.detach(), module.Z.detach(), module.gather_index.clone(), bias, method)
    if kind == "ColIDLinear":
        perm = torch.cat([module.col_indices, module.other_cols])
        return FastColID(module.C.detach(), module.Z.detach(), perm, bias, method)
    return None


def _sibling_sets(model: nn.Module, names: list[str], example: dict) -> list[list[str]]:
    """Groups (of two or more) of the named modules that read the very same input tensor, unmodified
    between their calls, in one forward."""
    mods = dict(model.named_modules())
    seen: dict[tuple[int, int], list[str]] = {}
    keep: list[torch.Tensor] = []  # held so no tensor id is reused during the pass
    hooks = []
    for name in names:
        def hook(mod, args, name=name):
            x = args[0]
            keep.append(x)
            seen.setdefault((id(x), x._version), []).append(name)
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
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ not in RESEARCH_CLASSES:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # accelerate hooks (device moves, offload) belong to the old module; a low-rank KV cache's
        # attention reads its k/v factors itself
        if getattr(mod, "_hf_hook", None) is not None or type(parent).__name__ == "LowRankKVAttention" \
                or any(p.device.type == "meta" for p in mod.parameters()):
            skipped.append(name)
            continue
        setattr(parent, attr, fast_layer(mod))
        converted.append(name)
    if skipped:
        print(f"[fast] left {len(skipped)} compressed layer(s) in their research form (dispatched by "
              f"accelerate, or a low-rank KV cache's k/v): {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}", flush=True)
    groups: list[list[str]] = []
    if fuse and converted:
        if example is None:
            dev = next(model.parameters()).device
            example = {"input_ids": torch.tensor([[1, 2]], device=dev)}
        for siblings in _sibling_sets(model, converted, example):
            # column-ID siblings share their gather, the others their first product: a group of each
            for kind, group_class in (((FastPair, FastRowID), SiblingGroup), ((FastColID,), ColIDGroup)):
                group = [n for n in siblings if isinstance(model.get_submodule(n), kind)]
                layers = [model.get_submodule(n) for n in group]
                if len(layers) < 2 or len({(p.device, p.dtype) for lay in layers for p in lay.parameters()}) != 1:
                    continue
                group_class(layers)
                groups.append(group)
    return {"converted": len(converted), "groups": groups, "skipped": skipped}
# ===== END FAST RUNTIME =====

RUNTIME_MARK = "FAST RUNTIME"
RUNTIME_DOC = ("Inference forms of the low-rank layers (plain products, siblings computed together), copied by "
               "CUR4LLM build_acur_repo.py\nfrom the project's modules/fast_layers.py: "
               "`model.to_inference_form()` rewrites a loaded model for speed, same outputs.")
