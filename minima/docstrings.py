"""Chat data that every machine has: questions about the Python standard library answered by its own docstrings.

The demo's chat (instruction-tuning) stage needs conversations, and nothing may be downloaded, so they are made from
the CPython standard library source next to the interpreter: each public function, class and method with a docstring
gives one question and its answer, the first paragraph of the docstring::

    user:      What does `textwrap.dedent` do?
    assistant: Remove any common leading whitespace from every line in `text`.

About 1 in 4 conversations go on with a follow-up that the source's signature answers ("What arguments does it
take?" -> "`textwrap.dedent(text)`"), and about 1 in 3 start with a system prompt, so the chat stage sees all the
shapes ``minima.chat.conversation_from_record`` reads. Records are in the ``messages`` shape
(``{"messages": [{"role": ..., "content": ...}, ...]}``); ``write_jsonl`` writes them as a ``.jsonl`` chat file.

The source is parsed with ``ast``, never imported (no side effects, no platform-only modules failing), tests and GUI
packages skipped, and files that do not parse are skipped silently. The result is a function of
``(max_conversations, seed, stdlib_dir)`` only: the candidates are collected in sorted order (files walked by name),
each one's phrasing is drawn from a generator seeded by ``(seed, name)``, and ``random.Random(seed)`` samples
``max_conversations`` of them in a shuffled order. CPython 3.11's standard library (about 500 modules once tests and
GUI packages are left out) gives about 3,900 candidates in 2 to 3 s, most of it ``ast.parse``.
"""

from __future__ import annotations

import ast
import gc
import json
import random
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from minima.files import write_atomic

# Directory and module names never walked (tests, GUI and packaging tools, installed packages); names starting with
# "_" (private modules, __pycache__, __main__) are skipped too.
SKIPPED = frozenset({"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages"})
MAX_ANSWER_CHARS = 400
MIN_ANSWER_CHARS = 20
MAX_DEFAULT_CHARS = 24  # a longer default value is written as "..." in a signature
QUESTIONS = (
    "What does `{name}` do?",
    "Explain `{name}` in the Python standard library.",
    "What is `{name}` for?",
    "Describe `{name}` briefly.",
    "In Python, what does `{name}` do?",
)
FOLLOW_UPS = ("What arguments does it take?", "How do I call it?", "What is its signature?")
SYSTEM_PROMPTS = (
    "You are a helpful assistant that knows the Python standard library.",
    "You answer questions about Python's standard library concisely.",
    "You are a Python expert. Answer briefly and accurately.",
)
FOLLOW_UP_RATE = 1 / 4
SYSTEM_RATE = 1 / 3
_CONSTRUCTORS = ("__init__", "__new__")
_PROPERTY_DECORATORS = frozenset({"property", "cached_property", "setter", "getter", "deleter"})


class Entry(NamedTuple):
    """One candidate: what a conversation is about and what the source says about it."""

    name: str
    """Qualified name: ``module.func``, ``module.Class`` or ``module.Class.method``."""
    answer: str
    """The docstring's first paragraph on one line, at most ``MAX_ANSWER_CHARS`` characters."""
    call: str | None
    """How it is called, ``textwrap.dedent(text)``; None where the source does not say (a property, a class without
    its own ``__init__`` or ``__new__``)."""


def docstring_conversations(
    max_conversations: int = 2000, *, seed: int = 0, stdlib_dir: Path | None = None
) -> list[dict]:
    """Up to ``max_conversations`` conversations about the standard library in ``stdlib_dir``, shuffled.

    Args:
        max_conversations: the most records to return (all candidates where there are fewer).
        seed: selects the sample, its order and each conversation's phrasing.
        stdlib_dir: the standard library source; by default this interpreter's (``sysconfig``'s ``stdlib`` path).

    Returns:
        ``{"messages": [...]}`` records, each accepted by ``minima.chat.conversation_from_record``.
    """
    if max_conversations < 0:
        raise ValueError(f"max_conversations must be >= 0, got {max_conversations}")
    root = Path(sysconfig.get_paths()["stdlib"]) if stdlib_dir is None else Path(stdlib_dir)
    entries = stdlib_entries(root)
    chosen = random.Random(seed).sample(entries, min(max_conversations, len(entries)))
    return [conversation(entry, seed=seed) for entry in chosen]


def stdlib_entries(stdlib_dir: Path) -> list[Entry]:
    """Every candidate of the standard library source in ``stdlib_dir``, sorted by name."""
    by_name: dict[str, Entry] = {}
    # Parsing is millions of small allocations, which the cyclic garbage collector scans again and again for nothing
    # (a tree has no cycles and goes by reference counting once its file is read): a fifth of the time.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for module, path in _modules(Path(stdlib_dir)):
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            # Another Python's syntax, an encoding the file does not declare, NUL bytes: SyntaxError from ast.parse
            # of bytes, UnicodeDecodeError or ValueError from some Python versions.
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for entry in _module_entries(module, tree):
                by_name[entry.name] = entry  # a name defined twice: the later definition is the one Python keeps
    finally:
        if collecting:
            gc.enable()
    return [by_name[name] for name in sorted(by_name)]


