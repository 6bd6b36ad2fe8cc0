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
Which method uses which of these, and its parameter count, is modules/registry.py's.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from modules.cur_math import CURFactors, LayerSVD, cur_decompose, leverage_scores, select_indices
from modules.registry import DEFAULT_COV_DAMP, SELECTIONS, U_MODES


# ---------------------------------------------------------------- covariance helpers
def damped_covariance(cov: torch.Tensor, damp: float = DEFAULT_COV_DAMP) -> torch.Tensor:
    """Sigma + damp * mean(diag Sigma) * I in fp64: keeps a covariance from few tokens invertible
    and stops the data-aware fits from over-fitting the calibration set (GPTQ uses the same trick)."""
    return _damp_(_fp64_copy(cov), damp)


def all_finite(t: torch.Tensor, rows: int = 1024) -> bool:
    """torch.isfinite(t).all() a slab of rows at a time: isfinite of a whole fp64 matrix allocates
    1.4 times its size (an abs copy and a mask), 9 GB for a 70B down_proj's covariance."""
    if t.ndim < 2 or t.shape[0] <= rows:
        return bool(torch.isfinite(t).all())
    ok = torch.ones((), dtype=torch.bool, device=t.device)
    for i in range(0, t.shape[0], rows):
        ok &= torch.isfinite(t[i:i + rows]).all()
    return bool(ok)  # one host synchronisation


def _fp64_copy(cov: torch.Tensor) -> torch.Tensor:
    """A private fp64 copy of a square finite covariance, for the in-place steps below."""
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance must be square, got shape {tuple(cov.shape)}")
    if not all_finite(cov):
        raise ValueError("covariance contains NaN/inf")
    return cov.detach().to(torch.float64, copy=True)


def _damp_(c: torch.Tensor, damp: float) -> torch.Tensor:
    """damped_covariance in place on a private fp64 copy: no n x n temporaries (a 70B down_proj's
    covariance is 6.6 GB in fp64; the expression form held five of them at once). Bit for bit the
    expression (c + c^T) / 2 + damp * mean(diag) * I."""
    if damp < 0:
        raise ValueError(f"covariance damping must be >= 0, got {damp}")
    _symmetrize_(c)
    mean_diag = float(c.diagonal().mean())
    c.diagonal().add_(damp * mean_diag if mean_diag > 0 else damp)
    return c


def _symmetrize_(c: torch.Tensor, block: int = 1024) -> None:
    """c <- (c + c^T) / 2 in place, tile by tile (each pair of tiles through one tile-sized temporary)."""
    n = c.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            upper, lower = c[i:i + block, j:j + block], c[j:j + block, i:i + block]
            mean = (upper + lower.T) / 2
            upper.copy_(mean)
            lower.copy_(mean.T)


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
        return torch.zeros(0, dtype=torch.long, device=V.device)
    _, pivots = torch.linalg.lu_factor(V[:, :k].contiguous())
    perm = list(range(V.shape[0]))
    for i, p in enumerate(pivots.tolist()):  # LAPACK row swaps (1-based) -> permutation
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    return torch.tensor(perm[:k], dtype=torch.long, device=V.device)


def _pick_block(G: torch.Tensor, P: torch.Tensor, d: torch.Tensor, penalty: torch.Tensor, ramp: torch.Tensor,
                tol: torch.Tensor, order_blk: torch.Tensor, resid_blk: torch.Tensor) -> None:
    """P.shape[1] greedy picks, then the block's BLAS-3 update of G. Every shape is static and nothing
    synchronises with the host, so a CUDA graph can capture it whole. penalty is -inf on picked
    indices (0 elsewhere); ramp = -(1 + index): once no unpicked residual exceeds tol (rank reached)
    the lowest unpicked index wins, with a zero column."""
    tiny = torch.finfo(G.dtype).tiny
    for t in range(P.shape[1]):
        p = torch.where(d > tol, d, ramp).add_(penalty).argmax().view(1)
        dp = d.index_select(0, p)
        inv_root = torch.where(dp > tol, dp.clamp_min(tiny).rsqrt(), 0.0)
        col = (G.index_select(0, p).squeeze(0) - P[:, :t] @ P.index_select(0, p).squeeze(0)[:t]) * inv_root
        P[:, t] = col
        d.sub_(col * col)
        d.index_fill_(0, p, 0.0)
        penalty.index_fill_(0, p, -math.inf)
        order_blk.narrow(0, t, 1).copy_(p)
        resid_blk.narrow(0, t, 1).copy_((d + penalty).clamp_min(0).sum())
    G.addmm_(P, P.T, alpha=-1.0)


