"""The streamed pipeline (issue 30) on tiny random LLaMA / OPT / Qwen2 checkpoints saved as sharded safetensors
with shards smaller than one block: it equals the in-memory run (same ranks, same factors, same perplexity),
a run killed midway resumes to the same result, and bad checkpoints or mixed arguments fail in one line."""
from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch

import acur
import model_loading
import streamed
from conftest import ROOT, tiny_args

SHARD = "40KB"  # a tiny block holds ~180 KB of fp32 weights: every block spans several shards


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_blas_thread):
    yield


def _sharded(src, dst):
    from transformers import AutoModelForCausalLM
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(dst, max_shard_size=SHARD)
    return dst


@pytest.fixture(scope="module")
def sharded(tiny_llama_dir, tiny_opt_dir, tiny_qwen2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    out = {name: _sharded(d, root / name) for name, d in
           (("llama", tiny_llama_dir), ("opt", tiny_opt_dir), ("qwen2", tiny_qwen2_dir))}
    index = json.loads((out["llama"] / model_loading.WEIGHTS_INDEX).read_text())["weight_map"]
    assert len({f for k, f in index.items() if k.startswith("model.layers.0.")}) > 1  # shards smaller than a block
    return out


def parse(model_dir, text, tmp, *extra):
    return acur.build_parser().parse_args(tiny_args(model_dir, text, tmp, *extra))


def settings(method: str, *extra: str) -> list[str]:
    return ["--param_ratio_target", "0.7", "--method", method, "--sensitivity_metric", "fisher_error",
            *(["--act_aware"] if method == "acur" else []), *extra]


def assembled(args):
    """The streamed run's compressed model, put together from its run folder."""
    sm, _, fp = model_loading.open_streamed(args)
    folder = streamed.RunFolder(acur.stream_dir(args), acur.stream_key(args, fp))
    return streamed.assemble(sm, folder)


def assert_same_result(mem: dict, st: dict, mem_model, st_model, rel: float = 1e-5) -> None:
    assert {k: v["rank"] for k, v in st["layers"].items()} == {k: v["rank"] for k, v in mem["layers"].items()}
    assert any(v["rank"] is not None for v in st["layers"].values())
    assert st["param_ratio"]["reached"] == mem["param_ratio"]["reached"]
    for name, row in mem["sensitivity"]["table"].items():
        for r, v in row.items():
            assert st["sensitivity"]["table"][name][r] == pytest.approx(v, rel=rel, abs=1e-12), (name, r)
    for label, vals in mem["ppl"].items():
        for ds, v in vals.items():
            assert st["ppl"][label][ds] == pytest.approx(v, rel=rel)
    a, b = mem_model.state_dict(), st_model.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.allclose(a[k].float(), b[k].float(), rtol=rel, atol=rel / 10), k


# ---------------------------------------------------------------- the loader
@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_streamed_model_block_by_block_gives_from_pretrained_logits(family, sharded):
    from transformers import AutoConfig, AutoModelForCausalLM
    from modules.model_utils import run_block
    d = sharded[family]
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    sm = model_loading.StreamedModel(AutoConfig.from_pretrained(d), model_loading.SafetensorsCheckpoint(d),
                                     torch.device("cpu"), torch.float32)
    assert all(p.device.type == "meta" for p in sm.layers.parameters())  # no block is held
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = sm.capture([ids])
    h = hidden[0]
    for b in range(sm.n_blocks):
        h = run_block(sm.block(b), h, kwargs[0][b])
    with torch.no_grad():
        assert torch.equal(sm.head(h), ref(ids).logits)


# ---------------------------------------------------------------- streamed == in memory
@pytest.mark.parametrize("family,method,dtype", [("llama", "srid", "float32"), ("opt", "srid", "float32"),
                                                 ("qwen2", "srid", "float32"), ("llama", "srid", "bfloat16"),
                                                 ("llama", "wsvd", "float32"), ("qwen2", "wsvd", "bfloat16"),
                                                 ("llama", "acur", "float32"), ("opt", "acur", "float32")])
def test_streamed_run_equals_in_memory_run(family, method, dtype, sharded, tiny_text_file, tmp_path):
    extra = settings(method, "--eval_dense", "--dtype", dtype)
    mem_model, _, mem = acur.run_pipeline(parse(sharded[family], tiny_text_file, tmp_path / "mem", *extra,
                                                "--stream", "off"))
    args = parse(sharded[family], tiny_text_file, tmp_path / "st", *extra, "--stream")
    none, _, st = acur.run_pipeline(args)
    assert none is None and st["model"]["streamed"] and not st["stream"]["resumed"]
    assert_same_result(mem, st, mem_model, assembled(args))
    on_disk = json.loads(open(st["output_file"]).read())
    assert on_disk["schema"] == acur.RESULT_SCHEMA and set(on_disk["timings"]) >= {"statistics", "reverse", "compress",
                                                                                    "eval"}
    left = {p.name.split("_")[0] for p in acur.stream_dir(args).iterdir()}
    assert left == {"run.json", "stats", "fisher", "block"}  # stored inputs, gradients and carries are gone


def test_weight_only_metric_streams_in_one_forward_pass(sharded, tiny_text_file, tmp_path):
    extra = ["--param_ratio_target", "0.7", "--method", "acur", "--act_aware", "--sensitivity_metric", "stable_rank"]
    mem_model, _, mem = acur.run_pipeline(parse(sharded["llama"], tiny_text_file, tmp_path / "mem", *extra,
                                                "--stream", "off"))
    args = parse(sharded["llama"], tiny_text_file, tmp_path / "st", *extra, "--stream")
    _, _, st = acur.run_pipeline(args)
    assert "reverse" not in st["timings"]
    assert_same_result(mem, st, mem_model, assembled(args))


# ---------------------------------------------------------------- killed and resumed
class Killed(Exception):
    pass


def kill_after(monkeypatch, steps: int) -> None:
    """The run dies right after its `steps`-th finished block (of any pass)."""
    real, count = streamed.StreamProgress.step, [0]

    def step(self, b):
        real(self, b)
        count[0] += 1
        if count[0] == steps:
            raise Killed(f"killed after block step {steps}")
    monkeypatch.setattr(streamed.StreamProgress, "step", step)


@pytest.mark.parametrize("method,steps", [("srid", s) for s in range(1, 8)] + [("wsvd", 3), ("wsvd", 5),
                                                                             ("acur", 2), ("acur", 6)])
def test_killed_streamed_run_resumes_to_the_same_result(method, steps, sharded, tiny_text_file, tmp_path,
                                                        monkeypatch):
    """2 blocks: steps 1-2 statistics, 3-4 reverse, 5-6 compress, 7-8 evaluation. The stored inputs on disk (in
    RAM, a resume recomputes them: test_killed_run_with_inputs_in_ram_recomputes_them_on_resume)."""
    extra = settings(method, "--stream_ram_gib", "0")
    whole_args = parse(sharded["llama"], tiny_text_file, tmp_path / "whole", *extra, "--stream")
    _, _, whole = acur.run_pipeline(whole_args)
    args = parse(sharded["llama"], tiny_text_file, tmp_path / "killed", *extra, "--stream")
    with monkeypatch.context() as m:
        kill_after(m, steps)
        with pytest.raises(Killed):
            acur.run_pipeline(args)
    loads = []
    real_block = model_loading.StreamedModel.block
    monkeypatch.setattr(model_loading.StreamedModel, "block", lambda self, b: loads.append(b) or real_block(self, b))
    _, _, again = acur.run_pipeline(args)
    assert again["stream"]["resumed"]
    assert len(loads) == max(6 - steps, 0)  # the finished blocks are not loaded again (evaluation reads the folder)
    assert_same_result(whole, again, assembled(whole_args), assembled(args))


def test_resume_with_other_arguments_refuses_naming_the_argument(sharded, tiny_text_file, tmp_path, monkeypatch,
                                                                 capsys):
    argv = tiny_args(sharded["llama"], tiny_text_file, tmp_path, *settings("srid"), "--stream")
    with monkeypatch.context() as m:
        kill_after(m, 2)
        with pytest.raises(Killed):
            acur.main(argv)
    capsys.readouterr()
    other = [x if x != "0.7" else "0.6" for x in argv]
    assert acur.main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--param_ratio_target differs" in err[0] and "0.7" in err[0] and "0.6" in err[0]
    # evaluation settings are not part of the run: a resume may change them
    assert acur.main(argv + ["--eval_max_windows", "2"]) == 0


# ---------------------------------------------------------------- bad input: one line, before any compute
@pytest.fixture
def no_compute(monkeypatch):
    for name in ("statistics_pass", "reverse_pass", "compress_pass", "perplexity"):
        monkeypatch.setattr(streamed, name, lambda *a, **k: pytest.fail("compute started on a bad checkpoint"))


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bin_only_checkpoint_refuses_in_one_line(sharded, tiny_text_file, tmp_path, no_compute, capsys):
    d = tmp_path / "bin_only"
    shutil.copytree(sharded["llama"], d)
    for p in d.glob("model*.safetensors*"):
        p.unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    assert acur.main(tiny_args(d, tiny_text_file, tmp_path, *settings("srid"), "--stream")) == 2
    line = one_line(capsys)
    assert "pytorch_model.bin" in line and ".bin weights only" in line and "safetensors" in line


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_shard_fails_naming_the_file(damage, sharded, tiny_text_file, tmp_path, no_compute,
                                                          capsys):
    d = tmp_path / "damaged"
    shutil.copytree(sharded["qwen2"], d)
    shard = sorted(d.glob("model-*.safetensors"))[3]
    if damage == "missing":
        shard.unlink()
    else:
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)
    assert acur.main(tiny_args(d, tiny_text_file, tmp_path, *settings("srid"), "--stream")) == 2
    line = one_line(capsys)
    assert str(shard) in line and damage in line


