"""Speed of structured compression (kept neurons and heads) in stock transformers: a dense random model of a
real shape against the same shape with fewer MLP neurons and attention heads, both plain LlamaForCausalLM.

    python tools/bench_structured.py --shape llama-2-7b                     # GPU, bf16, ratio 0.8
    python tools/bench_structured.py --shape tiny-llama --device cpu --prefill_len 64 --prompt_len 16

A structured model at a given ratio is an ordinary model of a smaller config, so its speed does not depend
on which neurons were kept: random weights of the kept widths measure it. The widths at --ratio keep the
same fraction of attention and MLP parameters unless --heads / --intermediate say otherwise (what the
uniform width mode exports). Per case: prefill tok/s (--prefill_len tokens, batch 1); greedy decode tok/s
with a static KV cache, every step one replayed CUDA graph, eager kernels (graph) and with every decoder
block torch.compile'd (compiled), at each --decode_batches; weights GiB and peak GPU memory. Dense and
structured run in the same process, so their ratio is what to read.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

from bench_inference import (compile_blocks, compile_settings, decode_graph_tps, prefill_tps,  # noqa: E402
                             uncompile_blocks, weight_bytes)
from bench_pipeline import SHAPES, sync  # noqa: E402


def linear_params(cfg: dict, heads: int, kv_heads: int, intermediate: int) -> int:
    """Parameters of one block's linears (no biases) at the given widths."""
    d, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * d * heads * hd + 2 * d * kv_heads * hd + 3 * d * intermediate


def widths_at(cfg: dict, ratio: float, align: int = 64) -> tuple[int, int, int]:
    """(heads, kv_heads, intermediate) keeping about `ratio` of the linears' parameters, whole KV groups, the
    same fraction of attention as of MLP where the head count allows (the nearest head count dividing
    hidden_size: transformers refuses others), intermediate a multiple of `align`."""
    h, kv, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    group = h // kv
    dense = linear_params(cfg, h, kv, inter)
    valid = [g for g in range(1, kv + 1) if cfg["hidden_size"] % (g * group) == 0]  # what a stock config accepts
    kv_keep = min(valid, key=lambda g: (abs(g - kv * ratio), -g))
    heads = kv_keep * group
    rest = ratio * dense - linear_params(cfg, heads, kv_keep, 0)
    inter_keep = max(align, int(rest // (3 * cfg["hidden_size"])) // align * align)
    return heads, kv_keep, inter_keep


def build(shape: str, device, dtype, heads: int | None = None, kv_heads: int | None = None,
          intermediate: int | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig
    family, kw = SHAPES[shape]
    if family != "llama":
        raise SystemExit(f"bench_structured: {shape} is not a LLaMA shape")
    kw = dict(kw)
    kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    if heads is not None:
        kw.update(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**kw), dtype=dtype).eval()
    return model


def measure(model, a, device) -> dict:
    vocab = model.config.vocab_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {"weights_gib": weight_bytes(model) / 2**30,
           "prefill_tps": prefill_tps(model, vocab, 1, a.prefill_len, device, a.reps)}
    for b in a.decode_batches:
        out[f"graph_decode_b{b}"] = decode_graph_tps(model, vocab, b, a.prompt_len, a.decode_tokens, device, a.reps)
    if device.type == "cuda" and not a.no_compile:
        with compile_settings():
            compile_blocks(model)
            out["compiled_prefill_tps"] = prefill_tps(model, vocab, 1, a.prefill_len, device, a.reps)
            for b in a.decode_batches:
                out[f"compiled_decode_b{b}"] = decode_graph_tps(model, vocab, b, a.prompt_len, a.decode_tokens,
                                                                device, a.reps)
            uncompile_blocks(model)
    out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-2-7b", choices=[s for s, (f, _) in SHAPES.items() if f == "llama"])
    p.add_argument("--ratio", type=float, default=0.8, help="kept fraction of the decoder linears' parameters")
    p.add_argument("--heads", type=int, default=None, help="kept query heads (with --kv_heads, --intermediate)")
    p.add_argument("--kv_heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prefill_len", type=int, default=2048)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--decode_tokens", type=int, default=64)
    p.add_argument("--decode_batches", default="1,16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args(argv)
    a.decode_batches = [int(x) for x in a.decode_batches.split(",")]
    if not 0 < a.ratio <= 1:
        p.error(f"--ratio must be in (0, 1], got {a.ratio}")
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    cfg = dict(SHAPES[a.shape][1])
    if a.heads is None:
        heads, kv, inter = widths_at(cfg, a.ratio)
    else:
        heads, kv, inter = a.heads, a.kv_heads or a.heads, a.intermediate or cfg["intermediate_size"]
    dense_p = linear_params(cfg, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"])
    reached = linear_params(cfg, heads, kv, inter) / dense_p
    rep = {"shape": a.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": a.dtype, "widths": {"heads": heads, "kv_heads": kv, "intermediate": inter},
           "dense_widths": {k: cfg[k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")},
           "reached_ratio": reached, "cases": {}}
    print(f"[bench] {a.shape}: structured keeps heads {heads}/{cfg['num_attention_heads']}, kv {kv}/"
          f"{cfg['num_key_value_heads']}, intermediate {inter}/{cfg['intermediate_size']} (linears {reached:.4f})",
          flush=True)
    for label, widths in (("dense", (None, None, None)), ("structured", (heads, kv, inter))):
        model = build(a.shape, device, dtype, *widths)
        rep["cases"][label] = measure(model, a, device)
        print(f"[bench] {label}: {json.dumps(rep['cases'][label])}", flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        sync(device)
    d, s = rep["cases"]["dense"], rep["cases"]["structured"]
    rep["speedup"] = {k: (s[k] / d[k]) for k in d if k.endswith(("tps",)) or "decode" in k
                      if d.get(k) and s.get(k)}
    print("| figure | dense | structured | x dense |\n|---|---|---|---|")
    for k, v in rep["speedup"].items():
        print(f"| {k} | {d[k]:,.0f} | {s[k]:,.0f} | **{v:.3f}** |")
    print(f"| weights GiB | {d['weights_gib']:.2f} | {s['weights_gib']:.2f} | {s['weights_gib'] / d['weights_gib']:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
