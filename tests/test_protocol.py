"""The optimizer protocol beyond gradients: the step's loss, train/eval iterates, curvature
estimates, and how ``valley train`` drives each (tested with small transforms written here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmvalley.bench import Trainer, train
from llmvalley.bench import trainer as trainer_module
from llmvalley.bench.records import read_log
from llmvalley.optim import ChainOptimizer
from llmvalley.optim.transforms.base import SlotSpec, Transform
from tests.test_train import small as train_config

pytestmark = pytest.mark.usefixtures("private_cache")


class RecordLoss(Transform):
    """Passes updates through and keeps the last loss it saw in a float slot."""

    slot_names = ("last_loss",)
    needs_loss = True

    def slots(self, shape, group, name=""):
        return [SlotSpec("last_loss", None)]

    def __call__(self, ctx, updates):
        for i in range(len(updates)):
            ctx.set_scalar("last_loss", i, float(ctx.loss))
        return updates


class ShiftedIterate(Transform):
    """Eval mode puts the parameters at ``p + offset`` (a stand-in for schedule-free's x),
    train mode takes them back; the offset is state, so it survives a checkpoint."""

    slot_names = ("offset",)
    has_modes = True
    calls: list[str] = []

    def slots(self, shape, group, name=""):
        return [SlotSpec("offset", shape, role="exact")]

    def __call__(self, ctx, updates):
        for o in ctx.slot("offset"):
            o.fill_(0.25)
        return updates

    def set_mode(self, ctx, train):
        ShiftedIterate.calls.append("train" if train else "eval")
        sign = -1.0 if train else 1.0
        return [p + sign * o for p, o in zip(ctx.params, ctx.slot("offset"))]


class CountCurvature(Transform):
    """Consumes a curvature estimate every ``every`` steps: sums the squared gradients it is
    given (gauss_newton) or a Hessian-vector product with a ones vector (hessian_vector)."""

    slot_names = ("estimate",)
    seen: list[tuple[str, int]] = []

    def __init__(self, kind: str, every: int) -> None:
        self.curvature, self.every = kind, every

    def slots(self, shape, group, name=""):
        return [SlotSpec("estimate", shape, role="exact")]

    def __call__(self, ctx, updates):
        return updates

    def curvature_due(self, step, group):
        return step % self.every == 0

    def update_curvature(self, ctx):
        CountCurvature.seen.append((self.curvature, max(ctx.steps)))
        estimates = ctx.slot("estimate")
        if self.curvature == "hessian_vector":
            vs = [torch.ones_like(p) for p in ctx.params]
            hvs = torch.autograd.grad(ctx.grads, ctx.params, vs)
            for e, hv in zip(estimates, hvs):
                e.copy_(hv)
        else:
            for e, g in zip(estimates, ctx.grads):
                e.copy_(g * g)


def quadratic(seed: int = 0) -> tuple[torch.nn.Parameter, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    return torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64)), a @ a.T


# ------------------------------------------------------------------------------ the loss
def test_a_method_that_needs_the_loss_gets_it_or_says_so():
    p, a = quadratic()
    opt = ChainOptimizer([p], [RecordLoss()], lr=0.1)
    loss = 0.5 * p @ a @ p
    loss.backward()
    with pytest.raises(ValueError, match=r"needs the loss: call step\(closure\) or step"):
        opt.step()
    assert "step" not in opt.state[p] or opt.state[p]["step"] == 0
    before = p.detach().clone()
    opt.step(loss=loss)
    assert opt.state[p]["last_loss"] == pytest.approx(loss.item())
    torch.testing.assert_close(p.detach(), before - 0.1 * (a @ before))

    def closure():
        opt.zero_grad()
        value = 0.5 * p @ a @ p
        value.backward()
        return value

    returned = opt.step(closure)
    assert opt.state[p]["last_loss"] == pytest.approx(returned.item())


# ------------------------------------------------------------------------------ modes
def test_eval_and_train_move_the_parameters_and_are_checkpointed():
    ShiftedIterate.calls.clear()
    p, a = quadratic()
    opt = ChainOptimizer([p], [ShiftedIterate()], lr=0.1)
    assert opt.training and opt.param_groups[0]["train_mode"] is True
    opt.eval()  # no state yet: nothing to move
    assert not opt.training and ShiftedIterate.calls == []
    with pytest.raises(RuntimeError, match="eval mode"):
        (0.5 * p @ a @ p).backward()
        opt.step()
    opt.train()
    opt.step()
    y = p.detach().clone()
    opt.eval()
    opt.eval()  # already there: no second move
    torch.testing.assert_close(p.detach(), y + 0.25)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["train_mode"] is False
    q = torch.nn.Parameter(p.detach().clone())
    other = ChainOptimizer([q], [ShiftedIterate()], lr=0.1)
    other.load_state_dict(saved)
    assert not other.training
    other.train()
    opt.train()
    assert torch.equal(q, p) and ShiftedIterate.calls == ["eval", "train", "train"]


def test_methods_without_modes_ignore_train_and_eval():
    p, _ = quadratic()
    opt = ChainOptimizer([p], "adamw", lr=0.1)
    assert opt.eval() is opt and opt.training and "train_mode" not in opt.param_groups[0]


# ------------------------------------------------------------------------------ curvature
def test_curvature_requests_follow_the_schedule():
    CountCurvature.seen.clear()
    p, a = quadratic()
    opt = ChainOptimizer([p], [CountCurvature("gauss_newton", 2)], lr=0.01)
    requests = []
    for _ in range(4):
        opt.zero_grad()
        (0.5 * p @ a @ p).backward()
        opt.step()
        requests.append(opt.curvature_request())  # after the step, as Sophia-G
        if requests[-1]:
            opt.update_curvature()
    assert requests == [None, "gauss_newton", None, "gauss_newton"]
    assert CountCurvature.seen == [("gauss_newton", 2), ("gauss_newton", 4)]
    torch.testing.assert_close(opt.state[p]["estimate"], p.grad * p.grad)


def test_hessian_vector_products_through_the_graph():
    CountCurvature.seen.clear()
    p, a = quadratic()
    opt = ChainOptimizer([p], [CountCurvature("hessian_vector", 1)], lr=0.01)
    assert opt.curvature_request() == "hessian_vector"  # before the first step
    (0.5 * p @ a @ p).backward(create_graph=True)
    opt.update_curvature()
    torch.testing.assert_close(opt.state[p]["estimate"], a @ torch.ones(4, dtype=a.dtype))
    assert not p.grad.requires_grad  # the graph was freed
    opt.step()
    assert opt.state[p]["step"] == 1 and CountCurvature.seen == [("hessian_vector", 0)]


# ------------------------------------------------------------------------------ valley train
def small(corpus: Path, tmp_path: Path, **overrides) -> dict:
    """test_train's seconds-long run, with a registry optimizer and a record every step."""
    return train_config(corpus, tmp_path, **{"optimizer": "adamw", "log_every": 1, **overrides})


def interrupted_then_resumed(config: dict, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run ``config`` to step 6 (its checkpoint is at 4), kill it, resume: the summary."""
    original = Trainer._after_step

    def crash_after_step_6(self, step, *args):
        original(self, step, *args)
        if step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_after_step", crash_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        train({**config, "name": "interrupted"})
    monkeypatch.setattr(Trainer, "_after_step", original)
    return train(None, resume=tmp_path / "runs" / "interrupted")


def with_chain(monkeypatch: pytest.MonkeyPatch, chain_factory) -> None:
    """Make ``valley train`` build a ChainOptimizer over ``chain_factory()`` + SGD."""

    def build(name, model, *, lr, weight_decay, opt_args, fallback_args):
        return ChainOptimizer(model.parameters(), chain_factory(), lr=lr)

    monkeypatch.setattr(trainer_module, "build_optimizer", build)


def test_valley_train_gives_the_loss(corpus, tmp_path, monkeypatch):
    with_chain(monkeypatch, lambda: [RecordLoss()])
    seen = []
    original = Trainer.optimizer_step

    def spy(self, step):
        out = original(self, step)
        seen.append(next(iter(self.optimizer.state.values()))["last_loss"])
        return out

    monkeypatch.setattr(Trainer, "optimizer_step", spy)
    summary = train(small(corpus, tmp_path, steps=3))
    assert summary["status"] == "completed"
    assert seen[-1] == pytest.approx(summary["final_train_loss"])


def test_valley_train_evaluates_and_saves_on_the_eval_iterate(corpus, tmp_path, monkeypatch):
    ShiftedIterate.calls.clear()
    with_chain(monkeypatch, lambda: [ShiftedIterate()])
    config = small(corpus, tmp_path, steps=8, eval_every=4, checkpoint_every=4)
    straight = train({**config, "name": "straight"})
    # two evaluations and two checkpoints (the last ones share one switch each)
    assert ShiftedIterate.calls == ["eval", "train"] * 4
    ckpt = torch.load(Path(straight["run_dir"]) / "checkpoint.pt", weights_only=False)
    assert ckpt["optimizer"]["param_groups"][0]["train_mode"] is False

    resumed = interrupted_then_resumed(config, tmp_path, monkeypatch)
    again = torch.load(Path(resumed["run_dir"]) / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(ckpt["model"][k], again["model"][k]) for k in ckpt["model"])
    assert straight["final_val_loss"] == resumed["final_val_loss"]


@pytest.mark.parametrize("kind", ["gauss_newton", "hessian_vector"])
def test_valley_train_provides_curvature_on_schedule(corpus, tmp_path, monkeypatch, kind):
    CountCurvature.seen.clear()
    with_chain(monkeypatch, lambda: [CountCurvature(kind, 3)])
    summary = train(small(corpus, tmp_path, steps=7, grad_accum=2))
    assert summary["status"] == "completed"
    # gauss_newton: after steps 3 and 6; hessian_vector: before steps 3 and 6 (2 and 5 done)
    expected = [3, 6] if kind == "gauss_newton" else [2, 5]
    assert CountCurvature.seen == [(kind, s) for s in expected]


# ------------------------------------------------------------------------------ real methods
@pytest.mark.parametrize("name,opt_args", [
    ("sophia", {"hessian_interval": 3}),
    ("sophia_h", {"hessian_interval": 3}),
    ("adahessian", {}),
    ("schedulefree_adamw", {}),
    ("momo", {}),
])
def test_methods_beyond_gradients_train_and_resume_exactly(corpus, tmp_path, monkeypatch,
                                                           name, opt_args):
    """Through valley train: the protocol runs on schedule, the run learns, and a run
    interrupted after a checkpoint resumes to the same result."""
    calls = []
    original_update = ChainOptimizer.update_curvature

    def counted(self):
        calls.append(self._group_step(self.param_groups[0]))
        return original_update(self)

    monkeypatch.setattr(ChainOptimizer, "update_curvature", counted)
    config = small(corpus, tmp_path, optimizer=name, opt_args=opt_args, steps=8,
                   checkpoint_every=4, eval_every=4, lr=1e-2 if name != "momo" else 1.0)
    straight = train({**config, "name": "straight"})
    assert straight["status"] == "completed"
    first = read_log(straight["run_dir"])[0]["train_loss"]
    assert straight["final_train_loss"] < first  # it learns
    if name == "sophia":  # after steps 3 and 6 (sampled-label backward)
        assert calls == [3, 6]
    elif name == "sophia_h":  # before steps 1, 4, 7
        assert calls == [0, 3, 6]
    elif name == "adahessian":  # before every step
        assert calls == list(range(8))
    else:
        assert calls == []
    resumed = interrupted_then_resumed(config, tmp_path, monkeypatch)
    a = torch.load(Path(straight["run_dir"]) / "checkpoint.pt", weights_only=False)
    b = torch.load(Path(resumed["run_dir"]) / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert straight["final_val_loss"] == resumed["final_val_loss"]
