"""Document-aware windows and mixtures of sources (``minima.data``, ``minima.order``) on synthetic token streams.

Documents are ``[BOS] + content + [EOS]`` with BOS = 1 and EOS = 0; content tokens are distinct per document
(document ``d``'s tokens are ``100 * (d + 1) + i``, ``i < 40``), so a token tells its document.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minima.data import Source, TokenWindowLoader, document_mode, eval_batches
from minima.models import last_hidden
from minima.order import PERIOD, Mixture, permute, window_key
from minima.shards import IGNORE_INDEX, DataError, TokenShards, write_shards

VOCAB, BOS, EOS, T = 60_000, 1, 0, 16
TOKENIZER = {"kind": "sentencepiece", "source": "synthetic", "sha256": "0" * 64, "vocab_size": VOCAB}


def documents(n: int, seed: int = 0, bos: bool = True) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n):
        content = 100 * (d + 1) + np.arange(int(rng.integers(1, 40)))
        docs.append(np.concatenate([[BOS] if bos else [], content, [EOS]]).astype(np.int64))
    return docs


def write(out: Path, docs: list[np.ndarray], bos: bool = True, shard_tokens: int = 500) -> TokenShards:
    write_shards(out, docs, vocab_size=VOCAB, eos_id=EOS, bos_id=BOS, tokenizer=TOKENIZER, shard_tokens=shard_tokens,
                 bos_per_document=bos)  # fmt: skip
    return TokenShards.open(out)


def doc_of(token: int) -> int:
    return token // 100 - 1  # -1 for BOS/EOS


@pytest.fixture
def shards(tmp_path: Path) -> TokenShards:
    return write(tmp_path / "train", documents(80))


def all_batches(shards: TokenShards, documents: str) -> list:
    return list(eval_batches(shards, seq_len=T, micro_batch_size=4, documents=documents))


def test_auto_means_bos_where_documents_start_with_bos(shards: TokenShards, tmp_path: Path) -> None:
    assert document_mode(shards, "auto") == "bos"
    no_bos = write(tmp_path / "plain", documents(10, bos=False), bos=False)
    assert document_mode(no_bos, "auto") == "off"
    with pytest.raises(DataError, match=r"do not start with BOS.*isolated"):
        document_mode(no_bos, "bos")
    assert document_mode(no_bos, "isolated") == "isolated"
    with pytest.raises(DataError, match="must be one of"):
        document_mode(shards, "sometimes")


def test_bos_mode_starts_every_window_with_bos(shards: TokenShards) -> None:
    off, bos = all_batches(shards, "off"), all_batches(shards, "bos")
    for a, b in zip(off, bos, strict=True):
        starts_mid_document = a.input_ids[:, 0] != BOS
        assert torch.all(b.input_ids[:, 0] == BOS)
        assert torch.equal(b.input_ids[:, 1:], a.input_ids[:, 1:])  # nothing else moves
        assert torch.all(b.labels[starts_mid_document, 0] == IGNORE_INDEX)  # mid-document from BOS alone: no label
        assert torch.equal(b.labels[~starts_mid_document], a.labels[~starts_mid_document])
        assert torch.equal(b.labels[:, 1:], a.labels[:, 1:]) and b.position_ids is None
    assert any(torch.any(a.input_ids[:, 0] != BOS) for a in off)  # the case was exercised


def test_isolated_positions_restart_at_each_document_and_no_label_crosses_one(shards: TokenShards) -> None:
    checked = 0
    for batch in all_batches(shards, "isolated"):
        for ids, labels, positions in zip(batch.input_ids, batch.labels, batch.position_ids, strict=True):
            for t in range(T):
                token = int(ids[t])
                if positions[t] == 0:
                    assert t == 0 or token == BOS  # a sequence starts at the window or at a document's BOS
                else:
                    assert positions[t] == positions[t - 1] + 1
                if labels[t] != IGNORE_INDEX:
                    # the label belongs to the document of this position: never the next document's first token
                    assert int(labels[t]) != BOS
                    segment = ids[t - int(positions[t]) : t + 1].tolist()
                    docs = {doc_of(x) for x in [*segment, int(labels[t])] if doc_of(x) >= 0}
                    assert len(docs) <= 1
                    checked += 1
    assert checked > 500


def test_isolated_training_forward_equals_each_document_alone(shards: TokenShards) -> None:
    """Against a block-diagonal reference: the hidden states of a window's documents, run through the step's forward
    (minima.models.last_hidden with the batch's position ids, sdpa), equal those of each piece run alone."""
    batch = next(iter(eval_batches(shards, seq_len=T, micro_batch_size=8, documents="isolated")))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)  # fmt: skip
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    pieces = 0
    with torch.no_grad():
        packed = last_hidden(model, batch.input_ids, batch.position_ids)
        for b in range(len(batch.input_ids)):
            starts = [int(t) for t in torch.nonzero(batch.position_ids[b] == 0).flatten()] + [T]
            for start, stop in itertools.pairwise(starts):
                alone = last_hidden(model, batch.input_ids[b, start:stop][None])[0]
                torch.testing.assert_close(packed[b, start:stop], alone, atol=1e-5, rtol=0)
                pieces += 1
    assert pieces > 8  # several rows hold more than one document


def test_off_is_the_stream_as_stored(shards: TokenShards) -> None:
    stream = np.concatenate(shards.shards).astype(np.int64)
    first = all_batches(shards, "off")[0]
    assert torch.equal(first.input_ids[0], torch.from_numpy(stream[:T])) and first.position_ids is None


