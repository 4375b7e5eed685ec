"""Shared fixtures: a few standard-library files as a real corpus, a tiny tokenizer trained on them, and a tiny
prepared dataset. Everything is built once per session in a temporary directory; nothing is downloaded."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from tests.runs import REPO, SEQ, STUDENT_ARCH, TEACHER_ARCH, launch

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


@pytest.fixture(scope="session")
def sharded_ds_configs(tmp_path_factory) -> tuple[Path, Path]:
    """The shipped zero3.json / zero3_teacher.json with ``stage3_param_persistence_threshold: 0``: even tiny parameters
    are sharded and gathered on use (at the default threshold, tiny models would keep every parameter whole)."""
    out = tmp_path_factory.mktemp("ds")
    paths = []
    for name in ("zero3.json", "zero3_teacher.json"):
        ds = json.loads((REPO / "ds_configs" / name).read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (out / name).write_text(json.dumps(ds))
        paths.append(out / name)
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def kd_overrides(tiny_prepared_data, sharded_ds_configs) -> list[str]:
    """A 2-rank KD run of the tiny models: 6 steps of 2 ranks x 2 sequences x 2 accumulation steps, evaluation and a
    checkpoint every 3 steps."""
    student_ds, teacher_ds = sharded_ds_configs
    return [
        f"data.dir={tiny_prepared_data}",
        f"data.seq_len={SEQ}",
        f"student.arch={STUDENT_ARCH}",
        "teacher.path=null",
        f"teacher.arch={TEACHER_ARCH}",
        "run.micro_batch_size=2",
        f"run.tokens_per_step={2 * 2 * SEQ * 2}",
        "run.max_steps=6",
        "run.log_every=1",
        "run.eval_every=3",
        f"run.eval_tokens={16 * SEQ}",
        "run.save_every=3",
        "run.keep_last=5",
        "optim.lr=3e-3",
        f"run.ds_config={student_ds}",
        f"run.teacher_ds_config={teacher_ds}",
    ]


@pytest.fixture(scope="session")
def kd_run(tmp_path_factory, kd_overrides) -> Path:
    """One uninterrupted 2-rank KD run of ``kd_overrides`` (6 steps, checkpoints at 3 and 6; also the fp32 export):
    the reference that interrupted and resumed runs are compared with."""
    out = tmp_path_factory.mktemp("kd_run")
    launch([*kd_overrides, f"run.out_dir={out}", "run.export_fp32=true"])
    return out
