"""Dataset loader of the offline lm-eval task `bigbench_mc` (see bigbench_mc.yaml).

Why a loader and not `dataset_path: json`: the JSON lives in the per-user download cache (path differs per
machine) and the choices must be shuffled with a seed, because BIG-bench often lists the gold choice first
and lm-eval breaks log-likelihood ties towards the first choice."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # lm-eval imports this file by path; datautils lives at the repo root
    sys.path.insert(0, str(ROOT))

DEFAULT_TASK = "general_knowledge"
DEFAULT_SEED = 1234


def bigbench_mc_docs(bigbench_task: str = DEFAULT_TASK, seed: int = DEFAULT_SEED,
                     path: str | Path | None = None) -> list[dict]:
    """Docs {"input", "choices", "gold" (list of correct indices), "idx"} with seeded shuffled choices.

    Raises ValueError for a task that is not multiple choice (no target_scores)."""
    import datautils
    if path is None:
        path = datautils.bigbench_file(f"bigbench-1.0.0/bigbench/benchmark_tasks/{bigbench_task}/task.json")
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    examples = data.get("examples") or []
    rng = random.Random(f"{bigbench_task}:{seed}")
    docs = []
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores")
        if not scores:
            raise ValueError(f"BIG-bench task {bigbench_task!r} example {i} has no target_scores: "
                             "not a multiple-choice JSON task")
        choices = list(scores)
        rng.shuffle(choices)
        best = max(scores.values())
        gold = [j for j, c in enumerate(choices) if scores[c] == best and best > 0]
        if not gold:
            raise ValueError(f"BIG-bench task {bigbench_task!r} example {i} has no positive target score")
        docs.append({"input": ex["input"].strip(), "choices": choices, "gold": gold, "idx": i})
    if not docs:
        raise ValueError(f"BIG-bench task {bigbench_task!r} has no examples")
    return docs


def chance_accuracy(docs: list[dict]) -> float:
    """Expected accuracy of a uniform random pick: mean of |gold| / |choices|."""
    return sum(len(d["gold"]) / len(d["choices"]) for d in docs) / len(docs)


def load_bigbench_mc(bigbench_task: str = DEFAULT_TASK, bigbench_seed: int = DEFAULT_SEED,
                     bigbench_path: str | None = None, **_ignored):
    """lm-eval `custom_dataset` hook: called with the task's metadata as keyword arguments."""
    import datasets
    docs = bigbench_mc_docs(bigbench_task, int(bigbench_seed), bigbench_path)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
