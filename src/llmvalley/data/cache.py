"""On-disk token cache: each (corpus, tokenizer, split) is tokenized once into a flat array.

The array is a raw ``.bin`` file (uint8, uint16 or uint32, the smallest that holds the vocabulary)
read back with ``numpy.memmap``, next to a ``.json`` with its metadata: token and byte counts
(for bits per byte) and the token-unigram entropy of the split. Files are written to a temporary
name private to the writing process and thread, then renamed, so an interrupted build never
leaves a truncated cache behind and concurrent first uses (two sweep workers starting together)
each finish: the last rename wins, with the same contents.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmvalley.atomic import replacing
from llmvalley.data.sources import Corpus
from llmvalley.data.tokenizers import ByteTokenizer, HFTokenizer

CACHE_ENV = "LLMVALLEY_CACHE"
ENCODE_CHUNK = 256  # documents per tokenizer call


def cache_root() -> Path:
    """The cache folder: ``$LLMVALLEY_CACHE`` or ``~/.cache/llmvalley``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmvalley"


@dataclass(frozen=True)
class TokenSplit:
    """A tokenized split: the memory-mapped token array and its metadata."""

    tokens: np.ndarray
    n_bytes: int
    n_docs: int
    unigram_entropy: float  # nats per token, from the split's own token frequencies
    path: Path

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def tokens_per_byte(self) -> float:
        return self.n_tokens / max(self.n_bytes, 1)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} tokens is too large")


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats per token of the empirical token distribution of ``tokens``."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, tokens.shape[0], 1 << 24):  # bounded memory on big splits
        counts += np.bincount(tokens[start:start + (1 << 24)], minlength=vocab_size)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def cache_path(corpus: Corpus, tokenizer: ByteTokenizer | HFTokenizer, split: str,
               root: Path) -> Path:
    """Path (without suffix) of the cache entry for this corpus, tokenizer and split."""
    digest = hashlib.sha1(f"{corpus.key}|{tokenizer.key}|{split}".encode()).hexdigest()[:20]
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in corpus.name)
    return root / "tokens" / f"{safe_name}-{tokenizer.name}-{split}-{digest}"


def _with(base: Path, suffix: str) -> Path:
    """``base`` plus a suffix (corpus names may contain dots, so no ``with_suffix``)."""
    return base.parent / (base.name + suffix)


def _build(corpus: Corpus, tokenizer: ByteTokenizer | HFTokenizer, split: str,
           base: Path) -> dict:
    """Tokenize the split into ``base.bin`` and return its metadata."""
    dtype = token_dtype(tokenizer.vocab_size)
    sep = tokenizer.separator_id
    with replacing(_with(base, ".bin")) as tmp:
        n_tokens, n_docs, n_bytes = _write_tokens(corpus, tokenizer, split, tmp, dtype, sep)
    tokens = np.memmap(_with(base, ".bin"), dtype=dtype, mode="r") if n_tokens else np.zeros(
        0, dtype=dtype)
    return {
        "corpus": corpus.name,
        "corpus_key": corpus.key,
        "tokenizer": tokenizer.name,
        "tokenizer_key": tokenizer.key,
        "split": split,
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_docs": n_docs,
        "unigram_entropy": unigram_entropy(tokens, tokenizer.vocab_size),
    }


def _write_tokens(corpus: Corpus, tokenizer: ByteTokenizer | HFTokenizer, split: str,
                  path: Path, dtype: np.dtype, sep: int | None) -> tuple[int, int, int]:
    """Write the split's tokens to ``path``; return (tokens, documents, bytes)."""
    n_bytes = n_docs = n_tokens = 0
    with open(path, "wb") as out:
        chunk: list[str] = []

        def flush() -> None:
            nonlocal n_tokens
            for ids in tokenizer.encode_batch(chunk):
                if sep is not None and n_tokens:
                    out.write(np.asarray([sep], dtype=dtype).tobytes())
                    n_tokens += 1
                out.write(ids.astype(dtype, copy=False).tobytes())
                n_tokens += len(ids)
            chunk.clear()

        for doc in corpus.documents(split):
            n_docs += 1
            n_bytes += len(doc.encode("utf-8"))
            chunk.append(doc)
            if len(chunk) >= ENCODE_CHUNK:
                flush()
        flush()
    return n_tokens, n_docs, n_bytes


def load_tokens(corpus: Corpus, tokenizer: ByteTokenizer | HFTokenizer, split: str,
                root: Path | None = None) -> TokenSplit:
    """The tokenized ``split``, built on first use and memory-mapped afterwards."""
    root = cache_root() if root is None else root
    base = cache_path(corpus, tokenizer, split, root)
    meta_path = _with(base, ".json")
    if meta_path.is_file() and _with(base, ".bin").is_file():
        meta = json.loads(meta_path.read_text())
    else:
        base.parent.mkdir(parents=True, exist_ok=True)
        meta = _build(corpus, tokenizer, split, base)
        with replacing(meta_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
    dtype = np.dtype(meta["dtype"])
    if meta["n_tokens"]:
        tokens = np.memmap(_with(base, ".bin"), dtype=dtype, mode="r")
    else:
        tokens = np.zeros(0, dtype=dtype)
    entropy = meta["unigram_entropy"]
    return TokenSplit(tokens=tokens, n_bytes=meta["n_bytes"], n_docs=meta["n_docs"],
                      unigram_entropy=entropy if math.isfinite(entropy) else 0.0, path=base)
