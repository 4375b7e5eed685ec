"""Tokenizer training/conversion and ``prepare_data`` end to end (sources, workers, restarts), on real stdlib files."""

from __future__ import annotations

import gzip
import importlib.util
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import sentencepiece as spm
import zstandard
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from minima.data import TokenWindowLoader, eval_batches
from minima.prepare import prepare_data, prepare_sources, split_documents, training_texts
from minima.prepare_units import document_draws
from minima.shards import DataError, TokenShards
from minima.sources import Source
from minima.tokenizer import load_tokenizer, sentencepiece_to_hf, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
# Not in the tokenizer's training files: tabs, CRLF, unicode outside the vocabulary (byte fallback), long indents.
HELD_OUT_MODULES = ("tokenize.py", "pprint.py", "dataclasses.py", "argparse.py", "json/decoder.py", "csv.py")
EDGE_CASES = (
    "",
    " ",
    "\n\n\n",
    "  leading spaces\n\ttab\r\nwindows\rold mac",
    "x = 'é ☃ 𝄞 日本語 😀'\n" + " " * 37 + "deep()\n",
    "def f():\n    return 1   \n",
    "a\u00a0b\u200bc\x00d",  # no-break space, zero-width space, NUL
    "print('</s>', '<s>', '<pad>', '<unk>')",  # special tokens' strings are text
)


