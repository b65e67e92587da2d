"""Write tests/data/checkpoint-0.1.pt with llmvalley 0.1 (run at commit 21fd91f).

    PYTHONPATH=<0.1 checkout>/src:. python tests/data/make_checkpoint_0_1.py
"""
import copy

import torch

import llmvalley
from tests.helpers import convergence_lr, make_model, make_optimizer, train

out = {"version": "0.1.0", "optimizers": {}}
for spec in llmvalley.list_optimizers():
    name = spec.name
    model = make_model(seed=0)
    opt = make_optimizer(name, model, lr=convergence_lr(name))
    train(model, opt, 0, 5)
    entry = {"model": {k: v.clone() for k, v in model.state_dict().items()},
             "optimizer": copy.deepcopy(opt.state_dict()), "lr": convergence_lr(name)}
    train(model, opt, 5, 5)
    entry["after_5_more"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["optimizers"][name] = entry
torch.save(out, "tests/data/checkpoint-0.1.pt")
print(len(out["optimizers"]))
