"""The offline zero-shot suite `cur4llm_zeroshot` (lm-eval tasks over data the repo carries, checked against
data/SHA256SUMS) and the alias `paper_zeroshot` of the papers' own lm-eval tasks. Nothing here downloads."""
from __future__ import annotations

import time

import pytest

import acur
import evaluate_utils
import offline_resources as off
from conftest import tiny_args

SUITE = list(off.ZEROSHOT_TASKS)
# items carried per task (data/README.md): whole splits, or their first N items where a split is large
CARRIED = {"cur4llm_piqa": 1838, "cur4llm_hellaswag": 1000, "cur4llm_arc_easy": 2376, "cur4llm_squadshifts": 874,
           "cur4llm_wsc273": 273, "cur4llm_lambada_mc": 1000,
           # carried, not in the group
           "cur4llm_arc_challenge": 1172, "cur4llm_boolq": 1000, "cur4llm_copa": 100, "cur4llm_winogrande": 1267}
PAPER_TASKS = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"]


# ---------------------------------------------------------------- the carried data
def test_suite_covers_the_papers_kinds_of_task():
    """At least six tasks, one carried file each, the group YAML listing exactly them in the same order."""
    import yaml
    assert len(SUITE) >= 6 and set(SUITE) | set(off.EXTRA_OFFLINE_TASKS) == set(CARRIED)
    assert not set(SUITE) & set(off.EXTRA_OFFLINE_TASKS)
    group = yaml.safe_load((evaluate_utils.LM_TASK_DIR / f"{off.ZEROSHOT_GROUP}.yaml").read_text())
    assert group["group"] == off.ZEROSHOT_GROUP and group["task"] == SUITE
    assert group["aggregate_metric_list"] == [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}]
    for task in SUITE + list(off.EXTRA_OFFLINE_TASKS):
        cfg = yaml.safe_load((evaluate_utils.LM_TASK_DIR / f"{task}.yaml").read_text().replace("!function ", ""))
        assert cfg["task"] == task and cfg["dataset_kwargs"] == {"carried_task": task}


@pytest.mark.parametrize("task", SUITE + list(off.EXTRA_OFFLINE_TASKS))
def test_suite_docs_are_whole_and_checked(task):
    """Every doc has a gold answer among its choices, no repeated choice, and the file passed its checksum."""
    docs = off.zeroshot_docs(task)
    assert len(docs) == CARRIED[task]
    for d in docs:
        n = off.n_choices(d)
        assert 2 <= n <= 5 and 0 <= d["label"] < n, d
        if "choices" in d:
            assert len(set(d["choices"])) == n and all(c.strip() for c in d["choices"]), d
    chance = off.zeroshot_chance(task)
    assert 0.2 <= chance <= 0.5
    if task == "cur4llm_boolq":  # the papers' yes/no task: 62 % "yes" in the split, 50 % for a uniform pick
        assert chance == 0.5 and 0.55 < sum(d["label"] for d in docs) / len(docs) < 0.7


def test_every_carried_suite_file_is_pinned():
    pinned = off._pinned_digests()
    for rel, _what in {**off.ZEROSHOT_TASKS, **off.EXTRA_OFFLINE_TASKS}.values():
        assert rel in pinned and (off.DATA_DIR / rel).is_file(), rel


def test_damaged_suite_file_fails_in_one_line(data_copy):
    """A line-ending-converted copy fails in one line, through the loader and through lm-eval's task build."""
    path = data_copy / "mc" / "hellaswag.jsonl"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n", 2))  # what a CRLF checkout does
    with pytest.raises(off.OfflineResourceError, match="differs from the copy the repo carries") as exc:
        off.zeroshot_docs("cur4llm_hellaswag")
    assert "\n" not in str(exc.value)
    tm = evaluate_utils.lm_task_manager(None, ["cur4llm_hellaswag"])
    with pytest.raises(off.OfflineResourceError, match="hellaswag.jsonl differs"):
        tm.load(["cur4llm_hellaswag"])
    path.unlink()
    with pytest.raises(off.OfflineResourceError, match="missing from this checkout"):
        off.zeroshot_docs("cur4llm_hellaswag")


def test_unknown_suite_task_names_what_is_carried():
    with pytest.raises(ValueError, match="cur4llm_piqa"):
        off.zeroshot_docs("cur4llm_nope")


