"""Per-layer ratios from the sensitivity table.

All (layer, ratio, score) triples are sorted by score, most harmful first. Accepting the tail from
position `cut` on, every layer takes the smallest ratio among its accepted triples (1.0 = stays dense).
A binary search over `cut` finds the fewest accepted triples that reach the parameter target (or the
smallest model whose calibration perplexity stays within the ppl target). Parameter counts are the real
ones of CUR at integer rank (C + U + R), and the last accepted layer is then given back the headroom so
the reached ratio lands just at or below the target.
"""
from __future__ import annotations

from typing import Callable

from modules.decompositions import params_for_ratio
from modules.kv_ranks import kv_cached_dims

Shapes = dict[str, tuple[int, int]]


def layer_params(m: int, n: int, ratio: float, rank_align: int = 1, method: str = "acur") -> int:
    """Parameters one layer keeps at a ratio: dense at 1.0, else the method's count at the ratio's rank
    (acur: C+U+R; see modules.decompositions.params_for_ratio)."""
    return params_for_ratio(method, m, n, ratio, rank_align)


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
