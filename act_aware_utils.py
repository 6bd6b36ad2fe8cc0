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

from modules.decompositions import all_finite
from modules.model_utils import (LinearInfo, capture_block_inputs, clone_module, decoder_parts, has_offload, input_device,
                                 replaced_forwards, run_block)

SCALING_METHODS = ("abs_mean", "abs_max", "fisher", "fisher_abs_mean")


def _batches(ids: torch.Tensor, batch_size: int):
    for i in range(0, ids.shape[0], batch_size):
        yield ids[i:i + batch_size]


class AbsStats:
    """Running sums, maxima and token counts of |x| over the inputs of some linears (forward hooks):
    the one accumulator of activation_stats and of the streamed pipeline's per-block statistics."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.maxes: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def _hook(self, name):
        def hook(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().abs()
            s, mx = x.sum(0), x.amax(0)
            if name in self.sums:
                self.sums[name] += s
                self.maxes[name] = torch.maximum(self.maxes[name], mx)
                self.counts[name] += x.shape[0]
            else:
                self.sums[name], self.maxes[name], self.counts[name] = s, mx, x.shape[0]
        return hook

    @contextlib.contextmanager
    def watching(self, linears: list[LinearInfo]):
        """Accumulate while the block is open."""
        hooks = [info.module.register_forward_hook(self._hook(info.name)) for info in linears]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    def result(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {"abs_mean": (self.sums[name] / self.counts[name]).cpu(), "abs_max": self.maxes[name].cpu()}
                for name in self.sums}


@torch.no_grad()
def activation_stats(model: nn.Module, linears: list[LinearInfo], calib_ids: torch.Tensor,
                     batch_size: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """abs_mean and abs_max of every linear's input, in one pass over the calibration data."""
    device = input_device(model)
    acc = AbsStats()
    with acc.watching(linears):
        for batch in tqdm(list(_batches(calib_ids, batch_size)), desc="activation statistics"):
            model(batch.to(device), use_cache=False)
    return acc.result()


