"""Independent reference implementations, written from the papers' equations.

Used by the differential tests for methods whose official code is not on PyPI. Each is a
plain per-tensor loop with no code shared with llmvalley, so a mistake in a shared transform
cannot hide in both. Each takes a list of float64 parameters and is driven by
``step(grads)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Reference:
    """Base: holds parameters (updated in place) and a step counter."""

    def __init__(self, params: list[Tensor], **hp) -> None:
        self.params = params
        self.hp = hp
        self.t = 0
        self.state: list[dict] = [{} for _ in params]

    def step(self, grads: list[Tensor]) -> None:
        self.t += 1
        for p, g, st in zip(self.params, grads, self.state):
            self.update(p, g, st)

    def update(self, p: Tensor, g: Tensor, st: dict) -> None:
        raise NotImplementedError


class AdanRef(Reference):
    """Adan, Algorithm 1 of arXiv 2208.06677 (code's beta convention: b = 1 - paper beta)."""

    def update(self, p, g, st):
        b1, b2, b3 = self.hp["betas"]
        lr, eps, wd = self.hp["lr"], self.hp["eps"], self.hp["weight_decay"]
        prev = st.get("prev", g.clone())
        diff = g - prev
        st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
        st["d"] = b2 * st.get("d", torch.zeros_like(p)) + (1 - b2) * diff
        st["n"] = b3 * st.get("n", torch.zeros_like(p)) + (1 - b3) * (g + b2 * diff) ** 2
        st["prev"] = g.clone()
        t = self.t
        m_hat = st["m"] / (1 - b1**t)
        d_hat = st["d"] / (1 - b2**t)
        n_hat = st["n"] / (1 - b3**t)
        eta = lr / (n_hat.sqrt() + eps)
        if self.hp.get("no_prox", False):
            p.mul_(1 - lr * wd)
            p.sub_(eta * (m_hat + b2 * d_hat))
        else:
            p.copy_((p - eta * (m_hat + b2 * d_hat)) / (1 + lr * wd))


class LaPropRef(Reference):
    """LaProp, Algorithm 1 of arXiv 2002.04839 with the official code's lr-weighted bias
    correction and its (unscaled) decoupled weight decay."""

    def update(self, p, g, st):
        b1, b2 = self.hp["betas"]
        lr, eps, wd = self.hp["lr"], self.hp["eps"], self.hp["weight_decay"]
        st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        st["c1"] = b1 * st.get("c1", 0.0) + (1 - b1) * lr
        v_hat = st["v"] / (1 - b2**self.t)
        st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * lr * g / (v_hat.sqrt() + eps)
        p.sub_(st["m"] * (lr / st["c1"]))
        p.mul_(1 - wd)


class AdEMAMixRef(Reference):
    """AdEMAMix, Algorithm 1 of arXiv 2409.03113 with the alpha/beta3 schedulers of Sec. 3."""

    def update(self, p, g, st):
        b1, b2, b3_end = self.hp["betas"]
        lr, eps, wd = self.hp["lr"], self.hp["eps"], self.hp["weight_decay"]
        t, alpha = self.t, self.hp["alpha"]
        ta, tb = self.hp.get("alpha_warmup"), self.hp.get("beta3_warmup")
        if ta is not None:
            alpha = min(t * alpha / ta, alpha)
        b3 = b3_end
        if tb is not None and t < tb:
            ln_half = math.log(0.5)
            start, end = math.log(b1 + 1e-8), math.log(b3_end + 1e-8)
            # beta3(t) = 0.5 ** (1 / half-life(t)), half-life linear in t from beta1's
            hl = (1 - t / tb) * (ln_half / start - 1) + (t / tb) * (ln_half / end - 1)
            b3 = 0.5 ** (1 / (hl + 1))
        st["m1"] = b1 * st.get("m1", torch.zeros_like(p)) + (1 - b1) * g
        st["m2"] = b3 * st.get("m2", torch.zeros_like(p)) + (1 - b3) * g
        st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        m1_hat = st["m1"] / (1 - b1**t)
        v_hat = st["v"] / (1 - b2**t)
        p.sub_(lr * ((m1_hat + alpha * st["m2"]) / (v_hat.sqrt() + eps) + wd * p))


class MarsRef(Reference):
    """MARS-AdamW, Algorithm 2 of arXiv 2411.10438 (approximate form, g_0 = 0), with the
    official code's AdamW treatment of non-2-D parameters."""

    def update(self, p, g, st):
        b1, b2 = self.hp["betas"]
        lr, eps, gamma = self.hp["lr"], self.hp["eps"], self.hp["gamma"]
        wd = self.hp["weight_decay"]
        t = self.t
        if p.dim() == 2:
            c = g + gamma * (b1 / (1 - b1)) * (g - st.get("prev", torch.zeros_like(g)))
            if c.norm() > 1:
                c = c / c.norm()
            st["prev"] = g.clone()
            scale = 1.0
        else:
            c = g
            b1, b2 = self.hp["betas_1d"]
            wd = self.hp["weight_decay_1d"]
            scale = self.hp["lr_1d"] / self.hp["lr"]
        st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * c
        st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * c * c
        m_hat = st["m"] / (1 - b1**t)
        v_hat = st["v"] / (1 - b2**t)
        p.sub_(lr * scale * (m_hat / (v_hat.sqrt() + eps) + wd * p))


class SignumRef(Reference):
    """Signum, Algorithm 2 of arXiv 1802.04434, with decoupled weight decay."""

    def update(self, p, g, st):
        mu, lr, wd = self.hp["momentum"], self.hp["lr"], self.hp["weight_decay"]
        st["m"] = mu * st.get("m", torch.zeros_like(p)) + (1 - mu) * g
        p.mul_(1 - lr * wd)
        p.sub_(lr * torch.sign(st["m"]))


def cautious_mask(u: Tensor, g: Tensor) -> Tensor:
    """Cautious mask of arXiv 2411.16085, Algorithm 1: 1[u*g > 0] normalised by its mean."""
    mask = (u * g > 0).to(u.dtype)
    return mask / max(mask.mean().item(), 1e-3)


class CautiousAdamWRef(Reference):
    """C-AdamW (arXiv 2411.16085, Algorithm 2) with torch's epsilon form."""

    def update(self, p, g, st):
        b1, b2 = self.hp["betas"]
        lr, eps, wd = self.hp["lr"], self.hp["eps"], self.hp["weight_decay"]
        st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
        st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        u = (st["m"] / (1 - b1**self.t)) / ((st["v"] / (1 - b2**self.t)).sqrt() + eps)
        p.mul_(1 - lr * wd)
        p.sub_(lr * u * cautious_mask(u, g))


class CautiousLionRef(Reference):
    """C-Lion (arXiv 2411.16085 applied to Lion, arXiv 2302.06675 Algorithm 2)."""

    def update(self, p, g, st):
        b1, b2 = self.hp["betas"]
        lr, wd = self.hp["lr"], self.hp["weight_decay"]
        m = st.get("m", torch.zeros_like(p))
        u = torch.sign(b1 * m + (1 - b1) * g)
        p.mul_(1 - lr * wd)
        p.sub_(lr * u * cautious_mask(u, g))
        st["m"] = b2 * m + (1 - b2) * g
