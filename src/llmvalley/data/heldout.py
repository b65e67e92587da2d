"""The shifted held-out corpus: validation loss on a second, different kind of text.

A run is evaluated on its own corpus's validation split (in-domain) and, with fewer batches, on
a *shifted* corpus that every machine has offline, so that a comparison can see whether an
optimizer's gain carries over to text it was not trained on (benchmark-protocol.md, downstream
evaluation). ``TrainConfig.shifted_data`` chooses it:

- ``auto`` (default): English prose (``pydoc-topics``: the help topics of the language
  reference that every Python carries in ``pydoc_data.topics``) when the run trains on Python
  source (``stdlib``); Python source (the ``stdlib`` corpus's validation files) for any other
  corpus, which is prose of some kind (C4, a ``.txt`` file...).
- ``none``: no shifted evaluation.
- any ``--data`` source: its validation split (``pydoc-topics``: every topic).

The shifted text is tokenized with the run's own tokenizer (bits per byte compare across
tokenizers; nats per token compare optimizers of one run setup) and cached like any split.
Caveat for ``stdlib`` runs: ``pydoc_data/topics.py`` itself is one of the stdlib's training
files (2.4% of its bytes in Python 3.11), where the same prose appears as Python string literals
(quoted, with ``\\n`` escapes), so the shifted corpus is not strictly unseen there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmvalley.data.batching import eval_batches
from llmvalley.data.cache import TokenSplit, load_tokens
from llmvalley.data.sources import PYDOC_TOPICS, Corpus, load_corpus, pydoc_topics_corpus

AUTO, NONE = "auto", "none"
#: the default number of shifted evaluation batches: this share of ``eval_batches`` (at least 1)
SHIFTED_BATCH_SHARE = 0.25
#: the validation share of a shifted corpus given as a ``--data`` source (its split is fixed,
#: so every run of a comparison sees the same text)
SHIFTED_VAL_FRACTION = 0.02


def shifted_source(data: str, shifted: str) -> str | None:
    """The shifted corpus's source for a run on ``data`` (None: no shifted evaluation)."""
    if shifted == NONE:
        return None
    if shifted == AUTO:
        return PYDOC_TOPICS if data == "stdlib" else "stdlib"
    return shifted


def shifted_batches(eval_batches_in_domain: int, shifted: int | None) -> int:
    """Batches of the shifted evaluation: ``shifted`` when given, else a quarter of the
    in-domain evaluation's (at least one): the shifted loss is needed at the end of a run and
    compared between optimizers on the same fixed windows, so fewer windows suffice."""
    if shifted is not None:
        return shifted
    return max(1, round(SHIFTED_BATCH_SHARE * eval_batches_in_domain))


def shifted_corpus(source: str, text_field: str = "text") -> Corpus:
    """The held-out corpus of ``source`` (``pydoc-topics``: every topic is held out)."""
    if source == PYDOC_TOPICS:
        return pydoc_topics_corpus(1.0)
    return load_corpus(source, text_field=text_field, val_fraction=SHIFTED_VAL_FRACTION)


@dataclass
class ShiftedEval:
    """The shifted corpus's evaluation set, ready for the trainer."""

    corpus_name: str
    split: TokenSplit
    batches: list[tuple[object, object]]  # (inputs, targets) tensors on the CPU

    @property
    def tokens_per_byte(self) -> float:
        return self.split.tokens_per_byte


def load_shifted_eval(data: str, shifted: str, *, tokenizer, seq_len: int, batch_size: int,
                      n_batches: int, text_field: str = "text",
                      root: Path | None = None) -> ShiftedEval | None:
    """The fixed evaluation windows of the shifted corpus (None when there is none, or when it
    is the run's own corpus, or too small to fill one window)."""
    source = shifted_source(data, shifted)
    if source is None or source == data:
        return None
    corpus = shifted_corpus(source, text_field)
    split = load_tokens(corpus, tokenizer, "val", root)
    if split.n_tokens < seq_len + 2:
        return None
    batches = eval_batches(split.tokens, batch_size=batch_size, seq_len=seq_len,
                           n_batches=n_batches)
    return ShiftedEval(corpus.name, split, batches)
