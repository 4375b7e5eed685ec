"""Conversations to tokens and labels (``minima.chat``): record shapes, templates, label positions, truncation and the
exported tokenizer's ``apply_chat_template``, on the tiny sentencepiece tokenizer and tokenizers built from it."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from minima.chat import (
    ASSISTANT_MARKER,
    MINICHAT_TEMPLATE,
    USER_MARKER,
    ChatFormatError,
    conversation_from_record,
    render,
    set_chat_template,
)
from minima.shards import IGNORE_INDEX

SYSTEM = "You are a helpful assistant for Python's standard library."
EXCHANGES = [
    ("What does `textwrap.dedent` do?", "It removes any common leading whitespace from every line of a text."),
    ("And heapq.heappush(heap, item)?", "It pushes item onto heap, keeping the heap invariant: heap[0] is the least."),
    ("Say it in French, naïvely ☃", "Il ajoute item au tas ; le plus petit reste en tête. 日本語 😀"),
]
# ChatML, on the tiny tokenizer with <|im_start|> and <|im_end|> added as special tokens.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def conversation(exchanges=EXCHANGES, system: str | None = SYSTEM) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, reply in exchanges:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def labelled_text(tok, labels: torch.Tensor) -> str:
    return tok.decode(labels[labels != IGNORE_INDEX])


def label_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) of each run of positions that carry a label."""
    runs, start = [], None
    for t, has_label in enumerate([*(labels != IGNORE_INDEX).tolist(), False]):
        if has_label and start is None:
            start = t
        elif not has_label and start is not None:
            runs.append((start, t))
            start = None
    return runs


