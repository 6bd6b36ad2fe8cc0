"""Sensitivity of every compressed linear to every candidate ratio.

ppl:         calibration perplexity with that one layer replaced by its CUR at that ratio (the ASVD
             protocol). The fast path is exact: block inputs are cached and advanced block by block, only
             the blocks at and after the replaced layer run, samples are batched, and one SVD per layer
             serves every candidate ratio. `fast=False` runs the straightforward full-model loop.
stable_rank: no forward passes; score = (1 - ratio) * stable_rank(W S) / min(m, n), a cheap heuristic
             (layers whose scaled spectrum is concentrated are compressed first).
Results are plain dicts {layer: {ratio (str): score}}; lower score = safer to compress. Progress is
saved after every layer so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from evaluate_utils import nll_to_ppl, perplexity_of_windows, token_nll_sum
from modules.cur_linear import CURLinear
from modules.cur_math import safe_svd, scaled_weight, stable_rank
from modules.model_utils import LinearInfo, decoder_parts, replace_module

METRICS = ("ppl", "stable_rank")
DEFAULT_RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

Progress = Callable[[dict], None]


def ratio_key(r: float) -> str:
    """Ratios are dict keys in JSON: one canonical spelling."""
    return f"{r:.4g}"


class BlockRunner:
    """Runs decoder blocks from cached inputs. Holds, for every calibration batch, the hidden state
    entering the current block and the keyword arguments (masks, rotary embeddings) the model
    passed to each block."""

    def __init__(self, model: nn.Module, calib_ids: torch.Tensor, batch_size: int):
        parts = decoder_parts(model)
        if parts is None:
            raise ValueError("unsupported layout for the fast path")
        self.model, self.layers, self.head = model, parts.layers, parts.head_modules
        self.device = next(model.parameters()).device
        self.batches = [calib_ids[i:i + batch_size] for i in range(0, calib_ids.shape[0], batch_size)]
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[list[dict]] = []  # [batch][block]
        self.block = 0
        self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        """One embedding pass per batch; hooks record block 0's input and every block's kwargs."""
        class _Stop(Exception):
            pass

        for batch in self.batches:
            per_block: list[dict] = [None] * len(self.layers)
            first: list[torch.Tensor] = []

            def make_hook(i):
                def hook(_mod, args, kwargs):
                    kw = dict(kwargs)
                    h = args[0] if args else kw.pop("hidden_states")
                    kw.pop("hidden_states", None)
                    per_block[i] = kw
                    if i == 0:
                        first.append(h.detach())
                    if i == len(self.layers) - 1:
                        raise _Stop
                return hook

            hooks = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
                     for i, layer in enumerate(self.layers)]
            try:
                self.model(batch.to(self.device), use_cache=False)
            except _Stop:
                pass
            finally:
                for h in hooks:
                    h.remove()
            self.hidden.append(first[0])
            self.kwargs.append(per_block)

    def _run_block(self, i: int, h: torch.Tensor, b: int) -> torch.Tensor:
        out = self.layers[i](h, **self.kwargs[b][i])
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def tail_ppl(self) -> float:
        """Calibration perplexity running blocks from the current one to the end, then the head."""
        total, count = 0.0, 0
        for b, batch in enumerate(self.batches):
            h = self.hidden[b]
            for i in range(self.block, len(self.layers)):
                h = self._run_block(i, h, b)
            for mod in self.head:
                h = mod(h)
            s, c = token_nll_sum(h, batch)
            total, count = total + s, count + c
        return nll_to_ppl(total / count)

    @torch.no_grad()
    def advance_to(self, block: int) -> None:
        """Move the cached inputs forward (through the unmodified blocks) to `block`."""
        while self.block < block:
            for b in range(len(self.batches)):
                self.hidden[b] = self._run_block(self.block, self.hidden[b], b)
            self.block += 1


def _layer_svd(info: LinearInfo, scales: dict | None, alpha: float):
    scale = scales.get(info.name) if scales else None
    return scale, safe_svd(scaled_weight(info.module.weight.data, scale, alpha))


def sensitivity_ppl(model: nn.Module, linears: list[LinearInfo], calib_ids: torch.Tensor,
                    ratios: list[float], scales: dict | None, alpha: float, cur_kwargs: dict,
                    batch_size: int = 4, fast: bool = True, done: dict | None = None,
                    on_progress: Progress | None = None) -> dict[str, dict[str, float]]:
    """{layer: {ratio: calibration ppl}} with one layer at a time replaced by its CUR.

    done: results already computed (resume); on_progress(results) is called after every layer."""
    results: dict[str, dict[str, float]] = dict(done or {})
    runner = None
    if fast:
        try:
            runner = BlockRunner(model, calib_ids, batch_size)
        except ValueError:
            print("WARNING: unknown model layout; sensitivity uses full forward passes (slower, same result)")
    todo = [info for info in linears if info.name not in results]
    for info in tqdm(todo, desc="sensitivity (ppl)"):
        scale, svd = _layer_svd(info, scales, alpha)
        original = info.module
        row: dict[str, float] = {}
        if runner is not None:
            runner.advance_to(info.block)
        try:
            for r in ratios:
                replace_module(info, CURLinear.from_linear(original, r, scale, alpha=alpha, svd=svd,
                                                           **cur_kwargs))
                if runner is not None:
                    row[ratio_key(r)] = runner.tail_ppl()
                else:
                    row[ratio_key(r)] = perplexity_of_windows(model, calib_ids, batch_size, desc=None)
        finally:
            replace_module(info, original)
        results[info.name] = row
        if on_progress is not None:
            on_progress(results)
    return results


def sensitivity_stable_rank(linears: list[LinearInfo], ratios: list[float], scales: dict | None,
                            alpha: float, done: dict | None = None,
                            on_progress: Progress | None = None) -> dict[str, dict[str, float]]:
    """{layer: {ratio: (1 - ratio) * stable_rank / min(m, n)}}; no forward passes."""
    results = dict(done or {})
    for info in tqdm([i for i in linears if i.name not in results], desc="sensitivity (stable rank)"):
        scale = scales.get(info.name) if scales else None
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
