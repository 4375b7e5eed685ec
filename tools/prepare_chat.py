"""Prepare chat data for the chat stage: ``python tools/prepare_chat.py --input PATH --tokenizer DIR --out DIR
--seq-len N``.

Reads conversations from JSON-lines files (one per line: ``messages``, ShareGPT ``conversations`` or MiniMA's
``User``/``Assistant`` turns), renders them with the chat template, packs them into windows of N tokens and writes
``DIR/train``, ``DIR/valid`` (index.json + shard_*.bin + flags_*.bin) and ``DIR/tokenizer`` (the tokenizer with the
template installed), then prints a JSON summary. Train on it with ``data.dir=DIR data.seq_len=N``.

Example::

    python tools/prepare_chat.py --input data/chat/ --tokenizer runs/demo/spm --out data/chat-2048 --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import sys

from minima.chat import TEMPLATES
from minima.chat_data import prepare_chat
from minima.shards import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH",
        help=".jsonl/.json file (optionally .gz/.bz2/.xz/.zst) or directory of them; repeat for several",
    )
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="Hugging Face (fast) tokenizer directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--seq-len", type=int, required=True, metavar="N", help="tokens per training window (the run's data.seq_len)"
    )
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        default="minichat",
        help="minichat (built in, default) or tokenizer (the tokenizer's own chat template)",
    )
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=0.02,
        help="probability that a conversation is held out for validation (default 0.02)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the train/valid split (default 0)")
    parser.add_argument("--no-pack", action="store_true", help="one conversation per window (default: pack several)")
    parser.add_argument(
        "--skip-bad-lines", action="store_true", help="skip and count lines that are not well-formed conversations"
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=2**27, help="about this many tokens per shard file (default 2**27)"
    )
    parser.add_argument("--num-proc", type=int, default=1, help="rendering processes (default 1)")
    args = parser.parse_args(argv)

    try:
        summary = prepare_chat(
            args.input,
            args.tokenizer,
            args.out,
            seq_len=args.seq_len,
            template=args.template,
            valid_fraction=args.valid_fraction,
            seed=args.seed,
            pack=not args.no_pack,
            skip_bad_lines=args.skip_bad_lines,
            shard_tokens=args.shard_tokens,
            num_proc=args.num_proc,
        )
    except (DataError, ValueError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
