"""Per-layer ratios from the sensitivity table.

All (layer, ratio, score) triples are sorted by score, most harmful first. Accepting the tail from
position `cut` on, every layer takes the smallest ratio among its accepted triples (1.0 = stays dense).
A binary search over `cut` finds the fewest accepted triples that reach the parameter target (or the
smallest model whose calibration perplexity stays within the ppl target). Parameter counts are the real
ones of CUR at integer rank (C + U + R), and the last accepted layer is then given back the headroom so
the reached ratio lands just at or below the target.
"""
from __future__ import annotations

import math
from typing import Callable

from modules import registry
from modules.kv_ranks import kv_cached_dims

Shapes = dict[str, tuple[int, int]]


def layer_params(m: int, n: int, ratio: float, rank_align: int = 1, method: str = "acur") -> int:
    """Parameters one layer keeps at a ratio: dense at 1.0, else the method's count at the ratio's rank
    (acur: C+U+R; see modules.registry.Method.params)."""
    return registry.get(method).params(m, n, ratio, rank_align)


def reached_ratio(ratios: dict[str, float], shapes: Shapes, rank_align: int = 1, method: str = "acur") -> float:
    kept = sum(layer_params(*shapes[name], ratios.get(name, 1.0), rank_align, method) for name in shapes)
    return kept / sum(m * n for m, n in shapes.values())


def _sorted_triples(sensitivity: dict[str, dict[str, float]]) -> list[tuple[str, float, float]]:
    triples = [(name, float(r), float(s)) for name, row in sensitivity.items() for r, s in row.items()]
    # NaN/inf scores (a ratio that broke the model) sort as most harmful: never accepted first
    return sorted(triples, key=lambda t: (-(t[2] if t[2] == t[2] else float("inf")), t[0], t[1]))


def ratios_at_cut(triples: list, cut: int, names) -> dict[str, float]:
    ratios = {name: 1.0 for name in names}
    for name, r, _ in triples[cut:]:
        ratios[name] = min(ratios[name], r)
    return ratios


def search_param_ratio(sensitivity: dict[str, dict[str, float]], shapes: Shapes, target: float,
                       rank_align: int = 1, method: str = "acur") -> dict[str, float]:
    """Per-layer ratios whose reached parameter ratio is at most `target`, as close to it as the
    rank granularity allows. `method` decides how many parameters a ratio keeps."""
    triples = _sorted_triples(sensitivity)
    names = list(shapes)
    if reached_ratio(ratios_at_cut(triples, 0, names), shapes, rank_align, method) > target:
        floor = reached_ratio(ratios_at_cut(triples, 0, names), shapes, rank_align, method)
        raise ValueError(f"param_ratio_target {target} is below what the candidate ratios can reach "
                         f"({floor:.4f}); add smaller --sensitivity_ratios")
    lo, hi = 0, len(triples)  # invariant: ratio(lo) <= target; find the largest such cut
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if reached_ratio(ratios_at_cut(triples, mid, names), shapes, rank_align, method) <= target:
            lo = mid
        else:
            hi = mid - 1
    ratios = ratios_at_cut(triples, lo, names)
    if lo < len(triples):  # hand the headroom to the layer of the last accepted triple
        name = triples[lo][0]
        looser = ratios_at_cut(triples, lo + 1, names)[name]
        m, n = shapes[name]
        others = sum(layer_params(*shapes[k], ratios[k], rank_align, method) for k in names if k != name)
        budget = target * sum(a * b for a, b in shapes.values()) - others
        fill = min(budget / (m * n), looser)
        if fill >= 1.0 and budget >= m * n:
            ratios[name] = 1.0
        elif fill > ratios[name]:
            ratios[name] = fill
    return ratios


Curve = list[tuple[float, float, float]]  # (ratio, loss, cost) of one layer, dense point included


def _curves(loss: dict[str, dict[str, float]], cost: Callable[[str, float], float]) -> dict[str, Curve]:
    """Finite points of every layer's loss table with their costs, plus the dense point (1.0, 0)."""
    out = {}
    for name, row in loss.items():
        pts = [(float(r), float(s), cost(name, float(r))) for r, s in row.items() if math.isfinite(float(s))]
        out[name] = pts + [(1.0, 0.0, cost(name, 1.0))]
    return out


