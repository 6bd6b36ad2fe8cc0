"""KV-cache bytes per token and decode speed: dense K/V cache vs the low-rank (latent) cache of ACUR's
KV mode, at several KV ratios (cached dims / original dims), on any device.

    python tools/bench_kv.py --model_id smollm2-135m --ratios 1,0.9,0.7,0.5 --context 512
    python tools/bench_kv.py --shape llama-2-7b --device cuda --dtype float16 --context 2048,8192

Every k_proj / v_proj gets the same rank fraction (plain CUR of the real weights for --model_id; random
factors for a --shape, whose weights are random anyway): speed and bytes depend on the ranks, not on
which columns were kept. Perplexity at a ratio comes from acur.py --compress_kv_cache, not from here.
Ratio 1.0 is the unmodified model with transformers' own cache. Decode time excludes the prefill.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import kv_compress  # noqa: E402
from modules import kv_cache as kv  # noqa: E402
from modules.cur_linear import CURLinear  # noqa: E402
from modules.model_utils import find_linears, replace_module  # noqa: E402

# random-weight shapes (no download): LLaMA-2-7B's, and a tiny one for smoke tests
SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=16384),  # LLaMA-2 has 4096; raised so 8k + decode fits (random weights)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, max_position_embeddings=8192),
}


class BenchError(ValueError):
    """Bad input: one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model_id", default=None, help="checkpoint dir, hub id or offline alias (smollm2-135m)")
    src.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random-weight LLaMA of this shape")
    p.add_argument("--num_layers", type=int, default=0, help="with --shape: override the block count (0 = as is)")
    p.add_argument("--ratios", default="1,0.9,0.7,0.5", help="KV ratios (cached dims / original), 1 = dense")
    p.add_argument("--context", default="512", help="prompt lengths in the cache before decoding, comma list")
    p.add_argument("--new_tokens", type=int, default=32, help="decode steps timed per measurement")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="timed decode runs per point (median reported)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto = float16 on CUDA, float32 on CPU")
    p.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p


def parse_list(text: str, kind, name: str, lo, hi) -> list:
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--{name} must be a comma list of numbers, got {text!r}") from None
    if not vals or any(not lo < v <= hi for v in vals):
        raise BenchError(f"--{name} values must be in ({lo}, {hi}], got {text!r}")
    return vals


