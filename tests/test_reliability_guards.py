"""Issue 16: no silent no-ops, clean interrupts, broken-result guard, fast offline failure, a lock on
the sensitivity cache. Tiny random models; the subprocess tests run real acur.py processes."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import acur
import datautils
import hub_access
from conftest import ROOT, tiny_args

N_LAYERS = 14  # tiny LLaMA: 2 blocks x (q, k, v, o, gate, up, down)


def run(model_dir, text, tmp, *extra):
    return acur.run_pipeline(acur.build_parser().parse_args(tiny_args(model_dir, text, tmp, *extra)))


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if line.strip() and "%|" not in line]  # transformers' "Loading weights" bars aside
    assert len(err) == 1, err
    assert err[0].startswith("acur.py: error:")
    return err[0]


# ---------------------------------------------------------------- item 1: silent no-ops
def test_rank_align_beyond_every_layer_is_an_error_before_calibration(tiny_llama_dir, tiny_text_file, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.setattr(acur, "stage_scales", lambda *a: pytest.fail("calibration started"))
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--act_aware",
                     "--rank_align", "100000")
    assert acur.main(argv) == 2
    line = one_error_line(capsys)
    assert "--rank_align 100000" in line and "never apply" in line


def test_rank_align_check_uses_the_largest_rank_any_layer_can_take(tiny_llama_dir, tiny_text_file, tmp_path,
                                                                   monkeypatch):
    # CUR: the 128x64 MLP layers take the largest ranks (k(m+n)+k^2 <= mn), below min(m, n) = 64
    from modules import registry
    top = registry.get("acur").rank(128, 64, 1.0)
    assert 30 < top < 64
    with pytest.raises(acur.UsageError, match=f"at most {top}"):
        run(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--act_aware",
            "--rank_align", str(top + 1))
    top_svd = registry.get("svd").rank(128, 64, 1.0)  # the method's own rank: SVD pays k(m+n)
    assert top_svd > top
    run(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--method", "svd",
        "--rank_align", str(top_svd), "--sensitivity_metric", "stable_rank", "--eval_ppl", "none")
    with pytest.raises(acur.UsageError, match=f"at most {top_svd}"):
        run(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--method", "svd",
            "--rank_align", str(top_svd + 1))


def test_unaligned_ranks_and_overlapping_windows_are_recorded_warnings(tiny_llama_dir, tiny_text_file, tmp_path,
                                                                      capsys):
    from transformers import AutoTokenizer
    n_tokens = datautils.tokenize_text(AutoTokenizer.from_pretrained(tiny_llama_dir),
                                       tiny_text_file.read_text()).numel()
    n_samples = n_tokens // 64 + 20  # more tokens than the text holds
    _, _, res = run(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8",
                    "--sensitivity_metric", "stable_rank", "--rank_align", "30", "--n_calib_samples", str(n_samples))
    out = capsys.readouterr().out
    ranks = [v["rank"] for v in res["layers"].values() if v["rank"] is not None]
    unaligned = [r for r in ranks if r % 30]
    assert unaligned and len(unaligned) < len(ranks)  # a mix: the test exercises both cases
    overlap = [w for w in res["warnings"] if "overlap" in w]
    align = [w for w in res["warnings"] if "--rank_align 30 not honoured" in w]
    assert len(overlap) == 1 and f"{n_samples} x 64" in overlap[0] and f"{n_tokens:,}" in overlap[0]
    assert len(align) == 1 and f"in {len(unaligned)} of {len(ranks)} compressed layers" in align[0]
    assert "WARNING: " + align[0] in out and "WARNING: " + overlap[0] in out
    assert json.loads(Path(res["output_file"]).read_text())["warnings"] == res["warnings"]


def test_calib_overlap_warning_threshold():
    assert datautils.calib_overlap_warning("t", 1000, 10, 100) is None  # exactly the text: no overlap forced
    msg = datautils.calib_overlap_warning("t", 1000, 11, 100)
    assert msg and "11 x 100 = 1,100 tokens" in msg and "1,000" in msg


def test_ppl_target_below_dense_is_an_error_before_sensitivity(tiny_llama_dir, tiny_text_file, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.setattr(acur, "stage_sensitivity", lambda *a: pytest.fail("sensitivity started"))
    assert acur.main(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--ppl_target", "1.0")) == 2
    line = one_error_line(capsys)
    assert "--ppl_target 1.0 cannot be reached" in line and "dense model's own calibration perplexity" in line


def test_unreachable_ppl_target_is_flagged_never_called_compressed(tiny_llama_dir, tiny_text_file, tmp_path,
                                                                   monkeypatch, capsys):
    """Target above dense, but every compression tried overshoots: nothing compressed, said loudly."""
    real = acur.perplexity_of_windows

    def search_sees_worse(model, ids, batch_size=4, desc=None):
        return real(model, ids, batch_size, desc=desc) + (1000.0 if desc == "ppl search" else 0.0)
    monkeypatch.setattr(acur, "perplexity_of_windows", search_sees_worse)
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--ppl_target", "100000",
                     "--sensitivity_metric", "stable_rank", "--run_name", "unreachable")
    # the target has to sit between dense and every compressed candidate: measure dense first
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = datautils.get_calib_data(f"text:{tiny_text_file}", AutoTokenizer.from_pretrained(tiny_llama_dir), 4, 64, 0)
    target = real(model, ids, 2, desc=None) * 1.5
    argv[argv.index("100000")] = str(target)
    assert acur.main(argv) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "output" / "unreachable.json").read_text())
    assert res["nothing_compressed"]["ppl_target"] == target
    assert "is unreachable" in res["nothing_compressed"]["reason"]
    assert res["param_ratio"]["reached"] == 1.0
    assert any(w.startswith("NOTHING COMPRESSED") for w in res["warnings"])
    assert "WARNING: NOTHING COMPRESSED" in out
    assert "perplexity UNCOMPRESSED (nothing compressed: dense)" in out
    assert "perplexity compressed" not in out
    assert "broken_result" not in res  # dense is dense, not broken


# ---------------------------------------------------------------- item 3: broken-result guard
def _results(compressed: dict, dense: dict | None = None, calib: dict | None = None) -> dict:
    r = {"ppl": {"compressed": compressed}, "param_ratio": {"reached": 0.5},
         "layers": {"a.q_proj": {"ratio": 0.4, "rank": 8}, "a.k_proj": {"ratio": 0.9, "rank": 20},
                    "a.v_proj": {"ratio": 1.0, "rank": None}}, "fallbacks": {}}
    if dense is not None:
        r["ppl"]["dense"] = dense
    if calib is not None:
        r["ppl_calibration"] = calib
    return r


@pytest.fixture
def plain_args(tiny_llama_dir, tiny_text_file, tmp_path):
    return acur.build_parser().parse_args(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path,
                                                    "--param_ratio_target", "0.5", "--sensitivity_metric",
                                                    "spectral"))


def test_broken_result_thresholds(plain_args):
    ok = acur.broken_result(_results({"w": 280.0}, dense={"w": 28.3}), plain_args)
    assert ok is None  # 9.9x: bad, but not flagged
    bad = acur.broken_result(_results({"w": 14818798.0}, dense={"w": 28.3}), plain_args)
    assert bad["checks"][0]["metric"] == "w perplexity" and "523,632x the dense" in bad["checks"][0]["why"]
    assert bad["method"] == "acur" and bad["sensitivity_metric"] == "spectral"
    assert bad["lowest_layer"] == "a.q_proj" and bad["lowest_layer_ratio"] == 0.4
    for needle in ("BROKEN", "--method acur", "--sensitivity_metric spectral (a heuristic", "0.4 (a.q_proj, rank 8)"):
        assert needle in bad["summary"]
    nan = acur.broken_result(_results({"w": math.nan}, dense={"w": 28.3}), plain_args)
    assert nan["checks"][0]["why"] == "non-finite"
    # no dense number of the same text: the dense calibration perplexity is the reference
    assert acur.broken_result(_results({"w": 500.0}, calib={"dense": 40.0}), plain_args)["checks"][0]["reference"] == 40.0
    assert acur.broken_result(_results({"w": 300.0}, calib={"dense": 40.0}), plain_args) is None
    calib_bad = acur.broken_result(_results({}, calib={"dense": 40.0, "compressed": 900.0}), plain_args)
    assert calib_bad["checks"][0]["metric"] == "calibration perplexity"
    # nothing dense at all: only the absolute check
    assert acur.broken_result(_results({"w": 9000.0}), plain_args) is None
    assert "above 10000" in acur.broken_result(_results({"w": 2e4}), plain_args)["checks"][0]["why"]


def test_broken_model_is_flagged_in_console_json_and_card(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch,
                                                          capsys):
    import quantization
    real = quantization.quantize_model

    def quantize_then_break(model, *a, **k):
        out = real(model, *a, **k)
        model.model.norm.weight.data[0] = float("nan")  # as a broken decomposition would leave it
        return out
    monkeypatch.setattr(quantization, "quantize_model", quantize_then_break)
    _, _, res = run(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8",
                    "--sensitivity_metric", "stable_rank", "--eval_dense")
    out = capsys.readouterr().out
    flag = res["broken_result"]
    assert flag["checks"][0]["why"] == "non-finite" and flag["sensitivity_metric"] == "stable_rank"
    assert "WARNING: compressed model looks BROKEN" in out
    saved = json.loads(Path(res["output_file"]).read_text())
    assert saved["broken_result"]["summary"] == flag["summary"] and flag["summary"] in saved["warnings"]
    sys.path.insert(0, str(ROOT / "huggingface_repos"))
    import build_acur_repo
    sizes = {"save_dtype": "float32", "dense_bytes_at_save_dtype": 1, "compressed_weight_bytes": 1}
    card = build_acur_repo.model_card(None, res, sizes, tmp_path / "repo", "llama", None)
    assert f"**WARNING: broken result.** {flag['summary']}" in card
    res.pop("broken_result")
    assert "broken result" not in build_acur_repo.model_card(None, res, sizes, tmp_path / "repo", "llama", None)


# ---------------------------------------------------------------- item 4: offline hub
@pytest.fixture
def unreachable_hub(monkeypatch):
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(hub_access, "_HUB_PROBE", {})
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens


def _assert_hint(line: str) -> None:
    for needle in ("unreachable at", "HF_HUB_OFFLINE=1", *datautils.OFFLINE_MODELS, *datautils.OFFLINE_DATASETS):
        assert needle in line, needle


@pytest.mark.parametrize("extra", [["--calib_dataset", "wikitext2"], ["--eval_ppl", "ptb"],
                                   ["--model_id", "someorg/some-model"]])
def test_unreachable_hub_fails_in_seconds_with_the_offline_hint(extra, unreachable_hub, tiny_llama_dir,
                                                                tiny_text_file, tmp_path, capsys):
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8") + extra
    t0 = time.perf_counter()
    assert acur.main(argv) == 2
    assert time.perf_counter() - t0 < 5
    _assert_hint(one_error_line(capsys))


def test_silent_hub_endpoint_times_out_in_seconds(unreachable_hub, monkeypatch, tiny_llama_dir, tiny_text_file,
                                                  tmp_path, capsys):
    """An endpoint that accepts the connection and never answers (a black-holed proxy)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        t0 = time.perf_counter()
        assert acur.main(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8",
                                   "--calib_dataset", "c4")) == 2
        assert time.perf_counter() - t0 < datautils.HUB_PROBE_TIMEOUT_S + 2
    line = one_error_line(capsys)
    _assert_hint(line)
    assert "timeout" in line.lower()


