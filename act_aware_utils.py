"""Per-input-channel activation statistics s of every compressed linear, from calibration data.

abs_mean:        mean |x_j| over calibration tokens (ASVD's default)
abs_max:         max |x_j|
fisher:          sqrt(mean over rows and batches of (dL/dW_ij)^2): gradient sensitivity of column j
fisher_abs_mean: fisher * abs_mean
The scales are returned as a plain dict {layer name: fp32 tensor (in_features,)} and cached.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from modules.model_utils import (LinearInfo, capture_block_inputs, clone_module, decoder_parts, has_offload, input_device,
                                 run_block)

SCALING_METHODS = ("abs_mean", "abs_max", "fisher", "fisher_abs_mean")


def _batches(ids: torch.Tensor, batch_size: int):
    for i in range(0, ids.shape[0], batch_size):
        yield ids[i:i + batch_size]


@torch.no_grad()
def activation_stats(model: nn.Module, linears: list[LinearInfo], calib_ids: torch.Tensor,
                     batch_size: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """abs_mean and abs_max of every linear's input, in one pass over the calibration data."""
    device = input_device(model)
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
    if has_offload(model):  # the gradient would land on the tensor the hook loaded, not on .weight
        raise ValueError("weight-gradient statistics need every weight on a device, not offloaded")
    device = input_device(model)
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
    """Sigma = E[x x^T] (fp32, n x n, on the CPU) of every linear's input.

    Computed block by block from cached block inputs, so the GPU holds one block's accumulators at a
    time (a 7B model's covariances are ~44 GB in fp64: they go to the CPU as each block finishes).
    Linears fed the very same input tensor (q/k/v, gate/up) share one accumulator and one result
    tensor, which cuts time and memory (and cache size: torch.save stores a shared tensor once)."""
    parts = decoder_parts(model)
    device = input_device(model)
    batches = [calib_ids[i:i + batch_size].to(device) for i in range(0, calib_ids.shape[0], batch_size)]
    if parts is None:  # unknown layout: one pass over the whole model
        return _covariances_of(lambda: [model(b, use_cache=False) for b in batches], linears)
    hidden, kwargs = capture_block_inputs(model, parts.layers, batches)
    out: dict[str, torch.Tensor] = {}
    for b, block in enumerate(tqdm(parts.layers, desc="input covariances")):
        infos = [i for i in linears if i.block == b]

        def run(b=b, block=block):
            for j in range(len(batches)):
                hidden[j] = run_block(block, hidden[j], kwargs[j][b])
        out.update(_covariances_of(run, infos))
    heads = [i for i in linears if i.block < 0]
    if heads:
        out.update(_covariances_of(lambda: [_apply(parts.head_modules, h) for h in hidden], heads))
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        print(f"WARNING: non-finite input covariance in {len(bad)} layers (e.g. {bad[0]}); their "
              "data-aware fits fall back to Frobenius and the results will record it")
    return out


def _covariances_of(run: Callable[[], object], linears: list[LinearInfo]) -> dict[str, torch.Tensor]:
    """E[x x^T] of the given linears' inputs over whatever `run()` feeds them (shared inputs once)."""
    acc: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    owner: dict[str, str] = {}        # linear -> linear whose accumulator it shares
    seen: list[tuple[torch.Tensor, str]] = []  # inputs of the current call
    if not linears:
        run()
        return {}

    def make_hook(name):
        def hook(_mod, inputs, _out):
            x = inputs[0]
            src = next((o for t, o in seen if t is x), None)
            if name not in owner:
                owner[name] = src if src is not None else name
            if owner[name] != name:
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

    first = linears[0].module
    clear = first.register_forward_pre_hook(lambda *_: seen.clear())  # each call starts a new input
    hooks = [info.module.register_forward_hook(make_hook(info.name)) for info in linears]
    try:
        run()
    finally:
        seen.clear()
        clear.remove()
        for h in hooks:
            h.remove()
    result = {name: (acc[name] / counts[name]).float().cpu() for name in acc}
    return {info.name: result[owner[info.name]] for info in linears if info.name in owner}


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module):
    """Recompute each decoder block in the backward pass instead of keeping its activations
    (torch.utils.checkpoint, non-reentrant): a backward over a 2048-token sequence then holds the
    block inputs plus one block's activations, not every block's (7B: ~9 GiB less). Gradients are
    the same; hooks on the first forward see the outputs the backward flows through. Models of an
    unknown layout run unchanged."""
    parts = decoder_parts(model)
    layers = list(parts.layers) if parts is not None else []
    # an instance-level forward (accelerate's hook wrapper under a device_map) is wrapped, then put back
    previous = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        def forward(*args, _f=layer.forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_f, *args, use_reentrant=False, **kwargs)
        layer.forward = forward
    try:
        yield
    finally:
        for layer, prev in zip(layers, previous):
            if prev is None:
                del layer.forward
            else:
                layer.forward = prev


