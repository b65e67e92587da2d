"""Downstream evaluation of saved checkpoints with lm-evaluation-harness (``valley eval``).

:class:`ValleyLM` is an ``lm_eval`` model wrapping a trained :class:`~llmvalley.models.Llama`
and the tokenizer of its run. It answers the harness's log-likelihood requests (multiple-choice
and cloze tasks) and rolling log-likelihoods (perplexity tasks); generation tasks are refused
with a message: the benchmark's models are far too small to generate anything worth scoring.

Scoring follows the harness's conventions: a continuation's tokens are those of
``encode(context + continuation)`` after ``encode(context)`` (so a BPE merge across the
boundary is tokenized as in running text), an empty context is replaced by the tokenizer's
document separator (EOS / NUL byte, what precedes every document in training), and inputs longer
than the model's context keep their last ``max_seq_len`` tokens. Rolling log-likelihoods use the
harness's disjoint windows, so every token is predicted exactly once.

:func:`load_run` reads a ``valley train`` / ``valley compare`` run folder: ``config.json`` gives
the model shape and tokenizer, ``checkpoint.pt`` the weights. lm-eval (the ``eval`` extra) is
imported only here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmvalley.cli import UsageError
from llmvalley.data.tokenizers import ByteTokenizer, HFTokenizer
from llmvalley.models import Llama, LlamaConfig, build_model

CONFIG_FILE = "config.json"  # the run folder's files (llmvalley.bench.records)
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class LoadedRun:
    """A run folder's model (weights loaded, eval mode) and tokenizer."""

    run_dir: Path
    model: Llama
    tokenizer: ByteTokenizer | HFTokenizer
    config: dict[str, Any]


