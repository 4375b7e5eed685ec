"""Chat data preparation (``minima.chat_data``, ``tools/prepare_chat.py``): prepared shards read back through the
training readers give exactly ``render``'s ids and labels, packed conversations never see each other, bad lines are
named by file and line, and the saved tokenizer reproduces the rendering."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from minima.chat import MINICHAT_TEMPLATE, conversation_from_record, render
from minima.chat_data import pack_windows, prepare_chat
from minima.data import TokenWindowLoader, count_windows, eval_batches
from minima.prepare import split_documents
from minima.shards import FLAG_LABEL, FLAG_START, IGNORE_INDEX, DataError, TokenShards
from tests.runs import REPO, tool_main

SEQ = 128
SHARD_WINDOWS = 3  # shard_tokens = 3 * SEQ + 50: three windows per shard
SYSTEM = "You answer questions about Python's standard library."
FACTS = [
    ("bisect.insort", "It inserts an item into a sorted list and keeps it sorted."),
    ("heapq.heappop", "It pops the smallest item off the heap."),
    ("copy.deepcopy", "It copies an object and, recursively, everything it holds."),
    ("textwrap.dedent", "It removes common leading whitespace from every line."),
    ("glob.glob", "It returns the paths that match a shell pattern."),
    ("shlex.split", "It splits a string like a shell would."),
    ("colorsys.rgb_to_hsv", "It converts a colour from RGB to HSV."),
    ("queue.Queue.get", "It removes and returns an item, waiting for one if needed."),
]


def record(i: int) -> dict | list:
    """Conversation ``i`` in one of the three record shapes (by ``i % 3``); every 7th is long (truncated at SEQ)."""
    name, what = FACTS[i % len(FACTS)]
    reply = what if i % 7 != 3 else " ".join([what] * 8)
    turns = [(f"What does {name} do? ({i})", reply)]
    if i % 4 == 1:
        turns.append(("And in one word?", "Useful."))
    if i % 3 == 0:
        messages = [{"role": "system", "content": SYSTEM}] if i % 2 == 0 else []
        for user, assistant in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return {"id": i, "messages": messages}
    if i % 3 == 1:
        conversations = [{"from": "system", "value": SYSTEM}]
        for user, assistant in turns:
            conversations += [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]
        return {"conversations": conversations}
    return [{"User": user, "Assistant": assistant} for user, assistant in turns]


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = newline.join(lines).encode() + newline.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture(scope="module")
def chat_inputs(tmp_path_factory) -> tuple[Path, list]:
    """A directory of JSON-lines files (one compressed, one with CRLF line ends, one empty; blank lines between
    records) and the records in the order prepare reads them (files sorted by path)."""
    root = tmp_path_factory.mktemp("chat_inputs")
    records = [record(i) for i in range(36)]
    a, c, b = records[:14], records[14:24], records[24:]
    write_lines(root / "a.jsonl", ["", *(json.dumps(r) if k % 5 else json.dumps(r) + "\n" for k, r in enumerate(a))])
    write_lines(root / "c.json", [json.dumps(r) for r in c], newline="\r\n")
    write_lines(root / "sub" / "b.jsonl.gz", [json.dumps(r) for r in b])
    (root / ".hidden.jsonl").write_text("not json\n")  # skipped: a dot-file
    (root / "b_empty.jsonl").write_bytes(b"")
    return root, records


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def prepared(chat_inputs, tiny_tokenizer_dir: Path, tmp_path_factory, datasets_cache: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("chat_prepared")
    summary = prepare_chat(
        [chat_inputs[0]], tiny_tokenizer_dir, out, seq_len=SEQ, valid_fraction=0.25, shard_tokens=3 * SEQ + 50
    )
    return out, summary


def rendered(tok, records: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """render()'s (input_ids, labels) of each record, shortened to SEQ tokens where longer."""
    out = []
    for i, r in enumerate(records):
        messages = conversation_from_record(r, where=f"record {i}")
        ids, labels = render(messages, tok)
        out.append(render(messages, tok, max_tokens=SEQ) if len(ids) > SEQ else (ids, labels))
    return out


