"""build_acur_repo.py on a streamed run (issue 30): the repo is written from the run folder one block a shard,
equals the in-memory export tensor by tensor (same config, code and tokenizer files) and reloads with the same
logits, and the exporter never holds two blocks' tensors at once."""
from __future__ import annotations

import json
import sys
import weakref

import pytest
import torch

import streamed
from conftest import ROOT, run_fresh_loader, tiny_args
from test_stream import sharded  # noqa: F401  (the fixture: tiny checkpoints in shards smaller than a block)

sys.path.insert(0, str(ROOT / "huggingface_repos"))
import build_acur_repo as bar  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_blas_thread")

CHILD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
jobs = torch.load(sys.argv[1])
out = {}
for repo, ids in jobs.items():
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        out[repo] = {"logits": model(ids).logits, "types": sorted({type(m).__name__ for m in model.modules()})}
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("acur", "streamed", "modules", "datautils"))
torch.save(out, sys.argv[2])
"""


def weights(repo) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(repo.glob("*.safetensors")):
        out.update(load_file(f))
    return out


class BlockWatch:
    """Counts the compressed blocks' tensors alive (weak references to the tensors RunFolder.load returns and to
    those handed to safetensors' save_file): reading a block asserts that no other block's tensor is still held,
    in either form, and every shard written holds tensors of one block at most. Watched while the export writes
    its shards (the pipeline's passes hold two blocks by design: one computing, the next loading)."""

    def __init__(self, monkeypatch):
        self.active = False
        self.alive: dict[str, int] = {}
        self.loaded: list[int] = []
        self.shards: list[set[str]] = []
        real_load = streamed.RunFolder.load

        def load(folder, kind, b, device=None):
            if not self.active:
                return real_load(folder, kind, b, device)
            if kind == "block":
                held = sorted(k for k, n in self.alive.items() if n)
                assert not held, f"block {b} read while {held} still held"
            out = real_load(folder, kind, b, device)
            if kind == "block":
                self.loaded.append(b)
                self._watch(f"read block {b}", out.values())
            return out
        monkeypatch.setattr(streamed.RunFolder, "load", load)
        import safetensors.torch as st
        real_save = st.save_file

        def save_file(tensors, path, metadata=None):
            if not self.active:
                return real_save(tensors, path, metadata=metadata)
            self.shards.append({k.split(".layers.")[1].split(".")[0] if ".layers." in k else "outside" for k in tensors})
            self._watch(f"shard {len(self.shards)}", tensors.values())
            return real_save(tensors, path, metadata=metadata)
        monkeypatch.setattr(st, "save_file", save_file)
        real_write = bar.streamed_export.write_shards

        def write_shards(*args, **kwargs):
            self.active = True
            try:
                return real_write(*args, **kwargs)
            finally:
                self.active = False
        monkeypatch.setattr(bar.streamed_export, "write_shards", write_shards)

    def _watch(self, label: str, tensors) -> None:
        for t in tensors:
            self.alive[label] = self.alive.get(label, 0) + 1
            weakref.finalize(t, self._freed, label)

    def _freed(self, label: str) -> None:
        self.alive[label] -= 1


def settings(repo, *extra: str) -> list[str]:
    return ["--param_ratio_target", "0.7", "--method", "srid", "--sensitivity_metric", "fisher_error",
            "--repo_dir", str(repo), *extra]


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_streamed_export_equals_in_memory_export(family, sharded, tiny_text_file, tmp_path,  # noqa: F811
                                                 monkeypatch):
    mem_repo, st_repo = tmp_path / "mem-repo", tmp_path / "st-repo"
    bar.build_repo(bar.build_parser().parse_args(
        tiny_args(sharded[family], tiny_text_file, tmp_path / "mem", *settings(mem_repo, "--stream", "off"))))
    with monkeypatch.context() as m:
        watch = BlockWatch(m)
        _, none, _, res = bar.build_repo(bar.build_parser().parse_args(
            tiny_args(sharded[family], tiny_text_file, tmp_path / "st", *settings(st_repo, "--stream"))))
    assert none is None and res["model"]["streamed"]
    # host memory bounded: each block read once for the export, never two at a time, one block a shard
    n = json.loads((sharded[family] / "config.json").read_text())["num_hidden_layers"]
    assert watch.loaded == list(range(n))
    export_shards = watch.shards
    assert export_shards[0] == {"outside"} and all(s == {str(b)} for b, s in enumerate(export_shards[1:]))
    index = json.loads((st_repo / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == n + 1
    # the same files: config, code, tokenizer byte for byte (weights apart), the same tensors
    skip = {"README.md", "acur_results.json", "model.safetensors", "model.safetensors.index.json"}
    files = {p.name for p in mem_repo.iterdir() if p.name not in skip}
    assert files == {p.name for p in st_repo.iterdir() if p.name not in skip and not p.name.startswith("model-")}
    for name in sorted(files):
        assert (mem_repo / name).read_bytes() == (st_repo / name).read_bytes(), name
    a, b = weights(mem_repo), weights(st_repo)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k  # (the streamed run equals the in-memory one bit for bit on the CPU)
    assert res["export"]["sizes"]["files"]["dense_weights_of_compressed_layers"] == []
    # both reload in a fresh process (no project code) with the same logits
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    child = run_fresh_loader(CHILD, {str(mem_repo): ids, str(st_repo): ids}, tmp_path)
    assert child[str(mem_repo)]["types"] == child[str(st_repo)]["types"]
    assert torch.allclose(child[str(mem_repo)]["logits"], child[str(st_repo)]["logits"], rtol=1e-4, atol=1e-5)


def test_streamed_export_verify_compares_with_the_run_folder(sharded, tiny_text_file, tmp_path):  # noqa: F811
    _, _, _, res = bar.build_repo(bar.build_parser().parse_args(tiny_args(
        sharded["qwen2"], tiny_text_file, tmp_path, *settings(tmp_path / "repo", "--stream", "--verify"))))
    v = res["export"]["verify"]
    assert v["params_equal"] and v["max_abs_logit_diff"] < 1e-4


def test_streamed_export_of_an_unfinished_run_refuses(sharded, tiny_text_file, tmp_path, monkeypatch):  # noqa: F811
    args = bar.build_parser().parse_args(tiny_args(sharded["llama"], tiny_text_file, tmp_path,
                                                   *settings(tmp_path / "repo", "--stream")))
    import acur
    _, tok, res = acur.run_pipeline(args)
    (acur.stream_dir(args) / "block_00001.json").unlink()
    with pytest.raises(bar.UsageError, match="block 1 is not compressed yet"):
        bar.write_streamed_repo(tok, res, args, "llama", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
