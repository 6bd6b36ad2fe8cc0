"""Time the ACUR pipeline stage by stage on a random-weight model of a real shape (no hub, no data).

    python tools/bench_pipeline.py --shape llama-2-7b                       # one GPU, default settings
    torchrun --nproc_per_node 2 tools/bench_pipeline.py --shape llama-2-7b  # sensitivity over 2 GPUs
    python tools/bench_pipeline.py --shape tiny-llama --device cpu --n_calib_samples 4 --seqlen 64

The stages are acur.py's own (activation statistics, ppl sensitivity, search, compression) on random
token calibration data, then a perplexity evaluation. Weights are random, so perplexities mean nothing;
the shapes, token counts and code paths are the real ones, so the times are.

--max_layers N runs the sensitivity and compression on N linears spread evenly over the depth and
extrapolates to all linears with a cost model fitted on that run (per-candidate evaluation time =
a + c * blocks run, decomposition time per weight shape); the model is checked against the measured
subset. A naive reference (full forward per candidate, a fresh decomposition per candidate, what
ASVD4LLM does) runs on --naive_layers layers, checks the fast path's perplexities against it, and is
extrapolated the same way, so the speed-up is measured in one run.

--stream runs the streamed pipeline (acur.py --stream, streamed.py) with random weights made block by block
on the fly (no checkpoint on disk: model_loading.StreamedModel over a RandomSource), --sensitivity_metric
fisher_error. --blocks N builds the shape with N of its blocks; the report gives each stage's time, its
per-block time with the fixed costs (capture, head, allocation) apart, peak GPU memory and host RSS, and the
whole model's figures extrapolated from the N measured blocks (labelled so). --in_memory_too runs the
in-memory pipeline on the same weights in the same call (the baseline of the streamed time).

    python tools/bench_pipeline.py --stream --shape llama-2-70b --blocks 8 --method srid \
        --sensitivity_metric fisher_error --n_calib_samples 16 --seqlen 2048 --eval_windows 8
    python tools/bench_pipeline.py --stream --shape tiny-llama --device cpu --blocks 2 --method srid \
        --sensitivity_metric fisher_error --n_calib_samples 4 --seqlen 64 --eval_windows 4   # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import acur  # noqa: E402
import datautils  # noqa: E402
import sensitivity as sens  # noqa: E402
from evaluate_utils import perplexity_of_windows  # noqa: E402
from modules.cur_linear import CURLinear  # noqa: E402
from modules import model_utils  # noqa: E402
from modules.model_utils import LinearInfo, find_linears, replace_module  # noqa: E402

# Published configurations (model cards' config.json); weights are random.
SHAPES: dict[str, tuple[str, dict]] = {
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "llama-2-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                  num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                  max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "opt-6.7b": ("opt", dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096)),
    "llama-2-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                                  max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "llama-3-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                  max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)),
    "small-llama": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=4, vocab_size=1024,
                                  max_position_embeddings=2048)),
    # not a published model: a LLaMA-layout shape small enough to profile the pipeline on a 2-core CPU
    # (random weights, like every shape here; tools/bench_pipeline.py --stream --profile_stream)
    "cpu-profile-llama": ("llama", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                        num_attention_heads=8, num_key_value_heads=8, vocab_size=8192,
                                        max_position_embeddings=2048)),
    # not a published model either: LLaMA-2-70B's proportions with every width / 8 (GQA 8:1, intermediate 3.5 x
    # hidden), for the memory of its streamed stages on a CPU (fp64 covariances scale as width^2: x 64 for 70B)
    "cpu-profile-70b": ("llama", dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=80,
                                      num_attention_heads=8, num_key_value_heads=1, vocab_size=4000,
                                      max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                 max_position_embeddings=512)),
    "tiny-opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                             vocab_size=256, max_position_embeddings=512, word_embed_proj_dim=64)),
}


def shape_config(shape: str, blocks: int = 0):
    """The transformers config of a named shape, with only `blocks` of its decoder blocks when given."""
    from transformers import LlamaConfig, OPTConfig
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    family, kw = SHAPES[shape]
    kw = {**kw, "num_hidden_layers": blocks} if blocks else kw
    return (LlamaConfig if family == "llama" else OPTConfig)(**kw)


class RandomSource:
    """model_loading's TensorSource of random weights, each tensor made on the device when a block asks for
    it (seeded by its name: the same weights every time, no checkpoint on disk). Norm weights 1, biases 0,
    the rest N(0, std^2) like transformers' own initialisation."""

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed, self.std = seed, std

    def names(self) -> None:
        return None

    def get(self, name: str, shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if name.endswith("bias"):
            return torch.zeros(shape, device=device, dtype=dtype)
        if "norm" in name.rsplit(".", 2)[-2]:  # input_layernorm, norm, final_layer_norm, ...
            return torch.ones(shape, device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=gen, device=device) * self.std).to(dtype)


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0, blocks: int = 0):
    """A random-initialised causal LM of a named shape, built directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM
    cfg = shape_config(shape, blocks)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list (all when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(items):
        return list(items)
    if n == 1:
        return [items[len(items) // 2]]
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


class SensitivityProfile:
    """Where the fast sensitivity path spends its time, recorded by wrapping sensitivity's own
    functions for one run: decompositions per weight shape (on a GPU they overlap the forwards),
    candidate evaluations per tail length, cache advancing, block-input capture."""

    def __init__(self, device: torch.device):
        self.device = device
        self.block, self.capture = 0, 0.0
        self.evals: list[tuple[int, float]] = []        # (block of the replaced layer, seconds)
        self.decomps: list[tuple[tuple, float]] = []    # (weight shape, seconds for all ratios)
        self.advance, self.advanced_blocks = 0.0, 0

    @contextmanager
    def active(self):
        prof, dev = self, self.device
        orig_dec = sens.decompose_candidates
        orig_tail, orig_adv, orig_cap = sens.BlockRunner.tail_ppl, sens.BlockRunner.advance_to, sens.BlockRunner._capture

        def clock(fn, *a):
            sync(dev)
            t0 = time.perf_counter()
            out = fn(*a)
            sync(dev)
            return out, time.perf_counter() - t0

        def decompose(info, ratios, scales, alpha, cur_kwargs, stream=None, *rest, **kw):
            t0 = time.perf_counter()
            out = orig_dec(info, ratios, scales, alpha, cur_kwargs, stream, *rest, **kw)
            if stream is None:  # no side stream: finish the work before reading the clock
                sync(dev)
            prof.decomps.append((tuple(info.module.weight.shape), time.perf_counter() - t0))
            return out

        def tail_ppl(runner):
            out, dt = clock(orig_tail, runner)
            prof.evals.append((prof.block, dt))
            return out

        def advance_to(runner, block):
            before = runner.block
            prof.block = block
            out, dt = clock(orig_adv, runner, block)
            prof.advance += dt
            prof.advanced_blocks += runner.block - before
            return out

        def capture(runner):
            _, dt = clock(orig_cap, runner)
            prof.capture += dt

        sens.decompose_candidates = decompose
        sens.BlockRunner.tail_ppl, sens.BlockRunner.advance_to, sens.BlockRunner._capture = tail_ppl, advance_to, capture
        try:
            yield self
        finally:
            sens.decompose_candidates = orig_dec
            sens.BlockRunner.tail_ppl, sens.BlockRunner.advance_to, sens.BlockRunner._capture = orig_tail, orig_adv, orig_cap


def fit_cost_model(profile: SensitivityProfile, n_blocks: int, overlap: bool) -> dict:
    """Candidate evaluation = a + c * blocks run (least squares), advance time per block, decomposition
    time (all ratios) per weight shape; `overlap`: decompositions run beside the forwards."""
    xs = [n_blocks - b if b >= 0 else 1 for b, _ in profile.evals]
    ys = [t for _, t in profile.evals]
    if len(set(xs)) >= 2:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        c = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = my - c * mx
        if a < 0 or c < 0:  # noisy timings: fall back to a line through the origin
            a, c = 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    else:
        a, c = 0.0, (statistics.fmean(ys) / xs[0] if xs else 0.0)
    per_shape: dict[str, list[float]] = {}
    for shape, t in profile.decomps:
        per_shape.setdefault("x".join(map(str, shape)), []).append(t)
    return {"eval_a": a, "eval_c": c, "overlap": overlap,
            "advance_per_block": profile.advance / profile.advanced_blocks if profile.advanced_blocks else c,
            "capture": profile.capture, "decomp_total": sum(t for _, t in profile.decomps),
            "eval_total": sum(ys), "advance_total": profile.advance,
            "shape": {k: {"decomp": statistics.fmean(v)} for k, v in per_shape.items()}}


def _shape_cost(cost: dict, shape: tuple[int, int], key: str = "decomp") -> float:
    """Measured time for this weight shape, or the nearest measured shape scaled by m*n*min(m,n)."""
    name = "x".join(map(str, shape))
    if name in cost["shape"]:
        return cost["shape"][name][key]
    work = shape[0] * shape[1] * min(shape)

    def w(k):
        m, n = map(int, k.split("x"))
        return m * n * min(m, n)
    ref = min(cost["shape"], key=lambda k: abs(math.log(w(k) / work)))
    return cost["shape"][ref][key] * work / w(ref)


def predict_sensitivity(cost: dict, linears: list[LinearInfo], n_ratios: int, n_blocks: int,
                        world: int = 1) -> float:
    """Fast-path seconds for these linears under the fitted cost model (the slowest rank's share).
    With overlap, layer i's forwards run beside layer i+1's decompositions."""
    worst = 0.0
    for share in sens.shard_layers(linears, world, n_blocks) if world > 1 else [linears]:
        if not share:
            continue
        t, pos = cost["capture"], 0
        dec = [_shape_cost(cost, tuple(i.module.weight.shape)) for i in share]
        t += dec[0]
        for j, info in enumerate(share):
            blk = info.block if info.block >= 0 else pos
            main = (blk - pos) * cost["advance_per_block"]
            pos = blk
            tail = n_blocks - info.block if info.block >= 0 else 1
            main += n_ratios * (cost["eval_a"] + cost["eval_c"] * tail)
            nxt = dec[j + 1] if j + 1 < len(dec) else 0.0
            t += max(main, nxt) if cost["overlap"] else main + nxt
        worst = max(worst, t)
    return worst


def naive_reference(model, layers: list[LinearInfo], calib_ids, ratios, scales, args, device) -> dict:
    """ASVD4LLM's loop on a few layers: per candidate a fresh decomposition and a full forward pass."""
    out = {"layers": {}, "decomp": [], "forward": []}
    for info in layers:
        original, row = info.module, {}
        try:
            for r in ratios:
                sync(device)
                t0 = time.perf_counter()
                cur = CURLinear.from_linear(original, r, acur.layer_scale(scales, info.name), args.alpha,
                                            **acur.cur_settings(args))
                sync(device)
                t1 = time.perf_counter()
                replace_module(info, cur)
                row[sens.ratio_key(r)] = perplexity_of_windows(model, calib_ids, args.calib_batch_size, desc=None)
                sync(device)
                out["decomp"].append(t1 - t0)
                out["forward"].append(time.perf_counter() - t1)
                replace_module(info, original)
        finally:
            replace_module(info, original)
        out["layers"][info.name] = row
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="llama-2-7b", choices=list(SHAPES))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto = float16 on CUDA, float32 on CPU")
    p.add_argument("--n_calib_samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=4, help="calibration samples per forward pass")
    p.add_argument("--sensitivity_ratios", default=None, help="default: the metric's (acur.py)")
    p.add_argument("--sensitivity_metric", default="ppl", choices=["ppl", "fisher_error"],
                   help="fisher_error: the closed-form pipeline (covariance, output fisher, loss curves, "
                        "allocation), always run in full")
    p.add_argument("--method", default="acur", help="acur.py's --method (with fisher_error: e.g. srid, wsvd)")
    p.add_argument("--param_ratio_target", type=float, default=0.9)
    p.add_argument("--max_layers", type=int, default=0,
                   help="sensitivity/compression on this many linears spread over the depth, then "
                        "extrapolated (0 = all)")
    p.add_argument("--naive_layers", type=int, default=2, help="layers of the naive reference loop (0 = skip)")
    p.add_argument("--eval_windows", type=int, default=166,
                   help="perplexity windows of --seqlen random tokens (166 x 2048 ~ WikiText-2 test)")
    p.add_argument("--sensitivity_only", action="store_true",
                   help="stop after the sensitivity stage (the 1-GPU vs multi-GPU comparison)")
    p.add_argument("--compile_blocks", default="auto", choices=["auto", "on", "off"],
                   help="acur.py's flag: torch.compile of the sensitivity's blocks (auto: on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json_out", default=None, help="write every number (and the sensitivity table) here")
    p.add_argument("--blocks", type=int, default=0, help="build the shape with this many of its decoder blocks "
                   "(0 = all); --stream extrapolates the whole model from them")
    g = p.add_argument_group("streamed (--stream)")
    g.add_argument("--stream", action="store_true",
                   help="the streamed pipeline on random weights made block by block (needs --sensitivity_metric "
                        "fisher_error); per-block figures, fixed costs apart, whole model extrapolated")
    g.add_argument("--stream_dir", default=None,
                   help="parent folder of the run folder (default: the system's temporary folder); removed at the end")
    g.add_argument("--keep_stream_dir", action="store_true", help="keep the run folder (compressed blocks)")
    g.add_argument("--in_memory_too", action="store_true",
                   help="also run the in-memory pipeline on the same weights in the same call (the baseline)")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (warn only: the warnings name the non-deterministic "
                        "kernels) with a deterministic cuBLAS workspace, for the run: do streamed and in-memory "
                        "ranks agree on a GPU then? (they do on the CPU; on an H100 they differed)")
    g.add_argument("--stream_ram_gib", type=float, default=None,
                   help="acur.py's flag: host RAM for the stored block inputs (default: half the available RAM)")
    g.add_argument("--stream_micro_batch", type=int, default=0,
                   help="acur.py's flag: calibration samples per reverse-pass / covariance product (0 = automatic)")
    g.add_argument("--profile_stream", action="store_true",
                   help="time the streamed passes' parts (block reads, recomputes, covariance products, sensitivity "
                        "rows, entry writes and loads, checksums) by thread, and count the block passes of both modes")
    g.add_argument("--gpu_memory_cap_gib", type=float, default=0,
                   help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction); 0 = no cap")
    return p


def acur_args(a, extra: list[str] | None = None) -> argparse.Namespace:
    """acur.py's own arguments for the same settings, so its stage functions run unchanged."""
    return acur.build_parser().parse_args((extra or []) + [
        "--model_id", a.shape, "--param_ratio_target", str(a.param_ratio_target), "--act_aware",
        "--n_calib_samples", str(a.n_calib_samples), "--calib_seqlen", str(a.seqlen),
        "--calib_batch_size", str(a.batch_size), "--sensitivity_metric", a.sensitivity_metric,
        "--method", a.method, "--seed", str(a.seed), "--device", a.device, "--dtype", a.dtype,
        "--compile_blocks", a.compile_blocks]
        + (["--sensitivity_ratios", a.sensitivity_ratios] if a.sensitivity_ratios else []))


def run_closed_form(a, args, rep: dict, stage, model, calib_ids, linears) -> dict:
    """--sensitivity_metric fisher_error: every stage in full (nothing extrapolated): activation
    statistics, input covariances, output fisher, loss curves, allocation, compression (sequential
    when the method is), evaluation; peak GPU memory per stage."""
    scales = stage("calibration", acur.stage_scales, model, linears, calib_ids, args, {})
    covs = stage("covariance", acur.stage_covariance, model, linears, calib_ids, args, {})
    fisher = stage("fisher", acur.stage_fisher, model, linears, calib_ids, args, {})
    stats = acur.layer_stats(linears, scales, covs, fisher, calib_ids.numel())
    table, _ = stage("sensitivity", acur.stage_sensitivity, model, linears, calib_ids, scales, args, {}, covs, stats)
    rep["sensitivity_table"] = table
    ratios, _ = stage("search", acur.stage_search, model, linears, calib_ids, scales, table, args, covs, stats)
    report = stage("compress", acur.compress_model, linears, ratios, scales, args, desc=None, covs=covs,
                   stats=stats, sequential=(model, calib_ids))
    rep["param_ratio_reached"] = acur.summarize_params(report)["reached"]
    rep["ranks"] = {k: v["rank"] for k, v in report.items()}
    gen = torch.Generator().manual_seed(a.seed + 1)
    eval_ids = torch.randint(0, model.config.vocab_size, (a.eval_windows, a.seqlen), generator=gen)
    rep["eval_ppl_random"] = stage("eval_ppl", perplexity_of_windows, model, eval_ids, 1, desc=None)
    pipeline = ("calibration", "covariance", "fisher", "sensitivity", "search", "compress")
    rep["pipeline_s"] = round(sum(rep["stages"][k]["seconds"] for k in pipeline), 1)
    rep["total_full_estimate_s"] = round(rep["pipeline_s"] + rep["stages"]["eval_ppl"]["seconds"], 1)
    rep["model_gib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)
    return rep


def host_rss() -> dict[str, float]:
    """This process's resident memory now and at its peak (GiB; Linux /proc/self/status)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["now" if line.startswith("VmRSS") else "peak"] = round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass
    return out


def make_stage(stages: dict, device: torch.device, verbose: bool = True):
    """stage(name, fn, *args): fn timed (synchronised), with its peak GPU memory and host RSS, into `stages`."""
    def stage(name, fn, *x, scope="full", **kw):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        out = fn(*x, **kw)
        sync(device)
        stages[name] = {"seconds": round(time.perf_counter() - t0, 3), "scope": scope, "peak_gib": peak_gib(device),
                        "host_rss_gib": host_rss()}
        if verbose:
            print(f"[bench] {name}: {stages[name]['seconds']:.2f} s ({scope})"
                  + (f", peak {stages[name]['peak_gib']:.1f} GiB" if device.type == "cuda" else "")
                  + f", host RSS peak {stages[name]['host_rss_gib'].get('peak', float('nan')):.2f} GiB", flush=True)
        return out
    return stage


PIPELINE_STAGES = ("statistics", "reverse", "search", "compress")


def extrapolate(stages: dict, block_seconds: dict, n_blocks: int, full_blocks: int) -> dict:
    """Per stage: fixed seconds (stage time less its blocks'), seconds per block (mean, median), and the
    whole model's time extrapolated as fixed + full_blocks x the mean measured block."""
    out = {}
    for name, s in stages.items():
        per = block_seconds.get(name, [])
        if not per:
            out[name] = {"fixed_s": s["seconds"], "per_block_s": 0.0, "whole_model_s": s["seconds"]}
            continue
        mean = statistics.fmean(per)
        fixed = max(s["seconds"] - sum(per), 0.0)
        out[name] = {"fixed_s": round(fixed, 3), "per_block_s": round(mean, 3),
                     "per_block_median_s": round(statistics.median(per), 3), "blocks_measured": len(per),
                     "whole_model_s": round(fixed + mean * full_blocks, 1)}
    return out


class StreamProfile:
    """Where a streamed run (and the in-memory baseline) spends its time, recorded by wrapping the functions the
    passes call, for one run: seconds per part and per thread (main: the critical path; stream-reader and
    stream-writer run beside it), bytes written per entry kind, and block passes counted with global module
    hooks, in samples over (calibration samples x blocks): decoder-layer calls started (the sequential fit's
    input captures stop inside a block) and completed, attention forwards completed (they also count the
    in-memory fisher's checkpointed recomputes, which bypass the layer's own hooks) and layer backwards."""

    def __init__(self, n_samples: int, n_blocks: int):
        self.n_samples, self.n_blocks = n_samples, n_blocks
        self.parts: dict[str, dict[str, float]] = {}
        self.bytes: dict[str, int] = {}
        self.passes: dict[str, dict[str, float]] = {}
        self.label = "startup"

    def add(self, part: str, seconds: float) -> None:
        import threading
        thread = threading.current_thread().name.split("_")[0]
        row = self.parts.setdefault(f"{part} [{'main' if thread == 'MainThread' else thread}]", {"s": 0.0, "calls": 0})
        row["s"] += seconds
        row["calls"] += 1

    def timed(self, part: str, fn):
        """fn, its seconds added to `part`. On the main thread the device is synchronised before and after,
        so a part is charged for its own kernels, not for those queued before it (a reader or writer thread
        does not synchronise: it would wait for the main thread's kernels)."""
        import threading

        def sync() -> None:
            if torch.cuda.is_available() and threading.current_thread() is threading.main_thread():
                torch.cuda.synchronize()

        def wrapper(*x, **kw):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*x, **kw)
            finally:
                sync()
                self.add(part, time.perf_counter() - t0)
        return wrapper

    def staged(self, part: str, fn):
        """timed, with the stage it runs in (the decompositions run in the sensitivity and the compression)."""
        def wrapper(*x, **kw):
            return self.timed(f"{part} ({self.label})", fn)(*x, **kw)
        return wrapper

    def _count(self, kind: str, samples: int) -> None:
        row = self.passes.setdefault(self.label, {})
        row[kind] = row.get(kind, 0) + samples

    @contextmanager
    def active(self, sm):
        import acur as acur_mod
        import streamed
        from torch.nn.modules import module as nn_module
        prof = self
        layer_cls = type(sm.layers[0])
        attn_cls = type(next(m for n, m in sm.layers[0].named_modules() if n.endswith(("self_attn", "attention"))))
        saved = []

        def patch(obj, name, new):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, new)

        for name, part in (("block_activation_stats", "statistics forward + |x| sums"),
                           ("block_covariances", "covariance recompute + products"),
                           ("block_output_fisher", "fisher recompute fwd + bwd"),
                           ("head_output_grads", "head gradients"), ("run_block", "block forward (eval, regenerate)"),
                           ("tensors_digest", "sha256 of entries"), ("compressed_block", "compressed block from folder")):
            if hasattr(streamed, name):
                patch(streamed, name, self.timed(part, getattr(streamed, name)))
        patch(acur_mod, "stream_fit_block", self.timed("compress fit (calibrate_block)", acur_mod.stream_fit_block))
        from modules import decompositions as dec
        for name, part in (("row_gram", "row Gram D W Sigma W^T D, fp64"), ("pivoted_cholesky", "pivoted Cholesky picks"),
                           ("shrunk_covariance", "covariance shrinkage + damping"), ("all_finite", "finiteness checks")):
            patch(dec, name, self.staged(part, getattr(dec, name)))
        import act_aware_utils
        patch(act_aware_utils, "_add_product", self.staged("covariance product into the fp64 sum",
                                                           act_aware_utils._add_product))
        real_rows = acur_mod.stream_rows
        patch(acur_mod, "stream_rows", lambda *x, **kw: self.timed("sensitivity rows", real_rows(*x, **kw)))
        patch(type(sm), "block", self.timed("read block (source)", type(sm).block))
        patch(type(sm), "capture", self.timed("capture (embeddings)", type(sm).capture))
        real_write = streamed.RunFolder._write

        def write(folder, kind, b, tensors):
            prof.bytes[kind] = prof.bytes.get(kind, 0) + sum(t.numel() * t.element_size() for t in tensors.values())
            return real_write(folder, kind, b, tensors)
        patch(streamed.RunFolder, "_write", self.timed("entry write to disk", write))
        patch(streamed.RunFolder, "save", self.timed("entry save call (RAM copy, queue wait)", streamed.RunFolder.save))
        patch(streamed.RunFolder, "mark", self.timed("marker call (queue wait)", streamed.RunFolder.mark))
        patch(streamed.RunFolder, "drop", self.timed("drop call (queue wait)", streamed.RunFolder.drop))
        patch(streamed.RunFolder, "load", self.timed("entry load", streamed.RunFolder.load))

        def real_call(mod) -> bool:  # not a pass-through of capture_block_inputs
            return mod.__dict__.get("forward") is not model_utils._identity_forward

        def samples(x) -> int:
            x = x[0] if isinstance(x, (tuple, list)) and x else x
            return x.shape[0] if isinstance(x, torch.Tensor) else 0

        def pre(mod, args):
            if isinstance(mod, layer_cls) and real_call(mod):
                prof._count("layer calls started", samples(args) if args else 0)

        def post(mod, args, out):
            if isinstance(mod, layer_cls) and real_call(mod):
                prof._count("layer forwards completed", samples(out))
            elif isinstance(mod, attn_cls):
                prof._count("attention forwards completed", samples(out))

        def bwd(mod, grad_in, grad_out):
            if isinstance(mod, layer_cls):
                prof._count("layer backwards", samples(grad_out))

        handles = [nn_module.register_module_forward_pre_hook(pre), nn_module.register_module_forward_hook(post),
                   nn_module.register_module_full_backward_hook(bwd)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for obj, name, old in reversed(saved):
                setattr(obj, name, old)

    def labelled(self, stage):
        """The bench's stage function, recording which stage the counted passes belong to."""
        def wrapped(name, fn, *x, **kw):
            self.label = name
            return stage(name, fn, *x, **kw)
        return wrapped

    def report(self, eval_samples: int) -> dict:
        per_block = {}
        for label, row in self.passes.items():
            n = eval_samples if "eval" in label else self.n_samples
            per_block[label] = {k: round(v / (n * self.n_blocks), 2) for k, v in row.items()}
        return {"parts": {k: {"s": round(v["s"], 3), "calls": v["calls"]} for k, v in
                          sorted(self.parts.items(), key=lambda kv: -kv[1]["s"])},
                "bytes_written": self.bytes, "passes_per_block": per_block}


def print_stream_profile(prof: dict) -> None:
    print("streamed parts (seconds summed per thread; [main] is the critical path, the others run beside it):")
    for name, row in prof["parts"].items():
        print(f"  {name:62s} {row['s']:8.2f} s  {row['calls']:6d} calls")
    print("bytes written to the run folder: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in
                                                        prof["bytes_written"].items()))
    print("block passes per block (samples through a block / (samples x blocks)):")
    for label, row in prof["passes_per_block"].items():
        print(f"  {label:22s} " + ", ".join(f"{k} {v:g}" for k, v in row.items()))


def run_stream_bench(a) -> dict:
    """The streamed pipeline on random weights made block by block; see the module docstring."""
    import model_loading
    args = acur_args(a, ["--stream", "on", "--stream_micro_batch", str(a.stream_micro_batch)]
                     + (["--stream_ram_gib", str(a.stream_ram_gib)] if a.stream_ram_gib is not None else []))
    acur.validate_args(args)
    device, dtype = datautils.pick_device_dtype(args)
    if a.gpu_memory_cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.gpu_memory_cap_gib * 2**30 / total),
                                                   torch.cuda.current_device() if device.index is None else device.index)
    full_blocks = shape_config(a.shape).num_hidden_layers
    config = shape_config(a.shape, a.blocks)
    rep: dict = {"shape": a.shape, "mode": "streamed", "device": torch.cuda.get_device_name(device)
                 if device.type == "cuda" else "cpu", "dtype": str(dtype), "torch": torch.__version__,
                 "blocks_measured": config.num_hidden_layers, "blocks_full": full_blocks,
                 "settings": {k: v for k, v in vars(a).items() if k != "json_out"}, "stages": {}}
    stage = make_stage(rep["stages"], device)
    source = RandomSource(a.seed, getattr(config, "initializer_range", 0.02))
    sm = stage("build_skeleton", model_loading.StreamedModel, config, source, device, dtype)
    if a.profile_stream:
        prof = StreamProfile(a.n_calib_samples, config.num_hidden_layers)
        with prof.active(sm):
            rep = stream_bench_run(a, args, rep, prof.labelled(stage), sm, source, config, device, dtype, full_blocks,
                                   prof)
        rep["profile"] = prof.report(a.eval_windows)
        return rep
    return stream_bench_run(a, args, rep, stage, sm, source, config, device, dtype, full_blocks)


