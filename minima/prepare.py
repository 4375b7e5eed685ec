"""Turn corpora into token shards: several sources, tokenised in parallel, deterministic and restart-safe.

Output layout of ``prepare_data(inputs, tokenizer, out)``::

    out/tokenizer/   Hugging Face tokenizer files (AutoTokenizer.from_pretrained works), shared by every source
    out/train/       index.json + shard_UUUUU_NNNNN.bin, docs_UUUUU_NNNNN.bin (U: work unit, N: shard within it)
    out/valid/       the same for the held-out documents, disjoint from train
    out/.prepare/    run.json (the options) and unit_UUUUU.json (one manifest per completed work unit)

With a named source (``prepare_data(..., source="web")``, or several ``Source`` in one ``prepare_sources`` call) the
splits go to ``out/web/{train,valid,.prepare}`` beside the shared ``out/tokenizer``; a source prepared into an
``out`` whose other sources used another tokenizer is refused before any work. Inputs, formats and work units:
``minima.sources``; how units are written, kept and redone: ``minima.prepare_units``. Each split's ``index.json``
(``minima.shards``: tokenizer identity and vocab size, document and token counts, per-shard sizes and checksums) is
written last, from the unit manifests in unit order, with the source name, seed, valid_fraction, ``num_units`` and
``num_bytes`` (the split's bytes on disk).

Documents become ``[BOS] + ids + [EOS]`` when the tokenizer's family adds BOS (``Tokenizer.adds_bos``, recorded as
``bos_per_document``), else ``ids + [EOS]``. Document ``k`` (counting non-empty documents) of work unit ``u`` is held
out when ``document_draws(seed, u, k) < valid_fraction`` (a splitmix64 hash of the three mapped to [0, 1)): a
function of where the document sits, never of which worker read it or when. Small inputs: when a source has 2+
documents, valid_fraction > 0 and none was drawn for validation, the document with the lowest draw is held out; when
every document was drawn, the one with the highest draw trains (so a lone document trains). Once every unit is done,
the unit holding it is rewritten with that override (recorded in its manifest, so a rerun knows).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import numpy as np

from minima.prepare_units import (
    SPLITS,
    STATE_DIR,
    Target,
    UnitJob,
    document_draws,
    locked,
    overrides,
    plan_source,
    read_json,
    run_units,
)
from minima.shards import DOC_DTYPE, INDEX_FILE, DataError, companion, shard_dtype, write_index
from minima.sources import RESERVED_NAMES, Source, unit_texts, work_units
from minima.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece_from_texts

RUN_FORMAT = "minima-prepare-run/1"


def check_split_options(*, num_proc: int, shard_tokens: int, valid_fraction: float) -> None:
    """The options every preparation shares (pre-training documents and conversations), checked before any work."""
    if num_proc < 1:
        raise DataError(f"num_proc must be >= 1, got {num_proc}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")


def split_documents(num_documents: int, valid_fraction: float, seed: int) -> np.ndarray:
    """(num_documents,) bool, True for documents held out for validation (the chat stage's split).

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


def _remove_unlisted(split_dir: Path, entries: list[dict[str, Any]]) -> None:
    listed = {name for e in entries for name in (e["file"], companion(e["file"], "docs"))}
    for kind in ("shard", "docs", "flags"):
        for file in split_dir.glob(f"{kind}_*.bin"):
            if file.name not in listed:
                file.unlink()


def _check_tokenizer(out_dir: Path, tok: Tokenizer, targets: set[str | None]) -> bool:
    """Refuse ``tok`` when other sources in ``out_dir`` use another tokenizer; True when there are other sources."""
    others = {name: sha for name, sha in prepared_sources(out_dir).items() if name not in targets}
    if not others:
        return False
    tokenizer_dir = out_dir / "tokenizer"
    known = set(others.values())
    with suppress(FileNotFoundError, ValueError):
        known.add(load_tokenizer(tokenizer_dir).sha256)
    if tok.sha256 not in known:
        names, theirs = ", ".join(name or "train/ and valid/" for name in others), next(iter(others.values()))
        raise DataError(
            f"{out_dir} already holds {names} tokenized with {tokenizer_dir} (sha256 {theirs[:16]}...), but "
            f"{tok.source} is a different tokenizer (sha256 {tok.sha256[:16]}...): all sources of one directory "
            f"share its tokenizer; pass --tokenizer {tokenizer_dir}, or prepare into another --out"
        )
    return True


def prepared_sources(out_dir: str | Path) -> dict[str | None, str | None]:
    """The sources prepared (or being prepared) in ``out_dir``, name (None: ``out/train``) -> tokenizer sha256."""
    out_dir, found = Path(out_dir), {}
    roots = [(None, out_dir)]
    if out_dir.is_dir():
        subdirs = sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        roots += [(p.name, p) for p in subdirs if p.name not in RESERVED_NAMES]
    for name, root in roots:
        for record in (root / STATE_DIR / "run.json", root / "train" / INDEX_FILE):
            data = read_json(record)
            if data is not None and isinstance(data.get("tokenizer"), dict):
                found[name] = data["tokenizer"].get("sha256")
                break
    return found


def _install_tokenizer(out_dir: Path, tok: Tokenizer, keep_existing: bool) -> Path:
    """Write ``out_dir/tokenizer`` (kept when it is the tokenizer's own directory, or other sources share it)."""
    tokenizer_dir = out_dir / "tokenizer"
    source = Path(tok.source).resolve()
    if tokenizer_dir.resolve() in (source, *source.parents):
        if tok.kind == "sentencepiece":  # e.g. out/tokenizer/tokenizer.model: add the HF files beside it
            tok.save_pretrained(tokenizer_dir)
    elif not (keep_existing and tokenizer_dir.is_dir()):
        shutil.rmtree(tokenizer_dir, ignore_errors=True)  # no stale files of a previous tokenizer
        tok.save_pretrained(tokenizer_dir)
    return tokenizer_dir


def prepare_sources(
    sources: Sequence[Source],
    tokenizer: str | Path,
    out_dir: str | Path,
    *,
    valid_fraction: float = 0.01,
    shard_tokens: int = 2**27,
    seed: int = 0,
    workers: int = 1,
    pattern: str | None = None,
    unit_bytes: int | None = None,
) -> dict[str, Any]:
    """Tokenise ``sources`` into ``out_dir`` (layout, split and restarts: the module docstring).

    Args:
        sources: the corpora; names unique, at most one unnamed (``out/train``, ``out/valid``).
        tokenizer: a Hugging Face tokenizer directory or a sentencepiece ``.model`` file; copied to
            ``out_dir/tokenizer`` in Hugging Face format (kept as is when it already is ``out_dir/tokenizer``).
        out_dir: output directory.
        valid_fraction: probability that a document is held out for validation, in [0, 1).
        shard_tokens: at most this many tokens per shard file (2**27 uint16 tokens = 256 MiB).
        seed: seeds the train/valid assignment.
        workers: tokenising processes (1: in this process); the output does not depend on it.
        pattern: glob selecting files inside input directories (e.g. ``"**/*.py"``); all files when None.
        unit_bytes: input bytes per work unit of plain-text files (None: derived from the inputs, see
            ``minima.sources.work_units``).

    Returns:
        A summary: per source the files, units and counts of documents, tokens, shards and bytes per split; the
        tokenizer; seconds, tokens per second, and tokens per busy worker-second (``tokens_per_worker_second``: a
        worker's throughput with this tokenizer, over the units written by this run).
    """
    started = time.perf_counter()
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    check_split_options(num_proc=workers, shard_tokens=shard_tokens, valid_fraction=valid_fraction)
    names = [s.name for s in sources]
    if not sources or len(set(names)) != len(names):
        raise DataError(f"need one or more sources with distinct names, got {names}")
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer)  # vocabularies over 65536 ids (Llama-3, Qwen) are written as uint32 shards
    others = _check_tokenizer(out_dir, tok, set(names))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = _install_tokenizer(out_dir, tok, keep_existing=others)
    adds_bos = tok.adds_bos
    with ExitStack() as stack:
        targets = []
        for source in sources:
            root = out_dir / source.name if source.name else out_dir
            for sub in (STATE_DIR, *SPLITS):
                (root / sub).mkdir(parents=True, exist_ok=True)
            stack.enter_context(locked(root))
            options = {
                "format": RUN_FORMAT,
                "tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "adds_bos": adds_bos},
                "dtype": shard_dtype(tok.vocab_size).name,
                "text_field": source.text_field,
                "seed": seed,
                "valid_fraction": valid_fraction,
                "shard_tokens": shard_tokens,
            }
            targets.append(plan_source(source, root, options, pattern, unit_bytes))

        def run(jobs: list[UnitJob]) -> None:
            for job in jobs:  # readers refuse a split without an index while its units change
                for split in SPLITS:
                    (job.root / split / INDEX_FILE).unlink(missing_ok=True)
            for job, manifest in run_units(jobs, tok, workers):
                target = next(t for t in targets if t.root == job.root)
                target.manifests[job.unit] = manifest
                target.done.append(job.unit)

        def unit_job(target: Target, unit: int, force: dict[str, Any] | None = None) -> UnitJob:
            text_field = target.source.text_field
            spec = target.units[unit]
            return UnitJob(unit, spec, target.root, text_field, seed, valid_fraction, shard_tokens, adds_bos, force)

        run([unit_job(t, u) for t in targets for u in range(len(t.units)) if u not in t.manifests])
        # Small inputs: then (re)write the one unit per source whose override differs from what it carries.
        wanted = [(t, u, force) for t in targets for u, force in overrides(t, valid_fraction).items()]
        run([unit_job(t, u, force) for t, u, force in wanted if t.manifests[u]["force"] != force])
        summaries = [_write_indexes(t, tok, adds_bos, seed, valid_fraction) for t in targets]

    done = [t.manifests[u] for t in targets for u in dict.fromkeys(t.done)]
    tokens_done = sum(m["tokens"]["train"] + m["tokens"]["valid"] for m in done)
    busy = sum(m["seconds"] for m in done)
    seconds = time.perf_counter() - started
    return {
        "out_dir": str(out_dir),
        "tokenizer": {**tok.identity(), "adds_bos": adds_bos, "path": str(tokenizer_dir)},
        "sources": summaries,
        "workers": workers,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens_done / seconds, 1),
        "tokens_per_worker_second": round(tokens_done / busy, 1) if busy else None,
    }