class _PickState:
    """The buffers of one pivoted Cholesky (m x m Gram, up to b picks per block) and, on CUDA, the graph
    of one block: a pick is ~15 tiny kernels, launch-bound when issued from Python (7B: ~840k picks in
    the fisher_error sensitivity); a replayed graph issues them without Python in between."""

    def __init__(self, m: int, b: int, device: torch.device, graph: bool):
        f = dict(dtype=torch.float64, device=device)
        self.G, self.P = torch.zeros(m, m, **f), torch.zeros(m, b, **f)
        self.d, self.penalty = torch.zeros(m, **f), torch.zeros(m, **f)
        self.ramp = -(1.0 + torch.arange(m, **f))
        self.tol = torch.zeros((), **f)
        self.order_blk = torch.zeros(b, dtype=torch.long, device=device)
        self.resid_blk = torch.zeros(b, **f)
        self.graph = None
        if graph:
            self._capture(b, device)

    def _capture(self, b: int, device: torch.device) -> None:
        """Capture one block of picks. thread_local: the ppl sensitivity decomposes in a worker thread
        while the main thread runs forward passes; their kernels must not invalidate this capture. A
        capture that fails anyway leaves the state eager (same numbers), with a warning."""
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.run(b)  # warm-up before the capture (allocator, cuBLAS workspace), on zeros: harmless
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    self.run(b)
            except RuntimeError as exc:  # torch.AcceleratorError is a RuntimeError
                warnings.warn(f"pivoted Cholesky: CUDA graph capture failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}); picks are issued one by one (same results, slower)")
                torch.cuda.synchronize(device)
                return
            self.graph = graph

    def load(self, gram: torch.Tensor) -> torch.Tensor:
        """Start on a new Gram; returns its residual trace before any pick."""
        self.G.copy_(gram.detach())
        self.d.copy_(self.G.diagonal())
        self.penalty.zero_()
        self.tol.copy_(self.d.abs().max() * 1e-13 if self.d.numel() else self.tol.new_zeros(()))
        return self.d.clamp_min(0).sum()

    def run(self, width: int) -> None:
        if self.graph is not None and width == self.P.shape[1]:
            self.graph.replay()
        else:
            _pick_block(self.G, self.P[:, :width], self.d, self.penalty, self.ramp, self.tol,
                        self.order_blk[:width], self.resid_blk[:width])


_PICK_GRAPHS: dict[tuple, _PickState] = {}
_PICK_GRAPHS_MAX = 4  # a decoder's distinct shapes (q/k/v/o, gate/up, down, lm_head); each holds its Gram
# the Grams kept between layers: a 7B block's (11008^2 and 4096^2 fp64, 1.1 GiB) stay; a 70B gate_proj's alone
# is 6.1 GiB, so it is dropped when the next shape (down_proj, whose fit peaks then) asks: one re-capture a block
_PICK_GRAPHS_MAX_BYTES = 2 << 30


def release_pick_graphs() -> None:
    """Free the cached graphs and their fp64 Grams (11008^2 x 8 B = 0.9 GiB for a 7B MLP): stages call it
    when they finish, so a compressed model's resident memory holds its factors only."""
    _PICK_GRAPHS.clear()


def _pick_state(m: int, b: int, device: torch.device, cuda_graph: bool) -> _PickState:
    if not cuda_graph:
        return _PickState(m, b, device, graph=False)
    key = (m, b, str(device))
    if key not in _PICK_GRAPHS:
        make_room(_PICK_GRAPHS, m * m * 8)
        _PICK_GRAPHS[key] = _PickState(m, b, device, graph=True)
    return _PICK_GRAPHS[key]


def make_room(cache: dict, new_bytes: int) -> None:
    """Drop the oldest cached pick states until one of new_bytes fits under both caps. One larger than the
    byte cap is still cached (alone): gate_proj and up_proj share it, the next other shape drops it."""
    while cache and (len(cache) >= _PICK_GRAPHS_MAX
                     or sum(s.G.numel() * s.G.element_size() for s in cache.values()) + new_bytes
                     > _PICK_GRAPHS_MAX_BYTES):
        cache.pop(next(iter(cache)))


