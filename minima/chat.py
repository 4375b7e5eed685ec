"""Conversations to tokens and labels: the input shapes, the chat templates, rendering, masking and truncation.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``: an optional system prompt
first, then user and assistant messages alternating, starting with a user message and ending with an assistant reply.
``conversation_from_record`` builds one from the three record shapes of chat data sets; ``render`` turns it into the
token ids and labels that the chat stage trains on::

    >>> from transformers import AutoTokenizer
    >>> from minima.chat import conversation_from_record, render
    >>> from minima.data import IGNORE_INDEX
    >>> tokenizer = AutoTokenizer.from_pretrained("runs/demo/spm")  # the demo's tokenizer; any fast tokenizer
    >>> record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    >>> messages = conversation_from_record(record, where="chat.jsonl:1")
    >>> input_ids, labels = render(messages, tokenizer)   # template="minichat"
    >>> tokenizer.decode(input_ids)                       # the rendering, special tokens kept
    '[|User|] Hi</s>[|Assistant|] Hello!</s>'
    >>> tokenizer.decode(labels[labels != IGNORE_INDEX])   # what the loss sees: the reply and its </s>
    ' Hello!</s>'

Templates, selected by name:

- ``"minichat"`` (built in, ``MINICHAT_TEMPLATE``): MiniChat's format, as the MiniMA repository writes it
  (``conversation.py``, the ``MINICHAT`` separator style, and ``run_building_data_minichat.py``)::

      {system}</s>[|User|] {user}</s>[|Assistant|] {reply}</s>[|User|] ...</s>[|Assistant|]

  ``</s>`` is the tokenizer's EOS token, the end of every turn; the system prompt is optional (MiniChat always has
  one; nothing, not even ``</s>``, is written without it); no BOS is written (minima's shards have none, nor had
  MiniChat's training data). The generation prompt is ``[|Assistant|]`` with no space after it: the space belongs to
  the reply (MiniChat's Llama tokenizer wrote it as the reply's leading "▁", and MiniMA's ``conversation.py`` says
  "No space is needed" for the open turn), so a reply is predicted from ``[|Assistant|]`` on, space first. The
  markers are plain text, as in MiniChat (whose Llama vocabulary has no such tokens either): nothing is added to the
  vocabulary and the model's embeddings keep their size; ``[|User|]`` is 6 tokens in the tests' 1024-id tokenizer.
  A marker always follows ``</s>`` (an atomic special token) or the start of the text and is followed by a space or
  the end of the text, so it tokenises the same everywhere (the tests check minima's sentencepiece, a Llama-style
  and a byte-level BPE); the one exception is a tokenizer with a dummy prefix (Llama's), whose first piece of the
  whole text takes the "▁", for training and ``apply_chat_template`` alike.
- ``"tokenizer"``: the tokenizer's own ``chat_template`` (``tokenizer.apply_chat_template``).

Both are rendered by ``apply_chat_template`` itself (``MINICHAT_TEMPLATE`` is passed as its ``chat_template``), and
the whole rendering is tokenised in one call, as ``apply_chat_template`` tokenises it: the ids are exactly those of
``tokenizer.apply_chat_template(messages)`` once the tokenizer carries the template (``set_chat_template``). Which
tokens carry labels is found from the rendering of each prefix of the conversation, ``messages[:i]`` with the
generation prompt and ``messages[:i + 1]``: the reply of message ``i`` is what lies between the two. ``render`` checks
that each such prefix renders as a prefix of the whole (text), that no token straddles the start or the end of a
reply (no merge across a marker boundary), and that each generation prompt tokenises alone as it does inside the
conversation (what a model sees at inference is what it was trained on); a template or tokenizer that fails is an
error, never a silent misalignment.

Labels follow minima's convention (``minima.data.Batch``): ``labels[t]`` is the target of position ``t``, i.e. the
token after ``input_ids[t]``: ``labels[t] == input_ids[t + 1]`` where token ``t + 1`` belongs to an assistant reply
(its content and its end-of-turn token), ``IGNORE_INDEX`` everywhere else, and always at the last position. Every
assistant reply of a conversation is labelled; the system prompt, user messages and role markers never are (the
position that predicts ``[|Assistant|]`` is ``IGNORE_INDEX``; the last token of ``[|Assistant|]`` predicts the reply).
With the ``"tokenizer"`` template a reply is everything its template adds for it after the generation prompt (ChatML's
``content<|im_end|>\\n``) up to and including the last EOS token in it (ChatML with ``eos_token="<|im_end|>"``: not
the newline after it); without an EOS token in it, all of it.

Special tokens spelt out in a message's text (``"</s>"`` in a reply) are encoded as those tokens, as
``apply_chat_template`` does for the tokenizer it is given (a template that writes ``</s>`` needs the tokenizer to
match special tokens' strings, see ``set_chat_template``); clean them out of the data where that matters. minima's
pre-training shards are unaffected: ``minima.tokenizer`` always encodes such strings as text.

Long conversations: ``render(..., max_tokens=N)`` keeps the system prompt and the most recent whole exchanges, and
cuts the last reply only when it alone does not fit (see ``render``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minima.shards import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
TEMPLATES = ("minichat", "tokenizer")
USER_MARKER = "[|User|]"
ASSISTANT_MARKER = "[|Assistant|]"

# MiniChat's format; the reply (with its leading space and </s>) is a {% generation %} block, so that
# apply_chat_template(..., return_assistant_tokens_mask=True) on an exported tokenizer marks what render labels.
MINICHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + eos_token }}"
    "{% elif message['role'] == 'user' %}{{ '" + USER_MARKER + " ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT_MARKER + "' }}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('the minichat template has no role ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT_MARKER + "' }}{% endif %}"
)

# ShareGPT's "from" values (lower-cased) and the roles they stand for.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered: the message names where (``file.jsonl:17``, a message) and why."""