def split_of(records: list, name: str, valid_fraction: float = 0.25, seed: int = 0) -> list:
    is_valid = split_documents(len(records), valid_fraction, seed)
    return [r for r, v in zip(records, is_valid, strict=True) if v == (name == "valid")]


def all_windows(split: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, SEQ) input_ids, labels and position_ids of every window of ``split``, in file order."""
    num_windows = count_windows(TokenShards.open(split), SEQ)
    batches = list(eval_batches(split, seq_len=SEQ, micro_batch_size=4))
    keys = ("input_ids", "labels", "position_ids")
    return tuple(torch.cat([getattr(b, key) for b in batches])[:num_windows] for key in keys)


def sequence_runs(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) of each sequence of one window (its position ids restart at 0)."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return list(zip(starts, [*starts[1:], len(position_ids)], strict=True))


def unpack(
    split: Path, expected: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int, pack: bool = True
) -> list[list[tuple[int, int]]]:
    """Check the windows of ``split`` hold ``expected`` in order, next-fit packed (or one per window), the rest of each
    window padding; return the (start, stop) of the conversations in each window."""
    input_ids, labels, position_ids = all_windows(split)
    placed, k = [], 0
    for w in range(len(input_ids)):
        runs = sequence_runs(position_ids[w])
        assert runs[0][0] == 0
        here = []
        for start, stop in runs:
            assert (position_ids[w, start:stop] == torch.arange(stop - start)).all()
            if (
                k < len(expected)
                and (pack or not here)
                and input_ids[w, start:stop].tolist() == expected[k][0].tolist()
            ):
                assert labels[w, start:stop].tolist() == expected[k][1].tolist()
                here.append((start, stop))
                k += 1
                continue
            # padding to the end of the window, never labelled; the next conversation did not fit in it
            assert stop == SEQ and here, (w, start, stop)
            assert (input_ids[w, start:] == pad_id).all() and (labels[w, start:] == IGNORE_INDEX).all()
            assert k == len(expected) or not pack or len(expected[k][0]) > SEQ - start
        placed.append(here)
    assert k == len(expected)
    return placed


# ---------------------------------------------------------------------------------------------------------------------
# Layout and read-back


def test_readers_give_render_ids_and_labels_in_place(prepared, chat_inputs, tok) -> None:
    out, summary = prepared
    _, records = chat_inputs
    for name in ("train", "valid"):
        expected = rendered(tok, split_of(records, name))
        placed = unpack(out / name, expected, tok.pad_token_id)
        assert sum(map(len, placed)) == len(expected) == summary[name]["conversations"]
        assert len(placed) == summary[name]["windows"]
        assert max(map(len, placed)) >= 2  # packing happened
        assert summary[name]["tokens"] == sum(len(ids) for ids, _ in expected)
        assert summary[name]["label_tokens"] == sum(int((labels != IGNORE_INDEX).sum()) for _, labels in expected)
        index = json.loads((out / name / "index.json").read_text())
        assert index["packed_seq_len"] == SEQ and index["flags"] is True
        assert index["chat"] == {
            "template": "minichat",
            "pack": True,
            "conversations": len(expected),
            "tokens": summary[name]["tokens"],
            "label_tokens": summary[name]["label_tokens"],
            "truncated": summary[name]["truncated"],
            "windows": len(placed),
            "skipped_lines": 0,
        }
    assert summary["skipped_lines"] == 0 and summary["files"] == 4
    assert summary["lines"] == len(records) + 1 + 3  # a leading blank line, and one after every 5th record of a.jsonl
    with pytest.raises(DataError, match=f"packed into windows of {SEQ} tokens"):
        TokenWindowLoader(out / "train", seq_len=SEQ // 2, micro_batch_size=1)


def test_shards_are_whole_windows_plus_one_padding_token(prepared, tok) -> None:
    out, summary = prepared
    for name in ("train", "valid"):
        shards = TokenShards.open(out / name, verify_checksums=True)
        windows = summary[name]["windows"]
        sizes = [len(s) for s in shards.shards]
        assert sizes == [SHARD_WINDOWS * SEQ + 1] * (len(sizes) - 1) + [(windows - 1) % SHARD_WINDOWS * SEQ + SEQ + 1]
        assert count_windows(shards, SEQ) == windows
        for tokens, flags in zip(shards.shards, shards.flags, strict=True):
            assert tokens[-1] == tok.pad_token_id and flags[-1] == 0
            starts = np.arange(0, len(tokens) - 1, SEQ)
            assert (flags[starts] & FLAG_START).all()  # every window begins a conversation
            # the last position of every window (its target: the next window's first token) is never a label
            assert not (flags[starts + SEQ - 1] & FLAG_LABEL).any()


def test_pack_windows_is_next_fit() -> None:
    assert pack_windows([5, 3, 2, 4, 6, 10, 1], 10).tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert pack_windows([5, 3, 2], 10, pack=False).tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="conversation 1 has 11 tokens"):
        pack_windows([1, 11], 10)


# ---------------------------------------------------------------------------------------------------------------------
# Packing never lets a conversation see another


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_conversation_alone(prepared, chat_inputs, tok, attn: str) -> None:
    out, _ = prepared
    expected = rendered(tok, split_of(chat_inputs[1], "train"))
    placed = unpack(out / "train", expected, tok.pad_token_id)
    input_ids, _, position_ids = all_windows(out / "train")
    rows = [w for w, here in enumerate(placed) if len(here) >= 2][:3]
    assert rows
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)  # fmt: skip
    config._attn_implementation = attn
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == attn
    # use_cache=False as minima.models calls it: transformers only builds packed-sequence masks from position_ids
    # when there is no cache (an eval-mode forward would otherwise create one and attend across conversations).
    with torch.no_grad():
        packed = model(input_ids=input_ids[rows], position_ids=position_ids[rows], use_cache=False).logits
        unmasked = model(input_ids=input_ids[rows], use_cache=False).logits
        for b, w in enumerate(rows):
            for start, stop in placed[w]:
                alone = model(input_ids=input_ids[w, start:stop][None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[b, start:stop], alone, atol=1e-5, rtol=0)
            start, stop = placed[w][1]
            assert not torch.allclose(unmasked[b, start:stop], packed[b, start:stop], atol=1e-3)  # the test can fail


def _flash_ready() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return torch.cuda.is_available() and is_flash_attn_2_available()


@pytest.mark.parametrize(
    "attn",
    [
        "sdpa",
        pytest.param(
            "flash_attention_2",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not _flash_ready(), reason="needs a CUDA GPU and flash-attn")],
        ),
    ],
)
def test_training_forward_keeps_packed_conversations_apart(prepared, chat_inputs, tok, attn: str) -> None:
    """The path the step runs (minima.models.last_hidden with the batch's position ids): each conversation's hidden
    states in a packed micro-batch of several rows equal those of the conversation alone. Under flash_attention_2 the
    rows are laid end to end for the varlen kernel; in bf16 on the GPU, to bf16 rounding."""
    from minima.models import last_hidden

    out, _ = prepared
    expected = rendered(tok, split_of(chat_inputs[1], "train"))
    placed = unpack(out / "train", expected, tok.pad_token_id)
    input_ids, _, position_ids = all_windows(out / "train")
    rows = [w for w, here in enumerate(placed) if len(here) >= 2][:3]
    assert len(rows) >= 2
    device, dtype, atol = (
        ("cuda", torch.bfloat16, 3e-2) if attn == "flash_attention_2" else ("cpu", torch.float32, 1e-5)
    )
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)  # fmt: skip
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype).to(device).eval()
    with torch.no_grad():
        packed = last_hidden(model, input_ids[rows].to(device), position_ids[rows].to(device)).float()
        for b, w in enumerate(rows):
            for start, stop in placed[w]:
                alone = last_hidden(model, input_ids[w, start:stop][None].to(device))[0].float()
                torch.testing.assert_close(packed[b, start:stop], alone, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad lines, truncation, no packing


def bad_file(tmp_path: Path) -> tuple[Path, list]:
    """Lines: 1 good, 2-3 blank, 4 bad JSON, 5 good, 6 blank, 7 a bad role (CRLF line ends), 8 good, 9 good."""
    good = [record(i) for i in (0, 1, 2, 4)]
    bad_role = {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}]}
    lines = [json.dumps(good[0]), "", "  ", '{"messages": [', json.dumps(good[1]), "", json.dumps(bad_role)]
    lines += [json.dumps(good[2]), json.dumps(good[3])]
    return write_lines(tmp_path / "bad.jsonl", lines, newline="\r\n"), good


def test_bad_lines_name_file_and_line(tmp_path: Path, tiny_tokenizer_dir: Path, tok, datasets_cache, caplog) -> None:
    path, good = bad_file(tmp_path)
    with pytest.raises(DataError, match=rf"{path}:4: invalid JSON .*; pass --skip-bad-lines to skip and count"):
        prepare_chat([path], tiny_tokenizer_dir, tmp_path / "out", seq_len=SEQ)
    lines = path.read_text().splitlines()
    no_json_error = write_lines(tmp_path / "role.jsonl", [*lines[:3], "", *lines[4:]])  # line 4 blank instead
    with pytest.raises(DataError, match=rf"{no_json_error}:7: messages\[1\] has the unknown role 'tool'"):
        prepare_chat([no_json_error], tiny_tokenizer_dir, tmp_path / "out", seq_len=SEQ)

    summary = prepare_chat([path], tiny_tokenizer_dir, tmp_path / "out", seq_len=SEQ, skip_bad_lines=True)
    assert summary["skipped_lines"] == 2 and summary["lines"] == 9
    assert [reason.split(": ")[0] for reason in summary["skipped"]] == [f"{path}:4", f"{path}:7"]
    assert "unknown role 'tool'" in summary["skipped"][1]
    assert f"{path}:7" in caplog.text
    assert summary["train"]["conversations"] + summary["valid"]["conversations"] == len(good)
    assert json.loads((tmp_path / "out" / "valid" / "index.json").read_text())["chat"]["skipped_lines"] == 2
    for name in ("train", "valid"):
        unpack(tmp_path / "out" / name, rendered(tok, split_of(good, name, 0.02)), tok.pad_token_id)


def test_errors_of_the_setup(tmp_path: Path, tiny_tokenizer_dir: Path, chat_inputs, datasets_cache) -> None:
    one = write_lines(tmp_path / "one.jsonl", [json.dumps(record(0))])
    with pytest.raises(DataError, match=r"the valid split would hold no conversation .* raise --valid-fraction"):
        prepare_chat([one], tiny_tokenizer_dir, tmp_path / "out", seq_len=SEQ)
    with pytest.raises(DataError, match=rf"tokenizer {tiny_tokenizer_dir} has no chat template of its own"):
        prepare_chat([one], tiny_tokenizer_dir, tmp_path / "out", seq_len=SEQ, template="tokenizer")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(DataError, match=r"notes\.txt is not a \.jsonl/\.json file"):
        prepare_chat([text], tiny_tokenizer_dir, tmp_path / "out", seq_len=SEQ)


def test_truncation_is_counted_and_keeps_the_end_of_turn_label(prepared, chat_inputs, tok) -> None:
    out, summary = prepared
    total = 0
    for name in ("train", "valid"):
        split = split_of(chat_inputs[1], name)
        long = [len(render(conversation_from_record(r, where="x"), tok)[0]) > SEQ for r in split]
        assert summary[name]["truncated"] == sum(long)
        total += sum(long)
        # in place, a truncated conversation ends with its reply's </s>, labelled at the second-to-last position
        placed = [run for here in unpack(out / name, rendered(tok, split), tok.pad_token_id) for run in here]
        rows = [w for w, here in enumerate(unpack(out / name, rendered(tok, split), tok.pad_token_id)) for _ in here]
        input_ids, labels, _ = all_windows(out / name)
        for w, (start, stop), is_long in zip(rows, placed, long, strict=True):
            if is_long:
                assert stop - start <= SEQ
                assert input_ids[w, stop - 1] == tok.eos_token_id and labels[w, stop - 2] == tok.eos_token_id
                assert labels[w, stop - 1] == IGNORE_INDEX
    assert total == 5  # records 3, 10, 17, 24 and 31


def test_no_packing_puts_one_conversation_per_window(chat_inputs, tiny_tokenizer_dir, tok, tmp_path, datasets_cache):
    root, records = chat_inputs
    copy = shutil.copytree(root, tmp_path / "inputs")  # new files: rendered afresh (not from the cache), in 2 processes
    summary = prepare_chat(
        [copy], tiny_tokenizer_dir, tmp_path, seq_len=SEQ, valid_fraction=0.25, pack=False, num_proc=2
    )
    for name in ("train", "valid"):
        expected = rendered(tok, split_of(records, name))
        placed = unpack(tmp_path / name, expected, tok.pad_token_id, pack=False)
        assert [len(here) for here in placed] == [1] * len(expected)
        assert summary[name]["windows"] == summary[name]["conversations"] == len(expected)
    assert json.loads((tmp_path / "train" / "index.json").read_text())["chat"]["pack"] is False


# ---------------------------------------------------------------------------------------------------------------------
# The saved tokenizer, resuming, the CLI


def test_saved_tokenizer_reproduces_the_rendering(prepared, chat_inputs, tok) -> None:
    out, summary = prepared
    saved = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert saved.chat_template == MINICHAT_TEMPLATE and saved.model_max_length == SEQ
    assert saved.get_vocab() == tok.get_vocab()
    assert summary["tokenizer"]["path"] == str(out / "tokenizer")
    for r in chat_inputs[1][:6]:
        messages = conversation_from_record(r, where="x")
        encoded = saved.apply_chat_template(messages, tokenize=True)  # a BatchEncoding in transformers 5
        assert encoded["input_ids"] == render(messages, tok)[0].tolist()


def test_loader_resumes_mid_epoch_on_chat_shards(prepared) -> None:
    out, _ = prepared

    def loader() -> TokenWindowLoader:
        return TokenWindowLoader(out / "train", seq_len=SEQ, micro_batch_size=2, seed=5)

    reference = loader()
    steps = reference.windows_per_epoch // 2 + 3  # across an epoch boundary
    expected = [next(reference) for _ in range(steps)]
    first = loader()
    for _ in range(4):
        next(first)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    for want in expected[4:]:
        got = next(resumed)
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(getattr(got, key), getattr(want, key)), key


def test_cli(chat_inputs, tiny_tokenizer_dir: Path, tmp_path: Path, datasets_cache: Path, capsys, monkeypatch) -> None:
    root, _ = chat_inputs
    env = {**os.environ, "HF_DATASETS_CACHE": str(datasets_cache), "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/prepare_chat.py", "--input", str(root / "a.jsonl"), "--input", str(root / "sub"),
           "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out), "--seq-len", str(SEQ), "--valid-fraction", "0.25",
           "--no-pack", "--shard-tokens", "1000"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["train"]["conversations"] + summary["valid"]["conversations"] == 14 + 12
    assert summary["train"]["windows"] == summary["train"]["conversations"] and summary["pack"] is False
    assert TokenShards.open(out / "train").packed_seq_len == SEQ
    path, _ = bad_file(tmp_path)
    args = ["--input", str(path), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "o2")]
    monkeypatch.setenv("HF_DATASETS_CACHE", str(datasets_cache))
    assert tool_main("prepare_chat")([*args, "--seq-len", str(SEQ)]) == 2  # in this process: no second interpreter
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {path}:4: invalid JSON") and "--skip-bad-lines" in error
