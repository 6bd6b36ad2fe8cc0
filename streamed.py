"""The streamed pipeline (issue 30): a model larger than the GPU or the host, walked one decoder block at a
time, with every per-block result written to a run folder so a killed run resumes where it stopped.

Why this order (it reproduces the in-memory run, acur.run_pipeline, up to round-off): the allocation needs
every layer's sensitivity before any ratio is chosen, and fisher_error's sensitivity needs the output fisher,
whose gradients flow back from the loss through every block. So:

  statistics  forward over the dense blocks: activation statistics (--act_aware) and, for the weight-only
              metrics, their sensitivity rows; each block's input is stored when the reverse pass needs it
  reverse     backward from the loss, last block first, each block recomputed from its stored input
              (activation checkpointing): output fisher, input covariances (the same batched pass as
              input_covariances) and fisher_error's sensitivity rows; a block's covariances and stored
              input are dropped once its rows are written
  (allocation over every layer's rows: acur.stage_search, as in memory)
  compress    forward again: each block loaded, its linears compressed at their ratios (sequential methods
              on the inputs the compressed blocks before produce, as act_aware_utils.calibrate_block does in
              memory), the compressed block written, the next block's inputs carried on
  perplexity  evaluation windows passed block by block through the written compressed blocks

The run folder holds run.json (the key: every argument and input that changes a result) and per-block
entries (torch.save of plain tensors with their key and checksum, cache_store's format, written atomically);
a block counts as done when its marker entry is there. What the passes need of the model comes from a
model_loading.StreamedModel; what they do per layer (sensitivity rows, compression) from the caller.
"""
from __future__ import annotations

import collections
import copy
import hashlib
import json
import math
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from act_aware_utils import block_activation_stats, block_covariances, block_output_fisher, head_output_grads
from cache_store import atomic_write_bytes, load_json_cache, new_file_mode, save_json_cache, tensors_digest
from errors import UsageError
from evaluate_utils import nll_to_ppl, token_nll_sum
from model_loading import StreamedModel
from modules.low_rank_linear import empty_low_rank
from modules.model_utils import LinearInfo, replace_module, run_block

RUN_FILE = "run.json"

Rows = Callable[[list[LinearInfo], dict], dict]  # (a block's linears, what they need) -> sensitivity rows


# ---------------------------------------------------------------- the run folder
def key_difference(stored: dict, key: dict, labels: dict[str, str] | None = None) -> str | None:
    """The first input that differs between two run keys, in words (None when they are equal)."""
    labels = labels or {}
    for name in sorted(set(stored) | set(key)):
        if stored.get(name) != key.get(name):
            what = labels.get(name, f"--{name[4:]}" if name.startswith("arg:") else name)
            return f"{what} differs (the folder's run: {stored.get(name)!r}, this run: {key.get(name)!r})"
    return None


TEMPORARY = ("inputs", "grads", "carry")  # entries a later block or pass of the same run reads, then drops
# entries held in host RAM while the budget allows: the stored block inputs, read back once per block by the
# reverse pass; a run killed with them in RAM loses them and its resume recomputes them (a forward pass).
# Gradients and the carried dense stream stay on disk: a resume reads them, and nothing recomputes them cheaply
# (the compressed stream is not carried: a resume recomputes it through the written compressed blocks).
RAM_KINDS = ("inputs",)
QUEUE = 2  # writes in flight holding more than SMALL bytes, at most: what they hold (a block's inputs or weights)
# stays bounded; markers, drops and small entries queue behind them without making the caller wait (waiting on
# them put a whole gradient or block write on the critical path once per block)
SMALL = 1 << 20