def test_extra_tasks_build_and_copa_reads_as_lm_evals_copa():
    """The carried tasks outside the group build offline too; COPA's prompt is lm-eval's copa's."""
    tm = evaluate_utils.lm_task_manager(None, list(off.EXTRA_OFFLINE_TASKS))
    built = tm.load(list(off.EXTRA_OFFLINE_TASKS))["tasks"]
    assert set(built) == set(off.EXTRA_OFFLINE_TASKS)
    copa = built["cur4llm_copa"]
    doc = copa.test_docs()[0]
    assert copa.doc_to_text(doc) == "The man turned on the faucet therefore"
    assert copa.doc_to_choice(doc) == [" the toilet filled with water.", " water flowed from the spout."]
    boolq = built["cur4llm_boolq"]
    assert boolq.doc_to_text(boolq.test_docs()[0]).endswith("\nQuestion: does ethanol take more energy make that "
                                                             "produces?\nAnswer:")


# ---------------------------------------------------------------- lm-eval's registry, offline
def test_group_resolves_offline_to_the_suite():
    """The group is built by the local-only TaskManager (lm-eval's ~15k hub task YAMLs never indexed), and
    lm-eval resolves it to the suite's tasks, in order, with the papers' prompts."""
    t0 = time.perf_counter()
    tm = evaluate_utils.lm_task_manager(None, [off.ZEROSHOT_GROUP])
    assert "hellaswag" not in tm.all_tasks and len(tm.all_tasks) < 20  # local only
    assert evaluate_utils.lm_task_manager(None, ["bigbench_mc", "cur4llm_piqa"]) is tm
    built = tm.load([off.ZEROSHOT_GROUP])
    assert list(built["groups"]) == [off.ZEROSHOT_GROUP] and list(built["tasks"]) == SUITE
    prompts = {}
    for name, task in built["tasks"].items():
        doc = task.test_docs()[0]
        text = task.doc_to_text(doc)
        prompts[name] = text if isinstance(text, str) else task.doc_to_choice(doc)[0]
        assert len(task.test_docs()) == CARRIED[name]
    assert prompts["cur4llm_piqa"].startswith("Question: ") and prompts["cur4llm_piqa"].endswith("\nAnswer:")
    assert prompts["cur4llm_arc_easy"].endswith("\nAnswer:")
    assert prompts["cur4llm_hellaswag"] == "Roof shingle removal: A man is sitting on a roof. He"  # lm-eval's
    assert prompts["cur4llm_squadshifts"].endswith("\nAnswer:") and "\nQuestion: " in prompts["cur4llm_squadshifts"]
    assert isinstance(built["tasks"]["cur4llm_wsc273"].doc_to_text(built["tasks"]["cur4llm_wsc273"].test_docs()[0]),
                      int)  # partial evaluation: the choices are contexts, as lm-eval's wsc273
    assert time.perf_counter() - t0 < 60


def test_paper_zeroshot_alias_resolves_in_lm_evals_registry(monkeypatch):
    """`paper_zeroshot` is a group of lm-eval's own seven tasks: every member is a task of lm-eval's registry
    that reads a hub dataset. Resolved from the index alone: nothing is downloaded or even loaded."""
    import datasets
    from lm_eval.tasks._index import Kind

    def no_download(*a, **k):
        raise AssertionError("paper_zeroshot must resolve without loading a dataset")
    monkeypatch.setattr(datasets, "load_dataset", no_download)
    assert "paper_zeroshot" in evaluate_utils.lm_task_manager(None, ["cur4llm_piqa"]).all_tasks
    tm = evaluate_utils.lm_task_manager(None, ["paper_zeroshot"])  # not the local fast path: members are hub tasks
    assert "hellaswag" in tm.all_tasks
    entry = tm.task_index["paper_zeroshot"]
    assert entry.kind == Kind.GROUP and entry.cfg["task"] == PAPER_TASKS
    for name in PAPER_TASKS:
        member = tm.task_index[name]
        assert member.kind == Kind.TASK and name in tm.all_subtasks, name
        assert member.cfg.get("dataset_path"), name  # a hub dataset, which the offline suite replaces
    evaluate_utils.check_lm_tasks(["paper_zeroshot", off.ZEROSHOT_GROUP])  # both names known to the check


