"""Low-rank replacements of nn.Linear beside CURLinear, and the one factory every stage uses.

`compress_linear(linear, ratio, method, ...)` is what acur.compress_model and sensitivity.sensitivity_ppl
call, so calibration, sensitivity and search are shared by every method; `prepare_layer` holds what
one layer's decompositions share across candidate ratios (one SVD, one pivot order). The math lives
in modules/decompositions.py and modules/cur_math.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from modules.cur_linear import CURLinear
from modules import decompositions as dec, registry
from modules.cur_math import EPS, LayerSVD, cur_decompose, safe_svd, scaled_weight


class _LowRankBase(nn.Module):
    """Shared bookkeeping: shapes, rank, method name, bias, recorded fallback."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, method: str,
                 dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.method = in_features, out_features, rank, method
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.fallback = ""

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias if self.bias is not None else y

    def param_count(self) -> int:
        return registry.get(self.method).param_count(self.out_features, self.in_features, self.rank)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"method={self.method}")


class SVDLinear(_LowRankBase):
    """y = A (B x) + b with A (out x k), B (k x in): k(m+n) parameters (svd, asvd, wsvd)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 method: str = "svd", dtype=None, device=None):
        super().__init__(in_features, out_features, rank, bias, method, dtype, device)
        self.A = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))

    def dense_weight(self) -> torch.Tensor:
        return self.A @ self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(F.linear(F.linear(x, self.B), self.A))


class RowIDLinear(_LowRankBase):
    """Row interpolative decomposition: t = R x holds the kept outputs exactly (R = actual rows of W);
    the other outputs are Z t. Buffers record the kept rows. k(m+n-k) parameters."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 method: str = "rowid", dtype=None, device=None):
        super().__init__(in_features, out_features, rank, bias, method, dtype, device)
        self.R = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.Z = nn.Parameter(torch.zeros(out_features - rank, rank, dtype=dtype, device=device))
        self.register_buffer("row_indices", torch.arange(rank, device=device))
        self.register_buffer("other_rows", torch.arange(rank, out_features, device=device))
        # position of output i inside cat([R x, Z R x])
        self.register_buffer("gather_index", torch.arange(out_features, device=device))

    def set_indices(self, rows: torch.Tensor, others: torch.Tensor) -> None:
        self.row_indices.copy_(rows)
        self.other_rows.copy_(others)
        self.gather_index.copy_(torch.argsort(torch.cat([rows, others])))

    def dense_weight(self) -> torch.Tensor:
        W = self.R.new_zeros(self.out_features, self.in_features)
        W[self.row_indices] = self.R
        W[self.other_rows] = self.Z @ self.R
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = F.linear(x, self.R)
        y = torch.cat([t, F.linear(t, self.Z)], dim=-1).index_select(-1, self.gather_index)
        return self._add_bias(y)


