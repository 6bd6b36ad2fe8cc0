"""Peak memory of one layer's fit, per weight shape of a decoder block (random weight, random covariance).

    python tools/bench_layer_memory.py --shape llama-2-70b                  # GPU: live tensors, exact
    python tools/bench_layer_memory.py --shape llama-2-70b --scale 8 --device cpu

Issue 30's peak GPU memory of the streamed pipeline is set in its compress stage, where a 70B down_proj's
input covariance (28672 x 28672, 6.6 GB in fp64) meets the fit's temporaries. This prints, for each distinct
(out, in) shape of a block, the memory the fit takes above its inputs (the weight, the fp64 covariance and the
output fisher), in GiB and in units of the largest fp64 square it touches (max(out, in)^2 x 8 bytes), so a
scaled-down CPU run predicts the full shape. On CUDA: torch.cuda.max_memory_allocated (live tensors). On the
CPU: the process's peak resident memory, with glibc told to return every large block at once
(MALLOC_MMAP_THRESHOLD_, set by re-running this script) so that the resident size follows live memory.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from modules.low_rank_linear import LayerStats, compress_linear  # noqa: E402
from tools.bench_pipeline import host_rss, shape_config  # noqa: E402

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def block_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of one LLaMA decoder block, by name (k/v share a shape under GQA)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return {"q_proj/o_proj": (h, h), "k_proj/v_proj": (kv, h), "gate_proj/up_proj": (i, h), "down_proj": (h, i)}


def peak_above(fn, device: torch.device) -> int:
    """Bytes fn() holds at its peak beyond what was live when it started."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the resident high-water mark
        base = host_rss()["now"]
        out = fn()
        peak = round((host_rss()["peak"] - base) * 2**30)
    del out
    return peak


def fit_peak(m: int, n: int, method: str, ratio: float, n_tokens: int, device: torch.device) -> int:
    g = torch.Generator(device=device).manual_seed(0)
    linear = torch.nn.Linear(n, m, bias=False, device=device, dtype=torch.bfloat16)
    A = torch.randn(n, max(1, n // 4), generator=g, device=device, dtype=torch.float64)
    cov = A @ A.T / A.shape[1]  # PSD, rank n/4 (the fit's shrinkage makes it invertible)
    del A
    stats = LayerStats(cov=cov, row_weight=torch.rand(m, generator=g, device=device) + 0.1, n_tokens=n_tokens)
    return peak_above(lambda: compress_linear(linear, ratio, method=method, stats=stats), device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-2-70b")
    p.add_argument("--scale", type=int, default=1, help="divide every dimension by this (a CPU-sized run)")
    p.add_argument("--method", default="srid")
    p.add_argument("--ratio", type=float, default=0.9)
    p.add_argument("--n_tokens", type=int, default=32768, help="calibration tokens behind the covariance")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get(MMAP_ENV) is None:  # glibc reads it at start: run again with it
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                  {**os.environ, MMAP_ENV: str(1 << 20)})
    cfg = shape_config(args.shape, 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.shape} / {args.scale}, method {args.method} at {args.ratio}, {name}, torch {torch.__version__}")
    print(f"{'linears':<18} {'out':>6} {'in':>6} {'peak GiB':>9} {'x max(out,in)^2 fp64':>21}")
    for label, (m, n) in block_shapes(cfg).items():
        m, n = max(1, m // args.scale), max(1, n // args.scale)
        peak = fit_peak(m, n, args.method, args.ratio, args.n_tokens, device)
        print(f"{label:<18} {m:>6} {n:>6} {peak / 2**30:>9.2f} {peak / (max(m, n) ** 2 * 8):>21.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
