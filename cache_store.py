"""The files a run writes, and the caches under cache/ (--use_cache, --cache_dir).

Every write is atomic (a temporary file, then os.replace) and gets the mode the user's umask gives any
new file. Every cache entry stores the full key of its inputs and a sha256 of its contents; on load a
missing, truncated, corrupt or foreign entry is reported in ONE line (recorded in the run's warnings when
the caller passes its list) and recomputed, never used. Tensor caches load with torch.load(weights_only=True):
a cache file can never run code.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parent
CACHE_DIR = ROOT / "cache"

# the sources that fill each cache: a change to any of them changes the key, so a cache is never
# reused across code that would compute something else (no version number to forget to bump)
CACHE_SOURCES = {
    "statistics": ("act_aware_utils.py", "modules/model_utils.py"),
    "sensitivity": ("act_aware_utils.py", "sensitivity.py", "evaluate_utils.py", "kv_compress.py",
                    "modules/model_utils.py", "modules/registry.py", "modules/cur_math.py",
                    "modules/decompositions.py", "modules/low_rank_linear.py", "modules/cur_linear.py",
                    "structured.py", "modules/structured.py"),
    # a streamed run's per-block results: statistics, sensitivity rows, allocation, compression
    "stream": ("acur.py", "acur_args.py", "streamed.py", "model_loading.py", "act_aware_utils.py", "sensitivity.py",
               "binary_search.py", "modules/model_utils.py", "modules/registry.py", "modules/cur_math.py",
               "modules/decompositions.py", "modules/low_rank_linear.py", "modules/cur_linear.py"),
}


# ---------------------------------------------------------------- writing files
def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc/self/status): os.umask can only
    read it by setting it, and another thread creating a file in between would get the temporary mask."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the umask (tempfile.mkstemp makes 0o600 files)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def staged_folder(final: str | Path) -> Iterator[Path]:
    """A fresh sibling folder to fill in place of `final`: on success its files get the mode the umask gives
    new files (save_pretrained writes 0o600) and it replaces `final`, an older folder removed only once the new
    one is in place; on any error it is removed and `final` stays as it was. Exports are never half written."""
    final = Path(final)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, new_file_mode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + f".old{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (temporary file, then os.replace), with the mode the
    user's umask gives any new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def unwritable(folder: str | Path) -> str | None:
    """Why no file can be created in `folder` (which the run creates if missing), or None when one can.

    Tried for real, with a temporary file in the nearest existing folder: os.access answers yes for root
    even on a read-only mount, and a path under a regular file or in /proc fails only when written."""
    path = Path(folder).expanduser().absolute()
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        fd, tmp = tempfile.mkstemp(dir=existing, prefix=".cur4llm-write-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"cannot create a file in {existing}: {exc.strerror or type(exc).__name__}"
    return None


# ---------------------------------------------------------------- cache entries
def code_digest(kind: str) -> str:
    """sha256 (16 hex) of the sources that fill a cache of this kind."""
    h = hashlib.sha256()
    for rel in CACHE_SOURCES[kind if kind in ("sensitivity", "stream") else "statistics"]:
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def cache_path(kind: str, key: dict, cache_dir: str | Path | None = None, suffix: str = ".pt") -> Path:
    """A cache file named by a readable prefix and a hash of every input in `key`.

    The full key is also stored inside the file and checked on load, so a renamed or foreign
    file is never taken for a match."""
    blob = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    model = str(key.get("model", "model")).replace("/", "_").replace(":", "_")[-60:]
    return Path(cache_dir or CACHE_DIR) / f"{model}_{kind}_{digest}{suffix}"


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes (read in place, no copy)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def json_digest(payload: dict) -> str:
    """sha256 of a JSON payload in its canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def ignore_cache(path: Path, why: str, warnings: list[str] | None) -> None:
    """One line: which cache file is not used, why, and that it is recomputed (recorded in `warnings`)."""
    msg = f"ignoring cache {path}: {why}; recomputing"
    print(f"WARNING: {msg}", flush=True)
    if warnings is not None:
        warnings.append(msg)


class _Unusable(Exception):
    """A cache entry that must not be used; the message says why, in a few words."""