def conversation(entry: Entry, *, seed: int = 0) -> dict:
    """The ``messages`` record of one candidate; its phrasing is a function of ``(seed, entry.name)``."""
    # Seeded by a string: the same draws in every process (no hash randomisation), and random() is the one method
    # whose sequence Python promises to keep across versions.
    rng = random.Random(f"{seed}:{entry.name}")
    follow_up, system, question, follow_up_form, system_form = (rng.random() for _ in range(5))
    messages = []
    if system < SYSTEM_RATE:
        messages.append({"role": "system", "content": _pick(SYSTEM_PROMPTS, system_form)})
    messages.append({"role": "user", "content": _pick(QUESTIONS, question).format(name=entry.name)})
    messages.append({"role": "assistant", "content": entry.answer})
    if entry.call is not None and follow_up < FOLLOW_UP_RATE:
        no_arguments = entry.call.endswith("()")
        messages.append({"role": "user", "content": _pick(FOLLOW_UPS, follow_up_form)})
        messages.append(
            {"role": "assistant", "content": f"`{entry.call}`" + (": no arguments." if no_arguments else "")}
        )
    return {"messages": messages}


def write_jsonl(records: list[dict], path: Path) -> Path:
    """Write ``records`` to ``path``, one JSON object a line (UTF-8, not ASCII-escaped), creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def _pick(options: tuple[str, ...], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def _modules(stdlib_dir: Path) -> Iterator[tuple[str, Path]]:
    """(module name, source file) of every module walked, in sorted order: top-level ``*.py`` files and packages."""
    for path in sorted(stdlib_dir.iterdir()):
        yield from _walk(path, prefix="")


def _walk(path: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    name = path.stem if path.suffix == ".py" else path.name
    if name.startswith("_") or name in SKIPPED or not name.isidentifier():
        return
    if path.suffix == ".py" and path.is_file():
        yield prefix + name, path
    elif path.is_dir() and (path / "__init__.py").is_file():
        yield prefix + name, path / "__init__.py"
        for child in sorted(path.iterdir()):
            yield from _walk(child, prefix=f"{prefix}{name}.")


def _module_entries(module: str, tree: ast.Module) -> Iterator[Entry]:
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or node.name.startswith("_"):
            continue
        name = f"{module}.{node.name}"
        answer = _answer(node)
        if not isinstance(node, ast.ClassDef):
            if answer is not None:
                yield Entry(name, answer, _call(name, node, method=False))
            continue
        if answer is not None:
            # Called as its own __init__ (or __new__) says; an inherited one is not in this source.
            constructors = [
                item for item in node.body if isinstance(item, ast.FunctionDef) and item.name in _CONSTRUCTORS
            ]
            yield Entry(name, answer, _call(name, constructors[-1]) if constructors else None)
        for item in node.body:
            if not isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) or item.name.startswith("_"):
                continue
            method, answer = f"{name}.{item.name}", _answer(item)
            if answer is not None:
                is_property = bool(_decorators(item) & _PROPERTY_DECORATORS)
                yield Entry(method, answer, None if is_property else _call(method, item))


def _answer(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str | None:
    """The first paragraph of the docstring of ``node`` on one line, cut at a sentence (else word) boundary to at most
    ``MAX_ANSWER_CHARS`` characters; None without a docstring, or where it is too short to be an answer or is an
    example. Signature lines at its start (``wrap(text : string) -> [string]``, as some older modules write) are left
    out."""
    docstring = ast.get_docstring(node)  # clean=True: inspect.cleandoc
    if docstring is None:
        return None
    lines = docstring.splitlines()
    while lines and (lines[0].startswith(node.name + "(") or not lines[0].strip()):
        lines.pop(0)
    text = " ".join(re.split(r"\n\s*\n", "\n".join(lines), maxsplit=1)[0].split())
    if len(text) < MIN_ANSWER_CHARS or text.startswith(">>>"):
        return None
    if len(text) <= MAX_ANSWER_CHARS:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text[: MAX_ANSWER_CHARS + 1])]
    if ends and ends[-1] >= MIN_ANSWER_CHARS:
        return text[: ends[-1]]
    cut = text.rfind(" ", 0, MAX_ANSWER_CHARS - 2)
    return text[: cut if cut >= MIN_ANSWER_CHARS else MAX_ANSWER_CHARS - 3].rstrip(",;:") + "..."


def _decorators(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """The last name of each decorator: ``property``, ``setter`` (``@x.setter``), ``staticmethod``."""
    names = set()
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, ast.Attribute):
            names.add(target.attr)
    return names


def _call(name: str, node: ast.FunctionDef | ast.AsyncFunctionDef, *, method: bool = True) -> str:
    """``name(arguments)`` from the source signature: no annotations, long defaults as ``...``, and for a method
    (or a constructor) without its ``self`` or ``cls``."""
    source = node.args
    posonlyargs, args = [arg.arg for arg in source.posonlyargs], [arg.arg for arg in source.args]
    if method and "staticmethod" not in _decorators(node):
        if posonlyargs:
            posonlyargs.pop(0)
        elif args:
            args.pop(0)
    # Defaults belong to the last positional arguments: dropping the first leaves them aligned unless it had one.
    defaults = source.defaults[max(0, len(source.defaults) - len(posonlyargs) - len(args)) :]
    signature = ast.arguments(
        posonlyargs=[ast.arg(arg) for arg in posonlyargs],
        args=[ast.arg(arg) for arg in args],
        vararg=None if source.vararg is None else ast.arg(source.vararg.arg),
        kwonlyargs=[ast.arg(arg.arg) for arg in source.kwonlyargs],
        kw_defaults=[_short(default) for default in source.kw_defaults],
        kwarg=None if source.kwarg is None else ast.arg(source.kwarg.arg),
        defaults=[_short(default) for default in defaults],
    )
    return f"{name}({ast.unparse(signature)})"


def _short(default: ast.expr | None) -> ast.expr | None:
    if default is not None and len(ast.unparse(default)) > MAX_DEFAULT_CHARS:
        return ast.Constant(value=...)
    return default
