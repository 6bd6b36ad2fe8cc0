"""A user's probe of a fresh clone: damaged caches, warnings kept in the JSON, a re-export over a user's file,
read-only outputs, a ratio that exports nothing, an export loaded without trust_remote_code, a GPT-2 model,
a missing GPU, file modes. Each bad input fails in one line (or a loud, recorded fallback), before heavy work."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import acur
import cache_store
import datautils
from conftest import ROOT, tiny_args

sys.path.insert(0, str(ROOT / "huggingface_repos"))
import build_acur_repo as bar  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_blas_thread")

FAST = ("--param_ratio_target", "0.8", "--sensitivity_metric", "stable_rank")


def run(model_dir, text, tmp, *extra):
    return acur.run_pipeline(acur.build_parser().parse_args(tiny_args(model_dir, text, tmp, *extra)))


def one_error_line(capsys, prog: str = "acur.py") -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if line.strip() and "%|" not in line]  # transformers' "Loading weights" bars aside
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error:"), err[0]
    return err[0]


def no_heavy_work(monkeypatch) -> None:
    """Any calibration (acur.py) or compression run (build_acur_repo.py) fails the test."""
    monkeypatch.setattr(acur, "stage_scales", lambda *a, **k: pytest.fail("heavy work started on bad input"))
    monkeypatch.setattr(bar.acur, "run_pipeline", lambda *a, **k: pytest.fail("compressed before refusing"))


def overwrite(path: Path, offset: int, n: int = 16, seed: int = 0) -> None:
    """n random bytes written inside the file at offset (same length: no truncation)."""
    data = bytearray(path.read_bytes())
    noise = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    data[offset:offset + n] = bytes(noise.tolist())
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tiny_text_file, tmp_path_factory) -> Path:
    """One tiny LLaMA export (CUR at 0.8); tests that change it work on a copy."""
    tmp = tmp_path_factory.mktemp("probe_export")
    repo = tmp / "tiny-acur80"
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp, *FAST, "--eval_ppl", "none", "--repo_dir", str(repo))
    bar.build_repo(bar.build_parser().parse_args(argv))
    return repo


# ---------------------------------------------------------------- 1. cache entries carry a checksum
def test_tensor_cache_with_bytes_changed_inside_is_refused_by_its_checksum(tmp_path, capsys):
    key, x = {"model": "m", "kind": "scales"}, torch.arange(256, dtype=torch.float32)
    path = tmp_path / "c.pt"
    cache_store.save_tensor_cache(path, key, {"layer": x})
    assert torch.equal(cache_store.load_tensor_cache(path, key)["layer"], x)
    overwrite(path, path.read_bytes().index(x.numpy().tobytes()) + 100)  # inside the tensor's bytes
    assert not torch.equal(torch.load(path, weights_only=True)["tensors"]["layer"], x)  # torch reads it silently
    warnings: list[str] = []
    assert cache_store.load_tensor_cache(path, key, warnings) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"WARNING: {warnings[0]}"]
    assert str(path) in warnings[0] and "checksum" in warnings[0] and warnings[0].endswith("recomputing")


def test_unreadable_tensor_cache_is_one_line_of_ours_not_torchs_advice(tmp_path, capsys):
    import datetime
    key = {"model": "m"}
    truncated, foreign = tmp_path / "truncated.pt", tmp_path / "foreign.pt"
    cache_store.save_tensor_cache(truncated, key, {"x": torch.ones(64)})
    truncated.write_bytes(truncated.read_bytes()[:200])
    torch.save({"key": json.dumps(key), "tensors": {"x": datetime.date(2024, 1, 1)}}, foreign)  # weights_only refuses
    for path in (truncated, foreign):
        warnings: list[str] = []
        assert cache_store.load_tensor_cache(path, key, warnings) is None
        captured = capsys.readouterr()
        lines = (captured.out + captured.err).strip().splitlines()
        assert len(lines) == 1 and lines[0] == f"WARNING: {warnings[0]}", lines
        assert str(path) in lines[0] and "recomputing" in lines[0] and "weights_only" not in lines[0]


def test_json_cache_checksum_catches_an_edit_that_stays_valid_json(tmp_path, capsys):
    key, payload = {"model": "m", "kind": "sensitivity"}, {"table": {"a": {"0.5": 1.25, "0.9": float("nan")}}}
    path = tmp_path / "s.json"
    cache_store.save_json_cache(path, key, payload)
    blob = cache_store.load_json_cache(path, key)
    assert blob["table"]["a"]["0.5"] == 1.25 and blob["table"]["a"]["0.9"] != blob["table"]["a"]["0.9"]  # NaN kept
    path.write_text(path.read_text().replace("1.25", "1.75"))
    warnings: list[str] = []
    assert cache_store.load_json_cache(path, key, warnings) is None
    assert "checksum" in warnings[0] and str(path) in warnings[0]
    legacy = {"key": json.loads(json.dumps(key)), **payload}  # written before checksums: not trusted either
    path.write_text(json.dumps(legacy))
    assert cache_store.load_json_cache(path, key, warnings) is None and "no checksum" in warnings[1]
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_damaged_caches_are_recomputed_and_recorded_in_the_results_json(tiny_llama_dir, tiny_text_file, tmp_path,
                                                                        capsys):
    extra = (*FAST, "--act_aware", "--use_cache")
    _, _, ref = run(tiny_llama_dir, tiny_text_file, tmp_path, *extra)
    assert not [w for w in ref["warnings"] if "cache" in w]
    files = sorted(p for p in (tmp_path / "cache").iterdir() if p.suffix in (".pt", ".json"))
    assert {p.suffix for p in files} == {".pt", ".json"}
    for p in files:
        overwrite(p, p.stat().st_size // 2)  # 16 random bytes inside every entry
    capsys.readouterr()
    _, _, res = run(tiny_llama_dir, tiny_text_file, tmp_path, *extra)
    out = capsys.readouterr().out
    ignored = [w for w in res["warnings"] if w.startswith("ignoring cache")]
    assert sorted(w.split()[2].rstrip(":") for w in ignored) == [str(p) for p in files]
    assert out.count("WARNING: ignoring cache") == len(files)
    assert res["sensitivity"]["from_cache"] == 0 and res["ppl"]["compressed"] == ref["ppl"]["compressed"]
    assert json.loads(Path(res["output_file"]).read_text())["warnings"] == res["warnings"]  # the JSON keeps them
    _, _, again = run(tiny_llama_dir, tiny_text_file, tmp_path, *extra)  # rewritten: used again
    assert again["sensitivity"]["from_cache"] == len(again["layers"]) and not again["warnings"]


# ---------------------------------------------------------------- 3. a re-export never deletes a user's file
def test_reexport_into_an_export_holding_a_users_file_refuses_and_keeps_it(exported, tiny_llama_dir, tiny_text_file,
                                                                           tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(exported, repo)
    files = json.loads((repo / "acur_results.json").read_text())["export"]["files"]
    assert {"model.safetensors", "config.json", "README.md", "acur_results.json"} <= set(files)
    assert set(files) == {p.name for p in repo.iterdir()}
    (repo / "my_notes.txt").write_text("mine")
    no_heavy_work(monkeypatch)
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, *FAST, "--repo_dir", str(repo))
    assert bar.main(argv) == 2
    line = one_error_line(capsys, "build_acur_repo.py")
    assert str(repo / "my_notes.txt") in line and "did not write" in line
    # an export written before the file list: the names the export writes decide
    results = json.loads((repo / "acur_results.json").read_text())
    del results["export"]["files"]
    (repo / "acur_results.json").write_text(json.dumps(results))
    assert bar.main(argv) == 2 and "my_notes.txt" in one_error_line(capsys, "build_acur_repo.py")
    assert (repo / "my_notes.txt").read_text() == "mine"
    bar.check_repo_dir(exported)  # the export alone is replaced as before


# ---------------------------------------------------------------- 4. unwritable outputs, before any work
def _read_only_places(tmp_path: Path) -> list[Path]:
    """Folders no process can create a file in, root included (root ignores mode bits)."""
    regular = tmp_path / "a_file"
    regular.write_text("x")
    places = [regular / "out", Path("/proc/cur4llm-probe/out")]
    if os.geteuid() != 0:  # mode bits stop everyone but root
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        places.append(ro / "out")
    return places


@pytest.mark.parametrize("flag", ["--output_dir", "--cache_dir"])
def test_unwritable_output_or_cache_dir_is_one_line_before_any_work(flag, tiny_llama_dir, tiny_text_file, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setattr(acur, "load_model", lambda *a: pytest.fail("heavy work started on bad input"))
    for place in _read_only_places(tmp_path):
        argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, *FAST, "--use_cache")
        argv[argv.index(flag) + 1] = str(place)
        assert acur.main(argv) == 2
        line = one_error_line(capsys)
        assert f"{flag} {place} is not writable" in line, line
    assert cache_store.unwritable(tmp_path / "new" / "deeper") is None  # a missing folder is created later: fine


def test_export_into_an_unwritable_place_is_refused_before_compressing(tiny_llama_dir, tiny_text_file, tmp_path,
                                                                      monkeypatch, capsys):
    no_heavy_work(monkeypatch)
    for place in _read_only_places(tmp_path):
        argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, *FAST, "--repo_dir", str(place / "repo"))
        assert bar.main(argv) == 2
        line = one_error_line(capsys, "build_acur_repo.py")
        assert f"cannot write the export into {place}" in line, line


# ---------------------------------------------------------------- 5. a ratio that exports nothing
@pytest.mark.parametrize("extra", [["--param_ratio_target", "1.0"],
                                   ["--compress_kv_cache", "--kv_cache_ratio_target", "1"]])
def test_export_at_ratio_one_is_refused_before_any_compute(extra, tiny_llama_dir, tiny_text_file, tmp_path,
                                                           monkeypatch, capsys):
    no_heavy_work(monkeypatch)
    monkeypatch.setattr(bar, "model_family", lambda *a: pytest.fail("model read before refusing"))
    assert bar.main(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, *extra, "--act_aware")) == 2
    line = one_error_line(capsys, "build_acur_repo.py")
    assert "ratio_target 1.0 keeps every layer dense: nothing to export" in line


# ---------------------------------------------------------------- 6. an export needs trust_remote_code
LOAD_WITHOUT_TRUST = r"""
import sys
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1])
"""


def test_exported_repo_without_trust_remote_code_fails_instead_of_building_random_layers(exported, tmp_path):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model_type"] == "acur_llama" and cfg["auto_map"]["AutoConfig"].startswith("configuration_acur_llama.")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_TRUST, str(exported)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "trust_remote_code=True" in proc.stderr.strip().splitlines()[-1]
    from transformers import AutoConfig  # with it: the custom config, still the family's model underneath
    loaded = AutoConfig.from_pretrained(exported, trust_remote_code=True)
    assert loaded.model_type == "acur_llama" and type(loaded).__mro__[1].__name__ == "LlamaConfig"


# ---------------------------------------------------------------- 7. a family the pipeline cannot walk
@pytest.fixture(scope="module")
def tiny_gpt2_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """A random 2-block GPT-2 (Conv1D layers under transformer.h) with the tiny tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    out = tmp_path_factory.mktemp("tiny_gpt2")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=512)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("extra", [FAST, ("--raw_model",)])
def test_gpt2_model_is_one_line_naming_the_supported_families(extra, tiny_gpt2_dir, tiny_text_file, tmp_path,
                                                              monkeypatch, capsys):
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded for an unsupported layout"))
    assert acur.main(tiny_args(tiny_gpt2_dir, tiny_text_file, tmp_path, *extra)) == 2
    line = one_error_line(capsys)
    assert "model_type 'gpt2' is not supported" in line and "LLaMA" in line and "OPT" in line, line


