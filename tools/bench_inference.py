"""Inference speed and memory of a dense model vs its compressed versions, every method of the registry,
on a random model of a real shape.

    python tools/bench_inference.py --shape llama-2-7b                 # GPU, fp16: dense vs every form at 0.8
    python tools/bench_inference.py --shape llama-2-7b --methods acur,srid --ratios 0.9,0.8 --rank_aligns 1,8
    python tools/bench_inference.py --shape tiny --device cpu --prefill_len 64 --prompt_len 16

Methods are benchmarked per layer form (modules/registry.py: Method.form), since the speed of a layer
depends on its class and shapes only: acur and cur share CURLinear (form cur); svd, asvd and wsvd share
SVDLinear; rowid and srid share RowIDLinear; colid is ColIDLinear. Each row of the table is one form at
one ratio (and rank alignment), labelled with the methods that share it. Its layers are built by the
pipeline's own factory (modules.low_rank_linear.compress_linear, as acur.compress_model calls it) from a
random weight of each distinct shape (identity input covariance for the data-aware forms) and copied to
every decoder linear of that shape, so the layer classes, ranks and index buffers are the real ones;
the weights' values are not (speed does not depend on them). After the dense case the dense linears are
freed, so each case's memory is its own model's.

Per case: weights MiB (parameters and buffers); prefill tok/s (one forward over the prompt, logits of the
last position, as in generation); decode tok/s (greedy steps with the KV cache, one token per step);
the device time of all decoder linears for one token (on CUDA: the layers in execution order captured in
one CUDA graph, so launch overhead drops out); peak GPU memory of the prefill and decode runs
(torch.cuda.max_memory_allocated, reset at the start of every case; n/a on CPU). A per-layer table
compares CURLinear's multiplication order with a dense nn.Linear and with U folded into C (two products).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
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
from modules import registry  # noqa: E402
from modules.decompositions import release_pick_graphs  # noqa: E402
from modules.fast_layers import FastColID, FastPair, FastRowID, SiblingGroup, to_inference_form  # noqa: E402
from modules.low_rank_linear import compress_linear  # noqa: E402
from modules.model_utils import find_linears, replace_module  # noqa: E402


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (the index buffers of CUR / ID layers included)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


SHAPE_ALIASES = {"tiny": "tiny-llama"}
# the method whose compress_linear path builds a form's layer: it needs nothing a random model lacks
# (asvd needs an activation statistic, srid a sequential calibration; their layer classes are these)
FORM_BUILDER = {"cur": "acur", "svd": "svd", "rowid": "rowid", "colid": "colid"}


def form_groups(methods: list[str]) -> list[tuple[str, list[str]]]:
    """[(form, the given methods of that form)] in the order the forms first appear."""
    groups: dict[str, list[str]] = {}
    for name in methods:
        groups.setdefault(registry.get(name).form, []).append(name)
    return list(groups.items())


def parse_methods(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if text.strip() in ("all", ""):
        names = [m for m in registry.METHODS if registry.get(m).per_linear]
    per_linear = [m for m in registry.METHODS if registry.get(m).per_linear]  # structured: a plain narrower model
    bad = [x for x in names if x not in per_linear]
    if bad or len(set(names)) != len(names):
        raise SystemExit(f"bench_inference.py: error: --methods must be distinct names among "
                         f"{', '.join(per_linear)}, got {text!r}")
    return names


def build_layer(linear: nn.Linear, ratio: float, form: str, rank_align: int,
                gen: torch.Generator) -> nn.Module:
    """The module compress_linear (the pipeline's factory) makes of `linear` for a method of `form`.
    Data-aware forms get an identity input covariance (the layer's class and rank do not depend on it)."""
    method = FORM_BUILDER[form]
    n = linear.in_features
    cov = torch.eye(n, device=linear.weight.device) if registry.get(method).needs_covariance() else None
    return compress_linear(linear, ratio, method=method, cov=cov, rank_align=rank_align, generator=gen)


@torch.no_grad()
def install_form(linears, shapes: dict, sources: dict, ratio: float, form: str, rank_align: int, device,
                 gen: torch.Generator) -> dict:
    """Every linear replaced by a copy of the layer built from the random weight of its shape (shapes:
    {linear name: (out, in)}); returns {"outxin": (class name, rank)}."""
    protos: dict[tuple, nn.Module] = {}
    for shape, src in sources.items():
        dense = copy.deepcopy(src).to(device)
        protos[shape] = build_layer(dense, ratio, form, rank_align, gen)
        del dense
    release_pick_graphs()  # as acur.compress_model does: resident memory is the layers' own
    used: set = set()
    for info in linears:
        shape = shapes[info.name]
        mod = protos[shape] if shape not in used else copy.deepcopy(protos[shape])
        used.add(shape)
        replace_module(info, mod)
    return {"x".join(map(str, s)): (type(p).__name__, int(p.rank)) for s, p in protos.items()}


def compile_settings():
    """The compiler settings of a compiled case, for its duration only. The KV cache indexes its layers by
    the block's layer index, so each block is its own trace per input shape (32 blocks x 2 shapes for
    LLaMA-2-7B's graph decode): the recompile limits are raised, and a limit hit fails loudly instead of
    falling back to eager unseen."""
    import torch._dynamo
    return torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096,
                                      fail_on_recompile_limit_hit=True)


def compile_blocks(model: nn.Module) -> int:
    """Regional compilation: torch.compile each repeated block (the decoder layers); the compiler fuses a
    layer's gathers into the pointwise kernels around it (RoPE, residual add, norms). Returns the number
    of blocks compiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(b) for b in m}) == 1]
    blocks = max(lists, key=len) if lists else []
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def uncompile_blocks(model: nn.Module) -> None:
    """Back to eager (and the compiler's caches dropped), so the next case compiles its own layers."""
    import torch._dynamo
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


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


class StaticDecode:
    """Greedy decoding with a static KV cache whose every step (forward, argmax, position + 1) can be one
    replayed CUDA graph: what a serving loop without Python overhead sees. `run(steps)` decodes from the
    end of the prompt again each time (the cache is rewound), and returns the tokens."""

    def __init__(self, model, prompt: torch.Tensor, steps: int, graph: bool):
        from transformers import StaticCache
        self.model, self.prompt_len, dev = model, prompt.shape[1], prompt.device
        self.cache = StaticCache(config=model.config, max_cache_len=self.prompt_len + steps + 4)
        self.pos = torch.full((1,), self.prompt_len, dtype=torch.long, device=dev)
        stance = getattr(torch.compiler, "set_stance", None)  # the untimed prompt pass need not be compiled
        with stance("force_eager") if stance else contextlib.nullcontext():
            out = model(prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                        cache_position=torch.arange(self.prompt_len, device=dev))
        self.first = out.logits[:, -1:].argmax(-1)
        self.tok = self.first.clone()
        self.step, self.graph = self._step, None
        if graph:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()
            self.step = self.graph.replay

    def _step(self) -> None:
        o = self.model(self.tok, past_key_values=self.cache, use_cache=True, cache_position=self.pos,
                       logits_to_keep=1)
        self.tok.copy_(o.logits[:, -1:].argmax(-1))
        self.pos.add_(1)

    def rewind(self) -> None:
        """Back to the end of the prompt: the next step writes position prompt_len again."""
        self.pos.fill_(self.prompt_len)
        self.tok.copy_(self.first)
        for layer in getattr(self.cache, "layers", []):  # newer caches count their own length on the device
            length = getattr(layer, "cumulative_length", None)
            if torch.is_tensor(length):
                length.fill_(self.prompt_len)

    def run(self, steps: int) -> torch.Tensor:
        self.rewind()
        toks = []
        for _ in range(steps):
            self.step()
            toks.append(self.tok.clone())
        return torch.cat([self.first] + toks, dim=1)


@torch.no_grad()
def greedy_tokens(model, vocab: int, prompt_len: int, steps: int, device, seed: int, graph: bool) -> torch.Tensor:
    """The greedy tokens StaticDecode produces from a seeded random prompt (batch 1)."""
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    return StaticDecode(model, prompt, steps, graph=graph).run(steps)[0, 1:].cpu()


@torch.no_grad()
def decode_graph_tps(model, vocab: int, batch: int, prompt_len: int, steps: int, device, reps: int) -> float | None:
    """tok/s of StaticDecode with CUDA graphs (on the CPU the same steps run eagerly). None, with a printed
    reason, when the model's forward cannot be captured."""
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=device)
    try:
        dec = StaticDecode(model, prompt, steps, graph=device.type == "cuda")
    except Exception as e:  # noqa: BLE001 - a benchmark row, not a result: say why and go on
        print(f"[bench] graph decode not captured ({type(e).__name__}: {str(e).splitlines()[0][:160]})", flush=True)
        return None

    def run():
        dec.rewind()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            dec.step()
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



@torch.no_grad()
def linears_us(mods: list[nn.Module], device, dtype, reps: int, compiled: bool = False) -> float:
    """Device microseconds of every decoder linear, in execution order, applied to one token each
    (one CUDA graph holding all of them on a GPU; wall time on the CPU). Layers of one width read one
    input tensor, so stacked siblings (fast forms) share their first product as in the model.
    compiled: the whole sequence is one torch.compile'd function."""
    xs = {m.in_features: torch.randn(1, 1, m.in_features, device=device, dtype=dtype) for m in mods}

    def run():
        return [m(xs[m.in_features]) for m in mods]  # returned, so a compiler keeps every product
    return device_us(torch.compile(run, dynamic=False) if compiled else run, device, reps, calls=2)


@torch.no_grad()
def fast_layer_table(shapes: list[tuple[int, int]], ratio: float, align: int, tokens: list[int], device, dtype,
                     reps: int) -> list[dict]:
    """Device microseconds per call of one layer in each inference form (random factors at the registry's
    ranks): dense; FastPair (SVD's rank); FastRowID and its three parts (first product, Z product, gather);
    FastColID; and three square row-ID siblings as one SiblingGroup against three dense layers (q/k/v)."""
    F = nn.functional
    rows = []
    for m, n in shapes:
        W = torch.randn(m, n, device=device, dtype=dtype) / n ** 0.5
        r_svd = registry.get("svd").rank(m, n, ratio, align)
        k = registry.get("rowid").rank(m, n, ratio, align)
        kc = registry.get("colid").rank(m, n, ratio, align)
        pair = FastPair(W[:, :r_svd].contiguous(), W[:r_svd].contiguous(), None, "svd")
        perm = torch.randperm(m, device=device)
        rowid = FastRowID(W[:k].contiguous(), torch.randn(m - k, k, device=device, dtype=dtype) / k ** 0.5,
                          perm, None, "rowid")
        colid = FastColID(W[:, :kc].contiguous(), torch.randn(kc, n - kc, device=device, dtype=dtype) / n ** 0.5,
                          torch.randperm(n, device=device), None, "colid")
        for t in tokens:
            x = torch.randn(t, n, device=device, dtype=dtype)
            h = torch.randn(t, k, device=device, dtype=dtype)
            buf = torch.randn(t, m, device=device, dtype=dtype)
            row = {"shape": f"{m}x{n}", "tokens": t, "svd_rank": r_svd, "rowid_rank": k, "colid_rank": kc,
                   "dense_us": device_us(lambda: F.linear(x, W), device, reps),
                   "pair_us": device_us(lambda: pair(x), device, reps),
                   "rowid_us": device_us(lambda: rowid(x), device, reps),
                   "rowid_first_us": device_us(lambda: F.linear(x, rowid.B), device, reps),
                   "rowid_z_us": device_us(lambda: F.linear(h, rowid.Z), device, reps),
                   "rowid_gather_us": device_us(lambda: buf[:, perm], device, reps),  # as FastRowID gathers
                   "colid_us": device_us(lambda: colid(x), device, reps)}
            if m == n:
                trio = [FastRowID(rowid.B.clone(), rowid.Z.clone(), perm.clone(), None, "rowid") for _ in range(3)]
                SiblingGroup(trio)
                row["dense3_us"] = device_us(lambda: [F.linear(x, W) for _ in range(3)], device, reps)
                row["rowid3_group_us"] = device_us(lambda: [lay(x) for lay in trio], device, reps)
            rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="llama-2-7b", choices=list(SHAPES) + list(SHAPE_ALIASES),
                   help="a published config with random weights (tiny = tiny-llama, for CPU tests)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--methods", default=",".join(m for m in registry.METHODS if registry.get(m).per_linear),
                   help="registry methods (or 'all'); one row per distinct layer form, labelled with its methods")
    p.add_argument("--ratios", default="0.8", help="uniform parameter ratios (kept fraction) to compare with dense")
    p.add_argument("--rank_aligns", default="1", help="rank alignments (acur.py --rank_align) to compare")
    p.add_argument("--inference_forms", default="research,fast",
                   help="research: the layers as compression builds them; fast: modules/fast_layers."
                        "to_inference_form (plain products, siblings stacked); compiled: fast, and each decoder "
                        "block torch.compile'd, and the linears' sequence (dense gets a compiled case too; eager decode is not measured)")
    p.add_argument("--prefill_batches", default="1,4")
    p.add_argument("--prefill_len", type=int, default=2048)
    p.add_argument("--decode_batches", default="1,16")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--decode_tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layer_tokens", default="1,16,8192",
                   help="token counts of the per-layer order table (synthetic CUR orders)")
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


