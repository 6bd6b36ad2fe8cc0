"""Self-generated calibration data: the model samples text from its BOS token (pure sampling, temperature 1).

Why: calibration without any external corpus (data-free compression, as ASVD4LLM's selfgen experiment).
Used by acur.py as `--calib_dataset selfgen`: run_pipeline calls prepare() with the dense model before the
calibration stage; datautils.get_text("selfgen", "train") then returns the prepared text, which is cut into
seeded random windows like any other corpus. Standalone, it writes the text to a file for `text:PATH`:

    python tools/selfgen.py --model_id smollm2-135m --n_samples 8 --seqlen 512 --out selfgen.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SELFGEN_VERSION = 1  # bump when the sampling changes (it keys the cache)
_PREPARED: dict = {}  # the text of the last prepare() in this process


def start_token_id(tokenizer) -> int:
    """BOS if the tokenizer has one, else EOS (GPT-style models start documents after <|endoftext|>)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("selfgen needs a BOS or EOS token to start sampling from; the tokenizer has neither")


@torch.no_grad()
def sample_tokens(model, start_id: int, n_samples: int, seqlen: int, seed: int, batch_size: int = 4,
                  temperature: float = 1.0) -> torch.Tensor:
    """(n_samples, seqlen) token ids: start token, then seqlen-1 tokens sampled with a KV cache.

    Sample i draws from its own CPU generator seeded by (seed, i): the data depend on the seed, not on the
    batch size (a memory knob) or the device's random stream."""
    if n_samples < 1 or seqlen < 2 or batch_size < 1 or not temperature > 0:
        raise ValueError(f"selfgen: bad sizes n_samples={n_samples} seqlen={seqlen} batch_size={batch_size} "
                         f"temperature={temperature}")
    device = next(model.parameters()).device
    rows = []
    for b0 in range(0, n_samples, batch_size):
        bsz = min(batch_size, n_samples - b0)
        gens = [torch.Generator().manual_seed(seed * 100_003 + b0 + j) for j in range(bsz)]
        ids = torch.full((bsz, 1), start_id, dtype=torch.long)
        past, step_in = None, ids
        for _ in tqdm(range(seqlen - 1), desc=f"selfgen {b0 + bsz}/{n_samples}", leave=False):
            out = model(input_ids=step_in.to(device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1, :].float().cpu() / temperature, dim=-1)
            step_in = torch.cat([torch.multinomial(probs[j:j + 1], 1, generator=g) for j, g in enumerate(gens)])
            ids = torch.cat([ids, step_in], dim=1)
        rows.append(ids)
    return torch.cat(rows)


def generate_text(model, tokenizer, n_samples: int, seqlen: int, seed: int, batch_size: int = 4) -> str:
    """n_samples sampled sequences, decoded without special tokens, joined by blank lines."""
    ids = sample_tokens(model, start_token_id(tokenizer), n_samples, seqlen, seed, batch_size)
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    return "\n\n".join(t for t in texts if t)


def prepare(model, tokenizer, n_samples: int, seqlen: int, seed: int, batch_size: int = 4,
            cache_dir: str | Path | None = None, fingerprint: dict | None = None) -> dict:
    """Generate (or load from cache_dir) the selfgen text for this model and make get_text('selfgen') return it.

    One sample more than the calibration needs is drawn, so the re-tokenised text always holds a full window."""
    import datautils
    n_gen = n_samples + 1
    key = {**(fingerprint or {}), "kind": "selfgen", "v": SELFGEN_VERSION, "n": n_gen, "seqlen": seqlen,
           "seed": seed, "start": start_token_id(tokenizer)}
    path = datautils.cache_path("selfgen", key, cache_dir, ".json") if cache_dir else None
    blob = datautils.load_json_cache(path, key) if path else None
    if blob is not None and blob.get("text"):
        text, source = blob["text"], f"cache {path}"
    else:
        text, source = generate_text(model, tokenizer, n_gen, seqlen, seed, batch_size), "generated"
        if path:
            datautils.save_json_cache(path, key, {"text": text})
    if not text.strip():
        raise RuntimeError("selfgen produced empty text (the model sampled only special tokens)")
    _PREPARED.clear()
    _PREPARED.update(text=text, key=key)
    info = {"source": source, "samples": n_gen, "seqlen": seqlen, "chars": len(text), "start_token": key["start"]}
    print(f"[selfgen] {info}")
    return info


def selfgen_text(split: str = "train") -> str:
    """The text of the last prepare() (datautils.get_text delegates here for the 'selfgen' dataset)."""
    if split != "train":
        raise ValueError("selfgen is calibration data only (the model's own samples); evaluate on another text")
    if "text" not in _PREPARED:
        raise RuntimeError("--calib_dataset selfgen needs the model: call tools.selfgen.prepare(model, tokenizer, "
                           "...) first (acur.run_pipeline does this before calibration)")
    return _PREPARED["text"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_id", required=True, help="HF id, local dir or offline alias (as acur.py)")
    p.add_argument("--n_samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=233)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--out", required=True, help="text file to write (use with --calib_dataset text:PATH)")
    a = p.parse_args(argv)
    import acur
    margs = acur.build_parser().parse_args(["--model_id", a.model_id, "--raw_model", "--calib_seqlen",
                                            str(a.seqlen), "--eval_seqlen", str(a.seqlen)])
    try:
        model, tokenizer, _ = acur.load_model(margs)
    except acur.UsageError as exc:
        print(f"selfgen.py: error: {exc}", file=sys.stderr)
        return 2
    text = generate_text(model, tokenizer, a.n_samples, a.seqlen, a.seed, a.batch_size)
    Path(a.out).write_text(text, encoding="utf-8")
    print(f"wrote {len(text)} characters to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