class ColIDLinear(_LowRankBase):
    """Column interpolative decomposition: z = x[kept] + Z x[others], y = C z (C = actual columns of W).
    Buffers record the kept input channels. k(m+n-k) parameters."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 method: str = "colid", dtype=None, device=None):
        super().__init__(in_features, out_features, rank, bias, method, dtype, device)
        self.C = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.Z = nn.Parameter(torch.zeros(rank, in_features - rank, dtype=dtype, device=device))
        self.register_buffer("col_indices", torch.arange(rank, device=device))
        self.register_buffer("other_cols", torch.arange(rank, in_features, device=device))

    def set_indices(self, cols: torch.Tensor, others: torch.Tensor) -> None:
        self.col_indices.copy_(cols)
        self.other_cols.copy_(others)

    def dense_weight(self) -> torch.Tensor:
        W = self.C.new_zeros(self.out_features, self.in_features)
        W[:, self.col_indices] = self.C
        W[:, self.other_cols] = self.C @ self.Z
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.index_select(-1, self.col_indices) + F.linear(x.index_select(-1, self.other_cols), self.Z)
        return self._add_bias(F.linear(z, self.C))


# ---------------------------------------------------------------- factory
@dataclass
class LayerStats:
    """What calibration measured for one linear; a method reads the parts its registry entry names."""
    scale: torch.Tensor | None = None       # per-input activation statistic (acur, asvd)
    cov: torch.Tensor | None = None         # E[x x^T] of the inputs it is fitted on
    cross: torch.Tensor | None = None       # E[x x~^T]: dense inputs x against the fitted-on inputs x~ (sequential)
    row_weight: torch.Tensor | None = None  # output fisher: the loss's sensitivity to each output
    n_tokens: int | None = None             # calibration tokens behind cov (covariance shrinkage)


@dataclass
class LayerPrep:
    """What every candidate ratio of one layer shares for one method."""
    method: str
    scale: torch.Tensor | None = None        # activation statistic actually used (None: unscaled)
    cov: torch.Tensor | None = None          # damped (and shrunk) covariance actually used
    cross: torch.Tensor | None = None
    row_weight: torch.Tensor | None = None
    svd: LayerSVD | None = None              # CUR forms: SVD of the scaled weight
    svd_tuple: tuple | None = None           # SVD forms: (U, s, Vh) of the transformed weight
    transform: str = "none"
    scale_diag: torch.Tensor | None = None
    whiten: torch.Tensor | None = None
    col_order: torch.Tensor | None = None    # DEIM / pivoted-QR pick orders (prefix-consistent)
    row_order: torch.Tensor | None = None
    row_residual: torch.Tensor | None = None  # row ID: weighted output error at ranks 0..len(row_order)
    fallback: str = ""


def _check_per_linear(spec: registry.Method) -> None:
    """The structured form is no decomposition of one linear: it slices a whole block (structured.py)."""
    if not spec.per_linear:
        raise ValueError(f"method {spec.name} keeps whole neurons and heads of a block (structured.py); "
                         "it does not decompose one linear")


def _on(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Statistics follow the weight's device (caches load them on the CPU)."""
    return None if t is None else t.detach().to(like.device)


def prepare_layer(weight: torch.Tensor, method: str = "acur", scale: torch.Tensor | None = None,
                  alpha: float = 0.5, cov: torch.Tensor | None = None, selection: str = "topk",
                  u_mode: str = "pinv", cov_damp: float = registry.DEFAULT_COV_DAMP,
                  max_rank: int | None = None, stats: LayerStats | None = None) -> LayerPrep:
    """One SVD / whitening / pick order per layer, reused for every rank up to max_rank.

    `stats` carries what the registry entry may read beyond scale and cov (cross-covariance, output
    fisher, token count). A non-finite activation statistic or covariance is dropped with a recorded
    fallback (the layer is then decomposed without it), never silently used."""
    spec = registry.get(method)
    _check_per_linear(spec)
    stats = stats or LayerStats()
    scale = _on(scale if scale is not None else stats.scale, weight)
    cov = _on(cov if cov is not None else stats.cov, weight)
    m, n = weight.shape
    max_rank = min(m, n) if max_rank is None else max(1, min(max_rank, m, n))
    prep = LayerPrep(method)
    if spec.scale == "none":
        scale = None
    if spec.scale == "required" and scale is None:
        raise ValueError(f"method {method} needs the activation statistic (run with --act_aware)")
    if scale is not None and not torch.isfinite(scale).all() and method != "acur":
        # (acur keeps it: its SVD fails and the seed's uniform-selection fallback is recorded)
        prep.fallback = "non-finite activation statistic: decomposed without it"
        scale = None
    if spec.needs_covariance(u_mode):
        if cov is None:
            raise ValueError(f"method {method} (u_mode {u_mode}) needs the input covariance")
        if not dec.all_finite(cov):
            prep.fallback = "non-finite input covariance: fitted without it (Frobenius)"
            cov = None
        elif spec.shrink and stats.n_tokens:
            cov = dec.shrunk_covariance(cov, stats.n_tokens, cov_damp)
        else:
            cov = dec.damped_covariance(cov, cov_damp)
    else:
        cov = None
    if spec.correct and cov is not None and stats.cross is not None and torch.isfinite(stats.cross).all():
        lam = dec.shrinkage(cov.shape[0], stats.n_tokens) if spec.shrink else 0.0
        prep.cross = dec.corrected_cross(_on(stats.cross, weight), _on(stats.cov, weight), cov, lam)
    if spec.fisher and stats.row_weight is not None:
        if torch.isfinite(stats.row_weight).all():
            prep.row_weight = _on(stats.row_weight, weight)
        else:
            prep.fallback = "non-finite output fisher: rows weighted uniformly"
    prep.scale, prep.cov = scale, cov
    W = weight.detach()
    if spec.form == "cur":
        prep.svd = safe_svd(scaled_weight(W, scale, alpha))
        if selection == "deim" and prep.svd.ok:
            prep.col_order = dec.deim_order(prep.svd.Vh.T, max_rank)
            prep.row_order = dec.deim_order(prep.svd.U, max_rank)
        return prep
    if spec.form == "svd":
        if method == "asvd" and scale is not None:
            prep.transform, prep.scale_diag = "scale", scale.double().clamp_min(0) ** alpha + EPS
        elif method == "wsvd" and cov is not None:
            prep.transform, prep.whiten = "whiten", dec.whitening_factor(cov)
        Wt = dec.transformed_weight(W.double(), prep.transform, prep.scale_diag, prep.whiten)
        if not torch.isfinite(Wt).all():
            prep.fallback = (prep.fallback + "; " if prep.fallback else "") + "non-finite transform: plain SVD"
            prep.transform, Wt = "none", W.double()
        # fp32 SVD like cur_math.safe_svd (fp64 only for fp64 weights): the factors are finished in fp64
        svd = torch.linalg.svd(Wt if W.dtype == torch.float64 else Wt.float(), full_matrices=False)
        prep.svd_tuple = tuple(t.double() for t in svd)
        return prep
    if spec.form == "rowid":
        prep.row_order, prep.row_residual = dec.row_error_curve(W, max_rank, cov, prep.row_weight)
    else:
        prep.col_order = dec.col_pick_order(W, max_rank, cov)
    return prep


