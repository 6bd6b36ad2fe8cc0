"""Dataset hook of the offline lm-eval task `bigbench_mc` (see bigbench_mc.yaml); the loader itself is
offline_resources.mc_docs.

Why a hook and not `dataset_path: json`: the choices must be shuffled with a seed, and the carried file is
checked against data/SHA256SUMS before it is read."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # lm-eval imports this file by path; offline_resources lives at the repo root
    sys.path.insert(0, str(ROOT))

import offline_resources  # noqa: E402


def load_bigbench_mc(bigbench_task: str = offline_resources.DEFAULT_MC_TASK,
                     bigbench_seed: int = offline_resources.MC_SEED, bigbench_path: str | None = None, **_ignored):
    """lm-eval `custom_dataset` hook: called with the task's metadata as keyword arguments."""
    import datasets
    docs = offline_resources.mc_docs(bigbench_task, int(bigbench_seed), bigbench_path)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
