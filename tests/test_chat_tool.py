"""``tools/chat.py`` on a tiny random Llama with the tests' tokenizer and the minichat template: the history kept
across turns, trimming to the context, the three modes, Ctrl-C, and the errors. One subprocess (the stdin mode as a
user runs it); the rest calls ``main(argv)`` in-process (a subprocess costs seconds of imports)."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from minima.chat import render, set_chat_template

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "chat.py"
CONTEXT = 128  # the tiny model's tokenizer.model_max_length
PROMPT_HEADER = re.compile(r"^\[prompt: (\d+) tokens\]\n", re.MULTILINE)
LONG = "the quick brown fox jumps over the lazy dog and then runs far away"  # ~50 tokens


@pytest.fixture(scope="module")
def tool():
    """``tools/chat.py`` as a module (registered in sys.modules, which its dataclass needs)."""
    spec = importlib.util.spec_from_file_location("chat_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "chat_tool", module)
        spec.loader.exec_module(module)
        yield module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A random (seeded) 2-layer Llama and the tiny tokenizer with the minichat template, ``save_pretrained``."""
    out = tmp_path_factory.mktemp("chat_model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    set_chat_template(tokenizer, "minichat")
    tokenizer.model_max_length = CONTEXT
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def prompts_of(stderr: str) -> list[tuple[int, str]]:
    """The (token count, text) of each prompt ``--show-prompt`` printed; a prompt's text ends at the next line of
    stderr that starts with "(" (a notice) or at the next prompt."""
    parts = PROMPT_HEADER.split(stderr)
    return [(int(n), re.split(r"\n\(", text)[0].rstrip("\n")) for n, text in zip(parts[1::2], parts[2::2], strict=True)]


def run_main(tool, argv: list[str], capsys, monkeypatch, stdin: str | None = None, tty: bool = False):
    """``main(argv)`` in-process, ``stdin`` as standard input (a terminal when ``tty``): (status, stdout, stderr)."""
    if stdin is not None:
        fake = io.StringIO(stdin)
        fake.isatty = lambda: tty
        monkeypatch.setattr(sys, "stdin", fake)
    status = tool.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_stdin_turns_keep_the_history(model_dir: Path) -> None:
    cmd = [sys.executable, str(TOOL), str(model_dir), "--show-prompt", "--max-new-tokens", "8"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, input="Hello there\n\nWhat did I say?\n", env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    (n1, first), (n2, second) = prompts_of(proc.stderr)  # the blank line is no turn
    assert first == "[|User|] Hello there</s>[|Assistant|]"
    tail = "</s>[|User|] What did I say?</s>[|Assistant|]"
    # The second prompt: the first, its reply (as the model sees it: a leading space, then </s>), the new turn.
    assert second.startswith(first) and second.endswith(tail) and n2 > n1
    reply = second[len(first) : -len(tail)]
    assert reply.startswith(" ") and reply.strip(), second
    # Only the replies go to stdout. (Not compared with the prompt's text: a random model writes lone UTF-8 bytes,
    # which decode to U+FFFD and so do not survive the round trip through the history's text.)
    assert len(proc.stdout.splitlines()) == 2 and all(line.strip() for line in proc.stdout.splitlines())


def test_trim_history_drops_the_oldest_exchanges_and_keeps_the_system_prompt(tool, model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(messages: list[dict]) -> list[int]:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **tool.ENCODE_KWARGS)["input_ids"]

    system = [{"role": "system", "content": "Be brief."}]
    body = []
    for i in range(3):
        body += [{"role": "user", "content": f"{LONG} {i}"}, {"role": "assistant", "content": f"reply {i}"}]
    body.append({"role": "user", "content": "last"})
    messages = system + body
    untrimmed = tool.trim_history(messages, encode, 10**6)
    assert untrimmed == (messages, encode(messages), 0)
    # Just room for the last exchange and the new message: the two oldest exchanges go, the system prompt stays.
    budget = len(encode(system + body[4:]))
    assert budget < len(encode(system + body[2:]))
    kept = tool.trim_history(messages, encode, budget)
    assert kept.dropped == 2 and kept.messages == system + body[4:] and len(kept.ids) <= budget
    assert tokenizer.decode(kept.ids).startswith("Be brief.</s>[|User|] " + LONG + " 2</s>")
    assert tool.trim_history(messages, encode, len(encode(system + body[-1:]))).messages == system + body[-1:]
    with pytest.raises(tool.ContextError, match="with the system prompt alone"):
        tool.trim_history(messages, encode, len(encode(system + body[-1:])) - 1)


def test_a_long_conversation_is_trimmed_to_the_context(tool, model_dir: Path, capsys, monkeypatch) -> None:
    max_new = 8
    lines = "".join(f"{LONG} {i}\n" for i in range(5))
    argv = [str(model_dir), "--show-prompt", "--max-new-tokens", str(max_new), "--system", "Be brief."]
    status, out, err = run_main(tool, argv, capsys, monkeypatch, stdin=lines)
    assert status == 0, err
    prompts = prompts_of(err)
    assert len(prompts) == 5 and len(out.splitlines()) >= 5
    assert "(context: dropped the oldest exchange to fit 128 tokens" in err
    assert "Token indices sequence length" not in err  # measuring an over-long rendering is no warning
    for n, text in prompts:
        assert n + max_new <= CONTEXT
        assert text.startswith("Be brief.</s>[|User|] ")
    # The last prompt no longer holds the first message.
    assert f"{LONG} 0</s>" not in prompts[-1][1] and f"{LONG} 4</s>" in prompts[-1][1]
    # A message that does not fit even alone ends script mode with an error.
    status, _, err = run_main(tool, [str(model_dir), "--max-new-tokens", "100", "--prompt", LONG], capsys, monkeypatch)
    assert status == 1 and "over the 28 available (a context of 128 less --max-new-tokens 100)" in err


def test_prompt_mode_is_deterministic_when_greedy_or_seeded(tool, model_dir: Path, capsys, monkeypatch) -> None:
    argv = [str(model_dir), "--show-prompt", "--max-new-tokens", "6", "--prompt", "Hi", "--prompt", "And then?"]
    first, second = (run_main(tool, argv, capsys, monkeypatch) for _ in range(2))
    assert first == second and first[0] == 0
    prompts = prompts_of(first[2])
    assert len(prompts) == 2 and prompts[1][1].startswith("[|User|] Hi</s>[|Assistant|] ")
    assert prompts[1][1].endswith("</s>[|User|] And then?</s>[|Assistant|]")
    sampled = [*argv, "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", "3"]
    assert run_main(tool, sampled, capsys, monkeypatch) == run_main(tool, sampled, capsys, monkeypatch)


def test_no_repeat_ngram_size_keeps_a_greedy_reply_free_of_repeated_tokens(tool, model_dir: Path) -> None:
    model, tokenizer = tool.load(str(model_dir), torch.device("cpu"), torch.float32)
    args = tool.parse_args([str(model_dir), "--max-new-tokens", "40", "--no-repeat-ngram-size", "1"])
    config = tool.generation_config(model, tokenizer, args)
    assert config.no_repeat_ngram_size == 1
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    new = model.generate(prompt, generation_config=config)[0, prompt.shape[1] :].tolist()
    assert len(new) == len(set(new))  # no token twice (nor any already in the prompt)


def test_interactive_reset_and_exit(tool, model_dir: Path, capsys, monkeypatch) -> None:
    argv = [str(model_dir), "--show-prompt", "--max-new-tokens", "4", "--system", "S"]
    status, out, err = run_main(tool, argv, capsys, monkeypatch, stdin="hello\n/reset\nagain\n/exit\nnever\n", tty=True)
    assert status == 0
    assert out.count("you> ") == 4 and out.count("assistant> ") == 2
    assert "(history cleared)" in err
    assert [text for _, text in prompts_of(err)] == [
        "S</s>[|User|] hello</s>[|Assistant|]",
        "S</s>[|User|] again</s>[|Assistant|]",
    ]


def test_ctrl_c_stops_the_reply_and_keeps_what_was_written(tool, model_dir: Path, monkeypatch) -> None:
    class InterruptingStreamer(tool.TextStreamer):
        """Presses Ctrl-C once the prompt and two tokens went through."""

        puts = 0

        def put(self, value) -> None:
            super().put(value)
            InterruptingStreamer.puts += 1
            if InterruptingStreamer.puts == 3:
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(tool, "TextStreamer", InterruptingStreamer)
    model, tokenizer = tool.load(str(model_dir), torch.device("cpu"), torch.float32)
    args = tool.parse_args([str(model_dir), "--max-new-tokens", "50"])
    chat = tool.Chat(model, tokenizer, tool.generation_config(model, tokenizer, args), CONTEXT)
    handler = signal.getsignal(signal.SIGINT)
    reply = chat.respond(chat.prepare("hello"), interruptible=True)
    assert InterruptingStreamer.puts <= 5  # stopped at the next token, not after 50
    assert signal.getsignal(signal.SIGINT) is handler
    assert reply and chat.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply}]


