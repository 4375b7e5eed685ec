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
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

IGNORE_INDEX = -100
"""Label value for positions excluded from every loss term (the default ``ignore_index`` of torch's losses)."""

FORMAT = "minima-token-shards/1"
INDEX_FILE = "index.json"
FLAG_LABEL = 1
"""Flag bit: the token after this position is a label of it (an assistant reply's token or end-of-turn)."""
FLAG_START = 2
"""Flag bit: a conversation (a packed sequence) starts at this position; position ids count from 0 here."""
_UINT16_IDS = 2**16  # a vocabulary of at most 65536 ids fits uint16 (ids 0..65535)
_HASH_CHUNK_BYTES = 16 * 2**20
_AGAIN = "prepare it again (tools/prepare_data.py; tools/prepare_chat.py for conversations)"
_PREPARE_HINT = "run tools/prepare_data.py --input PATH --tokenizer PATH --out DIR to prepare data"


class DataError(ValueError):
    """Bad or missing prepared data; the message names the file and says what to do."""


def shard_dtype(vocab_size: int) -> np.dtype:
    """The on-disk dtype for token ids below ``vocab_size``: little-endian uint16 when they fit, else uint32."""
    if vocab_size < 1:
        raise DataError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= _UINT16_IDS else np.dtype("<u4")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_shards(
    out_dir: str | Path,
    token_arrays: Iterable[np.ndarray],
    *,
    vocab_size: int,
    eos_id: int,
    bos_id: int | None,
    tokenizer: dict[str, Any],
    shard_tokens: int,
    flags: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream documents' token ids into shards of ``shard_tokens`` tokens and write ``index.json`` last.

    Args:
        out_dir: split directory to (over)write; stale ``shard_*.bin``, ``flags_*.bin`` and ``index.json`` there are
            removed first.
        token_arrays: one 1-D integer array per document, EOS already appended by the caller; with ``flags``, one
            ``(tokens, flags)`` pair of equal-length arrays per document (flags: uint8 of ``FLAG_*`` bits), written
            to ``flags_*.bin`` beside the shards.
        vocab_size: number of ids the tokenizer can produce; every id must lie in ``[0, vocab_size)``.
        eos_id, bos_id: the tokenizer's special ids (``bos_id`` may be None), recorded in the index.
        tokenizer: the tokenizer's identity dict (``minima.tokenizer.Tokenizer.identity()``).
        shard_tokens: tokens per shard; every shard but the last holds exactly this many.
        flags: whether documents come with per-token flags.
        extra: more keys for the index (e.g. the chat stage's ``packed_seq_len``, counts of the preparation).

    Returns:
        The index dict, also written atomically (tmp file + rename) to ``out_dir/index.json``.
    """
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not 0 <= eos_id < vocab_size:
        raise DataError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = shard_dtype(vocab_size)
    # Remove the index first: a run that dies half-way leaves no index, so readers refuse the split.
    (out_dir / INDEX_FILE).unlink(missing_ok=True)
    for stale in (*out_dir.glob("shard_*.bin"), *out_dir.glob("flags_*.bin")):
        stale.unlink()

    shards: list[dict[str, Any]] = []
    num_documents = 0
    f = flag_file = None
    digest, flag_digest = hashlib.sha256(), hashlib.sha256()
    in_shard = 0  # tokens written to the open shard

    def close_shard() -> None:
        nonlocal f, flag_file, digest, flag_digest, in_shard
        assert f is not None
        f.close()
        shards[-1].update(num_tokens=in_shard, sha256=digest.hexdigest())
        if flag_file is not None:
            flag_file.close()
            shards[-1]["flags_sha256"] = flag_digest.hexdigest()
        f, flag_file, digest, flag_digest, in_shard = None, None, hashlib.sha256(), hashlib.sha256(), 0

    for doc_index, item in enumerate(token_arrays):
        tokens, doc_flags = (np.asarray(item[0]), np.asarray(item[1], dtype=np.uint8)) if flags else (item, None)
        tokens = np.asarray(tokens)
        if doc_flags is not None and doc_flags.shape != tokens.shape:
            raise DataError(f"document {doc_index}: {doc_flags.shape} flags for {tokens.shape} tokens")
        if tokens.ndim != 1 or not (np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0):
            raise DataError(
                f"document {doc_index}: expected a 1-D integer array of token ids, got dtype {tokens.dtype} "
                f"and shape {tokens.shape}"
            )
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise DataError(
                f"document {doc_index}: token ids span [{int(tokens.min())}, {int(tokens.max())}] but the "
                f"vocabulary is [0, {vocab_size}); was it tokenized with a different tokenizer?"
            )
        tokens = tokens.astype(dtype, copy=False)
        num_documents += 1
        while tokens.size:
            if f is None:
                name = f"shard_{len(shards):05d}.bin"
                shards.append({"file": name})
                f = open(out_dir / name, "wb")  # noqa: SIM115 -- closed by close_shard
                if flags:
                    flag_file = open(out_dir / _flags_file(name), "wb")  # noqa: SIM115 -- closed by close_shard
            piece = tokens[: shard_tokens - in_shard]
            data = piece.tobytes()
            f.write(data)
            digest.update(data)
            if doc_flags is not None:
                flag_data = doc_flags[: piece.size].tobytes()
                flag_file.write(flag_data)
                flag_digest.update(flag_data)
                doc_flags = doc_flags[piece.size :]
            in_shard += piece.size
            tokens = tokens[piece.size :]
            if in_shard == shard_tokens:
                close_shard()
    if f is not None:
        close_shard()

    index = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": int(vocab_size),
        "eos_id": int(eos_id),
        "bos_id": None if bos_id is None else int(bos_id),
        "tokenizer": dict(tokenizer),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_documents": num_documents,
        "flags": bool(flags),
        **(extra or {}),
        "shards": shards,
    }
    tmp = out_dir / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out_dir / INDEX_FILE)
    return index


def _flags_file(shard_file: str) -> str:
    return shard_file.replace("shard_", "flags_", 1)


class TokenShards:
    """An opened split: its index plus read-only memory maps of its shards.

    Attributes:
        path: the split directory.
        dtype: on-disk dtype of the token ids (little-endian uint16 or uint32).
        vocab_size, eos_id, bos_id: the tokenizer's id space and special ids (``bos_id`` may be None).
        tokenizer: the tokenizer identity dict recorded by prepare (kind, source, sha256, vocab_size).
        num_tokens: total tokens over all shards.
        shards: one read-only ``np.memmap`` of shape (num_tokens_in_shard,) per shard, in index order.
        flags: the per-token uint8 flags (``FLAG_*``) of each shard, memory-mapped alike, or None (pre-training).
        packed_seq_len: the window length a flagged split was packed for (None: any ``seq_len``).
        index: the parsed ``index.json``.
    """

    def __init__(
        self, path: Path, index: dict[str, Any], shards: list[np.memmap], flags: list[np.memmap] | None = None
    ) -> None:
        self.path = path
        self.index = index
        self.dtype = shards[0].dtype if shards else np.dtype(index["dtype"]).newbyteorder("<")
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.bos_id: int | None = index["bos_id"]
        self.tokenizer: dict[str, Any] = index["tokenizer"]
        self.num_tokens: int = index["num_tokens"]
        self.shards = shards
        self.flags = flags
        self.packed_seq_len: int | None = index.get("packed_seq_len")

    @classmethod
    def open(
        cls, path: str | Path, *, verify_checksums: bool = False, rank: int = 0, world_size: int = 1
    ) -> TokenShards:
        """Open the split at ``path`` (a directory with ``index.json``) and check it against its index.

        Checks that the index parses and has the expected format, that every shard exists with exactly
        ``num_tokens * itemsize`` bytes and, when ``verify_checksums``, that its sha256 matches (shards are hashed
        when prepared; reading every byte again at each start costs minutes on a 500 GB corpus). Hashing is split
        across ranks: rank ``r`` of ``world_size`` verifies shards ``i`` with ``i % world_size == r``.
        """
        _check_rank(rank, world_size)
        path = Path(path)
        if path.name == INDEX_FILE:
            path = path.parent
        index_file = path / INDEX_FILE
        if not index_file.is_file():
            raise DataError(f"{index_file} not found: {path} is not a prepared split; {_PREPARE_HINT}")
        try:
            index = json.loads(index_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{index_file} is not valid JSON ({e}); {_AGAIN}") from e
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise DataError(f"{index_file} has format {found!r}, expected {FORMAT!r}; {_AGAIN}")
        required = ("dtype", "vocab_size", "eos_id", "bos_id", "tokenizer", "num_tokens", "num_documents", "shards")
        missing = [key for key in required if key not in index]
        if missing:
            raise DataError(f"{index_file} lacks the keys {missing}; {_AGAIN}")
        if index["dtype"] not in ("uint16", "uint32"):
            raise DataError(f"{index_file} has dtype {index['dtype']!r}, expected 'uint16' or 'uint32'")
        dtype = np.dtype(index["dtype"]).newbyteorder("<")
        if sum(s["num_tokens"] for s in index["shards"]) != index["num_tokens"]:
            raise DataError(f"{index_file}: num_tokens does not equal the sum over its shards; prepare it again")

        # Cheap checks (existence, size) on every rank; the expensive hashing only on this rank's share.
        for shard in index["shards"]:
            file = path / shard["file"]
            if not file.is_file():
                raise DataError(f"shard {file} listed in {index_file} is missing; {_AGAIN}")
            expected_bytes = shard["num_tokens"] * dtype.itemsize
            if shard["num_tokens"] < 1 or file.stat().st_size != expected_bytes:
                raise DataError(
                    f"shard {file} has {file.stat().st_size} bytes but {index_file} expects {expected_bytes} "
                    f"({shard['num_tokens']} {index['dtype']} tokens): the shard was modified or truncated after "
                    f"preparation; {_AGAIN}"
                )
            flag_file = path / _flags_file(shard["file"])
            if index.get("flags") and (not flag_file.is_file() or flag_file.stat().st_size != shard["num_tokens"]):
                raise DataError(
                    f"{flag_file} (the labels' flags of {file}, listed in {index_file}) is missing or does not hold"
                    f" {shard['num_tokens']} bytes; re-run tools/prepare_chat.py"
                )
        if verify_checksums:
            mine = [s for i, s in enumerate(index["shards"]) if i % world_size == rank]
            for shard in tqdm(mine, desc=f"verifying {path.name}", unit="shard", disable=rank != 0 or len(mine) < 8):
                file = path / shard["file"]
                pairs = [(file, shard["sha256"])]
                if index.get("flags"):
                    pairs.append((path / _flags_file(shard["file"]), shard["flags_sha256"]))
                for checked, expected in pairs:
                    if file_sha256(checked) != expected:
                        raise DataError(
                            f"{checked} does not match the sha256 recorded in {index_file}: it was modified after "
                            "preparation; prepare the data again"
                        )
        shards = [np.memmap(path / s["file"], dtype=dtype, mode="r") for s in index["shards"]]
        flags = None
        if index.get("flags"):
            flags = [np.memmap(path / _flags_file(s["file"]), dtype=np.uint8, mode="r") for s in index["shards"]]
        return cls(path, index, shards, flags)

    def __repr__(self) -> str:
        return f"TokenShards({str(self.path)!r}, num_tokens={self.num_tokens}, shards={len(self.shards)})"


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
