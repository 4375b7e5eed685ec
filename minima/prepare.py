"""Turn raw corpora into token shards: read with ``datasets``, tokenise, split train/valid, write shards.

Output layout of ``prepare_data(inputs, tokenizer, out)``::

    out/tokenizer/   Hugging Face tokenizer files (AutoTokenizer.from_pretrained works)
    out/train/       index.json + shard_00000.bin, ...
    out/valid/       index.json + shard_00000.bin, ...   (held-out documents, disjoint from train)

Inputs are local files or directories of them. ``.jsonl``/``.json`` (optionally ``.gz``/``.bz2``/``.xz``/``.zst``
compressed) and ``.parquet`` files contribute their ``text_field`` column, one document per row; every other file is
one document (read as UTF-8, invalid bytes as U+FFFD, line endings normalised to "\\n"). Empty documents are dropped;
of the rest, document ``i`` (in input order, directories' files sorted by path) goes to the valid split when
``np.random.default_rng(seed).random(n)[i] < valid_fraction``, so the split is a seeded function of the index; with
two or more documents both splits get at least one.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from minima.shards import DataError, write_shards
from minima.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece_from_texts

_JSON_SUFFIXES = (".json", ".jsonl")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
_BATCH_DOCUMENTS = 1000  # documents per arrow batch when reading tokenised documents back
_TOKENIZE_BATCH_DOCUMENTS = 100  # documents per tokenizer call: bounds the Python lists of ids held at once


def builder_for(file: Path) -> str:
    """The ``datasets`` builder that reads ``file``: "json", "parquet" or "text" (one document per file)."""
    suffixes = [s.lower() for s in file.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in _JSON_SUFFIXES:
        return "json"
    if suffixes and suffixes[-1] == ".parquet":
        return "parquet"
    return "text"


def _input_files(path: Path, pattern: str | None) -> list[Path]:
    """``path`` itself, or the files under directory ``path`` matching ``pattern`` (all when None), sorted.

    Files and folders whose name starts with "." (e.g. ``.git``) are skipped in directories.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"input {path} does not exist; pass existing files or directories with --input")
    found = path.glob(pattern) if pattern else path.rglob("*")
    files = sorted(
        f for f in found if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"input directory {path} has no files matching {pattern or '*'!r}; check --pattern")
    return files


def _check_text_file(file: Path) -> None:
    with open(file, "rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        raise DataError(
            f"{file} looks binary (NUL bytes), yet its extension makes it a text document; select text files with "
            "--pattern (e.g. '**/*.py') or remove it from the inputs"
        )


def _load_group(builder: str, files: list[Path], text_field: str) -> datasets.Dataset:
    """Load files that share a builder into a Dataset with the one string column "text"."""
    if builder == "text":
        for f in files:
            _check_text_file(f)
        ds = datasets.load_dataset(
            "text", data_files=[str(f) for f in files], split="train", sample_by="document", encoding_errors="replace"
        )
        column = "text"
    elif builder == "parquet":
        for f in files:  # read the schemas (cheap) so that a missing column names its file
            columns = pq.read_schema(f).names
            if text_field not in columns:
                raise DataError(
                    f"{f} has no column {text_field!r} (its columns: {columns}); pass --text-field with the column "
                    "holding the documents"
                )
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", columns=[text_field])
        column = text_field
    else:
        # One call per json file: files may carry different extra fields, and a missing field names its file.
        if len(files) > 1:
            return datasets.concatenate_datasets([_load_group(builder, [f], text_field) for f in files])
        ds = datasets.load_dataset("json", data_files=[str(files[0])], split="train")
        if text_field not in ds.column_names:
            raise DataError(
                f"{files[0]} has no field {text_field!r} (its fields: {ds.column_names}); pass --text-field with "
                "the field holding the documents"
            )
        column = text_field
    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        where = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more {builder} files)"
        raise DataError(f"{where}: field {column!r} holds {feature}, not text; pass --text-field with a text field")
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    if feature.dtype != "string":
        ds = ds.cast_column("text", datasets.Value("string"))
    return ds


def load_documents(
    inputs: Sequence[str | Path], *, text_field: str = "text", pattern: str | None = None
) -> tuple[datasets.Dataset, int]:
    """All documents of ``inputs`` in order as a Dataset with one column "text", empty ones dropped.

    Returns the dataset, and the number of files read.
    """
    if not inputs:
        raise DataError("no inputs given; pass one or more --input PATH")
    files = [f for item in inputs for f in _input_files(Path(item), pattern)]
    builders = [builder_for(f) for f in files]
    # Each run of consecutive text (or parquet) files is read by one load_dataset call.
    parts, start = [], 0
    for end in range(1, len(files) + 1):
        if end == len(files) or builders[end] != builders[start]:
            parts.append(_load_group(builders[start], files[start:end], text_field))
            start = end
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    ds = ds.filter(_is_not_empty, batched=True, desc="dropping empty documents")
    return ds, len(files)


def _is_not_empty(batch: dict[str, list]) -> list[bool]:
    return [bool(text) for text in batch["text"]]


def check_split_options(*, num_proc: int, shard_tokens: int, valid_fraction: float) -> None:
    """The options every preparation shares (pre-training documents and conversations), checked before any work."""
    if num_proc < 1:
        raise DataError(f"num_proc must be >= 1, got {num_proc}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")


