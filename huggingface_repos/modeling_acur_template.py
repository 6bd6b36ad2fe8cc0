"""The one template of the code every exported repo carries (read by build_acur_repo.py, never imported).

build_acur_repo.py writes `configuration_acur_<family>.py` and `modeling_acur_<family>.py` from the two
sections below, for any decoder-only family transformers knows (LLaMA, OPT, Qwen2, Mistral, ...), by
replacing the placeholder names: BaseConfig / BaseForCausalLM (the family's own transformers classes),
AcurBase (the exported class prefix, e.g. AcurLlama), acur_base (the file suffix, e.g. acur_llama). The
low-rank layer classes come from the project's modules/ (copied with inspect.getsource into
acur_layers.py), the KV runtime from modules/kv_cache.py (acur_kv_cache.py), the packed quantized weights
and their kernels from modules/packed_linear.py (acur_packed.py), the inference forms from
modules/fast_layers.py (acur_fast.py): one source for each.
"""
# ===== BEGIN CONFIGURATION =====
"""Config of a low-rank compressed checkpoint written by CUR4LLM's build_acur_repo.py (loaded with
trust_remote_code). It is the family's own config plus `lowrank_layers`, the per-layer shapes, so the
modeling code can build every low-rank layer before the weights load."""

from transformers import BaseConfig


class AcurBaseConfig(BaseConfig):
    """BaseConfig + lowrank_layers {layer name: {type, method, rank, in, out, bias}} + acur (provenance)
    + packed_quant (None, or {format, bits, group_size, layers: {name: {parts}}}: quantized layers held packed).

    The kept column / row indices are integer tensors in the safetensors weights, not here. model_type is
    this repo's own (acur_base, not the family's): without trust_remote_code AutoConfig and AutoModel
    stop with transformers' "pass trust_remote_code=True" error instead of building the family's dense
    model with random weights in place of the low-rank layers; the auto_map of config.json sends
    AutoConfig / AutoModelForCausalLM (with trust_remote_code) to these classes."""

    model_type = "acur_base"
    lowrank_layers: dict | None = None
    acur: dict | None = None
    lowrank_kv_cache: bool = False
    packed_quant: dict | None = None
# ===== END CONFIGURATION =====
# ===== BEGIN MODELING =====
"""Low-rank compressed model for `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`,
written by CUR4LLM's build_acur_repo.py. It imports nothing of CUR4LLM: the layer classes are in
acur_layers.py, the low-rank KV cache in acur_kv_cache.py, the packed quantized weights and their kernels
in acur_packed.py, the inference forms (`model.to_inference_form()`) in acur_fast.py (all copied from the
project's single sources).

The model swaps in the low-rank layers inside __init__, before any weight loads: from_pretrained builds
the model on the meta device, so the dense weights of the compressed layers are never materialised, and
the checkpoint fills the factors (and the kept indices, integer buffers) directly. Quantized layers
(config.packed_quant) are built packed too: the files' integer codes and scales load as they are, and
from_pretrained picks each matrix's kernel for its device and dtype (`model.packed_backends`).
"""
import inspect

from torch import nn
from transformers import BaseForCausalLM

from .acur_fast import to_inference_form as _to_inference_form
from .acur_kv_cache import enable_lowrank_kv_cache
from .acur_layers import LAYER_CLASSES
from .acur_packed import install_packed_layers, prepare_packed
from .configuration_acur_base import AcurBaseConfig

# integer buffers of the layer classes, and the dimension their values index
_INDEX_DIMS = {"col_indices": "in_features", "other_cols": "in_features", "row_indices": "out_features",
               "other_rows": "out_features", "gather_index": "out_features"}


