"""The standard-library chat data (``minima.docstrings``): exact records from a tiny fake standard library, and on the
real one every record a valid conversation, the ``textwrap.dedent`` example, the mix of shapes and determinism."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minima.chat import conversation_from_record
from minima.docstrings import (
    FOLLOW_UPS,
    MAX_ANSWER_CHARS,
    QUESTIONS,
    SYSTEM_PROMPTS,
    Entry,
    conversation,
    docstring_conversations,
    stdlib_entries,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]
SENTENCES = " ".join(f"Sentence number {i} says a little more about it." for i in range(20))

FAKE_MODULE = f'''"""A fake standard-library module."""


def greet(name: str, /, greeting: str = "Hello", *, punctuation="!") -> str:
    """Return a greeting for `name`,
    politely.

    More detail that is not part of the answer.
    """


def configure(options=None, table={{"a very long default": "that is left out", "b": 2}}, **extra):
    """configure(options) -> None

    Set the options, as an older module's docstring writes it.
    """


def _hidden():
    """A private helper that is never asked about."""


def undocumented(x):
    return x


def terse():
    """Too short."""


def example():
    """>>> example()  # a doctest is not an answer"""


async def fetch(url, *args, timeout: float = 1.0):
    """Fetch `url` asynchronously and return its body."""


def verbose():
    """{SENTENCES}"""


def wordy():
    """{"word " * 150}"""


class Counter:
    """Count things, one at a time, starting from zero."""

    def __init__(self, start: int = 0):
        self.count = start

    def add(self, n=1):
        """Add `n` to the count and return the new total."""

    def _reset(self):
        """Set the count back to zero, privately."""

    @property
    def total(self):
        """The count so far, as an integer."""

    @staticmethod
    def parse(text):
        """Read a count from its text, as a static method."""

    @classmethod
    def from_text(cls, text, base=10):
        """Make a counter from the text of a count."""


class Plain:
    """A class that inherits its constructor from object."""

    def method(self, /, x):
        """A method whose self is positional-only."""


class _Private:
    """A private class that is never asked about."""

    def shown(self):
        """A public method of a private class."""


if True:

    def conditional():
        """Defined inside an if statement, not at the top level."""
