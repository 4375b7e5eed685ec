"""Check prepared token shards against their index: ``python tools/verify_data.py DIR [DIR ...]``.

DIR is a prepared directory (its ``train/`` and ``valid/`` splits are checked, and those of every source ``DIR/NAME``
of a mixture) or one split (a directory with ``index.json``). Every file's size and sha256 (each shard and its
document-start and flag files) are compared with what ``tools/prepare_data.py`` recorded when it wrote them. Training
checks only sizes and the first and last 4 KiB at start (reading every byte of a 500 GB corpus on each rank would cost
minutes before the first step); run this after copying data to a cluster, or set ``data.verify_checksums=true``.
Exits 1 and lists every file that differs; 0 when all match.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from minima.shards import INDEX_FILE, DataError, TokenShards, companion, file_sha256


def splits_of(path: Path) -> list[Path]:
    """The splits under ``path``: itself if it holds an index, else its (and its sources') train/ and valid/."""
    if (path / INDEX_FILE).is_file():
        return [path]
    found = sorted(index.parent for pattern in ("*/index.json", "*/*/index.json") for index in path.glob(pattern))
    found = [split for split in found if split.name in ("train", "valid")]
    if not found:
        raise DataError(f"{path} holds neither {INDEX_FILE} nor train/ or valid/ splits; give a prepared directory")
    return found


def verify(path: Path) -> list[str]:
    """Problems found in the splits under ``path`` (empty when every file matches its index)."""
    problems = []
    for split in splits_of(path):
        shards = TokenShards.open(split)  # the index parses, every file exists with its recorded size and samples
        entries = shards.index["shards"]
        kinds = [k for k, present in (("docs", shards.doc_starts), ("flags", shards.flags)) if present is not None]
        files = [(split / e["file"], e["sha256"]) for e in entries]
        files += [(split / companion(e["file"], k), e[f"{k}_sha256"]) for e in entries for k in kinds]
        with tqdm(total=sum(f.stat().st_size for f, _ in files), unit="B", unit_scale=True, desc=f"sha256 {split}",
                  file=sys.stderr) as bar:  # fmt: skip
            for file, expected in files:
                if file_sha256(file) != expected:
                    problems.append(f"{file}: sha256 differs from {split / INDEX_FILE}")
                bar.update(file.stat().st_size)
        print(
            f"{split}: {len(entries)} shards ({len(files)} files), {shards.num_tokens} tokens checked", file=sys.stderr
        )
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
