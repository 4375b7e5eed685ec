"""Chat data to token shards: read conversations from JSON lines, render them, pack them into windows, write shards.

Output layout of ``prepare_chat(inputs, tokenizer, out, seq_len=T)``, the layout of ``minima.prepare`` so that
``minima.distill`` trains on it unchanged (``data.seq_len`` must be ``T``)::

    out/tokenizer/   the data's Hugging Face tokenizer WITH the chat template installed (``set_chat_template``), so
                     that a model exported from this data carries it and ``apply_chat_template`` reproduces the
                     training rendering; ``model_max_length`` is set to T
    out/train/       index.json + shard_00000.bin + flags_00000.bin, ...
    out/valid/       the same for the held-out conversations (disjoint from train)

Inputs are ``.jsonl``/``.json`` files (optionally ``.gz``/``.bz2``/``.xz``/``.zst`` compressed; a directory
contributes those under it, sorted by path), one conversation per line in any shape ``conversation_from_record``
reads (``messages``, ShareGPT ``conversations``, MiniMA's ``User``/``Assistant`` turns). Blank lines are skipped; a
line that is not valid JSON or not a well-formed conversation is an error naming ``file:line``, or, with
``skip_bad_lines``, counted and skipped. Each conversation is rendered by ``minima.chat.render`` (shortened to ``T``
tokens by its rule when longer: counted as truncated) into token ids and per-token flags (``minima.data``):
``FLAG_START`` on its first token, ``FLAG_LABEL`` where ``render`` gives a label. Conversation ``i`` of the good ones
(in input order) is held out when ``minima.prepare.split_documents(n, valid_fraction, seed)[i]``.

Packing ("next-fit", in input order): conversations are appended to the current window of ``T`` tokens while they
fit; when the next one does not, the rest of the window is padding (the tokenizer's pad id, else EOS; ``FLAG_START``
on its first token and no other flag, so padding is a sequence of its own and never labelled) and the conversation
starts the next window. No conversation crosses a window boundary (each is at most ``T`` tokens). Without packing,
each conversation has a window of its own, padded.

Shards: the readers cut windows of ``T + 1`` tokens at stride ``T`` that never cross a shard file, i.e.
``(len(shard) - 1) // T`` windows per shard. So each shard is ``m = max(1, shard_tokens // T)`` whole windows of ``T``
tokens followed by ONE padding token (flags 0) (the last shard: the remaining windows and that token): reader window
``w`` is exactly packed window ``w``, and its extra ``(T + 1)``-th token, the next window's first token (or the
padding token), is only ever a target of the window's last position, which never carries ``FLAG_LABEL`` (``render``
never labels a conversation's last position, padding is never labelled), so nothing leaks across windows.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from jinja2 import TemplateError
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from minima.chat import TEMPLATES, ChatFormatError, chat_template, conversation_from_record, render, set_chat_template
from minima.prepare import check_split_options, split_documents
from minima.shards import FLAG_LABEL, FLAG_START, IGNORE_INDEX, DataError, write_shards
from minima.sources import builder_for
from minima.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

_RENDER_BATCH_LINES = 100  # lines per map call: bounds the Python lists held at once
_READ_BATCH_ROWS = 1000  # rendered rows per arrow batch when packing
_REPORTED_BAD_LINES = 5  # bad lines quoted in the summary and the log
_SKIP_HINT = "pass --skip-bad-lines to skip and count such lines"


def chat_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The JSON-lines files of ``inputs``: files as given, directories' ``.jsonl``/``.json`` files (compressed or
    not) sorted by path, names starting with "." skipped."""
    if not inputs:
        raise DataError("no inputs given; pass one or more --input PATH")
    files = []
    for item in map(Path, inputs):
        if item.is_file():
            if builder_for(item) != "json":
                raise DataError(f"input {item} is not a .jsonl/.json file (optionally .gz/.bz2/.xz/.zst)")
            files.append(item)
        elif item.is_dir():
            found = sorted(
                f
                for f in item.rglob("*")
                if f.is_file()
                and builder_for(f) == "json"
                and not any(p.startswith(".") for p in f.relative_to(item).parts)
            )
            if not found:
                raise DataError(f"input directory {item} has no .jsonl/.json files")
            files += found
        else:
            raise DataError(f"input {item} does not exist; pass existing files or directories with --input")
    return files


