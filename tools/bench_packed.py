"""Packed vs simulated quantization on a random LLaMA-shaped model: bytes, decode speed, perplexity, kernels.

    python tools/bench_packed.py                                   # GPU: llama-1b shape, bf16, < 3 minutes
    python tools/bench_packed.py --device cpu --shape tiny-llama --decode_tokens 8 --reps 1

Every decoder linear becomes a CURLinear at a uniform ratio (random_cur: actual columns and
rows of the random weight, random core); each --quant method is applied simulated (quantize_model: the floats
research runs measure), measured, then converted in place to the packed layers exported repos load
(quantization.to_packed, the runtime of modules/packed_linear.py = a repo's acur_packed.py) and measured again.
Reported per variant: bytes of the weights on disk (safetensors of the state dict) and in memory (parameters
+ buffers, kernel copies included), decode tokens/s (eager HF generation steps with the KV cache, and static-cache steps replayed as CUDA
graphs), perplexity
of fixed random-token windows (a random model's perplexity means nothing; packed must equal simulated), the
max |logit| difference packed vs simulated, the kernels chosen, and the device time of one CUR layer per
shape (CUDA-graph replay: launch overhead removed) for float / simulated vs packed factors.
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import quantization as qz  # noqa: E402
from bench_inference import decode_graph_tps, decode_tps, device_us, weight_bytes  # noqa: E402
from bench_pipeline import SHAPES, sync, write_json  # noqa: E402
from modules import registry  # noqa: E402
from modules.cur_linear import CURLinear  # noqa: E402
from modules.model_utils import find_linears, replace_module  # noqa: E402
from modules.packed_linear import PackedCURLinear, packed_memory, prepare_packed  # noqa: E402

# TinyLlama-1.1B's shape: big enough for memory-bound kernels, small enough for a < 3 minute run
EXTRA_SHAPES = {"llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                           max_position_embeddings=2048, tie_word_embeddings=False))}


def random_cur(linear: nn.Linear, ratio: float, gen: torch.Generator, rank_align: int = 1) -> CURLinear:
    """A CURLinear of the rank `ratio` gives: actual columns/rows of the weight, a random core U (speed and
    bytes do not depend on how U was fitted)."""
    W = linear.weight.data
    m, n = W.shape
    k = registry.get("acur").rank(m, n, ratio, rank_align)
    cur = CURLinear(n, m, k, bias=linear.bias is not None, dtype=W.dtype, device=W.device)
    cols = torch.randperm(n, generator=gen)[:k].sort().values.to(W.device)
    rows = torch.randperm(m, generator=gen)[:k].sort().values.to(W.device)
    with torch.no_grad():
        cur.C.copy_(W[:, cols])
        cur.R.copy_(W[rows, :])
        cur.U.copy_(torch.randn(k, k, generator=gen).to(W) / k ** 0.5)
        if linear.bias is not None:
            cur.bias.copy_(linear.bias)
        cur.col_indices.copy_(cols)
        cur.row_indices.copy_(rows)
    return cur


def build(shape: str, device: torch.device, dtype: torch.dtype, seed: int, ratio: float, rank_align: int):
    """The random dense model of `shape` with every decoder linear a CURLinear (same seed: same model)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig
    family, kw = {**SHAPES, **EXTRA_SHAPES}[shape]
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config((LlamaConfig if family == "llama" else OPTConfig)(**kw), dtype=dtype)
    model.eval().config.use_cache = False
    if ratio < 1:
        gen = torch.Generator().manual_seed(seed)
        for info in find_linears(model):
            replace_module(info, random_cur(info.module, ratio, gen, rank_align))
    return model