def conversation_from_record(record: dict | list, *, where: str) -> list[dict]:
    """The conversation held by one data record, as ``[{"role": ..., "content": ...}, ...]``.

    Shapes read:

    - ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`` (roles as written);
    - ShareGPT: ``{"conversations": [{"from": ..., "value": str}, ...]}`` with ``from`` one of ``SHAREGPT_ROLES``
      (human/user, gpt/assistant/chatgpt/bard/bing/model, system; any case);
    - MiniMA's turns (``run_building_data_minichat.py``, one conversation per line): a list of
      ``{"User": str, "Assistant": str}``, or one such turn on its own (a single exchange).

    Other keys of a record or a message are ignored. A blank system prompt is dropped. The conversation must then be:
    an optional system prompt first, then user and assistant messages alternating, starting with a user message and
    ending with an assistant reply; every content a string, user and assistant contents not blank.

    Args:
        record: one parsed JSON record (a ``datasets`` row or a ``json.loads`` line).
        where: where the record comes from, e.g. ``"chat.jsonl:17"``; every error message starts with it.

    Raises:
        ChatFormatError: ``"{where}: {what is wrong}"`` (unknown shape or role, empty conversation, no assistant
            reply, non-string or blank content, messages out of order).
    """
    if isinstance(record, dict):
        # A key whose value is None is absent: ``datasets`` gives every row of a file every key of the file's schema.
        keys = sorted(key for key, value in record.items() if value is not None)
    if isinstance(record, list) or (isinstance(record, dict) and {"User", "Assistant"} & set(keys)):
        named = _from_turns(record, where)
    elif not isinstance(record, dict):
        raise ChatFormatError(
            f"{where}: a record must be a JSON object or a list of turns, got {type(record).__name__}"
        )
    elif "messages" in keys and "conversations" in keys:
        raise ChatFormatError(f"{where}: both 'messages' and 'conversations'; keep one")
    elif "messages" in keys:
        named = _from_list(record["messages"], "messages", "role", "content", where, lambda role: role)
    elif "conversations" in keys:
        named = _from_list(
            record["conversations"],
            "conversations",
            "from",
            "value",
            where,
            lambda name: SHAREGPT_ROLES.get(name.lower()),
        )
    else:
        raise ChatFormatError(
            f"{where}: no conversation in a record with keys {keys}: expected 'messages' (role/content), "
            "'conversations' (from/value) or MiniMA's 'User'/'Assistant' turns"
        )
    if named and named[0][1] == "system" and isinstance(named[0][2], str) and not named[0][2].strip():
        named = named[1:]
    _check(named, where)
    return [{"role": role, "content": content} for _, role, content in named]


