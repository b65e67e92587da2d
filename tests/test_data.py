"""Corpus sources, splits, tokenizers, the token cache and batching of ``valley train``."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from llmvalley.cli import UsageError
from llmvalley.data import (
    ByteTokenizer,
    build_tokenizer,
    cache_root,
    eval_batches,
    load_corpus,
    load_tokens,
    train_batch,
)
from llmvalley.data import cache as cache_module
from llmvalley.data.tokenizers import parse_tokenizer_spec

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()


def make_text(i: int, n_lines: int = 30) -> str:
    """Deterministic English-like text, different for each ``i``."""
    rng = np.random.default_rng(i)
    return "".join(" ".join(rng.choice(WORDS, size=8)) + ".\n" for _ in range(n_lines))


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LLMVALLEY_CACHE", str(root))
    return root


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i in range(40):
        (folder / ("sub" if i % 3 else "") / f"doc{i:02d}.txt").write_text(make_text(i))
    (folder / "ignored.md").write_text("not a .txt file")
    return folder


def docs(corpus, split: str) -> list[str]:
    return list(corpus.documents(split))


def test_cache_root_follows_env(tmp_cache: Path) -> None:
    assert cache_root() == tmp_cache


def test_folder_split_is_deterministic_disjoint_and_complete(text_folder: Path) -> None:
    a = load_corpus(str(text_folder), val_fraction=0.2)
    b = load_corpus(str(text_folder), val_fraction=0.2)
    assert a.key == b.key
    train, val = docs(a, "train"), docs(a, "val")
    assert docs(b, "val") == val and docs(b, "train") == train
    assert val and train and not set(val) & set(train)
    assert len(train) + len(val) == 40  # .md ignored
    assert 2 <= len(val) <= 16


def test_key_changes_with_contents_and_split(text_folder: Path) -> None:
    key = load_corpus(str(text_folder)).key
    assert load_corpus(str(text_folder), val_fraction=0.5).key != key
    (text_folder / "doc00.txt").write_text("changed\ncontent\n")
    assert load_corpus(str(text_folder)).key != key


def test_text_file_holds_out_its_last_lines(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    lines = [f"line {i}\n" for i in range(100)]
    path.write_text("".join(lines))
    corpus = load_corpus(str(path), val_fraction=0.1)
    assert docs(corpus, "train") == ["".join(lines[:90])]
    assert docs(corpus, "val") == ["".join(lines[90:])]


def test_jsonl_records_and_text_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"body": make_text(i, 3), "id": i}) + "\n"
                            for i in range(50)))
    corpus = load_corpus(str(path), text_field="body", val_fraction=0.2)
    assert len(docs(corpus, "train")) + len(docs(corpus, "val")) == 50
    with pytest.raises(UsageError, match="--text-field"):
        load_corpus(str(path))  # no "text" field


def test_parquet_rows(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": [make_text(i, 2) for i in range(30)]}), path)
    corpus = load_corpus(str(path), val_fraction=0.2)
    assert len(docs(corpus, "train")) + len(docs(corpus, "val")) == 30
    with pytest.raises(UsageError, match="no column 'content'"):
        load_corpus(str(path), text_field="content")


def test_hf_dataset_from_local_files_and_missing_dataset(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "hfdata"
    folder.mkdir()
    for split, n in (("train", 20), ("validation", 4)):
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": make_text(i, 2)}) + "\n" for i in range(n)))
    corpus = load_corpus(f"hf:{folder}")
    assert len(docs(corpus, "train")) == 20 and len(docs(corpus, "val")) == 4
    with pytest.raises(UsageError, match="not available from the local Hugging Face cache"):
        load_corpus("hf:surely-not/a-cached-dataset-xyz")


def test_stdlib_corpus_is_split_by_file() -> None:
    corpus = load_corpus("stdlib")
    assert corpus.name.startswith("stdlib-py")
    val = docs(corpus, "val")
    assert 5 <= len(val) <= 200 and all(isinstance(d, str) for d in val)
    assert load_corpus("stdlib").key == corpus.key


@pytest.mark.parametrize("setup, message", [
    (lambda p: str(p / "missing.txt"), "does not exist"),
    (lambda p: (p / "bin.txt").write_bytes(b"\x00\x01\x02" * 10) and str(p / "bin.txt"),
     "not a text file"),
    (lambda p: (p / "latin.txt").write_bytes("caf\xe9\nbar\n".encode("latin-1"))
     and str(p / "latin.txt"), "not UTF-8 text"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "contains no .txt files"),
    (lambda p: (p / "one.txt").write_text("single line") and str(p / "one.txt"),
     "fewer than 2 lines"),
])
def test_bad_sources_raise_one_line_errors(tmp_path: Path, setup, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        load_corpus(setup(tmp_path))
    assert "\n" not in str(info.value)


def test_token_cache_is_built_once_and_memory_mapped(text_folder: Path, tmp_cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = load_corpus(str(text_folder), val_fraction=0.2)
    tok = ByteTokenizer()
    first = load_tokens(corpus, tok, "train")
    expected = sum(len(d.encode()) for d in docs(corpus, "train"))
    n_docs = len(docs(corpus, "train"))
    assert first.n_bytes == expected and first.n_docs == n_docs
    assert first.n_tokens == expected + n_docs - 1  # NUL separators between documents
    assert first.tokens.dtype == np.uint8 and isinstance(first.tokens, np.memmap)
    assert 0 < first.unigram_entropy < np.log(256)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(cache_module, "_build", no_rebuild)
    again = load_tokens(corpus, tok, "train")
    assert np.array_equal(np.asarray(again.tokens), np.asarray(first.tokens))
    assert len(list((tmp_cache / "tokens").glob("*.bin"))) == 1


def test_concurrent_first_builds_of_one_split_both_finish(text_folder: Path, tmp_cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sweep workers starting together build the same cache entry; neither may fail."""
    corpus = load_corpus(str(text_folder), val_fraction=0.2)
    both_written = threading.Barrier(2, timeout=30)
    write = cache_module._write_tokens

    def write_then_wait(*args, **kwargs):
        out = write(*args, **kwargs)
        both_written.wait()  # both temporary files are complete before either is renamed
        return out

    monkeypatch.setattr(cache_module, "_write_tokens", write_then_wait)
    with ThreadPoolExecutor(2) as pool:
        splits = list(pool.map(lambda _: load_tokens(corpus, ByteTokenizer(), "train"), range(2)))
    assert np.array_equal(np.asarray(splits[0].tokens), np.asarray(splits[1].tokens))
    assert splits[0].n_tokens > 0
    assert not list((tmp_cache / "tokens").glob("*.tmp"))


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "héllo wörld ✓"
    (ids,) = tok.encode_batch([text])
    assert tok.decode(ids) == text and tok.vocab_size == 256


