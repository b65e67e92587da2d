"""Catalogue entries: low-rank projection methods (GaLore, Fira, APOLLO, APOLLO-Mini, FRUGAL,
Online Subspace Descent)."""

from llmvalley.optim.catalogue.entry import Entry, Paper

_HF_DECAY = "decoupled (p -= lr*wd*p), after the update, as the reference's HF-style AdamW"
_FALLBACK = ("Embeddings, the head, norms and biases go to the AdamW fallback (lr 0.01, betas "
             "(0.9, 0.999), eps 1e-6, wd 0, the C4 scripts' settings); the reference trains "
             "them with its HF-style AdamW (eps outside the bias correction, decay after), so "
             "they differ from it at early steps and where eps matters.")
_SVD = ("The SVD runs in float32 for float32/bf16 tensors and in float64 for float64 ones (the "
        "reference casts every non-float32 tensor, float64 included, to float32). Only "
        "proj_type 'std' (rank on the short side) is offered.")
_RANK = ("A rank at or above a matrix's smaller side, and tensors that are not 2-D, raise "
         "ValueError naming the parameter (the reference silently runs a full-rank rotation).")

ENTRIES: dict[str, Entry] = {
    "galore": Entry(
        family="low-rank",
        paper=Paper("GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection "
                    "(Zhao et al., ICML 2024)", "2403.03507", 2024),
        reference="jiaweizzhao/GaLore; galore-torch 1.0 GaLoreAdamW (tested against, float64)",
        weight_decay=_HF_DECAY,
        notes=("Defaults are the C4 scripts' (lr 0.01, rank 128 as for LLaMA-60M, "
               "update_proj_gap 200, scale 0.25, eps 1e-6, wd 0), not the CLI's (gap 50, scale "
               "1). The basis is the top-r singular vectors of the current update, refreshed at "
               "steps 1, 1 + gap, ... (the reference's pre-increment step % gap == 0); moments "
               "are not reset or rotated when it changes. HF Adam in the subspace (bias "
               "correction in the step size, eps after the root), scale on the way back. "
               f"State: r x short basis + two long x r moments. {_SVD} {_RANK} {_FALLBACK}"),
    ),
    "fira": Entry(
        family="low-rank",
        paper=Paper("Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank "
                    "Constraint? (Chen et al.)", "2410.01623", 2024),
        reference="xichen-fy/Fira; fira 1.0.2 FiraAdamW (tested against, float64)",
        weight_decay=_HF_DECAY,
        notes=("GaLore plus the residual (G - scale * P P^T G) scaled per channel of the long "
               "side by ||psi|| / (||P^T G|| + 1e-8), psi the subspace Adam output, then the "
               "norm-growth limiter (gamma 1.01; the limited norm is stored). The residual "
               "subtracts scale * P P^T G, exactly as the code computes it (its project_back "
               "already multiplies by the scale), not the paper's G - P P^T G. The scale is "
               "named `scale` (the reference's `alpha`), as in galore. Defaults: lr 0.01, rank "
               f"128, gap 200, scale 0.25, eps 1e-6, wd 0. {_SVD} {_RANK} {_FALLBACK}"),
    ),
    "apollo": Entry(
        family="low-rank",
        paper=Paper("APOLLO: SGD-like Memory, AdamW-level Performance (Zhu et al., MLSys 2025)",
                    "2412.05270", 2024),
        reference=("zhuhanqing/APOLLO; apollo-torch 1.0.3 APOLLOAdamW (tested against, "
                   "float64, same random stream)"),
        weight_decay=_HF_DECAY,
        notes=("A Gaussian N(0, 1/r) projection on the short side, drawn in float32 from a "
               "per-parameter seed (the reference's stable_randn / next_seed stream, seed 1, 2, "
               "... by position in the group's tensor list: the reference numbers every "
               "parameter of the optimizer, so its seeds match ours when the low-rank "
               "parameters come first or alone); the seed and the basis are checkpointed. HF "
               "Adam in the subspace only estimates a per-channel scale ||psi|| / (||R|| + "
               "1e-8) of the raw gradient; then the norm-growth limiter and sqrt(scale) "
               "(scale_front applies it before the limiter; norm_growth_limiter=False is the "
               "reference's disable_nl). proj='svd' uses GaLore's SVD basis instead. Defaults: "
               "the C4 scripts' (lr 0.01, rank 128 as for 60M, gap 200, scale 1, channel, eps "
               f"1e-6, wd 0). {_RANK} {_FALLBACK}"),
    ),
    "apollo_mini": Entry(
        family="low-rank",
        paper=Paper("APOLLO: SGD-like Memory, AdamW-level Performance (Zhu et al., MLSys 2025)",
                    "2412.05270", 2024),
        reference=("zhuhanqing/APOLLO; apollo-torch 1.0.3 APOLLOAdamW with rank 1, "
                   "scale_type 'tensor' (tested against, float64)"),
        weight_decay=_HF_DECAY,
        notes=("APOLLO at rank 1 with one tensor-wise scale and scale 128 (a step multiplier of "
               "sqrt(128)), the paper's APOLLO-Mini settings. The scripts pass scale_front for "
               "the 60M and 130M models; here it is off by default (the reference's default). "
               f"Otherwise as apollo. {_RANK} {_FALLBACK}"),
    ),
    "frugal": Entry(
        family="low-rank",
        paper=Paper("FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for "
                    "Scalable Training (Zmushko et al., ICML 2025)", "2411.07837", 2024),
        reference=("official code (mirror hungquangbui02022003/FRUGAL, frugal/"
                   "proj_optimizer_templates.py, GaloreOptimizer / CoordOptimizer / "
                   "BlockOptimizer with AdamW); tested against independent references from "
                   "its equations"),
        weight_decay="decoupled (p *= 1 - lr*wd), before the update, on every parameter",
        notes=("The state-full subspace gets torch-style Adam (eps 1e-8); the state-free "
               "residual G - P^T P G gets signSGD at lr * inactive_lr_scale "
               "(inactive_update_rule 'sgd' or 'no' as the reference); both are multiplied by "
               "proj_params_lr_scale. Every update_proj_gap steps (the reference's "
               "update_gap) the subspace is re-selected and, with reset_statistics, Adam's "
               "moments and step count restart (bias correction restarts). proj_type: 'svd' "
               "(round(short side * density) top singular vectors, the default), 'random' "
               "(semi-orthogonal), 'randperm' (random coordinates of the short side), or the "
               "coordinate projectors 'columns', 'rows', 'randk' (int(total * density) "
               "entries). Random choices come from a per-parameter seed stream stored in the "
               "state (resume is exact); the reference draws from the global torch RNG, which "
               "cannot be reproduced or checkpointed. proj_type 'blockwise' is the reference's "
               "BlockOptimizer (what the pretraining scripts run as --optimizer frugal: "
               "block_adamw, block_order 'descending'): whole tensors take turns holding Adam "
               "state. round(n * density) of the group's n tensors are active (a count of "
               "tensors, not of parameters, as the reference), chosen by block_order: "
               "'descending' (from the last tensor backwards, wrapping; the scripts' choice "
               "and the default here, though the reference's own default is 'random'), "
               "'ascending', 'mirror' (pairs j, n-1-j from both ends inwards; an odd count "
               "raises ValueError, the reference asserts) or 'random'. At steps 1, 1 + gap, "
               "... (the group's step count since the last selection, as the reference reads "
               "its first tensor's) every tensor's Adam state is freed and the new active "
               "tensors start from zero moments, bias correction counted from the "
               "re-selection (the reference always resets, so reset_statistics=False raises "
               "ValueError here instead of being ignored); inactive tensors take the "
               "state-free rule; weight decay shrinks every tensor. density may be 0 (the 7B "
               "script: every tensor state-free) or 1 for blockwise, and any tensor shape is "
               "accepted. state_bytes counts the Adam state of the active tensors only, also "
               "before the first step; state_numel(shape) is a tensor's state while active "
               "(2 m n). Random order draws torch.randperm from a per-group seed stream "
               "(block_seed, default 0, advanced after each draw as APOLLO's next_seed) kept "
               "in every tensor's state, instead of the reference's global torch RNG, which a "
               "checkpoint cannot hold: same law, another sequence. The selection is kept in "
               "each tensor's state (block_active, block_step, block_cursor, block_rng) and "
               "the active tensors' labels in the param group (active_blocks); every tensor of "
               "the group is assumed to get a gradient at every step (the reference also "
               "counts tensors without one). Resume is exact from state_dict() and from a DCP "
               "checkpoint loaded by llmvalley.bench.distributed.load_dcp (valley train's), "
               "which gives the fresh state the saved selection's entries. Not offered: the "
               "mirror's "
               "dynamic-rho / dynamic-T extensions (not in the paper). Defaults: the C4 "
               "scripts' (lr 1e-3, density 0.25, gap 200, wd 0, betas (0.9, 0.999)). "
               "Embeddings, head, norms and biases go to the AdamW fallback with the same lr, "
               f"betas, eps and wd (the reference's own AdamW is torch-style). {_RANK}"),
    ),
    "online_subspace_descent": Entry(
        family="low-rank",
        paper=Paper("Memory-Efficient LLM Training with Online Subspace Descent (Liang et "
                    "al.)", "2408.12857", 2024),
        reference=("kyleliang919/Online-Subspace-Descent (galore_torch, proj_type "
                   "'continuous', AdamW projector optimizer); tested against an independent "
                   "reference from its equations"),
        weight_decay=_HF_DECAY,
        notes=("GaLore's weight step (HF Adam in the subspace, scale 0.25, lr 0.01, rank 128) "
               "with a basis that is never recomputed: it starts from the SVD of the first "
               "gradient and after every later step takes one torch-AdamW step (lr 1 / "
               "update_proj_gap times lr / initial_lr, betas (0.9, 0.999), eps 1e-8, wd 0.01: "
               "torch.optim.AdamW's defaults, as the reference) on ||Gh P^T P - Gh||^2 (left "
               "side ||P P^T Gh - Gh||^2), Gh = G / ||G||_F, with the gradient in closed form "
               "instead of autograd; P is never re-orthonormalised. The projector's AdamW "
               "state (proj_exp_avg, proj_exp_avg_sq) adds 2 r x short elements. The "
               f"reference's wandb logging is dropped. {_SVD} {_RANK} {_FALLBACK}"),
    ),
}