def test_probe_is_skipped_in_offline_mode_and_reachable_endpoint_passes(monkeypatch):
    monkeypatch.setattr(hub_access, "_HUB_PROBE", {})
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datautils.check_hub_reachable("model x")  # offline mode: the libraries read their cache, no probe
    assert hub_access._HUB_PROBE == {}
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(datautils.HubUnreachable):
        datautils.check_hub_reachable("model x")


# ---------------------------------------------------------------- items 2 and 5: real processes
SLOW_SAVES = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background parent may have set SIG_IGN
import datautils, acur
orig = datautils.save_json_cache
def slow_save(*a, **k):  # each sensitivity layer takes >= 0.4 s: room to act mid-stage
    time.sleep(0.4)
    orig(*a, **k)
datautils.save_json_cache = slow_save
barrier = {barrier!r}
if barrier:  # start the stage only when every process of the test is ready
    open(barrier + "." + str(os.getpid()), "w").close()
    while len([f for f in os.listdir(os.path.dirname(barrier)) if f.startswith(os.path.basename(barrier))]) < 2:
        time.sleep(0.05)
sys.exit(acur.main(sys.argv[1:]))
"""


def _spawn(argv: list[str], barrier: str = "") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_SAVES.format(root=str(ROOT), barrier=barrier), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def _sens_layers(cache_dir: Path) -> int:
    for p in cache_dir.glob("*sensitivity*.json"):
        try:
            return len(json.loads(p.read_text())["table"])
        except (ValueError, KeyError):
            pass
    return 0


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_sensitivity_saves_says_one_line_and_resumes(sig, code, tiny_llama_dir, tiny_text_file, tmp_path):
    extra = ("--param_ratio_target", "0.8", "--act_aware", "--use_cache", "--sensitivity_metric", "ppl")
    proc = _spawn(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, *extra))
    deadline = time.time() + 240
    while _sens_layers(tmp_path / "cache") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out
    name = signal.Signals(sig).name
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1]
    saved = _sens_layers(tmp_path / "cache")
    assert 2 <= saved < N_LAYERS
    assert lines[0].startswith(f"acur.py: interrupted by {name} during stage sensitivity; saved: ")
    assert f"sensitivity {saved}/{N_LAYERS} layers in" in lines[0] and "activation statistics in" in lines[0]
    assert "resume: run the same command again (with --use_cache)" in lines[0]
    assert not list((tmp_path / "output").glob("*.json"))  # no half-written results
    _, _, res = run(tiny_llama_dir, tiny_text_file, tmp_path, *extra)
    assert res["sensitivity"]["from_cache"] == saved
    assert res["sensitivity"]["computed"] == N_LAYERS - saved
    assert math.isfinite(list(res["ppl"]["compressed"].values())[0])


def test_interrupt_message_without_cache_says_how_to_keep_work():
    args = acur.build_parser().parse_args(["--model_id", "x", "--param_ratio_target", "0.5"])
    acur._RUN_STATE.update(stage="sensitivity", saved={})
    msg = acur.interrupt_message("SIGTERM", args)
    assert "nothing saved (no --use_cache)" in msg and "rerun with --use_cache" in msg and "\n" not in msg


def test_two_runs_on_one_cache_compute_each_layer_once(tiny_llama_dir, tiny_text_file, tmp_path):
    extra = ("--param_ratio_target", "0.8", "--act_aware", "--use_cache", "--sensitivity_metric", "ppl",
             "--eval_ppl", "none")
    cache = tmp_path / "shared_cache"
    barrier = str(tmp_path / "ready")
    procs = []
    for i in range(2):
        argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path / str(i), *extra, "--run_name", f"run{i}")
        argv[argv.index("--cache_dir") + 1] = str(cache)
        procs.append(_spawn(argv, barrier))
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    runs = [json.loads((tmp_path / str(i) / "output" / f"run{i}.json").read_text())["sensitivity"] for i in range(2)]
    assert sum(r["computed"] for r in runs) == N_LAYERS
    assert sorted(r["from_cache"] for r in runs) == [0, N_LAYERS]
    waited = [o[0] for o, r in zip(outs, runs) if r["from_cache"] == N_LAYERS][0]
    assert "another run holds" in waited and f"{N_LAYERS}/{N_LAYERS} layers from cache" in waited


def test_non_finite_output_fisher_is_recorded_in_the_results(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch):
    """A fisher that is not finite (here: the last linear's output gradient poisoned, which reaches every layer
    before it) is replaced by uniform weights, and the run JSON says which layers, not only the console; a
    healthy fisher records nothing. output_fisher itself returns what it measured."""
    import torch

    import act_aware_utils
    real = act_aware_utils.output_fisher
    measured = []

    def poisoned(model, linears, ids, batch_size, **kw):
        def hook(mod, args, out):
            out.register_hook(lambda g: g * float("nan"))
        handle = linears[-1].module.register_forward_hook(hook)
        try:
            measured.append(real(model, linears, ids, batch_size, **kw))
            return measured[-1]
        finally:
            handle.remove()
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--method", "srid", "--act_aware",
                     "--sensitivity_metric", "fisher_error", "--param_ratio_target", "0.8")
    monkeypatch.setattr(acur, "output_fisher", poisoned)
    _, _, res = acur.run_pipeline(acur.build_parser().parse_args(argv))
    assert not all(torch.isfinite(v).all() for v in measured[0].values())  # measured as it was, not patched
    saved = json.loads(Path(res["output_file"]).read_text())
    hit = [w for w in saved["warnings"] if w.startswith("output fisher not finite")]
    names = list(res["sensitivity"]["table"])  # every linear of the run, in order
    assert len(hit) == 1 and hit[0].endswith(", ".join(names)), hit  # every layer: the NaN flows back through all
    monkeypatch.setattr(acur, "output_fisher", real)
    _, _, clean = acur.run_pipeline(acur.build_parser().parse_args(argv + ["--output_dir", str(tmp_path / "clean")]))
    assert not any(w.startswith("output fisher") for w in clean["warnings"])
    fixed, bad = act_aware_utils.finite_fisher({"a": torch.tensor([1.0, float("inf")]), "b": torch.tensor([1.0, 2.0])})
    assert bad == ["a"] and torch.equal(fixed["a"], torch.ones(2)) and torch.equal(fixed["b"], torch.tensor([1.0, 2.0]))