def _write_indexes(target: Target, tok: Tokenizer, adds_bos: bool, seed: int, valid_fraction: float) -> dict:
    """Each split's ``index.json`` from the unit manifests in unit order; the source's summary."""
    manifests = [target.manifests[u] for u in range(len(target.units))]
    if not any(m["documents"]["train"] for m in manifests):
        named = f" of source {target.source.name!r}" if target.source.name else ""
        raise DataError(f"the inputs{named} {list(target.source.inputs)} hold no non-empty documents")
    itemsize = shard_dtype(tok.vocab_size).itemsize
    summary: dict[str, Any] = {
        "name": target.source.name,
        "files": len({f for spec in target.units for f, _ in spec.get("files", [])}),
        "units": len(target.units),
        "units_written": len(set(target.done)),
    }
    for split in SPLITS:
        entries = [e for m in manifests for e in m["entries"][split]]
        _remove_unlisted(target.root / split, entries)
        num_bytes = sum(e["num_tokens"] * itemsize + e["num_doc_starts"] * DOC_DTYPE.itemsize for e in entries)
        index = write_index(
            target.root / split,
            entries,
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            bos_id=tok.bos_id,
            tokenizer=tok.identity(),
            num_documents=sum(m["documents"][split] for m in manifests),
            bos_per_document=adds_bos,
            extra={
                "source": target.source.name,
                "seed": seed,
                "valid_fraction": valid_fraction,
                "num_units": len(manifests),
                "num_bytes": num_bytes,
            },
        )
        summary[split] = {
            "path": str(target.root / split),
            "documents": index["num_documents"],
            "tokens": index["num_tokens"],
            "shards": len(entries),
            "bytes": num_bytes,
        }
    return summary


