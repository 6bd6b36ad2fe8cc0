"""--device_map auto with disk offload (issue 14, item 5), on CPU: a tiny random LLaMA whose decoder
blocks accelerate puts on 'disk' (weights on 'meta', loaded by hooks at each forward) runs the whole
pipeline and gives the same compressed model as the plain load."""
from __future__ import annotations

import json

import pytest
import torch

import acur
import datautils
from acur_args import build_parser, validate_args
from conftest import tiny_args
from datautils import UsageError
from modules.model_utils import is_offloaded_module

# the tiny LLaMA is ~372 KiB: under 300 KiB of "cpu" accelerate keeps the embeddings and sends the blocks to disk
OFFLOAD = ["--device_map", "auto", "--max_memory", "cpu=300KiB"]


def _run(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch, name, *flags):
    loaded = []

    def load(args):
        out = datautils.load_model(args)
        loaded.append(out[0])
        return out
    monkeypatch.setattr(acur, "load_model", load)
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target", "0.8", "--run_name", name, *flags)
    rc = acur.main(argv)
    return rc, json.loads((tmp_path / "output" / f"{name}.json").read_text()), loaded[0]


@pytest.mark.parametrize("method", [["--method", "srid", "--sensitivity_metric", "fisher_error"],
                                    ["--method", "acur", "--act_aware", "--sensitivity_metric", "ppl"]],
                         ids=["srid-fisher_error", "acur-ppl"])
def test_device_map_auto_disk_offload_matches_plain_load(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch,
                                                         method, one_blas_thread):
    rc, off, model = _run(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch, "off", *method, *OFFLOAD)
    assert rc == 0
    placed = off["model"]["device_map"]
    assert placed.get("model.layers") == "disk" or any(k.startswith("model.layers") and v == "disk"
                                                        for k, v in placed.items()), placed
    # offload really happened and stayed: every block linear, swapped or not, has its weights on 'meta'
    swapped = [name for name, row in off["layers"].items() if row["rank"] is not None]
    assert swapped
    for name in off["layers"]:
        mod = model.get_submodule(name)
        assert is_offloaded_module(mod) and all(p.device.type == "meta" for p in mod.parameters()), name
        assert (type(mod) is not torch.nn.Linear) == (name in swapped), name
    rc_ref, ref, _ = _run(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch, "ref", *method)
    assert rc_ref == 0 and "device_map" not in ref["model"]
    assert off["param_ratio"]["reached"] == pytest.approx(ref["param_ratio"]["reached"], abs=1e-12)
    assert 0.75 < off["param_ratio"]["reached"] <= 0.8
    assert {k: v["rank"] for k, v in off["layers"].items()} == {k: v["rank"] for k, v in ref["layers"].items()}
    for ds, v in ref["ppl"]["compressed"].items():
        assert off["ppl"]["compressed"][ds] == pytest.approx(v, rel=1e-5)


@pytest.mark.parametrize("flags, needle", [
    (["--max_memory", "cpu=1GiB"], "--max_memory needs --device_map auto"),
    (["--device_map", "auto", "--max_memory", "cpu:1GiB"], "--max_memory: expected DEVICE=SIZE"),
    (["--device_map", "auto", "--weight_quant", "rtn_int8"], "--weight_quant is not supported with --device_map auto"),
    (["--device_map", "auto", "--compress_lm_head"], "--compress_lm_head is not supported with --device_map auto"),
    (["--device_map", "auto", "--act_aware", "--scaling_method", "fisher"], "--scaling_method is not supported"),
    (["--device_map", "auto", "--device", "cpu"], "--device is not supported with --device_map auto"),
    (["--device_map", "auto", "--compile_blocks", "on"], "--compile_blocks on is not supported"),
])
def test_device_map_refusals_are_one_line(tiny_llama_dir, tiny_text_file, tmp_path, flags, needle):
    args = build_parser().parse_args(tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--param_ratio_target",
                                               "0.8", *flags))
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        validate_args(args)


def test_parse_max_memory():
    assert datautils.parse_max_memory("0=20GiB, cpu=60GiB,1=1000") == {0: "20GiB", "cpu": "60GiB", 1: 1000}
    assert datautils.parse_max_memory(None) is None


def test_mixed_placement_stages_equal_plain_model(tiny_llama_dir, tmp_path, one_blas_thread):
    """Block 0 in memory, block 1 on disk (what a GPU + offload map looks like): covariances, output
    fisher and the sequential (srid) compression give the plain model's numbers and logits."""
    from transformers import AutoModelForCausalLM
    from act_aware_utils import input_covariances, output_fisher
    from modules.model_utils import find_linears
    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"}
    mixed = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, device_map=placement,
                                                 offload_folder=str(tmp_path / "off")).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert all(p.device.type == "meta" for p in mixed.model.layers[1].parameters())
    assert all(p.device.type == "cpu" for p in mixed.model.layers[0].parameters())
    ids = torch.randint(0, mixed.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    lin_m, lin_p = find_linears(mixed), find_linears(plain)
    cov_m, cov_p = input_covariances(mixed, lin_m, ids, 2), input_covariances(plain, lin_p, ids, 2)
    fis_m, fis_p = output_fisher(mixed, lin_m, ids), output_fisher(plain, lin_p, ids)
    for k in cov_p:
        torch.testing.assert_close(cov_m[k], cov_p[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fis_m[k], fis_p[k], rtol=1e-4, atol=1e-12)
    args = build_parser().parse_args(["--model_id", str(tiny_llama_dir), "--param_ratio_target", "0.7",
                                      "--method", "srid"])
    ratios = {i.name: 0.6 for i in lin_p}
    reports = []
    for model, lin, cov, fis in ((mixed, lin_m, cov_m, fis_m), (plain, lin_p, cov_p, fis_p)):
        stats = acur.layer_stats(lin, None, cov, fis, ids.numel())
        reports.append(acur.compress_model(lin, ratios, None, args, desc=None, covs=cov, stats=stats,
                                           sequential=(model, ids)))
    assert {k: v["rank"] for k, v in reports[0].items()} == {k: v["rank"] for k, v in reports[1].items()}
    assert all(v["rank"] is not None for v in reports[0].values())
    assert all(is_offloaded_module(mixed.get_submodule(n)) for n in reports[0] if n.startswith("model.layers.1."))
    with torch.no_grad():
        torch.testing.assert_close(mixed(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-5)
