"""Where one ppl-sensitivity candidate spends its time, part by part, on a real shape (random weights).

    python tools/bench_block.py --shape llama-2-7b            # GPU, fp16, 4 x 2048 tokens per pass
    python tools/bench_block.py --shape tiny-llama --device cpu --seqlen 64

Prints, for one calibration batch: a decoder block's forward (eager and torch.compile), the head (final
norm + lm_head + summed NLL), the replaced layer as CURLinear (three GEMMs at its odd rank), rank-aligned,
and as one dense reconstructed weight; the layer's decompositions (SVD of the scaled weight, every
candidate's C, U, R) per weight shape; and the floor the issue's protocol cannot beat (FLOPs over the
measured matrix-product rate). The numbers choose the sensitivity loop's settings (sensitivity.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import sensitivity as sens  # noqa: E402
from evaluate_utils import token_nll_sum  # noqa: E402
from modules.cur_linear import CURLinear  # noqa: E402
from modules.low_rank_linear import compress_candidates  # noqa: E402
from modules.model_utils import find_linears  # noqa: E402
from tools.bench_pipeline import SHAPES, build_model, sync  # noqa: E402


def timed(fn, device, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def block_flops(cfg, tokens: int, seqlen: int) -> float:
    """Matrix FLOPs of one LLaMA/OPT decoder block over `tokens` tokens (causal attention counted half)."""
    h = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim")
    kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * (h // cfg.num_attention_heads)
    mlp = (3 if hasattr(cfg, "intermediate_size") else 2) * h * inter
    lin = 2 * (2 * h * h + 2 * h * kv + mlp)
    attn = 2 * 2 * h * seqlen / 2
    return tokens * (lin + attn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-2-7b", choices=list(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", default="4", help="calibration samples per pass, comma list")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--n_calib_samples", type=int, default=32)
    p.add_argument("--ratios", default=",".join(map(str, sens.DEFAULT_RATIOS)))
    p.add_argument("--no_compile", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_model(a.shape, device, dtype)
    cfg = model.config
    ratios = [float(r) for r in a.ratios.split(",")]
    rows: list[tuple[str, str]] = []

    def report(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"[bench_block] {name}: {value}", flush=True)

    if device.type == "cuda":
        n = 8192
        x, y = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        t = timed(lambda: x @ y, device, 10, 3)
        peak = 2 * n ** 3 / t
        report("matmul 8192^3 rate", f"{peak / 1e12:.0f} TFLOP/s")
        del x, y
    else:
        peak = None
    gen = torch.Generator().manual_seed(0)
    lin = find_linears(model)
    for bs in [int(b) for b in a.batch_size.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (bs, a.seqlen), generator=gen)
        runner = sens.BlockRunner(model, ids, bs)
        kw = runner.kwargs[0][0]
        mask = kw.get("attention_mask")
        report(f"bs{bs} block kwargs", ", ".join(f"{k}={type(v).__name__}" for k, v in kw.items())
               + f"; attention_mask {None if mask is None else tuple(mask.shape)}")
        h = runner.hidden[0]
        layer = runner.layers[0]
        t_block = timed(lambda: layer(h, **kw), device)
        fl = block_flops(cfg, bs * a.seqlen, a.seqlen)
        report(f"bs{bs} block eager", f"{t_block * 1e3:.1f} ms, {fl / t_block / 1e12:.0f} TFLOP/s")

        def head():
            z = h
            for mod in runner.head:
                z = mod(z)
            return token_nll_sum(z, ids)
        t_head = timed(head, device)
        report(f"bs{bs} head+nll", f"{t_head * 1e3:.1f} ms")
        if not a.no_compile:
            t0 = time.perf_counter()
            comp = torch.compile(runner.layers[0])
            comp(h, **kw)
            sync(device)
            report(f"bs{bs} compile first block", f"{time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
            comp1 = torch.compile(runner.layers[1])
            comp1(h, **kw)
            sync(device)
            report(f"bs{bs} compile second block", f"{time.perf_counter() - t0:.1f} s")
            t_comp = timed(lambda: comp(h, **kw), device)
            report(f"bs{bs} block compiled", f"{t_comp * 1e3:.1f} ms, {fl / t_comp / 1e12:.0f} TFLOP/s")
        # a whole tail from block 0 (every block, then the head) as the sensitivity loop runs it
        t_tail = timed(runner.tail_ppl, device, 3, 1)
        report(f"bs{bs} tail of {len(runner.layers)} blocks eager", f"{t_tail * 1e3:.0f} ms, "
               f"{(fl * len(runner.layers)) / t_tail / 1e12:.0f} TFLOP/s (blocks only counted)")
        if not a.no_compile:
            eager_layers = runner.layers
            runner.layers = [torch.compile(m) for m in eager_layers]
            t0 = time.perf_counter()
            runner.tail_ppl()
            sync(device)
            report(f"bs{bs} compile all blocks", f"{time.perf_counter() - t0:.1f} s")
            t_tail_c = timed(runner.tail_ppl, device, 3, 1)
            report(f"bs{bs} tail compiled", f"{t_tail_c * 1e3:.0f} ms, "
                   f"{(fl * len(eager_layers)) / t_tail_c / 1e12:.0f} TFLOP/s")
            runner.layers = eager_layers
        # the replaced layer: CUR (3 GEMMs) vs rank-aligned vs dense reconstructed
        x = torch.randn(bs * a.seqlen, cfg.hidden_size, device=device, dtype=dtype)
        xi = torch.randn(bs * a.seqlen, lin[6].module.in_features, device=device, dtype=dtype)
        for info, inp in ((lin[0], x), (lin[6], xi)):
            w = info.module
            t_dense = timed(lambda: w(inp), device)
            msg = [f"dense {t_dense * 1e3:.2f} ms"]
            for align in (1, 8, 64):
                cur = CURLinear.from_linear(w, 0.8, None, rank_align=align)
                t_c = timed(lambda: cur(inp), device)
                msg.append(f"CUR k={cur.rank} {t_c * 1e3:.2f} ms")
            report(f"bs{bs} {info.name.split('.')[-1]} {tuple(w.weight.shape)} at 0.8", ", ".join(msg))
        del runner, x, xi
        torch.cuda.empty_cache() if device.type == "cuda" else None
    # decompositions per shape: one SVD + every candidate
    seen = set()
    for info in lin[:7]:
        shape = tuple(info.module.weight.shape)
        if shape in seen:
            continue
        seen.add(shape)
        scale = torch.rand(shape[1], device=device) + 0.1
        t_all = timed(lambda: compress_candidates(info.module, ratios, scale, 0.5, method="acur"), device, 2, 1)
        from modules.cur_math import safe_svd, scaled_weight
        t_svd = timed(lambda: safe_svd(scaled_weight(info.module.weight.data, scale, 0.5)), device, 2, 1)
        C = info.module.weight.data.float()[:, : shape[1] // 3]
        t_pinv = timed(lambda: torch.linalg.pinv(C), device, 2, 1)
        report(f"decompose {shape}", f"all {len(ratios)} candidates {t_all:.2f} s (SVD {t_svd:.2f} s, "
               f"one pinv of {tuple(C.shape)} {t_pinv:.3f} s)")
    # the protocol's floor: every candidate runs the blocks at and after its layer, then the head
    nb = cfg.num_hidden_layers
    per_block_linears = len(lin) // nb
    tokens = a.n_calib_samples * a.seqlen
    fl_block = block_flops(cfg, tokens, a.seqlen)
    fl_head = 2 * cfg.hidden_size * cfg.vocab_size * tokens
    runs = sum(nb - b for b in range(nb)) * per_block_linears * len(ratios)
    total = runs * fl_block + len(lin) * len(ratios) * fl_head
    report("protocol FLOPs", f"{total:.3e} ({len(lin) * len(ratios)} candidates, {runs} block passes)")
    if peak:
        report("protocol floor at the matmul rate", f"{total / peak:.0f} s = {total / peak / 60:.1f} min")
    print("=" * 70)
    for name, value in rows:
        print(f"{name:42s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
