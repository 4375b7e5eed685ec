"""Token shards on disk and the readers that cut them into training and evaluation windows.

A prepared split is a directory holding ``index.json`` and flat little-endian token files ``shard_00000.bin``, ... .
Documents are concatenated with EOS after each one, so a shard is one long token stream (a document may continue
into the next shard). Readers memory-map the shards and cut windows of ``seq_len + 1`` tokens with stride
``seq_len``; a window never crosses a shard boundary, so up to ``seq_len`` tokens at the end of each shard are unused.

A split may also carry per-token flags (``flags_00000.bin``, uint8, one byte per token, beside each shard): the chat
stage's conversations, rendered and packed into windows by ``minima.chat_data``. Bit ``FLAG_LABEL`` marks the
positions whose next token is a label (the assistant replies; every other position gets ``IGNORE_INDEX``), bit
``FLAG_START`` the first token of each conversation: a window's position ids restart there, so that attention and
rotary positions stay within one conversation (``Batch.position_ids``). Such a split is packed for one ``seq_len``
(``index.json``'s ``packed_seq_len``): every conversation lies inside one window, none crosses a window boundary.

Windows are numbered globally: shard 0's windows first, then shard 1's, and so on. The training order is a seeded
permutation of these numbers, new for every epoch; the loader's whole state is (epoch, position) plus a fingerprint of
the data, so resuming costs O(1) and never replays batches. Nothing here touches ``torch.distributed``: ``rank`` and
``world_size`` are plain arguments.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minima.shards import FLAG_LABEL, FLAG_START, IGNORE_INDEX, INDEX_FILE, DataError, TokenShards


@dataclass
class Batch:
    """One rank's micro-batch.

    Attributes:
        input_ids: (B, T) int64 token ids.
        labels: (B, T) int64; ``labels[b, t]`` is the token after ``input_ids[b, t]``, or ``IGNORE_INDEX`` where the
            position must not count in any loss term (padding rows of evaluation; in chat data, every position but
            those predicting an assistant reply).
        position_ids: (B, T) int64 positions within each packed conversation (restarting at 0 where one starts), or
            None: one sequence per row (pre-training windows), the models' default positions.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _as_shards(shards: TokenShards | str | Path, rank: int, world_size: int) -> TokenShards:
    if isinstance(shards, TokenShards):
        return shards
    return TokenShards.open(shards, rank=rank, world_size=world_size)


