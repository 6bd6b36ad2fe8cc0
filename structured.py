"""Structured CUR: keep whole MLP neurons and whole KV groups, slice the model, refit down_proj / o_proj.

    python acur.py --model_id smollm2-135m --method structured --param_ratio_target 0.8 \\
        --calib_dataset squad_wiki --eval_ppl new_wiki --structured_widths per_layer

The math (which channels, the refit) is modules/structured.py's; this file walks the model. A decoder block
has two units. Its MLP: channels = intermediate neurons; a kept neuron keeps its rows of gate_proj and
up_proj (OPT: fc1) and its column of down_proj (fc2). Its attention: channels = the head outputs, in whole
KV groups; a kept group keeps its rows of k_proj / v_proj, its query heads' rows of q_proj and their
columns of o_proj. The unit's last layer is refitted on the kept channels. The result is the same model
class with narrower nn.Linear layers (method `neurons`: MLPs only; `structured`: MLPs and attentions).

Stages, called from acur.py (so tools/compare.py runs them too):
  sensitivity  closed-form loss of every unit at candidate widths, from the dense statistics (its last
               layer's input covariance and output fisher), no forward pass
  search       the widths: per_layer = binary_search.allocate across units (blocks, attention vs MLP);
               uniform = one MLP width and one KV-group count in every block (a stock config), the split
               between attention and MLP chosen by the same loss
  compress     block by block on the inputs the already-compressed model produces
               (act_aware_utils.sequential_calibration): each unit picks its channels and is sliced
Ratio = kept parameters of the run's selected linears over dense, as for every method: a unit's linears
each keep keep/G of their parameters; selected linears outside any unit (attention under `neurons`) stay
dense and count in full.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

import binary_search
from act_aware_utils import sequential_calibration
from modules import decompositions as dec, registry
from modules import structured as ms
from modules.low_rank_linear import LayerStats
from modules.model_utils import LinearInfo, decoder_layers, materialized, replace_module

WIDTH_MODES = ("per_layer", "uniform")
DEFAULT_KEEPS = tuple(round(0.10 + 0.01 * i, 2) for i in range(90))  # MLP candidate keep fractions 0.10..0.99
MLP_LAYOUTS = (("mlp", ("gate_proj", "up_proj"), "down_proj"), ("", ("fc1",), "fc2"))  # LLaMA/Qwen2/Mistral, OPT
ATTN_INPUTS, ATTN_OUTPUTS = ("q_proj", "k_proj", "v_proj"), ("o_proj", "out_proj")


@dataclass
class Unit:
    """One block part that keeps whole channel groups: `inputs` lose rows, `output` loses columns (refitted)."""
    name: str                        # module path, e.g. "model.layers.3.mlp"
    kind: str                        # "mlp" or "attn"
    block: int
    owner: nn.Module                 # the module whose width attributes (intermediate_size, num_heads) describe it
    inputs: list[LinearInfo]
    output: LinearInfo
    row_groups: list[torch.Tensor]   # per input: (G, rows of one group)
    col_groups: torch.Tensor         # (G, columns of one group) of the output
    heads_per_group: int = 1         # attention: query heads per KV group
    group_params: int = 0            # parameters one group holds across the unit's linears

    @property
    def n_groups(self) -> int:
        return self.col_groups.shape[0]

    def params(self, keep: int) -> int:
        return keep * self.group_params

    def linears(self) -> list[LinearInfo]:
        return self.inputs + [self.output]


def _linear(module: nn.Module | None) -> nn.Linear | None:
    return module if isinstance(module, nn.Linear) else None


def _mlp_unit(block: nn.Module, path: str, b: int, by_module: dict) -> Unit | None:
    for owner_attr, ins, out in MLP_LAYOUTS:
        owner = getattr(block, owner_attr, None) if owner_attr else block
        mods = [_linear(getattr(owner, a, None)) for a in ins + (out,)] if owner is not None else [None]
        if all(m is not None for m in mods):
            infos = [by_module.get(id(m)) for m in mods]
            n = mods[0].out_features
            if any(m.out_features != n for m in mods[:-1]) or mods[-1].in_features != n:
                return None
            groups = ms.channel_groups(n, 1)
            return Unit(f"{path}.{owner_attr}" if owner_attr else path, "mlp", b, owner, infos[:-1], infos[-1],
                        [groups] * len(ins), groups,
                        group_params=sum(m.in_features for m in mods[:-1]) + mods[-1].out_features)
    return None


def _attn_unit(block: nn.Module, path: str, b: int, by_module: dict) -> Unit | None:
    attn = getattr(block, "self_attn", None)
    if attn is None or len(attn._parameters) or not isinstance(getattr(attn, "head_dim", None), int):
        return None  # no attention, or per-head parameters of its own (e.g. attention sinks)
    q, k, v = (_linear(getattr(attn, a, None)) for a in ATTN_INPUTS)
    o_attr = next((a for a in ATTN_OUTPUTS if _linear(getattr(attn, a, None)) is not None), None)
    if None in (q, k, v) or o_attr is None:
        return None  # e.g. a fused qkv projection
    o, d = getattr(attn, o_attr), attn.head_dim
    if q.out_features % d or k.out_features % d or k.out_features != v.out_features or o.in_features != q.out_features:
        return None
    n_q, n_kv = q.out_features // d, k.out_features // d
    if n_q % n_kv:
        return None
    qg, kvg = ms.kv_group_channels(n_kv, n_q // n_kv, d)
    infos = [by_module.get(id(m)) for m in (q, k, v, o)]
    return Unit(f"{path}.self_attn", "attn", b, attn, infos[:3], infos[3], [qg, kvg, kvg], qg, n_q // n_kv,
                group_params=(qg.shape[1] + 2 * d) * q.in_features + qg.shape[1] * o.out_features)


def find_units(model: nn.Module, linears: list[LinearInfo], method: str) -> list[Unit]:
    """The units `method` compresses, in block order: every block's MLP (and attention for `structured`)
    whose linears the run selected. ValueError (one line) for a block layout it does not know (fused
    projections, GPT-2's Conv1D, per-head parameters) or a selection that splits a unit."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    selected = {id(i.module): i for i in linears}
    kinds = method_kinds(method)
    units = []
    for b, block in enumerate(layers):
        path = f"{prefix}.{b}"
        # LinearInfo of every linear of the block (selected or not), to find the units' parts
        every = {id(m): LinearInfo(f"{path}.{n}", block.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2], m, b)
                 for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        for kind in kinds:
            unit = (_mlp_unit if kind == "mlp" else _attn_unit)(block, path, b, every)
            if unit is None:
                what = ("an MLP of gate_proj/up_proj/down_proj or fc1/fc2" if kind == "mlp" else
                        "an attention of separate q_proj/k_proj/v_proj/o_proj with whole heads")
                raise ValueError(f"{type(model).__name__}: block {b} has no {what} as nn.Linear layers; "
                                 f"--method {method} knows LLaMA-, Qwen2-, Mistral- and OPT-style blocks")
            chosen = [id(i.module) in selected for i in unit.linears()]
            if all(chosen):
                unit.inputs = [selected[id(i.module)] for i in unit.inputs]
                unit.output = selected[id(unit.output.module)]
                units.append(unit)
            elif any(chosen):
                raise ValueError(f"--method {method} keeps whole neurons and heads: the selected linears must hold "
                                 f"all of {unit.name}'s " + "/".join(i.attr for i in unit.linears()) + " or none")
    return units


def method_kinds(method: str) -> tuple[str, ...]:
    """Which units a structured method compresses: `neurons` the MLPs only, every other one MLPs and attentions."""
    return ("mlp",) if registry.get(method).name.split("[")[0] == "neurons" else ("mlp", "attn")


# ---------------------------------------------------------------- closed-form loss per unit
def _key(keep: int, n: int) -> str:
    return f"{keep / n:.6g}"


def _keep(ratio: float, n: int) -> int:
    """Groups a ratio buys (rounded down: a ratio is a budget)."""
    return int(math.floor(ratio * n + 1e-6))


def _keep_of_key(ratio: float, n: int) -> int:
    """The kept count a table key (_key: k / n to 6 digits) stands for."""
    return round(ratio * n)


def candidate_keeps(unit: Unit, fractions: list[float] | None = None, align: int = 1) -> list[int]:
    """Kept group counts the allocation may give a unit: every KV-group count for attention; for an MLP the
    keep fractions (default 0.10..0.99), rounded down to multiples of `align` (--rank_align)."""
    n = unit.n_groups
    if unit.kind == "attn":
        return list(range(1, n))
    keeps = {max((_keep(f, n) // align) * align, 1) for f in (fractions or DEFAULT_KEEPS)}
    return sorted(k for k in keeps if k < n)


def conditioned(cov: torch.Tensor, n_tokens: int | None, damp: float, shrink: bool) -> torch.Tensor:
    """The covariance the fits use: damped (and shrunk toward its diagonal by the token count when the
    method shrinks), fp64, as the row IDs use it (modules/decompositions.py)."""
    if shrink and n_tokens:
        return dec.shrunk_covariance(cov, n_tokens, damp)
    return dec.damped_covariance(cov, damp)


def unit_curve(unit: Unit, stats: LayerStats, keeps: list[int], selection: str, damp: float,
               spec: registry.Method) -> dict[str, float]:
    """{keep fraction: predicted rise of the calibration NLL} of one unit: half the fisher-weighted output
    error of its refitted last layer (as sensitivity.fisher_error scores a linear)."""
    with materialized(unit.output.module):
        W = unit.output.module.weight.detach()
        cov = stats.cov.to(W.device)
        C = conditioned(cov, stats.n_tokens, damp, spec.shrink)
        g = stats.row_weight if spec.fisher else None
        n, most = unit.n_groups, unit.n_groups - min(keeps)
        if selection == "greedy":
            err = ms.greedy_removal(W, C, most, unit.col_groups, row_weight=g)[1]
        else:
            order = ms.leverage_removal(cov, most, _ridge(cov, damp), unit.col_groups)
            err = ms.removal_curve(W, C, order, unit.col_groups, row_weight=g)
    return {_key(k, n): 0.5 * float(err[n - k]) for k in keeps}


def _ridge(cov: torch.Tensor, damp: float) -> float:
    """MoDeGPT's ridge lam, relative like --cov_damp: damp * mean(diag C)."""
    return damp * max(float(cov.double().diagonal().mean()), 1e-12)


def sensitivity(units: list[Unit], stats: dict[str, LayerStats], args: argparse.Namespace,
                fractions: list[float] | None = None, done: dict | None = None,
                on_progress: Callable[[dict], None] | None = None) -> dict:
    """{unit name: {keep fraction: predicted NLL rise}}: every unit's closed-form curve (dense statistics)."""
    spec = registry.get(args.method)
    table = dict(done or {})
    for unit in tqdm([u for u in units if u.name not in table], desc="sensitivity (structured refit error)"):
        st = stats.get(unit.output.name)
        keeps = candidate_keeps(unit, fractions, args.rank_align)
        if not keeps:
            table[unit.name] = {}
        elif st is None or st.cov is None or not torch.isfinite(st.cov).all():
            print(f"WARNING: {unit.name}: no finite input covariance of {unit.output.attr}; scored as maximally sensitive")
            table[unit.name] = {_key(k, unit.n_groups): math.inf for k in keeps}
        else:
            table[unit.name] = unit_curve(unit, st, keeps, args.structured_selection, args.cov_damp, spec)
        if on_progress is not None:
            on_progress(table)
    return table


# ---------------------------------------------------------------- widths
def fixed_and_dense(units: list[Unit], linears: list[LinearInfo]) -> tuple[int, int]:
    """(parameters of the selected linears outside every unit, dense parameters of all selected linears)."""
    inside = {i.name for u in units for i in u.linears()}
    dense = sum(i.module.weight.numel() for i in linears)  # before compression: the dense count
    return sum(i.module.weight.numel() for i in linears if i.name not in inside), dense


def _curve_at(row: dict[str, float], unit: Unit, keep: int) -> float:
    """A unit's predicted loss at any kept count, linear between its candidate points (dense: 0)."""
    pts = sorted([(_keep_of_key(float(r), unit.n_groups), v) for r, v in row.items()] + [(unit.n_groups, 0.0)])
    for (k0, v0), (k1, v1) in zip(pts, pts[1:]):
        if k0 <= keep <= k1:
            return v0 if k1 == k0 else v0 + (v1 - v0) * (keep - k0) / (k1 - k0)
    return pts[0][1]  # below every candidate: the smallest one's loss


def stock_head_count(unit: Unit, groups: int) -> bool:
    """Whether `groups` KV groups give a query-head count a stock config accepts: transformers (5.x) refuses a
    LlamaConfig whose hidden_size is not a multiple of num_attention_heads, even with head_dim given, so a
    uniform export of 26 of LLaMA-2-7B's 32 heads would not load."""
    hidden = unit.output.module.out_features
    return hidden % (groups * unit.heads_per_group) == 0


def uniform_widths(units: list[Unit], table: dict, budget: float, align: int = 1) -> dict[str, int]:
    """One KV-group count for every attention and one neuron count for every MLP within `budget`: of the
    feasible pairs (the MLP width the largest that fits beside each group count) the one of least summed
    predicted loss."""
    mlps = [u for u in units if u.kind == "mlp"]
    attns = [u for u in units if u.kind == "attn"]
    best, best_loss = None, math.inf
    for g in (range(max(u.n_groups for u in attns), 0, -1) if attns else [None]):
        if g is not None and not stock_head_count(attns[0], g):
            continue  # a stock config must hold this head count: transformers refuses one not dividing hidden_size
        left = budget - sum(u.params(min(g, u.n_groups)) for u in attns)
        k = None
        if mlps:
            k = min(int(left // sum(u.group_params for u in mlps)), max(u.n_groups for u in mlps))
            k = (k // align) * align if k >= align else k
            if k < 1:
                continue
        elif left < 0:
            continue
        widths = {u.name: min(g, u.n_groups) for u in attns} | {u.name: min(k, u.n_groups) for u in mlps}
        loss = sum(_curve_at(table[n], u, widths[n]) for u in units for n in [u.name])
        if best is None or loss < best_loss:
            best, best_loss = widths, loss
    if best is None:
        raise ValueError("the target is below what whole neurons and KV groups can reach (at least one of each)")
    return best


def search(units: list[Unit], linears: list[LinearInfo], table: dict, target: float, mode: str,
           align: int = 1) -> dict[str, float]:
    """Per-linear ratios (each unit's linears at keep / G, the rest 1.0) of the widths `mode` chooses."""
    fixed, dense = fixed_and_dense(units, linears)
    budget = target * dense - fixed
    if budget < 0:
        raise ValueError(f"param_ratio_target {target}: the linears this method leaves dense already hold "
                         f"{fixed / dense:.4f} of the parameters")
    if mode == "uniform":
        widths = uniform_widths(units, table, budget, align)
    else:
        by_name = {u.name: u for u in units}
        ratios = binary_search.allocate({u.name: table[u.name] for u in units},
                                        lambda name, r: by_name[name].params(_keep_of_key(r, by_name[name].n_groups)),
                                        budget)
        widths = {name: _keep_of_key(r, by_name[name].n_groups) for name, r in ratios.items()}
    return ratios_of_widths(units, widths, linears)


def ratios_of_widths(units: list[Unit], widths: dict[str, int], linears: list[LinearInfo]) -> dict[str, float]:
    out = {i.name: 1.0 for i in linears}
    for u in units:
        for info in u.linears():
            out[info.name] = widths.get(u.name, u.n_groups) / u.n_groups
    return out


def widths_of_ratios(units: list[Unit], ratios: dict[str, float]) -> tuple[dict[str, int], list[str]]:
    """(kept groups per unit, notes) from per-linear ratios (a unit reads its last layer's). A ratio that
    asks for query heads that do not fill whole KV groups is rounded down to whole groups, and said so."""
    widths, notes = {}, []
    for u in units:
        r = ratios.get(u.output.name, 1.0)
        keep = max(_keep(r, u.n_groups), 1)
        heads = r * u.n_groups * u.heads_per_group
        if u.kind == "attn" and abs(heads - round(heads)) < 1e-6 and round(heads) % u.heads_per_group:
            notes.append(f"{u.name}: {round(heads)} query heads do not fill whole KV groups of "
                         f"{u.heads_per_group}; kept {keep} groups ({keep * u.heads_per_group} heads)")
        elif u.kind == "attn" and abs(r * u.n_groups - round(r * u.n_groups)) > 1e-6:
            notes.append(f"{u.name}: ratio {r:.4g} rounded down to {keep} of {u.n_groups} whole KV groups")
        widths[u.name] = keep
    return widths, notes


# ---------------------------------------------------------------- slicing
def _new_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=old.weight.dtype,
                    device=old.weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


WIDTH_ATTRS = {"mlp": ("intermediate_size", "ffn_dim"), "attn": ("num_heads", "num_key_value_heads", "num_attention_heads")}


def _set_widths(unit: Unit, keep: int) -> None:
    """Update the owner's width attributes (those it has), remembering the dense values for restore_widths."""
    saved = unit.owner.__dict__.setdefault("_structured_dense", {})
    for attr in WIDTH_ATTRS[unit.kind]:
        if isinstance(getattr(unit.owner, attr, None), int):
            saved.setdefault(attr, getattr(unit.owner, attr))
            value = keep if attr in ("intermediate_size", "ffn_dim", "num_key_value_heads") else keep * unit.heads_per_group
            setattr(unit.owner, attr, value)


def restore_widths(modules: Iterable[nn.Module]) -> None:
    """Put back the dense width attributes of the modules structured compression changed (for restores)."""
    for m in modules:
        for attr, value in m.__dict__.pop("_structured_dense", {}).items():
            setattr(m, attr, value)


def slice_unit(unit: Unit, kept: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor | None = None) -> None:
    """Replace the unit's linears by smaller nn.Linear layers holding the kept groups' rows and columns
    (the output's weight is the refit, its bias out_bias, else the old one) and update the width attributes."""
    kept = kept.cpu()
    for info, groups in zip(unit.inputs, unit.row_groups):
        rows = groups[kept].flatten().to(info.module.weight.device)
        with materialized(info.module):
            b = info.module.bias
            replace_module(info, _new_linear(info.module, info.module.weight.detach()[rows],
                                             None if b is None else b.detach()[rows]))
    with materialized(unit.output.module):
        b = unit.output.module.bias if out_bias is None else out_bias
        replace_module(unit.output, _new_linear(unit.output.module, out_weight, None if b is None else b.detach()))
    _set_widths(unit, len(kept))


def _moments(cov: torch.Tensor, cross: torch.Tensor | None, n_tokens: int | None, damp: float,
             shrink: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(C the fits use, the corrected cross moment or None) from the raw moments."""
    C = conditioned(cov, n_tokens, damp, shrink)
    if cross is None:
        return C, None
    lam = dec.shrinkage(C.shape[0], n_tokens) if shrink else 0.0
    return C, dec.corrected_cross(cross.to(C.device), cov.to(C.device), C, lam)


def fit_unit(unit: Unit, keep: int, cov: torch.Tensor, cross: torch.Tensor | None, n_tokens: int | None,
             row_weight: torch.Tensor | None, spec: registry.Method, selection: str, damp: float,
             mean: torch.Tensor | None = None, mean_dense: torch.Tensor | None = None) -> list[int]:
    """Pick the unit's `keep` groups on these statistics, refit its last layer, slice it. Returns the kept groups.

    mean (E[h~]; mean_dense = E[h] beside cross): refit with an intercept (the centred moments, the lost mean
    output put into the last layer's bias; modules/structured.py). The picks stay those of the plain error:
    picking on the centred covariance drops near-constant neurons whose mean the bias replaces on the
    calibration text only (SmolLM2, uniform 0.9: new_wiki 42.23 against 39.07 with these picks)."""
    with materialized(unit.output.module):
        W = unit.output.module.weight.detach()
        cov = cov.to(W.device)
        use_cross = cross is not None and torch.isfinite(cross).all()
        C, target = _moments(cov, cross if use_cross else None, n_tokens, damp, spec.shrink)
        kept = ms.select(W, C, keep, unit.col_groups, selection, target, row_weight if spec.fisher else None,
                         _ridge(cov, damp), cov)
        cols = unit.col_groups.to(W.device)[kept].flatten()
        out_bias = None
        if mean is None:
            refitted = ms.refit(W, C, cols, target)
        else:  # the same picks, the refit on the centred moments plus the bias
            mean_d = (mean_dense if mean_dense is not None else mean) if use_cross else None
            Cc, target_c = _moments(ms.centered(cov, mean), ms.centered(cross.to(W.device), mean_d, mean)
                                    if use_cross else None, n_tokens, damp, spec.shrink)
            refitted = ms.refit(W, Cc, cols, target_c)
            out_bias = ms.intercept(W, refitted, cols, mean, mean_d)
            if unit.output.module.bias is not None:
                out_bias = out_bias + unit.output.module.bias.detach().double()
            out_bias = out_bias.to(W.dtype)
        out_weight = refitted.to(W.dtype)
    if not torch.isfinite(out_weight).all() or (out_bias is not None and not torch.isfinite(out_bias).all()):
        raise FloatingPointError(f"{unit.name}: the refit of {unit.output.attr} is not finite")
    slice_unit(unit, kept, out_weight, out_bias)
    return kept.tolist()


# model types whose stock modeling code gives the unit's last layer a bias when this config flag is on (Qwen2
# and Mistral build o_proj / down_proj without one whatever their config says)
BIAS_FLAGS = {"llama": {"mlp": "mlp_bias", "attn": "attention_bias"}}


def intercept_refusal(model: nn.Module, unit: Unit) -> str:
    """Why the unit's refitted layer cannot get an intercept that a stock config reloads ("" when it can): it
    has a bias already (OPT's fc2 / out_proj), or its family's config has a flag that adds one."""
    if unit.output.module.bias is not None:
        return ""
    cfg = model.config
    flag = BIAS_FLAGS.get(getattr(cfg, "model_type", None), {}).get(unit.kind)
    if flag and hasattr(cfg, flag):
        return ""
    return (f"no intercept: {type(cfg).__name__} has no config flag that gives {unit.output.attr} a bias "
            "(stock modeling code); refitted without")


def compress(model: nn.Module, linears: list[LinearInfo], ratios: dict[str, float], stats: dict[str, LayerStats],
             calib_ids: torch.Tensor, args: argparse.Namespace, desc: str | None = "structured compression") -> dict:
    """Slice every unit to the widths `ratios` give its linears; a per-linear report (acur's schema, plus
    each unit's kept groups on its last layer's row)."""
    spec = registry.get(args.method)
    units = find_units(model, linears, args.method)
    widths, notes = widths_of_ratios(units, ratios)
    for note in notes:
        print(f"NOTE: {note}")
    todo = [u for u in units if widths[u.name] < u.n_groups]
    by_output = {u.output.name: u for u in todo}
    shapes = {i.name: list(i.module.weight.shape) for i in linears}
    kept: dict[str, list[int]] = {}

    refused = {u.name: intercept_refusal(model, u) if spec.bias else "" for u in todo}
    if spec.bias and not spec.sequential:  # the dense statistics carry no input means
        refused = {n: "no intercept: sequential=0 measures no input means; refitted without" for n in refused}
    no_bias = [u.output.name for u in todo if refused[u.name]]
    if no_bias:  # one line here; each layer's reason is its report row's fallback
        print(f"WARNING: {len(no_bias)} refitted layer(s) without intercept, e.g. {no_bias[0]}: "
              f"{refused[by_output[no_bias[0]].name]}")

    def fit(unit: Unit, cov, cross, n_tokens, mean=None, mean_dense=None) -> None:
        st = stats.get(unit.output.name) or LayerStats()
        bias = spec.bias and not refused[unit.name]
        kept[unit.name] = fit_unit(unit, widths[unit.name], cov, cross, n_tokens, st.row_weight, spec,
                                   args.structured_selection, args.cov_damp,
                                   mean if bias else None, mean_dense if bias else None)

    if spec.sequential:
        def fit_group(group: list[LinearInfo], measured: dict) -> None:
            for info in group:
                m = measured[info.name]
                fit(by_output[info.name], m["cov"], m["cross"], m["n_tokens"], m.get("mean"), m.get("mean_dense"))
        sequential_calibration(model, [u.output for u in todo], calib_ids, args.calib_batch_size, fit_group,
                               desc=desc or "structured compression", cross=spec.correct)
    else:  # ablation: every unit fitted on the dense model's statistics
        for unit in tqdm(todo, desc=desc, disable=desc is None):
            st = stats[unit.output.name]
            fit(unit, st.cov, None, st.n_tokens)
    report = {}
    for info in linears:
        m, n = shapes[info.name]
        p = info.module.weight.numel()
        mod = info.module  # rank: the kept rows (inputs) or columns (last layers) of a sliced linear
        rank = None if p == m * n else mod.out_features if mod.out_features != m else mod.in_features
        report[info.name] = {"ratio": p / (m * n), "shape": [m, n], "params_dense": m * n, "params": p,
                             "rank": rank, "fallback": ""}
    for u in todo:  # a refused intercept is a fallback: the results JSON and compare.py's table count it
        report[u.output.name]["fallback"] = refused[u.name]
    for u in units:  # every unit, kept whole or not, so the widths of every block are on record
        report[u.output.name].update(unit=u.name, kind=u.kind, block=u.block, groups=u.n_groups, heads_per_group=u.heads_per_group,
                                     kept=kept.get(u.name, list(range(u.n_groups))))
        if u.kind == "attn":
            report[u.output.name]["head_dim"] = u.owner.head_dim
    return report


# ---------------------------------------------------------------- what the run records and saves
def summary(report: dict, mode: str, selection: str) -> dict:
    """Per-layer widths of a compressed model (from compress's report): block index -> intermediate size,
    KV groups and query heads kept (dense where a unit was left whole), and every unit's kept groups."""
    widths: dict[str, dict] = {}
    kept = {}
    for row in report.values():
        if "unit" not in row:
            continue
        k = len(row["kept"])
        w = widths.setdefault(str(row["block"]), {})
        if row["kind"] == "mlp":
            w["intermediate_size"] = k
        else:
            w.update(num_key_value_heads=k, num_attention_heads=k * row["heads_per_group"])
        kept[row["unit"]] = row["kept"]
    return {"widths_mode": mode, "selection": selection, "widths": widths, "kept_groups": kept}


def apply_config(model: nn.Module, report: dict) -> list[str]:
    """When every block got the same widths, write them into model.config (intermediate_size / ffn_dim,
    num_attention_heads, num_key_value_heads, head_dim kept) so save_pretrained gives a stock config that
    reloads. Returns notes (what was written, or why not)."""
    rows = [r for r in report.values() if "unit" in r]
    n_blocks = len(decoder_layers(model))
    cfg = model.config
    notes, updates = [], {}
    for kind in ("mlp", "attn"):
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        sizes = {len(r["kept"]) for r in mine}
        if len(mine) != n_blocks or len(sizes) != 1:
            notes.append(f"{kind} widths differ across blocks: the config keeps the dense values (per-layer widths "
                         "in the results' structured.widths)")
            continue
        k = sizes.pop()
        if kind == "mlp":
            updates["intermediate_size" if hasattr(cfg, "intermediate_size") else "ffn_dim"] = k
        elif not hasattr(cfg, "num_key_value_heads"):  # (the grouped-query families read config.head_dim)
            notes.append(f"{type(cfg).__name__} derives head_dim from hidden_size / num_attention_heads: "
                         "fewer heads cannot be described; the saved config does not reload")
        else:
            r = mine[0]["heads_per_group"]
            updates.update(head_dim=mine[0]["head_dim"], num_attention_heads=k * r, num_key_value_heads=k)
    updates.update(bias_flags(model))
    for attr, value in updates.items():
        setattr(cfg, attr, value)
    if updates:
        notes.append("config: " + ", ".join(f"{a}={v}" for a, v in updates.items()))
    return notes


def _zero_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device), requires_grad=False)


def bias_flags(model: nn.Module) -> dict[str, bool]:
    """Config flags the intercepts need ({"mlp_bias": True} ...): when a refitted down_proj / o_proj got a bias
    and the config has none, switch its family's flag on and give every linear that flag covers (gate/up/down,
    q/k/v/o of every block) a zero bias where it has none, so the stock model class rebuilds the same model
    from the saved config and weights."""
    cfg = model.config
    flags = BIAS_FLAGS.get(getattr(cfg, "model_type", None), {})
    out = {}
    for kind, (attr, (ins, last)) in {"mlp": ("mlp", MLP_LAYOUTS[0][1:]),
                                      "attn": ("self_attn", (ATTN_INPUTS, ATTN_OUTPUTS[0]))}.items():
        flag = flags.get(kind)
        if not flag or getattr(cfg, flag, True):
            continue
        parts = [getattr(block, attr, None) for block in decoder_layers(model)]
        if not any(isinstance(getattr(p, last, None), nn.Linear) and p.get_submodule(last).bias is not None
                   for p in parts if p is not None):
            continue
        for p in parts:
            for name in (*ins, last):
                _zero_bias(p.get_submodule(name))
        out[flag] = True
    return out
