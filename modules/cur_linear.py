"""CURLinear: an nn.Linear replaced by actual columns C, actual rows R and a small core U.

y = C (U (R x)) + b. The math lives in modules/cur_math.py; this file only wraps it as modules.
"""
from __future__ import annotations

import torch
from torch import nn

from modules import registry
from modules.cur_math import CURFactors, LayerSVD, cur_decompose


class CURLinear(nn.Module):
    """Drop-in replacement for nn.Linear holding C (out x k), U (k x k), R (k x in) as parameters.

    Buffers `col_indices` / `row_indices` record which actual input columns and output rows of
    the original weight were kept, so a saved model says what it kept.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = dict(dtype=dtype, device=device)
        self.C = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.U = nn.Parameter(torch.zeros(rank, rank, **kw))
        self.R = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.register_buffer("col_indices", torch.zeros(rank, dtype=torch.long, device=device))
        self.register_buffer("row_indices", torch.zeros(rank, dtype=torch.long, device=device))
        self.fallback = ""

    @classmethod
    def from_factors(cls, factors: CURFactors, bias: torch.Tensor | None,
                     dtype: torch.dtype, device: torch.device | str) -> "CURLinear":
        m, k = factors.C.shape
        n = factors.R.shape[1]
        layer = cls(n, m, k, bias=bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            layer.C.copy_(factors.C)
            layer.U.copy_(factors.U)
            layer.R.copy_(factors.R)
            if bias is not None:
                layer.bias.copy_(bias)
            layer.col_indices.copy_(factors.cols)
            layer.row_indices.copy_(factors.rows)
        layer.fallback = factors.fallback
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, param_ratio: float, act_scale: torch.Tensor | None = None,
                    alpha: float = 0.5, rank_align: int = 1, selection: str = "topk",
                    u_mode: str = "pinv", svd: LayerSVD | None = None,
                    generator: torch.Generator | None = None) -> "CURLinear":
        """Decompose `linear` so that C+U+R hold at most param_ratio of its weight's parameters.

        act_scale: per-input-channel statistic s (None = plain CUR); columns/rows are chosen by
        leverage of W diag(s^alpha). The decomposition runs in fp32 whatever the model dtype.
        """
        W = linear.weight.data
        m, n = W.shape
        k = registry.get("acur").rank(m, n, param_ratio, rank_align)
        factors = cur_decompose(W, k, scale=act_scale, alpha=alpha, selection=selection,
                                u_mode=u_mode, svd=svd, generator=generator)
        bias = linear.bias.data if linear.bias is not None else None
        return cls.from_factors(factors, bias, W.dtype, W.device)

    def param_count(self) -> int:
        return registry.get("acur").param_count(self.out_features, self.in_features, self.rank)

    def dense_weight(self) -> torch.Tensor:
        """C U R as a dense matrix (for checks and reports, not for the forward pass)."""
        return self.C @ self.U @ self.R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # right-to-left keeps every intermediate at width k (cheapest order for k < in, out)
        y = nn.functional.linear(nn.functional.linear(nn.functional.linear(x, self.R), self.U), self.C)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class GradCURLinear(nn.Module):
    """Differentiable CUR: keeps the dense weight and fixed indices; C, U, R are recomputed from W
    in every forward so gradients reach W through the CUR approximation (for fine-tuning or
    gradient-based sensitivity, like ASVD's GradSVDLinear)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor,
                 rows: torch.Tensor, scale: torch.Tensor | None = None, alpha: float = 0.5,
                 u_mode: str = "pinv"):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("col_indices", cols.to(weight.device).clone())
        self.register_buffer("row_indices", rows.to(weight.device).clone())
        self.register_buffer("scale_diag", None if scale is None else
                             scale.detach().to(weight.device).float().clamp_min(0) ** alpha + 1e-6)
        self.u_mode = u_mode

    @classmethod
    def from_linear(cls, linear: nn.Linear, param_ratio: float, act_scale: torch.Tensor | None = None,
                    alpha: float = 0.5, rank_align: int = 1, selection: str = "topk",
                    u_mode: str = "pinv") -> "GradCURLinear":
        W = linear.weight.data
        k = registry.get("acur").rank(*W.shape, param_ratio, rank_align)
        f = cur_decompose(W, k, scale=act_scale, alpha=alpha, selection=selection, u_mode=u_mode)
        return cls(W, linear.bias.data if linear.bias is not None else None, f.cols, f.rows,
                   act_scale, alpha, u_mode)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        W = self.weight.float()
        C, R = W[:, self.col_indices], W[self.row_indices, :]
        if self.u_mode == "act_weighted" and self.scale_diag is not None:
            U = torch.linalg.pinv(C) @ (W * self.scale_diag) @ torch.linalg.pinv(R * self.scale_diag)
        else:
            U = torch.linalg.pinv(C) @ W @ torch.linalg.pinv(R)
        return C, U, R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C, U, R = (t.to(x.dtype) for t in self.factors())
        y = nn.functional.linear(nn.functional.linear(nn.functional.linear(x, R), U), C)
        return y + self.bias if self.bias is not None else y
