"""Catalogue entries: Ranger21."""

from llmvalley.optim.catalogue.entry import Entry, Paper

ENTRIES: dict[str, Entry] = {
    "ranger21": Entry(
        family="wrapper",
        paper=Paper("Ranger21: a synergistic deep learning optimizer (Wright & Demeure)",
                    "2106.13731", 2021),
        reference=("lessw2020/Ranger21 (ranger21/ranger21.py; not on PyPI); tested against an "
                   "independent float64 reference of its equations in tests/test_ranger.py"),
        weight_decay=("stable: p *= 1 - wd * lr_t / sqrt(mean v_hat), the mean bias-corrected "
                      "second moment over every parameter of every group, before the update"),
        notes=(
            "AdamW core with, in the official code's order: unit-wise adaptive gradient "
            "clipping (agc_clip=1e-2, agc_eps=1e-3; rows of 2-D/3-D tensors, whole 1-D "
            "tensors), gradient centralization and standardization (g / (std + 1e-8) for "
            "tensors of > 2 elements), positive-negative momentum (two buffers alternating by "
            "step parity, beta1**2, (1 + pnm_momentum) m - pnm_momentum m_prev over the code's "
            "noise norm sqrt((1 + beta2)^2 + beta2^2)), the softplus denominator "
            "softplus(sqrt(v_hat) + eps, softplus_beta=50), stable weight decay (wd=1e-4), "
            "norm loss (norm_loss=1e-4, on every parameter, weight-decayed or not), Ranger21's "
            "linear warm-up and warm-down, and Lookahead (k=5, alpha=0.5). Schedule mapping: "
            "total_steps (required) is the code's num_epochs * num_batches_per_epoch; "
            "warmup_steps=None takes the code's rule ceil(2 / (1 - beta2)) steps, or "
            "int(0.22 * total_steps) when that exceeds 45% of the run; the warm-down starts "
            "at int(warmdown_start_pct=0.72 * total_steps) and ends at warmdown_min_lr=3e-5; "
            "the base rate is the group's lr at each step (the code's constructor lr), so use "
            "no outer scheduler. The stable decay and the norm loss use the scheduled lr_t. "
            "lr defaults to 1e-3 (the code requires it). Departures: (1) a reference bug "
            "(lessw2020/Ranger21 issue 53, fixed upstream by PR 54 with a legacy flag): the "
            "code applies the stable weight decay and the norm loss only to the last "
            "parameter of the previous loop (a stale loop variable); here, as the paper "
            "composes it, every parameter gets them. (2) The code standardizes and centralizes "
            "p.grad in place and then again before the momentum update, so the first moment "
            "sees the gradient normalized twice (a relative difference of about 1e-8 / "
            "std(g)); here both moments see it once, and the gradient is left untouched. "
            "(3) The code allocates max_variance_ma but its maximum is a no-op (it is never "
            "updated), so there is no AMSGrad and that buffer is not kept: state is 4 "
            "tensors per parameter (exp_avg, neg_exp_avg, exp_avg_sq, slow_param) against the "
            "code's 5. (4) While every second moment is zero the stable decay is skipped (the "
            "code divides by zero). (5) The code's pnm_momentum_factor is ignored (beta0 is "
            "fixed at 1); here pnm_momentum is used, defaulting to 1. Not offered: the MADGRAD "
            "and AdaBelief cores, Chebyshev steps, gc_conv_only, "
            "lookahead_load_at_validation. cautious=True is refused (it would mask the "
            "Lookahead synchronisation). pytorch-optimizer's Ranger21 is not the official "
            "update (beta0=0.9 with a beta0 noise norm, an effective AMSGrad, the variance sum "
            "starting at 1) and is not used as an oracle."
        ),
    ),
}
