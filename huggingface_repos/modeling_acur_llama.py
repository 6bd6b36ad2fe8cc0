"""ACUR-compressed LLaMA for `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`.

This file is copied into every exported repo and must not import the CUR4LLM project, so it holds
its own copy of the CURLinear layer. The model swaps in CURLinear modules inside __init__, before
any weight loads: from_pretrained builds the model on the meta device, so the dense weights of the
compressed layers are never materialised, and the checkpoint fills C, U, R directly.
"""
import torch
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_acur_llama import AcurLlamaConfig

try:  # exported repo: build_acur_repo.py writes acur_kv_cache.py (the runtime of CUR4LLM's modules/kv_cache.py)
    from .acur_kv_cache import enable_lowrank_kv_cache
except ImportError:  # inside the CUR4LLM checkout, where that copy is not written
    from modules.kv_cache import enable_lowrank_kv_cache


class CURLinear(nn.Module):
    """y = C (U (R x)) + b. C: actual columns of the original weight (out x k), U: k x k,
    R: actual rows (k x in); col_indices / row_indices say which columns / rows were kept."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(nn.functional.linear(nn.functional.linear(x, self.R), self.U), self.C)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def install_cur_layers(model: nn.Module, cur_layers: dict) -> None:
    """Replace every nn.Linear named in config.cur_layers by an empty CURLinear of the recorded shape.
    A name that is not a linear of this architecture, or a shape that disagrees, is a clear error."""
    arch = type(model).__name__
    for name, spec in cur_layers.items():
        missing = {"rank", "in", "out", "bias"} - set(spec)
        if missing:
            raise ValueError(f"config.cur_layers[{name!r}] lacks {sorted(missing)}")
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        old = getattr(parent, attr, None) if parent is not None else None
        if not isinstance(old, nn.Linear):
            raise ValueError(f"config.cur_layers names {name!r}, which is not a linear layer of this {arch} "
                             f"(num_hidden_layers={model.config.num_hidden_layers}); the config does not "
                             "match the architecture")
        if (old.in_features, old.out_features, old.bias is not None) != (spec["in"], spec["out"], spec["bias"]):
            raise ValueError(f"config.cur_layers[{name!r}] is {spec['out']}x{spec['in']} bias={spec['bias']} "
                             f"but the {arch} layer is {old.out_features}x{old.in_features} "
                             f"bias={old.bias is not None}")
        if not 0 < spec["rank"] <= min(spec["in"], spec["out"]):
            raise ValueError(f"config.cur_layers[{name!r}]: rank {spec['rank']} out of range")
        setattr(parent, attr, CURLinear(spec["in"], spec["out"], spec["rank"], bias=spec["bias"],
                                        dtype=old.weight.dtype, device=old.weight.device))


def check_cur_indices(model: nn.Module) -> None:
    """After loading: the kept indices in the weights must be the ones the config states."""
    for name, spec in (model.config.cur_layers or {}).items():
        layer = model.get_submodule(name)
        for key, buf in (("cols", layer.col_indices), ("rows", layer.row_indices)):
            if key in spec and buf.device.type != "meta" and buf.tolist() != list(spec[key]):
                raise ValueError(f"{name}: kept {key} in the weights differ from config.cur_layers")


class AcurLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose linears named in config.cur_layers are CURLinear."""

    config_class = AcurLlamaConfig

    def __init__(self, config: AcurLlamaConfig):
        super().__init__(config)
        cur_layers = config.cur_layers or {}
        if "lm_head" in cur_layers and config.tie_word_embeddings:
            raise ValueError("config.cur_layers compresses lm_head, so tie_word_embeddings must be false")
        install_cur_layers(self, cur_layers)
        if getattr(config, "lowrank_kv_cache", False):  # KV-cache mode: cache the k/v latents, not K and V
            enable_lowrank_kv_cache(self)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        out = super().from_pretrained(*args, **kwargs)
        check_cur_indices(out[0] if isinstance(out, tuple) else out)
        return out