class RunFolder:
    """A streamed run's folder. Opening it with a different key refuses in one line naming the input that
    differs. Entries are safetensors files keyed (in their metadata) by the run's key, the entry kind and the
    block, written atomically (a temporary file, then os.replace) by one background thread in the order they
    were asked for, so the blocks compute while the disk writes and a marker never lands before the entries
    it stands for; every read waits for the writes in flight. Results carry a sha256 of their tensors; the
    temporary entries (TEMPORARY) do not (they live minutes, and the checksum costs a second a block at 70B).
    Entries of RAM_KINDS are held in host RAM instead of written while they fit ram_budget bytes (0: never)."""

    def __init__(self, path: str | Path, key: dict, labels: dict[str, str] | None = None, ram_budget: int = 0):
        self.path = Path(path)
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        run = self.path / RUN_FILE
        self.resumed = run.exists()
        if self.resumed:
            try:
                stored = json.loads(run.read_text())["key"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{run} is not a streamed run's record ({type(exc).__name__}); remove the folder "
                                 "or choose another --stream_dir") from None
            diff = key_difference(stored, self.key, labels)
            if diff:
                raise UsageError(f"--stream_dir {self.path} holds another run: {diff}; rerun with the same arguments "
                                 "to resume it, or choose another --stream_dir (or remove that one) to start over")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(run, json.dumps({"key": self.key}, indent=1, sort_keys=True).encode())
        self.digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stream-writer")
        self._pending: collections.deque[tuple[Future, bool]] = collections.deque()  # (write, holds > SMALL)
        self._writing: dict[tuple[str, int], Future] = {}  # the last queued write of each entry
        self._wrote: dict[tuple[str, int], str] = {}  # entry -> checksum of what this process wrote there
        self._lock = threading.RLock()  # the reader thread (prefetched) may load while the main thread writes
        self.ram_budget = max(0, int(ram_budget))
        self._ram: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self.ram_bytes = 0
        self.ram_peak = 0  # bytes held at most (the bench and the tests read it)
        self.ram_entries = 0  # entries ever held in RAM, and written to disk, of RAM_KINDS
        self.disk_entries = 0

    # ---- the writer
    def _submit(self, fn: Callable, *args, holds: bool = False, entry: tuple[str, int] | None = None) -> None:
        """Queue a write; wait first only while QUEUE writes holding tensors (`holds`) are in flight. `entry`:
        the (kind, block) it writes, which a load of that entry waits for (and only for what is queued before)."""
        with self._lock:
            if holds:
                while sum(h for _, h in self._pending) >= QUEUE:
                    self._pending.popleft()[0].result()
            while self._pending and self._pending[0][0].done():  # finished: raise its error now, forget it
                self._pending.popleft()[0].result()
            fut = self._pool.submit(fn, *args)
            self._pending.append((fut, holds))
            if entry is not None:
                self._writing[entry] = fut

    def _wait_for(self, kind: str, b: int) -> None:
        """Wait for the queued write of one entry (the writer runs in order: everything queued before it too)."""
        with self._lock:
            fut = self._writing.pop((kind, b), None)
        if fut is not None:
            fut.result()

    def flush(self) -> None:
        """Wait for every write asked for so far (its error, if any, is raised here)."""
        with self._lock:
            while self._pending:
                self._pending.popleft()[0].result()
            self._writing.clear()

    def close(self) -> None:
        """Flush, then stop the writer (also after an error: no write is left running behind the caller)."""
        try:
            while self._pending:
                fut, _ = self._pending.popleft()
                try:
                    fut.result()
                except Exception:
                    if not self._pending:
                        raise
        finally:
            self._pool.shutdown(wait=True)

    # ---- entries
    def _entry_key(self, kind: str, b: int) -> str:
        return json.dumps({"run": self.digest, "kind": kind, "block": b}, sort_keys=True)

    def file(self, kind: str, b: int, suffix: str = ".safetensors") -> Path:
        return self.path / f"{kind}_{b:05d}{suffix}"

    def save(self, kind: str, b: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write an entry in the background, or hold it in host RAM (RAM_KINDS, within the budget). The tensors
        must not change afterwards (the passes only ever rebind their hidden states and drop their blocks, so
        they do not): on the CPU the RAM entry is the very tensors, with no copy."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if kind in RAM_KINDS:
            with self._lock:
                if self.ram_bytes + size <= self.ram_budget:
                    self._pop_ram(kind, b)
                    self._ram[(kind, b)] = {k: v.detach().to("cpu") for k, v in tensors.items()}
                    self.ram_bytes += size
                    self.ram_peak = max(self.ram_peak, self.ram_bytes)
                    self.ram_entries += 1
                    return
                self.disk_entries += 1
        self._submit(self._write, kind, b, dict(tensors), holds=size > SMALL, entry=(kind, b))

    def _pop_ram(self, kind: str, b: int) -> bool:
        with self._lock:
            entry = self._ram.pop((kind, b), None)
            if entry is not None:
                self.ram_bytes -= sum(t.numel() * t.element_size() for t in entry.values())
            return entry is not None

    def has(self, kind: str, b: int) -> bool:
        """Whether an entry is there, in RAM or on disk (what a resume can read)."""
        if (kind, b) in self._ram:
            return True
        self.flush()
        return self.file(kind, b).exists()

    def _write(self, kind: str, b: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"key": self._entry_key(kind, b)}
        if kind not in TEMPORARY:
            meta["sha256"] = tensors_digest(cpu)
        self._wrote.pop((kind, b), None)
        path = self.file(kind, b)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(cpu, str(tmp), metadata=meta)
            os.chmod(tmp, new_file_mode())
            os.replace(tmp, path)
            if "sha256" in meta:
                self._wrote[(kind, b)] = meta["sha256"]
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, kind: str, b: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """An entry's tensors; UsageError naming the file when it is missing, foreign or damaged (a resume
        cannot go on without it)."""
        from safetensors import safe_open
        held = self._ram.get((kind, b))
        if held is not None:
            return {k: v.to(device) for k, v in held.items()} if device is not None else dict(held)
        self._wait_for(kind, b)  # (not every write in flight: a block's input must not wait for a gradient's write)
        path = self.file(kind, b)
        why = None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("key") != self._entry_key(kind, b):
                why = "it belongs to another run or block"
            elif meta.get("sha256") == self._wrote.get((kind, b)):
                pass  # written by this process minutes ago (its checksum taken then): hashing it again on every
                # read cost the evaluation a second a block at 70B; entries of an earlier process are checked
            elif "sha256" in meta and meta["sha256"] != tensors_digest(tensors):
                why = "its contents do not match their checksum (the file is damaged)"
        except FileNotFoundError:
            why = "it is missing"
        except Exception as exc:  # truncated or not safetensors
            why = f"it is unreadable ({type(exc).__name__}: truncated or damaged)"
        if why:
            raise UsageError(f"streamed run folder {self.path}: {path.name}: {why}; remove the folder to start over")
        return {k: v.to(device) for k, v in tensors.items()} if device is not None else tensors

    def mark(self, kind: str, b: int, meta: dict) -> None:
        """The marker of a finished block (queued after its entries: a block without it is redone)."""
        self._submit(save_json_cache, self.file(kind, b, ".json"), {"entry": self._entry_key(kind, b)}, meta)

    def marker(self, kind: str, b: int) -> dict | None:
        self.flush()
        blob = load_json_cache(self.file(kind, b, ".json"), {"entry": self._entry_key(kind, b)})
        return None if blob is None else {k: v for k, v in blob.items() if k != "key"}

    def first_undone(self, kind: str, n: int) -> int:
        """The first of n blocks without its `kind` marker (n when every block has one): where a pass resumes."""
        return next((b for b in range(n) if not self.done(kind, b)), n)

    def done(self, kind: str, b: int) -> bool:
        self.flush()
        return self.file(kind, b, ".json").exists() and self.marker(kind, b) is not None

    def drop(self, kind: str, b: int) -> None:
        """Remove an entry (from RAM at once; from disk queued after the writes asked for before it)."""
        if self._pop_ram(kind, b) and not self.file(kind, b).exists():
            return
        self._submit(self._unlink, kind, b)

    def _unlink(self, kind: str, b: int) -> None:
        self._wrote.pop((kind, b), None)
        for suffix in (".safetensors", ".json"):
            self.file(kind, b, suffix).unlink(missing_ok=True)

    def drop_kind(self, kind: str) -> None:
        for k, b in [key for key in self._ram if key[0] == kind]:
            self._pop_ram(k, b)
        self.flush()
        for p in self.path.glob(f"{kind}_*"):
            p.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free


def disk_needed(sm: StreamedModel, n_samples: int, seqlen: int, store_inputs: bool, n_streams: int,
                kept_fraction: float) -> dict[str, int]:
    """Bytes the run folder will hold at its fullest: the statistics' stored block inputs (all of them at
    the turn of the reverse pass) with the gradients carried back, or the compressed blocks with the
    compression's carried streams. kept_fraction: of the blocks' weights (the parameter ratio target)."""
    size = torch.empty(0, dtype=sm.dtype).element_size()
    boundary = n_samples * seqlen * sm.config.hidden_size * size  # one block's inputs, all samples
    stats = (sm.n_blocks + 1) * boundary + 2 * boundary if store_inputs else 2 * boundary
    blocks = int(sum(sm.block_bytes(b) for b in range(sm.n_blocks)) * min(1.0, kept_fraction))
    compress = blocks + 2 * n_streams * boundary
    return {"boundary": boundary, "statistics": stats, "compress": compress, "blocks": blocks,
            "stored_inputs": (sm.n_blocks + 1) * boundary if store_inputs else 0,
            "need": max(stats, compress)}


def reverse_micro_bytes(sm: StreamedModel, micro: int, seqlen: int) -> dict[str, int]:
    """Device bytes a reverse-pass recompute of `micro` samples holds beyond the block's weights, estimated
    from the shapes (the largest tensors): the block's activations kept for the backward (about 8 hidden-wide
    and 4 of the widest linear input per token, in the run's dtype) and, for the covariances, the widest
    input flattened in fp32 and its fp32 product (the fp64 sums are there whatever the micro-batch)."""
    size = torch.empty(0, dtype=sm.dtype).element_size()
    widest = max(i.module.in_features for i in sm.block_linears(sm.layers[0], 0))
    tokens = micro * seqlen
    act = tokens * (8 * sm.config.hidden_size + 4 * widest) * size
    return {"fisher": 2 * act, "covariance": act + tokens * widest * 4 + widest * widest * 4}


# ---------------------------------------------------------------- progress
class StreamProgress:
    """One bar over every block of every pass: blocks done, the current stage, the time left (tqdm's ETA);
    each block's seconds are kept per stage (the bench reads them: per-block figures apart from fixed costs)."""

    def __init__(self, total: int, n_blocks: int, disable: bool = False):
        self.bar = tqdm(total=total, desc="stream", unit="block", disable=disable, dynamic_ncols=True)
        self.n_blocks = n_blocks
        self.stage = ""
        self.block_seconds: dict[str, list[float]] = {}
        self._t = time.perf_counter()

    def start(self, stage: str) -> None:
        self.stage = stage
        self.bar.set_description(f"stream {stage}")
        self._t = time.perf_counter()

    def ready(self) -> None:
        """The stage's fixed work (capture, head) is done: block times count from here."""
        self._t = time.perf_counter()

    def skip(self, n: int) -> None:
        """Blocks a resumed run finds done."""
        self.bar.update(n)

    def step(self, b: int) -> None:
        """Block b of the current stage is finished (its results are on disk)."""
        now = time.perf_counter()
        self.block_seconds.setdefault(self.stage, []).append(now - self._t)
        self._t = now
        self.bar.update(1)
        self.bar.set_postfix_str(f"block {b + 1}/{self.n_blocks}")

    def close(self) -> None:
        self.bar.close()


def prefetched(load: Callable[[int], nn.Module], blocks) -> Iterator[tuple[int, nn.Module]]:
    """(b, load(b)) in order, block b+1 loading on a background thread while the caller works on block b:
    reading a block (a checkpoint's shards, or the run folder) overlaps the previous block's compute. Two
    blocks are held at a time; the loaded block is the caller's to drop."""
    order = list(blocks)
    if not order:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="stream-reader") as pool:
        nxt = pool.submit(load, order[0])
        for i, b in enumerate(order):
            block = nxt.result()
            nxt = pool.submit(load, order[i + 1]) if i + 1 < len(order) else None
            try:
                yield b, block
            finally:
                del block
        # (an early exit leaves at most one read running; the pool waits for it)


