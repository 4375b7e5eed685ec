"""Chat in the terminal with a model minima exported: ``python tools/chat.py MODEL_DIR [options]``.

    python tools/chat.py runs/minichat/export                          # interactive, greedy
    python tools/chat.py runs/minichat/export --system "Be brief." --temperature 0.7 --top-p 0.9 --seed 0
    python tools/chat.py runs/minichat/export --prompt "Hi" --prompt "And in French?"   # two turns, then exit
    printf 'Hi\\nAnd in French?\\n' | python tools/chat.py runs/minichat/export --show-prompt

MODEL_DIR is a Hugging Face causal-LM directory (``config.json``, weights, tokenizer), e.g. a minima export. Each turn
renders the whole conversation (an optional ``--system`` prompt, then the user and assistant messages so far) with the
tokenizer's chat template and ``add_generation_prompt=True``, generates until the end-of-turn token (the generation
config's ``eos_token_id`` and the tokenizer's EOS) or ``--max-new-tokens``, streams the reply to stdout and adds it to
the history. A tokenizer without a chat template gets minima's ``minichat`` one (``minima.chat``), with a note on
stderr. The rendering is tokenised as ``minima.chat.render`` tokenises it for training: special tokens spelt out as
text (minichat's ``</s>``) become their ids, those typed in a message too.

When the prompt and ``--max-new-tokens`` do not fit the context (the tokenizer's ``model_max_length`` when it is set,
else the config's ``max_position_embeddings``), the oldest exchanges (a user message and its reply) are dropped from
the history, the system prompt kept, and a notice goes to stderr. A message that does not fit even alone is skipped
(interactive) or an error (exit 1).

Modes: ``--prompt TEXT`` (repeatable) sends those user turns in order, then exits; with stdin not a terminal, each
non-empty line is one user turn; otherwise an interactive session: ``you> `` reads a message, the reply follows
``assistant> ``; ``/reset`` clears the history, ``/exit`` or Ctrl-D quits, Ctrl-C stops a reply (the part written so
far is kept). ``--show-prompt`` prints each rendered prompt (special tokens kept) to stderr before generating. Only
replies go to stdout outside the interactive mode, one per line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
    set_seed,
)
from transformers.utils import logging as hf_logging

from minima.chat import set_chat_template

PROG = "chat.py"
# Tokenizers without a real limit carry a huge model_max_length (transformers' VERY_LARGE_INTEGER, 1e30).
MAX_SANE_CONTEXT = 2**24
# How apply_chat_template tokenises the rendering: special tokens written by the template as text (minichat's </s>)
# become their ids, as minima.chat.render tokenises for training (minima's tokenizers are saved with
# split_special_tokens=True); verbose=False: trim_history measures renderings longer than the context on purpose.
ENCODE_KWARGS = {"tokenizer_kwargs": {"split_special_tokens": False, "verbose": False}}


class ChatError(Exception):
    """A one-line error for the user (bad MODEL_DIR, options that cannot work); ``main`` exits 2 with it."""


class ContextError(ChatError):
    """A message that does not fit the context even with the whole history dropped."""


class Trimmed(NamedTuple):
    """A conversation shortened to fit: the messages kept, their prompt's token ids and the exchanges dropped."""

    messages: list[dict]
    ids: list[int]
    dropped: int


