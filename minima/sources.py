"""Where documents come from: sources (named sets of inputs), their work units, and the texts of one unit.

An input is a file, a directory (its files matching ``pattern``, all when None, sorted by path; names starting with
"." skipped, e.g. ``.git``), a glob (``data/web/*.jsonl.zst``, ``**`` allowed; matches sorted by path), or a dataset
for ``datasets.load_dataset(name, split="train", streaming=True)``: a Hugging Face hub name where the machine can reach
the hub, or ``hf:PATH`` for a local dataset directory read the same way. Any input that is neither an existing path
nor a glob matching files and looks like a hub name (``name`` or ``owner/name``, no data-file suffix) is such a name.

File formats, chosen by suffix (``builder_for``): ``.jsonl``/``.json`` (optionally ``.gz``/``.bz2``/``.xz``/``.zst``
compressed), ``.parquet`` and ``.arrow`` contribute their text field, one document per row; every other file is one
document (read as UTF-8, invalid bytes as U+FFFD, line endings normalised to "\\n"). Everything is read with
``datasets`` in streaming mode, so no input is ever held in memory or copied to a cache whole. Empty (and null)
documents are dropped.

Work units, the grain of parallelism and of restarts (``work_units``): each jsonl/json/parquet/arrow file is one
unit; consecutive plain-text files are grouped into units of at most ``unit_bytes`` of input (a larger file is a unit
of its own; by default 1/64 of the corpus's text bytes, between 1 and 64 MiB); a dataset contributes one unit per
shard of its ``IterableDataset`` (``num_shards``, read with ``ds.shard(num_shards, index)``). Units are a function of
the inputs (paths, sizes) and ``unit_bytes`` only, never of the number of workers, which is what makes the output
independent of it.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from minima.shards import DataError

UNIT_BYTES = 64 * 2**20
"""Most input bytes per work unit of plain-text files by default (64 MiB: ~16M tokens, seconds per worker)."""
MIN_UNITS = 64
"""A smaller corpus of plain-text files is cut into about this many units (of at least 1 MiB) by default."""
BATCH_DOCUMENTS = 256  # documents per batch read and per tokenizer call: bounds the Python lists held at once
DATASET_PREFIX = "hf:"
RESERVED_NAMES = ("train", "valid", "tokenizer")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_JSON_SUFFIXES = (".json", ".jsonl")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
# Suffixes of data files: an input ending in one is a missing file, never a hub dataset name.
_FILE_SUFFIXES = (*_JSON_SUFFIXES, *_COMPRESSION_SUFFIXES, ".parquet", ".arrow", ".txt", ".md", ".py")


@dataclass(frozen=True)
class Source:
    """One corpus, prepared into ``OUT/NAME/{train,valid}`` (``OUT/{train,valid}`` when ``name`` is None)."""

    name: str | None
    """A simple identifier (letters, digits, "_", "-"), not "train", "valid" or "tokenizer"; None: the plain layout."""
    inputs: tuple[str, ...]
    """Files, directories, globs or dataset names (see the module docstring), read in this order."""
    text_field: str = "text"
    """The column holding the documents in jsonl/parquet/arrow files and datasets."""

    def __post_init__(self) -> None:
        if self.name is not None and (not _NAME.fullmatch(self.name) or self.name in RESERVED_NAMES):
            raise DataError(
                f"source name {self.name!r} must be letters, digits, '_' or '-' and not one of {list(RESERVED_NAMES)}"
            )
        if not self.inputs:
            where = f" for source {self.name!r}" if self.name else ""
            raise DataError(f"no inputs given{where}; pass one or more --input PATH (or --source NAME=PATH)")


def builder_for(file: Path) -> str:
    """The ``datasets`` builder that reads ``file``: "json", "parquet", "arrow" or "text" (one document per file)."""
    suffixes = [s.lower() for s in file.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in _JSON_SUFFIXES:
        return "json"
    if suffixes and suffixes[-1] in (".parquet", ".arrow"):
        return suffixes[-1][1:]
    return "text"


def _resolve(item: str | Path, pattern: str | None) -> list[Path] | str:
    """The files of one input, sorted, or the dataset name it stands for."""
    text = str(item)
    if text.startswith(DATASET_PREFIX):
        return text[len(DATASET_PREFIX) :]
    path = Path(text)
    if path.is_file():
        return [path.absolute()]
    if path.is_dir():
        found = path.glob(pattern) if pattern else path.rglob("*")
        files = sorted(
            f for f in found if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"input directory {path} has no files matching {pattern or '*'!r}; check --pattern")
        return [f.absolute() for f in files]
    if glob.has_magic(text):
        files = sorted(Path(p).absolute() for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"input glob {text!r} matches no files")
        return files
    if _HUB_NAME.fullmatch(text) and path.suffix.lower() not in _FILE_SUFFIXES:
        return text
    raise DataError(f"input {text} does not exist; pass existing files, directories or globs (or hf:DATASET)")


def open_dataset(name: str) -> datasets.IterableDataset:
    """``load_dataset(name, split="train", streaming=True)``, its failure a DataError naming the input."""
    try:
        return datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:
        raise DataError(
            f"input {name} is neither an existing file, directory nor glob, and datasets could not open it as a "
            f"dataset ({type(e).__name__}: {e})"
        ) from e


def work_units(source: Source, *, pattern: str | None = None, unit_bytes: int | None = None) -> list[dict[str, Any]]:
    """The work units of ``source`` in order, as JSON-able specs (see the module docstring).

    A file unit is ``{"builder": ..., "files": [[path, size], ...]}``, a dataset unit
    ``{"dataset": name, "num_shards": n, "shard": i}``; a rerun compares them to decide what it can keep.
    ``unit_bytes=None`` derives it from the inputs: their plain-text bytes / ``MIN_UNITS``, between 1 MiB and
    ``UNIT_BYTES``, so that a small corpus still spreads over the workers.
    """
    items = [_resolve(item, pattern) for item in source.inputs]
    if unit_bytes is None:
        text_bytes = sum(
            f.stat().st_size for i in items if not isinstance(i, str) for f in i if builder_for(f) == "text"
        )
        unit_bytes = min(max(text_bytes // MIN_UNITS, 2**20), UNIT_BYTES)
    if unit_bytes < 1:
        raise DataError(f"unit_bytes must be >= 1, got {unit_bytes}")
    units: list[dict[str, Any]] = []
    texts: list[list[Any]] = []  # the plain-text files of the unit being grouped

    def close_text_unit() -> None:
        if texts:
            units.append({"builder": "text", "files": list(texts)})
            texts.clear()

    for resolved in items:
        if isinstance(resolved, str):
            close_text_unit()
            n = open_dataset(resolved).num_shards
            units += [{"dataset": resolved, "num_shards": n, "shard": i} for i in range(n)]
            continue
        for file in resolved:
            builder, size = builder_for(file), file.stat().st_size
            if builder != "text":
                close_text_unit()
                units.append({"builder": builder, "files": [[str(file), size]]})
            else:
                if texts and sum(s for _, s in texts) + size > unit_bytes:
                    close_text_unit()
                texts.append([str(file), size])
    close_text_unit()
    return units


def _check_text_file(file: Path) -> None:
    with open(file, "rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        raise DataError(
            f"{file} looks binary (NUL bytes), yet its extension makes it a text document; select text files with "
            "--pattern (e.g. '**/*.py') or remove it from the inputs"
        )


def unit_texts(spec: dict[str, Any], text_field: str) -> Iterator[list[str]]:
    """The non-empty documents of one work unit, in order, in batches of at most ``BATCH_DOCUMENTS``.

    Raises DataError naming the file (or dataset) for a missing or non-text field, a binary file given as text, or a
    file that cannot be read (malformed, truncated).
    """
    if "dataset" in spec:
        where = f"dataset {spec['dataset']} (shard {spec['shard']} of {spec['num_shards']})"
    else:
        files = [Path(f) for f, _ in spec["files"]]
        where = str(files[0]) if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more text files)"
    try:
        for batch in _open_unit(spec, text_field).iter(batch_size=BATCH_DOCUMENTS):
            field = "text" if spec.get("builder") == "text" else text_field
            if field not in batch:
                raise DataError(
                    f"{where} has no field {field!r} (its fields: {list(batch)}); pass --text-field with the field "
                    "holding the documents"
                )
            bad = next((t for t in batch[field] if t is not None and not isinstance(t, str)), None)
            if bad is not None:
                raise DataError(
                    f"{where}: field {field!r} holds {type(bad).__name__} values, not text; pass --text-field with a "
                    "text field"
                )
            texts = [t for t in batch[field] if t]
            if texts:
                yield texts
    except DataError:
        raise
    except Exception as e:  # a malformed or truncated file: name it
        raise DataError(f"{where} could not be read ({type(e).__name__}: {e})") from e


def _open_unit(spec: dict[str, Any], text_field: str) -> datasets.IterableDataset:
    if "dataset" in spec:
        return open_dataset(spec["dataset"]).shard(num_shards=spec["num_shards"], index=spec["shard"])
    files = [str(f) for f, _ in spec["files"]]
    # load_dataset pings the hub to count downloads of its packaged builders, local files or not: download statistics
    # only, yet up to 3 s per unit where the hub cannot be reached (a DNS or connect timeout). Off for this process.
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    if spec["builder"] == "text":
        for f in files:
            _check_text_file(Path(f))
        return datasets.load_dataset(
            "text", data_files=files, split="train", streaming=True, sample_by="document", encoding_errors="replace"
        )
    if spec["builder"] == "parquet":
        columns = pq.read_schema(files[0]).names  # the footer only: a missing column names its file before reading
        if text_field not in columns:
            raise DataError(
                f"{files[0]} has no column {text_field!r} (its columns: {columns}); pass --text-field with the "
                "column holding the documents"
            )
        return datasets.load_dataset("parquet", data_files=files, split="train", streaming=True, columns=[text_field])
    return datasets.load_dataset(spec["builder"], data_files=files, split="train", streaming=True)
