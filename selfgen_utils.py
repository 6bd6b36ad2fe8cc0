"""Self-generated calibration text: the dense model samples text from its BOS token (temperature 1).

Why: calibration without any external corpus (data-free compression, as ASVD4LLM's selfgen experiment).
acur.run_pipeline calls `prepare_selfgen_text` with the dense model for `--calib_dataset selfgen` and passes
the returned text to datautils.get_calib_data(..., text=...), which cuts it into seeded random windows like
any other corpus. tools/selfgen.py writes the same text to a file (for `text:PATH`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

import datautils
from modules.model_utils import input_device

SELFGEN_VERSION = 1  # bump when the sampling changes (it keys the cache)


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
    device = input_device(model)
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


def prepare_selfgen_text(model, tokenizer, n_samples: int, seqlen: int, seed: int, batch_size: int = 4,
                         cache_dir: str | Path | None = None, fingerprint: dict | None = None,
                         warnings: list[str] | None = None) -> tuple[str, dict]:
    """(text, info): the selfgen calibration text for this model, generated or read from cache_dir
    (warnings receives the line of a cache entry that could not be used).

    One sample more than the calibration needs is drawn, so the re-tokenised text always holds a full window.
    The caller passes the text on (datautils.get_calib_data(..., text=text)): nothing is kept here."""
    n_gen = n_samples + 1
    key = {**(fingerprint or {}), "kind": "selfgen", "v": SELFGEN_VERSION, "n": n_gen, "seqlen": seqlen,
           "seed": seed, "start": start_token_id(tokenizer)}
    path = datautils.cache_path("selfgen", key, cache_dir, ".json") if cache_dir else None
    blob = datautils.load_json_cache(path, key, warnings) if path else None
    if blob is not None and blob.get("text"):
        text, source = blob["text"], f"cache {path}"
    else:
        text, source = generate_text(model, tokenizer, n_gen, seqlen, seed, batch_size), "generated"
        if path:
            datautils.save_json_cache(path, key, {"text": text})
    if not text.strip():
        raise RuntimeError("selfgen produced empty text (the model sampled only special tokens)")
    info = {"source": source, "samples": n_gen, "seqlen": seqlen, "chars": len(text), "start_token": key["start"],
            "text_sha256": datautils.text_digest(text)}
    print(f"[selfgen] {info}")
    return text, info
