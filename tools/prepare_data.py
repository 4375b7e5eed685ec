"""Prepare token shards for training: ``python tools/prepare_data.py --input PATH --tokenizer PATH --out DIR``.

One source, the plain layout: ``--input`` (repeatable) writes ``DIR/train``, ``DIR/valid`` and ``DIR/tokenizer``.
One named source: add ``--source NAME`` to write ``DIR/NAME/train`` and ``DIR/NAME/valid`` beside the shared
``DIR/tokenizer``; calls with other names add sources to the same DIR. Several sources in one call:
``--source NAME=PATH[,PATH...]`` repeated (no ``--input``), with ``--text-field FIELD`` for all of them or
``--text-field NAME=FIELD`` per source. NAME: letters, digits, "_" and "-", not train, valid or tokenizer. A source
whose tokenizer differs from the one DIR's other sources use is refused before any work.

An input is a file, a directory (``--pattern`` selects its files), a glob (quote it: ``'data/web/*.jsonl.zst'``) or
a dataset for ``datasets.load_dataset(NAME, split="train", streaming=True)`` (a hub name; ``hf:PATH`` for a local
dataset directory). Formats: jsonl/json (also .gz/.bz2/.xz/.zst), parquet and arrow (one document per row of the
text field), any other file is one document. See ``minima.sources``.

``--workers N`` tokenises N work units at a time; the output is byte-identical for any N. A run killed half-way and
started again with the same options keeps its completed units and does the rest; with different options (tokenizer,
seed, valid fraction, shard size, text field) it starts over, saying so. With ``--train-tokenizer VOCAB_SIZE`` a
sentencepiece tokenizer is first trained on the training documents of the inputs into ``DIR/tokenizer`` and used
(``--tokenizer`` is then not needed; not allowed when DIR holds other sources: pass ``--tokenizer DIR/tokenizer``).

Prints a JSON summary on stdout and one line per source on stderr. Examples::

    python tools/prepare_data.py --input "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \\
        --pattern 'email/**/*.py' --train-tokenizer 4096 --out data/stdlib
    python tools/prepare_data.py --source web='/data/web/*.jsonl.zst' --source code=/data/code/ \\
        --text-field web=text --text-field code=content --tokenizer /models/Llama-2-7b-hf --out /data/mix --workers 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minima.prepare import prepare_sources, prepared_sources, train_tokenizer
from minima.shards import DataError
from minima.sources import MIN_UNITS, UNIT_BYTES, Source


def parse_sources(inputs: list[str] | None, source_args: list[str], field_args: list[str]) -> list[Source]:
    """The sources named by ``--input``/``--source``/``--text-field`` (see the module docstring)."""
    named = [s for s in source_args if "=" in s]
    plain = [s for s in source_args if "=" not in s]
    if inputs and named:
        raise DataError("give either --input PATH (with at most one --source NAME) or --source NAME=PATH, not both")
    if plain and (named or len(plain) > 1 or not inputs):
        raise DataError("--source NAME (without =PATH) names the one source of the --input paths; give it once")
    if not inputs and not named:
        raise DataError("no inputs: pass --input PATH or --source NAME=PATH[,PATH...]")
    default_field, fields = "text", {}
    for item in field_args:
        name, _, value = item.rpartition("=")
        if not name:
            default_field = value
        else:
            fields[name] = value
    if inputs:
        pairs = [(plain[0] if plain else None, inputs)]
    else:
        pairs = [(name, [p for p in paths.split(",") if p]) for name, _, paths in (s.partition("=") for s in named)]
    unknown = sorted(set(fields) - {name for name, _ in pairs})
    if unknown:
        raise DataError(f"--text-field names unknown sources {unknown}; the sources are {[n for n, _ in pairs]}")
    return [Source(name, tuple(paths), fields.get(name, default_field)) for name, paths in pairs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", metavar="PATH", help="file, directory, glob or dataset; repeat")
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME[=PATH,...]",
        help="NAME: write the --input paths to DIR/NAME; NAME=PATH[,PATH...]: one source of several (repeat)",
    )
    parser.add_argument(
        "--text-field",
        action="append",
        default=[],
        metavar="[NAME=]FIELD",
        help="column holding the documents in json/parquet/arrow inputs (default text); NAME=FIELD for one source",
    )
    parser.add_argument(
        "--tokenizer", metavar="PATH", help="Hugging Face tokenizer directory or sentencepiece .model file"
    )
    parser.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB_SIZE",
        help="train a sentencepiece BPE with this many ids on the inputs' training documents and use it",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=0.01,
        help="probability that a document is held out for validation (default 0.01)",
    )
    parser.add_argument("--shard-tokens", type=int, default=2**27, help="tokens per shard file at most (default 2**27)")
    parser.add_argument("--pattern", help="glob for files inside input directories, e.g. '**/*.py' (default: all)")
    parser.add_argument(
        "--workers", "--num-proc", type=int, default=1, help="tokenising processes (default 1: in this process)"
    )
    parser.add_argument(
        "--unit-mb",
        type=float,
        help=f"MiB of plain-text files per work unit (default: 1/{MIN_UNITS} of their total, 1 to "
        f"{UNIT_BYTES // 2**20}); each json/parquet/arrow file is one unit",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the train/valid split and tokenizer sample")
    args = parser.parse_args(argv)
    if (args.tokenizer is None) == (args.train_tokenizer is None):
        parser.error("give exactly one of --tokenizer PATH and --train-tokenizer VOCAB_SIZE")

    unit_bytes = None if args.unit_mb is None else max(1, int(args.unit_mb * 2**20))
    try:
        sources = parse_sources(args.input, args.source, args.text_field)
        tokenizer = args.tokenizer
        if args.train_tokenizer is not None:
            others = sorted(str(n) for n in set(prepared_sources(args.out)) - {s.name for s in sources})
            if others:
                raise DataError(
                    f"{args.out} already holds the sources {others} with the tokenizer {Path(args.out) / 'tokenizer'}; "
                    "a tokenizer trained on these inputs would differ: pass --tokenizer "
                    f"{Path(args.out) / 'tokenizer'}, or prepare into another --out"
                )
            tokenizer = train_tokenizer(sources, Path(args.out) / "tokenizer", vocab_size=args.train_tokenizer,
                                        valid_fraction=args.valid_fraction, seed=args.seed, pattern=args.pattern,
                                        unit_bytes=unit_bytes)  # fmt: skip
        summary = prepare_sources(sources, tokenizer, args.out, valid_fraction=args.valid_fraction,
                                  shard_tokens=args.shard_tokens, seed=args.seed, workers=args.workers,
                                  pattern=args.pattern, unit_bytes=unit_bytes)  # fmt: skip
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(summary["sources"]) == 1:  # one source: its counts at the top level too, as prepare_data returns them
        summary = {**summary, **summary["sources"][0]}
    print(json.dumps(summary, indent=2))
    for s in summary["sources"]:
        train, valid = s["train"], s["valid"]
        print(
            f"{s['name'] or Path(args.out).name}: {train['tokens']:,} train tokens ({train['documents']:,} documents, "
            f"{train['shards']} shards), {valid['tokens']:,} valid tokens ({valid['documents']:,} documents) from "
            f"{s['files']:,} files in {s['units']} units ({s['units_written']} written by this run)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
