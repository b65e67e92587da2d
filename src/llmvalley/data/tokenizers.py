"""Tokenizers for ``valley train``: byte-level, a BPE trained on the corpus, or a user's file.

Every tokenizer has a ``key`` that changes whenever its output could change (the token cache is
keyed by it), a ``vocab_size`` (the model's vocabulary follows it) and a document separator id
placed between concatenated documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from llmvalley.atomic import replacing
from llmvalley.cli import UsageError
from llmvalley.data.sources import Corpus

EOS_TOKEN = "<|endoftext|>"
ACCEPTED_TOKENIZERS = "byte, bpe (with --vocab-size N), bpe:N, or a path to a tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256); documents are separated by the NUL byte."""

    key = "byte"
    name = "byte"
    vocab_size = 256
    separator_id = 0

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids (invalid UTF-8 is replaced)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (BPE trained here, or a user's tokenizer.json)."""

    def __init__(self, tokenizer, name: str) -> None:  # tokenizer: tokenizers.Tokenizer
        self._tok = tokenizer
        self.name = name
        serialized = tokenizer.to_str()
        self.key = "hf-" + hashlib.sha1(serialized.encode("utf-8")).hexdigest()[:16]
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eos = tokenizer.token_to_id(EOS_TOKEN)
        self.separator_id = eos if eos is not None else None

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (no special tokens added)."""
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids."""
        return self._tok.decode([int(i) for i in ids])

    def save(self, path: Path) -> None:
        """Write the tokenizer as a tokenizer.json."""
        self._tok.save(str(path))


def train_bpe(texts: Iterator[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries (EOS included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, f"bpe-{vocab_size}")


def load_tokenizer_file(path: Path) -> HFTokenizer:
    """Load a user's tokenizer.json."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise UsageError(f"tokenizer file {path} does not exist; --tokenizer accepts "
                         f"{ACCEPTED_TOKENIZERS}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise UsageError(f"{path} is not a valid tokenizer.json ({exc})") from None
    return HFTokenizer(tok, path.name)


def parse_tokenizer_spec(spec: str, vocab_size: int | None) -> tuple[str, int | None]:
    """Split a ``--tokenizer`` value into a kind (byte, bpe, file) and a BPE vocabulary size."""
    if spec == "byte":
        return "byte", None
    if spec == "bpe" or spec.startswith("bpe:"):
        size_text = spec[4:] if spec.startswith("bpe:") else None
        if size_text is not None:
            try:
                vocab_size = int(size_text)
            except ValueError:
                raise UsageError(f"bad BPE vocabulary size {size_text!r}; expected an integer "
                                 "such as bpe:8192") from None
        if vocab_size is None:
            raise UsageError("--tokenizer bpe needs a vocabulary size: --vocab-size N or bpe:N")
        if not 260 <= vocab_size <= 2**31 - 1:
            raise UsageError(f"BPE vocabulary size must be at least 260, got {vocab_size}")
        return "bpe", vocab_size
    if spec.endswith(".json"):
        return "file", None
    raise UsageError(f"unknown tokenizer {spec!r}; --tokenizer accepts {ACCEPTED_TOKENIZERS}")


def build_tokenizer(spec: str, corpus: Corpus, cache_root: Path, *,
                    vocab_size: int | None = None) -> ByteTokenizer | HFTokenizer:
    """Resolve ``--tokenizer``: a trained BPE is cached per corpus and vocabulary size."""
    kind, size = parse_tokenizer_spec(spec, vocab_size)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "file":
        return load_tokenizer_file(Path(spec).expanduser())
    path = cache_root / "tokenizers" / f"bpe-{size}-{corpus.key}.json"
    if path.is_file():
        from tokenizers import Tokenizer

        return HFTokenizer(Tokenizer.from_file(str(path)), f"bpe-{size}")
    tokenizer = train_bpe(corpus.documents("train"), size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tokenizer.save(tmp)
    return tokenizer
