"""Property tests of the token shards and their readers on tiny synthetic data.

The synthetic stream's token at global position p is p itself (vocab 60000 > stream length), so a window's values
tell where it was cut: contiguous values = one slice of one shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from minima.data import TokenWindowLoader, eval_batches
from minima.shards import IGNORE_INDEX, DataError, TokenShards, write_shards

VOCAB = 60_000
EOS = 0
TOKENIZER = {"kind": "sentencepiece", "source": "synthetic", "sha256": "0" * 64, "vocab_size": VOCAB}


def write_stream(out: Path, num_tokens: int, shard_tokens: int, seed: int = 0) -> dict:
    """Write tokens 0..num_tokens-1 as documents of random lengths (1..50)."""
    rng = np.random.default_rng(seed)
    cuts = np.cumsum(rng.integers(1, 51, size=num_tokens))
    cuts = cuts[cuts < num_tokens]
    docs = np.split(np.arange(num_tokens), cuts)
    return write_shards(
        out, docs, vocab_size=VOCAB, eos_id=EOS, bos_id=None, tokenizer=TOKENIZER, shard_tokens=shard_tokens
    )


@pytest.fixture
def split(tmp_path: Path) -> Path:
    """1000 tokens in shards of 300, 300, 300, 100: windows of seq_len 7 -> 42 + 42 + 42 + 14 = 140."""
    write_stream(tmp_path / "train", 1000, 300)
    return tmp_path / "train"


def take(loader: TokenWindowLoader, n: int) -> list[torch.Tensor]:
    return [next(loader).input_ids.clone() for _ in range(n)]


def test_write_shards_layout(tmp_path: Path) -> None:
    index = write_stream(tmp_path, 1000, 300)
    assert index["format"] == "minima-token-shards/1" and index["dtype"] == "uint16"
    assert [s["num_tokens"] for s in index["shards"]] == [300, 300, 300, 100]
    assert index["num_tokens"] == 1000 and index["eos_id"] == EOS and index["bos_id"] is None
    assert json.loads((tmp_path / "index.json").read_text()) == index
    shards = TokenShards.open(tmp_path)
    assert np.array_equal(np.concatenate(shards.shards), np.arange(1000))
    assert all(not s.flags.writeable for s in shards.shards)
    # uint32 when the ids do not fit uint16; little-endian on disk either way
    big = write_shards(tmp_path / "big", [np.array([70_000, 1])], vocab_size=70_001, eos_id=1, bos_id=None,
                       tokenizer=TOKENIZER, shard_tokens=10)  # fmt: skip
    assert big["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "big" / "shard_00000.bin", dtype="<u4").tolist() == [70_000, 1]
    with pytest.raises(DataError, match="document 0"):
        write_shards(tmp_path / "bad", [np.array([VOCAB])], vocab_size=VOCAB, eos_id=EOS, bos_id=None,
                     tokenizer=TOKENIZER, shard_tokens=10)  # fmt: skip


def test_rewrite_removes_stale_shards(tmp_path: Path) -> None:
    write_stream(tmp_path, 1000, 100)
    write_stream(tmp_path, 1000, 600)
    assert sorted(p.name for p in tmp_path.glob("shard_*.bin")) == ["shard_00000.bin", "shard_00001.bin"]


def test_windows_are_next_token_pairs_within_one_shard(split: Path) -> None:
    loader = TokenWindowLoader(split, seq_len=7, micro_batch_size=3)
    assert loader.windows_per_epoch == 140 and loader.batches_per_epoch == 46
    seen = []
    for _ in range(loader.batches_per_epoch):
        batch = next(loader)
        assert batch.input_ids.dtype == torch.int64 and batch.labels.dtype == torch.int64
        assert batch.input_ids.shape == batch.labels.shape == (3, 7)
        assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])
        window = torch.cat([batch.input_ids, batch.labels[:, -1:]], dim=1)  # the 8 tokens read
        assert torch.equal(window - window[:, :1], torch.arange(8).expand(3, 8))  # contiguous in the stream
        start = window[:, 0]
        assert torch.all(start // 300 == window[:, -1] // 300)  # never crosses a shard boundary
        assert torch.all((start % 300) % 7 == 0)  # stride seq_len from the shard's start
        seen += start.tolist()
    assert loader.epoch == 0
    all_starts = {shard * 300 + 7 * k for shard, n in enumerate([42, 42, 42, 14]) for k in range(n)}
    assert len(set(seen)) == len(seen) == 138 and set(seen) <= all_starts  # 140 windows, tail of 2 dropped
    next(loader)
    assert loader.epoch == 1


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_slices_partition_each_global_micro_step(split: Path, world_size: int) -> None:
    micro = 2
    reference = TokenWindowLoader(split, seq_len=7, micro_batch_size=micro * world_size)
    ranks = [
        TokenWindowLoader(split, seq_len=7, micro_batch_size=micro, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert len({r.batches_per_epoch for r in ranks}) == 1
    order = np.random.default_rng([0, 0]).permutation(140)
    for step in range(2 * reference.batches_per_epoch + 3):  # over two epoch boundaries
        parts = [next(r).input_ids for r in ranks]
        starts = torch.cat(parts)[:, 0].tolist()
        assert len(set(starts)) == micro * world_size  # disjoint across ranks
        assert torch.equal(torch.cat(parts), next(reference).input_ids)  # union = the global micro-step, in order
        if step < reference.batches_per_epoch:
            expected = order[step * micro * world_size : (step + 1) * micro * world_size]
            got = [(s // 300) * 42 + (s % 300) // 7 for s in starts]  # window number from its first token
            assert got == expected.tolist()
    assert len({r.epoch for r in ranks}) == 1


def test_every_rank_yields_the_same_number_of_batches_per_epoch(split: Path) -> None:
    # 140 windows, 3 ranks x 4 = 12 per global step -> 11 steps, 8 windows dropped
    ranks = [TokenWindowLoader(split, seq_len=7, micro_batch_size=4, rank=r, world_size=3) for r in range(3)]
    for r in ranks:
        epochs = [r.epoch]
        for _ in range(11):
            next(r)
            epochs.append(r.epoch)
        assert epochs == [0] * 12
        next(r)
        assert r.epoch == 1


def test_order_is_a_function_of_seed_and_epoch(split: Path) -> None:
    def epoch_orders(seed: int) -> list[torch.Tensor]:
        loader = TokenWindowLoader(split, seq_len=7, micro_batch_size=10, seed=seed)
        return [torch.cat(take(loader, loader.batches_per_epoch))[:, 0] for _ in range(2)]

    a0, a1 = epoch_orders(0)
    b0, b1 = epoch_orders(0)
    c0, _ = epoch_orders(1)
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert not torch.equal(a0, a1)  # a new permutation each epoch
    assert not torch.equal(a0, c0)  # another seed, another order


@pytest.mark.parametrize("k", [0, 5, 46, 47, 60])  # 46 batches per epoch: resume at, and after, the boundary
def test_resume_yields_exactly_the_uninterrupted_batches(split: Path, k: int) -> None:
    uninterrupted = TokenWindowLoader(split, seq_len=7, micro_batch_size=3, seed=5)
    expected = take(uninterrupted, k + 60)[k:]
    first = TokenWindowLoader(split, seq_len=7, micro_batch_size=3, seed=5)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert set(state) >= {"epoch", "position", "seed", "seq_len", "fingerprint"}
    resumed = TokenWindowLoader(split, seq_len=7, micro_batch_size=3, seed=5)
    resumed.load_state_dict(state)
    got = take(resumed, 60)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize(("world_size", "micro"), [(2, 2), (4, 1), (1, 4)])
def test_resume_with_another_world_size_continues_the_global_position(split: Path, world_size: int, micro: int) -> None:
    # 2 ranks x 2 windows before the checkpoint; 4 windows per global step after it in every layout
    before = [TokenWindowLoader(split, seq_len=7, micro_batch_size=2, rank=r, world_size=2) for r in range(2)]
    for r in before:
        take(r, 10)
    state = before[0].state_dict()
    assert state == before[1].state_dict() and state["position"] == 40
    reference = TokenWindowLoader(split, seq_len=7, micro_batch_size=4)
    take(reference, 10)
    after = [TokenWindowLoader(split, seq_len=7, micro_batch_size=micro, rank=r, world_size=world_size)
             for r in range(world_size)]  # fmt: skip
    for r in after:
        r.load_state_dict(state)
    for _ in range(30):  # crosses the epoch boundary (35 global steps of 4)
        assert torch.equal(torch.cat([next(r).input_ids for r in after]), next(reference).input_ids)


def test_fingerprint_mismatch_names_what_changed(tmp_path: Path, split: Path) -> None:
    state = TokenWindowLoader(split, seq_len=7, micro_batch_size=2).state_dict()
    write_stream(tmp_path / "other", 1200, 300)
    with pytest.raises(DataError, match=r"1000 tokens.*1200"):
        TokenWindowLoader(tmp_path / "other", seq_len=7, micro_batch_size=2).load_state_dict(state)
    write_stream(tmp_path / "same_size", 1000, 300, seed=1)  # same tokens, other document cuts: same bytes
    TokenWindowLoader(tmp_path / "same_size", seq_len=7, micro_batch_size=2).load_state_dict(state)
    changed = tmp_path / "changed"
    write_shards(changed, [np.arange(1000)[::-1]], vocab_size=VOCAB, eos_id=EOS, bos_id=None, tokenizer=TOKENIZER,
                 shard_tokens=300)  # fmt: skip
    with pytest.raises(DataError, match="checksums"):
        TokenWindowLoader(changed, seq_len=7, micro_batch_size=2).load_state_dict(state)
    with pytest.raises(DataError, match=r"seq_len=7.*seq_len=8"):
        TokenWindowLoader(split, seq_len=8, micro_batch_size=2).load_state_dict(state)
    with pytest.raises(DataError, match=r"seed=0.*seed=1"):
        TokenWindowLoader(split, seq_len=7, micro_batch_size=2, seed=1).load_state_dict(state)


# (2, 1, 5): one row per micro-batch, the last one padding on rank 1 (its inputs must stay EOS).
EVAL_CASES = [(1, 4, None), (3, 4, None), (2, 5, 33), (4, 8, 3), (2, 1, 5)]


@pytest.mark.parametrize(("world_size", "micro", "max_windows"), EVAL_CASES)
def test_eval_batches_cover_each_window_once(split: Path, world_size: int, micro: int, max_windows: int | None) -> None:
    shards = TokenShards.open(split)
    per_rank = [
        list(eval_batches(shards, seq_len=7, micro_batch_size=micro, rank=r, world_size=world_size,
                          max_windows=max_windows))
        for r in range(world_size)
    ]  # fmt: skip
    num_windows = 140 if max_windows is None else max_windows
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    assert len(per_rank[0]) == -(-num_windows // (micro * world_size))
    starts = []
    for step in range(len(per_rank[0])):
        for r in range(world_size):
            batch = per_rank[r][step]
            assert batch.input_ids.shape == (micro, 7)
            real = batch.labels[:, 0] != IGNORE_INDEX
            assert torch.all(batch.labels[~real] == IGNORE_INDEX) and torch.all(batch.input_ids[~real] == EOS)
            assert torch.equal(batch.labels[real][:, :-1], batch.input_ids[real][:, 1:])
            starts += batch.input_ids[real][:, 0].tolist()
    # file order, each window exactly once
    assert starts == [s * 300 + 7 * k for s, n in enumerate([42, 42, 42, 14]) for k in range(n)][:num_windows]


def test_too_little_data_for_one_global_micro_step(split: Path) -> None:
    with pytest.raises(DataError, match="140 windows"):
        TokenWindowLoader(split, seq_len=7, micro_batch_size=50, world_size=3)


# Bad input: each case raises DataError naming the offending file.


def test_missing_index(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"index\.json not found.*prepare_data\.py"):
        TokenShards.open(tmp_path)


def test_bad_index_format(split: Path) -> None:
    index = json.loads((split / "index.json").read_text())
    (split / "index.json").write_text(json.dumps({**index, "format": "something-else"}))
    with pytest.raises(DataError, match=r"index\.json has format 'something-else'"):
        TokenShards.open(split)
    (split / "index.json").write_text("{not json")
    with pytest.raises(DataError, match=r"index\.json is not valid JSON"):
        TokenShards.open(split)


def test_missing_shard(split: Path) -> None:
    (split / "shard_00002.bin").unlink()
    with pytest.raises(DataError, match=r"shard_00002\.bin, listed in .*, is missing"):
        TokenShards.open(split, verify_checksums=False)


def test_truncated_shard(split: Path) -> None:
    shard = split / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shard_00001\.bin has 598 bytes .* expects 600 .* truncated"):
        TokenShards.open(split, verify_checksums=False)


def test_modified_shard_fails_its_checksum_on_the_rank_that_verifies_it(tmp_path: Path) -> None:
    write_stream(tmp_path, 40_000, 10_000)  # shards of 20000 bytes: the sample digest covers 8192 of them
    shard = tmp_path / "shard_00001.bin"
    data = bytearray(shard.read_bytes())
    data[10_000] ^= 0xFF  # in the middle, outside the sampled first and last 4 KiB
    shard.write_bytes(bytes(data))
    TokenShards.open(tmp_path)  # by default only sizes and samples are checked: the shards were hashed when prepared
    with pytest.raises(DataError, match=r"shard_00001\.bin does not match the sha256"):
        TokenShards.open(tmp_path, verify_checksums=True)
    with pytest.raises(DataError, match=r"shard_00001\.bin does not match the sha256"):
        TokenShards.open(tmp_path, verify_checksums=True, rank=1, world_size=2)  # rank 1 of 2 verifies shards 1, 3
    TokenShards.open(tmp_path, verify_checksums=True, rank=0, world_size=2)  # rank 0 verifies shards 0 and 2 only
    data[5] ^= 0xFF  # inside the sampled head: a cheap check at every open finds it
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard_00001\.bin is not the file .* lists"):
        TokenShards.open(tmp_path)
