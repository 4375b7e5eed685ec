"""Property tests of the token shards and their readers on tiny synthetic data.

The synthetic stream's token at global position p is p itself (vocab 60000 > stream length), so a window's values
tell where it was cut: contiguous values = one slice of one shard.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from minima.data import TokenWindowLoader, eval_batches
from minima.order import permute, window_key
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
    loader = TokenWindowLoader(split, seq_len=7, micro_batch_size=7)
    assert loader.windows_per_epoch == 140
    seen = []
    for _ in range(20):  # one epoch: 140 windows
        batch = next(loader)
        assert batch.input_ids.dtype == torch.int64 and batch.labels.dtype == torch.int64
        assert batch.input_ids.shape == batch.labels.shape == (7, 7) and batch.position_ids is None
        assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])
        window = torch.cat([batch.input_ids, batch.labels[:, -1:]], dim=1)  # the 8 tokens read
        assert torch.equal(window - window[:, :1], torch.arange(8).expand(7, 8))  # contiguous in the stream
        start = window[:, 0]
        assert torch.all(start // 300 == window[:, -1] // 300)  # never crosses a shard boundary
        assert torch.all((start % 300) % 7 == 0)  # stride seq_len from the shard's start
        seen += start.tolist()
    assert loader.epoch == 1
    all_starts = {shard * 300 + 7 * k for shard, n in enumerate([42, 42, 42, 14]) for k in range(n)}
    assert len(seen) == 140 and set(seen) == all_starts  # every window once


def window_number(first_tokens: list[int]) -> list[int]:
    """The window of the split fixture that starts with each token (42 windows per 300-token shard)."""
    return [(s // 300) * 42 + (s % 300) // 7 for s in first_tokens]


@pytest.mark.parametrize(("world_size", "micro"), [(2, 2), (3, 4), (1, 7)])
def test_the_global_sequence_is_each_epochs_permutation_end_to_end(split: Path, world_size: int, micro: int) -> None:
    # 140 windows; steps of 4, 12 or 7 slots: epochs end inside a step, and nothing is dropped or repeated
    ranks = [
        TokenWindowLoader(split, seq_len=7, micro_batch_size=micro, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    expected = np.concatenate([permute(np.arange(140), 140, window_key(0, "", epoch)) for epoch in range(3)])
    got = []
    for _ in range(3 * 140 // (micro * world_size)):
        parts = [next(r).input_ids for r in ranks]
        assert len(set(torch.cat(parts)[:, 0].tolist())) == micro * world_size  # disjoint across ranks
        got += window_number(torch.cat(parts)[:, 0].tolist())  # the union is the global micro-step, in order
    assert got == expected[: len(got)].tolist()
    assert all(sorted(expected[e * 140 : (e + 1) * 140]) == list(range(140)) for e in range(3))  # permutations


def test_order_is_a_function_of_seed_and_epoch(split: Path) -> None:
    def epoch_orders(seed: int) -> list[torch.Tensor]:
        loader = TokenWindowLoader(split, seq_len=7, micro_batch_size=10, seed=seed)
        return [torch.cat(take(loader, 14))[:, 0] for _ in range(2)]

    a0, a1 = epoch_orders(0)
    b0, b1 = epoch_orders(0)
    c0, _ = epoch_orders(1)
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert not torch.equal(a0, a1)  # a new permutation each epoch
    assert not torch.equal(a0, c0)  # another seed, another order


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 65, 1000, 4099])
def test_permute_is_a_permutation_for_every_size(n: int) -> None:
    for epoch in range(3):
        assert sorted(permute(np.arange(n), n, window_key(7, "web", epoch)).tolist()) == list(range(n))
    if n > 16:
        assert not np.array_equal(permute(np.arange(n), n, window_key(7, "web", 0)), np.arange(n))


def test_permute_deep_in_a_huge_epoch_costs_memory_of_the_request_only() -> None:
    n = 10**13  # windows: far beyond any corpus; nothing of size n may be allocated
    tracemalloc.start()
    ids = permute(np.arange(10**12, 10**12 + 4096), n, window_key(0, "", 9))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert ids.min() >= 0 and ids.max() < n and len(set(ids.tolist())) == 4096
    assert peak < 2 * 2**20


@pytest.mark.parametrize("k", [0, 5, 19, 20, 21, 46, 47, 60])  # 140 windows: epochs end inside steps 46 and 93
def test_resume_yields_exactly_the_uninterrupted_batches(split: Path, k: int) -> None:
    uninterrupted = TokenWindowLoader(split, seq_len=7, micro_batch_size=3, seed=5)
    expected = take(uninterrupted, k + 60)[k:]
    first = TokenWindowLoader(split, seq_len=7, micro_batch_size=3, seed=5)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert set(state) >= {"position", "seed", "seq_len", "fingerprint"} and state["position"] == 3 * k
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


@pytest.mark.parametrize(("position", "layouts"), [(37, [(3, 1), (1, 5)]), (139, [(2, 3)]), (281, [(5, 2), (1, 1)])])
def test_resume_at_any_slot_on_other_layouts_consumes_exactly_the_remaining_sequence(
    split: Path, position: int, layouts: list[tuple[int, int]]
) -> None:
    # A position that is not a multiple of the new step (e.g. a run on 1 rank x 1 resumed on 3 ranks)
    expected = np.concatenate([permute(np.arange(140), 140, window_key(0, "", e)) for e in range(4)])
    for world_size, micro in layouts:
        ranks = [TokenWindowLoader(split, seq_len=7, micro_batch_size=micro, rank=r, world_size=world_size)
                 for r in range(world_size)]  # fmt: skip
        state = {**ranks[0].state_dict(), "position": position}
        got = []
        for r in ranks:
            r.load_state_dict(state)
        for _ in range(5):
            got += window_number(torch.cat([next(r).input_ids for r in ranks])[:, 0].tolist())
        assert got == expected[position : position + len(got)].tolist()


def test_prefetching_changes_nothing_but_the_waiting(split: Path) -> None:
    plain = TokenWindowLoader(split, seq_len=7, micro_batch_size=3, seed=2)
    ahead = TokenWindowLoader(split, seq_len=7, micro_batch_size=3, seed=2, prefetch=3)
    for _ in range(60):
        assert torch.equal(next(plain).input_ids, next(ahead).input_ids)
        assert plain.state_dict() == ahead.state_dict()  # the state counts what was consumed, not prefetched
    ahead.load_state_dict({**plain.state_dict(), "position": 9})  # a resume restarts the thread where asked
    plain.load_state_dict({**plain.state_dict(), "position": 9})
    assert all(torch.equal(next(plain).labels, next(ahead).labels) for _ in range(10))
    ahead.close()


def test_an_earlier_loader_state_is_refused_with_what_to_do(split: Path) -> None:
    state = {"epoch": 0, "position": 12, "seed": 0, "seq_len": 7, "fingerprint": "x"}
    with pytest.raises(DataError, match=r"earlier minima.*run\.resume=never"):
        TokenWindowLoader(split, seq_len=7, micro_batch_size=2).load_state_dict(state)


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


def test_a_split_without_one_window_is_refused(split: Path) -> None:
    with pytest.raises(DataError, match=r"no window of 302 tokens"):
        TokenWindowLoader(split, seq_len=301, micro_batch_size=1)


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