def test_hf_tokenizer_matches_sentencepiece(tiny_tokenizer_dir: Path, stdlib_dir: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(hf) == sp.get_piece_size() == 1024
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    texts = [(stdlib_dir / name).read_text(encoding="utf-8") for name in HELD_OUT_MODULES] + list(EDGE_CASES)
    expected = sp.encode(texts)
    # without special tokens the ids equal sentencepiece's; the plain call puts BOS first, as LLaMA's tokenizer does
    assert hf(texts, add_special_tokens=False)["input_ids"] == expected
    assert hf(texts)["input_ids"] == [[1, *ids] for ids in expected]
    assert [hf.decode(ids) for ids in expected] == [sp.decode(ids) for ids in expected] == texts
    # the same through minima's wrapper, for both kinds
    for source in (tiny_tokenizer_dir, tiny_tokenizer_dir / "tokenizer.model"):
        tok = load_tokenizer(source)
        assert tok.encode_batch(texts) == expected
        assert [tok.decode(ids) for ids in expected] == texts
        assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (1024, 2, 1)
    assert load_tokenizer(tiny_tokenizer_dir).identity()["kind"] == "huggingface"
    assert load_tokenizer(tiny_tokenizer_dir / "tokenizer.model").identity()["kind"] == "sentencepiece"


def test_special_token_strings_in_text_are_text(tiny_tokenizer_dir: Path) -> None:
    text = "html = '<s>bold</s>'  # </s>"
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    assert 2 not in sp.encode(text)
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert hf(text, add_special_tokens=False)["input_ids"] == sp.encode(
        text
    )  # the saved config sets split_special_tokens
    assert 2 in hf(text, split_special_tokens=False)["input_ids"]  # the opt-in mapping to the special id
    assert load_tokenizer(tiny_tokenizer_dir).encode_batch([text]) == [sp.encode(text)]


def test_tokenizer_in_a_model_directory_keeps_its_behaviour(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    # An exported llama model directory: tokenizer_config's class wins over config.json's model_type.
    load_tokenizer(tiny_tokenizer_dir / "tokenizer.model").save_pretrained(tmp_path)
    LlamaConfig(vocab_size=1024).save_pretrained(tmp_path)
    text = "import os\n\nclass A:\n    pass\n"
    expected = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model")).encode(text)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == [1, *expected]  # BOS first, as LLaMA's


def test_train_sentencepiece_is_deterministic(stdlib_files: list[Path], tmp_path: Path) -> None:
    a = train_sentencepiece(stdlib_files[:4], tmp_path / "a", vocab_size=400, max_sentences=500, seed=3)
    b = train_sentencepiece(stdlib_files[:4], tmp_path / "b", vocab_size=400, max_sentences=500, seed=3)
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    assert load_tokenizer(a).identity()["sha256"] == load_tokenizer(b).identity()["sha256"]


def test_tokenizer_without_eos_is_refused(tmp_path: Path) -> None:
    backend = RustTokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no EOS token"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nothing")


def test_large_vocab_is_written_as_uint32(tmp_path: Path, datasets_cache: Path) -> None:
    """Tokenizers over 65536 ids (Llama-3, Qwen) get uint32 shards whose ids round-trip, high ids included."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 70_000)}}
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(tok_dir)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"w{i} w69999 w65536 w3"}) for i in range(10, 30)))
    prepare_data([docs], tok_dir, tmp_path / "out", valid_fraction=0.2, seed=0)
    shards = TokenShards.open(tmp_path / "out" / "train")
    assert shards.dtype == np.dtype("<u4") and shards.vocab_size == 70_000
    tokens = np.concatenate(shards.shards)
    assert {69999, 65536} <= set(tokens.tolist()) and tokens.max() == 69999


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, stdlib_files: list[Path], datasets_cache: Path) -> dict:
    """A directory of .py files (plus a __pycache__ .pyc and a hidden dir), a jsonl and a parquet file."""
    root = tmp_path_factory.mktemp("corpus")
    code = root / "code"
    (code / "sub").mkdir(parents=True)
    for i, f in enumerate(stdlib_files[:6]):
        shutil.copy(f, (code / "sub" if i % 2 else code) / f.name)
    (code / "empty.py").write_text("")
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\x00\x01binary")
    (code / ".git").mkdir()
    (code / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    records = [{"id": i, "text": f.read_text()} for i, f in enumerate(stdlib_files[6:9])] + [{"id": 9, "text": ""}]
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = root / "more.parquet"
    datasets.Dataset.from_dict({"content": [f.read_text() for f in stdlib_files[9:]], "n": [1, 2, 3]}).to_parquet(
        parquet
    )
    code_docs = [p.read_text() for p in sorted(code.glob("**/*.py")) if p.stat().st_size]
    docs = code_docs + [r["text"] for r in records if r["text"]] + [f.read_text() for f in stdlib_files[9:]]
    return {"code": code, "jsonl": jsonl, "parquet": parquet, "documents": docs, "code_documents": code_docs}


def read_documents(split: Path, eos_id: int) -> list[np.ndarray]:
    """The split's documents: the token stream over all shards cut after each EOS (EOS dropped)."""
    stream = np.concatenate(TokenShards.open(split).shards)
    assert stream[-1] == eos_id
    ends = np.flatnonzero(stream == eos_id)
    return [doc[:-1] for doc in np.split(stream, ends + 1)[:-1]]


def expected_split(unit_documents: list[int], valid_fraction: float, seed: int) -> np.ndarray:
    """The documented split of documents numbered in unit order: draws below valid_fraction, then the override."""
    draws = np.concatenate([document_draws(seed, u, np.arange(n)) for u, n in enumerate(unit_documents)])
    is_valid = draws < valid_fraction
    if is_valid.all():
        is_valid[np.argmax(draws)] = False
    elif not is_valid.any() and valid_fraction > 0 and len(draws) >= 2:
        is_valid[np.argmin(draws)] = True
    return is_valid


def split_files(out: Path) -> dict[str, bytes]:
    """Every file of the train and valid splits of ``out`` (index.json included), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for split in ("train", "valid") for p in (out / split).iterdir()}


def test_prepare_end_to_end(corpus: dict, tiny_tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    jsonl_as_content = tmp_path / "docs.jsonl"
    jsonl_as_content.write_text(corpus["jsonl"].read_text().replace('"text":', '"content":'))
    inputs = [corpus["code"], jsonl_as_content, corpus["parquet"]]
    options = {"text_field": "content", "valid_fraction": 0.25, "seed": 1, "pattern": "**/*.py", "unit_bytes": 10**9}
    summary = prepare_data(inputs, tiny_tokenizer_dir, out, shard_tokens=5000, **options)
    documents = corpus["documents"]
    tok = load_tokenizer(out / "tokenizer")
    assert tok.encode_batch(documents) == load_tokenizer(tiny_tokenizer_dir).encode_batch(documents)
    assert summary["files"] == 7 + 1 + 1  # 6 modules + empty.py, the jsonl, the parquet; no .pyc, no .git
    assert summary["units"] == 3  # the code directory (one unit of text files), the jsonl, the parquet

    train, valid = read_documents(out / "train", 2), read_documents(out / "valid", 2)
    is_valid = expected_split([6, 3, 3], 0.25, seed=1)
    assert 0 < len(valid) < len(documents)
    assert [tok.decode(d) for d in train] == [d for d, v in zip(documents, is_valid, strict=True) if not v]
    assert [tok.decode(d) for d in valid] == [d for d, v in zip(documents, is_valid, strict=True) if v]

    for name, docs in (("train", train), ("valid", valid)):
        shards = TokenShards.open(out / name, verify_checksums=True)
        assert shards.index["num_documents"] == summary[name]["documents"] == len(docs)
        assert shards.num_tokens == summary[name]["tokens"] == sum(len(d) + 1 for d in docs)  # BOS in d, EOS
        assert shards.dtype == np.dtype("<u2") and shards.eos_id == 2 and shards.bos_id == 1
        assert shards.vocab_size == 1024 and shards.tokenizer["source"] == str(tiny_tokenizer_dir)
        assert shards.bos_per_document and shards.index["num_units"] == 3
        assert (
            shards.index["num_bytes"]
            == summary[name]["bytes"]
            == sum(p.stat().st_size for p in (out / name).glob("*.bin"))
        )
        assert all(len(s) <= 5000 for s in shards.shards)
    assert summary["train"]["shards"] > 3

    # the same options again: every unit is kept; other options: it starts over, without stale files
    assert prepare_data(inputs, tiny_tokenizer_dir, out, shard_tokens=5000, **options)["units_written"] == 0
    capsys.readouterr()
    prepare_data(inputs, tiny_tokenizer_dir, out, shard_tokens=10**6, **options)
    assert "shard_tokens changed since the last preparation: starting over" in capsys.readouterr().err
    units_with_train = sorted({int(f.split("_")[1]) for f in os.listdir(out / "train") if f.startswith("shard_")})
    expected = {"index.json", *(f"{k}_{u:05d}_00000.bin" for u in units_with_train for k in ("shard", "docs"))}
    assert set(os.listdir(out / "train")) == expected and len(units_with_train) == 3
    assert [tok.decode(d) for d in read_documents(out / "train", 2)] == [tok.decode(d) for d in train]


def test_workers_give_identical_bytes(corpus: dict, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    inputs = [corpus["code"], corpus["jsonl"]]
    options = {"pattern": "**/*.py", "valid_fraction": 0.3, "shard_tokens": 4000, "unit_bytes": 20_000}
    one = prepare_data(inputs, tiny_tokenizer_dir, tmp_path / "1", workers=1, **options)
    two = prepare_data(inputs, tiny_tokenizer_dir, tmp_path / "2", workers=2, **options)
    assert one["units"] == two["units"] >= 4 and one["valid"]["documents"] > 0
    assert split_files(tmp_path / "1") == split_files(tmp_path / "2")
    assert two["tokens_per_worker_second"] > 0 and two["workers"] == 2


def test_restart_after_a_kill(stdlib_files: list[Path], tiny_tokenizer_dir: Path, tmp_path: Path,
                              datasets_cache: Path) -> None:  # fmt: skip
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        shutil.copy(stdlib_files[i % len(stdlib_files)], corpus / f"{i:03d}.py")
    args, options = ([corpus], tiny_tokenizer_dir, tmp_path / "out"), {"valid_fraction": 0.2, "unit_bytes": 1}
    out, state = tmp_path / "out", tmp_path / "out" / ".prepare"  # unit_bytes=1: one file per unit, 40 units
    child = multiprocessing.get_context("fork").Process(target=prepare_data, args=args, kwargs=options)
    child.start()
    while child.is_alive() and not (state / "unit_00002.json").exists():
        time.sleep(0.001)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    complete = sorted(state.glob("unit_*.json"))
    assert 3 <= len(complete) < 40, "the kill came after the last unit"
    assert not (out / "train" / "index.json").exists()  # readers refuse the unfinished split
    kept = {}  # the files of the complete units, with their (inode, mtime)
    for manifest in complete:
        for split, entries in json.loads(manifest.read_text())["entries"].items():
            for name in [n for e in entries for n in (e["file"], e["file"].replace("shard_", "docs_"))]:
                stat = (out / split / name).stat()
                kept[out / split / name] = (stat.st_ino, stat.st_mtime_ns)
    # the unit after the last complete one, as a kill while writing it leaves it (when the kill came between units)
    partial = out / "train" / f"shard_{len(complete):05d}_00000.bin"
    if not partial.exists():
        partial.write_bytes(b"\x01\x00" * 100)

    summary = prepare_data(*args, **options)
    assert summary["units_written"] == 40 - len(complete)
    assert {f: ((s := f.stat()).st_ino, s.st_mtime_ns) for f in kept} == kept  # complete units were not redone
    prepare_data([corpus], tiny_tokenizer_dir, tmp_path / "reference", **options)
    assert split_files(out) == split_files(tmp_path / "reference")
    TokenShards.open(out / "train", verify_checksums=True)


def test_several_sources_share_one_tokenizer(corpus: dict, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mix"
    summary = prepare_sources(
        [Source("code", (str(corpus["code"]),)), Source("tables", (str(corpus["parquet"]),), "content")],
        tiny_tokenizer_dir,
        out,
        pattern="**/*.py",
        valid_fraction=0.3,
    )
    prepare_data([corpus["jsonl"]], out / "tokenizer", out, source="docs", valid_fraction=0.3)  # a later call
    assert sorted(p.name for p in out.iterdir()) == ["code", "docs", "tables", "tokenizer"]
    assert [s["name"] for s in summary["sources"]] == ["code", "tables"]
    tok = load_tokenizer(out / "tokenizer")
    expected = {"code": corpus["code_documents"], "docs": corpus["documents"][6:9], "tables": corpus["documents"][9:]}
    for name, docs in expected.items():
        splits = [TokenShards.open(out / name / split) for split in ("train", "valid")]
        assert all(s.index["source"] == name and s.tokenizer["sha256"] for s in splits)
        assert all(s.index["num_documents"] > 0 for s in splits)
        decoded = [tok.decode(d) for split in ("train", "valid") for d in read_documents(out / name / split, 2)]
        assert sorted(decoded) == sorted(docs)

    model = tiny_tokenizer_dir / "tokenizer.model"  # another tokenizer (its ids get a BOS per document)
    with pytest.raises(DataError, match=rf"{out} already holds code, docs, tables tokenized with .*tokenizer .*but "
                                        rf"{model} is a different tokenizer"):  # fmt: skip
        prepare_data([corpus["jsonl"]], model, out, source="more")
    assert not (out / "more").exists()
    for bad in ("train", "a/b", "", ".hidden"):
        with pytest.raises(DataError, match="source name"):
            Source(bad, ("x",))


def test_cli_sources_and_fields(corpus: dict, tiny_tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("prepare_data_tool", REPO / "tools" / "prepare_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.parse_sources(None, ["a=x,y*", "b=z"], ["content", "b=body"]) == [
        Source("a", ("x", "y*"), "content"),
        Source("b", ("z",), "body"),
    ]
    assert tool.parse_sources(["x", "y"], ["web"], []) == [Source("web", ("x", "y"))]
    assert tool.parse_sources(["x"], [], ["f"]) == [Source(None, ("x",), "f")]
    for inputs, sources, fields, message in (
        (["x"], ["a=y"], [], "either --input"),
        (None, ["a=y"], ["c=f"], "unknown sources"),
        (None, [], [], "no inputs"),
        (None, ["web"], [], "--source NAME"),
    ):
        with pytest.raises(DataError, match=message):
            tool.parse_sources(inputs, sources, fields)
    out = tmp_path / "out"
    argv = ["--source", f"code={corpus['code']}", "--source", f"docs={corpus['jsonl']},{corpus['parquet']}",
            "--text-field", "docs=content", "--pattern", "**/*.py", "--tokenizer", str(tiny_tokenizer_dir),
            "--out", str(out), "--valid-fraction", "0.3"]  # fmt: skip
    assert tool.main(argv) == 2  # the jsonl has no "content" field
    assert f"error: {corpus['jsonl']} has no field 'content'" in capsys.readouterr().err
    argv[3] = f"docs={corpus['parquet']}"
    assert tool.main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert [s["name"] for s in summary["sources"]] == ["code", "docs"]
    assert f"code: {summary['sources'][0]['train']['tokens']:,} train tokens" in captured.err
    assert "docs: " in captured.err and (out / "docs" / "valid" / "index.json").is_file()


def test_bos_per_document_where_the_tokenizer_adds_it(tiny_tokenizer_dir: Path, stdlib_files: list[Path],
                                                       tmp_path: Path, datasets_cache: Path) -> None:  # fmt: skip
    model = tiny_tokenizer_dir / "tokenizer.model"
    assert load_tokenizer(model).adds_bos  # sentencepiece, LLaMA-style
    assert load_tokenizer(tiny_tokenizer_dir).adds_bos  # its Hugging Face form puts BOS first too, as LLaMA's
    gpt2_like = sentencepiece_to_hf(model)
    gpt2_like.backend_tokenizer.post_processor = None  # a family that starts sequences without BOS
    gpt2_like.save_pretrained(tmp_path / "gpt2_like")
    assert not load_tokenizer(tmp_path / "gpt2_like").adds_bos

    summary = prepare_data(stdlib_files[:6], model, tmp_path / "out", valid_fraction=0.3, shard_tokens=3000)
    assert summary["tokenizer"]["adds_bos"]
    tok, texts = load_tokenizer(model), [f.read_text() for f in stdlib_files[:6]]
    decoded = []
    for split in ("train", "valid"):
        shards = TokenShards.open(tmp_path / "out" / split)
        assert shards.bos_per_document and shards.index["num_documents"] > 0
        for shard, starts in zip(shards.shards, shards.doc_starts, strict=True):
            assert (shard[starts] == 1).all()
        stream = np.concatenate(shards.shards)
        bos = np.flatnonzero(stream == 1)  # id 1 is only ever a BOS: "<s>" in text is text
        assert len(bos) == shards.index["num_documents"] and bos[0] == 0 and (stream[bos[1:] - 1] == 2).all()
        decoded += [tok.decode(d) for d in np.split(stream, bos[1:])]
    assert sorted(decoded) == sorted(texts)


def test_inputs_in_every_format_and_as_a_dataset(corpus: dict, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in corpus["jsonl"].read_text().splitlines()]
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (data / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), data / "c.arrow")
    options = {"valid_fraction": 0.3, "shard_tokens": 4000}
    summary = prepare_data([f"{data}/*.*"], tiny_tokenizer_dir, tmp_path / "files", **options)  # a glob
    assert summary["units"] == 3 and summary["files"] == 3
    tok = load_tokenizer(tiny_tokenizer_dir)
    decoded = [tok.decode(d) for s in ("train", "valid") for d in read_documents(tmp_path / "files" / s, 2)]
    assert sorted(decoded) == sorted(3 * [r["text"] for r in rows if r["text"]])

    jsonl_dir = tmp_path / "jsonl"  # a local dataset directory read by load_dataset, one unit per shard (file)
    jsonl_dir.mkdir()
    for name in ("x", "y"):
        shutil.copy(corpus["jsonl"], jsonl_dir / f"{name}.jsonl")
    prepare_data([f"hf:{jsonl_dir}"], tiny_tokenizer_dir, tmp_path / "dataset", **options)
    prepare_data([jsonl_dir], tiny_tokenizer_dir, tmp_path / "dir", **options)
    assert split_files(tmp_path / "dataset") == split_files(tmp_path / "dir")


def test_single_document_goes_to_train(tmp_path: Path, stdlib_files: list[Path], tiny_tokenizer_dir: Path,
                                       datasets_cache: Path) -> None:  # fmt: skip
    summary = prepare_data(stdlib_files[:1], tiny_tokenizer_dir, tmp_path, valid_fraction=0.99)
    assert summary["train"]["documents"] == 1 and summary["valid"]["documents"] == 0
    assert split_documents(2, 0.0, seed=0).sum() == 1 and split_documents(2, 0.999, seed=0).sum() == 1


def test_split_draws_and_the_tokenizer_sees_only_training_documents(
    corpus: dict, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    draws = document_draws(7, 3, np.arange(200_000))
    assert draws.min() >= 0 and draws.max() < 1 and abs((draws < 0.1).mean() - 0.1) < 0.003
    assert (document_draws(7, 3, np.arange(5, 10)) == draws[5:10]).all()  # a function of the ordinal alone
    assert not np.isin(document_draws(7, 4, np.arange(100)), draws).any()  # other units draw otherwise
    # 6 documents at valid_fraction 0.01 (none drawn: the lowest is held out) and 0.5 (the plain draw)
    source = Source(None, (str(corpus["code"]),))
    for valid_fraction in (0.01, 0.5):
        out = tmp_path / str(valid_fraction)
        prepare_data([corpus["code"]], tiny_tokenizer_dir, out, pattern="**/*.py", valid_fraction=valid_fraction)
        tok = load_tokenizer(out / "tokenizer")
        train = [tok.decode(d) for d in read_documents(out / "train", 2)]
        texts = training_texts([source], valid_fraction=valid_fraction, seed=0, pattern="**/*.py", unit_bytes=None)
        assert sorted(texts) == sorted(train) and len(train) < 6
        assert len(read_documents(out / "valid", 2)) == 6 - len(train)


def test_bad_inputs_are_named(corpus: dict, tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n")
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"body": "hello", "id": 1}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl has no field 'text' \(its fields: \['body', 'id'\]\)"):
        prepare_data([good, bad], tiny_tokenizer_dir, tmp_path / "out")
    zst = tmp_path / "c.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(bad.read_bytes()))
    with pytest.raises(DataError, match=r"c\.jsonl\.zst has no field 'text'"):
        prepare_data([zst], tiny_tokenizer_dir, tmp_path / "out")
    parquet = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(parquet)
    with pytest.raises(DataError, match=r"c\.parquet has no column 'text' \(its columns: \['body'\]\)"):
        prepare_data([parquet], tiny_tokenizer_dir, tmp_path / "out")
    with pytest.raises(DataError, match=r"b\.jsonl: field 'id' holds int values, not text"):
        prepare_data([bad], tiny_tokenizer_dir, tmp_path / "out", text_field="id")
    with pytest.raises(DataError, match=r"x\.cpython-311\.pyc looks binary .* --pattern"):
        prepare_data([corpus["code"]], tiny_tokenizer_dir, tmp_path / "out")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match=r"empty\.jsonl'\] hold no non-empty documents"):
        prepare_data([empty], tiny_tokenizer_dir, tmp_path / "out")
    truncated = tmp_path / "d.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    with pytest.raises(DataError, match=r"d\.jsonl\.gz could not be read"):
        prepare_data([truncated], tiny_tokenizer_dir, tmp_path / "out")
    for missing, message in ((tmp_path / "missing", "does not exist"), (f"{tmp_path}/*.nothing", "matches no files"),
                             (tmp_path / "x.jsonl", "does not exist")):  # fmt: skip
        with pytest.raises(DataError, match=message):
            prepare_data([missing], tiny_tokenizer_dir, tmp_path / "out")
    with pytest.raises(DataError, match="workers must be >= 1"):
        prepare_data([good], tiny_tokenizer_dir, tmp_path / "out", workers=0)


def test_cli_trains_a_tokenizer_and_prepares(corpus: dict, tmp_path: Path, datasets_cache: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/prepare_data.py", "--input", str(corpus["code"]), "--pattern", "**/*.py",
           "--input", str(corpus["jsonl"]), "--train-tokenizer", "400", "--valid-fraction", "0.2",
           "--out", str(out), "--workers", "2"]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": str(datasets_cache), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tokenizer"]["vocab_size"] == 400
    assert summary["train"]["documents"] + summary["valid"]["documents"] == len(corpus["documents"]) - 3
    assert TokenShards.open(out / "train").num_tokens == summary["train"]["tokens"]
    assert len(AutoTokenizer.from_pretrained(out / "tokenizer")) == 400
    assert f"out: {summary['train']['tokens']:,} train tokens" in result.stderr


def test_loaders_read_prepared_data(tiny_prepared_data: Path, stdlib_files: list[Path]) -> None:
    corpus = "".join(f.read_text() for f in stdlib_files)
    tok = load_tokenizer(tiny_prepared_data / "tokenizer")
    loader = TokenWindowLoader(tiny_prepared_data / "train", seq_len=64, micro_batch_size=4)
    for _ in range(3):
        for row in next(loader).input_ids:
            if 2 not in row:  # a window inside one document decodes to a piece of it
                assert tok.decode(row.tolist()) in corpus
    valid = TokenShards.open(tiny_prepared_data / "valid")
    batches = list(eval_batches(valid, seq_len=64, micro_batch_size=4, documents="off"))
    windows = sum((len(shard) - 1) // 64 for shard in valid.shards)
    assert sum(int((b.labels[:, 0] != -100).sum()) for b in batches) == windows > 0
    bos = list(eval_batches(valid, seq_len=64, micro_batch_size=4))  # auto: every window starts with BOS
    assert all(bool((b.input_ids[b.labels[:, -1] != -100, 0] == 1).all()) for b in bos)
