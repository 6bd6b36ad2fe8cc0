"""Low-rank KV cache runtime: with k_proj / v_proj compressed, the cache holds the rank-k latent z = U (R x)
of every token instead of K and V, and attention rebuilds K = C z + b (then RoPE, for LLaMA) and V from it.

This file is the RUNTIME only (the cache layer, the attention module, enable/disable). What lies between
the markers imports only torch and transformers, because huggingface_repos/build_acur_repo.py copies it
verbatim into exported repos (`modules.runtime_text.runtime_source`), which cannot import this project. What acur.py's
--compress_kv_cache does with it (rank fractions, sensitivity, compression, the bytes report) is the
stage script kv_compress.py; the pure rank arithmetic is modules/kv_ranks.py.

Why the latent and not K: K is rotated per position after the projection, so a rank-k factor of K
cannot be rotated in the latent space; the latent is stored, and K is rebuilt and rotated at every
step from the stored positions. V needs no rebuilding at decode time: P V = (P Z) C^T + b, because
the attention weights of each row sum to one.
"""
from __future__ import annotations

# ===== BEGIN LOW-RANK KV RUNTIME (self-contained: torch + transformers only) =====
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

LOWRANK_KV_FORMAT = 1  # bump when the layout of what the cache holds changes


def latent_factors(linear: nn.Module) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """(down weights applied in order, up weight) of a low-rank linear, or None for a dense one.

    CURLinear: z = U (R x), y = C z + b.  SVD-style (A, B): z = B x, y = A z + b. Duck-typed so the
    copy inside an exported repo works with that repo's own CURLinear class."""
    p = {n: getattr(linear, n, None) for n in ("C", "U", "R", "A", "B")}
    if all(isinstance(p[n], torch.Tensor) for n in ("C", "U", "R")):
        return [p["R"], p["U"]], p["C"]
    if all(isinstance(p[n], torch.Tensor) for n in ("A", "B")) and p["C"] is None:
        return [p["B"]], p["A"]
    return None


def _down(x: torch.Tensor, factors) -> torch.Tensor:
    """Latent (b, 1, s, k) of hidden states (b, s, d): the state the cache holds."""
    for w in factors[0]:
        x = F.linear(x, w)
    return x.unsqueeze(1)


def _up(z: torch.Tensor, factors, bias: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """K or V (b, heads, s, head_dim) rebuilt from latents (b, 1, s, k)."""
    y = F.linear(z.squeeze(1), factors[1], bias)
    b, s, _ = y.shape
    return y.view(b, s, -1, head_dim).transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA rotary embedding of (b, heads, s, d) with cos/sin (b, s, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain attention (GQA by repetition), as transformers' eager path computes it."""
    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = F.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


class LowRankKVLayer(DynamicLayer):
    """One block's cache. `keys` / `values` hold the latents (b, 1, s, k) of a low-rank side, or the
    usual (b, heads, s, d) tensors of a dense side; `positions` (int32, b x s) holds the rotary
    positions of the cached tokens when K is low-rank under RoPE (it is rotated when rebuilt)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.positions: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, positions: torch.Tensor | None = None, **kwargs):
        keys, values = super().update(key_states, value_states)
        if positions is not None:
            self.positions = positions if self.positions is None else torch.cat([self.positions, positions], -1)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.positions is not None:
            self.positions = self.positions[:, :tokens_to_remove]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices]

    def nbytes(self) -> int:
        """Bytes this layer really holds (latents or K/V, plus positions)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions)
                   if t is not None)


def lowrank_cache_layer(cache: Cache, layer_idx: int) -> LowRankKVLayer:
    """The LowRankKVLayer of `layer_idx`, swapped in for the empty DynamicLayer that generate() or the
    model created, so plain `generate()` needs no special cache argument."""
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(cache.layers) <= layer_idx:
            cache.layers.append(cache.layer_class_to_replicate())
    layer = cache.layers[layer_idx]
    if isinstance(layer, LowRankKVLayer):
        return layer
    if type(layer) is DynamicLayer and not layer.is_initialized:
        cache.layers[layer_idx] = new = LowRankKVLayer()
        return new
    raise ValueError(f"the low-rank KV cache needs a dynamic cache (DynamicCache, the default of generate()); "
                     f"layer {layer_idx} of the given {type(cache).__name__} is a "
                     f"{'filled ' if layer.is_initialized else ''}{type(layer).__name__}")


