"""Dataset hook of the offline lm-eval task `bigbench_mc` (see bigbench_mc.yaml); the loader itself is
datautils.bigbench_mc_docs.

Why a hook and not `dataset_path: json`: the JSON lives in the per-user download cache (path differs per
machine) and the choices must be shuffled with a seed."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # lm-eval imports this file by path; datautils lives at the repo root
    sys.path.insert(0, str(ROOT))

import datautils  # noqa: E402


def load_bigbench_mc(bigbench_task: str = datautils.BIGBENCH_MC_TASK,
                     bigbench_seed: int = datautils.BIGBENCH_MC_SEED, bigbench_path: str | None = None, **_ignored):
    """lm-eval `custom_dataset` hook: called with the task's metadata as keyword arguments."""
    import datasets
    docs = datautils.bigbench_mc_docs(bigbench_task, int(bigbench_seed), bigbench_path)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