def pick(args) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       "cpu" if args.device == "auto" else args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {args.device}: CUDA is not available here")
    dtype = (torch.float16 if dev.type == "cuda" else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
    return dev, dtype


def load(args, device, dtype):
    """(model, label). Random weights for --shape, built directly on the device."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    if args.model_id is None:
        shape = dict(SHAPES[args.shape or "tiny"])
        if args.num_layers:
            shape["num_hidden_layers"] = args.num_layers
        cfg = LlamaConfig(**shape)
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=args.attn_implementation)
        label = f"{args.shape or 'tiny'} (random weights, {cfg.num_hidden_layers} layers)"
    else:
        import datautils
        path = str(datautils.offline_model_dir(args.model_id)) if args.model_id in datautils.OFFLINE_MODELS else args.model_id
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=args.attn_implementation)
        except OSError as exc:
            raise BenchError(f"model not found: {args.model_id!r} ({str(exc).splitlines()[0][:200]})") from None
        model.to(device)
        label = args.model_id
    model.eval()
    try:
        kv_compress.check_kv_support(model)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    return model, label


def random_cur(linear: torch.nn.Linear, rank: int) -> CURLinear:
    """A CURLinear of the right shapes with random factors (for random-weight shapes: no SVD of 4096^2),
    drawn on the layer's device from torch's seeded generator."""
    m, n = linear.weight.shape
    w = linear.weight
    layer = CURLinear(n, m, rank, bias=linear.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        for p, fan in ((layer.C, rank), (layer.U, rank), (layer.R, n)):
            p.normal_(0.0, fan ** -0.5)
    return layer


def set_ratio(model, linears, originals: dict, ratio: float, random_factors: bool, seed: int) -> None:
    """Every k/v projection at rank fraction `ratio` (dense model and cache at 1.0)."""
    kv.disable_lowrank_kv_cache(model)
    for info in linears:
        replace_module(info, originals[info.name])
    if ratio >= 1:
        return
    if random_factors:
        torch.manual_seed(seed)
        for info in linears:
            m, n = info.module.weight.shape
            replace_module(info, random_cur(info.module, kv_compress.kv_rank(m, n, ratio)))
    else:
        kv_compress.compress_kv_linears(linears, {i.name: ratio for i in linears}, None, 0.5, {"rank_align": 1},
                               seed=seed, desc=None)
    kv.enable_lowrank_kv_cache(model)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, context: int, new_tokens: int, batch: int, device, seed: int) -> dict:
    """Prefill `context` random tokens, then time `new_tokens` greedy one-token steps."""
    from transformers import DynamicCache
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, context), generator=torch.Generator().manual_seed(seed)).to(device)
    cache = DynamicCache(config=model.config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill_s = time.perf_counter() - t0
    nbytes = kv.cache_nbytes(cache)
    tok = out.logits[:, -1:].argmax(-1)
    out = model(tok, past_key_values=cache, use_cache=True)  # warm-up step (not timed)
    tok = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(new_tokens):
        sync(device)
        t = time.perf_counter()
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        sync(device)
        steps.append(time.perf_counter() - t)
    row = {"prefill_s": prefill_s, "cache_bytes_at_context": nbytes,
           "bytes_per_token_measured": nbytes / (batch * context),
           "decode_tok_s": batch / statistics.median(steps), "decode_ms_per_step": 1e3 * statistics.median(steps)}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def run(args) -> list[dict]:
    """Entry: one row per (ratio, context)."""
    ratios = parse_list(args.ratios, float, "ratios", 0, 1)
    contexts = parse_list(args.context, int, "context", 0, 10**7)
    for flag in ("new_tokens", "batch_size", "repeats"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag} must be >= 1")
    if args.num_layers and args.model_id is not None:
        raise BenchError("--num_layers applies to --shape only")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = pick(args)
    model, label = load(args, device, dtype)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and max(contexts) + args.new_tokens + 1 > max_pos:
        raise BenchError(f"--context {max(contexts)} + --new_tokens exceeds the model's {max_pos} positions")
    linears = [i for i in find_linears(model) if kv_compress.is_kv_linear(i.name)]
    originals = {i.name: i.module for i in linears}
    rows = []
    for ratio in tqdm(ratios, desc="KV ratios"):
        set_ratio(model, linears, originals, ratio, args.model_id is None, args.seed)
        expected = kv_compress.kv_bytes_per_token(model, dtype)
        for ctx in contexts:
            runs = [measure(model, ctx, args.new_tokens, args.batch_size, device, args.seed + r)
                    for r in range(args.repeats)]
            row = dict(runs[0])
            row["decode_tok_s"] = statistics.median(r["decode_tok_s"] for r in runs)
            row["decode_ms_per_step"] = statistics.median(r["decode_ms_per_step"] for r in runs)
            row.update(ratio=ratio, context=ctx, reached=expected["ratio"],
                       bytes_per_token_expected=expected["compressed"], bytes_per_token_dense=expected["dense"])
            rows.append(row)
    set_ratio(model, linears, originals, 1.0, True, args.seed)
    env = {"model": label, "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
           "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "batch_size": args.batch_size, "new_tokens": args.new_tokens, "torch": torch.__version__,
           "python": platform.python_version(), "attn": args.attn_implementation}
    print_table(rows, env)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return rows


def print_table(rows: list[dict], env: dict) -> None:
    print(f"# {env['model']} on {env['device']} ({env['dtype']}, {env['threads']} threads, batch {env['batch_size']}, "
          f"{env['new_tokens']} decode steps, attn {env['attn']})")
    print("| KV ratio | reached | context | KV bytes/token (measured) | expected | KV cache MiB | prefill s "
          "| decode tok/s | ms/step |" + (" peak GiB |" if "peak_mem_gib" in rows[0] else ""))
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if "peak_mem_gib" in rows[0] else ""))
    for r in rows:
        print(f"| {r['ratio']:.2f} | {r['reached']:.4f} | {r['context']} | {r['bytes_per_token_measured']:,.0f} | "
              f"{r['bytes_per_token_expected']:,} | {r['cache_bytes_at_context'] / 2**20:,.1f} | {r['prefill_s']:.2f} | "
              f"{r['decode_tok_s']:.1f} | {r['decode_ms_per_step']:.1f} |"
              + (f" {r['peak_mem_gib']:.2f} |" if "peak_mem_gib" in r else ""))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except BenchError as exc:
        print(f"bench_kv.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
