"""Speed paths must not change results: the fast sensitivity path against the straightforward loop
(on the real SmolLM2, a few layers), the distributed split (2 gloo processes on CPU, through
torch.multiprocessing and through torchrun on acur.py) against one process, and the two benchmark tools
on tiny random models (random weights: the numbers mean nothing, the code paths are the real ones).
The tiny-model fast == slow test lives in test_pipeline_random.py."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import acur
import sensitivity
from conftest import ROOT, tiny_args
from modules.model_utils import LinearInfo, find_linears, replace_module

sys.path.insert(0, str(ROOT / "tools"))
import bench_inference  # noqa: E402
import bench_pipeline  # noqa: E402

RATIOS = [0.4, 0.8]
CUR_KW = dict(rank_align=1, selection="topk", u_mode="pinv")


def _info(name: str, block: int) -> LinearInfo:
    return LinearInfo(name, None, "x", None, block)


def test_random_shard_layers_partitions_in_order_and_balances():
    layers = [_info(f"b{b}.l{j}", b) for b in range(6) for j in range(7)]
    shares = sensitivity.shard_layers(layers, 3, 6)
    names = [i.name for s in shares for i in s]
    assert sorted(names) == sorted(i.name for i in layers) and len(names) == len(set(names))
    order = {i.name: k for k, i in enumerate(layers)}
    for s in shares:  # execution order kept, so each rank's block cache only moves forward
        assert [order[i.name] for i in s] == sorted(order[i.name] for i in s)
    loads = [sum(6 - i.block + 1 for i in s) for s in shares]
    assert max(loads) - min(loads) <= 7  # at most one layer's cost apart
    assert sensitivity.shard_layers(layers, 1, 6) == [layers]
    assert sensitivity.shard_layers(layers[:1], 2, 6)[1] == []  # more ranks than layers: idle rank


def _tiny_setup(model_dir, text):
    import datautils
    from act_aware_utils import calib_scales
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = datautils.get_calib_data(f"text:{text}", tok, 4, 32, seed=3)
    linears = [i for i in find_linears(model) if i.name.endswith(("q_proj", "o_proj", "down_proj"))]
    return model, ids, linears, calib_scales(model, linears, ids, "abs_mean", 2)


def _gloo_worker(rank, world, init_file, model_dir, text, out_dir, threads):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out_dir = Path(out_dir)
    try:
        model, ids, linears, scales = _tiny_setup(model_dir, text)
        calls = []
        table = sensitivity.sensitivity_ppl(model, linears, ids, RATIOS, scales, 0.5, CUR_KW, batch_size=2,
                                            on_progress=lambda t: calls.append(len(t)))
        (out_dir / f"table{rank}.json").write_text(json.dumps({"table": table, "calls": calls}))
        if rank == 1:  # a rank holding another model must be refused, loudly, on every rank
            with torch.no_grad():
                linears[0].module.weight[0, 0] += 1.0
        try:
            sensitivity.sensitivity_ppl(model, linears, ids, RATIOS, scales, 0.5, CUR_KW, batch_size=2)
            err = ""
        except RuntimeError as exc:
            err = str(exc)
        (out_dir / f"err{rank}.txt").write_text(err)
    finally:
        dist.destroy_process_group()


def test_random_distributed_gloo_two_ranks_give_the_single_process_table(tiny_llama_dir, tiny_text_file, tmp_path):
    threads = torch.get_num_threads()
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(tiny_llama_dir), str(tiny_text_file),
                                 str(tmp_path), threads), nprocs=2, join=True)
    model, ids, linears, scales = _tiny_setup(tiny_llama_dir, tiny_text_file)
    single = sensitivity.sensitivity_ppl(model, linears, ids, RATIOS, scales, 0.5, CUR_KW, batch_size=2)
    got = [json.loads((tmp_path / f"table{r}.json").read_text()) for r in range(2)]
    for g in got:  # every rank holds the full merged table, identical and in the same order
        assert g["table"] == single and list(g["table"]) == list(single)
    assert got[0]["calls"][-1] == len(linears) and got[1]["calls"] == []  # one progress writer
    errs = [(tmp_path / f"err{r}.txt").read_text() for r in range(2)]
    assert all("ranks [1] hold a different model" in e for e in errs)


def _sens_cache_table(cache_dir: Path) -> dict:
    files = list(cache_dir.glob("*sensitivity*.json"))
    assert len(files) == 1, files
    blob = json.loads(files[0].read_text())
    payload = blob.get("payload", blob)
    return payload["table"]


def test_random_acur_under_torchrun_two_gloo_ranks_matches_single_run(tiny_llama_dir, tiny_text_file, tmp_path):
    extra = ["--param_ratio_target", "0.8", "--act_aware", "--use_cache", "--run_name", "r",
             "--sensitivity_ratios", "0.5,0.8", "--layer_filter", "o_proj|down_proj", "--eval_max_windows", "2"]
    one = tmp_path / "one"
    # both runs on the CPU (gloo): on a GPU machine the single run would otherwise take the GPU
    args = acur.build_parser().parse_args(tiny_args(tiny_llama_dir, tiny_text_file, one, *extra, "--device", "cpu"))
    _, _, res1 = acur.run_pipeline(args)
    two = tmp_path / "two"
    # same thread count as this process: CPU reductions then add in the same order, bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "acur.py"), *tiny_args(tiny_llama_dir, tiny_text_file, two, *extra, "--device", "cpu")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("param ratio of compressed linears") == 1  # rank 0 alone reports
    assert [p.name for p in (two / "output").iterdir()] == ["r.json"]  # and writes
    assert _sens_cache_table(two / "cache") == _sens_cache_table(one / "cache")
    res2 = json.loads((two / "output" / "r.json").read_text())
    assert {k: v["rank"] for k, v in res2["layers"].items()} == {k: v["rank"] for k, v in res1["layers"].items()}
    assert res2["ppl"]["compressed"] == pytest.approx(res1["ppl"]["compressed"], rel=1e-6)


def test_random_decompose_candidates_equals_one_at_a_time(tiny_llama_dir, tiny_text_file):
    model, _, linears, scales = _tiny_setup(tiny_llama_dir, tiny_text_file)
    info = linears[3]
    curs = sensitivity.decompose_candidates(info, RATIOS, scales, 0.5, CUR_KW)
    from modules.cur_linear import CURLinear
    for r, cur in zip(RATIOS, curs):
        ref = CURLinear.from_linear(info.module, r, scales[info.name], alpha=0.5, **CUR_KW)
        assert torch.equal(cur.col_indices, ref.col_indices) and torch.equal(cur.row_indices, ref.row_indices)
        assert torch.allclose(cur.dense_weight(), ref.dense_weight(), rtol=1e-5, atol=1e-6)


def test_random_bench_pipeline_runs_reduced_on_cpu_and_fast_equals_naive(tmp_path):
    out = tmp_path / "bp.json"
    rc = bench_pipeline.main(["--shape", "tiny-llama", "--device", "cpu", "--n_calib_samples", "4", "--seqlen",
                              "32", "--batch_size", "2", "--max_layers", "5", "--naive_layers", "2",
                              "--eval_windows", "2", "--sensitivity_ratios", "0.5,0.8", "--json_out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    st = rep["stages"]
    assert set(st) >= {"build_model", "calibration", "sensitivity", "search", "compress", "eval_ppl",
                       "naive_reference"}
    assert rep["n_sens_linears"] == 5 < rep["n_linears"] == 21
    assert len(rep["sensitivity_table"]) == 5
    assert st["sensitivity"]["full_estimate"] > st["sensitivity"]["seconds"] > 0
    assert rep["naive"]["max_rel_ppl_diff_vs_fast"] < 1e-5  # the fast path is exact
    assert rep["naive"]["full_estimate_s"] > 0 and rep["total_full_estimate_s"] > 0
    assert rep["cost_model"]["eval_c"] >= 0 and not rep["cost_model"]["overlap"]


def test_random_bench_pipeline_rejects_unknown_shape():
    with pytest.raises(SystemExit):
        bench_pipeline.main(["--shape", "gpt-9"])
    with pytest.raises(ValueError, match="unknown shape"):
        bench_pipeline.build_model("gpt-9", torch.device("cpu"), torch.float32)


def test_random_bench_inference_runs_on_cpu(tmp_path):
    out = tmp_path / "bi.json"
    rc = bench_inference.main(["--shape", "tiny-llama", "--device", "cpu", "--prefill_batches", "1",
                               "--prefill_len", "16", "--decode_batches", "1", "--prompt_len", "8",
                               "--decode_tokens", "2", "--reps", "1", "--layer_tokens", "4",
                               "--methods", "acur", "--ratios", "0.9,0.8", "--inference_forms", "research",
                               "--rank_aligns", "1,8", "--json_out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    m = rep["models"]
    assert list(m) == ["dense", "acur_0.9", "acur_0.9_a8", "acur_0.8", "acur_0.8_a8"]
    assert m["dense"]["weight_mib"] > m["acur_0.9"]["weight_mib"] > m["acur_0.8"]["weight_mib"]
    assert all(v > 0 for row in m.values() for k, v in row.items()
               if k.endswith(("_tok_s", "_mib", "_us")) and v is not None)
    assert m["acur_0.8_a8"]["rank_align"] == 8 and all(k % 8 == 0 for k in m["acur_0.8_a8"]["ranks"].values())
    assert {r["shape"] for r in rep["layer_orders"]} == {"32x64", "64x64", "128x64", "64x128"}


def test_random_bench_batched_siblings_checks_each_variant_and_times_it(capsys):
    import bench_batched_siblings
    bench_batched_siblings.main(["--device", "cpu", "--reps", "1", "--tokens", "1,3", "--shapes", "40x24x3,56x24x2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["40x24 x3 tokens 1", "40x24 x3 tokens 3", "56x24 x2 tokens 1", "56x24 x2 tokens 3"]
    for line in lines:
        times = dict(zip(*[iter(line.split(": ")[1].split())] * 2))
        assert {"dense_sep", "pair_bmm", "rowid_bmm", "colid_sep", "colid_bmm"} <= set(times)
        assert all(float(v) > 0 for v in times.values())
    with pytest.raises(SystemExit, match="differ"):
        bench_batched_siblings.same([torch.zeros(2, 3)], torch.ones(1, 2, 3), 1e-4)


def test_random_bench_inference_every_method_one_row_per_form(tmp_path, capsys):
    """Default --methods: one row per layer form of the registry, labelled with every method that shares
    it, layers of the real classes at the registry's ranks, every number finite; peak memory n/a on CPU."""
    from modules import registry
    out = tmp_path / "bi.json"
    rc = bench_inference.main(["--shape", "tiny", "--device", "cpu", "--prefill_batches", "1",
                               "--prefill_len", "16", "--decode_batches", "1,16", "--prompt_len", "8",
                               "--decode_tokens", "2", "--reps", "1", "--layer_tokens", "1",
                               "--json_out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    m = rep["models"]
    forms = {name: spec.form for name, spec in registry.METHODS.items() if "[" not in name and spec.per_linear}
    assert list(m)[0] == "dense" and len(m) == 1 + 2 * len(set(forms.values()))  # research and fast per form
    fast = {k: r for k, r in m.items() if k.endswith("_fast")}
    assert {r["class"] for r in fast.values()} == {"FastPair", "FastRowID", "FastColID"}
    # stacked siblings (q/k/v and gate/up of each block) for every form whose first factor is a plain product
    assert {r["form"]: r["stacked_groups"] for r in fast.values()} == {"cur": 6, "svd": 6, "rowid": 6, "colid": 6}  # 3 blocks
    for k, r in fast.items():  # same ranks as the research layers; CUR's folded U makes it smaller, stacks
        research = m[k[:-len("_fast")]]  # pad each sibling's rows to a multiple of 8 (these ranks are not)
        assert r["ranks"] == research["ranks"]
        pad_mib = 3 * (3 + 2) * 7 * 64 * 4 / 2**20  # 3 blocks, q/k/v + gate/up, < 8 zero rows of width 64, fp32
        if r["form"] == "cur":
            assert r["weight_mib"] < research["weight_mib"]
        else:
            assert research["weight_mib"] - 0.01 < r["weight_mib"] <= research["weight_mib"] + pad_mib
    rows = [r for k, r in m.items() if k != "dense" and not k.endswith("_fast")]
    assert sorted(x for r in rows for x in r["methods"]) == sorted(forms)  # every method in exactly one row
    assert {r["form"] for r in rows} == set(forms.values())
    assert all(forms[x] == r["form"] for r in rows for x in r["methods"])
    assert {r["form"]: r["class"] for r in rows} == {"cur": "CURLinear", "svd": "SVDLinear",
                                                     "rowid": "RowIDLinear", "colid": "ColIDLinear"}
    for r in rows:
        assert r["ratio"] == 0.8
        for shape, k in r["ranks"].items():
            mm, nn_ = map(int, shape.split("x"))
            assert k == registry.get(r["methods"][0]).rank(mm, nn_, 0.8)
        assert r["weight_mib"] < m["dense"]["weight_mib"]
    keys = ("weight_mib", "prefill_b1_tok_s", "decode_b1_tok_s", "decode_b16_tok_s", "decode_b1_graph_tok_s",
            "decode_b16_graph_tok_s", "linears_1tok_us")
    for row in m.values():
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in keys)
        assert row["peak_mib"] is None
    assert {r["shape"] for r in rep["fast_layers"]} == {"32x64", "64x64", "128x64", "64x128"}
    assert all(r[c] > 0 for r in rep["fast_layers"] for c in r if c.endswith("_us"))
    assert all(("rowid3_group_us" in r) == (r["shape"] == "64x64") for r in rep["fast_layers"])
    text = capsys.readouterr().out
    assert "rowid/srid" in text and "svd/asvd/wsvd" in text and "peak GPU MiB" in text and "n/a" in text


def test_random_bench_inference_compiled_cases_compile_every_block_and_compare_with_compiled_dense(tmp_path):
    """--inference_forms compiled: a compiled dense case as the baseline, every decoder block compiled
    without a graph break, the blocks back to eager after each case, eager decode not measured."""
    out = tmp_path / "bc.json"
    rc = bench_inference.main(["--shape", "tiny", "--device", "cpu", "--prefill_batches", "1", "--prefill_len", "16",
                               "--decode_batches", "1", "--prompt_len", "8", "--decode_tokens", "2", "--reps", "1",
                               "--layer_tokens", "1", "--methods", "rowid", "--inference_forms", "compiled",
                               "--json_out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    m = rep["models"]
    assert list(m) == ["dense", "dense_compiled", "rowid_0.8_compiled"]
    for name in ("dense_compiled", "rowid_0.8_compiled"):
        row = m[name]
        assert row["compiled_blocks"] == 3 and row["graph_breaks"] == 0 and row["decode_b1_tok_s"] is None
        assert row["decode_b1_graph_tok_s"] > 0 and row["prefill_b1_tok_s"] > 0 and row["linears_1tok_us"] > 0
        assert row["compiled_tokens_agree"] == 2  # --decode_tokens 2: fp32, the compiled model decodes the same
    assert m["rowid_0.8_compiled"]["class"] == "FastRowID"
    rows = bench_inference.table_rows(rep)  # a compiled case's "x dense" is against compiled dense
    ratios = rows[[label for label, _ in rows].index("decode_b1_graph_tok_s") + 1][1]
    assert ratios[2] == pytest.approx(m["rowid_0.8_compiled"]["decode_b1_graph_tok_s"]
                                      / m["dense_compiled"]["decode_b1_graph_tok_s"])
    assert m["rowid_0.8_compiled"]["weight_mib"] < m["dense"]["weight_mib"]
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False  # the compiler's settings are restored


def test_random_bench_compile_blocks_compiles_the_decoder_layers_and_uncompile_restores_eager():
    model = bench_pipeline.build_model("tiny-llama", torch.device("cpu"), torch.float32, 0)
    assert bench_inference.compile_blocks(model) == len(model.model.layers) == 3
    compiled = [n for n, mod in model.named_modules() if getattr(mod, "_compiled_call_impl", None) is not None]
    assert compiled == [f"model.layers.{i}" for i in range(3)]
    bench_inference.uncompile_blocks(model)
    assert not any(getattr(mod, "_compiled_call_impl", None) is not None for mod in model.modules())


def test_random_bench_inference_rejects_unknown_method():
    with pytest.raises(SystemExit):
        bench_inference.main(["--shape", "tiny", "--device", "cpu", "--methods", "nope"])


@pytest.mark.integration
def test_smollm2_fast_sensitivity_equals_straightforward_loop_on_a_few_layers(smollm2):
    import datautils
    from act_aware_utils import calib_scales
    model, tok = smollm2
    ids = datautils.get_calib_data("squad_wiki", tok, 1, 64, seed=5)
    all_linears = find_linears(model)
    n = len(all_linears)
    picks = [all_linears[i] for i in (n * 2 // 3, n * 5 // 6 + 1, n - 1)]  # late blocks: short test
    assert len({i.block for i in picks}) == 3
    scales = calib_scales(model, picks, ids, "abs_mean", 1)
    ratios = [0.6]
    fast = sensitivity.sensitivity_ppl(model, picks, ids, ratios, scales, 0.5, CUR_KW, batch_size=1, fast=True)
    slow = sensitivity.sensitivity_ppl(model, picks, ids, ratios, scales, 0.5, CUR_KW, batch_size=1, fast=False)
    assert list(fast) == [i.name for i in picks] == list(slow)
    print("\nFIGS fast vs slow sensitivity: max rel diff "
          f"{max(abs(fast[n][r] / slow[n][r] - 1) for n in fast for r in fast[n]):.2e}, values "
          + ", ".join(f"{fast[n][r]:.6f}" for n in fast for r in fast[n]))
    for name in fast:
        for r in fast[name]:
            assert fast[name][r] == pytest.approx(slow[name][r], rel=1e-5)
    assert len({v for row in fast.values() for v in row.values()}) == 3  # every candidate differs
    assert all(type(i.module) is torch.nn.Linear for i in find_linears(model))


def test_random_bench_block_counts_the_protocol_and_times_every_part(capsys):
    import bench_block
    assert bench_block.main(["--shape", "tiny-llama", "--device", "cpu", "--seqlen", "32", "--n_calib_samples", "2",
                             "--batch_size", "2", "--no_compile"]) == 0
    out = capsys.readouterr().out
    # tiny-llama: 3 blocks x 7 linears x 6 ratios; a layer in block b runs 3 - b blocks
    assert "(126 candidates, 252 block passes)" in out
    for part in ("block eager", "head+nll", "tail of 3 blocks eager", "decompose (64, 64)", "q_proj (64, 64) at 0.8"):
        assert part in out


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("fast", [False, True])
def test_static_decode_gives_the_greedy_tokens_of_generate_and_rewinds(device, fast):
    """The bench's graph-decode loop (a CUDA graph per step on a GPU, eager on the CPU) decodes what
    model.generate does, every run; also with compressed layers in their inference form."""
    from modules.fast_layers import to_inference_form
    dev = torch.device(device)
    model = bench_pipeline.build_model("tiny-llama", dev, torch.float32, seed=3)
    if fast:
        for info in find_linears(model):
            replace_module(info, bench_inference.build_layer(info.module, 0.7, "rowid", 1, torch.Generator()))
        to_inference_form(model)
    prompt = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)[:, 7:]
        dec = bench_inference.StaticDecode(model, prompt, steps=5, graph=device == "cuda")
        first, second = dec.run(5), dec.run(5)
    assert torch.equal(first, want) and torch.equal(second, want)