def test_a_tokenizer_without_a_template_falls_back_to_minichat(
    tool, model_dir: Path, tiny_tokenizer_dir, capsys
) -> None:
    plain = model_dir.parent / "chat_model_without_template"
    shutil.copytree(model_dir, plain, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(plain)  # saved with split_special_tokens=True
    _, tokenizer = tool.load(str(plain), torch.device("cpu"), torch.float32)
    assert "has no chat template: using minima's minichat template" in capsys.readouterr().err
    tokenizer.split_special_tokens = True  # as minima saves its tokenizers: ENCODE_KWARGS must override it
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **tool.ENCODE_KWARGS)["input_ids"]
    # Each </s> the template writes is the EOS id, as minima.chat.render tokenises for training.
    assert ids.count(tokenizer.eos_token_id) == 2 and tokenizer.decode(ids) == "S</s>[|User|] hi</s>[|Assistant|]"
    # What the model sees is how the chat stage trained it: the start of the rendering with the reply.
    trained, _ = render([*messages, {"role": "assistant", "content": "ok"}], tokenizer)
    assert trained.tolist()[: len(ids)] == ids


def test_a_bad_model_dir_is_a_one_line_error(tool, tmp_path: Path, capsys) -> None:
    for path, why in ((tmp_path / "missing", "is not a directory"), (tmp_path, "has no config.json")):
        assert tool.main([str(path), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"chat.py: error: MODEL_DIR {path} {why}") and err.count("\n") == 1
