"""Sensitivity of every compressed linear to every candidate ratio.

ppl:         calibration perplexity with that one layer replaced by its CUR at that ratio (the ASVD
             protocol). The fast path is exact: block inputs are cached and advanced block by block, only
             the blocks at and after the replaced layer run, samples are batched, and one SVD per layer
             serves every candidate ratio; on a GPU the next layer's decompositions run on a side stream
             while this layer's forwards run, each candidate runs as its dense equivalent (C U R
             multiplied out in fp32, written into the layer's own weight: one fp16 GEMM instead of
             three at odd ranks, and the block's compiled graph stays valid), and the blocks run
             through torch.compile (`compile_blocks`; off on CPU). Each of these changes only
             round-off. `fast=False` runs the straightforward full-model loop with the module swapped in.
stable_rank: no forward passes; score = (1 - ratio) * stable_rank(W S) / min(m, n), a cheap heuristic
             (layers whose scaled spectrum is concentrated are compressed first).
Results are plain dicts {layer: {ratio (str): score}}; lower score = safer to compress. Progress is
saved after every layer so an interrupted run resumes where it stopped.

Distributed: when torch.distributed is initialised (torchrun / accelerate launch; gloo on CPU, nccl on
GPU) the ppl loop is split over the ranks (balanced by the blocks each layer runs), every rank computes
its share with its own full model copy, and the shares are all-gathered so every rank returns the
identical table. The ranks first check that they hold the same model, data and settings.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from evaluate_utils import nll_to_ppl, perplexity_of_windows, token_nll_tensor
from modules.low_rank_linear import LayerStats, compress_candidates, prepare_candidates
from modules import decompositions as dec
from modules.cur_math import scaled_weight, stable_rank
from modules import registry
from modules.model_utils import (LinearInfo, capture_block_inputs, decoder_parts, has_offload, input_device,
                                 materialized, replace_module)

METRICS = ("ppl", "fisher_error", "stable_rank", "spectral")
DEFAULT_RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# fisher_error costs no forward pass per candidate: a fine grid lets the allocation place every layer
FINE_RATIOS = tuple(round(0.1 + 0.02 * i, 2) for i in range(45))  # 0.10, 0.12, ..., 0.98


def has_loss_curve(method: str) -> bool:
    """True when fisher_error reads a method's loss at every rank off one factorization (row ID with
    fisher-weighted picks, whitened SVD); other methods are decomposed and measured per candidate."""
    spec = registry.get(method)
    return (spec.form == "rowid" and spec.fisher) or spec.name == "wsvd"


def fisher_error_ratios(method: str) -> tuple[float, ...]:
    """Default candidates of fisher_error: the fine grid where it is free, every third point elsewhere."""
    return FINE_RATIOS if has_loss_curve(method) else FINE_RATIOS[::3]
PREFETCH = 4  # layers whose candidates are decomposed ahead on the GPU's side stream

Progress = Callable[[dict], None]


def ratio_key(r: float) -> str:
    """Ratios are dict keys in JSON: one canonical spelling."""
    return f"{r:.4g}"


class BlockRunner:
    """Runs decoder blocks from cached inputs. Holds, for every calibration batch, the hidden state
    entering the current block and the keyword arguments (masks, rotary embeddings) the model
    passed to each block."""

    def __init__(self, model: nn.Module, calib_ids: torch.Tensor, batch_size: int, compile_blocks: bool = False):
        parts = decoder_parts(model)
        if parts is None:
            raise ValueError("unsupported layout for the fast path")
        self.model, self.layers, self.head = model, parts.layers, parts.head_modules
        # identical blocks share one compiled graph (parameters are graph inputs), so this compiles once
        self.run_layers = [torch.compile(m, dynamic=False) for m in self.layers] if compile_blocks else list(self.layers)
        if compile_blocks:
            import torch._inductor.config as inductor_config
            # no on-device benchmarking of kernel variants: every process (every rank of a distributed
            # run) picks the same kernels, so the tables agree bit for bit
            if hasattr(inductor_config, "deterministic"):
                inductor_config.deterministic = True
        self.compiled = compile_blocks
        self.device = input_device(model)
        self.run_head = torch.compile(self._head_loss, dynamic=False) if compile_blocks else self._head_loss
        self.batches = [calib_ids[i:i + batch_size].to(self.device)
                        for i in range(0, calib_ids.shape[0], batch_size)]
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[list[dict]] = []  # [batch][block]
        self.block = 0
        self._capture()

    def _capture(self) -> None:
        """One embedding pass per batch records block 0's input and every block's kwargs."""
        self.hidden, self.kwargs = capture_block_inputs(self.model, self.layers, self.batches)

    def _guarded(self, compiled: Callable, eager: Callable, *args, **kwargs):
        """compiled(...) while compiling works; on a compiler failure: a loud warning, then eager for good."""
        if not self.compiled:
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # a compiler failure costs speed, never the run
            msg = str(exc).splitlines()[0][:200] if str(exc) else ""
            print(f"WARNING: torch.compile of the decoder blocks failed ({type(exc).__name__}: {msg}); "
                  "sensitivity continues eagerly (same numbers up to round-off, slower)", flush=True)
            self.run_layers, self.run_head, self.compiled = list(self.layers), self._head_loss, False
            return eager(*args, **kwargs)

    def _run_block(self, i: int, h: torch.Tensor, b: int) -> torch.Tensor:
        out = self._guarded(self.run_layers[i], self.layers[i], h, **self.kwargs[b][i])
        return out[0] if isinstance(out, tuple) else out

    def _head_loss(self, h: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        for mod in self.head:
            h = mod(h)
        return token_nll_tensor(h, batch)[0]

    @torch.no_grad()
    def tail_ppl(self) -> float:
        """Calibration perplexity running blocks from the current one to the end, then the head.
        The NLL sums stay on the device; one read per candidate, so the GPU never waits for the host."""
        total, count = None, 0
        for b, batch in enumerate(self.batches):
            h = self.hidden[b]
            for i in range(self.block, len(self.layers)):
                h = self._run_block(i, h, b)
            s = self._guarded(self.run_head, self._head_loss, h, batch)
            total, count = (s.double() if total is None else total + s.double()), count + batch[:, 1:].numel()
        return nll_to_ppl(float(total) / count)

    @torch.no_grad()
    def advance_to(self, block: int) -> None:
        """Move the cached inputs forward (through the unmodified blocks) to `block`."""
        while self.block < block:
            for b in range(len(self.batches)):
                self.hidden[b] = self._run_block(self.block, self.hidden[b], b)
            self.block += 1


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_layers(linears: list[LinearInfo], world: int, n_blocks: int) -> list[list[LinearInfo]]:
    """Split layers over `world` ranks with balanced work: longest-first greedy by cost (the blocks
    a candidate runs, +1 for head and decomposition). Each share keeps execution order, so a rank's
    BlockRunner only moves forward. Deterministic: every rank computes the same split."""
    def cost(info: LinearInfo) -> int:
        return (n_blocks - info.block if info.block >= 0 else 1) + 1

    loads, owner = [0] * world, {}
    for idx in sorted(range(len(linears)), key=lambda i: (-cost(linears[i]), i)):
        rank = min(range(world), key=lambda k: (loads[k], k))
        owner[idx] = rank
        loads[rank] += cost(linears[idx])
    return [[info for i, info in enumerate(linears) if owner[i] == r] for r in range(world)]


def _input_fingerprint(model: nn.Module, calib_ids: torch.Tensor, ratios: list[float],
                       scales: dict | None, alpha: float, cur_kwargs: dict, batch_size: int,
                       fast: bool, todo: list[LinearInfo]) -> list:
    """What every rank must agree on before its share is merged with the others'."""
    with torch.no_grad():
        psum = torch.stack([p.detach().float().sum() for p in model.parameters()]).double().sum()
    ssum = sorted((k, float(v.double().sum())) for k, v in scales.items()) if scales else None
    return [float(psum), list(calib_ids.shape), int(calib_ids.long().sum()), [float(r) for r in ratios],
            ssum, alpha, sorted(cur_kwargs.items()), batch_size, fast, [i.name for i in todo]]


