"""CUR decomposition math: pure torch functions on tensors, no nn.Module, no model knowledge.

W (m out x n in) ~ C U R with C = W[:, cols] (actual columns), R = W[rows, :] (actual rows).
Columns and rows are chosen by statistical leverage scores of the activation-scaled matrix W S,
S = diag(s^alpha + eps). One SVD per layer serves every candidate rank (cumulative sums).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from modules.registry import SEED_SELECTIONS as SELECTIONS, SEED_U_MODES as U_MODES

EPS = 1e-6


def scaled_weight(weight: torch.Tensor, scale: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """W diag(s^alpha + eps) in fp32 (fp64 stays fp64); identity scaling when scale is None."""
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if scale is None:
        return w
    s = scale.detach().to(device=w.device, dtype=w.dtype).clamp_min(0) ** alpha + EPS
    return w * s.unsqueeze(0)


@dataclass
class LayerSVD:
    """Thin SVD of the scaled weight, kept to serve every candidate rank of one layer."""
    U: torch.Tensor | None  # m x q
    S: torch.Tensor | None  # q
    Vh: torch.Tensor | None  # q x n
    ok: bool
    reason: str = ""


def safe_svd(w_scaled: torch.Tensor) -> LayerSVD:
    """SVD that reports failure (non-finite input/output, LinAlgError) instead of raising."""
    if not torch.isfinite(w_scaled).all():
        return LayerSVD(None, None, None, False, "non-finite values in scaled weight")
    try:
        U, S, Vh = torch.linalg.svd(w_scaled, full_matrices=False)
    except (RuntimeError, torch.linalg.LinAlgError) as exc:  # pragma: no cover - platform dependent
        return LayerSVD(None, None, None, False, f"svd failed: {exc}")
    if not (torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()):
        return LayerSVD(None, None, None, False, "svd returned non-finite values")
    return LayerSVD(U, S, Vh, True)


def leverage_scores(singular_vectors: torch.Tensor, k: int) -> torch.Tensor:
    """pi_j = (1/k) sum_{xi<=k} V[j, xi]^2 for the columns of V (j indexes rows of the argument).

    Pass V (n x q) for column leverage, U (m x q) for row leverage. Sums to 1 for orthonormal input.
    """
    k = min(k, singular_vectors.shape[1])
    return singular_vectors[:, :k].pow(2).sum(dim=1) / k


def select_indices(scores: torch.Tensor, k: int, mode: str = "topk",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick k distinct indices by leverage: deterministic top-k, or Mahoney-Drineas sampling
    (without replacement, probabilities proportional to the scores). Returned sorted."""
    if mode not in SELECTIONS:
        raise ValueError(f"unknown selection {mode!r}; choose from {SELECTIONS}")
    k = min(k, scores.numel())
    if mode == "topk":
        # stable tie-break by index so results do not depend on the sort implementation
        order = torch.argsort(-scores.double(), stable=True)
        idx = order[:k]
    else:
        # drawn where the seeded generator lives (the CPU's, usually): the same picks on every device
        p = scores.double().clamp_min(0) + 1e-12
        p = p.to(generator.device) if generator is not None else p
        idx = torch.multinomial(p / p.sum(), k, replacement=False, generator=generator).to(scores.device)
    return torch.sort(idx).values