def trim_history(messages: list[dict], encode: Callable[[list[dict]], list[int]], max_tokens: int) -> Trimmed:
    """``messages`` without its oldest exchanges, as few dropped as needed for the prompt to take ``max_tokens`` or
    fewer tokens.

    Args:
        messages: an optional system prompt, then user and assistant messages alternating, ending with a user message.
        encode: the prompt's token ids of a conversation (rendered with the generation prompt).
        max_tokens: the most tokens the prompt may take (the context less the tokens kept for the reply).

    Raises:
        ContextError: the system prompt and the last user message alone take more than ``max_tokens``.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(system) :]
    for dropped in range(len(body) // 2 + 1):
        kept = system + body[2 * dropped :]
        ids = encode(kept)
        if len(ids) <= max_tokens:
            return Trimmed(kept, ids, dropped)
    with_system = "with the system prompt " if system else ""
    raise ContextError(
        f"the message takes {len(ids)} prompt tokens {with_system}alone, over the {max_tokens} available"
    )


class StopOnInterrupt(StoppingCriteria):
    """Ends generation at the next token once Ctrl-C was pressed inside ``catching_sigint()``."""

    def __init__(self) -> None:
        self.interrupted = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.interrupted, dtype=torch.bool, device=input_ids.device)

    @contextlib.contextmanager
    def catching_sigint(self) -> Iterator[None]:
        def interrupt(signum, frame) -> None:
            self.interrupted = True

        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


@dataclass
class Chat:
    """A model, its tokenizer and the conversation so far."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    generation: GenerationConfig
    context_tokens: int  # the model's context: prompt plus reply
    system: str | None = None
    show_prompt: bool = False
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def encode(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **ENCODE_KWARGS)["input_ids"]

    def prepare(self, text: str) -> Trimmed:
        """The conversation with the user message ``text``, trimmed to leave room for the reply (a notice on stderr),
        and its prompt (on stderr with ``show_prompt``)."""
        max_new = self.generation.max_new_tokens
        try:
            trimmed = trim_history(
                [*self.messages, {"role": "user", "content": text}], self.encode, self.context_tokens - max_new
            )
        except ContextError as e:
            raise ContextError(f"{e} (a context of {self.context_tokens} less --max-new-tokens {max_new})") from None
        if trimmed.dropped:
            which = "oldest exchange" if trimmed.dropped == 1 else f"{trimmed.dropped} oldest exchanges"
            print(
                f"(context: dropped the {which} to fit {self.context_tokens} tokens: "
                f"{len(trimmed.ids)} of prompt + {max_new} for the reply)",
                file=sys.stderr,
            )
        if self.show_prompt:
            rendered = self.tokenizer.decode(trimmed.ids, skip_special_tokens=False)
            print(f"[prompt: {len(trimmed.ids)} tokens]\n{rendered}", file=sys.stderr, flush=True)
        return trimmed

    def respond(self, trimmed: Trimmed, *, interruptible: bool = False) -> str:
        """Generate and stream the reply to ``trimmed``; the history becomes ``trimmed`` and the reply."""
        input_ids = torch.tensor([trimmed.ids], device=self.model.device)
        stop = StopOnInterrupt()
        with stop.catching_sigint() if interruptible else contextlib.nullcontext():
            output = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self.generation,
                streamer=TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True),
                stopping_criteria=StoppingCriteriaList([stop]),
            )
        if stop.interrupted:
            print("(interrupted)", file=sys.stderr)
        reply = self.tokenizer.decode(output[0, len(trimmed.ids) :], skip_special_tokens=True).strip()
        # Assigned only now: a KeyboardInterrupt outside generation (before the reply) leaves the history as it was.
        self.messages = [*trimmed.messages, {"role": "assistant", "content": reply}]
        return reply


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face causal-LM directory (a minima export)")
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system prompt, kept first in every prompt")
    parser.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a user turn (repeatable)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    parser.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="auto: bfloat16 on cuda, else float32"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply, in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the K likeliest tokens (default 0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="default 1.0: none")
    parser.add_argument(
        "--no-repeat-ngram-size", type=int, default=0, metavar="N", help="never repeat an N-gram (default 0: off)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seeds sampling (default: unseeded)")
    parser.add_argument("--show-prompt", action="store_true", help="print each rendered prompt to stderr")
    args = parser.parse_args(argv)
    for ok, what in (
        (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (args.temperature >= 0, "--temperature must be >= 0"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.top_k >= 0, "--top-k must be >= 0"),
        (args.repetition_penalty > 0, "--repetition-penalty must be > 0"),
        (args.no_repeat_ngram_size >= 0, "--no-repeat-ngram-size must be >= 0"),
    ):
        if not ok:
            parser.error(what)
    return args


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``--device`` and ``--dtype`` resolved: auto is cuda with bfloat16 when a GPU is there, else cpu with float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ChatError("--device cuda: no CUDA GPU is available; use --device cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def load(model_dir: str, device: torch.device, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (in eval mode, on ``device``) and tokenizer of ``model_dir``; ChatError naming the path if it has
    none."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ChatError(f"MODEL_DIR {model_dir} is not a directory")
    if not (path / "config.json").is_file():
        raise ChatError(f"MODEL_DIR {model_dir} has no config.json: not a Hugging Face model directory")
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ChatError(f"cannot load a causal LM from {model_dir}: {str(e).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ChatError(f"cannot load a tokenizer from {model_dir}: {str(e).splitlines()[0]}") from None
    if tokenizer.chat_template is None:
        try:
            set_chat_template(tokenizer, "minichat")
        except ValueError as e:
            raise ChatError(f"the tokenizer of {model_dir} has no chat template, and {e}") from None
        print(f"(the tokenizer of {model_dir} has no chat template: using minima's minichat template)", file=sys.stderr)
    return model.to(device).eval(), tokenizer


def context_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int:
    """The model's context: the tokenizer's ``model_max_length`` when it is set, else ``max_position_embeddings``."""
    limit = tokenizer.model_max_length
    if isinstance(limit, int) and 0 < limit <= MAX_SANE_CONTEXT:
        return limit
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not limit:
        raise ChatError(
            f"{tokenizer.name_or_path}: neither the tokenizer's model_max_length nor the config's "
            "max_position_embeddings gives the context length; set model_max_length in tokenizer_config.json"
        )
    return int(limit)


def generation_config(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace
) -> GenerationConfig:
    """The model's generation config with the options of the command line; it stops at any end-of-turn id."""
    config = copy.deepcopy(model.generation_config)
    eos = config.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    if not eos_ids:
        raise ChatError(f"{args.model_dir}: neither the generation config nor the tokenizer has an EOS token")
    pad = next(i for i in (config.pad_token_id, tokenizer.pad_token_id, eos_ids[0]) if i is not None)
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    else:  # greedy; the model's own sampling settings would only draw warnings
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    config.update(
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        eos_token_id=eos_ids,
        pad_token_id=pad,
        **sampling,
    )
    return config


def run_turns(chat: Chat, texts: Iterable[str]) -> int:
    """Script modes (``--prompt``, stdin): one turn per non-blank text; exit status 1 at a message that cannot fit."""
    for text in texts:
        if not text.strip():
            continue
        try:
            trimmed = chat.prepare(text.strip())
        except ContextError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        chat.respond(trimmed)
    return 0


def repl(chat: Chat, model_dir: str) -> int:
    """The interactive session; returns at ``/exit`` or EOF."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and recall for input())
    print(
        f"chatting with {model_dir}: /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply",
        file=sys.stderr,
    )
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D quits)", file=sys.stderr)
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            chat.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        try:
            trimmed = chat.prepare(text)
            print("assistant> ", end="", flush=True)
            chat.respond(trimmed, interruptible=True)
        except ContextError as e:
            print(f"({e}; message skipped)", file=sys.stderr)
        except KeyboardInterrupt:  # outside generation: the turn is dropped, the history unchanged
            print("\n(interrupted)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device, dtype = device_and_dtype(args.device, args.dtype)
        model, tokenizer = load(args.model_dir, device, dtype)
        context = context_tokens(tokenizer, model)
        generation = generation_config(model, tokenizer, args)
        if args.max_new_tokens >= context:
            raise ChatError(
                f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in a context of {context}"
            )
    except ChatError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.seed is not None:
        set_seed(args.seed)
    chat = Chat(model, tokenizer, generation, context, system=args.system, show_prompt=args.show_prompt)
    if args.prompt is not None:
        return run_turns(chat, args.prompt)
    if not sys.stdin.isatty():
        return run_turns(chat, sys.stdin)
    return repl(chat, args.model_dir)


if __name__ == "__main__":
    sys.exit(main())
