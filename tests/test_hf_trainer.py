"""The Hugging Face Trainer example of docs/distributed.md: an llmvalley optimizer passed as
``optimizers=(optimizer, scheduler)`` or built by the Trainer from
``optimizer_cls_and_kwargs``, on a tiny randomly initialised LLaMA (no downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (the HF Trainer example is optional)")
pytest.importorskip("accelerate", reason="accelerate is not installed (transformers' Trainer "
                    "needs it)")


class Synthetic(torch.utils.data.Dataset):
    """Repeating token patterns a 1-layer model learns in a few steps."""

    def __init__(self, n: int = 32, length: int = 16, vocab: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)


def trainer_args(tmp_path, steps: int = 6):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        learning_rate=1e-2, weight_decay=0.0)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_trainer_takes_a_created_optimizer(tmp_path) -> None:
    from llmvalley import create_optimizer

    model = tiny_llama()
    optimizer = create_optimizer("adamw", model, lr=1e-2, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path),
                                   train_dataset=Synthetic(), optimizers=(optimizer, scheduler))
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer or trainer.optimizer is optimizer
    curve = losses(trainer)
    assert len(curve) == 6 and curve[-1] < curve[0]
    assert all("step" in optimizer.state[p] for p in model.parameters())


def test_trainer_builds_it_from_cls_and_kwargs(tmp_path) -> None:
    from llmvalley import ChainOptimizer

    model = tiny_llama()
    trainer = transformers.Trainer(
        model=model, args=trainer_args(tmp_path), train_dataset=Synthetic(),
        optimizer_cls_and_kwargs=(ChainOptimizer, {"optimizer": "lion", "lr": 1e-3}))
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, ChainOptimizer)
    assert {g["optimizer"] for g in inner.param_groups} == {"lion"}
    curve = losses(trainer)
    assert curve[-1] < curve[0]
