"""Rank functions for tests/test_sharded.py (module level, so spawned processes import them).

Each builds the same tiny float64 model twice, one copy plain (the single-process run) and
one under FSDP2's ``fully_shard`` over the gloo group (rows split unevenly: 5 and 7 rows over
2 ranks), and drives both with identical batches, so the sharded run's gradients equal the
plain run's and any difference comes from the optimizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

VOCAB, CLASSES = 10, 7
#: methods whose model hooks refuse LayerNorm (AdaFisher): its parameters go to AdamW
ROUTE_LAYERNORM = {"adafisher", "adafisherw"}


def options(name: str) -> dict[str, Any]:
    """``create_optimizer`` arguments of ``name`` on the tiny model."""
    from tests.helpers import TEST_HPARAMS

    hp = dict(TEST_HPARAMS.get(name, {}))
    if name in ROUTE_LAYERNORM:
        hp["rules"] = [(nn.LayerNorm, "adamw")]
    return hp


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, 6), nn.Linear(6, 5), nn.LayerNorm(5),
                         nn.Linear(5, CLASSES, bias=False)).double()


def shard(model: nn.Module, mesh: Any = None) -> nn.Module:
    """FSDP2 over the default group, or over ``mesh`` (a 2-D mesh: HSDP)."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model)[:-1]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def hsdp_mesh() -> Any:
    """A (replicate 1, shard W) mesh: HSDP's 2-D layout on the ranks there are."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1, dist.get_world_size()),
                            mesh_dim_names=("replicate", "shard"))


def batch_loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x = torch.randint(0, VOCAB, (8, 3), generator=gen)
    y = torch.randint(0, CLASSES, (8, 3), generator=gen)
    return nn.functional.cross_entropy(model(x).reshape(-1, CLASSES), y.reshape(-1))


def train(model: nn.Module, opt: Any, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        loss = batch_loss(model, step)
        loss.backward()
        opt.step(loss=loss.detach())


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def wrap(model: nn.Module, mode: str) -> tuple[nn.Module, nn.Module]:
    """(the module to run, the module whose parameters the optimizer takes) for ``mode``:
    ``fsdp``, ``hsdp`` (FSDP2 on a 2-D mesh) or ``ddp``."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), model
    model = shard(model, hsdp_mesh() if mode == "hsdp" else None)
    return model, model


def equivalence(names: list[str], steps: int, mode: str = "fsdp") -> dict[str, str | float]:
    """Largest parameter difference between the distributed (``mode``, see :func:`wrap`) and
    the plain run of each optimizer after ``steps`` steps, or the error the distributed run
    raised."""
    from llmvalley.optim import create_optimizer

    out: dict[str, str | float] = {}
    for name in names:
        plain = tiny_model()
        runner, sharded = wrap(tiny_model(), mode)
        hp = options(name)
        ref = create_optimizer(name, plain, **hp)
        try:
            opt = create_optimizer(name, sharded, **hp)
            torch.manual_seed(1)  # the same global stream for both runs (Dion's random Q)
            train(runner, opt, range(steps))
        except NotImplementedError as e:
            out[name] = f"NotImplementedError: {e}"
            continue
        torch.manual_seed(1)
        train(plain, ref, range(steps))
        out[name] = max(float((a.detach() - full(b).detach()).abs().max())
                        for a, b in zip(plain.parameters(), sharded.parameters()))
    return out


def nonfinite(name: str, policy: str, value: float) -> dict[str, Any]:
    """Rank 1 alone puts ``value`` (nan/inf) in its shard of the first hidden matrix's
    gradient; returns what ``step()`` did on this rank and whether anything changed. Policy
    ``"raise-clipped"``: ``raise``, with the step given the gradients' global norm (a partial
    DTensor), as ``valley train`` passes its clipping norm."""
    from llmvalley.optim import create_optimizer

    clipped = policy.endswith("-clipped")
    policy = policy.removesuffix("-clipped")
    model = shard(tiny_model())
    opt = create_optimizer(name, model, nonfinite=policy)
    train(model, opt, range(2))
    before = [full(p).detach().clone() for p in model.parameters()]
    state_before = {k: full(v).clone() for k, v in _flat_state(opt).items()}
    opt.zero_grad()
    batch_loss(model, 5).backward()
    if dist.get_rank() == 1:
        model[1].weight.grad.to_local()[0, 0] = value
    result: dict[str, Any] = {"error": None, "skipped": None}
    try:
        if clipped:
            grads = [q.grad for q in model.parameters()]  # valley train's norm, unclipped
            opt.step(grad_norm=torch.nn.utils.get_total_norm(grads))
        else:
            opt.step()
    except FloatingPointError as e:
        result["error"] = str(e)
    result["skipped"] = opt.skipped_steps
    result["unchanged"] = all(torch.equal(a, full(p).detach())
                              for a, p in zip(before, model.parameters()))
    result["state_unchanged"] = all(torch.equal(v, full(_flat_state(opt)[k]))
                                    for k, v in state_before.items())
    return result


