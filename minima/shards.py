"""Token shards on disk: the format, the writer and the checked, memory-mapped reader.

A prepared split is a directory holding ``index.json`` and flat little-endian token files ``shard_00000.bin``, ... .
Documents are concatenated (BOS before each one where the tokenizer's family expects it, EOS after each one), so a
shard is one long token stream (a document may continue into the next shard). Beside each shard:

- ``docs_00000.bin``: little-endian uint32 offsets, within the shard, of the first token of every document that
  starts in it (ascending). Readers use them for document-aware windows (BOS at a window's start, positions and
  attention restarted at each document).
- ``flags_00000.bin`` (chat data only): uint8, one byte per token. Bit ``FLAG_LABEL`` marks the positions whose next
  token is a label (the assistant replies), bit ``FLAG_START`` the first token of each packed conversation. Such a
  split is packed for one window length (``index.json``'s ``packed_seq_len``).

Every file is hashed once, when written (``sha256`` in the index). Opening a split checks, on every rank and
cheaply, each file's size and a digest of its first and last 4 KiB (``sample_sha256``): a missing, truncated or
foreign shard (another corpus's shard of the same size) is refused before any model is built. The full hashes are
checked only on request (``verify_checksums``, ``tools/verify_data.py``), as reading a 500 GB corpus on each start
would cost minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

IGNORE_INDEX = -100
"""Label value for positions excluded from every loss term (the default ``ignore_index`` of torch's losses)."""

FORMAT = "minima-token-shards/1"
INDEX_FILE = "index.json"
FLAG_LABEL = 1
"""Flag bit: the token after this position is a label of it (an assistant reply's token or end-of-turn)."""
FLAG_START = 2
"""Flag bit: a conversation (a packed sequence) starts at this position; position ids count from 0 here."""
DOC_DTYPE = np.dtype("<u4")
"""On-disk dtype of the document-start offsets (``docs_*.bin``): offsets within a shard, below 2**32 tokens."""
_UINT16_IDS = 2**16  # a vocabulary of at most 65536 ids fits uint16 (ids 0..65535)
_MAX_SHARD_TOKENS = 2**32  # document offsets within a shard are uint32
_HASH_CHUNK_BYTES = 16 * 2**20
_SAMPLE_BYTES = 4096  # sample_sha256 covers this many bytes at each end of a file
AGAIN = "prepare it again (tools/prepare_data.py; tools/prepare_chat.py for conversations)"
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


def sample_sha256(path: Path) -> str:
    """sha256 of the file's first and last 4 KiB (all of it when smaller): a cheap identity checked at every open."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_SAMPLE_BYTES)
        if size > 2 * _SAMPLE_BYTES:
            f.seek(size - _SAMPLE_BYTES)
        tail = f.read()
    return hashlib.sha256(size.to_bytes(8, "little") + head + tail).hexdigest()


def companion(shard_file: str, kind: str) -> str:
    """The name of a shard's companion file: ``kind`` "docs" or "flags" (``shard_00003.bin`` -> ``docs_00003.bin``)."""
    return shard_file.replace("shard_", f"{kind}_", 1)


class _HashingFile:
    """A binary file being written, with the sha256 of what was written so far."""

    def __init__(self, path: Path) -> None:
        self.path, self.file, self.digest, self.bytes = path, open(path, "wb"), hashlib.sha256(), 0  # noqa: SIM115

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.bytes += len(data)

    def close(self) -> str:
        self.file.close()
        return self.digest.hexdigest()


class ShardWriter:
    """Writes documents into shards of ``shard_tokens`` tokens (the last may be shorter) in ``out_dir``.

    Shards are named ``{prefix}{n:05d}.bin`` (``prefix`` starts with "shard_"; e.g. "shard_00007_" for the shards of
    one work unit of a parallel preparation), each with its ``docs_`` file (and ``flags_`` file with ``flags``). Each
    file is hashed as it is written. ``close()`` returns the shards' index entries.

    Args:
        out_dir: existing directory to write into.
        vocab_size: every token id must lie in ``[0, vocab_size)``; decides the dtype (``shard_dtype``).
        shard_tokens: tokens per shard, at most 2**32.
        flags: whether documents come with per-token flags (chat data).
        prefix: the shard file names' prefix.
    """

    def __init__(
        self, out_dir: Path, *, vocab_size: int, shard_tokens: int, flags: bool = False, prefix: str = "shard_"
    ) -> None:
        if not 1 <= shard_tokens <= _MAX_SHARD_TOKENS:
            raise DataError(f"shard_tokens must be in [1, 2**32], got {shard_tokens}")
        if not prefix.startswith("shard_"):
            raise DataError(f"shard file prefix must start with 'shard_', got {prefix!r}")
        self.out_dir, self.vocab_size, self.shard_tokens = Path(out_dir), vocab_size, shard_tokens
        self.dtype, self.flags, self.prefix = shard_dtype(vocab_size), flags, prefix
        self.entries: list[dict[str, Any]] = []
        self.num_documents = 0
        self._files: dict[str, _HashingFile] = {}
        self._in_shard = 0  # tokens written to the open shard

    def add(self, tokens: np.ndarray, flags: np.ndarray | None = None) -> None:
        """Append one document (its special tokens included); its first token is recorded as a document start."""
        tokens = np.asarray(tokens)
        doc = self.num_documents
        if tokens.ndim != 1 or not (np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0):
            raise DataError(
                f"document {doc}: expected a 1-D integer array of token ids, got dtype {tokens.dtype} and shape "
                f"{tokens.shape}"
            )
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise DataError(
                f"document {doc}: token ids span [{int(tokens.min())}, {int(tokens.max())}] but the vocabulary is "
                f"[0, {self.vocab_size}); was it tokenized with a different tokenizer?"
            )
        if self.flags:
            flags = np.asarray(flags, dtype=np.uint8)
            if flags.shape != tokens.shape:
                raise DataError(f"document {doc}: {flags.shape} flags for {tokens.shape} tokens")
        self.num_documents += 1
        tokens = tokens.astype(self.dtype, copy=False)
        first = True
        while tokens.size:
            if not self._files:
                self._open()
            if first:
                self._files["docs"].write(np.array([self._in_shard], dtype=DOC_DTYPE).tobytes())
                first = False
            n = min(tokens.size, self.shard_tokens - self._in_shard)
            self._files["shard"].write(tokens[:n].tobytes())
            if self.flags:
                self._files["flags"].write(flags[:n].tobytes())
                flags = flags[n:]
            tokens, self._in_shard = tokens[n:], self._in_shard + n
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _open(self) -> None:
        name = f"{self.prefix}{len(self.entries):05d}.bin"
        self.entries.append({"file": name})
        kinds = ("shard", "docs", "flags") if self.flags else ("shard", "docs")
        self._files = {k: _HashingFile(self.out_dir / (name if k == "shard" else companion(name, k))) for k in kinds}

    def _close_shard(self) -> None:
        entry, files = self.entries[-1], self._files
        entry["num_tokens"] = self._in_shard
        entry["num_doc_starts"] = files["docs"].bytes // DOC_DTYPE.itemsize
        for kind, file in files.items():
            key = "" if kind == "shard" else f"{kind}_"
            entry[f"{key}sha256"] = file.close()
            entry[f"{key}sample_sha256"] = sample_sha256(file.path)
        self._files, self._in_shard = {}, 0

    def close(self) -> list[dict[str, Any]]:
        """Finish the open shard; the index entries of every shard written, in order."""
        if self._files:
            self._close_shard()
        return self.entries


def write_index(
    out_dir: str | Path,
    entries: list[dict[str, Any]],
    *,
    vocab_size: int,
    eos_id: int,
    bos_id: int | None,
    tokenizer: dict[str, Any],
    num_documents: int,
    bos_per_document: bool = False,
    flags: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/index.json`` atomically (tmp file + rename) over the shard ``entries``; returns the index."""
    index = {
        "format": FORMAT,
        "dtype": shard_dtype(vocab_size).name,
        "vocab_size": int(vocab_size),
        "eos_id": int(eos_id),
        "bos_id": None if bos_id is None else int(bos_id),
        "bos_per_document": bool(bos_per_document),
        "tokenizer": dict(tokenizer),
        "num_tokens": sum(s["num_tokens"] for s in entries),
        "num_documents": int(num_documents),
        "doc_starts": True,
        "flags": bool(flags),
        **(extra or {}),
        "shards": entries,
    }
    out_dir = Path(out_dir)
    tmp = out_dir / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out_dir / INDEX_FILE)
    return index


def remove_split(out_dir: Path) -> None:
    """Remove a split's index first (a reader then refuses what is left), then its shard files."""
    (out_dir / INDEX_FILE).unlink(missing_ok=True)
    for kind in ("shard", "docs", "flags"):
        for stale in out_dir.glob(f"{kind}_*.bin"):
            stale.unlink()


def write_shards(
    out_dir: str | Path,
    token_arrays: Iterable[np.ndarray],
    *,
    vocab_size: int,
    eos_id: int,
    bos_id: int | None,
    tokenizer: dict[str, Any],
    shard_tokens: int,
    bos_per_document: bool = False,
    flags: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream documents' token ids into shards of ``shard_tokens`` tokens and write ``index.json`` last.

    Args:
        out_dir: split directory to (over)write; its stale shard files and index are removed first, so a run that
            dies half-way leaves no index and readers refuse the split.
        token_arrays: one 1-D integer array per document, special tokens (BOS, EOS) already in place; with
            ``flags``, one ``(tokens, flags)`` pair of equal-length arrays per document (flags: uint8 of ``FLAG_*``).
        vocab_size: number of ids the tokenizer can produce; every id must lie in ``[0, vocab_size)``.
        eos_id, bos_id: the tokenizer's special ids (``bos_id`` may be None), recorded in the index.
        tokenizer: the tokenizer's identity dict (``minima.tokenizer.Tokenizer.identity()``).
        shard_tokens: tokens per shard; every shard but the last holds exactly this many.
        bos_per_document: whether every document starts with ``bos_id`` (recorded for the readers).
        flags: whether documents come with per-token flags.
        extra: more keys for the index (e.g. the chat stage's ``packed_seq_len``, counts of the preparation).

    Returns:
        The index dict, also written to ``out_dir/index.json``.
    """
    if not 0 <= eos_id < vocab_size:
        raise DataError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, vocab_size=vocab_size, shard_tokens=shard_tokens, flags=flags)
    remove_split(out_dir)
    for item in token_arrays:
        writer.add(*item) if flags else writer.add(item)
    entries = writer.close()
    return write_index(
        out_dir,
        entries,
        vocab_size=vocab_size,
        eos_id=eos_id,
        bos_id=bos_id,
        tokenizer=tokenizer,
        num_documents=writer.num_documents,
        bos_per_document=bos_per_document,
        flags=flags,
        extra=extra,
    )


class TokenShards:
    """An opened split: its index plus read-only memory maps of its shards.

    Attributes:
        path: the split directory.
        dtype: on-disk dtype of the token ids (little-endian uint16 or uint32).
        vocab_size, eos_id, bos_id: the tokenizer's id space and special ids (``bos_id`` may be None).
        bos_per_document: whether every document starts with ``bos_id``.
        tokenizer: the tokenizer identity dict recorded by prepare (kind, source, sha256, vocab_size).
        num_tokens: total tokens over all shards.
        shards: one read-only ``np.memmap`` of shape (num_tokens_in_shard,) per shard, in index order.
        doc_starts: per shard, the memory-mapped uint32 offsets of the documents starting in it, or None (a split
            prepared before document boundaries were recorded).
        flags: the per-token uint8 flags (``FLAG_*``) of each shard, memory-mapped alike, or None (pre-training).
        packed_seq_len: the window length a flagged split was packed for (None: any ``seq_len``).
        index: the parsed ``index.json``.
    """

    def __init__(
        self,
        path: Path,
        index: dict[str, Any],
        shards: list[np.ndarray],
        doc_starts: list[np.ndarray] | None = None,
        flags: list[np.ndarray] | None = None,
    ) -> None:
        self.path = path
        self.index = index
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.bos_id: int | None = index["bos_id"]
        self.bos_per_document: bool = bool(index.get("bos_per_document", False))
        self.tokenizer: dict[str, Any] = index["tokenizer"]
        self.num_tokens: int = index["num_tokens"]
        self.shards = shards
        self.doc_starts = doc_starts
        self.flags = flags
        self.packed_seq_len: int | None = index.get("packed_seq_len")

    @classmethod
    def open(
        cls, path: str | Path, *, verify_checksums: bool = False, rank: int = 0, world_size: int = 1
    ) -> TokenShards:
        """Open the split at ``path`` (a directory with ``index.json``) and check it against its index.

        Checks that the index parses and has the expected format, and that every file exists with its recorded size
        and sample digest. With ``verify_checksums`` the full sha256 of each file is compared too, split across
        ranks: rank ``r`` of ``world_size`` verifies shards ``i`` with ``i % world_size == r``.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        path = Path(path)
        if path.name == INDEX_FILE:
            path = path.parent
        index_file = path / INDEX_FILE
        index = read_index(index_file)
        dtype = np.dtype(index["dtype"]).newbyteorder("<")
        kinds = {"shard": dtype.itemsize}
        if index.get("doc_starts"):
            kinds["docs"] = DOC_DTYPE.itemsize
        if index.get("flags"):
            kinds["flags"] = 1

        mine = [i % world_size == rank for i in range(len(index["shards"]))]
        entries = index["shards"]
        if verify_checksums:
            entries = tqdm(entries, desc=f"verifying {path.name}", unit="shard", disable=rank != 0 or len(entries) < 8)
        for i, entry in enumerate(entries):
            for kind, itemsize in kinds.items():
                _check_file(path, index_file, entry, kind, itemsize, full=verify_checksums and mine[i])
        shards = [np.memmap(path / s["file"], dtype=dtype, mode="r") for s in index["shards"]]
        doc_starts = flags = None
        if "docs" in kinds:  # np.memmap refuses empty files: a shard inside one long document has no starts
            doc_starts = [_map(path / companion(s["file"], "docs"), DOC_DTYPE) for s in index["shards"]]
        if "flags" in kinds:
            flags = [np.memmap(path / companion(s["file"], "flags"), dtype=np.uint8, mode="r") for s in index["shards"]]
        return cls(path, index, shards, doc_starts, flags)

    def __repr__(self) -> str:
        return f"TokenShards({str(self.path)!r}, num_tokens={self.num_tokens}, shards={len(self.shards)})"


def read_index(index_file: Path) -> dict[str, Any]:
    """The parsed and checked ``index.json`` of a split (DataError naming the file otherwise)."""
    if not index_file.is_file():
        raise DataError(f"{index_file} not found: {index_file.parent} is not a prepared split; {_PREPARE_HINT}")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{index_file} is not valid JSON ({e}); {AGAIN}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise DataError(f"{index_file} has format {found!r}, expected {FORMAT!r}; {AGAIN}")
    required = ("dtype", "vocab_size", "eos_id", "bos_id", "tokenizer", "num_tokens", "num_documents", "shards")
    missing = [key for key in required if key not in index]
    if missing:
        raise DataError(f"{index_file} lacks the keys {missing}; {AGAIN}")
    if index["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{index_file} has dtype {index['dtype']!r}, expected 'uint16' or 'uint32'")
    if sum(s["num_tokens"] for s in index["shards"]) != index["num_tokens"]:
        raise DataError(f"{index_file}: num_tokens does not equal the sum over its shards; {AGAIN}")
    return index


def _check_file(path: Path, index_file: Path, entry: dict[str, Any], kind: str, itemsize: int, full: bool) -> None:
    """One file of a shard (``kind`` shard, docs or flags) against its index entry: size, sample digest, sha256."""
    name = entry["file"] if kind == "shard" else companion(entry["file"], kind)
    file, key = path / name, "" if kind == "shard" else f"{kind}_"
    count = entry["num_doc_starts"] if kind == "docs" else entry["num_tokens"]
    if not file.is_file():
        raise DataError(f"{file}, listed in {index_file}, is missing; copy it again or {AGAIN}")
    expected_bytes, size = count * itemsize, file.stat().st_size
    if (kind == "shard" and count < 1) or size != expected_bytes:
        raise DataError(
            f"{file} has {size} bytes but {index_file} expects {expected_bytes} ({count} x {itemsize}-byte values): "
            f"it was modified or truncated after preparation; copy it again or {AGAIN}"
        )
    sample = entry.get(f"{key}sample_sha256")
    if sample is not None and sample_sha256(file) != sample:
        raise DataError(
            f"{file} is not the file {index_file} lists (its first and last bytes differ): a shard of another "
            f"preparation, or modified since; copy the split again as a whole or {AGAIN}"
        )
    if full and file_sha256(file) != entry[f"{key}sha256"]:
        raise DataError(
            f"{file} does not match the sha256 recorded in {index_file}: it was modified after preparation; "
            "prepare the data again"
        )


def _map(file: Path, dtype: np.dtype) -> np.ndarray:
    return np.memmap(file, dtype=dtype, mode="r") if file.stat().st_size else np.zeros(0, dtype=dtype)
