"""Dataset hooks and prompt helpers of the offline lm-eval tasks in this folder: `bigbench_mc` (see
bigbench_mc.yaml) and the offline zero-shot suite `cur4llm_zeroshot` (cur4llm_*.yaml). The loaders themselves
are offline_resources.mc_docs and offline_resources.zeroshot_docs.

Why a hook and not `dataset_path: json`: every carried file is checked against data/SHA256SUMS before it is
read (a damaged copy fails in one line instead of changing the figures), and bigbench_mc shuffles its choices
with a seed."""
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


def load_carried(carried_task: str, **_ignored):
    """lm-eval `custom_dataset` hook of the suite's tasks: `carried_task` comes from the YAML's dataset_kwargs,
    the rest (the run's metadata) is not read."""
    import datasets
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(offline_resources.zeroshot_docs(carried_task))})


# ---------------------------------------------------------------- COPA, written as lm-eval's copa writes it
_CONNECTOR = {"cause": " because", "effect": " therefore"}


def copa_text(doc: dict) -> str:
    """The premise without its full stop, then ' because' (the question asks for the cause) or ' therefore'."""
    return doc["premise"].strip()[:-1] + _CONNECTOR[doc["question"]]


def copa_choices(doc: dict) -> list[str]:
    """Both alternatives, first letter lower-cased, each after a space (lm-eval's copa; with the target
    delimiter this makes two spaces before the alternative, as lm-eval scores it)."""
    return [" " + c[:1].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]