def stream_bench_run(a, args, rep: dict, stage, sm, source, config, device, dtype, full_blocks: int,
                     prof: StreamProfile | None = None) -> dict:
    """run_stream_bench's runs (the streamed one, then the in-memory one with --in_memory_too), stage by stage."""
    import streamed
    linears = acur.select_linears(sm.model, args)
    gen = torch.Generator().manual_seed(a.seed)
    calib_ids = torch.randint(0, config.vocab_size, (a.n_calib_samples, a.seqlen), generator=gen)
    eval_ids = torch.randint(0, config.vocab_size, (a.eval_windows, a.seqlen),
                             generator=torch.Generator().manual_seed(a.seed + 1))
    rep.update(params_measured=sum(p.numel() for p in sm.model.parameters()), n_linears=len(linears),
               calib_tokens=calib_ids.numel(), block_gib=round(sm.block_bytes() / 2**30, 3))
    parent = Path(a.stream_dir) if a.stream_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"bench-stream-{a.shape}-", dir=parent))
    try:
        folder, disk = acur.open_stream_folder(sm, args, {"bench": a.shape, "seed": a.seed}, path)
        n = sm.n_blocks
        progress = streamed.StreamProgress(acur.stream_passes(args, 1) * n, n)
        results: dict = {"warnings": []}
        try:
            report = acur.stream_compress(sm, linears, calib_ids, args, folder, progress, results, stage)
            rep["eval_ppl_random"] = stage("eval", streamed.perplexity, sm, eval_ids, 1,
                                           lambda b: streamed.compressed_block(sm, folder, b), progress, "eval")
        finally:
            progress.close()
            folder.close()
        rep["stored_inputs"] = acur.stored_inputs_report(folder)
        rep["param_ratio_reached"] = acur.summarize_params(report)["reached"]
        rep["ranks"] = {k: v["rank"] for k, v in report.items()}
        rep["run_folder_gib"] = round(sum(p.stat().st_size for p in path.iterdir()) / 2**30, 3)
    finally:
        if not a.keep_stream_dir:
            shutil.rmtree(path, ignore_errors=True)
    per = extrapolate({k: v for k, v in rep["stages"].items() if k != "build_skeleton"}, progress.block_seconds,
                      n, full_blocks)
    rep["per_stage"] = per
    rep["pipeline_s"] = round(sum(rep["stages"][k]["seconds"] for k in PIPELINE_STAGES if k in rep["stages"]), 1)
    boundary = disk["boundary"]
    rep["disk_gib"] = {"measured_need": round(disk["need"] / 2**30, 3),
                       "whole_model_extrapolated": round(max((full_blocks + 3) * boundary,
                                                             disk["blocks"] / n * full_blocks + 4 * boundary)
                                                         / 2**30, 1)}
    rep["whole_model_extrapolated"] = {
        "label": f"EXTRAPOLATED from {n} measured blocks to {full_blocks}: per stage fixed seconds + "
                 f"{full_blocks} x the mean measured block (memory: one block is held at a time, and the next one loading, so the measured "
                 "peaks stand)",
        "pipeline_s": round(sum(per[k]["whole_model_s"] for k in PIPELINE_STAGES if k in per), 1),
        "with_eval_s": round(sum(per[k]["whole_model_s"] for k in (*PIPELINE_STAGES, "eval") if k in per), 1)}
    rep["peak_gpu_gib"] = max((s["peak_gib"] or 0) for s in rep["stages"].values()) if device.type == "cuda" else None
    rep["peak_host_rss_gib"] = host_rss().get("peak")
    if a.in_memory_too:
        rep["in_memory"] = in_memory_baseline(a, args, sm, source, config, device, dtype, calib_ids, prof)
        rep["in_memory"]["ranks_equal"] = rep["in_memory"].pop("ranks") == rep["ranks"]
    return rep