'''

EXPECTED = [
    Entry("fakemod.Counter", "Count things, one at a time, starting from zero.", "fakemod.Counter(start=0)"),
    Entry("fakemod.Counter.add", "Add `n` to the count and return the new total.", "fakemod.Counter.add(n=1)"),
    Entry(
        "fakemod.Counter.from_text",
        "Make a counter from the text of a count.",
        "fakemod.Counter.from_text(text, base=10)",
    ),
    Entry("fakemod.Counter.parse", "Read a count from its text, as a static method.", "fakemod.Counter.parse(text)"),
    Entry("fakemod.Counter.total", "The count so far, as an integer.", None),
    Entry("fakemod.Plain", "A class that inherits its constructor from object.", None),
    Entry("fakemod.Plain.method", "A method whose self is positional-only.", "fakemod.Plain.method(x)"),
    Entry(
        "fakemod.configure",
        "Set the options, as an older module's docstring writes it.",
        "fakemod.configure(options=None, table=..., **extra)",
    ),
    Entry("fakemod.fetch", "Fetch `url` asynchronously and return its body.", "fakemod.fetch(url, *args, timeout=1.0)"),
    Entry(
        "fakemod.greet",
        "Return a greeting for `name`, politely.",
        "fakemod.greet(name, /, greeting='Hello', *, punctuation='!')",
    ),
    Entry(
        "fakemod.verbose",
        # The most whole sentences that fit.
        " ".join(f"Sentence number {i} says a little more about it." for i in range(8)),
        "fakemod.verbose()",
    ),
    Entry("fakemod.wordy", ("word " * 79).strip() + "...", "fakemod.wordy()"),
    Entry("pkg.sub.helper", "Add two numbers, as a submodule's function.", "pkg.sub.helper(a, b)"),
    Entry("pkg.top", "A function of a package's own module.", "pkg.top()"),
]


def documented(name: str) -> str:
    return f'def {name}():\n    """A documented public function that must not be read."""\n'


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    """A tiny standard library: one module and one package that count, and everything that is skipped."""
    root = tmp_path / "lib"
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "fakemod.py").write_text(FAKE_MODULE)
    (root / "pkg" / "__init__.py").write_text('def top():\n    """A function of a package\'s own module."""\n')
    (root / "pkg" / "sub.py").write_text('def helper(a, b):\n    """Add two numbers, as a submodule\'s function."""\n')
    (root / "pkg" / "_impl.py").write_text(documented("impl"))
    (root / "pkg" / "tests" / "__init__.py").write_text(documented("in_tests"))
    (root / "pkg" / "tests" / "test_pkg.py").write_text(documented("test_pkg"))
    (root / "broken.py").write_text('def broken(:\n    """The file does not parse."""\n')
    (root / "latin.py").write_bytes(b'def caf\xe9():\n    """A file that is not UTF-8 and says nothing."""\n')
    (root / "_private.py").write_text(documented("visible"))
    (root / "README.txt").write_text(documented("not_python"))
    for package in ("tests", "tkinter", "notapkg"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(documented("init"))
        (root / package / "mod.py").write_text(documented("mod"))
    (root / "notapkg" / "__init__.py").unlink()  # a directory without __init__.py is not a package
    (root / "site-packages").mkdir()
    (root / "site-packages" / "thirdparty.py").write_text(documented("installed"))
    return root


@pytest.fixture(scope="module")
def everything() -> list[dict]:
    """All the conversations of this interpreter's standard library (seed 0)."""
    return docstring_conversations(max_conversations=10**6, seed=0)


def name_asked(question: str) -> str:
    """The name a question is about, given that it is phrased as one of ``QUESTIONS``."""
    for form in QUESTIONS:
        before, after = form.split("{name}")
        if question.startswith(before) and question.endswith(after) and len(question) > len(before) + len(after):
            return question[len(before) : len(question) - len(after)]
    raise AssertionError(f"not one of the questions: {question!r}")


def check_record(record: dict, entries: dict[str, Entry] | None = None) -> str:
    """Assert ``record`` is a valid conversation phrased as the module phrases them, about one of ``entries`` (answer
    and signature exactly theirs) where given; return the name it is about."""
    assert set(record) == {"messages"}
    assert conversation_from_record(record, where="record") == record["messages"]
    messages = list(record["messages"])
    if messages[0]["role"] == "system":
        assert messages.pop(0)["content"] in SYSTEM_PROMPTS
    assert len(messages) in (2, 4)
    name = name_asked(messages[0]["content"])
    if len(messages) == 4:
        assert messages[2]["content"] in FOLLOW_UPS
        assert messages[3]["content"].startswith(f"`{name}(")
    if entries is not None:
        entry = entries[name]
        assert messages[1]["content"] == entry.answer
        if len(messages) == 4:
            assert entry.call is not None
            no_arguments = ": no arguments." if entry.call.endswith("()") else ""
            assert messages[3]["content"] == f"`{entry.call}`{no_arguments}"
    return name


def test_fake_stdlib_gives_exactly_the_public_documented_definitions(fake_stdlib: Path):
    assert stdlib_entries(fake_stdlib) == EXPECTED
    assert all(len(entry.answer) <= MAX_ANSWER_CHARS for entry in EXPECTED)  # fakemod.verbose and .wordy were cut
    records = docstring_conversations(max_conversations=100, seed=0, stdlib_dir=fake_stdlib)
    by_name = {entry.name: entry for entry in EXPECTED}
    names = [check_record(record, by_name) for record in records]
    assert sorted(names) == [entry.name for entry in EXPECTED]
    assert names != sorted(names)  # shuffled
    assert records == [conversation(by_name[name], seed=0) for name in names]


def test_max_conversations_and_seed(fake_stdlib: Path):
    full = docstring_conversations(max_conversations=100, seed=0, stdlib_dir=fake_stdlib)
    assert docstring_conversations(max_conversations=100, seed=0, stdlib_dir=fake_stdlib) == full
    some = docstring_conversations(max_conversations=5, seed=0, stdlib_dir=fake_stdlib)
    assert len(some) == 5 and all(record in full for record in some)
    assert docstring_conversations(max_conversations=0, stdlib_dir=fake_stdlib) == []
    others = docstring_conversations(max_conversations=100, seed=1, stdlib_dir=fake_stdlib)
    assert others != full and len(others) == len(full)
    with pytest.raises(ValueError, match="max_conversations"):
        docstring_conversations(max_conversations=-1, stdlib_dir=fake_stdlib)


def test_conversation_shapes_vary_with_the_seed():
    entry = Entry(
        "textwrap.dedent", "Remove any common leading whitespace from every line in `text`.", "textwrap.dedent(text)"
    )
    records = [conversation(entry, seed=seed) for seed in range(300)]
    for record in records:
        check_record(record, {entry.name: entry})
    assert 0.15 < sum(len(r["messages"]) > 3 for r in records) / len(records) < 0.35
    assert 0.23 < sum(r["messages"][0]["role"] == "system" for r in records) / len(records) < 0.43
    assert {next(m for m in r["messages"] if m["role"] == "user")["content"] for r in records} == {
        q.format(name="textwrap.dedent") for q in QUESTIONS
    }
    uncallable = entry._replace(call=None)
    assert all(len(conversation(uncallable, seed=seed)["messages"]) <= 3 for seed in range(300))


def test_every_stdlib_record_is_a_conversation(everything: list[dict]):
    names = [check_record(record) for record in everything]
    assert len(everything) > 1000
    assert len(set(names)) == len(names)


def test_textwrap_dedent_example(everything: list[dict]):
    without_system = [[m for m in r["messages"] if m["role"] != "system"] for r in everything]
    (messages,) = [m for m in without_system if name_asked(m[0]["content"]) == "textwrap.dedent"]
    first_sentence = re.split(r"(?<=\.)\s", inspect.cleandoc(textwrap.dedent.__doc__), maxsplit=1)[0]
    assert first_sentence.startswith("Remove any common leading whitespace")
    assert messages[1]["content"].startswith(first_sentence)
    if len(messages) == 4:
        assert messages[3]["content"] == "`textwrap.dedent(text)`"


def test_stdlib_mix_of_shapes(everything: list[dict]):
    multi_turn = sum(len(r["messages"]) > 3 for r in everything) / len(everything)
    with_system = sum(r["messages"][0]["role"] == "system" for r in everything) / len(everything)
    assert 0.15 < multi_turn < 0.3
    assert 0.28 < with_system < 0.38


def test_same_records_in_another_process(fake_stdlib: Path):
    """Nothing but the arguments decides: not hash randomisation, not the process."""
    code = (
        "import json, sys; from minima.docstrings import docstring_conversations; "
        "print(json.dumps(docstring_conversations(100, seed=3, stdlib_dir=sys.argv[1])))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "4321"}
    command = [sys.executable, "-c", code, str(fake_stdlib)]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == docstring_conversations(100, seed=3, stdlib_dir=fake_stdlib)


def test_write_jsonl(tmp_path: Path):
    records = [
        {"messages": [{"role": "user", "content": "Qu'est-ce que `café`?"}, {"role": "assistant", "content": "Ça."}]},
        {"messages": [{"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Yes."}]},
    ]
    path = write_jsonl(records, tmp_path / "new" / "dir" / "chat.jsonl")
    assert path == tmp_path / "new" / "dir" / "chat.jsonl"
    text = path.read_text(encoding="utf-8")
    assert "café" in text and text.endswith("\n")
    assert [json.loads(line) for line in text.splitlines()] == records