def _check_ranks_agree(fingerprint: list, world: int) -> None:
    gathered: list = [None] * world
    dist.all_gather_object(gathered, fingerprint)
    bad = [r for r, fp in enumerate(gathered) if fp != gathered[0]]
    if bad:
        raise RuntimeError(f"distributed sensitivity: ranks {bad} hold a different model, calibration data "
                           "or settings than rank 0 (load the same checkpoint with the same seed everywhere)")


def dense_equivalent(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a low-rank module applies: its (already rounded) factors multiplied out in fp32."""
    with torch.no_grad():
        return copy.deepcopy(module).float().dense_weight().to(dtype)


def decompose_candidates(info: LinearInfo, ratios: list[float], scales: dict | None, alpha: float,
                         cur_kwargs: dict, stream: "torch.cuda.Stream | None" = None,
                         covs: dict | None = None, dense: bool = False, stats: dict | None = None) -> list:
    """The layer's CURLinear (or --method module) at every candidate ratio, all from one SVD; with
    `dense`, each one's dense equivalent weight instead. With a CUDA stream the work runs there (a
    worker thread overlaps it with the previous layer's forward passes: same kernels, same numbers)
    and is finished before this returns."""
    with contextlib.ExitStack() as stack:
        if stream is not None:
            stack.enter_context(torch.cuda.device(stream.device))
            stack.enter_context(torch.cuda.stream(stream))
        # one factory for every --method (cur_kwargs may hold method, cov_damp); acur: same SVD reuse as before
        with materialized(info.module):  # an offloaded weight is read from accelerate's weights map
            curs = compress_candidates(info.module, ratios, scales.get(info.name) if scales else None, alpha,
                                       covs.get(info.name) if covs else None,
                                       stats=stats.get(info.name) if stats else None, **cur_kwargs)
        if dense:
            dtype = info.module.weight.dtype
            curs = [dense_equivalent(c, dtype) for c in curs]
    if stream is not None:
        stream.synchronize()
    return curs


def sensitivity_ppl(model: nn.Module, linears: list[LinearInfo], calib_ids: torch.Tensor,
                    ratios: list[float], scales: dict | None, alpha: float, cur_kwargs: dict,
                    batch_size: int = 4, fast: bool = True, done: dict | None = None,
                    on_progress: Progress | None = None, covs: dict | None = None,
                    compile_blocks: bool | None = None, stats: dict | None = None) -> dict[str, dict[str, float]]:
    """{layer: {ratio: calibration ppl}} with one layer at a time replaced by its CUR (or the module
    of cur_kwargs["method"]; covs: input covariances for the data-aware methods).

    compile_blocks: run the fast path's blocks through torch.compile (None: on CUDA only).

    done: results already computed (resume); on_progress(results) is called after every layer (on
    rank 0 only when distributed: it holds rank 0's share until the final merged table)."""
    results: dict[str, dict[str, float]] = dict(done or {})
    todo = [info for info in linears if info.name not in results]
    rank, world = dist_rank_world()
    if world > 1:
        _check_ranks_agree(_input_fingerprint(model, calib_ids, ratios, scales, alpha, cur_kwargs,
                                              batch_size, fast, todo), world)
        n_blocks = 1 + max((i.block for i in linears), default=0)
        mine = shard_layers(todo, world, n_blocks)[rank]
        if on_progress is not None and rank != 0:
            on_progress = None  # one writer of the progress cache
    else:
        mine = todo
    runner = None
    device = input_device(model)
    offloaded = has_offload(model)  # accelerate loads weights at each forward: no in-place weight writes,
    if compile_blocks is None:      # no decompositions on a side thread (it would race the loading hooks)
        compile_blocks = device.type == "cuda" and not offloaded
    if fast and mine:
        try:
            runner = BlockRunner(model, calib_ids, batch_size, compile_blocks=compile_blocks)
        except ValueError:
            print("WARNING: unknown model layout; sensitivity uses full forward passes (slower, same result)")
    # candidates go into the layer's own weight as dense equivalents (fast path, plain nn.Linear layers)
    dense = runner is not None and not offloaded and all(type(i.module) is nn.Linear for i in mine)
    # on a GPU the next layer's decompositions run on a side stream while this layer's forwards run
    stream = torch.cuda.Stream(device) if device.type == "cuda" and len(mine) > 1 and not offloaded else None
    pool = ThreadPoolExecutor(1, thread_name_prefix="cur-decompose") if stream is not None else None
    args = (ratios, scales, alpha, cur_kwargs, stream, covs, dense, stats)
    # decompositions run up to PREFETCH layers ahead: the late blocks' short forwards cannot hide an SVD
    # each, the early blocks' long ones hide several (memory: the candidates of PREFETCH layers)
    pending: collections.deque = collections.deque()
    ahead = iter(mine)

    def prefetch() -> None:
        while pool is not None and len(pending) < PREFETCH:
            nxt = next(ahead, None)
            if nxt is None:
                return
            pending.append(pool.submit(decompose_candidates, nxt, *args))
    prefetch()
    desc = "sensitivity (ppl)" if world == 1 else f"sensitivity (ppl) rank {rank}/{world}"
    try:
        for idx, info in enumerate(tqdm(mine, desc=desc, disable=rank != 0)):  # shown in logs too
            curs = pending.popleft().result() if pool else decompose_candidates(info, *args)
            prefetch()
            original = info.module
            row: dict[str, float] = {}
            if runner is not None:
                runner.advance_to(info.block)
            if stream is not None:  # made on the side stream, used on this one
                for cur in curs:
                    for t in [cur] if dense else list(cur.parameters()) + list(cur.buffers()):
                        t.record_stream(torch.cuda.current_stream(device))
            if dense:
                weight = original.weight
                saved = weight.detach().clone()
                try:
                    for r, w_r in zip(ratios, curs):
                        with torch.no_grad():
                            weight.copy_(w_r)
                        row[ratio_key(r)] = runner.tail_ppl()
                finally:
                    with torch.no_grad():
                        weight.copy_(saved)  # bit for bit the original
                del saved
            else:
                try:
                    for r, cur in zip(ratios, curs):
                        replace_module(info, cur)
                        if runner is not None:
                            row[ratio_key(r)] = runner.tail_ppl()
                        else:
                            row[ratio_key(r)] = perplexity_of_windows(model, calib_ids, batch_size, desc=None)
                finally:
                    replace_module(info, original)
            del curs
            results[info.name] = row
            if on_progress is not None:
                on_progress(results)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if world > 1:
        shares: list = [None] * world
        dist.all_gather_object(shares, {info.name: results[info.name] for info in mine})
        merged = {k: v for share in shares for k, v in share.items()}
        results = dict(done or {})
        results.update((info.name, merged[info.name]) for info in todo)  # single-process order
        if on_progress is not None:
            on_progress(results)
    return results


def sensitivity_stable_rank(linears: list[LinearInfo], ratios: list[float], scales: dict | None,
                            alpha: float, done: dict | None = None,
                            on_progress: Progress | None = None, bar: bool = True) -> dict[str, dict[str, float]]:
    """{layer: {ratio: (1 - ratio) * stable_rank / min(m, n)}}; no forward passes."""
    results = dict(done or {})
    for info in tqdm([i for i in linears if i.name not in results], desc="sensitivity (stable rank)", disable=not bar):
        scale = scales.get(info.name) if scales else None
        with materialized(info.module):
            w = scaled_weight(info.module.weight.data, scale, alpha)
        sr = stable_rank(w) if torch.isfinite(w).all() else math.nan
        if math.isnan(sr):
            print(f"WARNING: {info.name}: non-finite scaled weight, stable rank unknown; scored as "
                  "maximally sensitive")
            sr = float(min(w.shape))
        results[info.name] = {ratio_key(r): (1 - r) * sr / min(w.shape) for r in ratios}
        if on_progress is not None:
            on_progress(results)
    return results


def sensitivity_spectral(linears: list[LinearInfo], ratios: list[float], scales: dict | None,
                         alpha: float, rank_align: int = 1, done: dict | None = None,
                         on_progress: Progress | None = None, method: str = "acur",
                         bar: bool = True) -> dict[str, dict[str, float]]:
    """{layer: {ratio: tail energy of the scaled spectrum beyond the rank the ratio keeps}}.

    The rank a ratio keeps is --method's (CUR pays k(m+n)+k^2 parameters, SVD and the IDs less).

    sum_{i>k} s_i^2 / sum_i s_i^2 of W S is the relative error of the best rank-k approximation in the
    activation-weighted norm, a lower bound for CUR's; no forward passes, one SVD per layer."""
    results = dict(done or {})
    for info in tqdm([i for i in linears if i.name not in results], desc="sensitivity (spectral)", disable=not bar):
        scale = scales.get(info.name) if scales else None
        with materialized(info.module):
            w = scaled_weight(info.module.weight.data, scale, alpha)
        m, n = w.shape
        if torch.isfinite(w).all():
            energy = torch.linalg.svdvals(w).double().pow(2)
            cum = torch.cumsum(energy, 0) / energy.sum()
            row = {ratio_key(r): float(1 - cum[registry.get(method).rank(m, n, r, rank_align) - 1]) for r in ratios}
        else:
            print(f"WARNING: {info.name}: non-finite scaled weight; scored as maximally sensitive")
            row = {ratio_key(r): 1.0 for r in ratios}
        results[info.name] = row
        if on_progress is not None:
            on_progress(results)
    return results


def layer_loss(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor, row_weight: torch.Tensor | None) -> float:
    """1/2 sum_i g_i E[((W - W_hat) x)_i^2]: the predicted rise of the mean NLL (output_fisher's expansion)."""
    D = weight.detach().float() - approx.detach().float()  # fp32: an error estimate, not a factorization
    per_row = ((D @ cov.float()) * D).sum(1).double()
    g = row_weight.double() if row_weight is not None else torch.ones_like(per_row)
    return 0.5 * float((g.to(per_row.device) * per_row).sum())


def fisher_error_row(info: LinearInfo, ratios: list[float], stats: LayerStats, alpha: float,
                     settings: dict) -> dict[str, float]:
    """{ratio: predicted NLL rise} of one layer under its method, without a forward pass.

    Exact in the damped covariance's metric for every form: the row ID reads it off its pivoted
    Cholesky (residual trace at each rank, one pass), the whitened SVD off its weighted singular-value
    tail, and every other method is decomposed at each candidate and measured (one m x n x n product
    per candidate)."""
    spec = registry.get(settings.get("method", "acur"))
    W = info.module.weight.data
    m, n = W.shape
    align = settings.get("rank_align", 1)
    ranks = [spec.rank(m, n, r, align) for r in ratios]
    g = None if stats.row_weight is None else stats.row_weight.to(W.device).double()
    if has_loss_curve(spec.name) and (g is not None or spec.name == "wsvd"):
        prep = prepare_candidates(info.module, ratios, stats.scale, alpha, stats.cov, stats, **settings)
        if spec.form == "rowid":  # fisher-weighted picks: the residual trace is the weighted error
            return {ratio_key(r): 0.5 * float(prep.row_residual[k]) for r, k in zip(ratios, ranks)}
        U, S, _ = prep.svd_tuple  # SVD of W L: truncation error of output i = sum_{j>k} U_ij^2 s_j^2
        per_dir = (U.pow(2) * (g.unsqueeze(1) if g is not None else 1.0)).sum(0) * S.pow(2)
        tail = torch.cat([per_dir.flip(0).cumsum(0).flip(0), per_dir.new_zeros(1)])
        return {ratio_key(r): 0.5 * float(tail[k]) for r, k in zip(ratios, ranks)}
    cov = dec.damped_covariance(stats.cov.to(W.device), settings.get("cov_damp", registry.DEFAULT_COV_DAMP))
    mods = compress_candidates(info.module, ratios, stats.scale, alpha, stats.cov, stats=stats, **settings)
    return {ratio_key(r): layer_loss(W, mod.dense_weight().float(), cov, g) for r, mod in zip(ratios, mods)}


def sensitivity_fisher_error(linears: list[LinearInfo], ratios: list[float], stats: dict[str, LayerStats],
                             alpha: float, settings: dict, done: dict | None = None,
                             on_progress: Progress | None = None, bar: bool = True) -> dict[str, dict[str, float]]:
    """{layer: {ratio: predicted rise of the calibration NLL}}, no forward passes: the layer's output
    error E||(W - W_hat) x||^2 under the calibration input covariance, each output weighted by the
    loss's sensitivity to it (act_aware_utils.output_fisher), halved (second-order expansion).

    The numbers are additive across layers (to first approximation), so binary_search.allocate splits
    one budget over them, and one table serves every --param_ratio_target."""
    results = dict(done or {})
    for info in tqdm([i for i in linears if i.name not in results], desc="sensitivity (fisher error)", disable=not bar):
        st = stats[info.name]
        if st.cov is None or not dec.all_finite(st.cov):
            print(f"WARNING: {info.name}: no finite input covariance; scored as maximally sensitive")
            results[info.name] = {ratio_key(r): math.inf for r in ratios}
        else:
            with materialized(info.module):
                results[info.name] = fisher_error_row(info, ratios, st, alpha, settings)
        if on_progress is not None:
            on_progress(results)
    return results


def sensitivity_table(metric: str, model: nn.Module, linears: list[LinearInfo], calib_ids: torch.Tensor,
                      ratios: list[float], scales: dict | None, alpha: float, settings: dict, batch_size: int = 4,
                      fast: bool = True, compile_blocks: bool | None = None, covs: dict | None = None,
                      stats: dict[str, LayerStats] | None = None, done: dict | None = None,
                      on_progress: Progress | None = None, bar: bool = True) -> dict[str, dict[str, float]]:
    """The table of one --sensitivity_metric (METRICS): the one place that knows which function computes
    which metric. settings: what compress_linear needs (method, rank_align, selection, u_mode, cov_damp).
    bar: the closed-form metrics' own progress bar (off where a streamed run calls this once per block)."""
    if metric == "fisher_error":
        return sensitivity_fisher_error(linears, ratios, stats, alpha, settings, done=done, on_progress=on_progress,
                                        bar=bar)
    if metric == "ppl":
        return sensitivity_ppl(model, linears, calib_ids, ratios, scales, alpha, settings, batch_size, fast=fast,
                               done=done, on_progress=on_progress, covs=covs, compile_blocks=compile_blocks,
                               stats=stats)
    if metric == "spectral":
        return sensitivity_spectral(linears, ratios, scales, alpha, settings["rank_align"], done=done,
                                    on_progress=on_progress, method=settings["method"], bar=bar)
    return sensitivity_stable_rank(linears, ratios, scales, alpha, done=done, on_progress=on_progress, bar=bar)