def _module(cls, W: torch.Tensor, rank: int, bias: torch.Tensor | None, method: str, **factors) -> nn.Module:
    """A low-rank module of class `cls` holding `factors` (parameters by name) and the layer's bias."""
    m, n = W.shape
    module = cls(n, m, rank, bias=bias is not None, method=method, dtype=W.dtype, device=W.device)
    with torch.no_grad():
        for name, value in factors.items():
            getattr(module, name).copy_(value)
        if bias is not None:
            module.bias.copy_(bias)
    return module


def compress_linear(linear: nn.Linear, ratio: float, method: str = "acur", scale: torch.Tensor | None = None,
                    alpha: float = 0.5, cov: torch.Tensor | None = None, rank_align: int = 1,
                    selection: str = "topk", u_mode: str = "pinv", cov_damp: float = registry.DEFAULT_COV_DAMP,
                    prep: LayerPrep | None = None, generator: torch.Generator | None = None,
                    stats: LayerStats | None = None) -> nn.Module:
    """The low-rank module of `method` keeping at most `ratio` of the linear's weight parameters.

    scale: per-input-channel activation statistic (acur, asvd); cov: input covariance E[x x^T]
    (wsvd, rowid, colid, srid, u_mode data_aware); stats: the rest a method may read (LayerStats).
    Decompositions run in fp32/fp64, the module gets the weight's dtype. `prep` (from prepare_layer
    with the same arguments) is reused across ratios."""
    W = linear.weight.data
    m, n = W.shape
    spec = registry.get(method)
    _check_per_linear(spec)
    bias = linear.bias.data if linear.bias is not None else None
    k = spec.rank(m, n, ratio, rank_align)
    if registry.is_seed_cur(method, selection, u_mode):
        if scale is None and stats is not None:
            scale = stats.scale
        f = cur_decompose(W, k, scale=_on(scale, W) if spec.scale != "none" else None, alpha=alpha,
                          selection=selection, u_mode=u_mode, svd=prep.svd if prep is not None else None,
                          generator=generator)
        return CURLinear.from_factors(f, bias, W.dtype, W.device)
    if not torch.isfinite(W).all():  # (the seed's CUR path above records its own uniform fallback)
        raise ValueError(f"{method}: the weight holds NaN/inf; no decomposition of it is meaningful")
    if prep is None or (prep.col_order is not None and prep.col_order.numel() < k) or \
            (prep.row_order is not None and prep.row_order.numel() < k):
        prep = prepare_layer(W, method, scale, alpha, cov, selection, u_mode, cov_damp, max_rank=k, stats=stats)
    if spec.form == "cur":
        u = "pinv" if u_mode == "data_aware" and prep.cov is None else u_mode  # fallback already recorded
        pick, fit_u = dec.cur_choices(selection, u, prep.cov, generator, prep.col_order, prep.row_order)
        f = cur_decompose(W, k, prep.scale, alpha, selection, u, prep.svd, generator, pick=pick, fit_u=fit_u)
        module = CURLinear.from_factors(f, bias, W.dtype, W.device)
        module.fallback = "; ".join(x for x in (prep.fallback, f.fallback) if x)
        return module
    if spec.form == "svd":
        f = dec.svd_factors(W, k, prep.transform, prep.scale_diag, prep.whiten, prep.svd_tuple)
        module = _module(SVDLinear, W, f.rank, bias, method, A=f.A, B=f.B)
    elif spec.form == "rowid":
        f = dec.row_id(W, k, prep.cov, prep.row_order, prep.cross)
        module = _module(RowIDLinear, W, f.rank, bias, method, R=f.R, Z=f.Z)
        module.set_indices(f.rows, f.others)
    else:
        f = dec.col_id(W, k, prep.cov, prep.col_order)
        module = _module(ColIDLinear, W, f.rank, bias, method, C=f.C, Z=f.Z)
        module.set_indices(f.cols, f.others)
    if not all(torch.isfinite(p).all() for p in module.parameters()):
        raise FloatingPointError(f"{method} produced non-finite factors from a finite weight")
    module.fallback = prep.fallback
    return module


