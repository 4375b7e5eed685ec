"""Shared fixtures: a few standard-library files as a real corpus, a tiny tokenizer trained on them, and a tiny
prepared dataset. Everything is built once per session in a temporary directory; nothing is downloaded."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

# Small modules present in every CPython >= 3.10; ~125 kB of real code together.
STDLIB_MODULES = (
    "bisect.py",
    "colorsys.py",
    "copy.py",
    "fnmatch.py",
    "glob.py",
    "graphlib.py",
    "heapq.py",
    "numbers.py",
    "queue.py",
    "sched.py",
    "shlex.py",
    "textwrap.py",
)
TINY_VOCAB_SIZE = 1024


@pytest.fixture(scope="session")
def stdlib_dir() -> Path:
    """The CPython standard library source directory of this interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def stdlib_files(stdlib_dir: Path) -> list[Path]:
    """A fixed handful of small standard-library .py files, sorted."""
    return [stdlib_dir / name for name in STDLIB_MODULES]


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Points the ``datasets`` cache (also for subprocesses, via HF_DATASETS_CACHE) at a session temp directory."""
    import datasets

    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, stdlib_files: list[Path]) -> Path:
    """A sentencepiece BPE tokenizer (1024 ids) trained on ``stdlib_files``, as a Hugging Face directory that also
    holds ``tokenizer.model``."""
    from minima.tokenizer import train_sentencepiece

    return train_sentencepiece(stdlib_files, tmp_path_factory.mktemp("tiny_tokenizer"), vocab_size=TINY_VOCAB_SIZE)


@pytest.fixture(scope="session")
def tiny_prepared_data(
    tmp_path_factory: pytest.TempPathFactory, stdlib_files: list[Path], tiny_tokenizer_dir: Path, datasets_cache: Path
) -> Path:
    """``prepare_data`` output (train/, valid/, tokenizer/) for ``stdlib_files`` with ``tiny_tokenizer_dir``:
    ~45k tokens, 20% of the documents held out, shards of 16384 tokens."""
    from minima.prepare import prepare_data

    out = tmp_path_factory.mktemp("tiny_prepared")
    prepare_data(stdlib_files, tiny_tokenizer_dir, out, valid_fraction=0.2, shard_tokens=16384, seed=0)
    return out
