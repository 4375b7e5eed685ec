"""Prepare token shards for training: ``python tools/prepare_data.py --input PATH --tokenizer PATH --out DIR``.

Writes ``DIR/train``, ``DIR/valid`` (index.json + shard_*.bin) and ``DIR/tokenizer`` (Hugging Face files), then
prints a JSON summary. With ``--train-tokenizer VOCAB_SIZE`` a sentencepiece tokenizer is first trained on the
training documents of the inputs into ``DIR/tokenizer`` and used (``--tokenizer`` is then not needed).

Example, a demo corpus from the Python standard library::

    python tools/prepare_data.py --input "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \\
        --pattern 'email/**/*.py' --train-tokenizer 4096 --out data/stdlib
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minima.prepare import prepare_data, train_tokenizer
from minima.shards import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH",
        help="file or directory of jsonl/json/parquet/text files; repeat for several",
    )
    parser.add_argument(
        "--tokenizer", metavar="PATH", help="Hugging Face tokenizer directory or sentencepiece .model file"
    )
    parser.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB_SIZE",
        help="train a sentencepiece BPE with this many ids on the inputs and use it",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--text-field", default="text", help="column holding the documents in json/parquet inputs")
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=0.01,
        help="probability that a document is held out for validation (default 0.01)",
    )
    parser.add_argument("--shard-tokens", type=int, default=2**27, help="tokens per shard file (default 2**27)")
    parser.add_argument("--pattern", help="glob for files inside input directories, e.g. '**/*.py' (default: all)")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenising processes (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the train/valid split and tokenizer sample")
    args = parser.parse_args(argv)
    if (args.tokenizer is None) == (args.train_tokenizer is None):
        parser.error("give exactly one of --tokenizer PATH and --train-tokenizer VOCAB_SIZE")

    try:
        tokenizer = args.tokenizer
        if args.train_tokenizer is not None:
            tokenizer = train_tokenizer(
                args.input,
                Path(args.out) / "tokenizer",
                vocab_size=args.train_tokenizer,
                text_field=args.text_field,
                valid_fraction=args.valid_fraction,
                seed=args.seed,
                pattern=args.pattern,
            )
        summary = prepare_data(
            args.input,
            tokenizer,
            args.out,
            text_field=args.text_field,
            valid_fraction=args.valid_fraction,
            shard_tokens=args.shard_tokens,
            seed=args.seed,
            num_proc=args.num_proc,
            pattern=args.pattern,
        )
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