def in_memory_baseline(a, args, sm, source, config, device, dtype, calib_ids, prof: StreamProfile | None = None) -> dict:
    """run_closed_form on the same random weights, the whole model in memory (every block made at once)."""
    import model_loading
    mem: dict = {"stages": {}}
    stage = make_stage(mem["stages"], device)
    if prof is not None:  # its block passes counted under "in-memory STAGE"
        def stage(name, fn, *x, _inner=stage, **kw):
            prof.label = f"in-memory {name}"
            return _inner(name, fn, *x, **kw)

    def whole():
        m = model_loading.StreamedModel(config, source, device, dtype)
        for b in range(m.n_blocks):
            m.layers[b] = m.block(b)
        return m.model
    model = stage("build_model", whole)
    linears = find_linears(model)
    mem.update(params=sum(p.numel() for p in model.parameters()), n_linears=len(linears),
               n_blocks=config.num_hidden_layers, calib_tokens=calib_ids.numel(), shape=a.shape,
               device=str(device), dtype=str(dtype), settings={"method": a.method})
    mem = run_closed_form(a, args, mem, stage, model, calib_ids, linears)
    mem["peak_gpu_gib"] = max((s["peak_gib"] or 0) for s in mem["stages"].values()) if device.type == "cuda" else None
    mem["peak_host_rss_gib"] = host_rss().get("peak")
    del model
    return mem