def _window_offsets(shards: TokenShards, seq_len: int) -> np.ndarray:
    """(num_shards + 1,) int64: global number of the first window of each shard, plus the total at the end."""
    per_shard = [max(len(s) - 1, 0) // seq_len for s in shards.shards]
    return np.concatenate([[0], np.cumsum(per_shard, dtype=np.int64)]).astype(np.int64)


def _read_windows(
    shards: TokenShards, offsets: np.ndarray, window_ids: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(len(window_ids), seq_len + 1) int64 tokens of the given global windows, and their uint8 flags (or None)."""
    out = np.empty((len(window_ids), seq_len + 1), dtype=np.int64)
    flags = None if shards.flags is None else np.zeros((len(window_ids), seq_len + 1), dtype=np.uint8)
    shard_of = np.searchsorted(offsets, window_ids, side="right") - 1
    for row, (window, shard) in enumerate(zip(window_ids.tolist(), shard_of.tolist(), strict=True)):
        start = (window - int(offsets[shard])) * seq_len
        out[row] = shards.shards[shard][start : start + seq_len + 1]
        if flags is not None:
            flags[row] = shards.flags[shard][start : start + seq_len + 1]
    return out, flags


def _to_batch(windows: np.ndarray, flags: np.ndarray | None = None) -> Batch:
    # Copies, always: with one row, ascontiguousarray would return overlapping views of ``windows``, and masking the
    # labels of a padding row would write IGNORE_INDEX into its inputs.
    input_ids, labels = windows[:, :-1].copy(), windows[:, 1:].copy()
    if flags is None:
        return Batch(input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels))
    flags = flags[:, :-1]
    labels[(flags & FLAG_LABEL) == 0] = IGNORE_INDEX
    positions = np.arange(input_ids.shape[1])
    starts = (flags & FLAG_START) != 0
    starts[:, 0] = True  # a window always begins a sequence
    last_start = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(positions - last_start),
    )


def check_packing(shards: TokenShards, seq_len: int, key: str = "data.seq_len") -> None:
    """A split packed for one window length (chat data) must be read with that length."""
    if shards.packed_seq_len is not None and shards.packed_seq_len != seq_len:
        raise DataError(
            f"{shards.path} was packed into windows of {shards.packed_seq_len} tokens ({shards.path / INDEX_FILE}:"
            f" packed_seq_len), but {key}={seq_len}: set {key}={shards.packed_seq_len} or prepare the"
            f" conversations again with --seq-len {seq_len}"
        )


def count_windows(shards: TokenShards, seq_len: int) -> int:
    """Windows of ``seq_len + 1`` tokens (stride ``seq_len``) that the readers cut from ``shards``."""
    return int(_window_offsets(shards, seq_len)[-1])


def _fingerprint(shards: TokenShards, seq_len: int, seed: int) -> str:
    identity = {
        "shards": [
            [s["num_tokens"], s["sha256"], *([s["flags_sha256"]] if "flags_sha256" in s else [])]
            for s in shards.index["shards"]
        ],
        "seq_len": seq_len,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class TokenWindowLoader:
    """The training reader: an infinite iterator of this rank's micro-batches over shuffled token windows.

    Windows are ``seq_len + 1`` consecutive tokens with stride ``seq_len`` (input = window[:-1], labels =
    window[1:]) and never cross a shard boundary. Epoch ``e`` visits them in the order
    ``np.random.default_rng([seed, e]).permutation(windows_per_epoch)``. Each ``next()`` is one global micro-step:
    it takes the next ``micro_batch_size * world_size`` windows of that order and gives rank ``r`` the slice
    ``[r * micro_batch_size, (r + 1) * micro_batch_size)``. An epoch's tail shorter than a global micro-step is
    dropped, so every rank yields exactly the same number of batches per epoch (all ranks must run the same
    number of forwards).

    The state is ``(epoch, position)``, the position counted in windows consumed globally within the epoch, so a
    checkpoint restores in O(1) and may be resumed with another ``world_size`` or ``micro_batch_size``.

    Args:
        shards: an opened ``TokenShards`` or the path of a prepared split (opened with checksum verification
            split across ranks).
        seq_len: tokens per training sequence (T); each window reads T + 1 tokens.
        micro_batch_size: sequences per rank per ``next()`` (B).
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of data-parallel ranks sharing the order.
        seed: seeds the window order together with the epoch number.
    """

    def __init__(
        self,
        shards: TokenShards | str | Path,
        *,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        _check_rank(rank, world_size)
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
        self.shards = _as_shards(shards, rank, world_size)
        check_packing(self.shards, seq_len)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self._offsets = _window_offsets(self.shards, seq_len)
        self._windows_per_step = micro_batch_size * world_size
        if self.windows_per_epoch < self._windows_per_step:
            raise DataError(
                f"{self.shards.path} has {self.windows_per_epoch} windows of {seq_len + 1} tokens "
                f"({self.shards.num_tokens} tokens in {len(self.shards.shards)} shards), fewer than one global "
                f"micro-batch of {micro_batch_size} x {world_size} ranks; prepare more data or lower seq_len / "
                "micro_batch_size"
            )
        self._fingerprint = _fingerprint(self.shards, seq_len, seed)
        self._epoch = 0
        self._position = 0  # windows consumed globally within the epoch
        self._order: np.ndarray | None = None  # (windows_per_epoch,) permutation for self._epoch

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (counted from 0; may lag by one right at an epoch's end)."""
        return self._epoch

    @property
    def windows_per_epoch(self) -> int:
        """Number of windows in the data (the permutation's length), over all shards."""
        return int(self._offsets[-1])

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank yields per epoch (the same on every rank)."""
        return self.windows_per_epoch // self._windows_per_step

    def __iter__(self) -> TokenWindowLoader:
        return self

    def __next__(self) -> Batch:
        if self._position + self._windows_per_step > self.windows_per_epoch:
            self._epoch += 1
            self._position = 0
            self._order = None
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self._epoch]).permutation(self.windows_per_epoch)
        start = self._position + self.rank * self.micro_batch_size
        window_ids = self._order[start : start + self.micro_batch_size]
        self._position += self._windows_per_step
        return _to_batch(*_read_windows(self.shards, self._offsets, window_ids, self.seq_len))

    def state_dict(self) -> dict[str, Any]:
        """A few integers and a data fingerprint; enough to resume exactly where this loader stands."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_tokens": self.shards.num_tokens,
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` in O(1); raises DataError, naming what changed, if the data is not the same."""
        missing = [k for k in ("epoch", "position", "seed", "seq_len", "fingerprint") if k not in state]
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
            was = state.get("num_tokens")
            change = (
                f"it had {was} tokens, {self.shards.path} has {self.shards.num_tokens}"
                if was is not None and was != self.shards.num_tokens
                else f"the shard checksums in {self.shards.path / INDEX_FILE} differ"
            )
            raise DataError(
                f"the checkpoint was made on different data ({change}); resume on the data it was trained on or "
                "start a new run"
            )
        if not 0 <= state["position"] <= self.windows_per_epoch or state["epoch"] < 0:
            raise DataError(f"loader state epoch={state['epoch']}, position={state['position']} is out of range")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._order = None


def eval_batches(
    shards: TokenShards | str | Path,
    *,
    seq_len: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_windows: int | None = None,
) -> Iterator[Batch]:
    """This rank's micro-batches of held-out windows, in file order (no shuffling).

    Windows are cut as in ``TokenWindowLoader``; the first ``max_windows`` of them (all when None) are read. Global
    micro-step ``s`` covers windows ``[s * G, (s + 1) * G)`` with ``G = micro_batch_size * world_size``, and rank
    ``r`` gets rows ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of it. Every rank yields the same number
    of (B, T) batches, ``ceil(num_windows / G)``: rows past the last window hold EOS inputs and ``IGNORE_INDEX``
    labels, so they add nothing to any loss. Pass an opened ``TokenShards`` when evaluating repeatedly (a path is
    opened, and its checksums verified, on every call).
    """
    _check_rank(rank, world_size)
    if seq_len < 1 or micro_batch_size < 1:
        raise DataError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
    if max_windows is not None and max_windows < 0:
        raise DataError(f"max_windows must be >= 0 or None, got {max_windows}")
    shards = _as_shards(shards, rank, world_size)
    check_packing(shards, seq_len)
    offsets = _window_offsets(shards, seq_len)
    num_windows = int(offsets[-1]) if max_windows is None else min(int(offsets[-1]), max_windows)
    windows_per_step = micro_batch_size * world_size

    def generate() -> Iterator[Batch]:
        for step in range(math.ceil(num_windows / windows_per_step)):
            first = step * windows_per_step + rank * micro_batch_size
            window_ids = np.arange(first, min(first + micro_batch_size, num_windows), dtype=np.int64)
            windows = np.full((micro_batch_size, seq_len + 1), shards.eos_id, dtype=np.int64)
            flags = None if shards.flags is None else np.zeros(windows.shape, dtype=np.uint8)
            read, read_flags = _read_windows(shards, offsets, window_ids, seq_len)
            windows[: len(window_ids)] = read
            if flags is not None:
                flags[: len(window_ids)] = read_flags
            batch = _to_batch(windows, flags)
            batch.labels[len(window_ids) :] = IGNORE_INDEX
            yield batch

    return generate()
