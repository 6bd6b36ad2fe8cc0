"""Low-rank decompositions beside ACUR, for comparing CUR with SVD in one tool: pure torch, no modules.

Every method approximates one weight W (m out x n in). The objective that matters for a layer is its
output error on calibration inputs, E||(W - W_hat) x||^2 = ||(W - W_hat) L||_F^2 with L L^T = Sigma,
Sigma = E[x x^T] the input covariance collected during calibration.

  svd / asvd / wsvd  W ~ A B, k(m+n) parameters; truncated SVD of W, of W S (ASVD's activation scaling),
                     or of W L (whitened: the optimum of the output error at rank k).
  rowid              W ~ Z R: R = k actual rows of W, Z fitted to the output error. Z's kept rows are the
                     identity, so only the other m-k rows are stored: k(m+n-k) parameters.
  colid              W ~ C Z: C = k actual columns, Z = C+ W (also the output-error optimum for any Sigma);
                     Z's kept columns are the identity: k(m+n-k) parameters.
  cur (three factor) the seed's C U R (modules/cur_math.py) plus DEIM selection and a data-aware U.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from modules.cur_math import (CURFactors, LayerSVD, cur_decompose, cur_param_count, leverage_scores,
                              rank_for_ratio, select_indices)

# method -> (form, activation scale needed, input covariance needed)
METHODS = {
    "acur": ("cur", False, False),   # the seed's ACUR (scaled by --act_aware when given)
    "cur": ("cur", False, False),    # plain CUR: never activation scaled
    "svd": ("svd", False, False),    # plain truncated SVD
    "asvd": ("svd", True, False),    # ASVD: SVD of W diag(s^alpha)
    "wsvd": ("svd", False, True),    # whitened SVD (SVD of W L): the rank-k optimum, a reference
    "rowid": ("rowid", False, True),  # row interpolative decomposition, data-aware Z
    "colid": ("colid", False, True),  # column interpolative decomposition
}
FORMS = ("cur", "svd", "rowid", "colid")
CUR_SELECTIONS = ("topk", "sample", "deim")
CUR_U_MODES = ("pinv", "act_weighted", "data_aware")
DEFAULT_COV_DAMP = 0.01


def method_form(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method][0]


def needs_scale(method: str) -> bool:
    """True when the method cannot run without the activation statistic (asvd)."""
    method_form(method)
    return METHODS[method][1]


def reads_scale(method: str) -> bool:
    """True when the method uses the activation statistic if there is one (acur, asvd)."""
    return method == "acur" or needs_scale(method)


def needs_covariance(method: str, u_mode: str = "pinv") -> bool:
    """True when the decomposition reads the input covariance (the data-aware U reads it too)."""
    method_form(method)
    return METHODS[method][2] or (METHODS[method][0] == "cur" and u_mode == "data_aware")


# ---------------------------------------------------------------- parameter counting
def param_count(method: str, m: int, n: int, k: int) -> int:
    """Parameters (without bias) a method keeps for an m x n weight at rank k."""
    form = method_form(method)
    if form == "cur":
        return cur_param_count(m, n, k)
    if form == "svd":
        return k * (m + n)
    return k * (m + n - k)  # interpolative forms: the k x k identity block is not stored


def rank_for_method(method: str, m: int, n: int, ratio: float, rank_align: int = 1) -> int:
    """Largest rank whose parameters stay within ratio*m*n (multiple of rank_align when possible).

    CUR forms use cur_math.rank_for_ratio unchanged, so the default method's ranks never move."""
    form = method_form(method)
    if form == "cur":
        return rank_for_ratio(m, n, ratio, rank_align)
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if rank_align < 1:
        raise ValueError(f"rank_align must be >= 1, got {rank_align}")
    budget = ratio * m * n
    if form == "svd":
        k = int(budget // (m + n))
    else:  # smaller root of k^2 - (m+n)k + budget = 0; k(m+n-k) grows up to k = min(m, n)
        disc = max((m + n) ** 2 - 4 * budget, 0.0)
        k = int(math.floor(((m + n) - math.sqrt(disc)) / 2))
    k = min(k + 1, m, n)
    while k > 0 and param_count(method, m, n, k) > budget:  # guard against round-off
        k -= 1
    aligned = (k // rank_align) * rank_align
    return max(aligned if aligned > 0 else k, 1)


def params_for_ratio(method: str, m: int, n: int, ratio: float, rank_align: int = 1) -> int:
    """Parameters one layer keeps at a ratio: dense at 1.0, else the method's count at its rank."""
    if ratio >= 1:
        return m * n
    return param_count(method, m, n, rank_for_method(method, m, n, ratio, rank_align))


# ---------------------------------------------------------------- covariance helpers
def damped_covariance(cov: torch.Tensor, damp: float = DEFAULT_COV_DAMP) -> torch.Tensor:
    """Sigma + damp * mean(diag Sigma) * I in fp64: keeps a covariance from few tokens invertible
    and stops the data-aware fits from over-fitting the calibration set (GPTQ uses the same trick)."""
    if damp < 0:
        raise ValueError(f"covariance damping must be >= 0, got {damp}")
    c = cov.detach().double()
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"covariance must be square, got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError("covariance contains NaN/inf")
    c = (c + c.T) / 2
    mean_diag = float(c.diagonal().mean())
    return c + (damp * mean_diag if mean_diag > 0 else damp) * torch.eye(c.shape[0], dtype=c.dtype)


def whitening_factor(cov: torch.Tensor) -> torch.Tensor:
    """Lower-triangular L with L L^T = cov (fp64); eigen-decomposition when Cholesky fails (singular)."""
    c = cov.double()
    L, info = torch.linalg.cholesky_ex(c)
    if int(info) == 0:
        return L
    evals, evecs = torch.linalg.eigh(c)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(0)  # not triangular, still L L^T = cov


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor | None = None) -> float:
    """sqrt(tr(D Sigma D^T) / tr(W Sigma W^T)) with D = W - W_hat; relative Frobenius error without Sigma."""
    W, D = weight.double(), weight.double() - approx.double()
    if cov is None:
        den = float(W.pow(2).sum())
        return math.sqrt(float(D.pow(2).sum()) / den) if den > 0 else 0.0
    c = cov.double()
    num, den = float(((D @ c) * D).sum()), float(((W @ c) * W).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


# ---------------------------------------------------------------- selection
def deim_order(basis: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """DEIM indices (Sorensen & Embree 2016) of the first k columns of an orthonormal basis (rows = candidates).

    Step j picks the row of largest |residual| of basis vector j after interpolating it at the rows
    already picked. That residual is exactly what Gaussian elimination with partial pivoting leaves
    in column j, so the picks are LAPACK's LU pivots (blocked, fast). They are prefix-consistent:
    the first k' of the rank-k answer are the rank-k' answer, so one run serves every rank."""
    V = basis.detach().double()
    k = V.shape[1] if k is None else min(k, V.shape[1])
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    _, pivots = torch.linalg.lu_factor(V[:, :k].contiguous())
    perm = list(range(V.shape[0]))
    for i, p in enumerate(pivots.tolist()):  # LAPACK row swaps (1-based) -> permutation
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    return torch.tensor(perm[:k], dtype=torch.long)


def pivoted_cholesky_order(gram: torch.Tensor, k: int, block: int = 64) -> torch.Tensor:
    """First k pivots of the greedy pivoted Cholesky of a PSD Gram matrix G = A^T A, in pick order.

    These are the column pivots of QR with column pivoting of A (Businger-Golub: take the column of
    largest residual norm, project it out), computed on the Gram with blocked (BLAS-3) updates, which
    is ~10x faster than rank-1 QR updates. Deterministic and prefix-consistent. Residuals below
    1e-13 of the largest diagonal count as zero (rank reached): the remaining picks are the lowest
    unpicked indices."""
    G = gram.detach().double().clone()
    m = G.shape[0]
    k = min(k, m)
    d = G.diagonal().clone()
    picked = torch.zeros(m, dtype=torch.bool)
    tol = float(d.abs().max()) * 1e-13 if m else 0.0
    order: list[int] = []
    while len(order) < k:
        b = min(block, k - len(order))
        P = G.new_zeros(m, b)
        for t in range(b):
            p = int(torch.argmax(d.masked_fill(picked, -math.inf)))
            if float(d[p]) <= tol:
                p = int(torch.nonzero(~picked)[0])
            else:
                col = (G[p] - P[:, :t] @ P[p, :t]) / math.sqrt(float(d[p]))  # G symmetric: row = column
                P[:, t] = col
                d.sub_(col * col)
            picked[p] = True
            order.append(p)
        G.addmm_(P, P.T, alpha=-1.0)
    return torch.tensor(order, dtype=torch.long)


def pivoted_qr_order(A: torch.Tensor, k: int) -> torch.Tensor:
    """First k column pivots of QR with column pivoting of A (via its Gram, see pivoted_cholesky_order)."""
    A = A.detach().double()
    return pivoted_cholesky_order(A.T @ A, k)


# ---------------------------------------------------------------- SVD family
@dataclass
class SVDFactors:
    A: torch.Tensor   # m x k
    B: torch.Tensor   # k x n
    rank: int


def svd_factors(weight: torch.Tensor, k: int, transform: str = "none", scale_diag: torch.Tensor | None = None,
                whiten: torch.Tensor | None = None,
                svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> SVDFactors:
    """W ~ A B at rank k from the SVD of W (transform none), W S (scale) or W L (whiten).

    The transform is undone on B (B = sqrt(s_k) V_k^T S^-1, or V_k^T L^-1), so A B approximates W
    itself. `svd` = (U, s, Vh) of the transformed weight, to reuse one SVD for every rank."""
    W = weight.detach().double()
    if svd is None:
        svd = torch.linalg.svd(transformed_weight(W, transform, scale_diag, whiten), full_matrices=False)
    U, s, Vh = svd
    k = max(1, min(k, s.numel()))
    root = s[:k].sqrt()
    A = U[:, :k] * root.unsqueeze(0)
    B = root.unsqueeze(1) * Vh[:k]
    if transform == "scale":
        B = B / scale_diag.double().unsqueeze(0)
    elif transform == "whiten":
        if torch.equal(whiten, torch.tril(whiten)):
            B = torch.linalg.solve_triangular(whiten.T, B.T, upper=True).T
        else:
            B = B @ torch.linalg.pinv(whiten)
    return SVDFactors(A, B, k)


def transformed_weight(W: torch.Tensor, transform: str, scale_diag: torch.Tensor | None,
                       whiten: torch.Tensor | None) -> torch.Tensor:
    if transform == "none":
        return W.double()
    if transform == "scale":
        if scale_diag is None:
            raise ValueError("transform 'scale' needs a scale")
        return W.double() * scale_diag.double().unsqueeze(0)
    if transform == "whiten":
        if whiten is None:
            raise ValueError("transform 'whiten' needs a whitening factor")
        return W.double() @ whiten.double()
    raise ValueError(f"unknown transform {transform!r}")


# ---------------------------------------------------------------- interpolative decompositions
def _solve_gram(G: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """rhs @ G^+ for a symmetric PSD G: Cholesky when positive definite, pseudo-inverse otherwise."""
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, L).T
    return rhs @ torch.linalg.pinv(G, hermitian=True)


def data_aware_rows_fit(weight: torch.Tensor, rows: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    """Z = argmin_Z E||(W - Z R) x||^2 = W Sigma R^T (R Sigma R^T)^+ for R = W[rows] (Frobenius: W R^+).

    Z[rows] is the identity whenever R has full row rank: the kept outputs pass through exactly."""
    W = weight.detach().double()
    R = W[rows]
    if cov is None:
        return W @ torch.linalg.pinv(R)
    c = cov.double()
    RS = R @ c
    return _solve_gram(RS @ R.T, W @ RS.T)


def row_pick_order(weight: torch.Tensor, k: int, cov: torch.Tensor | None = None) -> torch.Tensor:
    """Rows by pivoted QR of the whitened weight W L (L L^T = Sigma), i.e. pivoted Cholesky of
    W Sigma W^T: each pick is the output whose response to calibration inputs is least explained
    by the outputs already kept."""
    W = weight.detach().double()
    return pivoted_cholesky_order(W @ cov.double() @ W.T if cov is not None else W @ W.T, k)


def col_pick_order(weight: torch.Tensor, k: int, cov: torch.Tensor | None = None) -> torch.Tensor:
    """Columns by pivoted QR of W diag(rms of each input) (rms^2 = diag Sigma)."""
    W = weight.detach().double()
    if cov is not None:
        W = W * cov.double().diagonal().clamp_min(0).sqrt().unsqueeze(0)
    return pivoted_cholesky_order(W.T @ W, k)


def complement(kept: torch.Tensor, size: int) -> torch.Tensor:
    """The sorted indices of range(size) not in `kept`: the rows/columns an ID rebuilds."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept] = False
    return torch.nonzero(mask).flatten()


@dataclass
class RowIDFactors:
    rows: torch.Tensor     # k kept output rows (sorted)
    others: torch.Tensor   # the m-k other rows (sorted)
    R: torch.Tensor        # k x n = W[rows]
    Z: torch.Tensor        # (m-k) x k: the other rows as combinations of the kept ones
    rank: int


def row_id(weight: torch.Tensor, k: int, cov: torch.Tensor | None = None,
           order: torch.Tensor | None = None) -> RowIDFactors:
    """W ~ Z R with R = k actual rows. Rows by pivoted QR of the whitened W (W L); Z data-aware.

    `order`: a precomputed pick order (prefix-consistent), reused across ranks."""
    W = weight.detach().double()
    m, n = W.shape
    k = max(1, min(k, m, n))
    if order is None or order.numel() < k:
        order = row_pick_order(W, k, cov)
    rows = torch.sort(order[:k]).values
    others = complement(rows, m)
    Z = data_aware_rows_fit(W, rows, cov)
    return RowIDFactors(rows, others, W[rows], Z[others], k)


@dataclass
class ColIDFactors:
    cols: torch.Tensor     # k kept input columns (sorted)
    others: torch.Tensor   # the n-k other columns (sorted)
    C: torch.Tensor        # m x k = W[:, cols]
    Z: torch.Tensor        # k x (n-k): the other columns as combinations of the kept ones
    rank: int


def col_id(weight: torch.Tensor, k: int, cov: torch.Tensor | None = None,
           order: torch.Tensor | None = None) -> ColIDFactors:
    """W ~ C Z with C = k actual columns. Columns by pivoted QR of W diag(rms of the input), Z = C+ W.

    C+ W minimises E||(W - C Z) x||^2 for every covariance, so Z needs no data; the data enters
    through the pick (column j's weight scaled by how large input j is)."""
    W = weight.detach().double()
    m, n = W.shape
    k = max(1, min(k, m, n))
    if order is None or order.numel() < k:
        order = col_pick_order(W, k, cov)
    cols = torch.sort(order[:k]).values
    others = complement(cols, n)
    C = W[:, cols]
    Z = torch.linalg.lstsq(C, W[:, others]).solution if others.numel() else W.new_zeros(k, 0)
    return ColIDFactors(cols, others, C, Z, k)


# ---------------------------------------------------------------- three-factor CUR variants
def data_aware_u(weight: torch.Tensor, C: torch.Tensor, rows: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """U = argmin_U E||(W - C U R) x||^2 = C+ W Sigma R^T (R Sigma R^T)^+ (R = W[rows])."""
    return torch.linalg.pinv(C.double()) @ data_aware_rows_fit(weight, rows, cov)


def select_cur_indices(basis: torch.Tensor, k: int, selection: str, generator: torch.Generator | None = None,
                       order: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices for one side of a CUR from its singular vectors (rows = candidates): DEIM, or
    cur_math's leverage picks (topk / sample). `order`: a precomputed DEIM order to reuse."""
    if selection == "deim":
        order = order if order is not None and order.numel() >= k else deim_order(basis, k)
        return torch.sort(order[:k]).values
    return select_indices(leverage_scores(basis, k), k, selection, generator)


def cur_decompose_ext(weight: torch.Tensor, rank: int, scale: torch.Tensor | None = None, alpha: float = 0.5,
                      selection: str = "topk", u_mode: str = "pinv", cov: torch.Tensor | None = None,
                      svd: LayerSVD | None = None, generator: torch.Generator | None = None,
                      col_order: torch.Tensor | None = None, row_order: torch.Tensor | None = None) -> CURFactors:
    """Three-factor CUR with every selection (topk, sample, deim) and U (pinv, act_weighted, data_aware).

    cov: the (damped) input covariance, needed by u_mode data_aware. Like cur_math.cur_decompose, a
    failed SVD falls back to uniform selection and says so in `fallback`."""
    if selection not in CUR_SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose from {CUR_SELECTIONS}")
    if u_mode not in CUR_U_MODES:
        raise ValueError(f"unknown U mode {u_mode!r}; choose from {CUR_U_MODES}")
    if u_mode == "data_aware" and cov is None:
        raise ValueError("u_mode data_aware needs the input covariance")
    orders = {"cols": col_order, "rows": row_order}

    def pick(basis: torch.Tensor, k: int, side: str) -> torch.Tensor:
        return select_cur_indices(basis, k, selection, generator, orders[side])
    fit_u = (lambda w, C, rows: data_aware_u(w, C, rows, cov)) if u_mode == "data_aware" else None
    return cur_decompose(weight, rank, scale, alpha, selection, u_mode, svd, generator, pick=pick, fit_u=fit_u)
