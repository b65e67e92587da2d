"""Corpus sources for ``valley train``: where the text comes from and how it is split.

A :class:`Corpus` names its source, carries a fingerprint of its contents (the token cache is
keyed by it) and yields the documents of its ``train`` and ``val`` splits. Every split is
deterministic, so two machines with the same data get the same split:

- ``stdlib``: the ``.py`` files of the running Python's standard library (``site-packages``
  excluded), split by file: a file is held out when the hash of its relative path falls in the
  validation fraction.
- a ``.txt`` file: its last ``val_fraction`` of lines (cut at a line boundary) is validation.
- a folder: its ``.txt`` files (recursively), split by file as for ``stdlib``.
- ``.jsonl`` / ``.parquet``: one document per record (field ``text_field``), split by record index.
- ``hf:NAME[:CONFIG]``: a Hugging Face dataset read from the local cache (offline unless
  ``HF_DATASETS_OFFLINE=0``); its ``validation`` split when it has one, else a split by record.
- ``pydoc-topics``: English prose that every Python installation carries offline, the help
  topics of the language reference (``pydoc_data.topics``, what ``help("assert")`` prints),
  one document per topic, split by the hash of the topic name. It is the shifted held-out
  corpus of ``stdlib`` runs (:mod:`llmvalley.data.heldout`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmvalley.cli import UsageError

ACCEPTED_SOURCES = (
    "stdlib, pydoc-topics, a .txt file or a folder of .txt files, a .jsonl or .parquet file, or "
    "hf:NAME[:CONFIG]"
)
PYDOC_TOPICS = "pydoc-topics"
SPLITS = ("train", "val")
VAL_SPLIT_NAMES = ("validation", "valid", "val")


@dataclass(frozen=True)
class Corpus:
    """A text corpus with a deterministic train/validation split.

    ``key`` fingerprints the contents (paths, sizes and modification times, or a dataset
    fingerprint) together with the split rule, so a changed corpus never reuses stale tokens.
    """

    name: str
    key: str
    _documents: Callable[[str], Iterator[str]]

    def documents(self, split: str) -> Iterator[str]:
        """Yield the documents of ``split`` (``"train"`` or ``"val"``) in a fixed order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return self._documents(split)