# ---------------------------------------------------------------- 8. a device this machine lacks
@pytest.mark.parametrize("device,available,count,needle", [
    ("cuda", False, 0, "--device cuda: CUDA is not available"),
    ("cuda:3", True, 1, "--device cuda:3: this machine has 1 CUDA device(s)"),
    ("gpu0", False, 0, "--device 'gpu0' is not a device name"),
])
def test_missing_device_is_one_line_before_loading(device, available, count, needle, tiny_llama_dir, tiny_text_file,
                                                   tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(acur, "load_model", lambda *a: pytest.fail("heavy work started on bad input"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert acur.main(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, *FAST, "--device", device)) == 2
    assert needle in one_error_line(capsys)


# ---------------------------------------------------------------- 9. written files follow the umask
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_follow_the_umask(umask, tmp_path):
    before = os.umask(umask)
    try:
        assert cache_store.current_umask() == umask
        cache_store.atomic_write_bytes(tmp_path / "f.json", b"{}")
        cache_store.save_tensor_cache(tmp_path / "c.pt", {"m": 1}, {"x": torch.ones(2)})
    finally:
        os.umask(before)
    for name in ("f.json", "c.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_staged_folder_replaces_whole_or_not_at_all(tmp_path):
    """An export fills a sibling folder: on success it replaces the old one with umask modes; an error midway
    leaves the old export untouched and no staging folder behind."""
    final = tmp_path / "repo"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with cache_store.staged_folder(final) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("midway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    with cache_store.staged_folder(final) as tmp:
        (tmp / "new.txt").write_text("new")
        os.chmod(tmp / "new.txt", 0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert (final / "new.txt").stat().st_mode & 0o777 == cache_store.new_file_mode()


def test_results_and_export_files_follow_the_umask(exported, tiny_llama_dir, tiny_text_file, tmp_path):
    mode = 0o666 & ~cache_store.current_umask()
    _, _, res = run(tiny_llama_dir, tiny_text_file, tmp_path, *FAST, "--use_cache", "--eval_ppl", "none")
    written = [Path(res["output_file"])] + sorted((tmp_path / "cache").glob("*.json"))
    written += [p for p in exported.iterdir() if p.is_file()]
    assert any(p.name == "model.safetensors" for p in written)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(mode) for p in written}
