"""Batches as pure functions of (seed, step, micro-batch): reproducible and resumable runs.

Training windows start at offsets drawn from a NumPy generator seeded with
``[seed, step, micro]``, so batch ``k`` is the same whether a run got there in one go or after a
resume, and the same for every optimizer trained with that seed. The evaluation set is a fixed
list of evenly spaced, non-overlapping windows of the validation split, independent of the seed.
"""

from __future__ import annotations

import numpy as np
import torch


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def train_batch(tokens: np.ndarray, *, seed: int, step: int, micro: int, batch_size: int,
                seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each ``(batch_size, seq_len)`` int64, for one micro-batch."""
    high = tokens.shape[0] - seq_len  # a window needs seq_len + 1 tokens
    if high <= 0:
        raise ValueError(f"{tokens.shape[0]} tokens cannot fill a window of {seq_len + 1}")
    rng = np.random.default_rng([seed, step, micro])
    return _windows(tokens, rng.integers(0, high, size=batch_size), seq_len)


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int,
                 n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out set: up to ``n_batches`` batches of non-overlapping, evenly spaced
    windows (fewer when the split is small; at least one window)."""
    n_windows_max = (tokens.shape[0] - 1) // seq_len
    if n_windows_max < 1:
        raise ValueError(f"{tokens.shape[0]} tokens cannot fill a window of {seq_len + 1}")
    n_windows = min(n_batches * batch_size, n_windows_max)
    stride = n_windows_max // n_windows * seq_len
    starts = np.arange(n_windows, dtype=np.int64) * stride
    return [_windows(tokens, starts[i:i + batch_size], seq_len)
            for i in range(0, n_windows, batch_size)]