def _from_list(items: Any, key: str, role_key: str, content_key: str, where: str, role_of) -> list[tuple]:
    if not isinstance(items, list):
        raise ChatFormatError(f"{where}: '{key}' must be a list of messages, got {type(items).__name__}")
    named = []
    for i, item in enumerate(items):
        name = f"{key}[{i}]"
        if not isinstance(item, dict) or role_key not in item or content_key not in item:
            raise ChatFormatError(f"{where}: {name} must be an object with '{role_key}' and '{content_key}'")
        written = item[role_key]
        role = role_of(written) if isinstance(written, str) else None
        if role not in ROLES:
            known = ", ".join(SHAREGPT_ROLES) if key == "conversations" else ", ".join(ROLES)
            raise ChatFormatError(f"{where}: {name} has the unknown {role_key} {written!r}; expected one of {known}")
        named.append((name, role, item[content_key]))
    return named


def _from_turns(record: dict | list, where: str) -> list[tuple]:
    turns = [record] if isinstance(record, dict) else record
    named = []
    for i, turn in enumerate(turns):
        prefix = f"[{i}]." if isinstance(record, list) else ""
        if not isinstance(turn, dict):
            raise ChatFormatError(
                f"{where}: turn [{i}] must be an object with 'User' and 'Assistant', got {turn!r:.40}"
            )
        for key, role in (("User", "user"), ("Assistant", "assistant")):
            if turn.get(key) is None:
                raise ChatFormatError(
                    f"{where}: {prefix}{key} is missing: every MiniMA turn has 'User' and 'Assistant'"
                )
            named.append((prefix + key, role, turn[key]))
    return named


def _check(named: Sequence[tuple], where: str) -> None:
    """Raise ChatFormatError unless ``named`` ((name, role, content) triples) is a well-formed conversation."""
    if not named:
        raise ChatFormatError(f"{where}: empty conversation")
    for i, (name, role, content) in enumerate(named):
        if role not in ROLES:
            raise ChatFormatError(f"{where}: {name} has the unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"{where}: {name} ({role}) has non-string content of type {type(content).__name__}")
        if role == "system":
            if i > 0:
                raise ChatFormatError(f"{where}: {name} is a system prompt after the first message")
            continue
        if not content.strip():
            raise ChatFormatError(f"{where}: {name} ({role}) has blank content")
        expected = "user" if (i - (named[0][1] == "system")) % 2 == 0 else "assistant"
        if role != expected:
            previous = named[i - 1][1] if i > 0 else None
            what = f"two {role} messages in a row" if previous == role else "the conversation starts with an assistant"
            raise ChatFormatError(f"{where}: {name}: {what}; user and assistant messages must alternate, user first")
    if named[-1][1] == "system":
        raise ChatFormatError(f"{where}: only a system prompt, no user message and assistant reply")
    if named[-1][1] != "assistant":
        raise ChatFormatError(f"{where}: ends with a user message ({named[-1][0]}) that has no assistant reply")


def chat_template(tokenizer, template: str = "minichat") -> str:
    """The Jinja text of ``template``: ``MINICHAT_TEMPLATE`` or the tokenizer's own (an error naming the tokenizer
    where it has none)."""
    if template == "minichat":
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no EOS token, which the minichat template needs"
            )
        return MINICHAT_TEMPLATE
    if template == "tokenizer":
        if tokenizer.chat_template is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template of its own; use template='minichat' or "
                "set tokenizer.chat_template"
            )
        return tokenizer.get_chat_template()
    raise ValueError(f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATES)}")


def set_chat_template(tokenizer, template: str = "minichat") -> None:
    """Make ``tokenizer`` render ``template`` with ``apply_chat_template`` exactly as ``render`` did in training.

    For ``"minichat"`` it sets ``tokenizer.chat_template = MINICHAT_TEMPLATE`` and ``split_special_tokens = False``
    (the template writes ``</s>``, which must become the EOS id; minima's tokenizers are saved with ``True``);
    ``save_pretrained`` then writes both. For ``"tokenizer"`` it checks that there is a template to keep.
    """
    text = chat_template(tokenizer, template)
    if template == "minichat":
        tokenizer.chat_template = text
        tokenizer.split_special_tokens = False


