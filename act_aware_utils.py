"""Per-input-channel activation statistics s of every compressed linear, from calibration data.

abs_mean:        mean |x_j| over calibration tokens (ASVD's default)
abs_max:         max |x_j|
fisher:          sqrt(mean over rows and batches of (dL/dW_ij)^2): gradient sensitivity of column j
fisher_abs_mean: fisher * abs_mean
The scales are returned as a plain dict {layer name: fp32 tensor (in_features,)} and cached.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from modules.model_utils import LinearInfo

SCALING_METHODS = ("abs_mean", "abs_max", "fisher", "fisher_abs_mean")


def _batches(ids: torch.Tensor, batch_size: int):
    for i in range(0, ids.shape[0], batch_size):
        yield ids[i:i + batch_size]


@torch.no_grad()
def activation_stats(model: nn.Module, linears: list[LinearInfo], calib_ids: torch.Tensor,
                     batch_size: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """abs_mean and abs_max of every linear's input, in one pass over the calibration data."""
    device = next(model.parameters()).device
    sums, maxes, counts, hooks = {}, {}, {}, []

    def make_hook(name):
        def hook(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().abs()
            s, mx = x.sum(0), x.amax(0)
            if name in sums:
                sums[name] += s
                maxes[name] = torch.maximum(maxes[name], mx)
                counts[name] += x.shape[0]
            else:
                sums[name], maxes[name], counts[name] = s, mx, x.shape[0]
        return hook

    for info in linears:
        hooks.append(info.module.register_forward_hook(make_hook(info.name)))
    try:
        for batch in tqdm(list(_batches(calib_ids, batch_size)), desc="activation statistics"):
            model(batch.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: {"abs_mean": (sums[name] / counts[name]).cpu(), "abs_max": maxes[name].cpu()}
            for name in sums}


def fisher_stats(model: nn.Module, linears: list[LinearInfo], calib_ids: torch.Tensor,
                 batch_size: int = 1) -> dict[str, torch.Tensor]:
    """sqrt of the mean squared weight gradient per input column (empirical Fisher diagonal)."""
    device = next(model.parameters()).device
    acc = {info.name: torch.zeros(info.module.in_features, device=device) for info in linears}
    was_training = model.training
    model.eval()
    weights = {info.name: info.module.weight for info in linears}
    req = {name: w.requires_grad for name, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    n = 0
    try:
        for batch in tqdm(list(_batches(calib_ids, batch_size)), desc="fisher statistics"):
            batch = batch.to(device)
            model.zero_grad(set_to_none=True)
            out = model(batch, labels=batch, use_cache=False)
            out.loss.backward()
            for name, w in weights.items():
                acc[name] += w.grad.float().pow(2).mean(0)
            n += 1
    finally:
        model.zero_grad(set_to_none=True)
        for name, w in weights.items():
            w.requires_grad_(req[name])
        model.train(was_training)
    return {name: (a / max(n, 1)).sqrt().cpu() for name, a in acc.items()}


def calib_scales(model: nn.Module, linears: list[LinearInfo], calib_ids: torch.Tensor,
                 method: str, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """The statistic `method` for every linear. Warns loudly if a statistic is not finite."""
    if method not in SCALING_METHODS:
        raise ValueError(f"unknown scaling method {method!r}; choose from {SCALING_METHODS}")
    stats = activation_stats(model, linears, calib_ids, batch_size) if method != "fisher" else {}
    if method in ("abs_mean", "abs_max"):
        scales = {k: v[method] for k, v in stats.items()}
    else:
        fisher = fisher_stats(model, linears, calib_ids, batch_size)
        scales = fisher if method == "fisher" else {k: fisher[k] * stats[k]["abs_mean"] for k in fisher}
    bad = [k for k, v in scales.items() if not torch.isfinite(v).all()]
    if bad:
        print(f"WARNING: non-finite activation statistics in {len(bad)} layers (e.g. {bad[0]}); "
              "their CUR selection will fall back to uniform and the results will record it")
    return scales


@torch.no_grad()
def input_covariances(model: nn.Module, linears: list[LinearInfo], calib_ids: torch.Tensor,
                      batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Sigma = E[x x^T] (fp32, n x n) of every linear's input, in one pass over the calibration data.

    Linears fed the very same input tensor (q/k/v, gate/up) share one accumulator and one result
    tensor, which cuts time and memory (and cache size: torch.save stores a shared tensor once)."""
    device = next(model.parameters()).device
    acc: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    owner: dict[str, str] = {}        # linear -> linear whose accumulator it shares
    seen: list[tuple[torch.Tensor, str]] = []  # inputs of the current forward pass
    first_pass = [True]

    def make_hook(name):
        def hook(_mod, inputs, _out):
            x = inputs[0]
            src = next((o for t, o in seen if t is x), None)
            if first_pass[0]:
                if src is not None:
                    owner[name] = src
                    return
                owner[name] = name
            elif owner.get(name, name) != name:
                if src != owner[name]:
                    raise RuntimeError(f"{name}: input sharing changed between calibration batches; "
                                       "cannot reuse the shared covariance")
                return
            seen.append((x, name))
            del seen[:-4]  # sharing happens between consecutive calls; keep memory small
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            cov = (flat.T @ flat).double()
            if name in acc:
                acc[name] += cov
                counts[name] += flat.shape[0]
            else:
                acc[name], counts[name] = cov, flat.shape[0]
        return hook

    hooks = [info.module.register_forward_hook(make_hook(info.name)) for info in linears]
    try:
        for batch in tqdm(list(_batches(calib_ids, batch_size)), desc="input covariances"):
            seen.clear()
            model(batch.to(device), use_cache=False)
            first_pass[0] = False
    finally:
        seen.clear()
        for h in hooks:
            h.remove()
    result = {name: (acc[name] / counts[name]).float().cpu() for name in acc}
    out = {info.name: result[owner[info.name]] for info in linears if info.name in owner}
    bad = [k for k, v in result.items() if not torch.isfinite(v).all()]
    if bad:
        print(f"WARNING: non-finite input covariance in {len(bad)} layers (e.g. {bad[0]}); their "
              "data-aware fits fall back to Frobenius and the results will record it")
    return out