def lagrangian_ratios(curves: dict[str, Curve], lam: float) -> dict[str, float]:
    """Per layer, the ratio minimising loss + lam * cost (ties: the larger ratio)."""
    return {name: min(pts, key=lambda p: (p[1] + lam * p[2], -p[0]))[0] for name, pts in curves.items()}


def allocate(loss: dict[str, dict[str, float]], cost: Callable[[str, float], float], budget: float,
             max_iter: int = 200) -> dict[str, float]:
    """Global allocation on additive loss curves: the per-layer ratios minimising the summed
    predicted loss with summed cost (parameters, or cached KV dims) <= budget.

    Lagrangian relaxation: for a price lam per unit of cost every layer independently takes its
    cheapest point of loss + lam * cost; the smallest lam whose total cost fits is found by
    bisection on log(lam). Each layer's choice is a point on the lower convex hull of its curve,
    which is where greedy marginal-loss-per-parameter cuts end as well. Non-finite losses are never
    chosen. Raises ValueError when even the smallest ratios do not fit."""
    curves = _curves(loss, cost)
    cost_of = {name: {p[0]: p[2] for p in pts} for name, pts in curves.items()}

    def total(ratios):
        return sum(cost_of[n][r] for n, r in ratios.items())

    floor = {n: min(pts, key=lambda p: (p[2], p[1]))[0] for n, pts in curves.items()}
    if total(floor) > budget:
        raise ValueError(f"the target is below what the candidate ratios can reach "
                         f"({total(floor):.6g} > {budget:.6g}); add smaller ratios")
    dense = {n: 1.0 for n in curves}
    if total(dense) <= budget:
        return dense
    losses = [abs(p[1]) for pts in curves.values() for p in pts if p[1] != 0] or [1.0]
    costs = [p[2] for pts in curves.values() for p in pts if p[2] > 0] or [1.0]
    lo = min(losses) / max(costs) * 1e-6  # cheap enough that every layer prefers its lowest loss
    hi = max(losses) / min(costs) * 1e6   # dear enough that every layer takes its cheapest point
    for _ in range(max_iter):
        mid = math.sqrt(lo * hi)
        if total(lagrangian_ratios(curves, mid)) <= budget:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-12:
            break
    ratios = lagrangian_ratios(curves, hi)
    if total(ratios) > budget:
        ratios = floor
    return _fill(curves, ratios, budget - total(ratios), cost_of)


def _fill(curves: dict[str, Curve], ratios: dict[str, float], left: float, cost_of: dict) -> dict[str, float]:
    """Spend what the Lagrangian's jump left of the budget: repeatedly take the upgrade (a point of
    some layer with lower loss) of best loss saved per extra cost that still fits."""
    ratios = dict(ratios)
    loss_of = {name: {p[0]: p[1] for p in pts} for name, pts in curves.items()}
    while True:
        best, best_gain = None, 0.0
        for name, pts in curves.items():
            r0 = ratios[name]
            l0, c0 = loss_of[name][r0], cost_of[name][r0]
            for r, l, c in pts:
                if l < l0 and 0 < c - c0 <= left:
                    gain = (l0 - l) / (c - c0)
                    if gain > best_gain:
                        best, best_gain = (name, r, c - c0), gain
        if best is None:
            return ratios
        ratios[best[0]] = best[1]
        left -= best[2]


def search_param_ratio_allocated(loss: dict[str, dict[str, float]], shapes: Shapes, target: float,
                                 rank_align: int = 1, method: str = "acur") -> dict[str, float]:
    """search_param_ratio for additive loss tables (closed-form sensitivity): Lagrangian allocation
    of the parameter budget target * (dense parameters of the compressed linears)."""
    dense = sum(m * n for m, n in shapes.values())
    try:
        return allocate(loss, lambda name, r: layer_params(*shapes[name], r, rank_align, method), target * dense)
    except ValueError as exc:
        raise ValueError(f"param_ratio_target {target}: {exc} (--sensitivity_ratios)") from None