def _load_lines(files: list[Path]) -> tuple[datasets.Dataset | None, list[int]]:
    """All lines of ``files`` as a Dataset with the one column "text" (blank lines kept, so that row ``r`` of file
    ``f`` is its line ``r + 1``), or None when all are empty; and the first row of each file."""
    parts, starts, rows = [], [], 0
    for file in files:
        starts.append(rows)
        try:
            # The text builder splits only on "\n" (after universal-newline translation) and keeps empty lines.
            part = datasets.load_dataset("text", data_files=[str(file)], split="train")
        except datasets.exceptions.DatasetGenerationError as e:
            if isinstance(e.__cause__, UnicodeDecodeError):
                raise DataError(f"{file} is not UTF-8 text ({e.__cause__})") from e
            if file.stat().st_size == 0 or "at least one example" in str(e.__cause__):
                continue  # an empty file: no rows
            raise
        except ValueError as e:
            if "corresponds to no data" in str(e):  # an empty compressed file
                continue
            raise
        parts.append(part)
        rows += len(part)
    if not parts:
        return None, starts
    return (datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]), starts


def conversation_flags(labels: np.ndarray) -> np.ndarray:
    """(n,) uint8 flags of one rendered conversation: ``FLAG_START`` at its first token, ``FLAG_LABEL`` wherever
    ``labels`` (``render``'s, (n,)) is not ``IGNORE_INDEX``."""
    flags = np.where(np.asarray(labels) != IGNORE_INDEX, FLAG_LABEL, 0).astype(np.uint8)
    flags[0] |= FLAG_START
    return flags


def _render_line(text: str, where: str, tokenizer, template: str, seq_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(tokens, flags, truncated) of the conversation on one line; ChatFormatError, naming ``where``, for a bad line."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if text.strip() in ("[", "{"):
            hint = "; is it one JSON document over many lines? write one conversation per line"
        raise ChatFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno}){hint}") from e
    messages = conversation_from_record(record, where=where)
    try:
        input_ids, labels = render(messages, tokenizer, template)
        truncated = len(input_ids) > seq_len
        if truncated:
            input_ids, labels = render(messages, tokenizer, template, max_tokens=seq_len)
    except ChatFormatError as e:  # this conversation cannot be rendered (cut) with this tokenizer: a bad line
        raise ChatFormatError(f"{where}: {e}") from e
    except (ValueError, TemplateError) as e:  # the template itself fails (e.g. one that refuses system prompts)
        raise DataError(f"{where}: the {template!r} chat template cannot render this conversation: {e}") from e
    return input_ids.numpy().astype(np.uint32), conversation_flags(labels.numpy()), truncated


def _render_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer,
    template: str,
    seq_len: int,
    files: list[str],
    starts: list[int],
    skip_bad_lines: bool,
) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "flags": [], "label_tokens": [], "truncated": [], "error": []}
    for text, row in zip(batch["text"], indices, strict=True):
        ids, flags = np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.uint8)  # a blank or bad line: no tokens
        truncated, error = False, None
        file = int(np.searchsorted(starts, row, side="right")) - 1
        if row == starts[file]:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
        if text.strip():
            where = f"{files[file]}:{row - starts[file] + 1}"
            try:
                ids, flags, truncated = _render_line(text, where, tokenizer, template, seq_len)
            except ChatFormatError as e:
                if not skip_bad_lines:
                    raise DataError(f"{e}; {_SKIP_HINT}") from e
                error = str(e)
        out["input_ids"].append(ids)
        out["flags"].append(flags)
        out["label_tokens"].append(int(np.count_nonzero(flags & FLAG_LABEL)))
        out["truncated"].append(truncated)
        out["error"].append(error)
    return out


def pack_windows(lengths: Sequence[int] | np.ndarray, seq_len: int, pack: bool = True) -> np.ndarray:
    """(n,) int64: the window of each conversation of ``lengths`` (tokens, each at most ``seq_len``), in order.

    Next-fit: a conversation joins the current window if it fits in what is left of its ``seq_len`` tokens, else it
    starts the next window. Without ``pack``, conversation ``i`` gets window ``i``.
    """
    window_of = np.empty(len(lengths), dtype=np.int64)
    window, room = -1, 0
    for i, length in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
        if not 1 <= length <= seq_len:
            raise DataError(f"conversation {i} has {length} tokens; a window holds 1 to {seq_len}")
        if not pack or length > room:
            window, room = window + 1, seq_len
        window_of[i] = window
        room -= length
    return window_of