def _mib(x: float | None) -> float | None:
    return None if x is None else x / 2**20


def measure(model, linears, a, device, dtype, pb: list[int], db: list[int], compiled: bool = False) -> dict:
    """One case's row: weights, prefill and decode speed, peak memory, one-token device time of the linears.
    compiled: the blocks are compiled first, and the linears' sequence too; eager decode is skipped."""
    with compile_settings() if compiled else contextlib.nullcontext():
        return _measure(model, linears, a, device, dtype, pb, db, compiled)


def _measure(model, linears, a, device, dtype, pb: list[int], db: list[int], compiled: bool) -> dict:
    cuda = device.type == "cuda"
    vocab = model.config.vocab_size
    gc.collect()  # what an earlier case left behind is not this case's memory
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row = {"weight_mib": weight_bytes(model) / 2**20,
           "allocated_mib": _mib(torch.cuda.memory_allocated(device)) if cuda else None}
    t0 = time.perf_counter()
    if compiled:
        eager_tokens = greedy_tokens(model, vocab, a.prompt_len, a.decode_tokens, device, a.seed, graph=False)
        row["compiled_blocks"] = compile_blocks(model)
    for b in pb:
        row[f"prefill_b{b}_tok_s"] = prefill_tps(model, vocab, b, a.prefill_len, device, a.reps)
    for b in db:
        row[f"decode_b{b}_tok_s"] = None if compiled else decode_tps(model, vocab, b, a.prompt_len,
                                                                     a.decode_tokens, device, a.reps)
    for b in db:
        row[f"decode_b{b}_graph_tok_s"] = decode_graph_tps(model, vocab, b, a.prompt_len, a.decode_tokens,
                                                           device, a.reps)
    row["peak_mib"] = _mib(torch.cuda.max_memory_allocated(device)) if cuda else None
    row["linears_1tok_us"] = linears_us([info.module for info in linears], device, dtype, max(a.reps, 5), compiled)
    if compiled:
        from torch._dynamo.utils import counters
        row["graph_breaks"] = sum(counters["graph_break"].values())  # each one splits a block's fusion
        row["compiled_graphs"] = counters["stats"]["unique_graphs"]
        if row["graph_breaks"]:
            print(f"[bench] graph breaks: {dict(counters['graph_break'])}"[:600], flush=True)
        # the compiled case's speed counts only if it decodes what the eager model decodes: how many of
        # the greedy tokens agree before the first difference (round-off can flip a near-tie in fp16)
        got = greedy_tokens(model, vocab, a.prompt_len, a.decode_tokens, device, a.seed, graph=cuda)
        differ = (got != eager_tokens).flatten().nonzero()
        row["compiled_tokens_agree"] = int(differ[0]) if len(differ) else got.numel()
        uncompile_blocks(model)
        row["compile_and_measure_s"] = round(time.perf_counter() - t0, 1)
    return row