def install_lowrank_layers(model: nn.Module, layers: dict) -> None:
    """Replace every nn.Linear named in config.lowrank_layers by an empty low-rank layer of the recorded
    type and shape. A name that is not a linear of this architecture, an unknown type or a shape that
    disagrees is a clear error."""
    arch = type(model).__name__
    for name, spec in layers.items():
        missing = {"type", "rank", "in", "out", "bias"} - set(spec)
        if missing:
            raise ValueError(f"config.lowrank_layers[{name!r}] lacks {sorted(missing)}")
        cls = LAYER_CLASSES.get(spec["type"])
        if cls is None:
            raise ValueError(f"config.lowrank_layers[{name!r}] has type {spec['type']!r}; this repo's acur_layers.py "
                             f"defines {sorted(LAYER_CLASSES)}")
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        old = getattr(parent, attr, None) if parent is not None else None
        if not isinstance(old, nn.Linear):
            raise ValueError(f"config.lowrank_layers names {name!r}, which is not a linear layer of this {arch} "
                             f"(num_hidden_layers={model.config.num_hidden_layers}); the config does not "
                             "match the architecture")
        if (old.in_features, old.out_features, old.bias is not None) != (spec["in"], spec["out"], spec["bias"]):
            raise ValueError(f"config.lowrank_layers[{name!r}] is {spec['out']}x{spec['in']} bias={spec['bias']} "
                             f"but the {arch} layer is {old.out_features}x{old.in_features} "
                             f"bias={old.bias is not None}")
        if not 0 < spec["rank"] <= min(spec["in"], spec["out"]):
            raise ValueError(f"config.lowrank_layers[{name!r}]: rank {spec['rank']} out of range")
        kw = dict(bias=spec["bias"], dtype=old.weight.dtype, device=old.weight.device)
        if "method" in inspect.signature(cls.__init__).parameters and spec.get("method"):
            kw["method"] = spec["method"]
        setattr(parent, attr, cls(spec["in"], spec["out"], spec["rank"], **kw))


def check_lowrank_indices(model: nn.Module) -> None:
    """After loading: every kept-index buffer holds distinct indices inside its dimension, the kept ones
    number the rank, and kept + others cover the dimension (a corrupt file fails here, not in a matmul)."""
    for name in (model.config.lowrank_layers or {}):
        layer = model.get_submodule(name)
        bufs = {k: b for k, b in layer.named_buffers(recurse=False) if k in _INDEX_DIMS}
        for key, buf in bufs.items():
            if buf.device.type == "meta":
                continue
            size = getattr(layer, _INDEX_DIMS[key])
            values = buf.tolist()
            if len(set(values)) != len(values) or (values and not 0 <= min(values) <= max(values) < size):
                raise ValueError(f"{name}.{key} in the weights is not a set of distinct indices below {size}")
            if key in ("col_indices", "row_indices") and len(values) != layer.rank:
                raise ValueError(f"{name}.{key} holds {len(values)} indices, the layer's rank is {layer.rank}")
        for kept, other in (("col_indices", "other_cols"), ("row_indices", "other_rows")):
            if kept in bufs and other in bufs and bufs[kept].device.type != "meta":
                size = getattr(layer, _INDEX_DIMS[kept])
                if sorted(bufs[kept].tolist() + bufs[other].tolist()) != list(range(size)):
                    raise ValueError(f"{name}: {kept} and {other} in the weights do not cover 0..{size - 1}")


class AcurBaseForCausalLM(BaseForCausalLM):
    """BaseForCausalLM whose linears named in config.lowrank_layers are low-rank layers."""

    config_class = AcurBaseConfig

    def __init__(self, config: AcurBaseConfig):
        super().__init__(config)
        layers = config.lowrank_layers or {}
        if "lm_head" in layers and config.tie_word_embeddings:
            raise ValueError("config.lowrank_layers compresses lm_head, so tie_word_embeddings must be false")
        install_lowrank_layers(self, layers)
        if getattr(config, "packed_quant", None):  # quantized layers: integer codes + scales, not floats
            install_packed_layers(self, config.packed_quant)
        if getattr(config, "lowrank_kv_cache", False):  # KV-cache mode: cache the k/v latents, not K and V
            enable_lowrank_kv_cache(self)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        out = super().from_pretrained(*args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        check_lowrank_indices(model)
        if getattr(model.config, "packed_quant", None):
            prepare_packed(model)  # kernels for the device and dtype the weights landed on
        return out

    def to_inference_form(self, fuse: bool = True) -> dict:
        """Rewrite the low-rank layers for speed, in place, same outputs (acur_fast.py): CUR's U folded
        into C, row ID without concatenation, q/k/v and gate/up computed together. The research layers
        (actual columns and rows, kept indices) are gone afterwards: this model cannot be saved again."""
        self._acur_inference_form = True
        return _to_inference_form(self, fuse=fuse)

    def save_pretrained(self, *args, **kwargs):
        if getattr(self, "_acur_inference_form", False):
            raise RuntimeError("this model was rewritten by to_inference_form(); its layers no longer match "
                               "config.lowrank_layers: save the model loaded from the repo instead")
        return super().save_pretrained(*args, **kwargs)
# ===== END MODELING =====
