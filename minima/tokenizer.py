"""Tokenizers: train a sentencepiece BPE on local text, convert it to Hugging Face format, and load either kind.

Trained tokenizers are sized for code: byte fallback (every string is representable, ``unk`` never appears),
identity normalisation, whitespace kept as is (no dummy prefix, no whitespace collapsing, runs of spaces may form
pieces) and digits split. Special ids: ``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos, the document separator),
``<pad>`` 3; none of them is added by ``encode``.

The Hugging Face form is built directly from the sentencepiece model proto as a ``tokenizers`` BPE (the same route
as transformers' ``SpmConverter``/``LlamaConverter``, minus Llama's dummy prefix): the vocabulary is the piece list,
the merge list holds every split of each normal piece into two normal pieces, ranked by the piece's id (sentencepiece
BPE scores fall with the id, so lower id = merged earlier), the normaliser maps " " to "▁", there is no pre-tokenizer
(sentencepiece's BPE does not split before merging either) and the decoder maps "▁" back and fuses byte pieces.
Control and byte pieces never take part in merges, as in sentencepiece.

Exactness: the two produce the same ids, and decode to the same text, on every ``.py`` file of the CPython 3.11
standard library (1790 files, 31 MB; vocabularies of 4096 and 32000 ids checked; the tests check a sample).
Text that contains a special token's literal string ("</s>", "<s>", "<pad>", "<unk>") is tokenised as text, as
sentencepiece does: the saved ``tokenizer_config.json`` sets ``split_special_tokens: true`` (pass
``split_special_tokens=False`` to map such strings to the special ids). One theoretical difference remains:
sentencepiece breaks ties between equal-score merges at different positions leftmost-first, while ``tokenizers``
ranks pairs, so in a state ``[x][y][z]`` with ``x+y == y+z`` and ``len(x) > len(y)`` (e.g. ``[aa][a][aa]``) it
merges the right pair first. No such case occurs in the standard library. Decoding differs only for id sequences
that are not valid UTF-8 (a multi-byte character cut by a window edge): ``tokenizers`` turns each byte of an
invalid run of byte pieces into U+FFFD, sentencepiece only the bytes that do not form characters.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as RustTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPM_MODEL_FILE = "tokenizer.model"
# Files that define a Hugging Face tokenizer; their bytes make up the tokenizer's sha256 (weights never do).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tekken.json",
)
_SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


def _reservoir_lines(texts: Iterable[str], max_sentences: int, seed: int) -> list[str]:
    """A uniform sample of at most ``max_sentences`` non-blank lines of ``texts`` (reservoir sampling, seeded)."""
    rng = np.random.default_rng(seed)
    sample: list[str] = []
    seen = 0
    for text in texts:
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            continue
        fill = min(max(max_sentences - len(sample), 0), len(lines))
        sample.extend(lines[:fill])
        rest = lines[fill:]
        if rest:
            # Line number seen + fill + j + 1 replaces a uniform slot when the drawn slot is below max_sentences.
            slots = rng.integers(0, np.arange(seen + fill + 1, seen + len(lines) + 1))
            for j in np.flatnonzero(slots < max_sentences).tolist():
                sample[slots[j]] = rest[j]
        seen += len(lines)
    return sample


def train_sentencepiece_from_texts(
    texts: Iterable[str], out_dir: str | Path, *, vocab_size: int, max_sentences: int = 200_000, seed: int = 0
) -> Path:
    """Train a sentencepiece BPE on documents and write it as a Hugging Face tokenizer directory.

    Args:
        texts: documents (str); each is split into lines, and a seeded uniform sample of ``max_sentences``
            non-blank lines trains the model (newlines themselves become the byte piece ``<0x0A>``).
        out_dir: output directory; receives ``tokenizer.model`` (sentencepiece), ``tokenizer.json`` and
            ``tokenizer_config.json`` (``AutoTokenizer.from_pretrained(out_dir)`` loads it).
        vocab_size: number of ids, including the 4 special pieces and the 256 byte pieces.
        max_sentences: lines sampled for training; 200k lines train in ~2 s on 2 cores.
        seed: seeds the line sample.

    Returns:
        ``out_dir``.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (4 special and 256 byte pieces come first), got {vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = _reservoir_lines(texts, max_sentences, seed)
    if not lines:
        raise ValueError(f"no text to train a tokenizer on for {out_dir}: every input document is blank")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,  # a document's first line is encoded like any line after "\n"
            allow_whitespace_only_pieces=True,  # indentation runs become pieces
            split_digits=True,
            character_coverage=0.9995,
            max_sentence_length=16384,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece could not train a {vocab_size}-id tokenizer on {len(lines)} lines ({e}); "
            "use a smaller vocab_size or more text"
        ) from e
    # The model records the trainer's settings; drop the machine-dependent one so that the same text, vocab_size
    # and seed give the same bytes (and tokenizer sha256) everywhere.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    proto.trainer_spec.ClearField("num_threads")
    model_file = out_dir / SPM_MODEL_FILE
    model_file.write_bytes(proto.SerializeToString())
    sentencepiece_to_hf(model_file).save_pretrained(out_dir)
    return out_dir


