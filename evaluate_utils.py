"""Perplexity by the ASVD4LLM protocol: test text joined with "\\n\\n", tokenised once, cut into
non-overlapping windows of `seqlen` tokens, perplexity = exp(mean token NLL over the windows)."""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


def windows(ids: torch.Tensor, seqlen: int, max_windows: int = 0, bos_token_id: int | None = None
            ) -> torch.Tensor:
    """Non-overlapping windows (n, seqlen) of a 1-D id tensor; with a BOS id each window starts with it."""
    body = seqlen - 1 if bos_token_id is not None else seqlen
    n = ids.numel() // body
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows and max_windows > 0:
        n = min(n, max_windows)
    w = ids[: n * body].view(n, body)
    if bos_token_id is not None:
        w = torch.cat([torch.full((n, 1), bos_token_id, dtype=w.dtype), w], dim=1)
    return w


def token_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (fp32) and the number of predicted tokens."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = input_ids[:, 1:].to(logits.device)
    loss = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                       shift_labels.reshape(-1), reduction="sum")
    return float(loss.item()), shift_labels.numel()


@torch.no_grad()
def perplexity_of_windows(model: nn.Module, windows_ids: torch.Tensor, batch_size: int = 1,
                          desc: str | None = "perplexity") -> float:
    """exp(mean NLL) of a model over a (n, seqlen) batch of windows. NaN is returned as NaN."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, windows_ids.shape[0], batch_size)
    for i in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        batch = windows_ids[i:i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits
        s, c = token_nll_sum(logits, batch)
        total, count = total + s, count + c
    return nll_to_ppl(total / count)


def nll_to_ppl(mean_nll: float) -> float:
    """exp(mean NLL); NaN stays NaN (reported, never hidden), overflow becomes inf."""
    if math.isnan(mean_nll):
        return float("nan")
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


def evaluate_perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int = 2048, batch_size: int = 1,
                        max_windows: int = 0, bos_token_id: int | None = None,
                        desc: str = "perplexity") -> float:
    """Perplexity of a model on one tokenised test text (1-D ids)."""
    return perplexity_of_windows(model, windows(ids, seqlen, max_windows, bos_token_id), batch_size, desc)
