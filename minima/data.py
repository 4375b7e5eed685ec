"""The readers that cut token shards (``minima.shards``) into training and evaluation windows.

A window is ``seq_len + 1`` consecutive tokens of one shard, cut with stride ``seq_len`` (input = window[:-1], labels
= window[1:]); a window never crosses a shard boundary, so up to ``seq_len`` tokens at the end of each shard go
unused. Windows are numbered per split: shard 0's first, then shard 1's, and so on.

**Documents** (``data.documents``; pre-training splits record where each document starts):

- ``off``: windows exactly as stored: they start anywhere, and attention runs across documents.
- ``bos``: a window that starts inside a document starts with BOS instead (its first label is ignored: a token in
  mid-document cannot be predicted from BOS alone), so that every window begins the way the model family's
  sequences begin. Needs documents prepared with BOS (``bos_per_document``).
- ``isolated``: as ``bos`` (where the split has BOS), and the position ids restart at every document, so attention
  and rotary positions stay within one document (``Batch.position_ids``: block-diagonal masks under sdpa/eager,
  varlen rows under flash-attn; ``minima.models.last_hidden``); the label that would predict the next document's
  first token is ignored, as nothing of that document is visible.
- ``auto``: ``bos`` where documents start with BOS, else ``off``.

Chat splits (``minima.chat_data``) carry per-token flags instead: labels only on the replies, positions restarted
at each packed conversation; every document mode reads them as packed.

**Order**: a run reads one or more sources (``Source``: a named training split and its weight). Global window slot
``g`` goes to the source ``minima.order.Mixture`` assigns it; the ``k``-th slot of source ``s`` reads that source's
window ``permute(k mod n_s, n_s, window_key(seed, s, k div n_s))``: every window once per epoch of its source, a
new seeded order each epoch, computed rather than stored. The sequence of slots is one infinite global sequence, and
a micro-step of ``world_size`` ranks takes its next ``micro_batch_size * world_size`` slots (rank ``r`` the ``r``-th
slice), so the loader's state is one integer (the slots consumed) plus a fingerprint of the data: resuming costs
O(1) at any position, on any number of ranks and any micro-batch size, and continues the same sequence.

Nothing here touches ``torch.distributed``: ``rank`` and ``world_size`` are plain arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minima.order import Mixture, permute, window_key
from minima.shards import FLAG_LABEL, FLAG_START, IGNORE_INDEX, INDEX_FILE, DataError, TokenShards

if TYPE_CHECKING:
    from minima.mixup import Mix

DOCUMENT_MODES = ("auto", "off", "bos", "isolated")
_LOG = logging.getLogger("minima")


@dataclass
class Batch:
    """One rank's micro-batch.

    Attributes:
        input_ids: (B, T) int64 token ids.
        labels: (B, T) int64; ``labels[b, t]`` is the token after ``input_ids[b, t]``, or ``IGNORE_INDEX`` where the
            position must not count in any loss term (padding rows of evaluation; in chat data, every position but
            those predicting an assistant reply; see the document modes).
        position_ids: (B, T) int64 positions within each packed sequence (restarting at 0 where one starts), or
            None: one sequence per row, the models' default positions.
        mix: MixKD's pairs and lambda when this micro-batch also trains on mixed-up copies (``minima.mixup``).
        candidate: which of MiniDisc's candidate assistants the student runs as (``minima.candidates``): a sandwich
            step repeats each micro-batch once per candidate, consecutively; None = the whole student.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    mix: Mix | None = None
    candidate: int | None = None

    def pin_memory(self) -> Batch:
        """The same batch in page-locked host memory (for asynchronous copies to a GPU)."""
        pinned = (None if t is None else t.pin_memory() for t in (self.input_ids, self.labels, self.position_ids))
        return Batch(*pinned, mix=self.mix, candidate=self.candidate)


@dataclass
class Source:
    """One source of a training mixture: a name (keys its window order), an opened split and its weight."""

    name: str
    shards: TokenShards
    weight: float = 1.0


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _as_shards(shards: TokenShards | str | Path, rank: int, world_size: int) -> TokenShards:
    if isinstance(shards, TokenShards):
        return shards
    return TokenShards.open(shards, rank=rank, world_size=world_size)


