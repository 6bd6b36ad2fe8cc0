"""KV-cache mode of acur.py (--compress_kv_cache): sensitivity of every k_proj / v_proj over rank fractions
of its width, CUR compression at the chosen ranks, and the cache bytes-per-token report.

The runtime that caches the latents (and is copied into exported repos) is modules/kv_cache.py; the rank
arithmetic is modules/kv_ranks.py; this stage script holds what needs the pipeline (sensitivity,
evaluation), so the runtime never imports it.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

import sensitivity as sens
from datautils import UsageError
from evaluate_utils import perplexity_of_windows
from modules.cur_linear import CURLinear
from modules.cur_math import cur_decompose, safe_svd, scaled_weight
from modules.kv_cache import (LOWRANK_KV_FORMAT, LowRankKVAttention, decoder_layers_and_rotary,
                               enable_lowrank_kv_cache, latent_factors)
from modules.kv_ranks import KV_PROJ_NAMES, KV_RANK_FRACTIONS, is_kv_linear, kv_cached_dims, kv_rank  # noqa: F401
from modules.model_utils import replace_module


def kv_sensitivity_ppl(model: nn.Module, linears: list, calib_ids: torch.Tensor, fractions: list[float],
                       scales: dict | None, alpha: float, cur_kwargs: dict, batch_size: int = 4,
                       done: dict | None = None, on_progress=None) -> dict[str, dict[str, float]]:
    """{k/v layer: {rank fraction: calibration ppl}} with that one projection at that rank (ASVD's KV
    protocol). Runs only the blocks at and after the layer (sensitivity.BlockRunner, exact)."""
    results = dict(done or {})
    todo = [i for i in linears if i.name not in results]
    if not todo:
        return results
    try:
        runner = sens.BlockRunner(model, calib_ids, batch_size)
    except ValueError:
        runner = None
        print("WARNING: unknown model layout; KV sensitivity uses full forward passes (slower, same result)")
    for info in tqdm(todo, desc="KV sensitivity (ppl)"):
        scale = scales.get(info.name) if scales else None
        original = info.module
        m, n = original.weight.shape
        svd = safe_svd(scaled_weight(original.weight.data, scale, alpha))
        if runner is not None:
            runner.advance_to(info.block)
        row = {}
        try:
            for f in fractions:
                replace_module(info, _cur_at_rank(original, kv_rank(m, n, f, cur_kwargs["rank_align"]), scale,
                                                  alpha, cur_kwargs, svd))
                row[sens.ratio_key(f)] = (runner.tail_ppl() if runner is not None else
                                          perplexity_of_windows(model, calib_ids, batch_size, desc=None))
        finally:
            replace_module(info, original)
        results[info.name] = row
        if on_progress is not None:
            on_progress(results)
    return results

def kv_sensitivity_stable_rank(linears: list, fractions: list[float], scales: dict | None, alpha: float,
                               done: dict | None = None, on_progress=None) -> dict[str, dict[str, float]]:
    """(1 - f) * stable_rank(W S) / min(m, n) per rank fraction f: no forward passes."""
    return sens.sensitivity_stable_rank(linears, fractions, scales, alpha, done=done, on_progress=on_progress)

def kv_sensitivity_spectral(linears: list, fractions: list[float], scales: dict | None, alpha: float,
                            rank_align: int = 1, done: dict | None = None, on_progress=None) -> dict[str, dict[str, float]]:
    """Tail energy of the scaled spectrum beyond the KV rank of each fraction: sum_{i>k} s_i^2 / sum s_i^2 of
    W S (the best rank-k error, a lower bound of CUR's); no forward passes, one SVD per layer. Non-finite
    weights score 1 (most sensitive), with a warning."""
    results = dict(done or {})
    for info in tqdm([i for i in linears if i.name not in results], desc="KV sensitivity (spectral)"):
        w = scaled_weight(info.module.weight.data, scales.get(info.name) if scales else None, alpha)
        m, n = w.shape
        if torch.isfinite(w).all():
            e = torch.linalg.svdvals(w.double()).pow(2)
            tail = e.flip(0).cumsum(0).flip(0) / e.sum().clamp_min(1e-300)  # tail[k] = sum_{i>=k} / total
            tail = torch.cat([tail, tail.new_zeros(1)])
            row = {sens.ratio_key(f): float(tail[kv_rank(m, n, f, rank_align)]) for f in fractions}
        else:
            print(f"WARNING: {info.name}: non-finite scaled weight; scored as maximally sensitive")
            row = {sens.ratio_key(f): 1.0 for f in fractions}
        results[info.name] = row
        if on_progress is not None:
            on_progress(results)
    return results

def kv_sensitivity_fisher_error(linears: list, fractions: list[float], stats: dict, alpha: float,
                                cur_kwargs: dict, done: dict | None = None, on_progress=None) -> dict[str, dict[str, float]]:
    """Predicted NLL rise (sensitivity.layer_loss: output error weighted by the output fisher) of each k/v
    projection's CUR at every rank fraction; no forward passes. Additive, so binary_search allocates the
    cached dims on it (search_kv_ratio_allocated)."""
    results = dict(done or {})
    for info in tqdm([i for i in linears if i.name not in results], desc="KV sensitivity (fisher error)"):
        st = stats[info.name]
        W = info.module.weight.data
        m, n = W.shape
        if st.cov is None or not torch.isfinite(st.cov).all():
            print(f"WARNING: {info.name}: no finite input covariance; scored as maximally sensitive")
            results[info.name] = {sens.ratio_key(f): math.inf for f in fractions}
        else:
            scale = st.scale.to(W.device) if st.scale is not None else None
            svd = safe_svd(scaled_weight(W, scale, alpha))
            cov = st.cov.to(W.device).float()
            g = st.row_weight.to(W.device) if st.row_weight is not None else None
            results[info.name] = {
                sens.ratio_key(f): sens.layer_loss(W, _cur_at_rank(info.module, kv_rank(m, n, f, cur_kwargs.get(
                    "rank_align", 1)), scale, alpha, cur_kwargs, svd=svd).dense_weight(), cov, g)
                for f in fractions}
        if on_progress is not None:
            on_progress(results)
    return results

def kv_sensitivity(metric: str, model: nn.Module, linears: list, calib_ids: torch.Tensor, fractions: list[float],
                   scales: dict | None, stats: dict | None, alpha: float, cur_kwargs: dict, batch_size: int = 4,
                   done: dict | None = None, on_progress=None) -> dict[str, dict[str, float]]:
    """The KV-mode table of one --sensitivity_metric over rank fractions of the K/V width. cur_kwargs: the
    CUR options (rank_align, selection, u_mode)."""
    if metric == "ppl":
        return kv_sensitivity_ppl(model, linears, calib_ids, fractions, scales, alpha, cur_kwargs, batch_size,
                                  done, on_progress)
    if metric == "spectral":
        return kv_sensitivity_spectral(linears, fractions, scales, alpha, cur_kwargs["rank_align"], done, on_progress)
    if metric == "fisher_error":
        return kv_sensitivity_fisher_error(linears, fractions, stats, alpha, cur_kwargs, done, on_progress)
    if metric == "stable_rank":
        return kv_sensitivity_stable_rank(linears, fractions, scales, alpha, done, on_progress)
    raise UsageError(f"--sensitivity_metric {metric} has no KV-mode form (use ppl, spectral or stable_rank)")

def _cur_at_rank(linear: nn.Linear, rank: int, scale, alpha: float, cur_kwargs: dict, svd=None,
                 generator: torch.Generator | None = None) -> CURLinear:
    W = linear.weight.data
    factors = cur_decompose(W, rank, scale=scale, alpha=alpha, selection=cur_kwargs.get("selection", "topk"),
                            u_mode=cur_kwargs.get("u_mode", "pinv"), svd=svd, generator=generator)
    bias = linear.bias.data if linear.bias is not None else None
    return CURLinear.from_factors(factors, bias, W.dtype, W.device)

def compress_kv_linears(linears: list, fractions: dict[str, float], scales: dict | None, alpha: float,
                        cur_kwargs: dict, seed: int = 0, desc: str | None = "CUR replacement (KV)") -> dict[str, dict]:
    """Replace every k/v projection whose fraction is below 1 by its CURLinear at kv_rank; per-layer
    report in acur.compress_model's format plus `cached_dims`."""
    gen = torch.Generator().manual_seed(seed)
    report = {}
    for info in tqdm(linears, desc=desc, disable=desc is None):
        m, n = info.module.weight.shape
        f = fractions.get(info.name, 1.0)
        row = {"ratio": f, "shape": [m, n], "params_dense": m * n, "rank": None, "params": m * n,
               "fallback": "", "cached_dims": m}
        if f < 1:
            k = kv_rank(m, n, f, cur_kwargs.get("rank_align", 1))
            cur = _cur_at_rank(info.module, k, scales.get(info.name) if scales else None, alpha, cur_kwargs,
                               generator=gen)
            row.update(rank=cur.rank, params=cur.param_count(), fallback=cur.fallback, cached_dims=cur.rank)
            if cur.fallback:
                print(f"WARNING: {info.name}: {cur.fallback}")
            replace_module(info, cur)
        report[info.name] = row
    return report

def check_kv_support(model: nn.Module) -> None:
    """Raise ValueError (one line) when the model's attention cannot carry a low-rank KV cache."""
    layers, rotary = decoder_layers_and_rotary(model)
    attn = layers[0].self_attn
    LowRankKVAttention(attn, rotary)  # raises for unsupported layouts
    for name in KV_PROJ_NAMES:
        if not isinstance(getattr(attn, name, None), nn.Linear):
            raise ValueError(f"{type(attn).__name__}.{name} is not an nn.Linear")

def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None) -> dict:
    """Expected cache bytes per token, from the layer shapes and ranks (what `cache_nbytes` must measure).

    dense: K and V of every block at full width. compressed: the cached widths (latent rank of a low-rank
    side) plus 4 bytes (int32 position) per block whose K is low-rank under RoPE."""
    layers, _ = decoder_layers_and_rotary(model)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    elt = torch.tensor([], dtype=dtype).element_size()
    pos = dims_dense = dims_cached = 0
    for block in layers:
        attn = block.self_attn
        wrapped = isinstance(attn, LowRankKVAttention)  # unwrapped blocks cache full K and V
        for name in KV_PROJ_NAMES:
            proj = getattr(attn, name)
            f = latent_factors(proj) if wrapped else None
            width = proj.out_features
            dims_dense += width
            dims_cached += f[1].shape[1] if f is not None else width
            if name == "k_proj" and f is not None and attn.style == "llama":
                pos += 4
    dense, cached = dims_dense * elt, dims_cached * elt + pos
    return {"dense": dense, "compressed": cached, "positions": pos, "dims_dense": dims_dense,
            "dims_cached": dims_cached, "ratio": dims_cached / dims_dense, "dtype": str(dtype).replace("torch.", "")}

def enable_kv_cache(model: nn.Module, ratio_target: float) -> dict:
    """Switch attention to the low-rank cache (modules/kv_cache.py); report what it holds per token."""
    blocks = enable_lowrank_kv_cache(model)
    b = kv_bytes_per_token(model)
    return {"ratio_target": ratio_target, "reached": b["ratio"], "dims_dense": b["dims_dense"],
            "dims_cached": b["dims_cached"], "bytes_per_token_dense": b["dense"],
            "bytes_per_token_compressed": b["compressed"], "bytes_per_token_positions": b["positions"],
            "dtype": b["dtype"], "lowrank_blocks": len(blocks), "format": LOWRANK_KV_FORMAT}
