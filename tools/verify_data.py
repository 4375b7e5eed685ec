"""Check prepared token shards against their index: ``python tools/verify_data.py DIR [DIR ...]``.

DIR is a prepared directory (its ``train/`` and ``valid/`` splits are checked) or one split (a directory with
``index.json``). Every shard's size and sha256 are compared with what ``tools/prepare_data.py`` recorded when it wrote
them. Training checks only sizes at start (reading every byte of a 500 GB corpus on each rank would cost minutes
before the first step); run this after copying data to a cluster, or set ``data.verify_checksums=true``.
Exits 1 and lists every shard that differs; 0 when all match.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from minima.shards import INDEX_FILE, DataError, TokenShards, file_sha256


def splits_of(path: Path) -> list[Path]:
    """The splits to check under ``path``: itself if it holds an index, else its train/ and valid/."""
    if (path / INDEX_FILE).is_file():
        return [path]
    found = [path / name for name in ("train", "valid") if (path / name / INDEX_FILE).is_file()]
    if not found:
        raise DataError(f"{path} holds neither {INDEX_FILE} nor train/ or valid/ splits; give a prepared directory")
    return found


def verify(path: Path) -> list[str]:
    """Problems found in the splits under ``path`` (empty when every shard matches its index)."""
    problems = []
    for split in splits_of(path):
        shards = TokenShards.open(split)  # the index parses, every shard exists with its recorded size
        entries = shards.index["shards"]
        total = sum(e["num_tokens"] for e in entries) * shards.dtype.itemsize
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"sha256 {split}", file=sys.stderr) as bar:
            for entry in entries:
                if file_sha256(split / entry["file"]) != entry["sha256"]:
                    problems.append(f"{split / entry['file']}: sha256 differs from {split / INDEX_FILE}")
                bar.update(entry["num_tokens"] * shards.dtype.itemsize)
        print(f"{split}: {len(entries)} shards, {shards.num_tokens} tokens checked", file=sys.stderr)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="prepared directory or split")
    args = parser.parse_args(argv)
    problems = []
    try:
        for path in args.dirs:
            problems += verify(path)
    except DataError as e:
        print(f"verify_data: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} shard(s) differ: re-run tools/prepare_data.py or copy them again", file=sys.stderr)
        return 1
    print("all shards match their index", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
