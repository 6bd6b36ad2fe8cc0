"""Rank arithmetic of the low-rank KV cache: which linears are K/V projections, and how many dims a rank
fraction of the K/V width caches. Pure Python (no torch, no transformers), so the search stage
(binary_search.py) counts cached dims without importing a model library."""
from __future__ import annotations

import math

# ASVD4LLM's KV candidates were parameter ratios 0.1..1.9 of a square K/V projection, i.e. ranks of
# 0.05..0.95 of its width; here they are stated directly as rank fractions of the K/V width.
KV_RANK_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 20))
KV_PROJ_NAMES = ("k_proj", "v_proj")


def is_kv_linear(name: str) -> bool:
    """True for a k_proj / v_proj (by its full dotted name)."""
    return name.rpartition(".")[2] in KV_PROJ_NAMES


def kv_rank(width: int, in_features: int, fraction: float, rank_align: int = 1) -> int:
    """Latent width cached for a rank fraction of the K/V width: floor(f * width), rounded down to a
    multiple of rank_align when that stays >= 1, within [1, min(width, in_features)]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"KV rank fraction must be in (0, 1], got {fraction}")
    k = min(int(math.floor(fraction * width + 1e-9)), width, in_features)
    aligned = (k // rank_align) * rank_align
    return max(aligned if aligned > 0 else k, 1)


def kv_cached_dims(width: int, in_features: int, fraction: float, rank_align: int = 1) -> int:
    """Per-token cached width of one projection: its width when dense (fraction 1), else its rank."""
    return width if fraction >= 1 else kv_rank(width, in_features, fraction, rank_align)