def _shard_documents(
    rendered: datasets.Dataset,
    keep: np.ndarray,
    window_of: np.ndarray,
    *,
    seq_len: int,
    windows_per_shard: int,
    pad_id: int,
    desc: str,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The documents for ``write_shards``: each packed window as ``(tokens, flags)`` of ``seq_len`` tokens, and a
    1-token padding document (flags 0) after every ``windows_per_shard`` windows and after the last.

    ``keep`` (num_rows,) selects the rows of ``rendered`` in this split; ``window_of`` gives their windows, in order.
    """
    tokens = np.empty(seq_len, dtype=np.uint32)
    flags = np.empty(seq_len, dtype=np.uint8)
    pad = (np.full(1, pad_id, dtype=np.uint32), np.zeros(1, dtype=np.uint8))
    fill, window, windows_done = 0, 0, 0

    def finish() -> tuple[np.ndarray, np.ndarray]:
        tokens[fill:] = pad_id
        flags[fill:] = 0
        if fill < seq_len:
            flags[fill] = FLAG_START  # padding is a sequence of its own: positions restart, nothing attends across
        return tokens.copy(), flags.copy()

    conversation = 0
    with tqdm(total=len(window_of), desc=desc, unit="conv") as progress:
        first = 0
        for table in rendered.select_columns(["input_ids", "flags"]).with_format("arrow").iter(_READ_BATCH_ROWS):
            ids_column = table.column("input_ids").combine_chunks()
            lengths = ids_column.value_lengths().to_numpy(zero_copy_only=False)
            ends = np.cumsum(lengths)
            flat_ids = ids_column.flatten().to_numpy(zero_copy_only=False)
            flat_flags = table.column("flags").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            for j in np.flatnonzero(keep[first : first + len(lengths)]).tolist():
                if window_of[conversation] != window:
                    yield finish()
                    windows_done += 1
                    if windows_done % windows_per_shard == 0:
                        yield pad
                    window, fill = window_of[conversation], 0
                start, length = int(ends[j] - lengths[j]), int(lengths[j])
                tokens[fill : fill + length] = flat_ids[start : start + length]
                flags[fill : fill + length] = flat_flags[start : start + length]
                fill += length
                conversation += 1
                progress.update()
            first += len(lengths)
    assert conversation == len(window_of) > 0, (conversation, len(window_of))
    yield finish()
    yield pad


def prepare_chat(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    out_dir: str | Path,
    *,
    seq_len: int,
    template: str = "minichat",
    valid_fraction: float = 0.02,
    seed: int = 0,
    pack: bool = True,
    skip_bad_lines: bool = False,
    shard_tokens: int = 2**27,
    num_proc: int = 1,
) -> dict[str, Any]:
    """Render the conversations of ``inputs`` and write ``out_dir/{train,valid,tokenizer}``; rerunning overwrites them.

    Args:
        inputs: JSON-lines files or directories of them (see the module docstring).
        tokenizer: a Hugging Face (fast) tokenizer directory; saved to ``out_dir/tokenizer`` with the template.
        out_dir: output directory.
        seq_len: tokens per training window (``data.seq_len`` of the training run, which must match); longer
            conversations are shortened by ``render``'s rule.
        template: ``"minichat"`` or ``"tokenizer"`` (the tokenizer's own chat template; see ``minima.chat``).
        valid_fraction: probability that a conversation is held out for validation, in [0, 1).
        seed: seeds the train/valid assignment.
        pack: pack several conversations per window (next-fit); False: one conversation per window.
        skip_bad_lines: count and skip lines that are not valid JSON or not a well-formed conversation, instead of
            raising DataError.
        shard_tokens: about this many tokens per shard file (a shard holds ``max(1, shard_tokens // seq_len)``
            windows plus one padding token).
        num_proc: processes for rendering (``Dataset.map(num_proc=...)``).

    Returns:
        A summary: per split the conversations, windows, tokens (of conversations, padding not counted), label
        tokens and truncated conversations; the lines skipped (count and the first few reasons); paths and time.
    """
    started = time.perf_counter()
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    check_split_options(num_proc=num_proc, shard_tokens=shard_tokens, valid_fraction=valid_fraction)
    if template not in TEMPLATES:
        raise DataError(f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATES)}")
    out_dir = Path(out_dir)
    identity = load_tokenizer(tokenizer).identity()  # also checks the tokenizer has an EOS token
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if not getattr(tok, "is_fast", False):
        raise DataError(f"tokenizer {tokenizer} is not a fast tokenizer (tokenizer.json), which render needs")
    if template == "tokenizer" and tok.chat_template is None:
        raise DataError(
            f"tokenizer {tokenizer} has no chat template of its own (chat_template in its tokenizer_config.json or a "
            "chat_template.jinja); use --template minichat, or a tokenizer that has one"
        )
    try:
        chat_template(tok, template)
    except ValueError as e:
        raise DataError(f"tokenizer {tokenizer}: {e}") from e
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    files = chat_files(inputs)
    lines, starts = _load_lines(files)
    if lines is None:
        raise DataError(f"the inputs {[str(f) for f in files]} are empty")
    rendered = lines.map(
        _render_batch,
        batched=True,
        batch_size=_RENDER_BATCH_LINES,
        with_indices=True,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={
            "tokenizer": tok,
            "template": template,
            "seq_len": seq_len,
            "files": [str(f) for f in files],
            "starts": starts,
            "skip_bad_lines": skip_bad_lines,
        },
        remove_columns=["text"],
        features=datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("uint32")),
                "flags": datasets.List(datasets.Value("uint8")),
                "label_tokens": datasets.Value("int64"),
                "truncated": datasets.Value("bool"),
                "error": datasets.Value("string"),
            }
        ),
        desc="rendering conversations",
    )

    lengths, label_counts, truncated, bad_rows, reasons = _row_stats(rendered)
    for reason in reasons:
        log.warning("skipped %s", reason)
    if len(bad_rows) > len(reasons):
        log.warning("skipped %d bad lines in all (the first %d above)", len(bad_rows), len(reasons))
    good = lengths > 0
    if not good.any():
        raise DataError(f"the inputs {[str(f) for f in files]} hold no well-formed conversation")
    is_valid = np.zeros(len(lengths), dtype=bool)
    is_valid[good] = split_documents(int(good.sum()), valid_fraction, seed)

    # Plan both splits first: every count of the index is known before a shard is written.
    m = max(1, shard_tokens // seq_len)
    plans = {}
    for name, keep in (("train", good & ~is_valid), ("valid", good & is_valid)):
        window_of = pack_windows(lengths[keep], seq_len, pack)
        windows = int(window_of[-1]) + 1 if len(window_of) else 0
        if windows == 0:
            raise DataError(
                f"the {name} split would hold no conversation ({int(good.sum())} well-formed conversations, "
                f"valid_fraction={valid_fraction}): "
                + ("raise --valid-fraction or add data" if name == "valid" else "lower --valid-fraction or add data")
            )
        plans[name] = (
            keep,
            window_of,
            {
                "template": template,
                "pack": pack,
                "conversations": int(keep.sum()),
                "tokens": int(lengths[keep].sum()),
                "label_tokens": int(label_counts[keep].sum()),
                "truncated": int(truncated[keep].sum()),
                "windows": windows,
                "skipped_lines": len(bad_rows),
            },
        )

    splits = {}
    for name, (keep, window_of, counts) in plans.items():
        index = write_shards(
            out_dir / name,
            _shard_documents(
                rendered, keep, window_of, seq_len=seq_len, windows_per_shard=m, pad_id=pad_id, desc=f"writing {name}"
            ),
            vocab_size=len(tok),
            eos_id=tok.eos_token_id,
            bos_id=tok.bos_token_id,
            tokenizer=identity,
            shard_tokens=m * seq_len + 1,
            flags=True,
            extra={"packed_seq_len": seq_len, "chat": counts},
        )
        assert index["num_tokens"] == counts["windows"] * seq_len + len(index["shards"]), index["num_tokens"]
        splits[name] = {
            "path": str(out_dir / name),
            **{k: counts[k] for k in ("conversations", "windows", "tokens", "label_tokens", "truncated")},
            "fill": round(counts["tokens"] / (counts["windows"] * seq_len), 4),
            "shards": len(index["shards"]),
        }

    tokenizer_dir = out_dir / "tokenizer"
    set_chat_template(tok, template)
    tok.model_max_length = seq_len
    source = Path(tokenizer).resolve()
    if tokenizer_dir.resolve() not in (source, *source.parents):
        shutil.rmtree(tokenizer_dir, ignore_errors=True)  # no stale files of a previous tokenizer
    tok.save_pretrained(tokenizer_dir)
    return {
        "out_dir": str(out_dir),
        "tokenizer": {**identity, "path": str(tokenizer_dir), "template": template},
        "files": len(files),
        "lines": len(lengths),
        "seq_len": seq_len,
        "pack": pack,
        **splits,
        "skipped_lines": len(bad_rows),
        "skipped": reasons,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _row_stats(rendered: datasets.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Per row (line) of ``rendered``: tokens (0: a blank or bad line), label tokens, truncated (bool); the bad rows'
    numbers, and the reasons of the first few."""
    parts: dict[str, list] = {"lengths": [], "labels": [], "truncated": [], "bad": []}
    reasons, first = [], 0
    columns = ["input_ids", "label_tokens", "truncated", "error"]
    for table in rendered.select_columns(columns).with_format("arrow").iter(_READ_BATCH_ROWS * 10):
        parts["lengths"].append(pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False))
        parts["labels"].append(table.column("label_tokens").to_numpy(zero_copy_only=False))
        parts["truncated"].append(table.column("truncated").to_numpy(zero_copy_only=False))
        errors = table.column("error")
        bad = np.flatnonzero(pc.is_valid(errors).to_numpy(zero_copy_only=False))
        reasons += [errors[int(r)].as_py() for r in bad[: _REPORTED_BAD_LINES - len(reasons)]]
        parts["bad"].append(bad + first)
        first += table.num_rows
    lengths, labels, truncated, bad = (
        np.concatenate(parts[k]) if parts[k] else np.zeros(0, dtype=np.int64)
        for k in ("lengths", "labels", "truncated", "bad")
    )
    return lengths.astype(np.int64), labels.astype(np.int64), truncated.astype(bool), bad, reasons