def print_stream_report(rep: dict) -> None:
    print("=" * 78)
    print(f"{rep['shape']} STREAMED, {rep['blocks_measured']} of {rep['blocks_full']} blocks ({rep['block_gib']} GiB "
          f"a block), {rep['n_linears']} linears, on {rep['device']}, {rep['dtype']}, {rep['calib_tokens']} calibration "
          f"tokens, method {rep['settings']['method']}, sensitivity fisher_error")
    print(f"{'stage':14s} {'measured s':>10s} {'fixed s':>8s} {'s/block':>8s} {'whole model s':>14s} "
          f"{'peak GPU GiB':>12s} {'host RSS peak GiB':>17s}")
    for name, s in rep["stages"].items():
        p = rep["per_stage"].get(name, {})
        pk = f"{s['peak_gib']:.1f}" if s.get("peak_gib") is not None else "-"
        print(f"{name:14s} {s['seconds']:10.2f} {p.get('fixed_s', 0):8.2f} {p.get('per_block_s', 0):8.3f} "
              f"{p.get('whole_model_s', s['seconds']):14.1f} {pk:>12s} {s['host_rss_gib'].get('peak', float('nan')):17.2f}")
    w = rep["whole_model_extrapolated"]
    print(f"pipeline measured ({rep['blocks_measured']} blocks): {rep['pipeline_s']:.1f} s; reached ratio "
          f"{rep['param_ratio_reached']:.4f}; run folder at the end {rep['run_folder_gib']} GiB")
    print(f"{w['label']}")
    print(f"  pipeline {w['pipeline_s']:.0f} s = {w['pipeline_s'] / 60:.1f} min (with evaluation {w['with_eval_s']:.0f} s); "
          f"disk needed {rep['disk_gib']['whole_model_extrapolated']} GiB")
    gpu = f"{rep['peak_gpu_gib']:.1f} GiB" if rep["peak_gpu_gib"] is not None else "-"
    print(f"peak GPU memory {gpu}, peak host RSS {rep['peak_host_rss_gib']} GiB")
    if "in_memory" in rep:
        m = rep["in_memory"]
        print(f"in memory, same weights, same call: pipeline {m['pipeline_s']:.1f} s (streamed/in-memory "
              f"{rep['pipeline_s'] / m['pipeline_s']:.2f}x), peak GPU {m['peak_gpu_gib']} GiB, ranks equal: "
              f"{m['ranks_equal']}, random-token ppl {m['eval_ppl_random']:.6g} vs streamed {rep['eval_ppl_random']:.6g}")


