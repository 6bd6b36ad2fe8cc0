"""A LLaMA whose decoder layers keep their own number of MLP neurons and attention heads (structured CUR,
widths per layer). Written by CUR4LLM's build_acur_repo.py into the exported repo as modeling_structured.py.

Stock transformers has one intermediate_size and one head count for every LLaMA layer; this thin subclass
builds each layer at its width and is otherwise the stock model: no custom layer, no custom forward. Load
with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).
"""
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class StructuredLlamaConfig(LlamaConfig):
    """LlamaConfig plus `layer_widths`: per layer {"intermediate", "heads", "kv_heads"}."""
    model_type = "structured_llama"

    def __init__(self, layer_widths=None, **kwargs):
        self.layer_widths = layer_widths or []
        super().__init__(**kwargs)


class StructuredLlamaForCausalLM(LlamaForCausalLM):
    config_class = StructuredLlamaConfig

    def __init__(self, config: StructuredLlamaConfig):
        super().__init__(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        bias, mlp_bias = config.attention_bias, getattr(config, "mlp_bias", False)
        for layer, w in zip(self.model.layers, config.layer_widths):
            attn, mlp = layer.self_attn, layer.mlp
            q, kv = w["heads"] * head_dim, w["kv_heads"] * head_dim
            attn.q_proj = nn.Linear(config.hidden_size, q, bias=bias)
            attn.k_proj = nn.Linear(config.hidden_size, kv, bias=bias)
            attn.v_proj = nn.Linear(config.hidden_size, kv, bias=bias)
            attn.o_proj = nn.Linear(q, config.hidden_size, bias=bias)
            attn.num_key_value_groups = w["heads"] // w["kv_heads"]
            mlp.gate_proj = nn.Linear(config.hidden_size, w["intermediate"], bias=mlp_bias)
            mlp.up_proj = nn.Linear(config.hidden_size, w["intermediate"], bias=mlp_bias)
            mlp.down_proj = nn.Linear(w["intermediate"], config.hidden_size, bias=mlp_bias)
            mlp.intermediate_size = w["intermediate"]
        self.post_init()