def output_fisher(model: nn.Module, linears: list[LinearInfo], calib_ids: torch.Tensor,
                  batch_size: int = 1, checkpoint: bool = True) -> dict[str, torch.Tensor]:
    """g_i = E_t[(dL/dy_{t,i})^2] for every output i of every linear (fp32, out_features), L = the
    summed next-token NLL, from one backward pass over the calibration data.

    Why: by a second-order expansion with the empirical Fisher, a perturbation dy of a layer's
    output raises the mean NLL by about 1/2 sum_i g_i E[dy_i^2]; weighting each output's error by
    g_i puts every layer's output error in the same unit (nats), so one budget can be split across
    layers (binary_search.allocate) and a row ID keeps the rows the loss needs most. Weights are not
    differentiated: only activations carry gradients (no weight-gradient memory); checkpoint: blocks
    are recomputed in the backward (checkpointed_blocks), so memory is the model plus one block."""
    device = input_device(model)
    acc = {info.name: torch.zeros(info.module.out_features, device=device) for info in linears}
    count = [0]
    hooks, req = [], {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    def make_hook(name):
        def hook(_mod, _inputs, out):
            def grad_hook(g):
                acc[name].add_(g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0).to(acc[name].device))  # grad unchanged
            if out.requires_grad:
                out.register_hook(grad_hook)
        return hook

    def embed_hook(_mod, _inputs, out):
        return out.requires_grad_(True)  # the graph starts here: weights stay frozen

    hooks.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    hooks += [info.module.register_forward_hook(make_hook(info.name)) for info in linears]
    try:
        with torch.enable_grad(), (checkpointed_blocks(model) if checkpoint else contextlib.nullcontext()):
            for batch in tqdm(list(_batches(calib_ids, batch_size)), desc="output fisher"):
                batch = batch.to(device)
                logits = model(batch, use_cache=False).logits[:, :-1].float()
                nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  batch[:, 1:].reshape(-1), reduction="sum")
                nll.backward()
                count[0] += batch.numel()  # g is per token of the layer outputs, like the covariances
                del logits, nll
    finally:
        for h in hooks:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
    return {name: (a / max(count[0], 1)).cpu() for name, a in acc.items()}