def batches_of(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]


def _stack(hidden: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {str(j): h for j, h in enumerate(hidden)}


def _unstack(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[str(j)] for j in range(len(tensors))]


# ---------------------------------------------------------------- pass 1: statistics (forward)
def statistics_pass(sm: StreamedModel, names: list[str], calib_ids: torch.Tensor, batch_size: int,
                    folder: RunFolder, progress: StreamProgress, want_abs: bool, store_inputs: bool,
                    rows: Rows | None = None) -> tuple[dict, dict]:
    """(abs statistics {layer: {"abs_mean", "abs_max"}}, sensitivity rows of the weight-only metrics) over
    the dense blocks, block 0's input from the embeddings; every block's input kept in the folder when
    store_inputs (the reverse pass reads them). rows(infos, {"abs": ...}) runs per block when given."""
    progress.start("statistics")
    wanted = set(names)
    n = sm.n_blocks
    start = folder.first_undone("stats", n)
    progress.skip(start)
    if start < n:
        batches = batches_of(calib_ids, batch_size)
        hidden, kwargs = sm.capture(batches)
        if start == 0:
            folder.save("inputs", 0, _stack(hidden))
        else:
            keep = set(range(start + 1)) if store_inputs else {start}
            missing = {b for b in keep if not folder.has("inputs", b)}
            if missing:  # held in the RAM of the process that was killed
                regenerate_inputs(sm, folder, hidden, kwargs, missing, progress)
            hidden = _unstack(folder.load("inputs", start, sm.device))
        progress.ready()
        for b, block in prefetched(sm.block, range(start, n)):
            infos = sm.block_linears(block, b, wanted)
            block_kwargs = [kw[b] for kw in kwargs]
            if want_abs:
                abs_stats = block_activation_stats(block, infos, hidden, block_kwargs)
            else:
                abs_stats = {}
                with torch.no_grad():
                    for j in range(len(hidden)):
                        hidden[j] = run_block(block, hidden[j], block_kwargs[j])
            table = rows(infos, {"abs": abs_stats}) if rows is not None else {}
            folder.save("inputs", b + 1, _stack(hidden))
            folder.save("stats", b, {f"{k}|{s}": v for k, d in abs_stats.items() for s, v in d.items()})
            folder.mark("stats", b, {"table": table})
            if not store_inputs:
                folder.drop("inputs", b)
            del block, infos
            progress.step(b)
    if not store_inputs:
        folder.drop_kind("inputs")  # (a block killed between its marker and this drop left one behind)
    abs_all: dict[str, dict[str, torch.Tensor]] = {}
    table: dict = {}
    for b in range(n):
        for key, v in folder.load("stats", b).items():
            name, stat = key.split("|")
            abs_all.setdefault(name, {})[stat] = v
        table.update(folder.marker("stats", b)["table"])
    return abs_all, table


# ---------------------------------------------------------------- pass 2: reverse (output fisher, covariances)
def reverse_pass(sm: StreamedModel, names: list[str], calib_ids: torch.Tensor, batch_size: int,
                 folder: RunFolder, progress: StreamProgress, covariances: bool,
                 rows: Rows | None = None, micro: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(output fisher of every layer, as act_aware_utils.output_fisher measures it; sensitivity rows):
    the loss's gradient carried back block by block, each block recomputed from its stored input. With
    `covariances`, each block's input covariances are measured on the same stored inputs and handed to
    rows(infos, {"cov": .., "fisher": ..}) with the block's fisher, then dropped.

    micro = (fisher, covariance) calibration samples per block recompute (default (1, batch_size): as
    output_fisher's batches of 1 and input_covariances' batches): fewer samples at a time hold less of
    the block's activations and a smaller covariance product on the device; the sums are the same up
    to round-off. The stored inputs stay on the host; each micro-batch goes to the device when its turn
    comes. Gradients are kept and stored per sample, so a resume may use other micro-batches."""
    progress.start("reverse")
    wanted = set(names)
    n = sm.n_blocks
    todo = [b for b in reversed(range(n)) if not folder.done("fisher", b)]
    progress.skip(n - len(todo))
    if todo:
        m_fisher, m_cov = micro or (1, batch_size)
        n_samples = calib_ids.shape[0]
        fisher_ids = batches_of(calib_ids, m_fisher)
        _, kw_fisher = sm.capture(fisher_ids)
        cov_spans = [(i, min(i + m_cov, n_samples)) for i in range(0, n_samples, m_cov)]
        _, kw_cov = sm.capture(batches_of(calib_ids, m_cov)) if covariances else (None, None)
        top = todo[0]
        head = top == n - 1 and not folder.file("grads", n).exists()
        missing = {b for b in todo + ([n] if head else []) if not folder.has("inputs", b)}
        if missing:  # held in the RAM of the process that was killed
            hidden, kw_fwd = sm.capture(batches_of(calib_ids, batch_size))
            regenerate_inputs(sm, folder, hidden, kw_fwd, missing, progress)
            del hidden, kw_fwd
        if head:
            final = _unstack(folder.load("inputs", n))
            grads = []
            for i, ids in enumerate(fisher_ids):
                s = i * m_fisher
                g = head_output_grads(sm.head, _rows(final, s, s + ids.shape[0], batch_size, sm.device), ids)
                grads += _per_sample(g)
            folder.save("grads", n, _stack(grads))
            folder.drop("inputs", n)
            del final
        grads = _unstack(folder.load("grads", top + 1, sm.device))
        tokens = calib_ids.numel()
        progress.ready()
        for b, block in prefetched(sm.block, todo):
            infos = sm.block_linears(block, b, wanted)
            hidden = _unstack(folder.load("inputs", b))  # on the host: one micro-batch at a time goes to the device
            covs = None
            if covariances:
                covs = block_covariances(block, infos, [_rows(hidden, s, e, batch_size, sm.device) for s, e in cov_spans],
                                         [kw[b] for kw in kw_cov], on_device=True)
            acc = {i.name: torch.zeros(i.module.out_features, device=sm.device) for i in infos}
            new_grads = []
            for i, ids in enumerate(fisher_ids):
                s, e = i * m_fisher, i * m_fisher + ids.shape[0]
                g = block_output_fisher(block, infos, acc, _rows(hidden, s, e, batch_size, sm.device),
                                        torch.cat(grads[s:e]) if e - s > 1 else grads[s], kw_fisher[i][b])
                new_grads += _per_sample(g)
            grads = new_grads
            fisher = {name: (a / max(tokens, 1)).cpu() for name, a in acc.items()}
            table = rows(infos, {"cov": covs, "fisher": fisher}) if rows is not None else {}
            if b > 0:
                folder.save("grads", b, _stack(grads))
            folder.save("fisher", b, fisher)
            folder.mark("fisher", b, {"table": table})
            folder.drop("grads", b + 1)
            folder.drop("inputs", b)
            del block, infos, covs, hidden
            progress.step(b)
    folder.drop_kind("grads")
    folder.drop_kind("inputs")
    fisher_all: dict[str, torch.Tensor] = {}
    table: dict = {}
    for b in range(n):
        fisher_all.update(folder.load("fisher", b))
        table.update(folder.marker("fisher", b)["table"])
    return fisher_all, table


@torch.no_grad()
def regenerate_inputs(sm: StreamedModel, folder: RunFolder, hidden: list[torch.Tensor], kwargs: list[list[dict]],
                      wanted: set[int], progress: StreamProgress) -> None:
    """Store the inputs of the blocks in `wanted` again, by a forward over the dense blocks from block 0's
    input `hidden` (consumed): a resumed run whose stored inputs were held in RAM by the killed process."""
    stage = progress.stage
    progress.start(f"{stage}: recompute stored inputs")
    hidden = list(hidden)
    last = max(wanted)
    for b, block in prefetched(sm.block, range(last)):
        if b in wanted:
            folder.save("inputs", b, _stack(hidden))
        for j in range(len(hidden)):
            hidden[j] = run_block(block, hidden[j], kwargs[j][b])
        del block
    folder.save("inputs", last, _stack(hidden))
    progress.start(stage)


def _rows(hidden: list[torch.Tensor], start: int, stop: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Samples start..stop-1 of the stored calibration batches as one batch, on the device (a view of the
    stored batch when they lie in one)."""
    if start // batch_size == (stop - 1) // batch_size:
        out = hidden[start // batch_size][start % batch_size:start % batch_size + stop - start]
    else:
        out = torch.cat([_row(hidden, j, batch_size) for j in range(start, stop)])
    return out.to(device)


def _per_sample(g: torch.Tensor) -> list[torch.Tensor]:
    """A micro-batch's gradients as one (1, seq, width) tensor per sample, each its own storage (stored per
    sample, so the entry does not depend on the micro-batch; safetensors refuses tensors sharing memory)."""
    return [g] if g.shape[0] == 1 else [r.clone() for r in g.split(1)]


def _row(hidden: list[torch.Tensor], j: int, batch_size: int) -> torch.Tensor:
    """Sample j's hidden state (1, seq, width) out of the stored calibration batches."""
    h = hidden[j // batch_size]
    return h[j % batch_size:j % batch_size + 1]


# ---------------------------------------------------------------- pass 3: compression (forward)
BlockFit = Callable[[nn.Module, list[LinearInfo], list | None, list | None, list[dict], torch.Generator], dict]


def compress_pass(sm: StreamedModel, names: list[str], calib_ids: torch.Tensor, batch_size: int,
                  folder: RunFolder, progress: StreamProgress, fit_block: BlockFit, compressed_stream: bool,
                  dense_stream: bool, generator: torch.Generator) -> dict[str, dict]:
    """Per-layer report of the compression, block by block: fit_block(block, infos, h_c, h_d, kwargs, gen)
    replaces the block's linears (advancing the streams it is given: the compressed model's inputs h_c,
    the dense model's h_d), then the compressed block is written with the dense stream entering the next
    block, and its marker with the report and the generator's state. A resumed run goes on from the first
    block without its marker, the compressed stream recomputed through the written blocks (compressed_stream_at)."""
    progress.start("compress")
    wanted = set(names)
    n = sm.n_blocks
    start = folder.first_undone("block", n)
    progress.skip(start)
    if start < n:
        if start > 0:
            generator.set_state(torch.tensor(folder.marker("block", start - 1)["generator"], dtype=torch.uint8))
        h_c = h_d = kwargs = None
        if compressed_stream or dense_stream:
            hidden, kwargs = sm.capture(batches_of(calib_ids, batch_size))
            if start > 0:
                carry = folder.load("carry", start, sm.device) if dense_stream else {}
                if compressed_stream:
                    hidden = compressed_stream_at(sm, folder, start, hidden, kwargs, progress)
                h_d = [carry[f"d{j}"] for j in range(len(hidden))] if dense_stream else None
                if dense_stream and not compressed_stream:
                    hidden = h_d
            elif compressed_stream and dense_stream:
                h_d = [h.clone() for h in hidden]
            h_c = hidden if compressed_stream else None
            if dense_stream and not compressed_stream:
                h_d = hidden
        progress.ready()
        for b, block in prefetched(sm.block, range(start, n)):
            infos = sm.block_linears(block, b, wanted)
            report = fit_block(block, infos, h_c, h_d, [kw[b] for kw in kwargs] if kwargs else [], generator)
            folder.save("block", b, dict(block.state_dict()))
            if h_d is not None:  # (the compressed stream is not carried: compressed_stream_at recomputes it)
                folder.save("carry", b + 1, {f"d{j}": h for j, h in enumerate(h_d)})
            modules = {i.name: _module_spec(i.module) for i in infos if type(i.module) is not nn.Linear}
            folder.mark("block", b, {"report": report, "modules": modules, "generator": generator.get_state().tolist()})
            folder.drop("carry", b)
            del block, infos
            progress.step(b)
    folder.drop_kind("carry")
    report: dict[str, dict] = {}
    for b in range(n):
        report.update(folder.marker("block", b)["report"])
    return {name: report[name] for name in names if name in report}


@torch.no_grad()
def compressed_stream_at(sm: StreamedModel, folder: RunFolder, start: int, hidden: list[torch.Tensor],
                         kwargs: list[list[dict]], progress: StreamProgress) -> list[torch.Tensor]:
    """The compressed model's hidden states entering block `start` of a resumed compression, from block 0's
    input `hidden` (consumed) through the written compressed blocks: what the killed run carried, recomputed
    by one forward instead of written to the folder after every block (a boundary per block, on the critical
    path of the fastest pass)."""
    stage = progress.stage
    progress.start(f"{stage}: recompute the compressed stream")
    hidden = list(hidden)
    for b, block in prefetched(lambda i: compressed_block(sm, folder, i), range(start)):
        for j in range(len(hidden)):
            hidden[j] = run_block(block, hidden[j], kwargs[j][b])
        del block
    progress.start(stage)
    return hidden


def _module_spec(module: nn.Module) -> dict:
    return {"class": type(module).__name__, "in": module.in_features, "out": module.out_features,
            "rank": module.rank, "bias": module.bias is not None, "method": getattr(module, "method", "acur"),
            "fallback": getattr(module, "fallback", "")}


def compressed_skeleton_block(sm: StreamedModel, folder: RunFolder, b: int) -> nn.Module:
    """Block b of the compressed model on the meta device: the skeleton's block with empty low-rank modules
    of the written classes and ranks in place (no tensor read: the export lists its layers from these)."""
    meta = folder.marker("block", b)
    if meta is None:
        raise UsageError(f"streamed run folder {folder.path}: block {b} has no compressed result")
    block = copy.deepcopy(sm.layers[b])
    for info in sm.block_linears(block, b):
        spec = meta["modules"].get(info.name)
        if spec is not None:
            with torch.device("meta"):
                mod = empty_low_rank(spec["class"], spec["in"], spec["out"], spec["rank"], spec["bias"],
                                     spec["method"], dtype=sm.dtype)
            mod.fallback = spec["fallback"]
            replace_module(info, mod)
    return block


def compressed_block(sm: StreamedModel, folder: RunFolder, b: int) -> nn.Module:
    """Block b as the compression wrote it: the skeleton's block with its low-rank modules in place, on the
    device."""
    block = compressed_skeleton_block(sm, folder, b)
    state = folder.load("block", b, sm.device)
    block.load_state_dict(state, strict=True, assign=True)
    block.to(sm.device)
    block.requires_grad_(False)
    return block


def assemble(sm: StreamedModel, folder: RunFolder) -> nn.Module:
    """The whole compressed model in memory (small models: tests, exports): every written block put into
    the skeleton, whose embeddings and head are already loaded."""
    for b in range(sm.n_blocks):
        sm.layers[b] = compressed_block(sm, folder, b)
    return sm.model


# ---------------------------------------------------------------- pass 4: perplexity
@torch.no_grad()
def perplexity(sm: StreamedModel, windows_ids: torch.Tensor, batch_size: int, blocks: Callable[[int], nn.Module],
               progress: StreamProgress, stage: str) -> float:
    """evaluate_utils.perplexity_of_windows, block by block: every window's hidden state passes block b
    (blocks(b): dense from the checkpoint, or compressed from the folder) before block b+1 loads."""
    progress.start(stage)
    batches = batches_of(windows_ids, batch_size)
    hidden, kwargs = sm.capture(batches)
    progress.ready()
    for b, block in prefetched(blocks, range(sm.n_blocks)):
        for j in range(len(hidden)):
            hidden[j] = run_block(block, hidden[j], kwargs[j][b])
        del block
        progress.step(b)
    total, count = 0.0, 0
    for h, batch in zip(hidden, batches):
        s, c = token_nll_sum(sm.head(h), batch.to(sm.device))
        total, count = total + s, count + c
    return nll_to_ppl(total / count) if count else math.nan
