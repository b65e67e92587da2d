"""Small models and training loops shared by the optimizer tests."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import llmvalley

VOCAB, DIM = 13, 8


class TinyLM(nn.Module):
    """A LLaMA-shaped miniature: embedding, attention-like and MLP matrices with and without
    bias, RMSNorm, a scalar gain, and an untied head (tied with ``tied=True``)."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.q_proj = nn.Linear(DIM, DIM, bias=False)
        self.norm = nn.RMSNorm(DIM)
        self.up_proj = nn.Linear(DIM, 2 * DIM, bias=True)
        self.down_proj = nn.Linear(2 * DIM, DIM, bias=False)
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        h = h + self.q_proj(h)
        h = h + self.down_proj(torch.nn.functional.silu(self.up_proj(self.norm(h))))
        return self.lm_head(h * self.gain)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic batch for a step: a learnable next-token pattern plus noise."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (4, 6), generator=gen)
    y = (x * 3 + 1) % VOCAB
    return x, y


def loss_fn(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def write_corpus(folder: Path, words: list[str], *, seed: int, files: int, lines: int,
                 words_per_line: int) -> Path:
    """A folder of small random-word text files: a corpus the data pipeline can split."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(files):
        text = (" ".join(rng.choice(words, size=words_per_line)) + ".\n" for _ in range(lines))
        (folder / f"part{i}.txt").write_text("".join(text))
    return folder


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, tied: bool = False) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(tied=tied).to(dtype)


# Hyperparameters the generic tests give a method on their tiny tensors (8 x 8 matrices, a
# 1 x 2 Rosenbrock point), where its defaults do not apply: low-rank methods' default ranks
# are at or above these matrices' smaller side (the explicit ``hp`` of a test wins).
TEST_HPARAMS: dict[str, dict] = {
    "ranger21": {"total_steps": 1000, "centralize": False},
    "subspace_momentum": {"rank": 2},
    "snsm": {"rank": 2},
    "dct_adamw": {"rank": 2, "update_proj_gap": 10},
    "galore": {"rank": 2},
    "fira": {"rank": 2},
    "apollo": {"rank": 2},
    "online_subspace_descent": {"rank": 2},
    # parameter-free methods start from a tiny step (d0, reps_rel ~1e-6), below bf16's
    # resolution and too small to see in the few steps of the mechanics tests
    "prodigy": {"d0": 1e-3},
    "dadapt_adam": {"d0": 1e-3},
    "dog": {"reps_rel": 1e-3},
    "ldog": {"reps_rel": 1e-2},
}


def create(name: str, params, **hp) -> torch.optim.Optimizer:
    """``llmvalley.create_optimizer`` with :data:`TEST_HPARAMS` under ``hp``."""
    return llmvalley.create_optimizer(name, params, **{**TEST_HPARAMS.get(name, {}), **hp})


def make_optimizer(name: str, model: nn.Module, **hp) -> torch.optim.Optimizer:
    """Through the model router, so matrix-only methods get their fallback."""
    return create(name, model, **hp)


def backward(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """``loss.backward()`` as a training loop following the optimizer protocol does it: with
    the graph and a curvature update when the method wants Hessian-vector products now
    (AdaHessian, Sophia-H)."""
    request = getattr(opt, "curvature_request", lambda: None)()
    loss.backward(create_graph=request == "hessian_vector")
    if request == "hessian_vector":
        opt.update_curvature()  # which detaches the gradients' graph


def train(model: nn.Module, opt: torch.optim.Optimizer, start: int, steps: int) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, step)
        backward(opt, loss)
        opt.step(loss=loss)  # ignored by methods that do not use it
        losses.append(loss.item())
    return losses


def assert_resume_bit_exact(name: str, make: Callable[[int], nn.Module],
                            run: Callable[[nn.Module, torch.optim.Optimizer, int, int], object]
                            ) -> None:
    """50 steps, checkpoint, fresh process-equivalent load, 50 more == 100 straight.

    ``make(seed)`` builds the model; the resumed one starts from another seed, so everything
    must come from the checkpoint. ``run(model, opt, start, steps)`` takes the steps.
    """
    ref = make(0)
    run(ref, make_optimizer(name, ref), 0, 100)
    model = make(0)
    opt = make_optimizer(name, model)
    run(model, opt, 0, 50)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = make(123)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = make_optimizer(name, resumed)
    resumed_opt.load_state_dict(ckpt["opt"])
    run(resumed, resumed_opt, 50, 50)
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}: {n} differs after resume"


def roundtrip(obj):
    """Serialise and load, as a separate process would see it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# Learning rates at which each method makes steady progress on the toy problems (sign and
# normalised methods take fixed-size steps, so they need smaller rates than SGD).
CONVERGENCE_LR = {
    "adafisher": 1e-2, "adafisherw": 1e-2,
    "ranger21": 0.05,
    "sgd": 0.05, "signum": 0.01, "lion": 0.01, "adafactor": 0.05, "came": 0.01,
    "adamuon": 0.1, "namo": 0.1, "namo_d": 0.1, "auon": 0.2,
    "auon_hybrid": 0.2, "conda": 0.1, "cosmos": 0.1, "polargrad": 0.1,
    # adagrad's steps shrink over time; diffGrad's friction halves its steps
    "sgdp": 0.05, "adagrad": 0.1, "diffgrad": 0.02,
    # parameter-free methods: lr multiplies their own estimate of the step size
    "prodigy": 0.3, "dadapt_adam": 0.1, "dog": 1.0, "ldog": 1.0,
    "schedulefree_sgd": 0.5, "schedulefree_adamw": 0.03, "lookahead": 0.03,
    "galore": 0.1, "online_subspace_descent": 0.1, "soap": 0.03, "asgo": 0.03, "momo": 1.0,
    # 1% Top-K keeps one coordinate a step on these tiny tensors
    "microadam": 0.03,
    "splus": 0.2,  # the value SPlus's README suggests for transformers
}


def convergence_lr(name: str) -> float:
    return CONVERGENCE_LR.get(name, 0.01)


# Rosenbrock from (-1.5, 2) over 1000 steps: a rate in each method's working range.
ROSENBROCK_LR = {
    "adafisher": 1e-3, "adafisherw": 1e-3,
    "ranger21": 0.1,
    "sgd": 1e-3, "mars": 1e-3, "adabelief": 1e-2, "adan": 1e-2, "adafactor": 1e-2,
    "lion": 1e-2, "grams": 1e-1, "sgd_sai": 1e-3, "polargrad": 2e-3,
    # plain SGD-type steps diverge at the default
    "sgdp": 2e-3, "tam": 5e-4, "adagrad": 1.0,
    "prodigy": 1.0, "dadapt_adam": 1.0, "dog": 3.0, "ldog": 3.0, "schedulefree_sgd": 3e-3,
    "adahessian": 1.0,
    "splus": 10.0,  # a 1-D point takes the constant scale 0.001
}

# Methods whose update is degenerate on the 1 x 2 Rosenbrock matrix: SWAN's row
# standardisation of a single row is always +-1, and SinkGD's row/column normalisation of it is
# fixed-size sign descent. They are matrix methods; their convergence is tested on the
# regression and language-model problems.
ROSENBROCK_DEGENERATE = {"swan", "sinkgd"}
# ... and methods with a rank below the smaller side: a 1 x 2 matrix has none
ROSENBROCK_DEGENERATE |= {"subspace_momentum", "snsm", "dct_adamw", "galore", "fira", "apollo",
                          "apollo_mini", "frugal", "online_subspace_descent"}

# Fraction of the initial regression loss a method must get below in 200 steps. SWAN removes
# each row's mean from the gradient, so the component of the solution along the mean is never
# updated and its loss plateaus near 0.25 of the start on this problem.
REGRESSION_TARGET = {"swan": 0.3}


def rosenbrock_lr(name: str) -> float:
    return ROSENBROCK_LR.get(name, 3e-2)


def max_moved(params, shapes, seed: int = 0) -> float:
    """How far ``params`` moved from their start, ``torch.randn`` of ``shapes`` drawn in turn
    from a generator seeded with ``seed`` (so a differential test can show it ran steps that
    matter)."""
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen) for s in shapes]
    return max((p.detach() - s).abs().max().item() for p, s in zip(params, start))