def test_unknown_task_is_one_line_naming_the_suite_before_the_model_loads(tiny_llama_dir, tiny_text_file,
                                                                        tmp_path, capsys, monkeypatch):
    import transformers

    def no_model(*a, **k):
        raise AssertionError("the model must not load for a bad task name")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--raw_model", "--eval_tasks", "cur4llm_zeroshott")
    assert acur.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    line = next(ln for ln in err if "unknown lm-eval task" in ln)
    assert "cur4llm_zeroshott" in line and f"'{off.ZEROSHOT_GROUP}'" in line and "lm-eval ls tasks" in line
    assert "paper_zeroshot" in line and "bigbench_mc" in line
    assert len([ln for ln in err if "unknown lm-eval task" in ln]) == 1


# ---------------------------------------------------------------- a model through the suite
def test_suite_on_a_tiny_random_llama(tiny_llama_dir):
    """The whole group through evaluate_lm_tasks (HFLM on the in-memory model): every task scored on `limit`
    docs, accuracies in [0, 1], the unweighted group mean beside lm-eval's own group figure."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    limit = 3
    out = evaluate_utils.evaluate_lm_tasks(model, tok, [off.ZEROSHOT_GROUP], limit=limit, batch_size=8)
    assert out["leaves"][off.ZEROSHOT_GROUP] == SUITE
    assert out["n_samples"] == {t: limit for t in SUITE}
    for t in SUITE:
        acc = out["acc"][t]
        assert 0 <= acc <= 1 and acc * limit == pytest.approx(round(acc * limit)), (t, acc)
    mean = sum(out["acc"][t] for t in SUITE) / len(SUITE)
    assert out["acc"][f"{off.ZEROSHOT_GROUP}_mean"] == pytest.approx(mean)
    assert out["metrics"][off.ZEROSHOT_GROUP]["acc"] == pytest.approx(mean)  # weight_by_size: false
    for t in ("cur4llm_piqa", "cur4llm_hellaswag", "cur4llm_arc_easy", "cur4llm_squadshifts"):
        assert 0 <= out["metrics"][t]["acc_norm"] <= 1
    assert not out["warnings"]



def test_suite_through_acur_results_json(tiny_llama_dir, tiny_text_file, tmp_path):
    """`acur.py --eval_tasks cur4llm_zeroshot`: the results JSON holds each task's acc, the group's unweighted
    mean, and lm-eval's acc_norm and stderr in the info."""
    import json
    argv = tiny_args(tiny_llama_dir, tiny_text_file, tmp_path, "--raw_model", "--eval_tasks", off.ZEROSHOT_GROUP,
                     "--eval_limit", "2", "--eval_batch_size", "8", "--run_name", "tiny_suite")
    assert acur.main(argv) == 0
    res = json.loads((tmp_path / "output" / "tiny_suite.json").read_text())
    assert set(res["lm_eval"]) == set(SUITE) | {f"{off.ZEROSHOT_GROUP}_mean"}
    assert res["lm_eval"][f"{off.ZEROSHOT_GROUP}_mean"] == pytest.approx(sum(res["lm_eval"][t] for t in SUITE) / len(SUITE))
    info = res["lm_eval_info"]
    assert info["n_samples"] == {t: 2 for t in SUITE} and info["leaves"] == {off.ZEROSHOT_GROUP: SUITE}
    assert "acc_norm" in info["metrics"]["cur4llm_hellaswag"] and "acc_stderr" in info["metrics"]["cur4llm_wsc273"]

# ---------------------------------------------------------------- the real model
# Per-task limits for `make test`: the cheapest limit at which each task, by the figures measured at the
# recommended limit (docstring below), stays more than 4.5 expected stderr above chance, so the CI check
# costs about half of the full one (squadshifts and hellaswag are the long prompts). The full claim, every
# task at ZEROSHOT_LIMIT, is `make suite-check` (marker `suite`), kept out of `make test` for CI's time.
CI_LIMITS = {"cur4llm_piqa": 200, "cur4llm_hellaswag": 200, "cur4llm_arc_easy": 100, "cur4llm_squadshifts": 50,
             "cur4llm_wsc273": 200, "cur4llm_lambada_mc": 50}