def document_mode(shards: TokenShards, requested: str, key: str = "data.documents") -> str:
    """The document mode (off, bos or isolated) that ``requested`` (one of ``DOCUMENT_MODES``) means for ``shards``."""
    if requested not in DOCUMENT_MODES:
        raise DataError(f"{key} must be one of {list(DOCUMENT_MODES)}, got {requested!r}")
    if shards.flags is not None:
        return "off"  # chat data: the flags restart positions at each conversation already
    if requested == "auto":
        return "bos" if shards.doc_starts is not None and shards.bos_per_document else "off"
    if requested != "off" and shards.doc_starts is None:
        raise DataError(
            f"{shards.path} records no document boundaries ({shards.path / INDEX_FILE} has no doc_starts), which "
            f"{key}={requested} needs: prepare it again with tools/prepare_data.py, or set {key}=off"
        )
    if requested == "bos" and not shards.bos_per_document:
        raise DataError(
            f"the documents of {shards.path} do not start with BOS (its tokenizer's family adds none), so {key}=bos "
            f"has nothing to add: set {key}=isolated (positions restart at each document) or off"
        )
    return requested


def check_packing(shards: TokenShards, seq_len: int, key: str = "data.seq_len") -> None:
    """A split packed for one window length (chat data) must be read with that length."""
    if shards.packed_seq_len is not None and shards.packed_seq_len != seq_len:
        raise DataError(
            f"{shards.path} was packed into windows of {shards.packed_seq_len} tokens ({shards.path / INDEX_FILE}:"
            f" packed_seq_len), but {key}={seq_len}: set {key}={shards.packed_seq_len} or prepare the"
            f" conversations again with --seq-len {seq_len}"
        )


class Windows:
    """The windows of one split at one ``seq_len``, read as batches in one document mode."""

    def __init__(self, shards: TokenShards, seq_len: int, documents: str = "auto") -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        check_packing(shards, seq_len)
        self.shards, self.seq_len, self.mode = shards, seq_len, document_mode(shards, documents)
        per_shard = [max(len(s) - 1, 0) // seq_len for s in shards.shards]
        self.offsets = np.concatenate([[0], np.cumsum(per_shard, dtype=np.int64)]).astype(np.int64)
        self.count = int(self.offsets[-1])
        """Number of windows."""

    def batch(self, window_ids: np.ndarray, rows: int | None = None) -> Batch:
        """The windows ``window_ids`` as a batch of ``rows`` rows (default ``len(window_ids)``); rows past them
        are padding: EOS inputs and ``IGNORE_INDEX`` labels, which add nothing to any loss."""
        return _batch(*self.read(window_ids, rows))

    def read(self, window_ids: np.ndarray, rows: int | None = None) -> _Arrays:
        """``batch``'s (input_ids, labels, position_ids or None) as numpy arrays."""
        T, shards = self.seq_len, self.shards
        rows = len(window_ids) if rows is None else rows
        tokens = np.full((rows, T + 1), shards.eos_id, dtype=np.int64)
        flags = None if shards.flags is None else np.zeros((rows, T + 1), dtype=np.uint8)
        starts = None if self.mode == "off" else np.zeros((rows, T + 1), dtype=bool)
        shard_of = np.searchsorted(self.offsets, window_ids, side="right") - 1
        for row, (window, shard) in enumerate(zip(np.asarray(window_ids).tolist(), shard_of.tolist(), strict=True)):
            start = (window - int(self.offsets[shard])) * T
            tokens[row] = shards.shards[shard][start : start + T + 1]
            if flags is not None:
                flags[row] = shards.flags[shard][start : start + T + 1]
            if starts is not None:
                doc_starts = shards.doc_starts[shard]
                lo, hi = np.searchsorted(doc_starts, [start, start + T + 1])
                starts[row, doc_starts[lo:hi].astype(np.int64) - start] = True
        input_ids, labels, positions = self._arrays(tokens, flags, starts)
        labels[len(window_ids) :] = IGNORE_INDEX
        return input_ids, labels, positions

    def _arrays(self, windows: np.ndarray, flags: np.ndarray | None, starts: np.ndarray | None) -> _Arrays:
        # Copies, always: with one row, ascontiguousarray would return overlapping views of ``windows``, and masking
        # the labels of a padding row would write IGNORE_INDEX into its inputs.
        input_ids, labels = windows[:, :-1].copy(), windows[:, 1:].copy()
        T = input_ids.shape[1]
        if flags is not None:  # chat: labels on the replies, positions restarting at each conversation
            labels[(flags[:, :-1] & FLAG_LABEL) == 0] = IGNORE_INDEX
            return self._with_positions(input_ids, labels, (flags[:, :-1] & FLAG_START) != 0)
        if starts is None:
            return input_ids, labels, None
        if self.shards.bos_per_document:
            mid_document = ~starts[:, 0]
            input_ids[mid_document, 0] = self.shards.bos_id
            labels[mid_document, 0] = IGNORE_INDEX
        if self.mode == "bos":
            return input_ids, labels, None
        labels[starts[:, 1:]] = IGNORE_INDEX  # the next document's first token: not visible from this one
        return self._with_positions(input_ids, labels, starts[:, :T])

    @staticmethod
    def _with_positions(input_ids: np.ndarray, labels: np.ndarray, starts: np.ndarray) -> _Arrays:
        positions = np.arange(input_ids.shape[1])
        starts = starts.copy()
        starts[:, 0] = True  # a window always begins a sequence
        last_start = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)
        return input_ids, labels, positions - last_start