def minichat_by_pieces(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """MiniChat's rendering built by tokenising each piece on its own (MiniMA's preparation does the same), and the
    labels on each reply's pieces, shifted: the reference that one whole-text tokenisation must equal."""

    def text(piece: str) -> list[int]:
        return tok(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    ids, target = [], []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            pieces = [(text(content), False), ([tok.eos_token_id], False)]
        elif role == "user":
            pieces = [(text(USER_MARKER), False), (text(" " + content), False), ([tok.eos_token_id], False)]
        else:
            pieces = [(text(ASSISTANT_MARKER), False), (text(" " + content), True), ([tok.eos_token_id], True)]
        for piece_ids, is_target in pieces:
            ids += piece_ids
            target += [is_target] * len(piece_ids)
    labels = [ids[t + 1] if target[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return ids, labels


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _chatml_dir(tiny_tokenizer_dir: Path, out: Path, eos_token: str) -> Path:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = eos_token
    tok.split_special_tokens = False  # as chat tokenizers are: the template's <|im_end|> must be one token
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chatml_dir(tiny_tokenizer_dir: Path, tmp_path_factory) -> Path:
    """The tiny tokenizer with a ChatML template of its own and ``eos_token="<|im_end|>"`` (as Qwen's chat models)."""
    return _chatml_dir(tiny_tokenizer_dir, tmp_path_factory.mktemp("chatml"), "<|im_end|>")


@pytest.fixture(scope="module")
def chatml(chatml_dir: Path):
    return AutoTokenizer.from_pretrained(chatml_dir)


@pytest.fixture(scope="module")
def llama_style_dir(stdlib_files: list[Path], tmp_path_factory) -> Path:
    """A sentencepiece BPE with Llama's dummy prefix, loaded as transformers' LlamaTokenizer (Llama-2's kind)."""
    lines = [line for f in stdlib_files for line in f.read_text(encoding="utf-8").split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=1024, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("llama_style")
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def byte_level_dir(stdlib_files: list[Path], tmp_path_factory) -> Path:
    """A byte-level BPE with GPT-2's pre-tokenizer (Llama-3's and Qwen's kind), EOS ``<|endoftext|>``."""
    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([f.read_text(encoding="utf-8") for f in stdlib_files], trainer)
    out = tmp_path_factory.mktemp("byte_level")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Records


RECORD_SHAPES = {
    "messages": {
        "id": 7,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye", "name": "ignored"},
            {"role": "assistant", "content": "See you."},
        ],
    },
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!", "weight": None},
            {"from": "Human", "value": "Bye"},
            {"from": "chatgpt", "value": "See you."},
        ],
        "messages": None,  # datasets gives a row every key of the file's schema
    },
    "minima_turns": [{"User": "Hi", "Assistant": "Hello!"}, {"User": "Bye", "Assistant": "See you."}],
}
EXPECTED_MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


@pytest.mark.parametrize("shape", RECORD_SHAPES)
def test_record_shapes(shape: str) -> None:
    messages = conversation_from_record(RECORD_SHAPES[shape], where="chat.jsonl:1")
    system = [] if shape == "minima_turns" else [{"role": "system", "content": "Be brief."}]
    assert messages == system + EXPECTED_MESSAGES


def test_record_single_minima_turn_and_blank_system() -> None:
    assert conversation_from_record({"User": "Hi", "Assistant": "Hello!"}, where="x") == EXPECTED_MESSAGES[:2]
    record = {"messages": [{"role": "system", "content": "  "}, *EXPECTED_MESSAGES]}
    assert conversation_from_record(record, where="x") == EXPECTED_MESSAGES  # a blank system prompt is dropped


def _messages(*pairs) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


MALFORMED = [
    ({"text": "hello"}, "no conversation in a record with keys ['text']"),
    ("just a string", "a record must be a JSON object or a list of turns, got str"),
    ({"messages": []}, "empty conversation"),
    ({"messages": "Hi"}, "'messages' must be a list of messages, got str"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be an object with 'role' and 'content'"),
    (_messages(("user", "Hi"), ("tool", "42")), "messages[1] has the unknown role 'tool'"),
    ({"conversations": [{"from": "observation", "value": "x"}]}, "conversations[0] has the unknown from 'observation'"),
    (_messages(("user", [{"type": "text", "text": "Hi"}])), "messages[0] (user) has non-string content of type list"),
    (_messages(("user", "Hi"), ("user", "Again"), ("assistant", "Yes")), "messages[1]: two user messages in a row"),
    (_messages(("user", "Hi"), ("assistant", "A"), ("assistant", "B")), "messages[2]: two assistant messages in a row"),
    (_messages(("assistant", "Hello"), ("user", "Hi")), "messages[0]: the conversation starts with an assistant"),
    (_messages(("user", "Hi")), "ends with a user message (messages[0]) that has no assistant reply"),
    (_messages(("user", "Hi"), ("assistant", "A"), ("user", "B")), "ends with a user message (messages[2])"),
    (_messages(("system", "S")), "only a system prompt"),
    (_messages(("user", "Hi"), ("system", "S"), ("assistant", "A")), "messages[1] is a system prompt after the first"),
    (_messages(("user", "Hi"), ("assistant", " \n")), "messages[1] (assistant) has blank content"),
    ({"messages": [{"role": "user", "content": "x"}], "conversations": []}, "both 'messages' and 'conversations'"),
    ([{"User": "Hi", "Assistant": "A"}, {"User": "B"}], "[1].Assistant is missing"),
    ([{"User": "Hi", "Assistant": "A"}, "B"], "turn [1] must be an object with 'User' and 'Assistant'"),
    ([], "empty conversation"),
    ({"User": "Hi", "Assistant": 3}, "Assistant (assistant) has non-string content of type int"),
]


@pytest.mark.parametrize(("record", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_records_name_the_line(record, message: str) -> None:
    with pytest.raises(ChatFormatError) as error:
        conversation_from_record(record, where="data/chat.jsonl:17")
    assert str(error.value).startswith("data/chat.jsonl:17: ")
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)


def test_render_checks_the_conversation(tok) -> None:
    with pytest.raises(ChatFormatError, match="ends with a user message"):
        render(conversation()[:-1], tok)
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        render(conversation(), tok, template="chatml")
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        render(conversation(), tok, max_tokens=0)


# ---------------------------------------------------------------------------------------------------------------------
# The minichat template


@pytest.mark.parametrize(
    "messages",
    [conversation(), conversation(system=None), conversation(EXCHANGES[:1]), conversation(EXCHANGES[:1], system=None)],
    ids=["system-3-turns", "no-system-3-turns", "system-1-turn", "no-system-1-turn"],
)
def test_minichat_rendering_and_labels(tok, messages: list[dict]) -> None:
    input_ids, labels = render(messages, tok)
    assert input_ids.dtype == labels.dtype == torch.int64
    assert input_ids.shape == labels.shape and input_ids.ndim == 1
    # The text, exactly: MiniChat's format with the tokenizer's </s>, nothing before the first turn without a system.
    expected = "".join(
        {"system": "{}</s>", "user": "[|User|] {}</s>", "assistant": "[|Assistant|] {}</s>"}[m["role"]].format(
            m["content"]
        )
        for m in messages
    )
    assert tok.decode(input_ids) == expected
    # One tokenisation of the whole text equals the pieces tokenised apart: no merge across a marker or </s>; and the
    # labels sit exactly on each reply's pieces and its </s>, shifted by one (minima.data.Batch's convention).
    reference_ids, reference_labels = minichat_by_pieces(tok, messages)
    assert input_ids.tolist() == reference_ids
    assert labels.tolist() == reference_labels
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = label_runs(labels)
    assert [tok.decode(input_ids[start + 1 : stop + 1]) for start, stop in runs] == [f" {r}</s>" for r in replies]
    assert labelled_text(tok, labels) == "".join(f" {r}</s>" for r in replies)
    for start, stop in runs:
        assert (labels[start:stop] == input_ids[start + 1 : stop + 1]).all()
        # the position that predicts the reply's first token is the marker's last token, and the marker itself (the
        # position before it predicts it) carries no label
        marker = tok(ASSISTANT_MARKER, add_special_tokens=False)["input_ids"]
        assert input_ids[start + 1 - len(marker) : start + 1].tolist() == marker
        assert labels[start - len(marker) : start].eq(IGNORE_INDEX).all()
        assert input_ids[stop] == tok.eos_token_id  # the last label of a run is the reply's </s>
    assert labels[-1] == IGNORE_INDEX
    # the system prompt and user messages never carry a label
    assert tok.eos_token_id not in labels[: runs[0][0]].tolist()


def test_markers_tokenise_the_same_everywhere(tok) -> None:
    input_ids, _ = render(conversation(), tok)
    ids = input_ids.tolist()
    for marker, count in ((USER_MARKER, 3), (ASSISTANT_MARKER, 3)):
        alone = tok(marker, add_special_tokens=False)["input_ids"]
        found = [t for t in range(len(ids)) if ids[t : t + len(alone)] == alone]
        assert len(found) == count
    # the vocabulary has no such tokens: they are text, and nothing was added to the tokenizer
    assert USER_MARKER not in tok.get_vocab() and len(tok) == 1024


def test_special_token_strings_in_content_follow_apply_chat_template(tok, tmp_path: Path) -> None:
    messages = conversation([("Is '</s>' special?", "In HTML <s>x</s> strikes x through.")])
    input_ids, labels = render(messages, tok)
    exported = tmp_path / "export"
    copy = AutoTokenizer.from_pretrained(tok.name_or_path)
    set_chat_template(copy)
    copy.save_pretrained(exported)
    assert AutoTokenizer.from_pretrained(exported).apply_chat_template(messages)["input_ids"] == input_ids.tolist()
    # encoded as those tokens, as HF's apply_chat_template does; the labels still cover the whole reply
    assert input_ids.tolist().count(tok.eos_token_id) == 2 + 2 + 1
    assert labelled_text(tok, labels) == " In HTML <s>x</s> strikes x through.</s>"


def test_docstring_example(tok) -> None:
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    messages = conversation_from_record(record, where="chat.jsonl:1")
    input_ids, labels = render(messages, tok)
    assert tok.decode(input_ids) == "[|User|] Hi</s>[|Assistant|] Hello!</s>"
    assert tok.decode(labels[labels != IGNORE_INDEX]) == " Hello!</s>"


# Leading and trailing spaces and newlines next to the markers, the cases where tokenizers differ most.
WHITESPACE_EXCHANGE = ("  indented\n", "\n\nstarts with blank lines\n  ")


@pytest.mark.parametrize("kind", ["minima", "llama_style", "byte_level"])
def test_minichat_exports_for_each_tokenizer_kind(kind: str, request, tmp_path: Path) -> None:
    """minima's sentencepiece, a dummy-prefix one (Llama-2's kind, MiniChat's own) and a byte-level BPE (Llama-3's
    kind) render, label and export alike: apply_chat_template on the exported tokenizer gives render's ids, and
    each generation prompt is the start of them."""
    source = request.getfixturevalue({"minima": "tiny_tokenizer_dir"}.get(kind, f"{kind}_dir"))
    tok = AutoTokenizer.from_pretrained(source)
    messages = conversation([*EXCHANGES, WHITESPACE_EXCHANGE])
    input_ids, labels = render(messages, tok)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = label_runs(labels)
    assert len(runs) == len(replies)
    for (start, stop), reply in zip(runs, replies, strict=True):
        # decoding from the start keeps the reply's leading space (a dummy-prefix decoder drops a leading one)
        before, upto = tok.decode(input_ids[: start + 1]), tok.decode(input_ids[: stop + 1])
        assert before.endswith(ASSISTANT_MARKER) and upto == before + f" {reply}{tok.eos_token}"
    set_chat_template(tok)
    tok.save_pretrained(tmp_path)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    assert exported.apply_chat_template(messages)["input_ids"] == input_ids.tolist()
    for i, (start, _) in enumerate(runs):
        prompt = exported.apply_chat_template(messages[: 2 * i + 2], add_generation_prompt=True)["input_ids"]
        assert prompt == input_ids[: start + 1].tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Export: the tokenizer carries the template, apply_chat_template reproduces render


@pytest.fixture(scope="module")
def exported(tiny_tokenizer_dir: Path, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    set_chat_template(tok, "minichat")
    out = tmp_path_factory.mktemp("export")
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("system", [SYSTEM, None], ids=["system", "no-system"])
@pytest.mark.parametrize("turns", [1, 3])
def test_exported_tokenizer_reproduces_render(tok, exported: Path, system, turns: int) -> None:
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["split_special_tokens"] is False
    loaded = AutoTokenizer.from_pretrained(exported)
    assert loaded.chat_template == MINICHAT_TEMPLATE
    messages = conversation(EXCHANGES[:turns], system=system)
    input_ids, labels = render(messages, tok)
    assert loaded.apply_chat_template(messages)["input_ids"] == input_ids.tolist()
    assert render(messages, loaded, template="tokenizer")[0].tolist() == input_ids.tolist()
    # the prompt of each reply (history + [|Assistant|]) is the start of the training rendering, and the reply's
    # first token is the first label after it
    runs = label_runs(labels)
    for i, (start, _) in enumerate(runs):
        prompt = loaded.apply_chat_template(messages[: 2 * i + 1 + (system is not None)], add_generation_prompt=True)
        prompt_ids = prompt["input_ids"]
        assert loaded.decode(prompt_ids).endswith("</s>[|Assistant|]")
        assert prompt_ids == input_ids[: len(prompt_ids)].tolist()
        assert len(prompt_ids) == start + 1
    # the template's {% generation %} block marks the tokens render labels
    masks = loaded.apply_chat_template(messages, return_assistant_tokens_mask=True)["assistant_masks"]
    assert [t for t, m in enumerate(masks) if m] == [t + 1 for t in (labels != IGNORE_INDEX).nonzero().flatten()]


def test_set_chat_template_tokenizer_needs_one(tok) -> None:
    with pytest.raises(ValueError, match=re.escape(f"tokenizer {tok.name_or_path!r} has no chat template")):
        set_chat_template(tok, "tokenizer")
    with pytest.raises(ValueError, match="has no chat template of its own"):
        render(conversation(), tok, template="tokenizer")


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer's own template


@pytest.mark.parametrize("shape", RECORD_SHAPES)
@pytest.mark.parametrize("template", ["minichat", "tokenizer"])
def test_each_shape_and_template(chatml, shape: str, template: str) -> None:
    messages = conversation_from_record(RECORD_SHAPES[shape], where="chat.jsonl:1")
    input_ids, labels = render(messages, chatml, template=template)
    closing = "<|im_end|>"  # the minichat template ends turns with the tokenizer's EOS token, whichever it is
    space = " " if template == "minichat" else ""
    runs = label_runs(labels)
    assert [chatml.decode(input_ids[a + 1 : b + 1]) for a, b in runs] == [
        f"{space}Hello!{closing}",
        f"{space}See you.{closing}",
    ]
    if template == "tokenizer":
        assert chatml.apply_chat_template(messages)["input_ids"] == input_ids.tolist()


def test_chatml_labels_stop_at_the_eos_token(chatml) -> None:
    messages = conversation()
    input_ids, labels = render(messages, chatml, template="tokenizer")
    assert input_ids.tolist() == chatml.apply_chat_template(messages)["input_ids"]
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert chatml.eos_token_id == im_end
    for (start, stop), (_, reply) in zip(label_runs(labels), EXCHANGES, strict=True):
        assert chatml.decode(input_ids[start + 1 : stop + 1]) == reply + "<|im_end|>"
        assert chatml.decode(input_ids[stop + 1]) == "\n"  # the newline after <|im_end|> is not a target
        assert chatml.decode(input_ids[: start + 1]).endswith("<|im_start|>assistant\n")
    for i in (1, 3, 5):
        prompt = chatml.apply_chat_template(messages[: i + 1], add_generation_prompt=True)["input_ids"]
        assert prompt == input_ids[: len(prompt)].tolist()


def test_chatml_without_eos_in_the_reply_labels_all_it_adds(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(_chatml_dir(tiny_tokenizer_dir, tmp_path, eos_token="</s>"))
    input_ids, labels = render(conversation(EXCHANGES[:2]), tok, template="tokenizer")
    assert [tok.decode(input_ids[a + 1 : b + 1]) for a, b in label_runs(labels)] == [
        f"{reply}<|im_end|>\n" for _, reply in EXCHANGES[:2]
    ]


def test_template_that_is_not_prefix_consistent(tok) -> None:
    copy = AutoTokenizer.from_pretrained(tok.name_or_path)
    # renders the last reply differently from earlier ones (as templates that strip earlier "thinking" do)
    copy.chat_template = (
        "{% for message in messages %}{{ message['role'] + ': ' + message['content'] }}"
        "{% if loop.last %}{{ ' (end)' }}{% endif %}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="is not prefix-consistent"):
        render(conversation(EXCHANGES[:2]), copy, template="tokenizer")


def test_a_merge_across_a_reply_boundary_is_an_error(tok) -> None:
    copy = AutoTokenizer.from_pretrained(tok.name_or_path)
    # no separator between the user's text and the reply: the tiny tokenizer's piece "):" spans both
    copy.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Q(' + message['content'] + ')' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    assert copy.convert_ids_to_tokens(copy("f():", add_special_tokens=False)["input_ids"])[-1] == "):"
    with pytest.raises(ChatFormatError, match=r"the token '\):' .* straddles the reply boundary"):
        render([{"role": "user", "content": "f"}, {"role": "assistant", "content": ": a slice"}], copy, "tokenizer")


# ---------------------------------------------------------------------------------------------------------------------
# Truncation


def assert_well_formed_minichat(tok, input_ids: torch.Tensor, labels: torch.Tensor, system: str | None) -> list[str]:
    """The rendering is a whole minichat conversation (markers intact, every turn ended by </s>), each reply labelled
    with its </s>; returns the replies."""
    text = tok.decode(input_ids)
    head = f"{system}</s>" if system is not None else ""
    assert text.startswith(head)
    turns = re.fullmatch(r"((?:\[\|User\|\] [^\[]*?</s>\[\|Assistant\|\] .*?</s>)+)", text[len(head) :], re.S)
    assert turns, text
    replies = re.findall(r"\[\|Assistant\|\] (.*?)</s>", text, re.S)
    runs = label_runs(labels)
    assert [tok.decode(input_ids[a + 1 : b + 1]) for a, b in runs] == [f" {r}</s>" for r in replies]
    assert input_ids[-1] == tok.eos_token_id and labels[-2] == tok.eos_token_id
    return replies


def test_truncation_keeps_whole_conversations_that_fit(tok) -> None:
    messages = conversation()
    full_ids, full_labels = render(messages, tok)
    ids, labels = render(messages, tok, max_tokens=len(full_ids))
    assert ids.tolist() == full_ids.tolist() and labels.tolist() == full_labels.tolist()


@pytest.mark.parametrize("system", [SYSTEM, None], ids=["system", "no-system"])
def test_truncation_drops_oldest_exchanges_first(tok, system) -> None:
    messages = conversation(system=system)
    last_two = render(conversation(EXCHANGES[1:], system=system), tok)
    last_one = render(conversation(EXCHANGES[2:], system=system), tok)
    full = render(messages, tok)
    for max_tokens in (len(full[0]) - 1, len(last_two[0])):
        ids, labels = render(messages, tok, max_tokens=max_tokens)
        assert ids.tolist() == last_two[0].tolist() and labels.tolist() == last_two[1].tolist()
    ids, labels = render(messages, tok, max_tokens=len(last_two[0]) - 1)
    assert ids.tolist() == last_one[0].tolist() and labels.tolist() == last_one[1].tolist()


def test_truncation_cuts_the_last_reply_and_keeps_its_end_of_turn(tok) -> None:
    messages = conversation()
    last_one, _ = render(conversation(EXCHANGES[2:]), tok)
    ids, labels = render(messages, tok, max_tokens=len(last_one) - 5)
    assert len(ids) <= len(last_one) - 5
    (reply,) = assert_well_formed_minichat(tok, ids, labels, SYSTEM)
    assert EXCHANGES[2][1].startswith(reply) and len(reply) < len(EXCHANGES[2][1])
    # exactly the rendering of the shortened conversation, so an exported tokenizer reproduces it too
    shortened = conversation([(EXCHANGES[2][0], reply)])
    assert render(shortened, tok)[0].tolist() == ids.tolist()


@pytest.mark.parametrize("system", [SYSTEM, None], ids=["system", "no-system"])
def test_truncation_at_every_length(tok, system) -> None:
    """From the shortest length that fits one reply token up to the whole: never a cut marker, never a lost </s>,
    always the most recent exchanges, and never longer than max_tokens."""
    messages = conversation(system=system)
    full = len(render(messages, tok)[0])
    shortest = None
    for max_tokens in range(1, full + 1):
        try:
            ids, labels = render(messages, tok, max_tokens=max_tokens)
        except ChatFormatError as error:
            assert shortest is None, f"max_tokens={max_tokens} failed after {shortest} fitted: {error}"
            assert f"does not fit in max_tokens={max_tokens}" in str(error)
            continue
        shortest = shortest or max_tokens
        assert len(ids) <= max_tokens
        replies = assert_well_formed_minichat(tok, ids, labels, system)
        kept = [reply for _, reply in EXCHANGES[-len(replies) :]]
        assert replies[:-1] == kept[:-1] and kept[-1].startswith(replies[-1])
    assert shortest is not None and shortest < full // 2


def test_truncation_with_the_tokenizer_template(chatml) -> None:
    messages = conversation()
    last_one, _ = render(conversation(EXCHANGES[2:]), chatml, template="tokenizer")
    ids, labels = render(messages, chatml, template="tokenizer", max_tokens=len(last_one) - 4)
    assert len(ids) <= len(last_one) - 4
    ((start, stop),) = label_runs(labels)
    reply = chatml.decode(ids[start + 1 : stop + 1])
    assert reply.endswith("<|im_end|>") and EXCHANGES[2][1].startswith(reply.removesuffix("<|im_end|>"))
    assert ids[stop] == chatml.eos_token_id
    assert chatml.decode(ids).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")


def test_truncation_that_cannot_fit_is_an_error(tok) -> None:
    with pytest.raises(ChatFormatError, match="does not fit in max_tokens=8: the system prompt and the last user"):
        render(conversation(), tok, max_tokens=8)