def _above_chance(model, tok, limits: dict[str, int]) -> list[tuple]:
    """Score each task on its first limits[task] docs; print the figures; return the tasks less than 3 of
    lm-eval's stderr above chance. The whole suite at one limit is scored as the group, whose leaves must be
    the suite's tasks."""
    failures = []
    for limit in sorted(set(limits.values()), reverse=True):
        tasks = [t for t in SUITE if limits[t] == limit]
        whole = tasks == SUITE
        t0 = time.perf_counter()
        out = evaluate_utils.evaluate_lm_tasks(model, tok, [off.ZEROSHOT_GROUP] if whole else tasks, limit=limit,
                                               batch_size=16)
        print(f"\nFIGS limit {limit}: {', '.join(tasks)} in {time.perf_counter() - t0:.0f} s")
        assert not out["warnings"]
        if whole:
            assert out["leaves"][off.ZEROSHOT_GROUP] == SUITE
        for t in tasks:
            m, n = out["metrics"][t], min(limit, CARRIED[t])
            chance = off.zeroshot_chance(t, limit)
            z = (m["acc"] - chance) / m["acc_stderr"]
            norm = f", acc_norm {m['acc_norm']:.4f} ({m['acc_norm_stderr']:.4f})" if "acc_norm" in m else ""
            print(f"FIGS {t}: n {out['n_samples'][t]}, acc {m['acc']:.4f} (stderr {m['acc_stderr']:.4f}){norm}, "
                  f"chance {chance:.4f}, {z:.2f} stderr above")
            assert out["n_samples"][t] == n
            if not m["acc"] >= chance + 3 * m["acc_stderr"]:
                failures.append((t, limit, m["acc"], m["acc_stderr"], chance))
    return failures


@pytest.mark.integration
@pytest.mark.longest
def test_suite_dense_smollm2_is_above_chance_at_ci_limits(smollm2):
    """Every task of the suite is at least 3 stderr above chance on dense SmolLM2-135M at CI_LIMITS: the
    suite's task definitions, prompts and carried data still measure something (the full claim at the
    recommended limit is the `suite` test below).

    Measured 2026-12-07 (dense fp32, batch 16, one thread), acc ± stderr, chance, margin: piqa, hellaswag,
    wsc273 at 200 as below (4.27, 4.45, 3.49 stderr); arc_easy at 100 0.460 ± 0.050, 0.2508, 4.18; squadshifts
    at 50 0.760 ± 0.061, 0.25, 8.36; lambada_mc at 50 0.860 ± 0.050, 0.25, 12.31. Time: 387 s wall while two
    other jobs shared the 2 cores (the full test below: 529-795 s in the same conditions)."""
    failures = _above_chance(*smollm2, CI_LIMITS)
    assert not failures, failures


@pytest.mark.integration
@pytest.mark.suite
def test_suite_dense_smollm2_is_above_chance_at_the_recommended_limit(smollm2):
    """Each task of the suite, scored on its first ZEROSHOT_LIMIT (200) docs (all of them where it has fewer),
    is at least 3 of lm-eval's standard errors above its chance level on dense SmolLM2-135M. A task at chance
    measures nothing: ARC-Challenge, BoolQ, WinoGrande and COPA were left out of the group for that.

    Measured 2026-12-07 (dense fp32, batch 16, limit 200; the README's table): acc ± stderr, chance, margin
    piqa 0.645 ± 0.034 (acc_norm 0.655), 0.5, 4.3 stderr; hellaswag 0.405 ± 0.035 (0.470), 0.25, 4.5;
    arc_easy 0.490 ± 0.035 (0.460), 0.2504, 6.8; squadshifts 0.680 ± 0.033 (0.720), 0.25, 13.0;
    wsc273 0.620 ± 0.034, 0.5, 3.5; lambada_mc 0.860 ± 0.025, 0.25, 24.8. The least margin, WSC273: 124 of
    200 right where 121 pass; two of its items are within 0.01 nats of a tie (PIQA's closest: 0.015), so a
    CPU kernel or thread count that flips them still passes. Time: 565 s of CPU time at one thread (piqa 66,
    hellaswag 138, arc_easy 89, squadshifts 165, wsc273 38, lambada_mc 69), 529-795 s wall on the 2-core
    machine while other jobs ran."""
    failures = _above_chance(*smollm2, {t: off.ZEROSHOT_LIMIT for t in SUITE})
    assert not failures, failures
