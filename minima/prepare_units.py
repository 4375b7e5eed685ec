"""Work units: the grain of parallelism and of restarts of ``minima.prepare``.

A worker tokenises one whole unit (``minima.sources.work_units``): its documents' split draws (``document_draws``),
its shards, written by ``ShardWriter`` (which hashes every file as it writes it) under the unit's prefix
``shard_{u:05d}_`` in ``train/`` and ``valid/``, then, atomically (tmp file + rename), its manifest
``.prepare/unit_{u:05d}.json``: the unit's spec, its shards' index entries, document and token counts per split, the
unit's lowest and highest draws (for the small-input overrides) and its busy seconds. Nothing depends on which worker
did what or when, so the bytes are the same for any number of workers.

A rerun keeps each unit whose manifest exists, names the same input (``spec``: paths and sizes, or dataset shards)
and whose files still have their recorded sizes (``plan_source``); the other units' manifests and then files are
deleted by prefix and the units redone. A unit without a manifest is never read, so a shard cut short by a kill is
never taken for a complete one. The options that shape every unit are recorded in ``.prepare/run.json``; when they
differ, the source starts over (said on stderr). One process at a time prepares a source (``locked``: an flock on
``.prepare/lock``); pool workers die with the main process (``PR_SET_PDEATHSIG``), so none writes on after a kill.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from minima.order import mix64
from minima.shards import DOC_DTYPE, INDEX_FILE, DataError, ShardWriter, companion, remove_split
from minima.sources import Source, unit_texts, work_units
from minima.tokenizer import Tokenizer

STATE_DIR = ".prepare"
SPLITS = ("train", "valid")
_UINT64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """One splitmix64 step: the golden-ratio increment, then the finaliser."""
    return mix64(x + _UINT64(0x9E3779B97F4A7C15))


def document_draws(seed: int, unit: int, ordinals: np.ndarray) -> np.ndarray:
    """(n,) float64 in [0, 1): split draws of documents ``ordinals`` of work unit ``unit``, splitmix64 of the three."""
    key = _splitmix64(_splitmix64(np.array([seed % 2**64], dtype=_UINT64)) ^ _UINT64(unit))
    bits = _splitmix64(key ^ np.asarray(ordinals, dtype=_UINT64))
    return (bits >> _UINT64(11)).astype(np.float64) * 2.0**-53  # the top 53 bits, exact in a float64


@dataclass(frozen=True)
class UnitJob:
    """One work unit to (re)write: everything a worker needs besides the tokenizer."""

    unit: int
    spec: dict[str, Any]
    root: Path  # out or out/NAME
    text_field: str
    seed: int
    valid_fraction: float
    shard_tokens: int
    adds_bos: bool
    force: dict[str, Any] | None = None  # {"ordinal": k, "split": "train" | "valid"}: the small-input override


@dataclass
class Target:
    """One source's output directory during a run: its units and the manifests of those complete."""

    source: Source
    root: Path
    units: list[dict[str, Any]]
    manifests: dict[int, dict[str, Any]]
    done: list[int] = field(default_factory=list)  # units written by this run


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _manifest_file(root: Path, unit: int) -> Path:
    return root / STATE_DIR / f"unit_{unit:05d}.json"


def _remove_unit(root: Path, unit: int) -> None:
    """A unit's manifest first (so it is incomplete from here on), then its files in both splits."""
    _manifest_file(root, unit).unlink(missing_ok=True)
    for split in SPLITS:
        for kind in ("shard", "docs", "flags"):
            for stale in (root / split).glob(f"{kind}_{unit:05d}_*.bin"):
                stale.unlink()


def _prepare_unit(job: UnitJob, tok: Tokenizer, report: Callable[[int, int], None]) -> dict[str, Any]:
    """Tokenise one work unit into its shards in ``root/{train,valid}``, then write its manifest; returns it."""
    started = time.perf_counter()
    _remove_unit(job.root, job.unit)
    writers = {
        split: ShardWriter(
            job.root / split, vocab_size=tok.vocab_size, shard_tokens=job.shard_tokens, prefix=f"shard_{job.unit:05d}_"
        )
        for split in SPLITS
    }
    head, tail = [tok.bos_id] if job.adds_bos else [], [tok.eos_id]
    ordinal = natural_valid = 0
    lowest = highest = None  # [draw, ordinal] of the unit's first lowest / highest draw
    for texts in unit_texts(job.spec, job.text_field):
        draws = document_draws(job.seed, job.unit, np.arange(ordinal, ordinal + len(texts)))
        is_valid = draws < job.valid_fraction
        natural_valid += int(is_valid.sum())
        lo, hi = int(np.argmin(draws)), int(np.argmax(draws))
        if lowest is None or draws[lo] < lowest[0]:
            lowest = [float(draws[lo]), ordinal + lo]
        if highest is None or draws[hi] > highest[0]:
            highest = [float(draws[hi]), ordinal + hi]
        if job.force is not None and 0 <= job.force["ordinal"] - ordinal < len(texts):
            is_valid[job.force["ordinal"] - ordinal] = job.force["split"] == "valid"
        tokens = 0
        for ids, valid in zip(tok.encode_batch(texts), is_valid.tolist(), strict=True):
            document = np.array(head + ids + tail)
            writers["valid" if valid else "train"].add(document)
            tokens += document.size
        report(len(texts), tokens)
        ordinal += len(texts)
    entries = {split: writer.close() for split, writer in writers.items()}
    manifest = {
        "unit": job.unit,
        "spec": job.spec,
        "force": job.force,
        "documents": {split: writers[split].num_documents for split in SPLITS},
        "tokens": {split: sum(e["num_tokens"] for e in entries[split]) for split in SPLITS},
        "natural_valid": natural_valid,
        "lowest": lowest,
        "highest": highest,
        "seconds": round(time.perf_counter() - started, 4),
        "entries": entries,
    }
    _write_json(_manifest_file(job.root, job.unit), manifest)
    return manifest