def prepare_data(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    out_dir: str | Path,
    *,
    source: str | None = None,
    text_field: str = "text",
    valid_fraction: float = 0.01,
    shard_tokens: int = 2**27,
    seed: int = 0,
    workers: int = 1,
    pattern: str | None = None,
    unit_bytes: int | None = None,
) -> dict[str, Any]:
    """Tokenise one source, ``inputs``, into ``out_dir/{train,valid}`` (``out_dir/SOURCE/...`` when named).

    ``prepare_sources`` with ``Source(source, inputs, text_field)``; its summary with the source's own entries
    (``files``, ``units``, ``train``, ``valid``) also at the top level.
    """
    one = Source(source, tuple(str(i) for i in inputs), text_field)
    summary = prepare_sources([one], tokenizer, out_dir, valid_fraction=valid_fraction, shard_tokens=shard_tokens,
                              seed=seed, workers=workers, pattern=pattern, unit_bytes=unit_bytes)  # fmt: skip
    return {**summary, **summary["sources"][0]}


def training_texts(
    sources: Sequence[Source], *, valid_fraction: float, seed: int, pattern: str | None, unit_bytes: int | None
) -> Iterator[str]:
    """The training documents of ``sources``, streamed: those ``prepare_sources`` writes to ``train`` with the same
    options (the small-input overrides included: the one candidate document is held back until the end)."""
    for source in sources:
        seen_train = seen_valid = False
        total, held_train, held_valid = 0, None, None  # (draw, text): the candidates for the overrides
        for u, spec in enumerate(work_units(source, pattern=pattern, unit_bytes=unit_bytes)):
            ordinal = 0
            for texts in unit_texts(spec, source.text_field):
                draws = document_draws(seed, u, np.arange(ordinal, ordinal + len(texts))).tolist()
                ordinal, total = ordinal + len(texts), total + len(texts)
                for draw, text in zip(draws, texts, strict=True):
                    if draw < valid_fraction:
                        seen_valid = True
                        if held_train is not None:  # no override to valid now: it trains
                            yield held_train[1]
                            held_train = None
                        if not seen_train and (held_valid is None or draw > held_valid[0]):
                            held_valid = (draw, text)
                    else:
                        seen_train, held_valid = True, None
                        if seen_valid or (held_train is not None and draw >= held_train[0]):
                            yield text
                        else:  # the lowest train draw so far, while none is valid: the candidate to hold out
                            if held_train is not None:
                                yield held_train[1]
                            held_train = (draw, text)
        if held_valid is not None and not seen_train:  # every document drawn valid: the highest trains
            yield held_valid[1]
        if held_train is not None and not (valid_fraction > 0 and total >= 2):  # else it is held out
            yield held_train[1]


def train_tokenizer(
    inputs: Sequence[str | Path | Source],
    out_dir: str | Path,
    *,
    vocab_size: int,
    text_field: str = "text",
    valid_fraction: float = 0.01,
    seed: int = 0,
    pattern: str | None = None,
    unit_bytes: int | None = None,
) -> Path:
    """Train a sentencepiece tokenizer on the training documents of ``inputs`` into ``out_dir``.

    ``inputs``: paths (one source, read with ``text_field``) and/or ``Source`` objects. Uses the documents and the
    train/valid split ``prepare_sources`` uses with the same options, so held-out documents never reach the
    tokenizer. Returns ``out_dir`` (a Hugging Face tokenizer directory).
    """
    sources = [i for i in inputs if isinstance(i, Source)]
    paths = tuple(str(i) for i in inputs if not isinstance(i, Source))
    if paths or not sources:
        sources.append(Source(None, paths, text_field))
    texts = training_texts(sources, valid_fraction=valid_fraction, seed=seed, pattern=pattern, unit_bytes=unit_bytes)
    return train_sentencepiece_from_texts(texts, out_dir, vocab_size=vocab_size, seed=seed)
