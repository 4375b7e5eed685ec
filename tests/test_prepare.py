"""Tokenizer training/conversion and ``prepare_data`` end to end, on real standard-library files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from minima.data import TokenWindowLoader, eval_batches
from minima.prepare import prepare_data, split_documents
from minima.shards import DataError, TokenShards
from minima.tokenizer import load_tokenizer, train_sentencepiece

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
    # the plain AutoTokenizer call: no BOS/EOS is added, ids equal sentencepiece's
    assert hf(texts)["input_ids"] == expected
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
    assert hf(text)["input_ids"] == sp.encode(text)  # the saved config sets split_special_tokens
    assert 2 in hf(text, split_special_tokens=False)["input_ids"]  # the opt-in mapping to the special id
    assert load_tokenizer(tiny_tokenizer_dir).encode_batch([text]) == [sp.encode(text)]


def test_tokenizer_in_a_model_directory_keeps_its_behaviour(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    # An exported llama model directory: tokenizer_config's class wins over config.json's model_type.
    load_tokenizer(tiny_tokenizer_dir / "tokenizer.model").save_pretrained(tmp_path)
    LlamaConfig(vocab_size=1024).save_pretrained(tmp_path)
    text = "import os\n\nclass A:\n    pass\n"
    expected = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model")).encode(text)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == expected


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
    return {"code": code, "jsonl": jsonl, "parquet": parquet, "documents": docs}


def read_documents(split: Path, eos_id: int) -> list[np.ndarray]:
    """The split's documents: the token stream over all shards cut after each EOS (EOS dropped)."""
    stream = np.concatenate(TokenShards.open(split).shards)
    assert stream[-1] == eos_id
    ends = np.flatnonzero(stream == eos_id)
    return [doc[:-1] for doc in np.split(stream, ends + 1)[:-1]]


def test_prepare_end_to_end(corpus: dict, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    jsonl_as_content = tmp_path / "docs.jsonl"
    jsonl_as_content.write_text(corpus["jsonl"].read_text().replace('"text":', '"content":'))
    inputs = [corpus["code"], jsonl_as_content, corpus["parquet"]]
    summary = prepare_data(inputs, tiny_tokenizer_dir, out, text_field="content", valid_fraction=0.25,
                           shard_tokens=5000, seed=1, pattern="**/*.py")  # fmt: skip
    documents = corpus["documents"]
    tok = load_tokenizer(out / "tokenizer")
    assert tok.encode_batch(documents) == load_tokenizer(tiny_tokenizer_dir).encode_batch(documents)
    assert summary["files"] == 7 + 1 + 1  # 6 modules + empty.py, the jsonl, the parquet; no .pyc, no .git

    train, valid = read_documents(out / "train", 2), read_documents(out / "valid", 2)
    is_valid = split_documents(len(documents), 0.25, seed=1)
    assert 0 < len(valid) < len(documents)
    assert [tok.decode(d) for d in train] == [d for d, v in zip(documents, is_valid, strict=True) if not v]
    assert [tok.decode(d) for d in valid] == [d for d, v in zip(documents, is_valid, strict=True) if v]

    for name, docs in (("train", train), ("valid", valid)):
        shards = TokenShards.open(out / name)
        assert shards.index["num_documents"] == summary[name]["documents"] == len(docs)
        assert shards.num_tokens == summary[name]["tokens"] == sum(len(d) + 1 for d in docs)
        assert shards.dtype == np.dtype("<u2") and shards.eos_id == 2 and shards.bos_id == 1
        assert shards.vocab_size == 1024 and shards.tokenizer["source"] == str(tiny_tokenizer_dir)
        assert all(len(s) <= 5000 for s in shards.shards)
    assert summary["train"]["shards"] > 1

    # a rerun overwrites: fewer, larger shards and no stale files
    prepare_data(inputs, tiny_tokenizer_dir, out, text_field="content", valid_fraction=0.25, shard_tokens=10**6,
                 seed=1, pattern="**/*.py")  # fmt: skip
    assert sorted(p.name for p in (out / "train").iterdir()) == ["index.json", "shard_00000.bin"]
    assert [tok.decode(d) for d in read_documents(out / "train", 2)] == [tok.decode(d) for d in train]


def test_single_document_goes_to_train(tmp_path: Path, stdlib_files: list[Path], tiny_tokenizer_dir: Path,
                                       datasets_cache: Path) -> None:  # fmt: skip
    summary = prepare_data(stdlib_files[:1], tiny_tokenizer_dir, tmp_path, valid_fraction=0.5)
    assert summary["train"]["documents"] == 1 and summary["valid"]["documents"] == 0
    assert split_documents(2, 0.0, seed=0).sum() == 1 and split_documents(2, 0.999, seed=0).sum() == 1


def test_json_without_the_text_field_names_the_file(tmp_path: Path, tiny_tokenizer_dir: Path,
                                                     datasets_cache: Path) -> None:  # fmt: skip
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n")
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"body": "hello", "id": 1}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl has no field 'text' \(its fields: \['body', 'id'\]\)"):
        prepare_data([good, bad], tiny_tokenizer_dir, tmp_path / "out")
    parquet = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(parquet)
    with pytest.raises(DataError, match=r"c\.parquet has no column 'text' \(its columns: \['body'\]\)"):
        prepare_data([parquet], tiny_tokenizer_dir, tmp_path / "out")