def split_documents(num_documents: int, valid_fraction: float, seed: int) -> np.ndarray:
    """(num_documents,) bool, True for documents held out for validation.

    Document ``i`` is held out when ``default_rng(seed).random(num_documents)[i] < valid_fraction`` (a function of
    seed and ``i`` only). With two or more documents, the lowest draw is held out if none was, and the highest
    draw kept for training if all were.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    draws = np.random.default_rng(seed).random(num_documents)
    is_valid = draws < valid_fraction
    if num_documents >= 2:
        if not is_valid.any():
            is_valid[np.argmin(draws)] = True
        if is_valid.all():
            is_valid[np.argmax(draws)] = False
    return is_valid


def _tokenize_batch(batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
    return {"input_ids": tokenizer.encode_batch(batch["text"])}


def _documents(tokenized: datasets.Dataset, keep: np.ndarray, eos_id: int, desc: str) -> Iterator[np.ndarray]:
    """Token arrays (EOS appended) of the documents ``i`` with ``keep[i]``, in order."""
    with tqdm(total=int(keep.sum()), desc=desc, unit="doc") as progress:
        first = 0
        for table in tokenized.with_format("arrow").iter(batch_size=_BATCH_DOCUMENTS):
            column = table.column("input_ids").combine_chunks()
            lengths = column.value_lengths().to_numpy(zero_copy_only=False)
            ends = np.cumsum(lengths)
            # One array per batch with EOS inserted after each document; documents are views into it.
            flat = np.insert(column.flatten().to_numpy(zero_copy_only=False), ends, eos_id)
            for j in np.flatnonzero(keep[first : first + len(lengths)]).tolist():
                start = int(ends[j] - lengths[j]) + j
                yield flat[start : start + int(lengths[j]) + 1]
                progress.update()
            first += len(lengths)


def prepare_data(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    valid_fraction: float = 0.01,
    shard_tokens: int = 2**27,
    seed: int = 0,
    num_proc: int = 1,
    pattern: str | None = None,
) -> dict[str, Any]:
    """Tokenise ``inputs`` and write ``out_dir/{train,valid,tokenizer}``; rerunning overwrites them.

    Args:
        inputs: files or directories (see the module docstring for formats).
        tokenizer: a Hugging Face tokenizer directory or a sentencepiece ``.model`` file; copied to
            ``out_dir/tokenizer`` in Hugging Face format (kept as is when it already is ``out_dir/tokenizer``).
        out_dir: output directory.
        text_field: the column holding the documents in json/parquet inputs.
        valid_fraction: probability that a document is held out for validation, in [0, 1).
        shard_tokens: tokens per shard file (2**27 uint16 tokens = 256 MiB).
        seed: seeds the train/valid assignment.
        num_proc: processes for tokenisation (``Dataset.map(num_proc=...)``).
        pattern: glob selecting files inside input directories (e.g. ``"**/*.py"``); all files when None.

    Returns:
        A summary: counts of documents and tokens per split, the output paths, the tokenizer and the time taken.
    """
    started = time.perf_counter()
    check_split_options(num_proc=num_proc, shard_tokens=shard_tokens, valid_fraction=valid_fraction)
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer)  # vocabularies over 65536 ids (Llama-3, Qwen) are written as uint32 shards

    documents, num_files = load_documents(inputs, text_field=text_field, pattern=pattern)
    if len(documents) == 0:
        raise DataError(f"the inputs {[str(i) for i in inputs]} hold no non-empty documents")
    is_valid = split_documents(len(documents), valid_fraction, seed)
    tokenized = documents.map(
        _tokenize_batch,
        batched=True,
        batch_size=_TOKENIZE_BATCH_DOCUMENTS,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer": tok},
        remove_columns=["text"],
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("uint32"))}),
        desc="tokenizing",
    )

    splits = {}
    for name, keep in (("train", ~is_valid), ("valid", is_valid)):
        index = write_shards(
            out_dir / name,
            _documents(tokenized, keep, tok.eos_id, desc=f"writing {name}"),
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            bos_id=tok.bos_id,
            tokenizer=tok.identity(),
            shard_tokens=shard_tokens,
        )
        splits[name] = {
            "path": str(out_dir / name),
            "documents": index["num_documents"],
            "tokens": index["num_tokens"],
            "shards": len(index["shards"]),
        }

    tokenizer_dir = out_dir / "tokenizer"
    source = Path(tokenizer).resolve()
    if tokenizer_dir.resolve() in (source, *source.parents):
        if tok.kind == "sentencepiece":  # e.g. out/tokenizer/tokenizer.model: add the HF files beside it
            tok.save_pretrained(tokenizer_dir)
    else:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)  # no stale files of a previous tokenizer
        tok.save_pretrained(tokenizer_dir)
    return {
        "out_dir": str(out_dir),
        "tokenizer": {**tok.identity(), "path": str(tokenizer_dir)},
        "files": num_files,
        **splits,
        "seconds": round(time.perf_counter() - started, 2),
    }


def train_tokenizer(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    vocab_size: int,
    text_field: str = "text",
    valid_fraction: float = 0.01,
    seed: int = 0,
    pattern: str | None = None,
) -> Path:
    """Train a sentencepiece tokenizer on the training documents of ``inputs`` into ``out_dir``.

    Uses the same documents and train/valid split as ``prepare_data`` with the same arguments, so the held-out
    documents never reach the tokenizer. Returns ``out_dir`` (a Hugging Face tokenizer directory).
    """
    documents, _ = load_documents(inputs, text_field=text_field, pattern=pattern)
    if len(documents) == 0:
        raise DataError(f"the inputs {[str(i) for i in inputs]} hold no non-empty documents")
    is_valid = split_documents(len(documents), valid_fraction, seed)

    def train_texts() -> Iterator[str]:
        first = 0
        for batch in documents.iter(batch_size=_BATCH_DOCUMENTS):
            for j, text in enumerate(batch["text"]):
                if not is_valid[first + j]:
                    yield text
            first += len(batch["text"])

    return train_sentencepiece_from_texts(train_texts(), out_dir, vocab_size=vocab_size, seed=seed)