def test_options_a_streamed_run_cannot_honour_refuse_in_one_line(sharded, tiny_text_file, tmp_path, no_compute,
                                                                  capsys):
    argv = tiny_args(sharded["llama"], tiny_text_file, tmp_path, "--param_ratio_target", "0.7", "--stream")
    assert acur.main(argv) == 2  # the default metric, ppl, runs every later block per candidate
    assert "--sensitivity_metric ppl is not supported with --stream" in one_line(capsys)
    assert acur.main(argv + ["--sensitivity_metric", "fisher_error", "--weight_quant", "rtn_int8"]) == 2
    assert "--weight_quant" in one_line(capsys)
    assert acur.main(argv + ["--sensitivity_metric", "fisher_error", "--selection", "sample"]) == 2
    assert "--selection sample is not supported with --stream" in one_line(capsys)


def test_not_enough_disk_refuses_before_compute(sharded, tiny_text_file, tmp_path, no_compute, monkeypatch, capsys):
    monkeypatch.setattr(streamed.RunFolder, "free_bytes", lambda self: 1000)
    assert acur.main(tiny_args(sharded["llama"], tiny_text_file, tmp_path, *settings("srid"), "--stream")) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and "GiB free there" in err[0] and "disk needed up to" in cap.out


def test_auto_streams_with_a_printed_line_when_the_model_does_not_fit(sharded, tiny_text_file, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.setattr(model_loading, "free_memory", lambda device: 1000)
    _, _, res = acur.run_pipeline(parse(sharded["llama"], tiny_text_file, tmp_path, *settings("srid")))
    out = capsys.readouterr().out
    assert res["model"]["streamed"] and "streaming the model block by block" in out and "GiB free" in out
    assert "disk needed up to" in out
    assert all(math.isfinite(v) for v in res["ppl"]["compressed"].values())
    # a model that fits stays in memory
    monkeypatch.setattr(model_loading, "free_memory", lambda device: 2**40)
    _, _, res = acur.run_pipeline(parse(sharded["llama"], tiny_text_file, tmp_path / "b", *settings("srid")))
    assert not res["model"].get("streamed")


# ---------------------------------------------------------------- the bench (run on a GPU later; a CPU smoke test here)
def test_stream_bench_smoke_on_cpu_matches_the_in_memory_run(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_pipeline
    out = tmp_path / "bench.json"
    assert bench_pipeline.main(["--stream", "--shape", "tiny-llama", "--device", "cpu", "--blocks", "2", "--method",
                                "srid", "--sensitivity_metric", "fisher_error", "--n_calib_samples", "4", "--seqlen",
                                "32", "--eval_windows", "2", "--in_memory_too", "--stream_dir", str(tmp_path / "runs"),
                                "--json_out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["blocks_measured"] == 2 and rep["blocks_full"] == 3
    for name in ("statistics", "reverse", "compress", "eval"):
        assert rep["per_stage"][name]["blocks_measured"] == 2 and rep["per_stage"][name]["per_block_s"] > 0
    assert rep["whole_model_extrapolated"]["label"].startswith("EXTRAPOLATED from 2 measured blocks to 3")
    assert rep["in_memory"]["ranks_equal"] and rep["in_memory"]["eval_ppl_random"] == pytest.approx(rep["eval_ppl_random"])
    assert rep["peak_host_rss_gib"] > 0 and list((tmp_path / "runs").iterdir()) == []  # the run folder is removed
    assert "EXTRAPOLATED" in capsys.readouterr().out


def test_stream_bench_profile_splits_the_passes_into_parts_and_restores_what_it_wraps(tmp_path):
    """--profile_stream: each pass's parts (the decompositions labelled by the stage that runs them), one
    pivoted Cholesky per linear in the reverse pass, and the wrapped functions put back afterwards."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_pipeline
    import act_aware_utils
    from modules import decompositions as dec
    originals = (dec.pivoted_cholesky, dec.row_gram, act_aware_utils._add_product, acur.stream_fit_block)
    out = tmp_path / "bench.json"
    assert bench_pipeline.main(["--stream", "--shape", "tiny-llama", "--device", "cpu", "--blocks", "2", "--method",
                                "srid", "--sensitivity_metric", "fisher_error", "--n_calib_samples", "4", "--seqlen",
                                "32", "--eval_windows", "2", "--profile_stream", "--stream_dir", str(tmp_path / "runs"),
                                "--json_out", str(out)]) == 0
    parts = json.loads(out.read_text())["profile"]["parts"]
    assert parts["sensitivity rows [main]"]["calls"] == 2                      # one table per block
    assert parts["pivoted Cholesky picks (reverse) [main]"]["calls"] == 2 * 7  # a curve per linear
    assert parts["row Gram D W Sigma W^T D, fp64 (reverse) [main]"]["calls"] == 2 * 7
    assert parts["covariance product into the fp64 sum (compress) [main]"]["calls"] > 0
    assert all(row["s"] >= 0 for row in parts.values())
    assert (dec.pivoted_cholesky, dec.row_gram, act_aware_utils._add_product, acur.stream_fit_block) == originals


def test_stream_bench_deterministic_flag_is_on_for_the_run_and_off_after(tmp_path, monkeypatch):
    """--deterministic: deterministic algorithms during the run (recorded in the report's settings), the
    previous setting back afterwards (the tests share the process)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_pipeline
    seen = []
    real = bench_pipeline.run_stream_bench
    monkeypatch.setattr(bench_pipeline, "run_stream_bench",
                        lambda a: seen.append(torch.are_deterministic_algorithms_enabled()) or real(a))
    out = tmp_path / "bench.json"
    assert not torch.are_deterministic_algorithms_enabled()
    assert bench_pipeline.main(["--stream", "--shape", "tiny-llama", "--device", "cpu", "--blocks", "1", "--method",
                                "srid", "--sensitivity_metric", "fisher_error", "--n_calib_samples", "2", "--seqlen",
                                "16", "--eval_windows", "1", "--deterministic", "--in_memory_too",
                                "--stream_dir", str(tmp_path / "runs"), "--json_out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert seen == [True] and rep["settings"]["deterministic"] and rep["in_memory"]["ranks_equal"]
    assert not torch.are_deterministic_algorithms_enabled()


def test_streamed_covariances_stay_where_they_were_summed():
    """block_covariances(on_device=True), as the streamed passes call it: no trip to the host (on the meta
    device a copy to the host raises) and, on the CPU, the very values of the host path; q/k-style linears fed
    the same input share one result."""
    from torch import nn
    from act_aware_utils import block_covariances
    from modules.model_utils import LinearInfo

    def setup(device):
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(device)
        infos = [LinearInfo(f"b.{i}", block, str(i), block[i], 0) for i in (0, 2)]
        return block, infos, [torch.randn(2, 7, 6, device=device) for _ in range(3)]

    block, infos, hidden = setup("meta")
    covs = block_covariances(block, infos, hidden, [{}] * 3, warn=False, on_device=True)
    assert {k: (v.device.type, tuple(v.shape), v.dtype) for k, v in covs.items()} == \
        {"b.0": ("meta", (6, 6), torch.float32), "b.2": ("meta", (5, 5), torch.float32)}
    with pytest.raises(NotImplementedError):  # the host path copies out: what on_device avoids
        block_covariances(*setup("meta")[:2], setup("meta")[2], [{}] * 3, warn=False)
    block, infos, hidden = setup("cpu")
    kept = block_covariances(block, infos, [h.clone() for h in hidden], [{}] * 3, on_device=True)
    host = block_covariances(block, infos, hidden, [{}] * 3)
    x = torch.cat([h.reshape(-1, 6) for h in setup("cpu")[2]]).double()
    assert all(torch.equal(kept[k], host[k]) for k in host)
    assert torch.allclose(host["b.0"].double(), x.T @ x / x.shape[0], rtol=1e-6, atol=1e-7)


def test_bench_70b_shapes_are_the_published_ones():
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_pipeline
    for shape, vocab in (("llama-2-70b", 32000), ("llama-3-70b", 128256)):
        cfg = bench_pipeline.shape_config(shape, 1)
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (1, 8192, 8, vocab)
        assert bench_pipeline.shape_config(shape).num_hidden_layers == 80
    assert bench_pipeline.shape_config("llama-3-70b").rope_parameters["rope_theta"] == 500000.0
    # one block of the 70B shape: 0.86 B parameters (1.6 GiB in bf16), made on the fly, never all at once
    one = model_loading.model_bytes(bench_pipeline.shape_config("llama-2-70b", 1), torch.bfloat16)
    emb = 2 * 32000 * 8192 * 2  # embeddings and the untied lm_head, bf16
    block = 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192  # q, o; k, v (GQA); MLP; two norms
    assert (one - emb) / 2 == block + 8192  # and the final norm


def test_resume_with_a_damaged_entry_fails_naming_it(sharded, tiny_text_file, tmp_path, monkeypatch, capsys):
    argv = tiny_args(sharded["llama"], tiny_text_file, tmp_path, *settings("srid"), "--stream")
    with monkeypatch.context() as m:
        kill_after(m, 3)  # the reverse pass has done block 1 and carries its gradients to block 0
        with pytest.raises(Killed):
            acur.main(argv)
    folder = acur.stream_dir(acur.build_parser().parse_args(argv))
    grads = folder / "grads_00001.safetensors"
    with open(grads, "r+b") as f:
        f.truncate(grads.stat().st_size - 7)
    capsys.readouterr()
    assert acur.main(argv) == 2
    line = last_line(capsys)  # (after the bar of the passes it skipped)
    assert line.startswith("acur.py: error: ") and "grads_00001.safetensors" in line and "truncated or damaged" in line
    # a result entry carries a checksum: one changed byte is found
    argv2 = tiny_args(sharded["llama"], tiny_text_file, tmp_path / "b", *settings("srid"), "--stream")
    assert acur.main(argv2) == 0
    block = acur.stream_dir(acur.build_parser().parse_args(argv2)) / "block_00001.safetensors"
    data = bytearray(block.read_bytes())
    data[-3] ^= 0xFF
    block.write_bytes(bytes(data))
    capsys.readouterr()
    assert acur.main(argv2) == 2  # the evaluation reads the compressed blocks back
    assert "block_00001.safetensors: its contents do not match their checksum" in last_line(capsys)


def test_interrupted_streamed_run_says_where_its_blocks_are(sharded, tiny_text_file, tmp_path, monkeypatch, capsys):
    argv = tiny_args(sharded["llama"], tiny_text_file, tmp_path, *settings("srid"), "--stream")
    real, count = streamed.StreamProgress.step, [0]

    def step(self, b):
        real(self, b)
        count[0] += 1
        if count[0] == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(streamed.StreamProgress, "step", step)
    assert acur.main(argv) == 130
    line = last_line(capsys)
    assert "interrupted by SIGINT during stage reverse" in line and "streamed run's finished blocks in" in line
    assert line.endswith("resume: run the same command again")


# ---------------------------------------------------------------- stored inputs in RAM or on disk
def written_kinds(monkeypatch) -> list[str]:
    """The kinds of the entries the run folder writes to disk (recorded as they are written)."""
    kinds, real = [], streamed.RunFolder._write
    monkeypatch.setattr(streamed.RunFolder, "_write", lambda self, kind, b, t: kinds.append(kind) or real(self, kind, b, t))
    return kinds


@pytest.mark.parametrize("method", ["srid", "acur"])
def test_stored_inputs_in_ram_or_on_disk_give_the_same_result(method, sharded, tiny_text_file, tmp_path, monkeypatch,
                                                              capsys):
    extra = settings(method)
    disk_args = parse(sharded["llama"], tiny_text_file, tmp_path / "disk", *extra, "--stream", "--stream_ram_gib", "0")
    with monkeypatch.context() as m:
        kinds = written_kinds(m)
        _, _, on_disk = acur.run_pipeline(disk_args)
    assert kinds.count("inputs") == 3 and on_disk["stream"]["stored_inputs"]["in_ram"] == 0
    assert "stored block inputs" in capsys.readouterr().out
    ram_args = parse(sharded["llama"], tiny_text_file, tmp_path / "ram", *extra, "--stream")  # the default budget
    with monkeypatch.context() as m:
        kinds = written_kinds(m)
        _, _, in_ram = acur.run_pipeline(ram_args)
    out = capsys.readouterr().out
    assert "inputs" not in kinds and in_ram["stream"]["stored_inputs"]["in_ram"] == 3
    assert "in RAM (RAM budget" in out and "half of the" in out
    assert in_ram["stream"]["stored_inputs"]["ram_peak_bytes"] == 3 * 4 * 64 * 64 * 4  # n+1 boundaries, fp32
    assert_same_result(on_disk, in_ram, assembled(disk_args), assembled(ram_args))
    # a budget of one boundary: the first input in RAM, the rest written
    part_args = parse(sharded["llama"], tiny_text_file, tmp_path / "part", *extra, "--stream", "--stream_ram_gib",
                      str(1.5 * 4 * 64 * 64 * 4 / 2**30))
    _, _, part = acur.run_pipeline(part_args)
    assert part["stream"]["stored_inputs"]["in_ram"] >= 1 and part["stream"]["stored_inputs"]["on_disk"] >= 1
    assert "block(s) at a time, the rest on disk" in capsys.readouterr().out
    assert_same_result(on_disk, part, assembled(disk_args), assembled(part_args))


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_killed_run_with_inputs_in_ram_recomputes_them_on_resume(steps, sharded, tiny_text_file, tmp_path,
                                                                 monkeypatch):
    """Killed in the statistics pass (1), at its end (2) or in the reverse pass (3): the inputs held in RAM are
    gone, the resume recomputes those it needs and ends with the uninterrupted run's result."""
    extra = settings("srid")
    whole_args = parse(sharded["llama"], tiny_text_file, tmp_path / "whole", *extra, "--stream", "--stream_ram_gib", "0")
    _, _, whole = acur.run_pipeline(whole_args)
    args = parse(sharded["llama"], tiny_text_file, tmp_path / "killed", *extra, "--stream")
    with monkeypatch.context() as m:
        kill_after(m, steps)
        with pytest.raises(Killed):
            acur.run_pipeline(args)
    assert not list(acur.stream_dir(args).glob("inputs_*"))  # they were in RAM
    _, _, again = acur.run_pipeline(args)
    assert again["stream"]["resumed"]
    assert_same_result(whole, again, assembled(whole_args), assembled(args))


# ---------------------------------------------------------------- micro-batches of the reverse pass
@pytest.mark.parametrize("method", ["srid", "wsvd"])
def test_reverse_micro_batches_give_the_same_result_with_smaller_recomputes(method, sharded, tiny_text_file, tmp_path,
                                                                           monkeypatch, capsys):
    """4 calibration samples stored in batches of 2: micro-batches of 1, 3 (across the stored batches, a short
    last one) and 4 equal the automatic run (1 for the fisher, 2 for the covariances) to round-off; no
    recompute holds more samples than its micro-batch, so the largest activations shrink with it."""
    extra = settings(method)
    base_args = parse(sharded["qwen2"], tiny_text_file, tmp_path / "auto", *extra, "--stream")
    _, _, base = acur.run_pipeline(base_args)
    assert base["stream"]["micro_batch"] == {"fisher": 1, "covariance": 2}
    assert "micro-batches of 1 sample(s) for the output fisher, 2 for the input covariances (automatic" in \
        capsys.readouterr().out
    for m in (1, 3, 4):
        seen = []
        real_cov, real_fisher = streamed.block_covariances, streamed.block_output_fisher
        with monkeypatch.context() as mp:
            mp.setattr(streamed, "block_covariances", lambda blk, infos, hidden, kw, **opts: seen.extend(
                h.shape[0] for h in hidden) or real_cov(blk, infos, hidden, kw, **opts))
            mp.setattr(streamed, "block_output_fisher", lambda blk, infos, acc, h, g, kw: seen.append(h.shape[0]) or
                       real_fisher(blk, infos, acc, h, g, kw))
            args = parse(sharded["qwen2"], tiny_text_file, tmp_path / f"m{m}", *extra, "--stream",
                         "--stream_micro_batch", str(m))
            _, _, res = acur.run_pipeline(args)
        assert max(seen) == m and res["stream"]["micro_batch"] == {"fisher": m, "covariance": m}
        # (other sums in fp32: a sensitivity of 9e-6 that is a difference of larger terms moves by 1e-5)
        assert_same_result(base, res, assembled(base_args), assembled(args), rel=1e-4)
    # the estimate the automatic choice reads: the largest tensors of a recompute grow with its samples
    sm, _, _ = model_loading.open_streamed(base_args)
    sizes = [streamed.reverse_micro_bytes(sm, m, 64) for m in (1, 2, 4)]
    assert sizes[0]["covariance"] < sizes[1]["covariance"] < sizes[2]["covariance"]
    assert sizes[0]["fisher"] * 4 == sizes[2]["fisher"]


def test_automatic_micro_batch_shrinks_when_the_device_is_short(sharded, tiny_text_file, tmp_path, monkeypatch):
    args = parse(sharded["llama"], tiny_text_file, tmp_path, *settings("srid"), "--stream")
    sm, _, _ = model_loading.open_streamed(args)
    one = streamed.reverse_micro_bytes(sm, 1, args.calib_seqlen)["covariance"]
    monkeypatch.setattr(model_loading, "free_memory", lambda device: int(one / acur.MICRO_FRACTION) + 1)
    assert acur.stream_micro_batches(args, sm, True) == (1, 1)
    monkeypatch.setattr(model_loading, "free_memory", lambda device: 2**40)
    assert acur.stream_micro_batches(args, sm, True) == (1, 2)
