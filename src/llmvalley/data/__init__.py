"""Data for ``valley train``: corpus sources, tokenizers, the token cache and batching."""

from llmvalley.data.batching import eval_batches, train_batch
from llmvalley.data.cache import TokenSplit, cache_root, load_tokens
from llmvalley.data.sources import Corpus, load_corpus
from llmvalley.data.tokenizers import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "HFTokenizer",
    "TokenSplit",
    "build_tokenizer",
    "cache_root",
    "eval_batches",
    "load_corpus",
    "load_tokens",
    "train_batch",
]