def uniform_indices(size: int, k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Evenly spaced indices: the fallback when leverage scores cannot be computed."""
    k = min(k, size)
    return torch.linspace(0, size - 1, k, device=device).round().long().unique()


def compute_u(weight: torch.Tensor, C: torch.Tensor, R: torch.Tensor, mode: str = "pinv",
              scale_diag: torch.Tensor | None = None) -> torch.Tensor:
    """U for fixed C and R.

    pinv:         U = C+ W R+, Frobenius-optimal for ||W - CUR||_F.
    act_weighted: U = C+ (W S)(R S)+, optimal for ||(W - CUR) S||_F, the objective of activation scaling.
    """
    if mode not in U_MODES:
        raise ValueError(f"unknown U mode {mode!r}; choose from {U_MODES}")
    if mode == "pinv" or scale_diag is None:
        target, R_eff = weight, R
    else:
        s = scale_diag.to(weight.dtype)
        target, R_eff = weight * s, R * s
    # C+ T R+ = C+ (R^T+ T^T)^T: two least-squares solves, by QR when the factor is well conditioned
    right = pinv_solve(R_eff.mT, target.mT).mT
    return pinv_solve(C, right)


def pinv_solve(A: torch.Tensor, B: torch.Tensor, max_cond: float = 1e3) -> torch.Tensor:
    """A+ B. A tall factor with full column rank (C, R^T of a CUR) is solved by QR and a triangular
    solve, 5-20x faster than an SVD-based pinv on a GPU and equal to it up to round-off. When a column
    is (nearly) dependent on the ones before it (|T_ii| below 1/max_cond of the column's norm) or A is
    wide, the SVD pinv, which truncates the tiny singular values, is used."""
    m, k = A.shape
    if m >= k > 0:
        Q, T = torch.linalg.qr(A)
        independent = T.diagonal().abs() / A.norm(dim=0).clamp_min(torch.finfo(A.dtype).tiny)
        if torch.isfinite(T).all() and float(independent.min()) > 1.0 / max_cond:
            return torch.linalg.solve_triangular(T, Q.mT @ B, upper=True)
    return torch.linalg.pinv(A) @ B


@dataclass
class CURFactors:
    C: torch.Tensor
    U: torch.Tensor
    R: torch.Tensor
    cols: torch.Tensor
    rows: torch.Tensor
    rank: int
    fallback: str = ""  # non-empty when the uniform fallback was taken, says why
    extra: dict = field(default_factory=dict)


def cur_decompose(weight: torch.Tensor, rank: int, scale: torch.Tensor | None = None,
                  alpha: float = 0.5, selection: str = "topk", u_mode: str = "pinv",
                  svd: LayerSVD | None = None, generator: torch.Generator | None = None,
                  pick: Callable[[torch.Tensor, int, str], torch.Tensor] | None = None,
                  fit_u: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  ) -> CURFactors:
    """Activation-aware CUR of one weight matrix at a given rank (c = r = rank).

    `svd` may be passed to reuse one decomposition of the scaled weight across candidate ranks.
    On a failed SVD (NaN/inf) the selection falls back to uniform indices and says so in `fallback`.
    Other selections / U fits (modules/decompositions.py) plug in without repeating the rest:
    pick(singular vectors, rank, "cols" | "rows") -> sorted indices; fit_u(W, C, rows) -> U.
    """
    m, n = weight.shape
    rank = max(1, min(rank, m, n))
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN/inf: CUR cannot represent it; check the checkpoint")
    if svd is None:
        svd = safe_svd(scaled_weight(w, scale, alpha))
    fallback = ""
    if pick is None:
        def pick(basis: torch.Tensor, k: int, _side: str) -> torch.Tensor:
            return select_indices(leverage_scores(basis, k), k, selection, generator)
    if svd.ok:
        cols = pick(svd.Vh.T, rank, "cols")
        rows = pick(svd.U, rank, "rows")
    else:
        fallback = f"uniform selection: {svd.reason}"
        cols, rows = uniform_indices(n, rank, w.device), uniform_indices(m, rank, w.device)
    C, R = w[:, cols], w[rows, :]
    s_diag = None
    if scale is not None:
        s_diag = scale.detach().to(device=w.device, dtype=w.dtype).clamp_min(0) ** alpha + EPS
    if u_mode != "pinv" and s_diag is not None and not torch.isfinite(s_diag).all():
        fallback = (fallback + "; " if fallback else "") + f"non-finite activation statistic: {u_mode} U replaced by pinv U"
        u_mode = "pinv"
    U = fit_u(w, C, rows).to(w.dtype) if fit_u is not None else compute_u(w, C, R, u_mode, s_diag)
    if not torch.isfinite(U).all() and u_mode != "pinv":
        fallback = (fallback + "; " if fallback else "") + f"{u_mode} U not finite, used pinv U"
        U = compute_u(w, C, R, "pinv")
    if not torch.isfinite(U).all():
        raise FloatingPointError("CUR produced a non-finite U from a finite weight")
    return CURFactors(C=C, U=U, R=R, cols=cols, rows=rows, rank=int(cols.numel()), fallback=fallback)


def stable_rank(w_scaled: torch.Tensor) -> float:
    """||W||_F^2 / ||W||_2^2: a smooth count of significant directions (1 <= sr <= rank)."""
    s = torch.linalg.svdvals(w_scaled.float())
    return float((s.pow(2).sum() / s.max().pow(2)).item()) if s.max() > 0 else 0.0