def pivoted_cholesky(gram: torch.Tensor, k: int, block: int = 64,
                     cuda_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(first k pivots, residual trace before each pick and after the last: k+1 values) of the greedy
    pivoted Cholesky of a PSD Gram matrix G = A^T A.

    The pivots are the column pivots of QR with column pivoting of A (Businger-Golub: take the column
    of largest residual norm, project it out), computed on the Gram with blocked (BLAS-3) updates,
    ~10x faster than rank-1 QR updates. Deterministic and prefix-consistent. The residual trace after
    j picks is tr(G) - tr(G restricted to the span of the picks): for G = W Sigma W^T it is exactly
    the output error E||(W - Z R) x||^2 of the row ID on those j rows, so one pass gives the error at
    every rank. Residuals below 1e-13 of the largest diagonal count as zero (rank reached): the
    remaining picks are the lowest unpicked indices. On CUDA each full block of picks is one replayed
    CUDA graph (cuda_graph=False: the same kernels issued one by one; the results are identical)."""
    m = gram.shape[0]
    k = min(k, m)
    dev = gram.device
    graph = (cuda_graph and dev.type == "cuda" and k >= block
             and not torch.cuda.is_current_stream_capturing())
    st = _pick_state(m, block, dev, graph)
    order = torch.zeros(k, dtype=torch.long, device=dev)
    residual = torch.zeros(k + 1, dtype=torch.float64, device=dev)
    residual[0] = st.load(gram)
    done = 0
    while done < k:  # no host synchronisation inside: every step is a device op
        n = min(block, k - done)
        st.run(n)
        order[done:done + n] = st.order_blk[:n]
        residual[done + 1:done + n + 1] = st.resid_blk[:n]
        done += n
    return order, residual


def pivoted_cholesky_order(gram: torch.Tensor, k: int, block: int = 64) -> torch.Tensor:
    """First k pivots of the greedy pivoted Cholesky of a PSD Gram matrix (see pivoted_cholesky)."""
    return pivoted_cholesky(gram, k, block)[0]


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


def data_aware_rows_fit(weight: torch.Tensor, rows: torch.Tensor, cov: torch.Tensor | None,
                        cross: torch.Tensor | None = None) -> torch.Tensor:
    """Z = argmin_Z E||(W - Z R) x||^2 = W Sigma R^T (R Sigma R^T)^+ for R = W[rows] (Frobenius: W R^+).

    Z[rows] is the identity whenever R has full row rank: the kept outputs pass through exactly.
    Sequential calibration (`cross` = E[x x~^T] with x the dense model's input and x~ the input the
    already-compressed layers produce, `cov` = E[x~ x~^T]): Z = argmin E||W x - Z R x~||^2 =
    W cross R^T (R cov R^T)^+, which also undoes the error the layers before it made."""
    W = weight.detach().double()
    R = W[rows]
    if cov is None:
        return W @ torch.linalg.pinv(R)
    RS = R @ cov.double()
    target = RS if cross is None else R @ cross.double().T  # rows of (W cross R^T)^T / W
    return _solve_gram(RS @ R.T, W @ target.T)


def row_gram(weight: torch.Tensor, cov: torch.Tensor | None = None,
             row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """D W Sigma W^T D with D = diag(sqrt(row_weight)). Its diagonal is each output's weighted energy
    E[g_i (w_i^T x)^2]; with g_i the loss's sensitivity to output i (act_aware_utils.output_fisher)
    the residual trace of its pivoted Cholesky estimates the loss increase of the row ID at every
    rank. Row weights change which rows are kept, not how the others are fitted (each row's fit is
    its own least-squares problem)."""
    W = weight.detach().double()
    G = W @ cov.double() @ W.T if cov is not None else W @ W.T
    if row_weight is not None:  # in place: G is m x m (6.6 GB in fp64 for a 70B gate_proj), no second copy
        r = row_weight.detach().to(device=G.device, dtype=G.dtype).clamp_min(0).sqrt()
        G.mul_(r.unsqueeze(0)).mul_(r.unsqueeze(1))
    return G


def row_pick_order(weight: torch.Tensor, k: int, cov: torch.Tensor | None = None,
                   row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows by pivoted QR of the whitened weight W L (L L^T = Sigma), i.e. pivoted Cholesky of
    W Sigma W^T: each pick is the output whose response to calibration inputs is least explained
    by the outputs already kept (weighted by row_weight, see row_gram)."""
    return pivoted_cholesky(row_gram(weight, cov, row_weight), k)[0]


def row_error_curve(weight: torch.Tensor, k: int, cov: torch.Tensor | None = None,
                    row_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row pick order, weighted output error of the row ID at ranks 0..k): one pivoted Cholesky."""
    return pivoted_cholesky(row_gram(weight, cov, row_weight), k)


def shrinkage(n_features: int, n_tokens: int | None) -> float:
    """lam = d / (d + n_tokens): how far a covariance of d channels from n_tokens tokens is trusted."""
    return 0.0 if not n_tokens else n_features / (n_features + n_tokens)


def corrected_cross(cross: torch.Tensor, cov_raw: torch.Tensor, cov_used: torch.Tensor, lam: float) -> torch.Tensor:
    """E[x x~^T] as the sequential fit should read it: cov_used + (1 - lam) (cross - cov_raw).

    cross - cov_raw = E[(x - x~) x~^T] is the part that corrects the earlier layers' error; it is
    estimated from as few tokens as the covariance, so it is shrunk by the same lam, and the damping
    and shrinkage of cov_used carry over (with no data the fit falls back to the plain one on x~)."""
    return cov_used.double() + (1 - lam) * (cross.double() - cov_raw.double())


def shrunk_covariance(cov: torch.Tensor, n_tokens: int, damp: float = DEFAULT_COV_DAMP) -> torch.Tensor:
    """(1 - lam) Sigma + lam diag(Sigma) with lam = d / (d + n_tokens), then damped_covariance.

    With fewer calibration tokens than input channels d the sample covariance is singular and the
    data-aware fits chase its noise (wsvd and rowid collapse at 2 x 128 tokens); shrinking toward the
    diagonal (the per-channel energy that diagonal scalings like ASVD's use) by how little data there
    is keeps them sane and costs little when tokens are plentiful (lam ~ 0.02 at 32k tokens, d 576)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    c = _fp64_copy(cov)
    lam = shrinkage(c.shape[0], n_tokens)
    diag = c.diagonal().clone()
    c.mul_(1 - lam)  # in place, bit for bit (1 - lam) c + lam diag_embed(diag): off the diagonal + 0
    c.diagonal().add_(lam * diag)
    return _damp_(c, damp)


def col_pick_order(weight: torch.Tensor, k: int, cov: torch.Tensor | None = None) -> torch.Tensor:
    """Columns by pivoted QR of W diag(rms of each input) (rms^2 = diag Sigma)."""
    W = weight.detach().double()
    if cov is not None:
        W = W * cov.double().diagonal().clamp_min(0).sqrt().unsqueeze(0)
    return pivoted_cholesky_order(W.T @ W, k)


def complement(kept: torch.Tensor, size: int) -> torch.Tensor:
    """The sorted indices of range(size) not in `kept`: the rows/columns an ID rebuilds."""
    mask = torch.ones(size, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return torch.nonzero(mask).flatten()


def _kept(order: torch.Tensor | None, k: int, size: int, pick) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first k of a pick order, sorted; the rest of range(size)); pick() computes the order when
    none long enough is given (orders are prefix-consistent, so one serves every smaller rank)."""
    if order is None or order.numel() < k:
        order = pick()
    kept = torch.sort(order[:k]).values
    return kept, complement(kept, size)


@dataclass
class RowIDFactors:
    rows: torch.Tensor     # k kept output rows (sorted)
    others: torch.Tensor   # the m-k other rows (sorted)
    R: torch.Tensor        # k x n = W[rows]
    Z: torch.Tensor        # (m-k) x k: the other rows as combinations of the kept ones
    rank: int


def row_id(weight: torch.Tensor, k: int, cov: torch.Tensor | None = None,
           order: torch.Tensor | None = None, cross: torch.Tensor | None = None) -> RowIDFactors:
    """W ~ Z R with R = k actual rows. Rows by pivoted QR of the whitened W (W L); Z data-aware.

    `order`: a precomputed pick order (prefix-consistent), reused across ranks."""
    W = weight.detach().double()
    k = max(1, min(k, *W.shape))
    rows, others = _kept(order, k, W.shape[0], lambda: row_pick_order(W, k, cov))
    Z = data_aware_rows_fit(W, rows, cov, cross)
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
    k = max(1, min(k, *W.shape))
    cols, others = _kept(order, k, W.shape[1], lambda: col_pick_order(W, k, cov))
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
    pick, fit_u = cur_choices(selection, u_mode, cov, generator, col_order, row_order)
    return cur_decompose(weight, rank, scale, alpha, selection, u_mode, svd, generator, pick=pick, fit_u=fit_u)


def cur_choices(selection: str, u_mode: str, cov: torch.Tensor | None = None,
                generator: torch.Generator | None = None, col_order: torch.Tensor | None = None,
                row_order: torch.Tensor | None = None) -> tuple:
    """(pick, fit_u) for cur_math.cur_decompose: how the extended CUR selects indices and fits U.
    Kept apart from the decomposition so the activation scaling (alpha) goes straight to cur_math."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose from {SELECTIONS}")
    if u_mode not in U_MODES:
        raise ValueError(f"unknown U mode {u_mode!r}; choose from {U_MODES}")
    if u_mode == "data_aware" and cov is None:
        raise ValueError("u_mode data_aware needs the input covariance")
    orders = {"cols": col_order, "rows": row_order}

    def pick(basis: torch.Tensor, k: int, side: str) -> torch.Tensor:
        return select_cur_indices(basis, k, selection, generator, orders[side])
    fit_u = (lambda w, C, rows: data_aware_u(w, C, rows, cov)) if u_mode == "data_aware" else None
    return pick, fit_u
