"""The lm-eval adapter and ``valley eval``, on tiny tasks written by the test (YAML + jsonl).

The run folder is a small byte-level model saved as ``valley train`` saves one (config.json
and checkpoint.pt); its weights are random, which is enough: every check compares the harness's
numbers with log-probabilities computed here directly from the model's logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'llmvalley[eval]')")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmvalley.bench.lm_eval_adapter import ValleyLM, load_run  # noqa: E402
from llmvalley.cli import main  # noqa: E402
from llmvalley.data.tokenizers import ByteTokenizer  # noqa: E402
from llmvalley.models import LlamaConfig, build_model  # noqa: E402

QUESTIONS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two and two make", "choices": [" four", " five"], "answer": 0},
    {"question": "Water is", "choices": [" dry", " wet", " square", " late"], "answer": 1},
    {"question": "Cats say", "choices": [" moo", " meow"], "answer": 1},
    {"question": "", "choices": ["a", "bb"], "answer": 1},  # empty context: the separator
]
TEXTS = [{"text": "A short line."},
         {"text": "A longer text that does not fit in one window of the tiny model. " * 3}]


class Request:
    """Stands for lm-eval's ``Instance``: the adapter reads ``args`` only."""

    def __init__(self, *args: str) -> None:
        self.args = args


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64,
                      max_seq_len=32)
    model = build_model(cfg)
    resolved = {"model": cfg.to_dict(), "tokenizer": "byte", "tokenizer_key": "byte"}
    (folder / "config.json").write_text(json.dumps({"config": {"tokenizer": "auto"},
                                                    "resolved": resolved}))
    torch.save({"model": model.state_dict(), "optimizer": {}, "progress": None, "spikes": {},
                "torch_rng": torch.get_rng_state()}, folder / "checkpoint.pt")
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "choice.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TEXTS))
    (folder / "valley_choice.yaml").write_text(f"""\
task: valley_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'choice.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    (folder / "valley_texts.yaml").write_text(f"""\
task: valley_texts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'texts.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""")
    return folder


def direct_logprob(model: torch.nn.Module, context: list[int], continuation: list[int]
                   ) -> float:
    """log p(continuation | context) from one forward pass of the whole sequence."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
    start = len(context) - 1
    return sum(logprobs[start + i, t].item() for i, t in enumerate(continuation))


def encode(text: str) -> list[int]:
    return list(text.encode())


def test_loglikelihood_matches_the_model(run_dir: Path) -> None:
    run = load_run(run_dir)
    lm = ValleyLM(run.model, run.tokenizer, batch_size=3)
    requests = [Request(q["question"], c) for q in QUESTIONS for c in q["choices"]]
    results = lm.loglikelihood(requests)
    for request, (logprob, _) in zip(requests, results):
        context, continuation = request.args
        expected = direct_logprob(run.model, encode(context) or [0], encode(continuation))
        assert logprob == pytest.approx(expected, abs=1e-4)
    # greedy: the continuation of the model's own most likely next byte
    with torch.no_grad():
        next_byte = run.model(torch.tensor([encode("The sky is")]))[0, -1].argmax().item()
    ((_, greedy),) = lm.loglikelihood([Request("The sky is", chr(next_byte))])
    ((_, not_greedy),) = lm.loglikelihood([Request("The sky is", chr((next_byte + 1) % 128))])
    assert greedy and not not_greedy


def test_rolling_loglikelihood_predicts_every_token_once(run_dir: Path) -> None:
    run = load_run(run_dir)
    lm = ValleyLM(run.model, run.tokenizer)
    short, long = TEXTS[0]["text"], TEXTS[1]["text"]
    assert len(encode(long)) > 3 * run.model.config.max_seq_len
    (rolled,) = lm.loglikelihood_rolling([Request(short)])
    assert rolled == pytest.approx(direct_logprob(run.model, [0], encode(short)), abs=1e-4)
    # windows of the long text: the first from the separator, each later one with full context
    (rolled_long,) = lm.loglikelihood_rolling([Request(long)])
    ids, n = encode(long), run.model.config.max_seq_len
    expected = direct_logprob(run.model, [0], ids[:n])
    done = n
    while done < len(ids):
        end = min(done + n, len(ids))
        expected += direct_logprob(run.model, ids[end - n - 1:done], ids[done:end])
        done = end
    assert rolled_long == pytest.approx(expected, abs=1e-3)


def test_generation_is_refused_with_a_reason(run_dir: Path) -> None:
    lm = ValleyLM(*(lambda r: (r.model, r.tokenizer))(load_run(run_dir)))
    with pytest.raises(NotImplementedError, match="generation"):
        lm.generate_until([Request("x", {"until": ["\n"]})])


def test_valley_eval_runs_local_tasks(run_dir: Path, tasks: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    argv = ["eval", str(run_dir), "--tasks", "valley_choice,valley_texts", "--include",
            str(tasks), "--batch-size", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "valley_choice: acc" in printed and "valley_texts:" in printed
    results = json.loads((run_dir / "lm_eval.json").read_text())["results"]
    # accuracy: the choice of highest log-likelihood, computed here from the logits
    model, hits = load_run(run_dir).model, 0
    for q in QUESTIONS:
        scores = [direct_logprob(model, encode(q["question"]) or [0], encode(c))
                  for c in q["choices"]]
        hits += int(max(range(len(scores)), key=scores.__getitem__) == q["answer"])
    assert results["valley_choice"]["acc,none"] == pytest.approx(hits / len(QUESTIONS))
    # bits per byte: minus the summed log-likelihood over the bytes, in bits
    lm = ValleyLM(model, ByteTokenizer())
    total = sum(lm.loglikelihood_rolling([Request(t["text"]) for t in TEXTS]))
    n_bytes = sum(len(encode(t["text"])) for t in TEXTS)
    assert results["valley_texts"]["bits_per_byte,none"] == pytest.approx(
        -total / n_bytes / math.log(2), rel=1e-4)


@pytest.mark.parametrize("case", ["no-folder", "no-checkpoint", "corrupt", "unknown-task",
                                  "no-tasks", "bad-limit", "missing-data"])
def test_valley_eval_bad_input_is_one_line(case: str, run_dir: Path, tasks: Path,
                                           tmp_path: Path, capsys: pytest.CaptureFixture
                                           ) -> None:
    folder, names, extra = run_dir, "valley_choice", ["--include", str(tasks)]
    if case == "no-folder":
        folder = tmp_path / "missing"
    elif case in ("no-checkpoint", "corrupt"):
        folder = tmp_path / "run"
        folder.mkdir()
        (folder / "config.json").write_text((run_dir / "config.json").read_text())
        if case == "corrupt":
            (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    elif case == "unknown-task":
        names = "no_such_task_anywhere"
    elif case == "no-tasks":
        names = " , "
    elif case == "bad-limit":
        extra += ["--limit", "-3"]
    elif case == "missing-data":
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "valley_gone.yaml").write_text(
            (tasks / "valley_choice.yaml").read_text()
            .replace("valley_choice", "valley_gone").replace(str(tasks), str(tmp_path)))
        names, extra = "valley_gone", ["--include", str(broken)]
    assert main(["eval", str(folder), "--tasks", names, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("valley eval: error:") and "\n" not in err, err
