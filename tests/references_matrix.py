"""Independent references for the matrix and normalized optimizers, from the equations.

Plain per-matrix loops in the parameter's dtype (float64 in the tests), sharing no code with
llmvalley. Each takes the parameters (updated in place) and is driven by ``step(grads)``;
``names`` (optional) gives parameter names where a method routes by name (SCALE).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Reference:
    def __init__(self, params: list[Tensor], names: list[str] | None = None, **hp) -> None:
        self.params = params
        self.names = names or [""] * len(params)
        self.hp = hp
        self.state: list[dict] = [{} for _ in params]

    def step(self, grads: list[Tensor]) -> None:
        for p, g, st, name in zip(self.params, grads, self.state, self.names):
            st["t"] = st.get("t", 0) + 1
            self.update(p, g, st, name)

    def update(self, p: Tensor, g: Tensor, st: dict, name: str) -> None:
        raise NotImplementedError


def as_matrix(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


#: the Newton-Schulz normalisation guard of the reference code
NS_EPS = 1e-7


def ns5(g: Tensor, steps: int = 5) -> Tensor:
    """Keller Jordan's quintic Newton-Schulz, written as in his post (same dtype as g).

    The input is divided by ``||X||_F + 1e-7`` (added, not ``max(||X||_F, eps)`` as
    torch.optim.Muon): the form of Keller's original code and of the AdaMuon, NAMO / NAMO-D,
    Hybrid-AuON and COSMOS reference code, so every reference here that orthogonalizes with
    ``ns5`` follows its official convention (llmvalley's ``ns_eps_form="add"``).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.clone()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + NS_EPS)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def _inv_sqrt_psd(a: Tensor) -> Tensor:
    """Pseudo-inverse square root (eigenvalues below 1e-10 * max treated as zero)."""
    w, q = torch.linalg.eigh(a)
    keep = w > 1e-10 * w.max()
    inv = torch.where(keep, w.clamp_min(1e-300).rsqrt(), torch.zeros_like(w))
    return q @ torch.diag(inv) @ q.T


def polar(g: Tensor) -> Tensor:
    """Exact U V^T from the eigendecomposition of the short-side Gram matrix (a partial
    isometry when g is rank-deficient, e.g. SWAN's zero-mean rows of a tall matrix)."""
    if g.shape[0] <= g.shape[1]:
        return _inv_sqrt_psd(g @ g.T) @ g
    return g @ _inv_sqrt_psd(g.T @ g)


def nesterov_ema(g: Tensor, st: dict, mu: float) -> Tensor:
    m = st.setdefault("m", torch.zeros_like(g))
    m.mul_(mu).add_(g, alpha=1 - mu)
    return (1 - mu) * g + mu * m


class AdaMuonRef(Reference):
    """Si et al. Algorithm 1 (GPT-2 code): O = NS(sign(nesterov m)); v = b v + (1-b) O^2;
    O / (sqrt(v) + eps) rescaled to 0.2 sqrt(mn) / ||.||_F; p(1 - lr wd) - lr update.
    NS normalises by ||X||_F + 1e-7 (:func:`ns5`). A >2-D kernel is taken as its (out, -1)
    matrix, llmvalley's convention, not the reference code's handling."""

    def update(self, p, g, st, name):
        lr, mu, wd, eps = (self.hp[k] for k in ("lr", "momentum", "weight_decay", "eps"))
        u = nesterov_ema(g, st, mu)
        o = polar(as_matrix(torch.sign(u))) if self.hp.get("exact") else ns5(
            as_matrix(torch.sign(u)))
        v = st.setdefault("v", torch.zeros_like(o))
        v.mul_(mu).add_((1 - mu) * o * o)
        o = o / (v.sqrt() + eps)
        o = o * (0.2 * math.sqrt(o.numel()) / o.norm())
        p.mul_(1 - lr * wd).sub_(lr * o.reshape(p.shape))


class DionRef(Reference):
    """Ahn et al. Algorithm (single device): M += G; P = orth(M Q); R = M^T P;
    M -= (1 - mu) P R^T; Q = R / (col norms + eps); X(1 - lr wd) - lr sqrt(m/n) P Q^T."""

    def update(self, p, g, st, name):
        lr, mu, wd, eps = (self.hp[k] for k in ("lr", "momentum", "weight_decay", "eps"))
        gm = as_matrix(g)
        m_rows, n_cols = gm.shape
        if "M" not in st:
            st["M"] = torch.zeros_like(gm)
            r = min(m_rows, n_cols)
            st["Q"] = torch.randn(n_cols, r, dtype=g.dtype)
        mom, q = st["M"], st["Q"]
        mom += gm
        pm, _ = torch.linalg.qr(mom @ q)
        r_mat = mom.T @ pm
        mom -= (1 - mu) * pm @ r_mat.T
        q = r_mat / (torch.linalg.norm(r_mat, dim=0, keepdim=True) + eps)
        st["Q"] = q
        p.mul_(1 - lr * wd).sub_(lr * math.sqrt(m_rows / n_cols) * (pm @ q.T).reshape(p.shape))


class SWANRef(Reference):
    """Ma et al.: G~ = (G - row mean) / (row std + eps); (G~ G~^T)^{-1/2} G~ via eigh;
    rescaled to ||G~||_F; W(1 - lr wd) - lr update."""

    def update(self, p, g, st, name):
        lr, wd, eps = self.hp["lr"], self.hp.get("weight_decay", 0.0), self.hp["eps"]
        gm = as_matrix(g)
        mean = gm.mean(dim=1, keepdim=True)
        std = ((gm - mean) ** 2).mean(dim=1, keepdim=True).sqrt()
        gt = (gm - mean) / (std + eps)
        w = polar(gt)
        w = w * (gt.norm() / w.norm())
        p.mul_(1 - lr * wd).sub_(lr * w.reshape(p.shape))


class SinkGDRef(Reference):
    """Scetbon et al. SR-Sinkhorn: L times rows to norm sqrt(n), columns to norm sqrt(m)."""

    def update(self, p, g, st, name):
        lr, wd, steps = self.hp["lr"], self.hp.get("weight_decay", 0.0), self.hp["steps"]
        x = as_matrix(g).clone()
        m_rows, n_cols = x.shape
        for _ in range(steps):
            for i in range(m_rows):
                x[i] = x[i] * math.sqrt(n_cols) / x[i].norm()
            for j in range(n_cols):
                x[:, j] = x[:, j] * math.sqrt(m_rows) / x[:, j].norm()
        p.mul_(1 - lr * wd).sub_(lr * x.reshape(p.shape))


class SCALERef(Reference):
    """Glentis et al. (official code's rules): row-RMS normalization (column for
    embed_tokens), EMA momentum 0.9 first for lm_head, HF-style AdamW for 1-D tensors at
    ``lr * adam_lr_ratio`` (the code's adam_lr / max_lr; its LLaMA 60M-350M scripts use
    2e-2 / 1e-3 = 20; the ratio is 1 unless given)."""

    def update(self, p, g, st, name):
        lr, wd = self.hp["lr"], self.hp.get("weight_decay", 0.0)
        if g.ndim >= 2:
            if "lm_head" in name:
                m = st.setdefault("m", torch.zeros_like(g))
                m.mul_(0.9).add_(0.1 * g)
                g = m
            dim = 0 if "embed_tokens" in name else 1
            rms = torch.sqrt((g * g).mean(dim=dim, keepdim=True))
            u = g / torch.clamp(rms, min=1e-8)
            p.mul_(1 - lr * wd).sub_(lr * u)
            return
        lr = lr * self.hp.get("adam_lr_ratio", 1.0)
        b1, b2, eps, t = 0.9, 0.999, 1e-8, st["t"]
        m = st.setdefault("m", torch.zeros_like(g))
        v = st.setdefault("v", torch.zeros_like(g))
        m.mul_(b1).add_((1 - b1) * g)
        v.mul_(b2).add_((1 - b2) * g * g)
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p.mul_(1 - lr * wd).sub_(step * m / (v.sqrt() + eps))


class NAMORef(Reference):
    """Zhang et al. NAMO (scalar) and NAMO-D (``columnwise=True``), from the equations.
    NS normalises by ||X||_F + 1e-7 (:func:`ns5`), as src/namo.py. A >2-D kernel is taken as
    its (out, -1) matrix, llmvalley's convention, not the reference code's handling."""

    def update(self, p, g, st, name):
        hp = self.hp
        lr, mu, mu2, eps, wd = hp["lr"], hp["momentum"], hp["mu2"], hp["eps"], hp["weight_decay"]
        gm, pm = as_matrix(g), p.view(p.shape[0], -1)
        mt = nesterov_ema(gm, st, mu)
        o = polar(mt) if hp.get("exact") else ns5(mt)
        t = st["t"]
        base = lr * math.sqrt(1 - mu2**t) / (1 - mu**t + 1e-12)
        shape = 0.2 * math.sqrt(max(gm.shape))
        if not hp.get("columnwise"):
            st["v"] = mu2 * st.get("v", 0.0) + (1 - mu2) * float(gm.norm()) ** 2
            alpha = base * float(mt.norm()) / (math.sqrt(st["v"]) + eps)
            pm.mul_(1 - wd * min(alpha, 1.0)).sub_(min(alpha * shape, 1.0) * o)
            return
        v = st.setdefault("V", torch.zeros(gm.shape[1], dtype=g.dtype))
        v.mul_(mu2).add_((1 - mu2) * (gm**2).sum(0))
        c = mt.norm(dim=0) / (v.sqrt() + eps)
        mean, k = c.mean(), hp.get("col_clamp", 0.75)
        c = torch.minimum(torch.maximum(c, mean * k), mean / k)
        for j in range(gm.shape[1]):
            pm[:, j] *= max(1 - wd * min(float(c[j]) * base, 1.0), 0.0)
            pm[:, j] -= min(float(c[j]) * base * shape, 1.0) * o[:, j]


class AuONRef(Reference):
    """ryyzn9/AuON: decay, Nesterov EMA momentum, divide by sqrt(mean(cosh(gamma u/|u|)^2))."""

    def update(self, p, g, st, name):
        lr, mu, wd, gamma = (self.hp[k] for k in ("lr", "momentum", "weight_decay", "gamma"))
        p.mul_(1 - lr * wd)
        u = nesterov_ema(g, st, mu)
        r = math.sqrt(float((torch.cosh(gamma * u / (u.norm() + 1e-7)) ** 2).mean()))
        p.sub_(lr * u / (r + 1e-8))


class HybridAuONRef(Reference):
    """Maity's Hybrid-AuON: AuON's cosh brake applied to ns5(Nesterov momentum), as
    ryyzn9/AuON HybridAuON (2-D parameters; NS normalised by ||X||_F + 1e-7)."""

    def update(self, p, g, st, name):
        lr, mu, wd, gamma = (self.hp[k] for k in ("lr", "momentum", "weight_decay", "gamma"))
        p.mul_(1 - lr * wd)
        u = ns5(nesterov_ema(g, st, mu), self.hp["ns_steps"])
        r = math.sqrt(float((torch.cosh(gamma * u / (u.norm() + 1e-7)) ** 2).mean()))
        p.sub_(lr * u / (r + 1e-8))