def train_sentencepiece(
    files: Sequence[Path], out_dir: Path, *, vocab_size: int, max_sentences: int = 200_000, seed: int = 0
) -> Path:
    """Train a sentencepiece BPE on local UTF-8 text files and write a Hugging Face tokenizer directory.

    See ``train_sentencepiece_from_texts``; each file is one document (invalid UTF-8 bytes read as U+FFFD).
    Returns ``out_dir``.
    """
    if not files:
        raise ValueError("train_sentencepiece needs at least one text file")
    texts = (Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
    return train_sentencepiece_from_texts(texts, out_dir, vocab_size=vocab_size, max_sentences=max_sentences, seed=seed)


def sentencepiece_to_hf(model_file: str | Path) -> PreTrainedTokenizerFast:
    """Convert a sentencepiece BPE model with byte fallback into an equivalent Hugging Face fast tokenizer.

    The mapping is described in this module's docstring. Supported: BPE models trained with ``byte_fallback``,
    no dummy prefix and no normalisation rule (as ``train_sentencepiece`` trains them); others are refused rather
    than converted approximately.
    """
    model_file = Path(model_file)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        problems.append("model_type is not BPE")
    if not spec.byte_fallback:
        problems.append("byte_fallback is off")
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or norm.precompiled_charsmap:
        problems.append("it normalises text (dummy prefix, whitespace collapsing or a normalisation rule)")
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    if any(p.type in (piece_type.USER_DEFINED, piece_type.UNUSED) for p in proto.pieces):
        problems.append("it has user-defined or unused pieces")
    if problems:
        raise ValueError(
            f"{model_file}: cannot convert exactly to a Hugging Face tokenizer because {', '.join(problems)}; "
            "train one with minima.tokenizer.train_sentencepiece or load the .model file with load_tokenizer"
        )

    pieces = [(p.piece, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    mergeable = {piece for piece, kind in pieces if kind == piece_type.NORMAL}
    merges = []
    for piece, kind in pieces:  # id order = merge priority
        if kind == piece_type.NORMAL:
            merges += [(piece[:k], piece[k:]) for k in range(1, len(piece)) if {piece[:k], piece[k:]} <= mergeable]
    backend = RustTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=spec.unk_piece, fuse_unk=True, byte_fallback=True)
    )
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [piece for piece, kind in pieces if kind in (piece_type.CONTROL, piece_type.UNKNOWN)]
    backend.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in specials])

    def piece_or_none(index: int) -> str | None:
        return pieces[index][0] if 0 <= index < len(pieces) else None

    bos = piece_or_none(spec.bos_id)
    if bos is not None:  # LLaMA's convention: a sequence starts with BOS when special tokens are added
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)]
        )

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=piece_or_none(spec.unk_id),
        bos_token=piece_or_none(spec.bos_id),
        eos_token=piece_or_none(spec.eos_id),
        pad_token=piece_or_none(spec.pad_id),
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # literal "</s>" in text is text, as in sentencepiece and in the shards
    )