def run_bench(a, on_case=None) -> dict:
    """Every case (dense, then form x ratio x rank alignment); on_case(rep) after each one (partial results)."""
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    dtype = (torch.float16 if device.type == "cuda" else torch.float32) if a.dtype == "auto" else getattr(torch, a.dtype)
    try:
        ratios = [float(r) for r in a.ratios.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"bench_inference.py: error: --ratios must be numbers, got {a.ratios!r}")
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise SystemExit(f"bench_inference.py: error: --ratios must be in (0, 1), got {a.ratios!r}")
    groups = form_groups(parse_methods(a.methods))
    pb, db = ints(a.prefill_batches, "--prefill_batches"), ints(a.decode_batches, "--decode_batches")
    aligns = ints(a.rank_aligns, "--rank_aligns")
    iforms = [x.strip() for x in a.inference_forms.split(",") if x.strip()]
    if not iforms or set(iforms) - {"research", "fast", "compiled"} or len(set(iforms)) != len(iforms):
        raise SystemExit("bench_inference.py: error: --inference_forms must be distinct names among research, "
                         f"fast, compiled, got {a.inference_forms!r}")
    layer_tokens = ints(a.layer_tokens, "--layer_tokens")
    shape = SHAPE_ALIASES.get(a.shape, a.shape)
    model = build_model(shape, device, dtype, a.seed)
    linears = find_linears(model)
    counts: dict[str, int] = {}
    for i in linears:
        key = "x".join(map(str, i.module.weight.shape))
        counts[key] = counts.get(key, 0) + 1
    shapes = sorted({tuple(i.module.weight.shape) for i in linears})
    lin_shapes = {i.name: tuple(i.module.weight.shape) for i in linears}
    gen = torch.Generator().manual_seed(a.seed)
    rep = {"shape": shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "dtype": str(dtype), "torch": torch.__version__,
           "settings": {k: v for k, v in vars(a).items() if k != "json_out"},
           "linear_counts": counts, "models": {}}

    def add_case(label: str, title: str, entry: dict, row: dict) -> None:  # stored, printed, handed on at once
        rep["models"][label] = {**entry, **row}
        print(f"[bench] {title}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items()), flush=True)
        if on_case:
            on_case(rep)
    dense = {"form": "dense", "methods": [], "class": "Linear"}
    add_case("dense", "dense", dense, measure(model, linears, a, device, dtype, pb, db))
    if "compiled" in iforms:
        add_case("dense_compiled", "dense_compiled", {**dense, "inference_form": "compiled"},
                 measure(model, linears, a, device, dtype, pb, db, compiled=True))
    # one dense weight per shape, on the CPU, to build every form from; the model's dense linears are freed
    sources: dict[tuple, nn.Module] = {}
    for info in linears:
        shape_i = (info.module.out_features, info.module.in_features)
        if shape_i not in sources:
            sources[shape_i] = copy.deepcopy(info.module).to("cpu")
    for info in linears:
        replace_module(info, nn.Identity())
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for form, methods in groups:
        for r in ratios:
            for al, iform in [(al, f) for al in aligns for f in iforms]:
                label = f"{methods[0]}_{r:g}" + (f"_a{al}" if al > 1 else "") + ("" if iform == "research" else f"_{iform}")
                t0 = time.perf_counter()
                for info in linears:  # the previous case's layers go before this one's are built
                    replace_module(info, nn.Identity())
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                layers = install_form(linears, lin_shapes, sources, r, form, al, device, gen)
                stacked = to_inference_form(model)["groups"] if iform != "research" else []
                for info in linears:  # the bench's handles follow the rewrite, so the research layers go
                    info.module = model.get_submodule(info.name)
                build_s = time.perf_counter() - t0
                row = measure(model, linears, a, device, dtype, pb, db, compiled=iform == "compiled")
                classes = sorted({type(i.module).__name__ for i in linears})
                add_case(label, f"{label} ({'/'.join(methods)})",
                         {"form": form, "methods": methods, "ratio": r, "rank_align": al, "inference_form": iform,
                          "class": classes[0], "stacked_groups": len(stacked),
                          "ranks": {s: k for s, (_, k) in layers.items()}, "build_s": round(build_s, 2)}, row)
    for info in linears:
        replace_module(info, nn.Identity())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rep["fast_layers"] = fast_layer_table(shapes, min(ratios, key=lambda r: abs(r - 0.8)), max(aligns),
                                          layer_tokens, device, dtype, max(a.reps, 10))
    rep["layer_orders"] = layer_orders(shapes, min(ratios, key=lambda r: abs(r - 0.9)), layer_tokens,
                                       device, dtype, max(a.reps, 10))
    # device time of all the model's linears for one forward of `tokens` tokens (e.g. 1 = a decode step),
    # from the per-shape synthetic orders above
    rep["linears_total_us"] = {
        t: {col: sum(r[col] * counts[r["shape"]] for r in rep["layer_orders"] if r["tokens"] == t)
            for col in ("dense_us", "cur_us", "cur_align8_us", "folded_us")}
        for t in sorted({r["tokens"] for r in rep["layer_orders"]})}
    return rep


def _fmt(v, width: int = 0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        text = "n/a"
    elif isinstance(v, float):
        text = f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    else:
        text = str(v)
    return f"{text:>{width}s}" if width else text


METRICS = (("weight_mib", "weights MiB"), ("peak_mib", "peak GPU MiB"), ("allocated_mib", "resident GPU MiB"),
           ("linears_1tok_us", "linears 1 tok us"))


def table_rows(rep: dict) -> list[tuple[str, list]]:
    """(row label, one value per case) of the main table: sizes, speeds, memory, device time."""
    models = rep["models"]
    speed = [k for k in next(iter(models.values())) if k.endswith("_tok_s")]
    keys = [("weight_mib", "weights MiB")] + [(k, k) for k in speed] + list(METRICS[1:])
    out = [("methods", ["dense"] + ["/".join(m["methods"]) for m in list(models.values())[1:]]),
           ("layer class", [m["class"] for m in models.values()])]
    def base(m: dict) -> dict:  # compiled cases against the compiled dense model
        return models.get("dense_compiled", models["dense"]) if m.get("inference_form") == "compiled" else models["dense"]
    for k, label in keys:
        out.append((label, [m.get(k) for m in models.values()]))
        if k.endswith("_tok_s") or k == "linears_1tok_us":  # speed-up (tok/s) or time ratio (us) against dense
            out.append(("  x dense", [m[k] / base(m)[k] if m.get(k) and base(m).get(k) else None
                                      for m in models.values()]))
    return out


def print_report(rep: dict) -> None:
    print("=" * 78)
    print(f"{rep['shape']} on {rep['device']}, {rep['dtype']}: tokens/s (higher is better); ratios = kept "
          "fraction of the decoder linears' parameters; 'x dense' = tok/s over dense's, or linears' time over dense's")
    models = rep["models"]
    w = max(14, max(len(m) for m in models) + 2)
    print(f"{'':20s}" + "".join(f"{m:>{w}s}" for m in models))
    for label, vals in table_rows(rep):
        if label == "  x dense":
            print(f"{label:20s}" + "".join((f"{v:.2f}x" if v is not None else "n/a").rjust(w) for v in vals))
        else:
            print(f"{label:20s}" + "".join(_fmt(v, w) for v in vals))
    print("per layer, device us per call: dense | CUR C(U(Rx)) | same, rank aligned to 8 | U folded (CU)(Rx)")
    for r in rep["layer_orders"]:
        print(f"  {r['shape']:>11s} k={r['rank']:<5d} tokens={r['tokens']:<6d} {r['dense_us']:9.1f} "
              f"{r['cur_us']:9.1f} {r['cur_align8_us']:9.1f} {r['folded_us']:9.1f}")
    for t, v in rep["linears_total_us"].items():
        print(f"  all linears, {t} tokens: " + "  ".join(f"{k[:-3]} {x / 1e3:.2f} ms" for k, x in v.items()))
    cols = ("dense_us", "pair_us", "rowid_us", "rowid_first_us", "rowid_z_us", "rowid_gather_us", "colid_us",
            "dense3_us", "rowid3_group_us")
    print("inference forms per layer, device us per call: " + " | ".join(c[:-3] for c in cols))
    for r in rep.get("fast_layers", []):
        print(f"  {r['shape']:>11s} tokens={r['tokens']:<6d}" + "".join(
            f"{r[c]:9.1f}" if c in r else f"{'':9s}" for c in cols))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def write(rep: dict) -> None:  # after every case too: a run cut by a time limit keeps what it measured
        if a.json_out:
            Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json_out).write_text(json.dumps(rep, indent=1))
    rep = run_bench(a, on_case=write)
    print_report(rep)
    write(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