_Arrays = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]
"""A batch as numpy arrays: (input_ids, labels, position_ids or None)."""


def _batch(input_ids: np.ndarray, labels: np.ndarray, positions: np.ndarray | None) -> Batch:
    return Batch(*(None if a is None else torch.from_numpy(a) for a in (input_ids, labels, positions)))


def _merge(parts: list[tuple[np.ndarray, _Arrays]], rows: int) -> Batch:
    """One batch of ``rows`` rows from ``(row indices, arrays)`` parts; rows no part fills are padding (their inputs
    those of the first row, their labels ``IGNORE_INDEX``)."""
    first = parts[0][1]
    input_ids = np.repeat(first[0][:1], rows, axis=0)
    labels = np.full((rows, first[1].shape[1]), IGNORE_INDEX, dtype=np.int64)
    positions = None
    if any(arrays[2] is not None for _, arrays in parts):
        positions = np.repeat(np.arange(first[1].shape[1])[None], rows, axis=0)
    for where, (ids, labs, pos) in parts:
        input_ids[where], labels[where] = ids, labs
        if pos is not None:
            positions[where] = pos
    return _batch(input_ids, labels, positions)


def count_windows(shards: TokenShards, seq_len: int) -> int:
    """Windows of ``seq_len + 1`` tokens (stride ``seq_len``) that the readers cut from ``shards``."""
    return Windows(shards, seq_len, "off").count


