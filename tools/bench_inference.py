"""Inference speed and weight memory of a dense model vs its ACUR versions, on a random model of a real shape.

    python tools/bench_inference.py --shape llama-2-7b                 # GPU, fp16, dense vs ACUR 0.9 / 0.8
    python tools/bench_inference.py --shape tiny-llama --device cpu --prefill_len 64 --prompt_len 16

Every decoder linear is replaced by a CURLinear of the rank a uniform parameter ratio gives (C and R are
actual columns and rows of the weight, U is random): speed depends on the shapes only, so no
decomposition is needed. Prefill: one forward over the prompt (logits of the last position, as in
generation). Decode: greedy steps with the KV cache, one token per step. A per-layer table compares
CURLinear's multiplication order with a dense nn.Linear and with U folded into C (two products).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_pipeline import SHAPES, build_model, sync  # noqa: E402
from modules.cur_linear import CURLinear  # noqa: E402
from modules import registry  # noqa: E402
from modules.model_utils import find_linears, replace_module  # noqa: E402


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (the CUR index buffers included)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def random_cur(linear: nn.Linear, ratio: float, gen: torch.Generator, rank_align: int = 1) -> CURLinear:
    """A CURLinear of the rank `ratio` gives: actual columns/rows of the weight, a random core U."""
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


def timeit(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() after warm-up (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_us(fn, device: torch.device, reps: int, calls: int = 20) -> float:
    """Microseconds of device time per fn() call: on CUDA `calls` calls are captured in one CUDA graph
    and replayed, so kernel-launch overhead drops out (what a graph-captured decode loop sees)."""
    if device.type != "cuda":
        return 1e6 * timeit(fn, device, reps)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return 1e6 * timeit(graph.replay, device, reps) / calls


@torch.no_grad()
def prefill_tps(model, vocab: int, batch: int, length: int, device, reps: int) -> float:
    ids = torch.randint(0, vocab, (batch, length), device=device)
    return batch * length / timeit(lambda: model(ids, use_cache=False, logits_to_keep=1), device, reps)


@torch.no_grad()
def decode_tps(model, vocab: int, batch: int, prompt_len: int, steps: int, device, reps: int) -> float:
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=device)

    def run():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        return time.perf_counter() - t0

    run()  # warm-up
    return batch * steps / statistics.median(run() for _ in range(reps))


@torch.no_grad()
def layer_orders(shapes: list[tuple[int, int]], ratio: float, tokens: list[int], device, dtype, reps: int) -> list[dict]:
    """Microseconds of device time per call of one layer (CUDA-graph replay on a GPU): dense;
    CURLinear's C(U(Rx)) at the ratio's rank k and at k rounded down to a multiple of 8 (--rank_align 8);
    U folded into C, (CU)(Rx), at k."""
    rows = []
    F = nn.functional
    for m, n in shapes:
        k = registry.get("acur").rank(m, n, ratio)
        W = torch.randn(m, n, device=device, dtype=dtype) / n ** 0.5
        row = {}
        for label, kk in (("cur", k), ("cur_align8", registry.get("acur").rank(m, n, ratio, 8))):
            C, U, R = W[:, :kk].contiguous(), torch.randn(kk, kk, device=device, dtype=dtype) / kk ** 0.5, W[:kk].contiguous()
            row[label] = (C, U, R)
        C, U, R = row["cur"]
        CU = C @ U
        for t in tokens:
            x = torch.randn(t, n, device=device, dtype=dtype)
            out = {"shape": f"{m}x{n}", "rank": k, "tokens": t,
                   "dense_us": device_us(lambda: F.linear(x, W), device, reps)}
            for label, (C_, U_, R_) in row.items():
                out[f"{label}_us"] = device_us(lambda: F.linear(F.linear(F.linear(x, R_), U_), C_), device, reps)
            out["folded_us"] = device_us(lambda: F.linear(F.linear(x, R), CU), device, reps)
            rows.append(out)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="llama-2-7b", choices=list(SHAPES))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--ratios", default="0.9,0.8", help="uniform ACUR parameter ratios to compare with dense")
    p.add_argument("--rank_aligns", default="1,8", help="rank alignments (acur.py --rank_align) to compare")
    p.add_argument("--prefill_batches", default="1,4")
    p.add_argument("--prefill_len", type=int, default=2048)
    p.add_argument("--decode_batches", default="1,16")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--decode_tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layer_tokens", default="1,16,8192", help="token counts of the per-layer order table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json_out", default=None)
    return p


def ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"bench_inference.py: error: {flag} must be comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise SystemExit(f"bench_inference.py: error: {flag} must be positive integers, got {text!r}")
    return vals


def run_bench(a) -> dict:
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    dtype = (torch.float16 if device.type == "cuda" else torch.float32) if a.dtype == "auto" else getattr(torch, a.dtype)
    try:
        ratios = [float(r) for r in a.ratios.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"bench_inference.py: error: --ratios must be numbers, got {a.ratios!r}")
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise SystemExit(f"bench_inference.py: error: --ratios must be in (0, 1), got {a.ratios!r}")
    pb, db = ints(a.prefill_batches, "--prefill_batches"), ints(a.decode_batches, "--decode_batches")
    model = build_model(a.shape, device, dtype, a.seed)
    vocab = model.config.vocab_size
    linears = find_linears(model)
    originals = {i.name: i.module for i in linears}
    gen = torch.Generator().manual_seed(a.seed)
    rep = {"shape": a.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "dtype": str(dtype), "settings": {k: v for k, v in vars(a).items() if k != "json_out"}, "models": {}}
    aligns = ints(a.rank_aligns, "--rank_aligns")
    variants = [("dense", None, None)] + [(f"acur_{r}" + (f"_a{al}" if al > 1 else ""), r, al)
                                          for r in ratios for al in aligns]
    for label, r, al in variants:
        if r is not None:
            for info in linears:
                replace_module(info, random_cur(originals[info.name], r, gen, al))
        row = {"weight_mib": weight_bytes(model) / 2**20}
        for b in pb:
            row[f"prefill_b{b}_tok_s"] = prefill_tps(model, vocab, b, a.prefill_len, device, a.reps)
        for b in db:
            row[f"decode_b{b}_tok_s"] = decode_tps(model, vocab, b, a.prompt_len, a.decode_tokens, device, a.reps)
        rep["models"][label] = row
        print(f"[bench] {label}: " + ", ".join(f"{k} {v:,.1f}" for k, v in row.items()), flush=True)
        for info in linears:
            replace_module(info, originals[info.name])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    counts: dict[str, int] = {}
    for i in linears:
        key = "x".join(map(str, i.module.weight.shape))
        counts[key] = counts.get(key, 0) + 1
    shapes = sorted({tuple(i.module.weight.shape) for i in linears})
    rep["layer_orders"] = layer_orders(shapes, min(ratios, key=lambda r: abs(r - 0.9)),
                                       ints(a.layer_tokens, "--layer_tokens"), device, dtype, max(a.reps, 10))
    # device time of all the model's linears for one forward of `tokens` tokens (e.g. 1 = a decode step)
    rep["linears_total_us"] = {
        t: {col: sum(r[col] * counts[r["shape"]] for r in rep["layer_orders"] if r["tokens"] == t)
            for col in ("dense_us", "cur_us", "cur_align8_us", "folded_us")}
        for t in sorted({r["tokens"] for r in rep["layer_orders"]})}
    return rep


def print_report(rep: dict) -> None:
    print("=" * 78)
    print(f"{rep['shape']} on {rep['device']}, {rep['dtype']}: tokens/s (higher is better)")
    models = rep["models"]
    keys = list(next(iter(models.values())))
    print(f"{'':18s}" + "".join(f"{m:>14s}" for m in models))
    for k in keys:
        print(f"{k:18s}" + "".join(f"{models[m][k]:14,.1f}" if k != "weight_mib" else f"{models[m][k]:14,.1f}"
                                   for m in models))
    print("per layer, device us per call: dense | CUR C(U(Rx)) | same, rank aligned to 8 | U folded (CU)(Rx)")
    for r in rep["layer_orders"]:
        print(f"  {r['shape']:>11s} k={r['rank']:<5d} tokens={r['tokens']:<6d} {r['dense_us']:9.1f} "
              f"{r['cur_us']:9.1f} {r['cur_align8_us']:9.1f} {r['folded_us']:9.1f}")
    for t, v in rep["linears_total_us"].items():
        print(f"  all linears, {t} tokens: " + "  ".join(f"{k[:-3]} {x / 1e3:.2f} ms" for k, x in v.items()))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    rep = run_bench(a)
    print_report(rep)
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