@torch.no_grad()
def block_activation_stats(block: nn.Module, linears: list[LinearInfo], hidden: list[torch.Tensor],
                           block_kwargs: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """activation_stats of one block's linears, running the block on every batch's hidden state (advanced
    in place to the block's output): what the whole-model pass measures there, one block at a time."""
    acc = AbsStats()
    with acc.watching(linears):
        for j in range(len(hidden)):
            hidden[j] = run_block(block, hidden[j], block_kwargs[j])
    return acc.result()


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
    fisher = fisher_stats(model, linears, calib_ids, batch_size) if method in ("fisher", "fisher_abs_mean") else None
    return scales_of(stats, method, fisher)


def scales_of(stats: dict[str, dict[str, torch.Tensor]], method: str,
              fisher: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The scaling statistic `method` from activation_stats' (and fisher_stats') results; one warning
    naming the layers whose statistic is not finite."""
    if method in ("abs_mean", "abs_max"):
        scales = {k: v[method] for k, v in stats.items()}
    else:
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
        out.update(block_covariances(block, [i for i in linears if i.block == b], hidden,
                                     [kw[b] for kw in kwargs], warn=False))
    heads = [i for i in linears if i.block < 0]
    if heads:
        out.update(_covariances_of(lambda: [_apply(parts.head_modules, h) for h in hidden], heads))
    warn_non_finite_covariances(out)
    return out


def block_covariances(block: nn.Module, linears: list[LinearInfo], hidden: list[torch.Tensor],
                      block_kwargs: list[dict], warn: bool = True, on_device: bool = False) -> dict[str, torch.Tensor]:
    """input_covariances of one block's linears, running the block on every batch's hidden state
    (advanced in place to the block's output): the in-memory pass's step, and the streamed one's.
    on_device: the fp32 results stay where they were summed (the streamed passes use one block's
    covariances at once and then drop them: a trip to the host and back is 8 GB of copies a 70B block);
    the same values as on the host."""
    def run():
        for j in range(len(hidden)):
            hidden[j] = run_block(block, hidden[j], block_kwargs[j])
    out = _covariances_of(run, linears, on_device)
    if warn:
        warn_non_finite_covariances(out)
    return out


def warn_non_finite_covariances(covs: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in covs.items() if not all_finite(v)]
    if bad:
        print(f"WARNING: non-finite input covariance in {len(bad)} layers (e.g. {bad[0]}); their "
              "data-aware fits fall back to Frobenius and the results will record it")


def _covariances_of(run: Callable[[], object], linears: list[LinearInfo],
                    on_device: bool = False) -> dict[str, torch.Tensor]:
    """E[x x^T] (fp32; on the host unless on_device) of the given linears' inputs over whatever `run()` feeds
    them (shared inputs once)."""
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
            acc[name] = _add_product(acc.get(name), flat, flat)
            counts[name] = counts.get(name, 0) + flat.shape[0]
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
    result = {name: (acc[name] / counts[name]).float() for name in acc}
    if not on_device:
        result = {name: c.cpu() for name, c in result.items()}
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

    def checkpointed(f: Callable) -> Callable:  # f: the layer's forward, accelerate's hook wrapper included
        return lambda *args, **kwargs: torch.utils.checkpoint.checkpoint(f, *args, use_reentrant=False, **kwargs)
    with replaced_forwards(layers, checkpointed):
        yield


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

    def embed_hook(_mod, _inputs, out):
        return out.requires_grad_(True)  # the graph starts here: weights stay frozen

    hooks.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    try:
        with torch.enable_grad(), (checkpointed_blocks(model) if checkpoint else contextlib.nullcontext()), \
                fisher_hooks(linears, acc):
            for batch in tqdm(list(_batches(calib_ids, batch_size)), desc="output fisher"):
                batch = batch.to(device)
                logits = model(batch, use_cache=False).logits[:, :-1].float()
                nll = summed_nll(logits, batch)
                nll.backward()
                count[0] += batch.numel()  # g is per token of the layer outputs, like the covariances
                del logits, nll
    finally:
        for h in hooks:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
    return {name: (a / max(count[0], 1)).cpu() for name, a in acc.items()}


def summed_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of (already shifted, fp32) logits: the loss output_fisher differentiates."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum")


@contextlib.contextmanager
def fisher_hooks(linears: list[LinearInfo], acc: dict[str, torch.Tensor]):
    """While open, every backward through a linear's output adds sum_t (dL/dy_t)^2 to acc[name]
    (the gradient itself unchanged): output_fisher's accumulator, whole-model or block by block."""
    def make_hook(name):
        def hook(_mod, _inputs, out):
            def grad_hook(g):
                acc[name].add_(g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0).to(acc[name].device))
            if out.requires_grad:
                out.register_hook(grad_hook)
        return hook

    hooks = [info.module.register_forward_hook(make_hook(info.name)) for info in linears]
    try:
        yield acc
    finally:
        for h in hooks:
            h.remove()


def head_output_grads(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                      batch: torch.Tensor) -> torch.Tensor:
    """dL/dh of output_fisher's loss (summed next-token NLL) at the last block's output h: where the
    streamed reverse pass starts. head: final norm .. lm_head (frozen)."""
    x = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = head(x)[:, :-1].float()
        summed_nll(logits, batch.to(logits.device)).backward()
    return x.grad.detach()


def block_output_fisher(block: nn.Module, linears: list[LinearInfo], acc: dict[str, torch.Tensor],
                        hidden: torch.Tensor, grad_out: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One step of the streamed reverse pass: recompute the block on its stored input `hidden`, backward
    from dL/d(output) = grad_out, add every linear's output fisher sums to acc (fisher_hooks), and return
    dL/d(input) for the block before it. The same gradients as output_fisher's checkpointed backward
    (which recomputes each block the same way); weights stay frozen."""
    x = hidden.detach().requires_grad_(True)
    with torch.enable_grad(), fisher_hooks(linears, acc):
        out = run_block(block, x, kwargs)
        out.backward(grad_out)
    return x.grad.detach()


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
    cross=False), "n_tokens": N, "mean": E[x~], "mean_dense": E[x] (None when cross=False)} in fp64
    (the means: for fits with an intercept, whose moments are centred). With cross, two streams of hidden states (dense, compressed)
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
        calibrate_block(block, [i for i in linears if i.block == b], h_c, h_d, [kw[b] for kw in kwargs], fit_group)
    heads = [i for i in linears if i.block < 0]
    if heads:
        pre = parts.head_modules[:-1]  # final norm (+ projection) before lm_head
        x_c = torch.cat([_apply(pre, h) for h in h_c]).reshape(-1, h_c[0].shape[-1]).float()
        xcov = mean_d = None
        if cross:
            x_d = torch.cat([_apply(pre, h) for h in h_d]).reshape(-1, h_d[0].shape[-1]).float()
            xcov, mean_d = (x_d.T @ x_c).double() / x_c.shape[0], x_d.double().mean(0)
        stats = {"cov": (x_c.T @ x_c).double() / x_c.shape[0], "cross": xcov, "n_tokens": x_c.shape[0],
                 "mean": x_c.double().mean(0), "mean_dense": mean_d}
        fit_group(heads, {i.name: stats for i in heads})


@torch.no_grad()
def calibrate_block(block: nn.Module, infos: list[LinearInfo], h_c: list[torch.Tensor],
                    h_d: list[torch.Tensor] | None, block_kwargs: list[dict], fit_group: GroupFit) -> None:
    """One block of sequential_calibration: fit its linears group by group (fit_group replaces them in
    `block`) on the compressed stream h_c (and, with the dense stream h_d, against the dense inputs), then
    advance both streams in place through the block (h_c through the compressed block, h_d through a dense
    copy). The in-memory walk's step and the streamed pipeline's."""
    cross = h_d is not None
    dense_block = clone_module(block) if infos and cross else block  # offloaded: same dense storage
    if infos:
        twin = {id(m): name for name, m in block.named_modules()}
        dense_of = dict(dense_block.named_modules())
        for group in _group_by_input(block, infos, h_c[0], block_kwargs[0]):
            cov = xcov = s_c = s_d = None
            n = 0
            for j in range(len(h_c)):
                x_c = _capture_input(block, group[0].module, h_c[j], block_kwargs[j])
                cov, s = _add_product(cov, x_c, x_c), x_c.double().sum(0)
                s_c = s if s_c is None else s_c + s
                if cross:
                    x_d = _capture_input(dense_block, dense_of[twin[id(group[0].module)]], h_d[j], block_kwargs[j])
                    xcov, s = _add_product(xcov, x_d, x_c), x_d.double().sum(0)
                    s_d = s if s_d is None else s_d + s
                n += x_c.shape[0]
            stats = {"cov": cov.div_(n), "cross": xcov.div_(n) if cross else None, "n_tokens": n,
                     "mean": s_c / n, "mean_dense": s_d / n if cross else None}
            fit_group(group, {i.name: stats for i in group})
    for j in range(len(h_c)):
        if cross:
            h_d[j] = run_block(dense_block, h_d[j], block_kwargs[j])
        h_c[j] = run_block(block, h_c[j], block_kwargs[j])
    del dense_block


def _add_product(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a^T b with the fp32 product summed into the fp64 acc in place (the first call makes acc): the
    same sums as adding .double() copies, without the copy and a second sum (each is 6.6 GB for a 70B
    down_proj's covariance, where the compress stage peaks)."""
    product = a.T @ b
    return product.double() if acc is None else acc.add_(product)


def _apply(mods: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    for m in mods:
        h = m(h)
    return h
