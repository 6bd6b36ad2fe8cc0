"""Weight quantization of a (CUR-)compressed model: simulated, i.e. quantize then dequantize.

Every weight matrix P (rows = outputs, cols = inputs of the map it applies) is quantized per output
row, optionally in groups of `group_size` consecutive input columns, asymmetric round-to-nearest:

    lo = min(min(g), 0), hi = max(max(g), 0)        (zero kept in range: the zero point fits in b bits)
    scale = (hi - lo) / (2^b - 1),  z = round(-lo / scale)  in [0, 2^b - 1]
    q = clamp(round(P / scale) + z, 0, 2^b - 1),    P_hat = (q - z) * scale

Because z is an integer, round(P/scale + z) = round(P/scale) + z, and lo/scale + z lies in
[-1/2, 1/2], so no value of the group rounds or clamps further than half a step:
|P - P_hat| <= scale / 2 per element (exact arithmetic; fp32 adds a few ulps).

A CURLinear (y = C (U (R x))) has three such maps: R (k x in) sees x, U (k x k) sees R x, C (out x k)
sees U R x; each is quantized on its own. Plain nn.Linear layers left uncompressed are quantized the
same way. Biases, norms, embeddings and lm_head (unless it was compressed) stay in the model dtype.

Activation-aware variant (awq_*): AWQ's per-input-channel scale search, on the statistics the pipeline
already has (stage_scales: s_j = mean |x_j| per input channel of each original linear). For a map P
with input statistic s we search a in {0, 0.1, ..., 0.9} for
    P_hat(a) = Q(P diag(s^a)) diag(s^-a)     minimising    || (P - P_hat(a)) diag(s) ||_F
(a = 0 is plain RTN, so the chosen one is never worse on this objective). AWQ measures the output
error on real inputs X; with per-channel statistics only, E||(P - P_hat) x||^2 is approximated by its
diagonal term sum_ij dP_ij^2 E[x_j^2], with E[x_j^2] ~ s_j^2. Input statistics of the CUR parts:
    R: s_R = s (the layer's own statistic)
    U: input R x; assuming uncorrelated input channels E[(Rx)_i^2] ~ sum_j R_ij^2 s_j^2  -> s_U = sqrt(R^2 s^2)
    C: input U R x;                                                           s_C = sqrt((UR)^2 s^2)
The diagonal-covariance assumption is the approximation; s_U, s_C are derived, not measured.
In simulation diag(s^-a) is folded into the dequantized weight; the packed export stores it per input
channel (qinv = s^-a, applied to the input).

Real bytes: every quantized module keeps its grid (`quant_state`: scale, zero, s^a per matrix; CPU, small).
From it and the dequantized weight the integer codes come back exactly (fp32 and fp16 round-off is far
below half a step), so `packed_state_dict` writes what modules/packed_linear.py stores and runs: int8
codes, or two 4-bit codes per byte, with the scales. The simulated model stays what research runs measure.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from modules.cur_linear import CURLinear
from modules.model_utils import find_linears, replace_module
from modules.packed_linear import PACKED_FORMAT, PackedCURLinear, PackedLinear

METHODS = ("none", "rtn_int8", "rtn_int6", "rtn_int5", "rtn_int4", "rtn_int3",
           "awq_int8", "awq_int6", "awq_int4", "awq_int3")
AWQ_SCALINGS = ("abs_mean", "abs_max")   # statistics that are activation magnitudes
AWQ_GRID = tuple(i / 10 for i in range(10))
CUR_PARTS = ("R", "U", "C")              # execution order inside CURLinear
SCALE_BITS = 16                          # fp16 scale per group in a packed format (for the estimate)


QUANT_STATE = "quant_state"  # module attribute: {part: QuantState}, set by quantize_model


@dataclass(frozen=True)
class QuantState:
    """The grid one matrix was quantized on: what a packed export needs beside the dequantized values."""
    bits: int
    group_size: int
    scale: torch.Tensor            # (rows, groups) fp32
    zero: torch.Tensor             # (rows, groups) fp32, integers in [0, 2^b - 1]
    in_scale: torch.Tensor | None  # s^a per input column (AWQ with a > 0), fp32; None otherwise


@dataclass(frozen=True)
class QuantSpec:
    method: str
    kind: str        # "rtn" or "awq"
    bits: int
    group_size: int  # 0 = one group per output row (per-channel)


def parse_method(method: str, group_size: int = 0) -> QuantSpec | None:
    """QuantSpec for a --weight_quant value; None for 'none'. ValueError on anything else."""
    if method == "none":
        return None
    m = re.fullmatch(r"(rtn|awq)_int(\d+)", method)
    if method not in METHODS or m is None:
        raise ValueError(f"unknown --weight_quant {method!r}; choose from {', '.join(METHODS)}")
    if group_size < 0:
        raise ValueError(f"--quant_group_size must be >= 0 (0 = per output channel), got {group_size}")
    return QuantSpec(method, m.group(1), int(m.group(2)), group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, n_groups, g) view of fp32 w; a short last group is padded by repeating its last column
    (repeats change neither min nor max, and are cut off again)."""
    rows, cols = w.shape
    g = cols if group_size <= 0 or group_size >= cols else group_size
    n_groups = -(-cols // g)
    pad = n_groups * g - cols
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, n_groups, g)