def _hash_files(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        data = file.read_bytes()
        digest.update(f"{file.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


class Tokenizer:
    """A loaded tokenizer (sentencepiece ``.model`` or Hugging Face directory) with the few calls prepare needs.

    Attributes:
        kind: ``"sentencepiece"`` or ``"huggingface"``.
        source: the path as given to ``load_tokenizer``.
        vocab_size: number of ids it can produce (``len`` of the HF tokenizer, piece count for sentencepiece).
        eos_id: the end-of-sequence id, used as the document separator.
        bos_id: the beginning-of-sequence id, or None.
        sha256: digest over the tokenizer's files (see ``HF_TOKENIZER_FILES``).
    """

    def __init__(self, source: str | Path) -> None:
        self.source = str(source)
        path = Path(source)
        if path.is_file() and path.suffix == ".model":
            self.kind = "sentencepiece"
            self._files = [path]
        elif path.is_dir() and any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            self.kind = "huggingface"
            self._files = [path / name for name in sorted(HF_TOKENIZER_FILES) if (path / name).is_file()]
        elif path.is_dir() and (path / SPM_MODEL_FILE).is_file():
            self.kind = "sentencepiece"
            self._files = [path / SPM_MODEL_FILE]
        else:
            raise FileNotFoundError(
                f"no tokenizer at {source}: expected a Hugging Face tokenizer directory (tokenizer.json or "
                "tokenizer_config.json) or a sentencepiece .model file; train one with "
                "tools/prepare_data.py --train-tokenizer VOCAB_SIZE"
            )
        self.sha256 = _hash_files(self._files)
        self._load()

    def _load(self) -> None:
        if self.kind == "sentencepiece":
            self._sp = spm.SentencePieceProcessor(model_file=str(self._files[0]))
            self.vocab_size = self._sp.get_piece_size()
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        else:
            self._hf = AutoTokenizer.from_pretrained(self.source)
            self.vocab_size = len(self._hf)
            self.eos_id = self._hf.eos_token_id
            self.bos_id = self._hf.bos_token_id
        if self.eos_id is None:
            raise ValueError(
                f"tokenizer {self.source} has no EOS token, which prepare needs as the document separator; "
                "set eos_token in its tokenizer_config.json (or train one with --train-tokenizer)"
            )

    # Pickled by reference (path + digest) so that datasets.map can ship it to worker processes and fingerprint it.
    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "sha256": self.sha256, "_files": self._files}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._load()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, source={self.source!r}, vocab_size={self.vocab_size})"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; no BOS/EOS added, and special tokens' literal strings are encoded as text."""
        if self.kind == "sentencepiece":
            return self._sp.encode(texts)
        encoded = self._hf(
            texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False, verbose=False
        )
        return encoded["input_ids"]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; special tokens (bos, eos, pad) are dropped."""
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def identity(self) -> dict[str, Any]:
        """The ``tokenizer`` entry of a prepared split's index: kind, source, sha256, vocab_size."""
        return {"kind": self.kind, "source": self.source, "sha256": self.sha256, "vocab_size": self.vocab_size}

    @property
    def adds_bos(self) -> bool:
        """Whether this tokenizer's family starts a sequence with BOS, so that prepared documents get one.

        Hugging Face tokenizers: whether encoding "a" with ``add_special_tokens=True`` starts with ``bos_token_id``
        (Llama's and minima's converted ones do; GPT-2's and Qwen's do not). Sentencepiece
        ``.model`` tokenizers (minima's own, LLaMA-style): whether the model has a BOS piece.
        """
        if self.bos_id is None:
            return False
        if self.kind == "sentencepiece":
            return True
        ids = self._hf("a", add_special_tokens=True, split_special_tokens=True)["input_ids"]
        return bool(ids) and ids[0] == self.bos_id

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write Hugging Face tokenizer files to ``out_dir`` (``AutoTokenizer.from_pretrained`` loads them)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.kind == "huggingface":
            self._hf.save_pretrained(out_dir)
        else:
            sentencepiece_to_hf(self._files[0]).save_pretrained(out_dir)
            if self._files[0].resolve() != (out_dir / SPM_MODEL_FILE).resolve():
                shutil.copyfile(self._files[0], out_dir / SPM_MODEL_FILE)
        return out_dir


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a Hugging Face tokenizer directory (or a model directory with tokenizer files) or a sentencepiece
    ``.model`` file. Raises ValueError for a tokenizer without an EOS token."""
    return Tokenizer(path)