def test_a_split_without_document_boundaries_refuses_document_modes(shards: TokenShards) -> None:
    index = {**shards.index, "doc_starts": False}
    legacy = TokenShards(shards.path, index, shards.shards)  # a split prepared before boundaries were recorded
    assert document_mode(legacy, "auto") == "off"
    with pytest.raises(DataError, match=r"no document boundaries.*prepare it again"):
        document_mode(legacy, "isolated")


# ---------------------------------------------------------------------------------------------------------------------
# Mixtures


def test_mixture_matches_the_weights_over_every_span() -> None:
    mixture = Mixture([0.6, 0.1, 0.3])
    source, ordinal = mixture.assign(np.arange(3 * PERIOD + 123))
    counts = np.zeros((len(source) + 1, 3))
    counts[1:] = np.cumsum(np.eye(3)[source], axis=0)
    for span in (1, 2, 5, 10, 64, 1000, 4096, PERIOD + 7):
        deviation = np.abs(counts[span:] - counts[:-span] - span * mixture.weights).max()
        assert deviation <= 2.0, (span, deviation)  # within two windows of the weights, whatever the span
    for s in range(3):  # a slot's ordinal counts the earlier slots of its source
        assert np.array_equal(ordinal[source == s], np.arange((source == s).sum()))
    assert np.array_equal(mixture.consumed(len(source)), counts[-1])
    with pytest.raises(ValueError, match="positive"):
        Mixture([0.5, 0.0])


def make_sources(tmp_path: Path) -> list[Source]:
    small = write(tmp_path / "small", documents(12, seed=1), shard_tokens=200)  # runs out first: several epochs
    large = write(tmp_path / "large", documents(90, seed=2), shard_tokens=700)
    return [Source("web", large, 0.75), Source("code", small, 0.25)]


def test_mixture_loader_reads_each_source_in_its_share_and_logs_new_epochs(tmp_path: Path, caplog) -> None:
    sources = make_sources(tmp_path)
    loader = TokenWindowLoader(sources, seq_len=T, micro_batch_size=4, world_size=1, documents="off")
    n = [w.count for w in loader.windows]
    with caplog.at_level(logging.INFO, logger="minima"):
        batches = [next(loader) for _ in range(100)]
    consumed = loader.consumed()
    assert consumed["web"]["windows"] + consumed["code"]["windows"] == 400
    assert (
        abs(consumed["code"]["windows"] - 100) <= 1 and consumed["code"]["tokens"] == 16 * consumed["code"]["windows"]
    )
    assert consumed["code"]["epoch"] == consumed["code"]["windows"] // n[1] >= 2  # the small source ran out, twice
    assert f"data: code starts epoch {consumed['code']['epoch']} in a new seeded order" in caplog.text
    # the documented sequence: slot g -> (source s, ordinal k) -> permute(k mod n_s, n_s, key(seed, s, k div n_s))
    source, ordinal = loader.mixture.assign(np.arange(400))
    for g in (0, 1, 2, 3, 57, 123, 399):
        s, k = int(source[g]), int(ordinal[g])
        window = permute(np.array([k % n[s]]), n[s], window_key(0, sources[s].name, k // n[s]))
        expected = loader.windows[s].batch(window).input_ids[0]
        assert torch.equal(batches[g // 4].input_ids[g % 4], expected)


@pytest.mark.parametrize(("position", "world_size", "micro"), [(0, 2, 3), (37, 3, 2), (250, 1, 5), (401, 4, 1)])
def test_mixture_resumes_anywhere_on_any_layout(tmp_path: Path, position: int, world_size: int, micro: int) -> None:
    sources = make_sources(tmp_path)
    reference = TokenWindowLoader(sources, seq_len=T, micro_batch_size=1)
    reference.load_state_dict({**reference.state_dict(), "position": position})
    expected = torch.cat([next(reference).input_ids for _ in range(4 * world_size * micro)])
    ranks = [TokenWindowLoader(sources, seq_len=T, micro_batch_size=micro, rank=r, world_size=world_size)
             for r in range(world_size)]  # fmt: skip
    state = {**ranks[0].state_dict(), "position": position}
    for r in ranks:
        r.load_state_dict(state)
    got = torch.cat([torch.cat([next(r).input_ids for r in ranks]) for _ in range(4)])
    assert torch.equal(got, expected)


def test_mixture_state_names_a_change_of_sources_or_weights(tmp_path: Path) -> None:
    sources = make_sources(tmp_path)
    state = TokenWindowLoader(sources, seq_len=T, micro_batch_size=2).state_dict()
    assert set(state["consumed"]) == {"web", "code"}
    with pytest.raises(DataError, match=r"sources were \['code', 'web'\], these are \['web'\]"):
        TokenWindowLoader(sources[:1], seq_len=T, micro_batch_size=2).load_state_dict(state)
    reweighted = [Source(s.name, s.shards, 0.5) for s in sources]
    with pytest.raises(DataError, match="mixture weights differ"):
        TokenWindowLoader(reweighted, seq_len=T, micro_batch_size=2).load_state_dict(state)


def test_eval_over_sources_reads_the_first_windows_of_each(tmp_path: Path) -> None:
    sources = make_sources(tmp_path)
    limits = [5, 3]
    batches = list(
        eval_batches([s.shards for s in sources], seq_len=T, micro_batch_size=3, max_windows=limits, documents="off")
    )
    rows = [row.tolist() for b in batches for row, lab in zip(b.input_ids, b.labels, strict=True) if lab[-1] >= 0]
    streams = [np.concatenate(s.shards.shards) for s in sources]
    expected = [stream[k * T : k * T + T].tolist() for stream, m in zip(streams, limits, strict=True) for k in range(m)]
    assert len(batches) == 3 and rows == expected