def _check_entry(blob: object, key: dict, digest: Callable[[], str]) -> None:
    """Raise _Unusable unless the entry carries this run's key and a checksum matching its contents."""
    if not isinstance(blob, dict) or "key" not in blob:
        raise _Unusable("it is not a cache entry")
    stored_key = blob["key"] if isinstance(blob["key"], str) else _key_text(blob["key"])
    if stored_key != _key_text(key):
        raise _Unusable("its key does not match this run's inputs")
    if "sha256" not in blob:
        raise _Unusable("it carries no checksum (written by an older version)")
    if blob["sha256"] != digest():
        raise _Unusable("its contents do not match their checksum (the file is damaged)")


def save_tensor_cache(path: Path, key: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Atomic torch.save of plain tensors, the key (a JSON string) and their checksum: loadable with weights_only."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    buf = io.BytesIO()
    torch.save({"key": _key_text(key), "sha256": tensors_digest(tensors), "tensors": tensors}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_tensor_cache(path: Path, key: dict, warnings: list[str] | None = None) -> dict[str, torch.Tensor] | None:
    """Tensors of a cache file, or None: missing, or (with one WARNING line) unreadable, foreign or damaged."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or objects weights_only refuses: torch's advice is not ours
        ignore_cache(path, f"torch.load cannot read it ({type(exc).__name__}: truncated, corrupt or not a "
                           "tensor cache)", warnings)
        return None
    tensors = blob.get("tensors") if isinstance(blob, dict) else None
    try:
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise _Unusable("it holds something other than tensors")
        _check_entry(blob, key, lambda: tensors_digest(tensors))
    except _Unusable as exc:
        ignore_cache(path, str(exc), warnings)
        return None
    return tensors


def save_json_cache(path: Path, key: dict, payload: dict) -> None:
    """Atomic JSON of the payload's keys, the cache key and the payload's checksum."""
    payload = json.loads(json.dumps(payload, default=str))  # the form it is read back in (str keys, lists)
    blob = {"key": json.loads(_key_text(key)), "sha256": json_digest(payload), **payload}
    atomic_write_bytes(Path(path), json.dumps(blob, indent=1, sort_keys=True).encode())


def load_json_cache(path: Path, key: dict, warnings: list[str] | None = None) -> dict | None:
    """The stored blob (payload keys plus "key"), or None: missing, or (one WARNING line) unreadable,
    foreign or damaged."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        blob = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        ignore_cache(path, f"it is not readable JSON ({type(exc).__name__}: truncated or corrupt)", warnings)
        return None
    try:
        _check_entry(blob, key, lambda: json_digest({k: v for k, v in blob.items() if k not in ("key", "sha256")}))
    except _Unusable as exc:
        ignore_cache(path, str(exc), warnings)
        return None
    return {k: v for k, v in blob.items() if k != "sha256"}


def cached_layer_tensors(kind: str, key: dict, names: list[str], label: str, compute: Callable[[], dict],
                         use_cache: bool, cache_dir: str | Path | None, saved: dict,
                         warnings: list[str] | None = None) -> dict:
    """Per-layer tensors from the cache when use_cache and its file under `key` holds every layer in `names`;
    else computed (and saved under the key). saved[kind] records what is on disk, for an interrupt's report;
    warnings receives the line of an entry that could not be used."""
    path = cache_path(kind, key, cache_dir)
    if use_cache:
        cached = load_tensor_cache(path, key, warnings)
        if cached is not None and set(cached) >= set(names):
            print(f"[acur] {label} from cache {path}")
            saved[kind] = f"{label} in {path}"
            return cached
    result = compute()
    if use_cache:
        save_tensor_cache(path, key, result)
        saved[kind] = f"{label} in {path}"
    return result


@contextlib.contextmanager
def file_lock(path: Path, label: str = "cache") -> Iterator[None]:
    """Exclusive fcntl.flock on `path` (created, never deleted: removing a lock file races) for the
    block; says so once when another process holds it, then waits. Released on exit, crash or kill."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[cache] another run holds {path.name}; waiting for it to finish the {label}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