class LowRankKVAttention(nn.Module):
    """Self-attention of a LLaMA-family or OPT block whose k_proj and/or v_proj are low-rank, caching
    their latents. Keeps the wrapped module's children under the same names (state dicts unchanged).

    Prefill and no-cache runs rebuild K and V and use the model's attention implementation; a one-token
    decode step with a low-rank V multiplies the attention weights into the latents first (eager/sdpa)."""

    def __init__(self, attn: nn.Module, rotary: nn.Module | None = None):
        super().__init__()
        names = {n for n, _ in attn.named_children()}
        if names == {"q_proj", "k_proj", "v_proj", "o_proj"}:
            self.style = "llama"
            if rotary is None:
                raise ValueError("a LLaMA-style attention needs the model's rotary embedding")
            self.num_key_value_groups = attn.num_key_value_groups
            self.scaling, self.q_scaling = attn.scaling, 1.0
            self.attention_dropout = attn.attention_dropout
        elif names == {"q_proj", "k_proj", "v_proj", "out_proj"}:
            self.style = "opt"  # OPT scales the query before attention and calls it with scaling 1
            self.num_key_value_groups = 1
            self.scaling, self.q_scaling = 1.0, attn.scaling
            self.attention_dropout = attn.dropout
        else:
            raise ValueError(f"unsupported attention {type(attn).__name__} with submodules {sorted(names)}: the "
                             "low-rank KV cache supports LLaMA-family (q/k/v/o_proj, RoPE) and OPT attention")
        if getattr(attn, "sliding_window", None):
            raise ValueError(f"{type(attn).__name__} uses a sliding window; not supported by the low-rank KV cache")
        for n, child in attn.named_children():
            self.add_module(n, child)
        self.config, self.layer_idx, self.head_dim = attn.config, attn.layer_idx, attn.head_dim
        self.is_causal = True
        self._rotary = (rotary,)        # a reference (the model owns it), not a submodule
        self._original = (attn,)
        self.train(attn.training)  # a new module starts in training mode; follow the model's mode

    def cached_widths(self) -> dict[str, int]:
        """Per-token width each side caches: latent rank if low-rank, else the projection's width."""
        out = {}
        for side in ("k", "v"):
            proj = getattr(self, f"{side}_proj")
            f = latent_factors(proj)
            out[side] = f[1].shape[1] if f is not None else proj.out_features
        return out

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values: Cache | None = None, position_ids: torch.Tensor | None = None, **kwargs):
        b, q, _ = hidden_states.shape
        hd = self.head_dim
        kf, vf = latent_factors(self.k_proj), latent_factors(self.v_proj)
        query = self.q_proj(hidden_states)
        if self.q_scaling != 1.0:
            query = query * self.q_scaling
        query = query.view(b, q, -1, hd).transpose(1, 2)

        def dense(proj):
            return proj(hidden_states).view(b, q, -1, hd).transpose(1, 2)

        keys = _down(hidden_states, kf) if kf is not None else dense(self.k_proj)
        values = _down(hidden_states, vf) if vf is not None else dense(self.v_proj)
        cos = sin = positions = None
        if self.style == "llama":
            cos, sin = position_embeddings
            query = _rope(query, cos, sin)
            if kf is None:
                keys = _rope(keys, cos, sin)  # a dense K is cached rotated, as usual
            elif past_key_values is not None:
                if position_ids is None:
                    start = past_key_values.get_seq_length(self.layer_idx)
                    position_ids = torch.arange(start, start + q, device=hidden_states.device)[None]
                positions = position_ids.expand(b, q).to(torch.int32)
        if past_key_values is not None:
            layer = lowrank_cache_layer(past_key_values, self.layer_idx)
            keys, values = past_key_values.update(keys, values, self.layer_idx, positions=positions)
            if positions is not None:
                cos, sin = self._cached_rotary(past_key_values, layer.positions, hidden_states)
        if kf is not None:
            keys = _up(keys, kf, self.k_proj.bias, hd)
            if self.style == "llama":
                keys = _rope(keys, cos, sin)

        impl = self.config._attn_implementation
        mask_ok = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
        if vf is not None and q == 1 and impl in ("eager", "sdpa") and mask_ok and not self.training:
            out, weights = self._absorbed_attention(query, keys, values, vf, self.v_proj.bias, attention_mask)
        else:
            if vf is not None:
                values = _up(values, vf, self.v_proj.bias, hd)
            interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(impl, _eager_attention)
            out, weights = interface(self, query, keys, values, attention_mask,
                                     dropout=self.attention_dropout if self.training else 0.0,
                                     scaling=self.scaling, **kwargs)
        out = out.reshape(b, q, -1).contiguous()
        out_proj = self.o_proj if self.style == "llama" else self.out_proj
        return out_proj(out), weights

    def _cached_rotary(self, cache: Cache, positions: torch.Tensor, x: torch.Tensor):
        """cos/sin of every cached position. Blocks share positions, so one computation per step serves all;
        the memo on the cache is scratch for the step, not cached state (it is rebuilt when positions change)."""
        memo = getattr(cache, "_lowrank_rope_memo", None)
        if (memo is not None and memo[0].shape == positions.shape and memo[0].device == positions.device
                and memo[1].dtype == x.dtype and torch.equal(memo[0], positions)):
            return memo[1], memo[2]
        cos, sin = self._rotary[0](x, positions.long())
        cache._lowrank_rope_memo = (positions, cos, sin)
        return cos, sin

    def _absorbed_attention(self, query, keys, z, vf, bias, mask):
        """softmax(q K^T) V with V = Z C^T + b, computed as (P Z) C^T + b: no V is rebuilt."""
        b, H, q, d = query.shape
        n_kv, s = keys.shape[1], keys.shape[2]
        g = H // n_kv
        scores = torch.matmul(query.reshape(b, n_kv, g * q, d), keys.transpose(2, 3)).view(b, H, q, s)
        scores = scores * self.scaling
        if mask is not None:
            mask = mask[..., -s:]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        pz = torch.matmul(weights.view(b, H * q, s), z.squeeze(1))          # (b, H*q, k)
        up = vf[1]
        n_v = up.shape[0] // d
        pz = pz.view(b, n_v, H // n_v, q, -1)
        out = torch.einsum("bngqk,ndk->bngqd", pz, up.view(n_v, d, -1))
        if bias is not None:
            out = out + bias.view(1, n_v, 1, 1, d)
        return out.reshape(b, H, q, d).transpose(1, 2), weights


def decoder_layers_and_rotary(model: nn.Module):
    base = getattr(model, "model", model)
    dec = getattr(base, "decoder", None)
    if dec is not None and hasattr(dec, "layers"):
        return dec.layers, None
    if hasattr(base, "layers"):
        return base.layers, getattr(base, "rotary_emb", None)
    raise ValueError(f"{type(model).__name__}: cannot find decoder layers for the low-rank KV cache")


def enable_lowrank_kv_cache(model: nn.Module) -> list[int]:
    """Wrap the attention of every block whose k_proj or v_proj is low-rank; returns the block indices.
    Idempotent. The model's generate() and forward(use_cache=True) then cache the latents."""
    layers, rotary = decoder_layers_and_rotary(model)
    done = []
    for i, block in enumerate(layers):
        attn = block.self_attn
        if not isinstance(attn, LowRankKVAttention):
            if latent_factors(attn.k_proj) is None and latent_factors(attn.v_proj) is None:
                continue
            block.self_attn = LowRankKVAttention(attn, rotary)
        done.append(i)
    return done


def disable_lowrank_kv_cache(model: nn.Module) -> None:
    """Put the model's own attention modules back (same child modules): the cache holds K/V again."""
    layers, _ = decoder_layers_and_rotary(model)
    for block in layers:
        attn = block.self_attn
        if isinstance(attn, LowRankKVAttention):
            orig = attn._original[0]
            for n, child in attn.named_children():
                setattr(orig, n, child)
            block.self_attn = orig


def cache_nbytes(cache: Cache) -> int:
    """Bytes a cache really holds: every layer's keys, values (and positions), whatever their shapes."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None), getattr(layer, "positions", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
# ===== END LOW-RANK KV RUNTIME =====

# what tools copy it by (modules/runtime_text.runtime_source): the marker name and the copy's docstring
RUNTIME_MARK = "LOW-RANK KV RUNTIME"
RUNTIME_DOC = "Low-rank KV cache of ACUR-compressed models (copied from CUR4LLM modules/kv_cache.py).\n\nThe cache holds the latent U R x of k_proj / v_proj instead of K and V; attention rebuilds them."