def _params_grouped(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2 ** bits - 1
    lo = x.amin(-1, keepdim=True).clamp_max_(0)
    scale = (x.amax(-1, keepdim=True).clamp_min_(0) - lo).div_(qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: exact with any scale
    zero = torch.round(lo.neg_().div_(scale)).clamp_(0, qmax)
    return scale, zero


def quant_params(w: torch.Tensor, bits: int, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of every group, each (rows, n_groups, 1) fp32; zero is an integer in [0, 2^b-1]."""
    _check(w, bits)
    return _params_grouped(_grouped(w.detach().float(), group_size), bits)


def _check(w: torch.Tensor, bits: int) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int = 0) -> torch.Tensor:
    """Quantize-dequantize w (rows = outputs) per row / per group of input columns; same dtype as w."""
    _check(w, bits)
    x = _grouped(w.detach().float(), group_size)
    scale, zero = _params_grouped(x, bits)
    q = torch.round(x / scale).add_(zero).clamp_(0, 2 ** bits - 1)
    deq = q.sub_(zero).mul_(scale).reshape(w.shape[0], -1)[:, : w.shape[1]]
    return deq.to(w.dtype)


def error_bound(w: torch.Tensor, bits: int, group_size: int = 0) -> torch.Tensor:
    """Per-element bound scale/2 on |w - rtn_quantize(w)| (fp32, shape of w)."""
    scale, _ = quant_params(w, bits, group_size)
    half = (scale / 2).expand(*scale.shape[:2], _grouped(w[:1], group_size).shape[-1])
    return half.reshape(w.shape[0], -1)[:, : w.shape[1]]


def _safe_stat(s: torch.Tensor) -> torch.Tensor | None:
    """Positive fp32 statistic (tiny entries lifted to 1e-5 of the largest) or None if unusable."""
    s = s.detach().float()
    if not torch.isfinite(s).all() or not (s.max() > 0):
        return None
    return s.clamp_min(1e-5 * float(s.max()))


def awq_quantize(w: torch.Tensor, stat: torch.Tensor, bits: int, group_size: int = 0,
                 grid: tuple[float, ...] = AWQ_GRID) -> tuple[torch.Tensor, dict]:
    """Q(w diag(s^a)) diag(s^-a) with the exponent a of `grid` that minimises ||(w - w_hat) diag(s)||_F.

    Returns (dequantized weight in w's dtype, info with the exponent and both weighted errors)."""
    s = _safe_stat(stat)
    if s is None or s.numel() != w.shape[1]:
        raise ValueError(f"activation statistic unusable for a {tuple(w.shape)} weight "
                         f"(size {stat.numel()}, finite={bool(torch.isfinite(stat).all())})")
    wf, s = w.detach().float(), s.to(w.device)
    best = None
    for a in grid:
        sa = s ** a
        deq = rtn_quantize(wf * sa, bits, group_size) / sa
        err = float(((wf - deq) * s).norm())
        if a == 0:
            err_rtn = err
        if best is None or err < best[0]:
            best = (err, a, deq)
    if 0 not in grid:
        err_rtn = float(((wf - rtn_quantize(wf, bits, group_size)) * s).norm())
    err, a, deq = best
    return deq.to(w.dtype), {"awq_exponent": a, "act_err_rtn": err_rtn, "act_err": err}


def cur_input_stats(layer: CURLinear, stat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel statistic of each CUR part, derived from the layer input's statistic s
    assuming uncorrelated channels: R <- s, U <- sqrt(R^2 s^2), C <- sqrt((U R)^2 s^2)."""
    s2 = stat.detach().float().to(layer.R.device) ** 2
    R, U = layer.R.detach().float(), layer.U.detach().float()
    return {"R": stat.detach().float(), "U": ((R ** 2) @ s2).sqrt(), "C": (((U @ R) ** 2) @ s2).sqrt()}


def _tied_to_embeddings(model: nn.Module, weight: torch.Tensor) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb is not None and getattr(emb, "weight", None) is weight


def _quantize_param(p: nn.Parameter, spec: QuantSpec, stat: torch.Tensor | None) -> tuple[dict, QuantState]:
    """Replace p's data by its quantize-dequantize; returns relative error (and AWQ info) and the grid."""
    w = p.data
    in_scale = None
    if spec.kind == "awq" and stat is not None:
        deq, info = awq_quantize(w, stat, spec.bits, spec.group_size)
        if info["awq_exponent"]:  # the very scaling awq_quantize applied (same ops: same numbers)
            in_scale = _safe_stat(stat).to(w.device) ** info["awq_exponent"]
    else:
        deq, info = rtn_quantize(w, spec.bits, spec.group_size), {}
    scale, zero = quant_params(w.detach().float() * in_scale if in_scale is not None else w, spec.bits,
                               spec.group_size)
    state = QuantState(spec.bits, spec.group_size, scale[..., 0].cpu(), zero[..., 0].cpu(),
                       in_scale.cpu() if in_scale is not None else None)
    norm = float(w.float().norm())
    info["rel_err"] = float((w.float() - deq.float()).norm()) / norm if norm > 0 else 0.0
    p.data.copy_(deq)
    return info, state


def packed_bits(rows: int, cols: int, spec: QuantSpec) -> int:
    """Bits a packed format would need: b-bit codes, an fp16 scale and a b-bit zero per group
    (plus an fp16 input-channel scale for AWQ). An estimate for the report, nothing is packed."""
    g = cols if spec.group_size <= 0 or spec.group_size >= cols else spec.group_size
    groups = rows * -(-cols // g)
    return rows * cols * spec.bits + groups * (SCALE_BITS + spec.bits) + (cols * SCALE_BITS if spec.kind == "awq" else 0)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int = 0, scales: dict | None = None,
                   include_lm_head: bool = False) -> dict:
    """Quantize-dequantize, in place, every CURLinear part and uncompressed nn.Linear of the decoder
    blocks (lm_head when include_lm_head and not tied to the embeddings). Returns the report that
    goes into results["quantization"]. awq_* needs `scales` ({layer: per-input-channel stat})."""
    spec = parse_method(method, group_size)
    if spec is None:
        return {"method": "none", "bits": None, "group_size": None}
    report: dict = {"method": method, "simulated": True}
    if spec.kind == "awq" and not scales:
        raise ValueError(f"{method} needs activation statistics (run with --act_aware)")
    report.update(kind=spec.kind, bits=spec.bits, group_size=spec.group_size,
                  group_axis="input" if spec.group_size else "per output channel",
                  stored_dtype=None, layers={}, skipped={}, fallbacks={})
    params = bits = dense_bits = 0
    linears = find_linears(model, include_lm_head=include_lm_head, types=(nn.Linear, CURLinear))
    for info in tqdm(linears, desc=f"quantize {method}" + (f" g{group_size}" if group_size else "")):
        mod = info.module
        stat = scales.get(info.name) if (spec.kind == "awq" and scales) else None
        if spec.kind == "awq" and (stat is None or _safe_stat(stat) is None):
            report["fallbacks"][info.name] = "no usable activation statistic: plain RTN used"
            stat = None
        if isinstance(mod, CURLinear):
            stats = cur_input_stats(mod, stat) if stat is not None else {}
            parts = {name: getattr(mod, name) for name in CUR_PARTS}
        else:
            if _tied_to_embeddings(model, mod.weight):
                report["skipped"][info.name] = "weight tied to the input embeddings (left unquantized)"
                continue
            stats = {"W": stat} if stat is not None else {}
            parts = {"W": mod.weight}
        row, grids = {}, {}
        for name, p in parts.items():
            part_stat = stats.get(name)
            if part_stat is not None and _safe_stat(part_stat) is None:
                report["fallbacks"][f"{info.name}.{name}"] = "derived statistic not finite: plain RTN used"
                part_stat = None
            row[name], grids[name] = _quantize_param(p, spec, part_stat)
            params += p.numel()
            bits += packed_bits(*p.shape, spec)
            dense_bits += p.numel() * p.element_size() * 8
            report["stored_dtype"] = str(p.dtype)
        report["layers"][info.name] = row
        setattr(mod, QUANT_STATE, grids)
    errs = [part["rel_err"] for row in report["layers"].values() for part in row.values()]
    report.update(params_quantized=params, mean_rel_err=sum(errs) / len(errs) if errs else 0.0,
                  max_rel_err=max(errs, default=0.0),
                  packed_bits_per_weight_estimate=bits / params if params else None,
                  packed_mb_estimate=bits / 8 / 2 ** 20, stored_mb=dense_bits / 8 / 2 ** 20)
    if spec.kind == "awq":
        exps = [part["awq_exponent"] for row in report["layers"].values() for part in row.values()
                if "awq_exponent" in part]
        report["awq_mean_exponent"] = sum(exps) / len(exps) if exps else None
        report["awq_input_stats"] = "R and dense: measured; U, C: derived (uncorrelated channels)"
    if report["fallbacks"]:
        print(f"WARNING: {method}: {len(report['fallbacks'])} layers had no usable activation statistic "
              f"(e.g. {next(iter(report['fallbacks']))}) and got plain RTN; recorded in the results")
    bad = [n for n, row in report["layers"].items() if not all(math.isfinite(v["rel_err"]) for v in row.values())]
    if bad:
        report["non_finite_layers"] = bad
        print(f"WARNING: {len(bad)} layers have non-finite weights after quantization (e.g. {bad[0]})")
    print(f"[quant] {method} g{group_size}: {len(report['layers'])} layers, {params:,} weights, "
          f"mean relative error {report['mean_rel_err']:.4f} (simulated: weights stay {report['stored_dtype']})")
    return report


# ---------------------------------------------------------------- real bytes: codes of the simulated model
def codes_of(weight: torch.Tensor, state: QuantState) -> tuple[torch.Tensor, float]:
    """Integer codes (rows, cols) of a dequantized matrix on its grid, and the largest distance of
    weight * s^a / scale + zero from an integer: fp32 round-off when the model dtype kept the grid exact
    (fp32; fp16 below 0.13 at 8 bits), up to ~1 when it did not (8 bits in bf16: codes may move one step)."""
    w = weight.detach().float()
    if state.in_scale is not None:
        w = w * state.in_scale.to(w.device)
    rows, cols = w.shape
    t = _grouped(w, state.group_size) / state.scale.to(w.device)[..., None] + state.zero.to(w.device)[..., None]
    q = torch.round(t).clamp_(0, 2 ** state.bits - 1)
    off = float((t - q).abs().max()) if t.numel() else 0.0
    return q.reshape(rows, -1)[:, :cols].to(torch.int16), off


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every module quantize_model quantized (CURLinear or nn.Linear with a quant_state)."""
    return {i.name: i.module for i in find_linears(model, include_lm_head=True, types=(nn.Linear, CURLinear))
            if getattr(i.module, QUANT_STATE, None)}


def packed_twin(mod: nn.Module, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> tuple[nn.Module, float]:
    """The PackedCURLinear / PackedLinear (on `device`, scales in `dtype`, default mod's) that holds mod's
    quantized weights as codes; and the largest off-grid distance met (see codes_of)."""
    grids: dict[str, QuantState] = getattr(mod, QUANT_STATE)
    first = next(iter(grids.values()))
    awq = tuple(p for p, g in grids.items() if g.in_scale is not None)
    if isinstance(mod, CURLinear):
        dtype = dtype or mod.C.dtype
        twin = PackedCURLinear(mod.in_features, mod.out_features, mod.rank, first.bits, first.group_size, awq,
                               mod.bias is not None, dtype=dtype, device=device)
        twin.col_indices.copy_(mod.col_indices)
        twin.row_indices.copy_(mod.row_indices)
        targets = {p: (getattr(twin, p), getattr(mod, p)) for p in grids}
    else:
        dtype = dtype or mod.weight.dtype
        twin = PackedLinear(mod.in_features, mod.out_features, first.bits, first.group_size, bool(awq),
                            mod.bias is not None, dtype=dtype, device=device)
        targets = {"W": (twin, mod.weight)}
    worst = 0.0
    for part, (packed, weight) in targets.items():
        g = grids[part]
        q, off = codes_of(weight, g)
        worst = max(worst, off)
        packed.set_codes(q, g.zero, g.scale, None if g.in_scale is None else 1.0 / g.in_scale)
    if mod.bias is not None:
        with torch.no_grad():
            twin.bias.copy_(mod.bias.detach())
    return twin.eval(), worst


def packed_spec(model: nn.Module) -> dict | None:
    """config.packed_quant of an export: format, bits, group size and, per quantized layer, its parts and
    which carry an AWQ input scale. None when nothing was quantized."""
    mods = quantized_modules(model)
    if not mods:
        return None
    first = next(iter(next(iter(mods.values())).quant_state.values()))
    return {"format": PACKED_FORMAT, "bits": first.bits, "group_size": first.group_size,
            "layers": {n: {"parts": {p: {"awq": g.in_scale is not None} for p, g in getattr(m, QUANT_STATE).items()}}
                       for n, m in mods.items()}}


@torch.no_grad()
def to_packed(model: nn.Module) -> dict:
    """Replace, in place, every quantized module by its packed twin on the same device (in-process runs of
    the packed path: the benchmark, tests). Returns {layers, max_grid_offset}."""
    worst, n = 0.0, 0
    for info in find_linears(model, include_lm_head=True, types=(nn.Linear, CURLinear)):
        if getattr(info.module, QUANT_STATE, None):
            twin, off = packed_twin(info.module, device=next(info.module.parameters()).device)
            replace_module(info, twin)
            worst, n = max(worst, off), n + 1
    return {"layers": n, "max_grid_offset": worst}