_WORKER: tuple[Tokenizer, Any] | None = None  # a pool worker's tokenizer and progress queue


def _init_worker(tok: Tokenizer, queue: Any) -> None:
    global _WORKER
    _WORKER = (tok, queue)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism; one thread each
    if sys.platform.startswith("linux"):  # die with the main process: no orphan keeps writing after a kill
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_unit(job: UnitJob) -> dict[str, Any]:
    tok, queue = _WORKER
    return _prepare_unit(job, tok, lambda docs, tokens: queue.put((docs, tokens)))


def run_units(jobs: list[UnitJob], tok: Tokenizer, workers: int) -> list[tuple[UnitJob, dict[str, Any]]]:
    """Run ``jobs`` (in-process for one worker) with a progress bar of documents/s and tokens/s."""
    results: list[tuple[UnitJob, dict[str, Any]]] = []
    if not jobs:
        return results
    workers = min(workers, len(jobs))
    with ExitStack() as stack:
        queue = pool = None
        if workers > 1:  # forked before the progress bar's thread starts; fork shares the loaded tokenizer
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            queue = ctx.Queue()
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tok, queue))
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)  # on an error: finish running units only
        desc = f"tokenizing, {workers} worker{'s' if workers > 1 else ''}"
        progress = stack.enter_context(tqdm(desc=desc, unit=" docs", smoothing=0.1))
        started, tokens = time.perf_counter(), 0

        def report(docs: int, new_tokens: int) -> None:
            nonlocal tokens
            tokens += new_tokens
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            progress.set_postfix_str(f"{rate:,.0f} tokens/s, units {len(results)}/{len(jobs)}", refresh=False)
            progress.update(docs)

        if pool is None:
            for job in jobs:
                results.append((job, _prepare_unit(job, tok, report)))
                report(0, 0)
            return results
        futures = {pool.submit(_worker_unit, job): job for job in jobs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while not queue.empty():
                report(*queue.get())
            for future in done:
                results.append((futures[future], future.result()))
                report(0, 0)
        while not queue.empty():
            report(*queue.get())
    return results


@contextmanager
def locked(root: Path) -> Iterator[None]:
    lock = root / STATE_DIR / "lock"
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{root} is being prepared by another process (it holds {lock}); wait for it") from None
        yield


def _kept_manifest(root: Path, unit: int, spec: dict[str, Any], itemsize: int) -> dict[str, Any] | None:
    """The unit's manifest when it is complete for ``spec`` and its files have their recorded sizes, else None."""
    manifest = read_json(_manifest_file(root, unit))
    if manifest is None or manifest.get("spec") != spec:
        return None
    for split in SPLITS:
        for entry in manifest["entries"][split]:
            sizes = {
                entry["file"]: entry["num_tokens"] * itemsize,
                companion(entry["file"], "docs"): entry["num_doc_starts"] * DOC_DTYPE.itemsize,
            }
            for name, size in sizes.items():
                file = root / split / name
                if not file.is_file() or file.stat().st_size != size:
                    return None
    return manifest


def plan_source(
    source: Source, root: Path, options: dict[str, Any], pattern: str | None, unit_bytes: int | None
) -> Target:
    """The source's units and the manifests a rerun can keep; starts over when the recorded options differ."""
    run_file = root / STATE_DIR / "run.json"
    previous = read_json(run_file)
    if previous != options:
        if previous is not None:
            changed = sorted(k for k in {*options, *previous} if options.get(k) != previous.get(k))
            print(f"{root}: {', '.join(changed)} changed since the last preparation: starting over", file=sys.stderr)
        elif any((root / split / INDEX_FILE).exists() for split in SPLITS):
            print(f"{root}: prepared without a run record (older minima): starting over", file=sys.stderr)
        for manifest in (root / STATE_DIR).glob("unit_*.json"):
            manifest.unlink()
        for split in SPLITS:
            remove_split(root / split)
        _write_json(run_file, options)
    units = work_units(source, pattern=pattern, unit_bytes=unit_bytes)
    itemsize = np.dtype(options["dtype"]).itemsize
    manifests = {u: m for u, spec in enumerate(units) if (m := _kept_manifest(root, u, spec, itemsize)) is not None}
    for stale in (root / STATE_DIR).glob("unit_*.json"):  # units past the end (fewer inputs now)
        if int(stale.stem.split("_")[1]) >= len(units):
            _remove_unit(root, int(stale.stem.split("_")[1]))
    return Target(source, root, units, manifests)


def overrides(target: Target, valid_fraction: float) -> dict[int, dict[str, Any] | None]:
    """The small-input override each unit must carry (see the module docstring): None for all but at most one."""
    manifests = [target.manifests[u] for u in range(len(target.units))]
    want: dict[int, dict[str, Any] | None] = dict.fromkeys(range(len(manifests)))
    total = sum(m["documents"]["train"] + m["documents"]["valid"] for m in manifests)
    drawn_valid = sum(m["natural_valid"] for m in manifests)
    if total and drawn_valid == total:
        key, split, better = "highest", "train", lambda a, b: a > b
    elif drawn_valid == 0 and valid_fraction > 0 and total >= 2:
        key, split, better = "lowest", "valid", lambda a, b: a < b
    else:
        return want
    best = None  # the first unit holding the extreme draw, in unit order
    for u, m in enumerate(manifests):
        if m[key] is not None and (best is None or better(m[key][0], manifests[best][key][0])):
            best = u
    want[best] = {"ordinal": manifests[best][key][1], "split": split}
    return want
