"""Catalogue entries: Stability methods: SPAM, Stable-SPAM, AdaGC."""

from llmvalley.optim.catalogue.entry import Entry, Paper

ENTRIES: dict[str, Entry] = {
    "spam": Entry(
        family="stability",
        paper=Paper("SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training "
                    "(Huang et al., ICLR 2025)", "2501.06842", 2025),
        reference=("TianjinYellow/SPAM-Optimizer (galore_torch/SPAM.py); tested against an "
                   "independent reference of its update in tests/test_stability.py"),
        weight_decay="decoupled (p *= 1 - lr*wd), after the update, as the official code",
        notes=("Adam with the HF eps form. Defaults are the README's: threshold=5000 (theta), "
               "reset_interval=500 (the code's DeltaT), warmup_steps=150, clip_delay=20 (the "
               "code's grad_accu_steps: no spike clipping in the first 20 steps of training and"
               " of each reset interval). Moments are zeroed every reset_interval steps; the "
               "bias-correction step count is not reset, as in the code. The cosine warm-up "
               "ramps the step (not the weight decay) from 0.01 after each reset; there is none "
               "before the first reset. Reset and warm-up follow each tensor's step count "
               "(the code keeps one global count; equal when every parameter steps every "
               "step). reset_interval=0 turns reset and warm-up off (the code divides by it). "
               "Not offered: the code's sparse momentum (density < 1, random masks). The code "
               "clips p.grad in place; here the gradient is left untouched."),
    ),
    "stable_spam": Entry(
        family="stability",
        paper=Paper("Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam "
                    "(Huang et al., 2025)", "2502.17055", 2025),
        reference=("TianjinYellow/StableSPAM (galore_torch/stablespam.py); tested against an "
                   "independent reference of its update in tests/test_stability.py"),
        weight_decay="decoupled (p *= 1 - lr*wd), before the update",
        notes=("AdaClip (max-clip against a bias-corrected EMA of max|g|, gamma3), AdaGN "
               "(the gradient rescaled to m_norm_hat / (sqrt(v_norm_hat) + eps), gamma1, "
               "gamma2), momentum reset every reset_interval steps (the code's "
               "update_proj_gap), Adam with torch's eps form. Defaults are the code's "
               "(gamma1=0.7, gamma2=0.9, gamma3=0.999, reset every 1000 steps); the README's "
               "BF16 LLaMA-130M script uses gamma1=0.85, gamma2=0.99999. total_steps (the "
               "code's total_T) with eta_min=0.5 scales gamma1 and beta1 by a cosine from 1 "
               "to eta_min; it is held at eta_min after total_steps + 1 (the code's "
               "CosineAnnealingLR would climb back). As the code, the step count restarts at "
               "1 on each reset step and bias-corrects Adam and also the (not reset) norm and "
               "maximum statistics. Departure (a reference bug): the code replaces "
               "state['exp_avg'] / state['exp_avg_sq'] with zeros but updates the old tensors "
               "it had already bound, so the reset step uses the old moments with bias "
               "correction 1 - beta**1; here the moments are zeroed before that step's update,"
               " as the paper's reset intends. Not offered: amsgrad (in the code's signature, "
               "not in the paper) and gamma1=-1 (use betas[0])."),
    ),
    "adagc": Entry(
        family="stability",
        paper=Paper("AdaGC: Enhancing LLM Pretraining Stability via Adaptive Gradient "
                    "Clipping (Wang et al., ICML 2026)", "2502.11034", 2025),
        reference=("lishuai-97/AdaGC (PyTorch/Megatron patch, clip_grads.py AdaGC); tested "
                   "against an independent reference in tests/test_stability.py"),
        weight_decay="decoupled (p *= 1 - lr*wd), before the update (AdamW)",
        notes=("AdamW (torch eps form) with the shell option adagc=True on by default; every "
               "other recipe takes adagc=True the same way (Lion, Muon, ...). Defaults are "
               "the official code's: adagc_lambda_rel=1.04, adagc_beta=0.99, "
               "adagc_lambda_abs=1.0 (its --clip-grad), adagc_warmup=100, eps=1e-6; the "
               "paper's first version reports lambda_rel=1.05, beta=0.98. During the warm-up "
               "the global norm is taken over each parameter group's gradients (the shell "
               "steps groups one at a time), so with several groups the warm-up clips each "
               "group by its own norm; after the warm-up every tensor is clipped on its own, "
               "as in the paper. The warm-up follows each tensor's step count. The clipped "
               "gradient is what every later part of the chain sees (the code clips .grad in "
               "place); the gradient tensors are left untouched."),
    ),
}