def test_bpe_is_trained_on_train_split_cached_and_reloadable(text_folder: Path,
                                                             tmp_cache: Path) -> None:
    corpus = load_corpus(str(text_folder), val_fraction=0.2)
    tok = build_tokenizer("bpe", corpus, tmp_cache, vocab_size=300)
    assert tok.vocab_size <= 300 and tok.separator_id is not None
    cached = list((tmp_cache / "tokenizers").glob("*.json"))
    assert len(cached) == 1
    again = build_tokenizer("bpe:300", corpus, tmp_cache)
    assert again.key == tok.key
    user = build_tokenizer(str(cached[0]), corpus, tmp_cache)  # a user's tokenizer.json
    assert user.key == tok.key
    sample = make_text(123, 2)
    assert user.decode(user.encode_batch([sample])[0]) == sample
    split = load_tokens(corpus, tok, "train")
    assert split.tokens.dtype == np.uint16 and split.n_tokens < split.n_bytes


@pytest.mark.parametrize("spec, size, message", [
    ("bpe", None, "needs a vocabulary size"),
    ("bpe:abc", None, "bad BPE vocabulary size"),
    ("bpe:10", None, "at least 260"),
    ("wordpiece", None, "unknown tokenizer"),
])
def test_bad_tokenizer_specs(spec: str, size: int | None, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_tokenizer_spec(spec, size)


def test_train_batches_are_a_pure_function_of_seed_and_step() -> None:
    tokens = np.arange(1000, dtype=np.uint16) % 256
    a = train_batch(tokens, seed=1, step=5, micro=0, batch_size=4, seq_len=16)
    b = train_batch(tokens, seed=1, step=5, micro=0, batch_size=4, seq_len=16)
    c = train_batch(tokens, seed=1, step=6, micro=0, batch_size=4, seq_len=16)
    d = train_batch(tokens, seed=2, step=5, micro=0, batch_size=4, seq_len=16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    x, y = a
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens


def test_eval_batches_are_fixed_and_non_overlapping() -> None:
    tokens = np.arange(10_000, dtype=np.uint32)
    batches = eval_batches(tokens, batch_size=4, seq_len=32, n_batches=3)
    assert len(batches) == 3
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert torch.all(starts[1:] - starts[:-1] >= 33)
    again = eval_batches(tokens, batch_size=4, seq_len=32, n_batches=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    small = eval_batches(tokens[:100], batch_size=4, seq_len=32, n_batches=3)
    assert sum(x.shape[0] for x, _ in small) == 3  # only 3 windows fit