@dataclass
class _Rendering:
    messages: list[dict]
    text: str
    ids: list[int]
    offsets: np.ndarray  # (n, 2) character span of each token in ``text``
    targets: np.ndarray  # (n,) bool: the token is part of an assistant reply
    reply_chars: list[tuple[int, int]]  # character span of each assistant reply in ``text``

    def token_at(self, char: int) -> int:
        """The number of tokens that start before character ``char``: the index of the token at ``char`` when a token
        boundary is there."""
        return int(np.count_nonzero(self.offsets[:, 0] < char))


def _render_once(messages: list[dict], tokenizer, jinja: str, encode_kwargs: dict) -> _Rendering:
    def text_of(part: list[dict], prompt: bool) -> str:
        return tokenizer.apply_chat_template(part, chat_template=jinja, tokenize=False, add_generation_prompt=prompt)

    text = text_of(messages, False)
    spans, prompts = [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = text_of(messages[:i], True), text_of(messages[: i + 1], False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ValueError(
                f"the chat template of {tokenizer.name_or_path!r} is not prefix-consistent: rendering messages[:{i}] "
                f"with the generation prompt, then messages[:{i + 1}], then all {len(messages)} messages does not give "
                "each as the start of the next, so the replies' tokens cannot be located; use template='minichat'"
            )
        spans.append((len(prompt), len(upto)))
        prompts.append(prompt)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, **encode_kwargs)
    ids = list(encoded["input_ids"])
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    rendering = _Rendering(messages, text, ids, offsets, np.zeros(len(ids), dtype=bool), spans)
    eos_id = tokenizer.eos_token_id
    for start, end in spans:
        for edge in (start, end):
            inside = np.flatnonzero((offsets[:, 0] < edge) & (offsets[:, 1] > edge))
            if len(inside):
                token, span = tokenizer.convert_ids_to_tokens(ids[inside[0]]), tuple(offsets[inside[0]].tolist())
                raise ChatFormatError(
                    f"the token {token!r} at {span} straddles the reply boundary at character {edge} of the "
                    f"rendering: tokenizer {tokenizer.name_or_path!r} merges text across it"
                )
        first, stop = rendering.token_at(start), rendering.token_at(end)
        eos_at = [t for t in range(first, stop) if ids[t] == eos_id]
        rendering.targets[first : eos_at[-1] + 1 if eos_at else stop] = True
    # What a model is prompted with at inference (the rendering so far plus the generation prompt, tokenised alone)
    # must be the start of what it was trained on.
    if prompts:
        alone = tokenizer(prompts, add_special_tokens=False, **encode_kwargs)["input_ids"]
        for (start, _), prompt_ids in zip(spans, alone, strict=True):
            if list(prompt_ids) != ids[: rendering.token_at(start)]:
                raise ChatFormatError(
                    f"the generation prompt ending at character {start} tokenises differently alone than inside the "
                    f"conversation with tokenizer {tokenizer.name_or_path!r}"
                )
    return rendering


def _fit(rendering: _Rendering, tokenizer, jinja: str, encode_kwargs: dict, max_tokens: int) -> _Rendering:
    """The rendering of the conversation shortened to at most ``max_tokens`` tokens by the rule of ``render``."""
    messages = rendering.messages
    system = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(system) :]
    num_exchanges = len(body) // 2
    # Tokens before the first exchange and where each later exchange starts: the estimate of the first exchange to
    # keep; every candidate is rendered again and measured, so the estimate only saves renderings.
    head = tokenizer.apply_chat_template(system, chat_template=jinja, tokenize=False) if system else ""
    head_tokens = rendering.token_at(len(head)) if rendering.text.startswith(head) else 0
    starts = [head_tokens] + [rendering.token_at(end) for _, end in rendering.reply_chars[:-1]]
    first = next(
        (j for j in range(num_exchanges) if head_tokens + len(rendering.ids) - starts[j] <= max_tokens),
        num_exchanges - 1,
    )
    for j in range(first, num_exchanges):
        if j > 0:
            rendering = _render_once(system + body[2 * j :], tokenizer, jinja, encode_kwargs)
        if len(rendering.ids) <= max_tokens:
            return rendering
    # One exchange left and still too long: cut its reply's content to the tokens that fit, then render the shortened
    # reply, which ends with its end-of-turn token like any other.
    content = body[-1]["content"]
    reply_start, reply_end = rendering.reply_chars[-1]
    at = rendering.text.find(content, reply_start)
    if at < 0 or at + len(content) > reply_end:
        raise ChatFormatError(
            f"the last reply does not fit in max_tokens={max_tokens} ({len(rendering.ids)} tokens with its prompt) "
            f"and cannot be cut: the chat template of {tokenizer.name_or_path!r} does not write it verbatim"
        )
    in_content = np.flatnonzero((rendering.offsets[:, 0] >= at) & (rendering.offsets[:, 1] <= at + len(content)))
    room = max_tokens - (len(rendering.ids) - len(in_content))
    while room >= 1:
        cut = content[: int(rendering.offsets[in_content[room - 1], 1]) - at]
        kept = [*system, body[-2], {"role": "assistant", "content": cut}]
        shortened = _render_once(kept, tokenizer, jinja, encode_kwargs)
        if len(shortened.ids) <= max_tokens:
            return shortened
        room -= 1
    raise ChatFormatError(
        f"the conversation does not fit in max_tokens={max_tokens}: the system prompt and the last user message "
        f"with the reply's prompt and end-of-turn take {len(rendering.ids) - len(in_content)} tokens"
    )