def prepare_candidates(linear: nn.Linear, ratios: list[float], scale: torch.Tensor | None = None,
                       alpha: float = 0.5, cov: torch.Tensor | None = None, stats: LayerStats | None = None,
                       **settings) -> LayerPrep:
    """prepare_layer for the largest rank any of `ratios` buys (settings as compress_candidates)."""
    spec = registry.get(settings.get("method", "acur"))
    m, n = linear.weight.shape
    max_rank = max(spec.rank(m, n, r, settings.get("rank_align", 1)) for r in ratios)
    prep_kw = {k: settings[k] for k in ("selection", "u_mode", "cov_damp") if k in settings}
    return prepare_layer(linear.weight.data, spec.name, scale, alpha, cov, max_rank=max_rank, stats=stats, **prep_kw)


def compress_candidates(linear: nn.Linear, ratios: list[float], scale: torch.Tensor | None = None,
                        alpha: float = 0.5, cov: torch.Tensor | None = None, stats: LayerStats | None = None,
                        **settings) -> list[nn.Module]:
    """The layer's module at every candidate ratio, from one prepare_layer (one SVD / pick order).

    settings: method, rank_align, selection, u_mode, cov_damp, generator (as compress_linear)."""
    prep = prepare_candidates(linear, ratios, scale, alpha, cov, stats, **settings)
    return [compress_linear(linear, r, scale=scale, alpha=alpha, cov=cov, prep=prep, stats=stats, **settings)
            for r in ratios]


LOW_RANK_CLASSES = {cls.__name__: cls for cls in (CURLinear, SVDLinear, RowIDLinear, ColIDLinear)}


def empty_low_rank(class_name: str, in_features: int, out_features: int, rank: int, bias: bool,
                   method: str, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """An unfilled low-rank module of a saved one's class and shape, for its state_dict to be loaded into
    (the streamed pipeline's per-block results are state dicts)."""
    if class_name not in LOW_RANK_CLASSES:
        raise ValueError(f"unknown low-rank module class {class_name!r}; known: {', '.join(LOW_RANK_CLASSES)}")
    cls = LOW_RANK_CLASSES[class_name]
    if cls is CURLinear:
        return CURLinear(in_features, out_features, rank, bias=bias, dtype=dtype, device=device)
    return cls(in_features, out_features, rank, bias=bias, method=method, dtype=dtype, device=device)