def in_val_split(identifier: str, val_fraction: float) -> bool:
    """Whether the item named ``identifier`` belongs to the validation split (stable hash)."""
    digest = hashlib.sha1(identifier.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _split_ids(ids: list[str], val_fraction: float) -> set[str]:
    """The validation subset of ``ids``; never empty, and never all of them when ids > 1."""
    val = {i for i in ids if in_val_split(i, val_fraction)}
    if not val and ids:  # tiny corpora: hold out the item with the smallest hash
        val = {min(ids, key=lambda i: hashlib.sha1(i.encode("utf-8")).digest())}
    if len(val) == len(ids) > 1:
        val.discard(max(ids, key=lambda i: hashlib.sha1(i.encode("utf-8")).digest()))
    return val


def _fingerprint(parts: Iterable[str]) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:20]


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file, or raise a UsageError saying it is not text."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise UsageError(f"{path} is not a text file (it contains NUL bytes); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _file_corpus(name: str, root: Path, files: list[Path], val_fraction: float, *,
                 strict_text: bool) -> Corpus:
    """A corpus of whole files split by the hash of their path relative to ``root``."""
    rel = [f.relative_to(root).as_posix() for f in files]
    val = _split_ids(rel, val_fraction)
    stats = (f"{r}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for r, f in zip(rel, files))
    key = _fingerprint([name, f"val={val_fraction}", *stats])

    def documents(split: str) -> Iterator[str]:
        for r, f in zip(rel, files):
            if (r in val) == (split == "val"):
                if strict_text:
                    yield _read_text(f)
                else:  # the stdlib ships a few deliberately mis-encoded test files
                    yield f.read_bytes().decode("utf-8", errors="replace")

    return Corpus(name=name, key=key, _documents=documents)


def stdlib_corpus(val_fraction: float) -> Corpus:
    """The running Python's standard library sources, split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(
        (f for f in root.rglob("*.py") if not skip.intersection(f.relative_to(root).parts)),
        key=lambda f: f.relative_to(root).as_posix(),
    )
    if not files:
        raise UsageError(f"no standard-library sources found under {root}")
    version = sysconfig.get_python_version()
    return _file_corpus(f"stdlib-py{version}", root, files, val_fraction, strict_text=False)


def pydoc_topics_corpus(val_fraction: float) -> Corpus:
    """The running Python's help topics (``pydoc_data.topics``): English prose about the
    language, one document per topic, split by the hash of the topic name. ``val_fraction``
    1.0 holds out every topic (the shifted held-out corpus, which is never trained on)."""
    try:
        from pydoc_data import topics as module
    except ImportError:
        raise UsageError("pydoc-topics: this Python has no pydoc_data.topics module") from None
    names = sorted(module.topics)
    if not names:
        raise UsageError("pydoc-topics: pydoc_data.topics holds no topics")
    val = set(names) if val_fraction >= 1.0 else _split_ids(names, val_fraction)
    path = Path(module.__file__ or "pydoc_data/topics.py")
    stat = path.stat() if path.is_file() else None
    version = sysconfig.get_python_version()
    key = _fingerprint([PYDOC_TOPICS, version, str(stat.st_size if stat else 0),
                        str(stat.st_mtime_ns if stat else 0), f"val={val_fraction}"])

    def documents(split: str) -> Iterator[str]:
        for name in names:
            if (name in val) == (split == "val"):
                yield module.topics[name]

    return Corpus(name=f"{PYDOC_TOPICS}-py{version}", key=key, _documents=documents)


def text_file_corpus(path: Path, val_fraction: float) -> Corpus:
    """One text file: the last ``val_fraction`` of its lines are validation."""
    text = _read_text(path)
    lines = text.splitlines(keepends=True)
    if len(lines) < 2:
        raise UsageError(f"{path} has fewer than 2 lines; it cannot be split into train and val")
    n_val = min(len(lines) - 1, max(1, round(len(lines) * val_fraction)))
    cut = len(lines) - n_val
    stat = path.stat()
    key = _fingerprint([str(path), str(stat.st_size), str(stat.st_mtime_ns), f"val={val_fraction}"])

    def documents(split: str) -> Iterator[str]:
        part = lines[:cut] if split == "train" else lines[cut:]
        yield "".join(part)

    return Corpus(name=path.name, key=key, _documents=documents)


def folder_corpus(path: Path, val_fraction: float) -> Corpus:
    """The ``.txt`` files under a folder, split by file."""
    files = sorted((f for f in path.rglob("*.txt") if f.is_file()),
                   key=lambda f: f.relative_to(path).as_posix())
    if not files:
        raise UsageError(f"folder {path} contains no .txt files; --data accepts {ACCEPTED_SOURCES}")
    return _file_corpus(path.name or str(path), path, files, val_fraction, strict_text=True)


def _records_corpus(name: str, key_parts: list[str], texts: list[str],
                    val_fraction: float) -> Corpus:
    """A corpus of records (one document each), split by record index."""
    if not texts:
        raise UsageError(f"{name} holds no records")
    val = _split_ids([str(i) for i in range(len(texts))], val_fraction)
    key = _fingerprint([*key_parts, f"val={val_fraction}"])

    def documents(split: str) -> Iterator[str]:
        for i, text in enumerate(texts):
            if (str(i) in val) == (split == "val"):
                yield text

    return Corpus(name=name, key=key, _documents=documents)


def jsonl_corpus(path: Path, text_field: str, val_fraction: float) -> Corpus:
    """A JSON-lines file with one document per line in field ``text_field``."""
    texts = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UsageError(
                f"{path}:{lineno} has no string field {text_field!r}; choose one with --text-field"
            )
        texts.append(record[text_field])
    stat = path.stat()
    parts = [str(path), str(stat.st_size), str(stat.st_mtime_ns), text_field]
    return _records_corpus(path.name, parts, texts, val_fraction)


def parquet_corpus(path: Path, text_field: str, val_fraction: float) -> Corpus:
    """A Parquet file with one document per row in column ``text_field`` (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise UsageError(f"{path} is not a readable Parquet file ({exc})") from None
    if text_field not in schema.names:
        raise UsageError(
            f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
            "choose one with --text-field"
        )
    texts = [t for t in pq.read_table(path, columns=[text_field]).column(0).to_pylist() if t]
    stat = path.stat()
    parts = [str(path), str(stat.st_size), str(stat.st_mtime_ns), text_field]
    return _records_corpus(path.name, parts, texts, val_fraction)


@contextlib.contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Force the Hugging Face hub into offline mode for the duration (the libraries read their
    environment variables at import, so setting those now could come too late)."""
    import datasets.config
    import huggingface_hub.constants

    targets = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
               (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved = [(module, attr, getattr(module, attr)) for module, attr in targets]
    try:
        if enabled:
            for module, attr in targets:
                setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def hf_corpus(spec: str, text_field: str, val_fraction: float) -> Corpus:
    """A Hugging Face dataset ``NAME[:CONFIG]`` loaded from the local cache."""
    name, _, config = spec.partition(":")
    if not name:
        raise UsageError("hf: needs a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1")
    try:
        import datasets
    except ImportError:
        raise UsageError("--data hf:... needs the datasets package: pip install datasets") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        with _hub_offline(os.environ.get("HF_DATASETS_OFFLINE", "1") not in ("0", "false")):
            dsd = datasets.load_dataset(name, config or None)
    except Exception as exc:  # datasets raises many types for a dataset that is not there
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"dataset hf:{spec} is not available from the local Hugging Face cache ({first}); "
            "download it once with network access (HF_DATASETS_OFFLINE=0)"
        ) from None
    if "train" not in dsd:
        raise UsageError(f"dataset hf:{spec} has no train split (splits: {', '.join(dsd)})")
    train = dsd["train"]
    if text_field not in train.column_names:
        raise UsageError(
            f"dataset hf:{spec} has no column {text_field!r} "
            f"(columns: {', '.join(train.column_names)}); choose one with --text-field"
        )
    val_name = next((s for s in VAL_SPLIT_NAMES if s in dsd), None)
    fingerprints = [f"hf:{spec}", text_field, train._fingerprint]
    if val_name is None:
        return _records_corpus(f"hf:{spec}", fingerprints,
                               [t for t in train[text_field] if t], val_fraction)
    val = dsd[val_name]
    fingerprints.append(val._fingerprint)
    key = _fingerprint(fingerprints)

    def documents(split: str) -> Iterator[str]:
        source = train if split == "train" else val
        for batch in source.iter(batch_size=1024):
            yield from (t for t in batch[text_field] if t)

    return Corpus(name=f"hf:{spec}", key=key, _documents=documents)


def load_corpus(spec: str = "stdlib", *, text_field: str = "text",
                val_fraction: float = 0.02) -> Corpus:
    """Resolve a ``--data`` value to a :class:`Corpus`, or raise a one-line UsageError."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if spec == "stdlib":
        return stdlib_corpus(val_fraction)
    if spec == PYDOC_TOPICS:
        return pydoc_topics_corpus(val_fraction)
    if spec.startswith("hf:"):
        return hf_corpus(spec[3:], text_field, val_fraction)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(f"data source {spec!r} does not exist; --data accepts {ACCEPTED_SOURCES}")
    path = path.resolve()
    if path.is_dir():
        return folder_corpus(path, val_fraction)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return jsonl_corpus(path, text_field, val_fraction)
    if suffix == ".parquet":
        return parquet_corpus(path, text_field, val_fraction)
    return text_file_corpus(path, val_fraction)  # any other file must be UTF-8 text