def run_bench(a) -> dict:
    """All stages, timed; returns the report dict (rank 0's; other ranks return after sensitivity)."""
    args = acur_args(a)
    acur.validate_args(args)
    rank = acur.init_distributed(args)
    world = sens.dist_rank_world()[1]
    device, dtype = datautils.pick_device_dtype(args)
    ratios = acur.sensitivity_ratios(args)
    rep: dict = {"shape": a.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "world_size": world, "dtype": str(dtype), "torch": torch.__version__,
                 "settings": {k: v for k, v in vars(a).items() if k != "json_out"}, "stages": {}}
    stages = rep["stages"]
    stage = make_stage(stages, device, verbose=rank == 0)

    model = stage("build_model", build_model, a.shape, device, dtype, a.seed, a.blocks)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(a.seed)
    calib_ids = torch.randint(0, vocab, (a.n_calib_samples, a.seqlen), generator=gen)
    linears = find_linears(model)
    n_blocks = 1 + max(i.block for i in linears)
    subset = spread(linears, a.max_layers)
    scope = "full" if len(subset) == len(linears) else f"{len(subset)}/{len(linears)} linears"
    n_tokens = a.n_calib_samples * a.seqlen
    rep.update(params=sum(p.numel() for p in model.parameters()), n_linears=len(linears),
               n_blocks=n_blocks, n_sens_linears=len(subset), calib_tokens=n_tokens)
    if a.sensitivity_metric == "fisher_error":
        return run_closed_form(a, args, rep, stage, model, calib_ids, linears)

    scales = stage("calibration", acur.stage_scales, model, linears, calib_ids, args, {})
    profile = SensitivityProfile(device)
    with profile.active():
        table, _ = stage("sensitivity", acur.stage_sensitivity, model, subset, calib_ids, scales, args, {},
                         scope=scope)
    rep["sensitivity_table"] = table
    cost = fit_cost_model(profile, n_blocks, overlap=device.type == "cuda")
    rep["cost_model"] = cost
    sens_measured = stages["sensitivity"]["seconds"]
    pred_subset = predict_sensitivity(cost, subset, len(ratios), n_blocks, world)
    pred_full = predict_sensitivity(cost, linears, len(ratios), n_blocks, world)
    # scale by how well the model matched the measured subset (self-correcting extrapolation)
    stages["sensitivity"]["model_on_subset"] = round(pred_subset, 3)
    stages["sensitivity"]["full_estimate"] = round(sens_measured * pred_full / pred_subset, 1) if pred_subset else None
    n_cand_sub = len(subset) * len(ratios)
    stages["sensitivity"]["candidate_tokens_per_s"] = round(n_cand_sub * n_tokens / sens_measured)
    if (world > 1 and rank != 0) or a.sensitivity_only:
        return rep

    layer_ratios, _ = stage("search", acur.stage_search, model, subset, calib_ids, scales, table, args, scope=scope)
    originals = {i.name: i.module for i in subset}
    report = stage("compress", acur.compress_model, subset, layer_ratios, scales, args, desc=None, scope=scope)
    n_comp = sum(1 for v in report.values() if v["rank"] is not None)
    per_layer = stages["compress"]["seconds"] / max(n_comp, 1)
    stages["compress"]["compressed_layers"] = n_comp
    stages["compress"]["full_estimate"] = round(per_layer * n_comp * len(linears) / len(subset), 1)
    rep["param_ratio_reached"] = acur.summarize_params(report)["reached"]
    eval_ids = torch.randint(0, vocab, (a.eval_windows, a.seqlen), generator=gen)
    ppl = stage("eval_ppl", perplexity_of_windows, model, eval_ids, 1, desc=None)
    stages["eval_ppl"]["tokens_per_s"] = round(a.eval_windows * a.seqlen / stages["eval_ppl"]["seconds"])
    rep["eval_ppl_random"] = ppl
    acur.restore_model(subset, originals)
    del report
    for name, s in stages.items():
        s.setdefault("full_estimate", s["seconds"])
    rep["total_full_estimate_s"] = round(sum(s["full_estimate"] for k, s in stages.items()
                                             if k != "build_model"), 1)

    if a.naive_layers > 0:
        naive_set = spread(subset, a.naive_layers)
        naive = stage("naive_reference", naive_reference, model, naive_set, calib_ids, ratios, scales, args,
                      device, scope=f"{len(naive_set)} linears")
        fwd = statistics.fmean(naive["forward"])
        # per candidate the naive loop decomposes one ratio from a fresh SVD: use its measured time
        dec_by_shape: dict[tuple, list[float]] = {}
        for info, i in zip([x for x in naive_set for _ in ratios], range(len(naive["decomp"]))):
            dec_by_shape.setdefault(tuple(info.module.weight.shape), []).append(naive["decomp"][i])
        dec_cost = {"shape": {"x".join(map(str, k)): {"decomp": statistics.fmean(v)} for k, v in dec_by_shape.items()}}
        naive_full = len(linears) * len(ratios) * fwd + len(ratios) * sum(
            _shape_cost(dec_cost, tuple(i.module.weight.shape)) for i in linears)
        diffs = [abs(naive["layers"][n][r] - table[n][r]) / abs(naive["layers"][n][r])
                 for n in naive["layers"] for r in naive["layers"][n]
                 if math.isfinite(naive["layers"][n][r]) and naive["layers"][n][r] != 0]
        rep["naive"] = {"forward_per_candidate_s": fwd, "decomp_per_candidate_s": statistics.fmean(naive["decomp"]),
                        "full_estimate_s": round(naive_full, 1),
                        "candidate_tokens_per_s": round(n_tokens / (fwd + statistics.fmean(naive["decomp"]))),
                        "max_rel_ppl_diff_vs_fast": max(diffs) if diffs else None, "table": naive["layers"]}
        stages["naive_reference"]["full_estimate"] = round(naive_full, 1)
        rep["speedup_sensitivity"] = round(naive_full / stages["sensitivity"]["full_estimate"], 2)
    return rep


