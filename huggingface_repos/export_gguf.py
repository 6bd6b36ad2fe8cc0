"""A GGUF file of a structured (kept neurons and heads) LLaMA-family model, for llama.cpp.

Written with the `gguf` package, following llama.cpp's conventions for LLaMA (tensor names from gguf's own
name map, q/k rows reordered from Hugging Face's half-split rotary layout to GGUF's interleaved pairs, one
key per hyperparameter). Two architectures, by the model's widths:
  - every layer the same width: `llama`, the architecture every llama.cpp build and tool knows;
  - widths per layer: `deci`, whose loader reads feed_forward_length, head_count and head_count_kv as one
    value per layer (llama.cpp's plain `llama` builds every layer at layer 0's width).
The widths are read off the weights themselves, so any model whose linears were sliced exports alike.
The tokenizer comes from a GGUF the model was converted from (copied verbatim: exact for the offline model)
or from the Hugging Face tokenizer files through gguf's vocab classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GGUF_FAMILIES = ("llama",)  # HF model_type values whose blocks this writer knows
DTYPES = {"f32": (torch.float32, 0), "f16": (torch.float16, 1)}  # name -> (torch dtype, llama_ftype)


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF by this writer; the message is one line."""


@dataclass(frozen=True)
class LayerWidths:
    """What one decoder layer keeps: MLP neurons, query heads, key/value heads."""
    intermediate: int
    heads: int
    kv_heads: int


def layer_widths(model: torch.nn.Module) -> list[LayerWidths]:
    """Each decoder layer's kept widths, read off its weights (head_dim from the config)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out.append(LayerWidths(mlp.gate_proj.out_features, attn.q_proj.out_features // head_dim,
                               attn.k_proj.out_features // head_dim))
    return out


def is_uniform(widths: list[LayerWidths]) -> bool:
    return len(set(widths)) == 1


def interleave_rotary(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q/k rows from HF's rotary layout (each head's first half paired with its second half) to GGUF's
    (pairs of consecutive rows), head by head: llama.cpp's LLaMA rope rotates consecutive pairs."""
    rows = weight.shape[0]
    return (weight.reshape(rows // head_dim, 2, head_dim // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _copy_tokenizer_fields(writer, source_gguf: Path) -> None:
    import gguf
    reader = gguf.GGUFReader(str(source_gguf))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)


def _tokenizer_fields_from_hf(writer, tokenizer_dir: Path, n_vocab: int) -> None:
    """Tokenizer keys from HF files through gguf's vocab classes (BPE or SentencePiece)."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab
    for cls in (SentencePieceVocab, LlamaHfVocab, BpeVocab):
        try:
            vocab = cls(tokenizer_dir)
            break
        except (FileNotFoundError, TypeError, ValueError):
            continue
    else:
        raise GGUFExportError(f"no tokenizer gguf can read in {tokenizer_dir}")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    while len(tokens) < n_vocab:  # embedding rows beyond the tokenizer: llama.cpp wants one entry each
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab).add_to_gguf(writer)


def write_gguf(model: torch.nn.Module, path: str | Path, *, tokenizer_dir: str | Path | None = None,
               source_gguf: str | Path | None = None, dtype: str = "f16", name: str = "model") -> dict:
    """Write `model` (a LLaMA-family causal LM, dense or with sliced layers) as one GGUF file.

    Returns {"path", "architecture", "widths", "tensors"}. Raises GGUFExportError, before writing anything,
    for a family this writer does not know or a dtype it does not write."""
    import gguf
    cfg = model.config
    if cfg.model_type not in GGUF_FAMILIES:
        raise GGUFExportError(f"GGUF export knows the {', '.join(GGUF_FAMILIES)} family, not {cfg.model_type!r}")
    if dtype not in DTYPES:
        raise GGUFExportError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if source_gguf is None and tokenizer_dir is None:
        raise GGUFExportError("GGUF export needs the tokenizer: pass tokenizer_dir or source_gguf")
    torch_dtype, ftype = DTYPES[dtype]
    widths = layer_widths(model)
    uniform = is_uniform(widths)
    arch = "llama" if uniform else "deci"
    n_layer = len(widths)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(n_layer)
    pick = (lambda vals: vals[0]) if uniform else list
    writer.add_feed_forward_length(pick([w.intermediate for w in widths]))
    writer.add_head_count(pick([w.heads for w in widths]))
    writer.add_head_count_kv(pick([w.kv_heads for w in widths]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(ftype)
    if source_gguf is not None:
        _copy_tokenizer_fields(writer, Path(source_gguf))
    else:
        _tokenizer_fields_from_hf(writer, Path(tokenizer_dir), cfg.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if uniform else gguf.MODEL_ARCH.DECI, n_layer)
    state = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent
    count = 0
    for key, tensor in state.items():
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise GGUFExportError(f"no GGUF name for tensor {key}")
        t = tensor.detach().to("cpu", torch.float32)
        if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                         "self_attn.q_proj.bias", "self_attn.k_proj.bias")):
            t = interleave_rotary(t, head_dim)
        keep_f32 = t.ndim == 1  # norms and biases stay f32, as llama.cpp's converter writes them
        writer.add_tensor(gname, t.to(torch.float32 if keep_f32 else torch_dtype).numpy()
                          if not keep_f32 else t.numpy().astype(np.float32))
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return {"path": str(path), "architecture": arch, "tensors": count,
            "widths": [w.__dict__ for w in widths]}