def search_ppl_allocated(loss: dict[str, dict[str, float]], shapes: Shapes, ppl_target: float,
                         evaluate: Callable[[dict[str, float]], float], rank_align: int = 1,
                         method: str = "acur", steps: int = 12) -> tuple[dict[str, float], list[dict]]:
    """--ppl_target on additive loss tables: bisection over the parameter ratio, each step the
    Lagrangian allocation at that ratio measured by `evaluate(ratios)` on the compressed model.
    Returns the smallest model found within the target and the trace (dense if none is)."""
    dense = {name: 1.0 for name in shapes}
    lo = reached_ratio(ratios_at_cut(_sorted_triples(loss), 0, list(shapes)), shapes, rank_align, method)
    hi, best, trace = 1.0, dense, []
    for _ in range(steps):
        mid = (lo + hi) / 2
        ratios = search_param_ratio_allocated(loss, shapes, mid, rank_align, method)
        ppl = evaluate(ratios)
        trace.append({"param_ratio": mid, "ppl": ppl})
        if ppl <= ppl_target:  # NaN compares False: a broken model is never accepted
            hi, best = mid, ratios
        else:
            lo = mid
    return best, trace


def search_ppl(sensitivity: dict[str, dict[str, float]], shapes: Shapes, ppl_target: float,
               evaluate: Callable[[dict[str, float]], float]) -> tuple[dict[str, float], list[dict]]:
    """Smallest model (most accepted triples) whose calibration perplexity, measured by
    `evaluate(ratios)` on the really compressed model, stays at or below ppl_target.

    Returns the ratios and the search trace. The final ratios are those of the final bound."""
    triples = _sorted_triples(sensitivity)
    names = list(shapes)
    trace: list[dict] = []
    lo, hi = 0, len(triples)  # cut == len(triples): nothing compressed, always within target
    while lo < hi:
        mid = (lo + hi) // 2
        ppl = evaluate(ratios_at_cut(triples, mid, names))
        trace.append({"cut": mid, "ppl": ppl})
        if ppl <= ppl_target:  # NaN compares False: a broken model is never accepted
            hi = mid
        else:
            lo = mid + 1
    return ratios_at_cut(triples, lo, names), trace


def kv_reached_ratio(fractions: dict[str, float], shapes: Shapes, rank_align: int = 1) -> float:
    """KV-cache mode: cached dims / original dims over the k/v projections (shapes: out x in)."""
    cached = sum(kv_cached_dims(m, n, fractions.get(name, 1.0), rank_align) for name, (m, n) in shapes.items())
    return cached / sum(m for m, _ in shapes.values())


def search_kv_ratio(sensitivity: dict[str, dict[str, float]], shapes: Shapes, target: float,
                    rank_align: int = 1) -> dict[str, float]:
    """KV-cache mode: per-layer rank fractions of the K/V width (sensitivity keys are fractions) whose
    cached dims / original dims is at most `target`, as close to it as integer ranks allow. Same cut
    search as search_param_ratio; the last accepted layer gets the leftover dims."""
    triples = _sorted_triples(sensitivity)
    names = list(shapes)
    floor = kv_reached_ratio(ratios_at_cut(triples, 0, names), shapes, rank_align)
    if floor > target:
        raise ValueError(f"kv_cache_ratio_target {target} is below what the candidate rank fractions can reach "
                         f"({floor:.4f}); add smaller --kv_rank_fractions")
    lo, hi = 0, len(triples)  # invariant: ratio(lo) <= target; find the largest such cut
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kv_reached_ratio(ratios_at_cut(triples, mid, names), shapes, rank_align) <= target:
            lo = mid
        else:
            hi = mid - 1
    ratios = ratios_at_cut(triples, lo, names)
    if lo < len(triples):
        name = triples[lo][0]
        looser = ratios_at_cut(triples, lo + 1, names)[name]
        m, n = shapes[name]
        others = sum(kv_cached_dims(*shapes[k], ratios[k], rank_align) for k in names if k != name)
        budget = target * sum(w for w, _ in shapes.values()) - others
        fill = min(budget / m, looser)
        if fill >= 1.0 and budget >= m:
            ratios[name] = 1.0
        elif fill > ratios[name]:
            ratios[name] = fill
    return ratios


def search_kv_ratio_allocated(loss: dict[str, dict[str, float]], shapes: Shapes, target: float,
                              rank_align: int = 1) -> dict[str, float]:
    """KV-cache mode on additive loss tables: the Lagrangian allocation of the cached dims
    target * (original K/V dims) over the rank fractions."""
    budget = target * sum(m for m, _ in shapes.values())
    try:
        return allocate(loss, lambda name, f: kv_cached_dims(*shapes[name], f, rank_align), budget)
    except ValueError as exc:
        raise ValueError(f"kv_cache_ratio_target {target}: {exc} (--kv_rank_fractions)") from None