def finite_fisher(fisher: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(fisher with every non-finite layer's weights set to 1, those layers): the layers whose outputs
    are then weighted uniformly, for the run to record. output_fisher returns (and caches) what it measured."""
    bad = [k for k, v in fisher.items() if not torch.isfinite(v).all()]
    return {k: torch.ones_like(v) if k in bad else v for k, v in fisher.items()}, bad


GroupFit = Callable[[list[LinearInfo], dict[str, dict]], None]


class _Captured(Exception):
    pass


def _group_by_input(block: nn.Module, infos: list[LinearInfo], h: torch.Tensor, kwargs: dict) -> list[list[LinearInfo]]:
    """The block's linears in execution order, grouped by the input tensor they share (q/k/v, gate/up)."""
    seen: list[tuple[torch.Tensor, list[LinearInfo]]] = []

    def make_hook(info):
        def hook(_mod, inputs):
            x = inputs[0]
            for t, group in seen:
                if t is x:
                    group.append(info)
                    return
            seen.append((x, [info]))
        return hook

    hooks = [i.module.register_forward_pre_hook(make_hook(i)) for i in infos]
    try:
        run_block(block, h, kwargs)
    finally:
        for hk in hooks:
            hk.remove()
    return [g for _, g in seen]


def _capture_input(block: nn.Module, module: nn.Module, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input `module` receives when `block` runs on h (the block stops right there)."""
    got: list[torch.Tensor] = []

    def hook(_mod, inputs):
        got.append(inputs[0].detach())
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        run_block(block, h, kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    return got[0].reshape(-1, got[0].shape[-1]).float()


@torch.no_grad()
def sequential_calibration(model: nn.Module, linears: list[LinearInfo], calib_ids: torch.Tensor,
                           batch_size: int, fit_group: GroupFit, desc: str = "sequential calibration",
                           cross: bool = True) -> None:
    """Compress block by block, fitting every linear on the inputs the already-compressed model gives it.

    Errors compound through depth when each layer is fitted to the dense model's inputs; here (as
    GPTQ does for quantization) block b's linears are fitted, group by group in execution order
    (a group = the linears that share one input), on x~ = the input the compressed blocks before them
    produce. fit_group(group, stats) replaces the group's modules; stats[name] = {"cov": E[x~ x~^T],
    "cross": E[x x~^T] against the dense model's own input x at the same tokens (None when
    cross=False), "n_tokens": N} in fp64. With cross, two streams of hidden states (dense, compressed)
    advance block by block and each group costs two partial block passes per batch; without it (a
    method that does not read the cross term) only the compressed stream runs: no dense copy of the
    block, half the passes. lm_head (block -1) is fitted last, on the final norm's output."""
    parts = decoder_parts(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__}: sequential calibration needs a known decoder layout")
    device = input_device(model)
    batches = [calib_ids[i:i + batch_size].to(device) for i in range(0, calib_ids.shape[0], batch_size)]
    h_c, kwargs = capture_block_inputs(model, parts.layers, batches)
    h_d = [h.clone() for h in h_c] if cross else None
    for b, block in enumerate(tqdm(parts.layers, desc=desc)):
        infos = [i for i in linears if i.block == b]
        dense_block = clone_module(block) if infos and cross else block  # offloaded: same dense storage
        if infos:
            twin = {id(m): name for name, m in block.named_modules()}
            dense_of = dict(dense_block.named_modules())
            for group in _group_by_input(block, infos, h_c[0], kwargs[0][b]):
                cov = xcov = None
                n = 0
                for j in range(len(batches)):
                    x_c = _capture_input(block, group[0].module, h_c[j], kwargs[j][b])
                    c = (x_c.T @ x_c).double()
                    cov = c if cov is None else cov + c
                    if cross:
                        x_d = _capture_input(dense_block, dense_of[twin[id(group[0].module)]], h_d[j], kwargs[j][b])
                        x = (x_d.T @ x_c).double()
                        xcov = x if xcov is None else xcov + x
                    n += x_c.shape[0]
                stats = {"cov": cov / n, "cross": xcov / n if cross else None, "n_tokens": n}
                fit_group(group, {i.name: stats for i in group})
        for j in range(len(batches)):
            if cross:
                h_d[j] = run_block(dense_block, h_d[j], kwargs[j][b])
            h_c[j] = run_block(block, h_c[j], kwargs[j][b])
        del dense_block
    heads = [i for i in linears if i.block < 0]
    if heads:
        pre = parts.head_modules[:-1]  # final norm (+ projection) before lm_head
        x_c = torch.cat([_apply(pre, h) for h in h_c]).reshape(-1, h_c[0].shape[-1]).float()
        xcov = None
        if cross:
            x_d = torch.cat([_apply(pre, h) for h in h_d]).reshape(-1, h_d[0].shape[-1]).float()
            xcov = (x_d.T @ x_c).double() / x_c.shape[0]
        stats = {"cov": (x_c.T @ x_c).double() / x_c.shape[0], "cross": xcov, "n_tokens": x_c.shape[0]}
        fit_group(heads, {i.name: stats for i in heads})


def _apply(mods: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    for m in mods:
        h = m(h)
    return h