def nonfinite_cases(cases: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """:func:`nonfinite` for each ``(name, policy, "nan" or "inf")``."""
    return [nonfinite(name, policy, float(value)) for name, policy, value in cases]


def _flat_state(opt: Any) -> dict[str, torch.Tensor]:
    return {f"{i}/{k}": v for i, st in enumerate(opt.state.values()) for k, v in st.items()
            if isinstance(v, torch.Tensor)}


def _dcp_save(model: nn.Module, opt: Any, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def _dcp_load(model: nn.Module, opt: Any, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    opt.init_state()  # DCP fills the tensors the state dict already holds
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def checkpoint_run(name: str, folder: str, save_at: int, steps: int, mode: str,
                   sharded: bool = True) -> list[Any]:
    """``mode="save"``: train ``save_at`` steps, save a DCP checkpoint to ``folder``, train on
    to ``steps``; ``mode="load"``: load ``folder`` into a fresh model and optimizer and train
    from ``save_at`` to ``steps``. Returns the final whole parameters (numpy arrays)."""
    from llmvalley.optim import create_optimizer

    model = tiny_model()
    if sharded:
        model = shard(model)
    opt = create_optimizer(name, model, **options(name))
    if mode == "save":
        train(model, opt, range(save_at))
        _dcp_save(model, opt, Path(folder))
        if not sharded:  # also a plain torch.save checkpoint, as `valley train` writes
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()},
                       Path(folder) / "plain.pt")
    elif mode == "load_plain":  # a plain single-process checkpoint into sharded ranks
        from llmvalley.bench.distributed import load_full

        saved = torch.load(Path(folder) / "plain.pt", weights_only=False)
        load_full(model, opt, saved["model"], saved["optim"])
    else:
        _dcp_load(model, opt, Path(folder))
    train(model, opt, range(save_at, steps))
    # numpy arrays travel back by value (tensors would go through shared memory)
    return [full(p).detach().numpy().copy() for p in model.parameters()]


def checkpoint_all(names: list[str], folder: str, save_at: int, steps: int, mode: str,
                   sharded: bool = True) -> dict[str, list[Any]]:
    """:func:`checkpoint_run` for each optimizer in ``names`` (a sub-folder each)."""
    return {name: checkpoint_run(name, f"{folder}/{name}", save_at, steps, mode, sharded)
            for name in names}


def state_bytes_report(name: str) -> dict[str, int]:
    """Local and global state bytes of an optimizer on the sharded model, after one step."""
    from llmvalley.optim import create_optimizer
    from llmvalley.optim.memory import global_state_bytes, state_bytes

    model = shard(tiny_model())
    opt = create_optimizer(name, model)
    train(model, opt, range(1))
    return {"local": state_bytes(opt), "global": global_state_bytes(opt)}


def ddp_replica(name: str, steps: int) -> list[Any]:
    """Parameters after ``steps`` DDP steps in which each rank sees its own batches (as data
    parallelism does): the replicas must stay identical."""
    from torch.nn.parallel import DistributedDataParallel

    from llmvalley.optim import create_optimizer

    model = tiny_model()
    runner = DistributedDataParallel(model)
    opt = create_optimizer(name, model, **options(name))
    train(runner, opt, range(1000 * dist.get_rank(), 1000 * dist.get_rank() + steps))
    return [p.detach().numpy().copy() for p in model.parameters()]


def blockwise_dcp(folder: str, mode: str) -> list[Any]:
    """Blockwise FRUGAL on six sharded matrices, two active: ``"save"`` trains 5 steps (the
    third active set, not the first), saves a DCP checkpoint and trains 4 more; ``"load"``
    loads it into a fresh optimizer through ``valley train``'s loader and trains the same 4.
    Returns the whole parameters."""
    from llmvalley.bench.distributed import load_dcp
    from llmvalley.optim import create_optimizer

    torch.manual_seed(0)
    model = shard(nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(6)]).double())
    hp = dict(proj_type="blockwise", update_proj_gap=2, density=0.34, lr=0.01, fallback=None)
    opt = create_optimizer("frugal", model, **hp)

    def steps(start: int, n: int) -> None:
        for s in range(start, start + n):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(s),
                            dtype=torch.float64)
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()

    if mode == "save":  # the layout valley train's save_dcp writes
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        steps(0, 5)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=folder)
    else:
        load_dcp(Path(folder), model, opt)
    steps(5, 4)
    return [full(p).detach().numpy() for p in model.parameters()]
