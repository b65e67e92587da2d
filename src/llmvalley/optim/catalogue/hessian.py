"""Catalogue entries: Hessian-based methods: Sophia (G and H), AdaHessian.

AdaFisher is in :mod:`llmvalley.optim.catalogue.fisher` (its statistics come from module
hooks that ``create_optimizer`` attaches).

ARC-LSR1 (Ranganath, Singhal, Marcia, arXiv 2502.12298) is not registered yet: its memory size
and its acceptance and regularisation thresholds (eta1, eta2, gamma1, gamma2, the initial
cubic weight) must come from the paper, which was not available to check, and re-evaluating
the loss at trial points needs the closure inside the step.
"""

from llmvalley.optim.catalogue.entry import Entry, Paper

SOPHIA_PAPER = Paper("Sophia: A Scalable Stochastic Second-order Optimizer for Language Model "
                     "Pre-training (Liu, Li, Hall, Liang, Ma)", "2305.14342", 2023)

_LOOP_G = (
    "Curvature protocol (optimizer.curvature_request() == 'gauss_newton'): after steps k, 2k, "
    "... (hessian_interval k=10) the loop runs a forward pass on a batch, samples labels from "
    "the model's own logits (torch.distributions.Categorical), backwards the mean cross-entropy "
    "on those labels into zeroed .grad, calls optimizer.update_curvature(), and zeroes .grad, "
    "as train_sophiag.py does. bs is the number of tokens per optimizer step (batch x sequence "
    "length x accumulation x data-parallel ranks; 480 x 1024 in the GPT-2 configs), the B of "
    "the Gauss-Newton-Bartlett estimator B * g_hat**2, which the official code applies in the "
    "step as rho * bs * h. ")

ENTRIES: dict[str, Entry] = {
    "sophia": Entry(
        family="curvature",
        paper=SOPHIA_PAPER,
        reference="Liuhong99/Sophia (official, SophiaG); sophia-opt 0.2.2 on PyPI (tested "
                  "against)",
        weight_decay="decoupled (p *= 1 - lr*wd), before the update",
        notes=(
            "Sophia-G: m = EMA_beta1(g); h = beta2 h + (1 - beta2) g_hat**2 from sampled-label "
            "gradients g_hat; p -= lr * sign(m) * min(|m| / (rho * bs * h + eps), 1). Defaults "
            "are sophia-opt's (lr 1e-4, betas (0.965, 0.99), rho 0.04, wd 0.1, bs 5120, eps "
            "1e-15); the README's GPT-2 settings are lr 6e-4, rho 0.05, wd 0.2. " + _LOOP_G +
            "Until the first estimate h = 0 and the step is lr * sign(m), as in the reference "
            "(so step() without curvature updates runs as signed momentum). Paper differences: "
            "Algorithm 3 writes clip(m / max(gamma * h, eps), 1) with eps 1e-12 and estimates h "
            "at t mod k = 1 (before the step, from step 1); the code adds eps 1e-15 and starts "
            "from h = 0 after step k; the README says the code's lr corresponds to the paper's "
            "rho-scaled step. We follow the code. The paper's gamma for Sophia-G is 0.05."),
    ),
    "sophia_h": Entry(
        family="curvature",
        paper=SOPHIA_PAPER,
        reference="Liu et al., Algorithms 1 and 3 (tested against an independent reference "
                  "from the paper); the official PyTorch code has Sophia-G only; levanter's "
                  "sophia.py (the authors' JAX code) read for conventions",
        weight_decay="decoupled (p *= 1 - lr*wd), before the update",
        notes=(
            "Sophia-H: the update of sophia (sophia-opt's form, rho * max(h, 0) + eps) with h "
            "an EMA of Hutchinson's u * (H u), u ~ N(0, I) (Algorithm 1; a Gaussian probe as "
            "in the paper and levanter). Curvature protocol (curvature_request() == "
            "'hessian_vector'): before steps 1, 1 + k, 1 + 2k, ... (t mod k = 1, Algorithm 3) "
            "the loop takes the step's backward with loss.backward(create_graph=True), calls "
            "optimizer.update_curvature(), then step(), then zero_grad(set_to_none=True) to "
            "free the graph. No batch factor: Hutchinson estimates the mean loss's Hessian "
            "itself. Defaults: sophia-opt's with rho = 0.01, the paper's (and levanter's) "
            "gamma for Sophia-H; levanter also uses lr 0.85e-3 and bias-corrects m, which the "
            "paper's Algorithm 3 does not (we follow the paper). A negative estimate reaches "
            "the clip (max(h, 0)), as the paper's max(gamma * h, eps). Probes come from a "
            "per-tensor seed in the state (probe_seed), not torch's global generator. With "
            "several parameter groups each group takes its own Hessian-vector product (an "
            "unbiased estimate of the same diagonal, one extra double-backward per group)."),
    ),
    "adahessian": Entry(
        family="curvature",
        paper=Paper("ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning "
                    "(Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney)", "2006.00719", 2020),
        reference="amirgholami/adahessian (official; instruction/adahessian.py, the version "
                  "with spatial_average_block_size); independent reference in the tests",
        weight_decay="decoupled (p *= 1 - lr*wd), before the update (the reference subtracts "
                     "lr * wd * p with the step)",
        notes=(
            "m = EMA_beta1(g); D = spatial average of |z * (H z)| (Rademacher z); v = beta2 v "
            "+ (1 - beta2) D**2; p -= lr * (m / (1 - beta1**t)) / ((sqrt(v) ** k) / "
            "sqrt(1 - beta2**t) ** k + eps), k = hessian_power. Spatial averaging as the "
            "reference's spatial_average_block_size (1-D, 2-D, 3-D, 4-D): -1 means none for "
            "1-D, the whole row for matrices, the last dimension for 3-D, the kernel for conv "
            "kernels; b >= 1 averages consecutive blocks of b elements (the fairseq "
            "transformer config uses 32 for matrices). The row/kernel averages are stored "
            "reduced (out x 1, ...), which changes no number. As the reference, the average is "
            "of |H z| (the paper writes the average of the diagonal estimate, then its square). "
            "Curvature protocol: before every step, loss.backward(create_graph=True), "
            "optimizer.update_curvature(), step(), zero_grad(set_to_none=True). Without an "
            "estimate (the reference cannot run without one) v stays 0 and the step is "
            "lr * m_hat / eps. Probes come from a per-tensor seed in the state, not torch's "
            "global generator; several parameter groups each take their own Hessian-vector "
            "product. Defaults are the reference's (lr 0.15, betas (0.9, 0.999), eps 1e-4, "
            "hessian_power 1, wd 0)."),
    ),
}