class ValleyLM(LM):
    """An ``lm_eval`` model over a :class:`Llama` and a llmvalley tokenizer."""

    def __init__(self, model: Llama, tokenizer: ByteTokenizer | HFTokenizer, *,
                 batch_size: int = 16, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self._device = torch.device(device)  # LM.device reads it
        self.max_length = model.config.max_seq_len
        separator = tokenizer.separator_id
        self.prefix_token = int(separator) if separator is not None else 0

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens)."""
        return [int(i) for i in self.tokenizer.encode_batch([text])[0]]

    def split_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, the continuation's as they appear in the whole text
        (trailing whitespace of the context moves to the continuation, as in the harness)."""
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        if not stripped:
            return [self.prefix_token], self.encode(continuation)
        whole = self.encode(stripped + continuation)
        context_ids = self.encode(stripped)
        return context_ids, whole[len(context_ids):]

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): the continuation's log-probability (nats)
        and whether greedy decoding would produce it; inputs keep their last ``max_length``
        tokens. Batched by length (right padding does not change causal logits)."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows, spans = [], []
            for i in chunk:
                context, continuation = pairs[i]
                if not continuation:
                    raise ValueError("an empty continuation has no log-likelihood")
                full = (list(context) + list(continuation))[-(self.max_length + 1):]
                rows.append(full[:-1])
                spans.append(len(continuation))
            width = max(len(r) for r in rows)
            batch = torch.zeros(len(rows), width, dtype=torch.long)
            for j, row in enumerate(rows):
                batch[j, :len(row)] = torch.tensor(row, dtype=torch.long)
            logprobs = F.log_softmax(self.model(batch.to(self._device)).float(), dim=-1)
            for j, i in enumerate(chunk):
                n, length = spans[j], len(rows[j])
                target = torch.tensor(pairs[i][1][-n:], dtype=torch.long, device=self._device)
                window = logprobs[j, length - n:length]
                total = window.gather(-1, target[:, None]).sum().item()
                greedy = bool((window.argmax(-1) == target).all().item())
                results[i] = (float(total), greedy)
        return results

    # ------------------------------------------------------------------ the lm_eval API
    def loglikelihood(self, requests: Iterable[Any], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` for each ``(context, continuation)``."""
        return self.score([self.split_tokens(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests: Iterable[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """The whole text's log-likelihood, after the separator token, in disjoint windows."""
        results = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.encode(text), self.prefix_token, self.max_length, context_len=1)]
            results.append(sum(total for total, _ in self.score(windows)))
        return results

    def generate_until(self, requests: Iterable[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("valley eval scores log-likelihood tasks (multiple choice, "
                                  "cloze, perplexity); generation tasks are not supported")


# ------------------------------------------------------------------------------ run folders
def load_run(run_dir: str | Path, *, tokenizer: str | Path | None = None,
             device: str = "cpu") -> LoadedRun:
    """The model and tokenizer of a run folder; a one-line :class:`UsageError` says what is
    missing. ``tokenizer``: a tokenizer.json to use (default: the run's own)."""
    run_dir = Path(run_dir)
    config_path, checkpoint_path = run_dir / CONFIG_FILE, run_dir / CHECKPOINT_FILE
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a folder (expected a valley train run folder)")
    if not config_path.is_file():
        raise UsageError(f"{run_dir} has no {CONFIG_FILE}: not a valley train run folder")
    try:
        config = json.loads(config_path.read_text())
        resolved = config["resolved"]
        model_config = LlamaConfig(**resolved["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{config_path} is not a valley train config ({exc})") from None
    if not checkpoint_path.is_file():
        dcp = " (a --parallel run's DCP checkpoint is not supported)" \
            if (run_dir / "checkpoint.dcp").exists() else ""
        raise UsageError(f"{run_dir} has no {CHECKPOINT_FILE}{dcp}; runs keep one unless "
                         "--checkpoint-every 0 (sweep trials do not; seed runs do with "
                         "--keep-checkpoints)")
    try:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        weights = state["model"]
    except Exception as exc:  # zip/pickle errors of a truncated file, or not a checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{checkpoint_path} cannot be read ({first[:160]})") from None
    model = build_model(model_config, "cpu")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as exc:
        raise UsageError(f"{checkpoint_path} does not match {config_path} "
                         f"({str(exc).splitlines()[0][:160]})") from None
    tok = run_tokenizer(resolved, config.get("config", {}), tokenizer)
    if tok.vocab_size != model_config.vocab_size:
        raise UsageError(f"the tokenizer has {tok.vocab_size} entries but the model "
                         f"{model_config.vocab_size}")
    return LoadedRun(run_dir, model.to(device).eval(), tok, config)


def run_tokenizer(resolved: dict[str, Any], given: dict[str, Any],
                  override: str | Path | None) -> ByteTokenizer | HFTokenizer:
    """The run's tokenizer: byte-level, the user's tokenizer.json, or the BPE trained for it
    (found in the llmvalley cache by its key)."""
    from llmvalley.data.cache import cache_root
    from llmvalley.data.tokenizers import load_tokenizer_file

    key = resolved.get("tokenizer_key")
    if override is not None:
        return load_tokenizer_file(Path(override).expanduser())
    if key == ByteTokenizer.key:
        return ByteTokenizer()
    candidates = []
    spec = str(given.get("tokenizer") or "")
    if spec.endswith(".json"):
        candidates.append(Path(spec).expanduser())
    candidates += sorted((cache_root() / "tokenizers").glob("*.json"))
    for path in candidates:
        if path.is_file():
            tok = load_tokenizer_file(path)
            if tok.key == key:
                return tok
    raise UsageError(f"the run's tokenizer ({resolved.get('tokenizer')}, key {key}) is not in "
                     f"the llmvalley cache ({cache_root()}); pass its file with --tokenizer")


# ------------------------------------------------------------------------------ evaluation
def task_manager(tasks: Sequence[str], include: Sequence[str | Path]) -> Any:
    """An lm-eval TaskManager that knows ``tasks``: the ``include`` folders alone when they
    hold them all (indexing lm-eval's thousands of built-in tasks takes seconds), else both;
    unknown names are a :class:`UsageError`."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s) {', '.join(unknown)}; add your task YAMLs "
                         "with --include FOLDER")
    return manager


def evaluate(run: LoadedRun, tasks: Sequence[str], *, include: Sequence[str | Path] = (),
             num_fewshot: int | None = None, limit: float | None = None,
             batch_size: int = 16, device: str = "cpu") -> dict[str, Any]:
    """Run lm-eval ``tasks`` on the run's model; returns ``{"results": {task: metrics},
    "tasks": [...], "run_dir": ...}``. Unknown task names are a :class:`UsageError`; a task
    whose data cannot be loaded (not present offline) is an error naming the task."""
    from lm_eval import simple_evaluate

    for folder in include:
        if not Path(folder).exists():
            raise UsageError(f"--include {folder}: no such file or folder")
    manager = task_manager(tasks, include)
    for task in tasks:  # load each task's data first, to name the one that is missing
        try:
            manager.load([task])
        except Exception as exc:  # datasets' errors for data neither cached nor reachable
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"task {task}: its data cannot be loaded ({first[:200]}); lm-eval "
                             "tasks run offline only when their data is in the Hugging Face "
                             "cache (or use --online)") from None
    lm = ValleyLM(run.model, run.tokenizer, batch_size=batch_size, device=device)
    output = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                             task_manager=manager, log_samples=False, bootstrap_iters=1000,
                             random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                             fewshot_random_seed=0)
    if output is None:  # non-zero ranks only
        raise RuntimeError("lm-eval returned no results")
    results = {task: {name: value for name, value in metrics.items()
                      if name != "alias" and isinstance(value, int | float | str)}
               for task, metrics in output["results"].items()}
    return {"run_dir": str(run.run_dir), "tasks": list(tasks), "results": results,
            "n_samples": output.get("n-samples"), "num_fewshot": num_fewshot, "limit": limit}
