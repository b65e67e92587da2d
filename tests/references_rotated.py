"""Independent references for Conda and COSMOS, written from their update equations.

Plain per-matrix loops in the parameter's dtype (float64 in the tests), sharing no code with
llmvalley; driven by ``step(grads)`` like :mod:`tests.references_matrix`.
"""

from __future__ import annotations

import math

import torch

from tests.references_matrix import Reference, ns5


class CondaRef(Reference):
    """Wang et al. (jie040109/Conda, proj_type "std"): Adam in the short-side singular basis
    of the momentum, refreshed every ``update_proj_gap`` steps; HF bias correction; scale on
    the way back; weight decay after the step."""

    def update(self, p, g, st, name):
        b1, b2 = self.hp["betas"]
        lr, eps, wd = self.hp["lr"], self.hp["eps"], self.hp["weight_decay"]
        t = st["t"]
        if "m" not in st:
            st["m"], st["v"] = torch.zeros_like(g), torch.zeros_like(g)
        st["m"] = b1 * st["m"] + (1 - b1) * g
        tall = g.shape[0] >= g.shape[1]
        if (t - 1) % self.hp["update_proj_gap"] == 0:
            u, _, vh = torch.linalg.svd(st["m"], full_matrices=False)
            st["Q"] = vh if tall else u

        def rotate(x):
            return x @ st["Q"].T if tall else st["Q"].T @ x

        def unrotate(x):
            return x @ st["Q"] if tall else st["Q"] @ x

        gr = rotate(g)
        st["v"] = b2 * st["v"] + (1 - b2) * gr * gr
        step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        u = self.hp["scale"] * unrotate(rotate(st["m"]) / (st["v"].sqrt() + eps))
        p.sub_(step_size * u)
        p.sub_(lr * wd * p)


class COSMOSRef(Reference):
    """Liu et al. (lliu606/COSMOS, COSMOS_optim.py with Nesterov): Adam in a tracked rank-r
    eigenbasis of G^T G, NS5 on the residual, normalised step."""

    def update(self, p, g, st, name):
        b1, b2 = self.hp["betas"]
        lr, eps, wd = self.hp["lr"], self.hp["eps"], self.hp["weight_decay"]
        r, gamma, ratio = self.hp["rank"], self.hp["gamma"], self.hp["lr_ratio"]
        t = st["t"]
        m_rows, n_cols = g.shape
        if t == 1:
            st["M"] = torch.zeros_like(g)
            st["V"] = torch.zeros(m_rows, r, dtype=g.dtype)
            eigvecs, _, _ = torch.linalg.svd(g.T @ g)
            st["P"] = eigvecs[:, :r]
            st["GG"] = (1 - b2) * (g @ st["P"]).T @ (g @ st["P"])
        else:
            old = st["P"]
            st["P"], _ = torch.linalg.qr(b2 * old @ st["GG"] + (1 - b2) * g.T @ (g @ old))
            rot = old.T @ st["P"]
            gp = g @ st["P"]
            st["GG"] = b2 * rot.T @ st["GG"] @ rot + (1 - b2) * gp.T @ gp
        st["M"] = b1 * st["M"] + g
        P = st["P"]
        st["V"] = b2 * st["V"] + (1 - b2) * (g @ P) ** 2
        bc1 = (1 - b1**t) / (1 - b1)
        bc2 = 1 - b2**t
        h = (g + b1 * st["M"]) / (1 + b1 * bc1)
        a = ((h @ P) / (torch.sqrt(st["V"] / bc2) + eps)) @ P.T
        resid = ns5(h - (h @ P) @ P.T)
        size = math.sqrt(m_rows * n_cols)
        u = a + gamma * size * resid / (resid.norm() + eps)
        p.mul_(1 - lr * wd)
        p.sub_(lr * ratio * size * u / (u.norm() + eps))