def print_report(rep: dict) -> None:
    print("=" * 78)
    if "pipeline_s" in rep:  # closed-form pipeline: every stage measured in full
        print(f"{rep['shape']} ({rep['params'] / 1e9:.2f} B params, {rep['model_gib']} GiB, {rep['n_linears']} linears) "
              f"on {rep['device']}, {rep['dtype']}, {rep['calib_tokens']} calibration tokens, "
              f"method {rep['settings']['method']}, sensitivity fisher_error")
        for name, s in rep["stages"].items():
            pk = f"{s['peak_gib']:.1f}" if s.get("peak_gib") is not None else "-"
            print(f"{name:14s} {s['seconds']:9.2f} s   peak {pk:>6s} GiB")
        print(f"pipeline (calibration, covariance, fisher, sensitivity, search, compression): {rep['pipeline_s']:.1f} s "
              f"= {rep['pipeline_s'] / 60:.2f} min; reached ratio {rep['param_ratio_reached']:.4f}")
        return
    print(f"{rep['shape']} ({rep['params'] / 1e9:.2f} B params, {rep['n_linears']} linears) on "
          f"{rep['world_size']} x {rep['device']}, {rep['dtype']}, {rep['calib_tokens']} calibration tokens")
    print(f"{'stage':18s} {'measured s':>11s}  {'scope':22s} {'full est. s':>11s} {'peak GiB':>9s}")
    for name, s in rep["stages"].items():
        pk = f"{s['peak_gib']:.1f}" if s.get("peak_gib") is not None else "-"
        print(f"{name:18s} {s['seconds']:11.2f}  {s['scope']:22s} {s.get('full_estimate', s['seconds']):11.1f} {pk:>9s}")
    if "total_full_estimate_s" in rep and "eval_ppl" in rep["stages"]:
        print(f"pipeline total (calibration..eval, full setting): {rep['total_full_estimate_s']:.1f} s "
              f"= {rep['total_full_estimate_s'] / 60:.1f} min")
    sm, cm = rep["stages"]["sensitivity"], rep["cost_model"]
    print(f"sensitivity: cost model on the measured subset {sm['model_on_subset']:.1f} s vs measured "
          f"{sm['seconds']:.1f} s; {sm['candidate_tokens_per_s']:,} candidate-tokens/s")
    print(f"  of which: evaluations {cm['eval_total']:.1f} s (a {cm['eval_a']:.3f} s + {cm['eval_c']:.4f} s per "
          f"block pass), advancing {cm['advance_total']:.1f} s, capture {cm['capture']:.1f} s, decompositions "
          f"{cm['decomp_total']:.1f} s ({'beside the forwards' if cm['overlap'] else 'in line'}); per shape "
          + ", ".join(f"{k} {v['decomp']:.2f} s" for k, v in cm["shape"].items()))
    if "naive" in rep:
        nv = rep["naive"]
        print(f"naive loop: {nv['forward_per_candidate_s']:.2f} s forward + {nv['decomp_per_candidate_s']:.2f} s "
              f"decomposition per candidate -> {nv['full_estimate_s']:.0f} s for all; speed-up of the fast "
              f"path {rep['speedup_sensitivity']:.1f}x; fast vs naive ppl max rel diff "
              f"{nv['max_rel_ppl_diff_vs_fast']:.2e}")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if a.deterministic:  # cuBLAS reads its workspace setting when its first handle is made: before any GPU work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        rep = run_stream_bench(a) if a.stream else run_bench(a)
    except acur.UsageError as exc:
        print(f"bench_pipeline.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        (print_stream_report if a.stream else print_report)(rep)
        if "profile" in rep:
            print_stream_profile(rep["profile"])
        if a.json_out:
            write_json(a.json_out, rep)
    return 0


def write_json(path: str, rep: dict) -> None:
    """A bench's report as JSON (every number, for experiments/measured/)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rep, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