def disk_bytes(model: nn.Module) -> int:
    """Bytes of the saved state dict, shared tensors once (the tensor data of an export's safetensors)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """exp(mean NLL) over the windows, and the logits of the first window (fp32) for comparisons."""
    nll, first = 0.0, None
    for w in windows:
        logits = model(w[None], use_cache=False).logits.float()
        nll += nn.functional.cross_entropy(logits[0, :-1], w[1:]).item()
        first = logits[0].cpu() if first is None else first
    return math.exp(nll / len(windows)), first


def measure(model: nn.Module, windows: torch.Tensor, device: torch.device, a) -> dict:
    vocab = model.config.vocab_size
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    ppl, logits = perplexity(model, windows)
    row = {"disk_mib": disk_bytes(model) / 2**20, "memory_mib": weight_bytes(model) / 2**20, "ppl": ppl}
    for b in a.decode_batches:
        row[f"decode_b{b}_tok_s"] = decode_tps(model, vocab, b, a.prompt_len, a.decode_tokens, device, a.reps)
    for b in a.decode_batches:  # static KV cache, one CUDA graph per step: the kernels' own speed
        row[f"decode_b{b}_graph_tok_s"] = decode_graph_tps(model, vocab, b, a.prompt_len, a.decode_tokens,
                                                           device, a.reps)
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row, logits


@torch.no_grad()
def layer_times(model: nn.Module, tokens: list[int], device: torch.device, dtype: torch.dtype, reps: int) -> list[dict]:
    """Device microseconds of one layer per distinct shape: the model's current layer (dense, float CUR,
    simulated or packed) for `tokens` input rows (CUDA-graph replay on a GPU, wall time on CPU)."""
    seen, rows = set(), []
    for info in find_linears(model, types=(nn.Linear, CURLinear, PackedCURLinear)):
        m = info.module
        if (m.in_features, m.out_features) in seen:
            continue
        seen.add((m.in_features, m.out_features))
        for t in tokens:
            x = torch.randn(t, m.in_features, device=device, dtype=dtype)
            m(x)  # kernels prepared outside the graph
            rows.append({"shape": f"{m.out_features}x{m.in_features}", "tokens": t, "layer": type(m).__name__,
                         "us": device_us(lambda: m(x), device, reps)})
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="llama-1b", choices=list(SHAPES) + list(EXTRA_SHAPES))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: bfloat16 on CUDA (tinygemm's int4 kernel takes bf16 activations), float32 on CPU")
    p.add_argument("--ratio", type=float, default=0.8, help="uniform CUR parameter ratio (1 = dense linears)")
    p.add_argument("--rank_align", type=int, default=128,
                   help="CUR ranks a multiple of this (128: the factors fit tinygemm's int4 tiles and groups unpadded)")
    p.add_argument("--quant", default="rtn_int8:0,rtn_int4:128",
                   help="comma list of --weight_quant:--quant_group_size pairs (rtn only: no calibration here)")
    p.add_argument("--decode_batches", default="1,16")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--decode_tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ppl_windows", type=int, default=4)
    p.add_argument("--ppl_seqlen", type=int, default=512)
    p.add_argument("--layer_tokens", default="1,16", help="token counts of the per-layer device-time table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json_out", default=None)
    return p


def run(a) -> dict:
    t_start = time.perf_counter()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    dtype = ((torch.bfloat16 if device.type == "cuda" else torch.float32) if a.dtype == "auto"
             else getattr(torch, a.dtype))
    a.decode_batches = [int(b) for b in str(a.decode_batches).split(",") if b.strip()]
    tokens = [int(t) for t in a.layer_tokens.split(",") if t.strip()]
    quants = []
    for item in a.quant.split(","):
        method, _, g = item.strip().partition(":")
        spec = qz.parse_method(method, int(g or 0))
        if spec is None or spec.kind != "rtn":
            raise SystemExit(f"bench_packed.py: error: --quant takes rtn_* methods (no calibration here), got {method!r}")
        quants.append((method, int(g or 0)))
    rep = {"shape": a.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "dtype": str(dtype), "torch": torch.__version__,
           "settings": {k: v for k, v in vars(a).items() if k != "json_out"}, "models": {}, "layers": {}}
    vocab = {**SHAPES, **EXTRA_SHAPES}[a.shape][1]["vocab_size"]
    windows = torch.randint(0, vocab, (a.ppl_windows, a.ppl_seqlen), generator=torch.Generator().manual_seed(1))
    windows = windows.to(device)

    def record(label: str, model, extra: dict | None = None):
        row, logits = measure(model, windows, device, a)
        row.update(extra or {})
        rep["models"][label] = row
        print(f"[bench_packed] {label}: " + ", ".join(f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in row.items()), flush=True)
        return logits

    for label, ratio in (("dense", 1.0), (f"cur{a.ratio}", a.ratio)):
        model = build(a.shape, device, dtype, a.seed, ratio, a.rank_align)
        record(label, model)
        rep["layers"][label] = layer_times(model, tokens, device, dtype, a.reps * 5)
        del model
        gc.collect()
    for method, g in quants:
        tag = f"{method}" + (f"_g{g}" if g else "")
        model = build(a.shape, device, dtype, a.seed, a.ratio, a.rank_align)
        qz.quantize_model(model, method, g)
        sim_logits = record(f"{tag} simulated", model)
        rep["layers"][f"{tag} simulated"] = layer_times(model, tokens, device, dtype, a.reps * 5)
        t0 = time.perf_counter()
        info = qz.to_packed(model)
        counts = prepare_packed(model, dtype)
        sync(device)
        pack_s = time.perf_counter() - t0
        mem = packed_memory(model)
        logits = record(f"{tag} packed", model, {"kernels": counts, "pack_s": pack_s,
                                                 "kernel_copy_mib": mem["kernel_bytes"] / 2**20,
                                                 "grid_offset": info["max_grid_offset"]})
        sim, packed = rep["models"][f"{tag} simulated"], rep["models"][f"{tag} packed"]
        packed["max_logit_diff_vs_simulated"] = (logits - sim_logits).abs().max().item()
        packed["ppl_rel_diff_vs_simulated"] = abs(packed["ppl"] - sim["ppl"]) / sim["ppl"]
        rep["layers"][f"{tag} packed"] = layer_times(model, tokens, device, dtype, a.reps * 5)
        del model
        gc.collect()
    rep["wall_s"] = time.perf_counter() - t_start
    return rep


def print_report(rep: dict) -> None:
    print("=" * 100)
    print(f"{rep['shape']} on {rep['device']}, {rep['dtype']}, torch {rep['torch']} ({rep['wall_s']:.0f} s)")
    cols = [k for k in next(iter(rep["models"].values())) if isinstance(next(iter(rep["models"].values()))[k], float)]
    print(f"{'':24s}" + "".join(f"{c:>20s}" for c in cols))
    for label, row in rep["models"].items():
        print(f"{label:24s}" + "".join(f"{row.get(c, float('nan')):20,.4g}" for c in cols))
    for label, row in rep["models"].items():
        if "kernels" in row:
            print(f"{label}: kernels {row['kernels']}, max |logit diff| vs simulated "
                  f"{row['max_logit_diff_vs_simulated']:.3g}, ppl rel diff {row['ppl_rel_diff_vs_simulated']:.2e}, "
                  f"kernel copies {row['kernel_copy_mib']:,.1f} MiB, packing {row['pack_s']:.1f} s")
    print("one layer, device us per call (CUDA-graph replay on a GPU):")
    labels = list(rep["layers"])
    keys = [(r["shape"], r["tokens"]) for r in rep["layers"][labels[0]]]
    print(f"  {'shape':>11s} {'tokens':>6s}" + "".join(f"{lab[:22]:>24s}" for lab in labels))
    for i, (shape, t) in enumerate(keys):
        print(f"  {shape:>11s} {t:6d}" + "".join(f"{rep['layers'][lab][i]['us']:24.1f}" for lab in labels))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    rep = run(a)
    print_report(rep)
    if a.json_out:
        write_json(a.json_out, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