def render(
    messages: list[dict], tokenizer, template: str = "minichat", max_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of a conversation, as the chat stage trains on them.

    Args:
        messages: a conversation (see the module docstring; ``conversation_from_record`` builds one); it must end
            with an assistant reply.
        tokenizer: a Hugging Face fast tokenizer (``AutoTokenizer.from_pretrained``).
        template: ``"minichat"`` or ``"tokenizer"`` (see the module docstring).
        max_tokens: the most tokens to return, or None for no limit. A longer conversation is shortened, never by
            cutting a role marker or a kept reply's end-of-turn token: the system prompt is kept and whole exchanges
            (a user message and its reply) are dropped, oldest first, until the rest fits; if the last exchange alone
            is still too long, its reply's content is cut to the tokens that fit and the shortened reply ends with
            its end-of-turn token, labelled (as MiniChat's preparation truncates, keeping ``</s>``). The result is
            the exact rendering of the shortened conversation. If not even the prompt of the last exchange and one
            token of its reply fit, ChatFormatError.

    Returns:
        ``(input_ids, labels)``, 1-D int64 tensors of the same length: ``input_ids`` equal
        ``tokenizer.apply_chat_template(messages)["input_ids"]`` of a tokenizer carrying the template
        (``set_chat_template``); ``labels[t]`` is ``input_ids[t + 1]`` where that token belongs to an assistant reply
        (content and end-of-turn token) and ``IGNORE_INDEX`` elsewhere and at the last position.

    Raises:
        ChatFormatError: a malformed conversation (as ``conversation_from_record`` checks it), a tokenizer that
            merges text across a reply's boundary, or a conversation that cannot be shortened to ``max_tokens``.
        ValueError: an unknown template, a tokenizer without the template, a template that is not
            prefix-consistent, or a tokenizer without character offsets (not a fast tokenizer).
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    named = [
        (f"messages[{i}]", m.get("role"), m.get("content")) if isinstance(m, dict) else (f"messages[{i}]", None, None)
        for i, m in enumerate(messages)
    ]
    _check(named, "conversation")
    jinja = chat_template(tokenizer, template)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"render needs a fast tokenizer (character offsets); {tokenizer.name_or_path!r} is not one")
    # The minichat template writes </s> as text: it must become the EOS id, as for a tokenizer set_chat_template set.
    encode_kwargs = {"split_special_tokens": False} if template == "minichat" else {}
    messages = [{"role": role, "content": content} for _, role, content in named]
    rendering = _render_once(messages, tokenizer, jinja, encode_kwargs)
    if max_tokens is not None and len(rendering.ids) > max_tokens:
        rendering = _fit(rendering, tokenizer, jinja, encode_kwargs, max_tokens)
    input_ids = torch.tensor(rendering.ids, dtype=torch.int64)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    targets = torch.from_numpy(rendering.targets[1:])
    labels[:-1][targets] = input_ids[1:][targets]
    return input_ids, labels