def test_binary_file_in_a_directory_is_refused(corpus: dict, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"x\.cpython-311\.pyc looks binary .* --pattern"):
        prepare_data([corpus["code"]], tiny_tokenizer_dir, tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        prepare_data([tmp_path / "missing"], tiny_tokenizer_dir, tmp_path / "out")


def test_cli_trains_a_tokenizer_and_prepares(corpus: dict, tmp_path: Path, datasets_cache: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/prepare_data.py", "--input", str(corpus["code"]), "--pattern", "**/*.py",
           "--input", str(corpus["jsonl"]), "--train-tokenizer", "400", "--valid-fraction", "0.2",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": str(datasets_cache), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tokenizer"]["vocab_size"] == 400
    assert summary["train"]["documents"] + summary["valid"]["documents"] == len(corpus["documents"]) - 3
    assert TokenShards.open(out / "train").num_tokens == summary["train"]["tokens"]
    assert len(AutoTokenizer.from_pretrained(out / "tokenizer")) == 400
    # bad input: a clear one-line error, exit status 2
    bad = subprocess.run([sys.executable, "tools/prepare_data.py", "--input", str(corpus["jsonl"]), "--text-field",
                          "body", "--tokenizer", str(out / "tokenizer"), "--out", str(tmp_path / "o2")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "docs.jsonl has no field 'body'" in bad.stderr


def test_loaders_read_prepared_data(tiny_prepared_data: Path, stdlib_files: list[Path]) -> None:
    corpus = "".join(f.read_text() for f in stdlib_files)
    tok = load_tokenizer(tiny_prepared_data / "tokenizer")
    loader = TokenWindowLoader(tiny_prepared_data / "train", seq_len=64, micro_batch_size=4)
    for _ in range(3):
        for row in next(loader).input_ids:
            if 2 not in row:  # a window inside one document decodes to a piece of it
                assert tok.decode(row.tolist()) in corpus
    valid = TokenShards.open(tiny_prepared_data / "valid")
    batches = list(eval_batches(valid, seq_len=64, micro_batch_size=4))
    windows = sum((len(shard) - 1) // 64 for shard in valid.shards)
    assert sum(int((b.labels[:, 0] != -100).sum()) for b in batches) == windows > 0


def test_num_proc_gives_the_same_shards(
    corpus: dict, tiny_tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = load_tokenizer(tiny_tokenizer_dir / "tokenizer.model")
    assert pickle.loads(pickle.dumps(tok)).encode_batch(corpus["documents"]) == tok.encode_batch(corpus["documents"])
    for num_proc in (1, 2):  # a fresh datasets cache each, or the second run reuses the first's tokenisation
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / f"cache{num_proc}")
        prepare_data([corpus["code"]], tok.source, tmp_path / str(num_proc), pattern="**/*.py", num_proc=num_proc)
    for split in ("train", "valid"):
        one, two = (json.loads((tmp_path / n / split / "index.json").read_text()) for n in ("1", "2"))
        assert one["shards"] == two["shards"] and one["num_documents"] == two["num_documents"]