def _fingerprint(sources: Sequence[Source], seq_len: int, seed: int) -> str:
    """The identity of what a loader reads: each source's name, weight and shards (sizes, checksums), T and seed."""
    shards = [
        [[e["num_tokens"], e["sha256"], e.get("flags_sha256")] for e in s.shards.index["shards"]] for s in sources
    ]
    identity = {
        "sources": [[s.name, round(s.weight, 9), files] for s, files in zip(sources, shards, strict=True)],
        "seq_len": seq_len,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class TokenWindowLoader:
    """The training reader: an infinite iterator of this rank's micro-batches over one or more sources.

    Each ``next()`` is one global micro-step: the next ``micro_batch_size * world_size`` slots of the global
    sequence (module docstring), rank ``r`` taking slots ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of
    them. With ``prefetch > 0`` a background thread prepares the next micro-batches (pinned when ``pin_memory``) while
    the step runs; the batches and the state are the same as without it.

    Args:
        sources: an opened ``TokenShards`` or the path of a prepared split (one source), or a list of ``Source``.
        seq_len: tokens per training sequence (T); each window reads T + 1 tokens.
        micro_batch_size: sequences per rank per ``next()`` (B).
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of data-parallel ranks sharing the sequence.
        seed: seeds the window orders (with each source's name and epoch).
        documents: the document mode (module docstring).
        prefetch: micro-batches prepared ahead in a background thread (0: each is read when asked for).
        pin_memory: pin prefetched batches (for GPUs).
    """

    def __init__(
        self,
        sources: TokenShards | str | Path | Sequence[Source],
        *,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        documents: str = "auto",
        prefetch: int = 0,
        pin_memory: bool = False,
    ) -> None:
        _check_rank(rank, world_size)
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
        if isinstance(sources, (TokenShards, str, Path)):
            sources = [Source("", _as_shards(sources, rank, world_size))]
        self.sources = list(sources)
        if not self.sources or len({s.name for s in self.sources}) != len(self.sources):
            raise DataError(f"sources need distinct names, got {[s.name for s in self.sources]}")
        self.windows = [Windows(s.shards, seq_len, documents) for s in self.sources]
        for source, windows in zip(self.sources, self.windows, strict=True):
            if windows.count == 0:
                raise DataError(
                    f"{source.shards.path} has no window of {seq_len + 1} tokens ({source.shards.num_tokens} tokens "
                    f"in {len(source.shards.shards)} shards); prepare more data or lower data.seq_len"
                )
        self.mixture = Mixture([s.weight for s in self.sources])
        self.seq_len, self.micro_batch_size, self.rank, self.world_size = seq_len, micro_batch_size, rank, world_size
        self.seed, self.prefetch, self.pin_memory = seed, prefetch, pin_memory
        self._windows_per_step = micro_batch_size * world_size
        self._fingerprint = _fingerprint(self.sources, seq_len, seed)
        self._position = 0  # slots of the global sequence consumed (by all ranks)
        self._ahead: _Prefetcher | None = None

    @property
    def position(self) -> int:
        """Slots of the global sequence consumed so far, by all ranks together."""
        return self._position

    @property
    def windows_per_epoch(self) -> int:
        """Windows over all sources (one epoch of every source)."""
        return sum(w.count for w in self.windows)

    @property
    def epoch(self) -> int:
        """The epoch of the first source that the next slot of it comes from (counted from 0)."""
        return int(self.mixture.consumed(self._position)[0] // self.windows[0].count)

    def consumed(self) -> dict[str, dict[str, int]]:
        """Per source: the windows and tokens consumed so far (all ranks) and its current epoch."""
        counts = self.mixture.consumed(self._position).tolist()
        return {
            s.name: {"windows": k, "tokens": k * self.seq_len, "epoch": k // w.count}
            for s, w, k in zip(self.sources, self.windows, counts, strict=True)
        }

    def batch_at(self, position: int) -> Batch:
        """This rank's micro-batch of the global micro-step starting at slot ``position`` (a pure function of it)."""
        slots = position + self.rank * self.micro_batch_size + np.arange(self.micro_batch_size)
        source, ordinal = self.mixture.assign(slots)
        if len(self.sources) == 1:
            return _batch(*self._read(0, ordinal))
        return _merge([(source == s, self._read(s, ordinal[source == s])) for s in np.unique(source).tolist()],
                      self.micro_batch_size)  # fmt: skip

    def _read(self, s: int, ordinals: np.ndarray) -> _Arrays:
        n = self.windows[s].count
        epochs, within = np.divmod(ordinals, n)
        ids = np.empty_like(ordinals)
        for epoch in np.unique(epochs).tolist():  # a micro-batch may straddle an epoch's end
            here = epochs == epoch
            ids[here] = permute(within[here], n, window_key(self.seed, self.sources[s].name, epoch))
        return self.windows[s].read(ids)

    def __iter__(self) -> TokenWindowLoader:
        return self

    def __next__(self) -> Batch:
        if self.prefetch > 0:
            if self._ahead is None:
                self._ahead = _Prefetcher(self, self._position)
            batch = self._ahead.take(self._position)
        else:
            batch = self.batch_at(self._position)
        before = self.mixture.consumed(self._position)
        self._position += self._windows_per_step
        self._log_new_epochs(before, self.mixture.consumed(self._position))
        return batch

    def _log_new_epochs(self, before: np.ndarray, after: np.ndarray) -> None:
        for source, windows, b, a in zip(self.sources, self.windows, before, after, strict=True):
            if a > b and (a - 1) // windows.count > max(b - 1, 0) // windows.count and self.rank == 0:
                name = source.name or str(source.shards.path)
                _LOG.info(f"data: {name} starts epoch {(a - 1) // windows.count} in a new seeded order")

    def close(self) -> None:
        """Stop the prefetching thread, if any (it is a daemon: it also ends with the process)."""
        if self._ahead is not None:
            self._ahead.stop()
            self._ahead = None

    def state_dict(self) -> dict[str, Any]:
        """A few integers and a data fingerprint; enough to resume exactly where this loader stands."""
        return {
            "position": self._position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_tokens": sum(s.shards.num_tokens for s in self.sources),
            "fingerprint": self._fingerprint,
            "consumed": {name: c["windows"] for name, c in self.consumed().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` in O(1); raises DataError, naming what changed, if the data is not the same."""
        if "epoch" in state and "consumed" not in state:
            raise DataError(
                "the checkpoint's loader state (epoch, position) was written by an earlier minima whose order "
                "differs; it cannot be continued exactly: start a new run (run.resume=never)"
            )
        missing = [k for k in ("position", "seed", "seq_len", "fingerprint") if k not in state]
        if missing:
            raise DataError(f"loader state lacks {missing}; was it written by TokenWindowLoader.state_dict()?")
        if state["seq_len"] != self.seq_len:
            raise DataError(
                f"the checkpoint's data loader used seq_len={state['seq_len']}, this one seq_len={self.seq_len}; "
                "resume with the same sequence length"
            )
        if state["seed"] != self.seed:
            raise DataError(
                f"the checkpoint's data loader used seed={state['seed']}, this one seed={self.seed}; "
                "resume with the same data seed"
            )
        if state["fingerprint"] != self._fingerprint:
            was, now = state.get("consumed", {}), {s.name for s in self.sources}
            tokens = sum(s.shards.num_tokens for s in self.sources)
            if set(was) != now:
                change = f"its sources were {sorted(was)}, these are {sorted(now)}"
            elif state.get("num_tokens") not in (None, tokens):
                change = f"it had {state['num_tokens']} tokens, these sources have {tokens}"
            else:
                change = "the shard checksums or the mixture weights differ"
            raise DataError(
                f"the checkpoint was made on different data ({change}); resume on the data and weights it was "
                "trained on, or start a new run"
            )
        if state["position"] < 0:
            raise DataError(f"loader state position={state['position']} is out of range")
        self.close()
        self._position = int(state["position"])


class _Prefetcher:
    """A daemon thread computing ``loader.batch_at`` for the next micro-steps into a bounded queue."""

    def __init__(self, loader: TokenWindowLoader, position: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(loader, position), daemon=True, name="minima-data")
        self._thread.start()

    def _run(self, loader: TokenWindowLoader, position: int) -> None:
        while not self._stop.is_set():
            try:
                batch = loader.batch_at(position)
                item = batch.pin_memory() if loader.pin_memory else batch
            except Exception as e:  # handed to the consumer, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put((position, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
            position += loader._windows_per_step

    def take(self, position: int) -> Batch:
        got, item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        assert got == position, (got, position)  # the thread runs ahead of the consumer, in the same order
        return item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def eval_batches(
    splits: TokenShards | str | Path | Sequence[TokenShards],
    *,
    seq_len: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_windows: int | Sequence[int | None] | None = None,
    documents: str = "auto",
) -> Iterator[Batch]:
    """This rank's micro-batches of held-out windows, in file order (no shuffling).

    ``splits`` is one split or several (the held-out splits of a mixture's sources); the first ``max_windows`` windows
    of each are read (all when None; a sequence gives one limit per split), one split after another. Global
    micro-step ``s`` covers windows ``[s * G, (s + 1) * G)`` of that sequence, ``G = micro_batch_size * world_size``,
    and rank ``r`` gets rows ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of it. Every rank yields the same
    number of (B, T) batches, ``ceil(num_windows / G)``: rows past the last window are padding
    (``IGNORE_INDEX`` labels) and add nothing to any loss. Pass opened ``TokenShards`` when evaluating repeatedly.
    """
    _check_rank(rank, world_size)
    if seq_len < 1 or micro_batch_size < 1:
        raise DataError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
    if isinstance(splits, (TokenShards, str, Path)):
        splits = [splits]
    limits = list(max_windows) if isinstance(max_windows, Sequence) else [max_windows] * len(splits)
    if len(limits) != len(splits) or any(m is not None and m < 0 for m in limits):
        raise DataError(f"max_windows must be >= 0 or None, one per split, got {max_windows}")
    readers = [Windows(_as_shards(s, rank, world_size), seq_len, documents) for s in splits]
    counts = [w.count if m is None else min(w.count, m) for w, m in zip(readers, limits, strict=True)]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    windows_per_step = micro_batch_size * world_size

    def generate() -> Iterator[Batch]:
        for step in range(math.ceil(int(starts[-1]) / windows_per_step)):
            first = step * windows_per_step + rank * micro_batch_size
            ids = np.arange(first, min(first + micro_batch_size, int(starts[-1])), dtype=np.int64)
            if ids.size == 0:
                yield readers[0].batch(ids, rows=micro_batch_size)
                continue
            which = np.searchsorted(starts, ids, side="right") - 1
            used = np.unique(which).tolist()  # consecutive windows: one split, or the end of one and the next
            if len(used) == 1:
                yield readers[used[0]].batch(ids - starts[used[0]], rows=micro_batch_size)
            else:
                rows = np.arange(micro_batch_size)
                parts = [(rows[: len(ids)][which == i], readers[i].read(ids[which == i] - starts[i])) for i in used]
                yield _merge(parts, micro_batch_size)

    return generate()
