"""Config of an ACUR-compressed LLaMA checkpoint (copied into every exported repo, loaded with
trust_remote_code). It is a LlamaConfig plus `cur_layers`, the per-layer CUR shapes, so the
modeling code can build every CURLinear before the weights load."""

from transformers import LlamaConfig


class AcurLlamaConfig(LlamaConfig):
    """LlamaConfig + cur_layers {layer name: {rank, in, out, bias, cols, rows}} + acur (provenance).

    `cols` / `rows` are the indices of the actual input columns / output rows of the original weight
    that C and R hold, so the repo itself says what was kept.
    """

    model_type = "acur_llama"
    cur_layers: dict | None = None
    acur: dict | None = None
