"""Catalogue entries: Kronecker-factored and whitening preconditioners: Shampoo, SOAP, PSGD Kron,
ASGO."""

from llmvalley.optim.catalogue.entry import Entry, Paper

_NONFINITE = ("Non-finite factors: when a basis/root is recomputed from a factor that is not "
              "finite, the factor is reset to zero and the previous basis/root is kept "
              "(identity before the first); a failed eigendecomposition (after a float64 "
              "retry) keeps the previous one; both warn (RuntimeWarning) naming the "
              "parameter.")

ENTRIES: dict[str, Entry] = {
    "soap": Entry(
        family="curvature",
        paper=Paper("SOAP: Improving and Stabilizing Shampoo using Adam (Vyas et al.)",
                    "2409.11321", 2024),
        reference="nikhilvyas/SOAP (soap.py); tested against an independent float64 "
                  "reference written from the paper and that code",
        weight_decay="decoupled (p -= lr*wd*p) after the update, on the updated weights; "
                     "none at the first step (which only builds the preconditioner)",
        notes=("Adam (HF epsilon, bias correction with the step count of Adam, one lower than "
               "the optimizer's) in the eigenbasis of L_k = EMA(G_(k) G_(k)^T), one factor "
               "per tensor dimension; eigh at the first step, then one power-iteration/QR "
               "step every precondition_frequency steps, after the update, sorting the basis "
               "and the second moment by the estimated eigenvalues and rotating the first "
               "moment into the new basis. Applies to every tensor as the reference does: "
               "1-D tensors and dimensions above max_precond_dim stay unrotated (Adam). "
               "Departures: eigh/QR run in the factor's dtype when it is float64 (the "
               "reference always uses float32); the first moment is rotated only when the "
               "basis changes (the reference rotates it back and forth every step, equal up "
               "to rounding). Not offered: normalize_grads, correct_bias=False, "
               "data_format='channels_last'. " + _NONFINITE),
    ),
    "shampoo": Entry(
        family="curvature",
        paper=Paper("Shampoo: Preconditioned Stochastic Tensor Optimization (Gupta, Koren, "
                    "Singer); A Distributed Data-Parallel PyTorch Implementation of the "
                    "Distributed Shampoo Optimizer (Shi et al., arXiv 2309.06497)",
                    "1802.09568", 2018),
        reference="facebookresearch/optimizers (distributed_shampoo, single device, "
                  "RootInvShampooPreconditionerConfig with eigendecomposition); tested "
                  "against an independent float64 reference",
        weight_decay="decoupled (p *= 1 - lr*wd) before the update, as DECOUPLED (the "
                     "reference adds wd*p to the search direction)",
        notes=("Distributed Shampoo's conventions where the paper is silent: tensors are "
               "merged (merge_small_dims, target dimensionality 1: size-1 dimensions "
               "dropped, neighbours merged from the last while their product stays <= "
               "max_preconditioner_dim, so small tensors get one full-matrix factor) and "
               "cut into blocks of max_preconditioner_dim per dimension; inverse exponent "
               "1/(2k) for a block of order k (inverse_exponent overrides it for all); root "
               "(F/bc + eps I)^(-e) by eigh with the minimum eigenvalue lifted to eps; factor "
               "sums (shampoo_beta=1, AdaGrad) or EMAs with (1-b) weight and bias correction; "
               "roots start at the identity and are recomputed when (t % freq == 0 and t > "
               "start) or t == start; the filtered gradient (momentum = the reference's "
               "betas[0]) is debiased; grafting is per block, ||P_graft||/(||P||+1e-16), "
               "Adam grafting with grafting_beta2 and grafting_eps and bias correction, and "
               "before start_preconditioning_step a grafted run steps with the grafting "
               "direction alone. Defaults are the reference constructor's (lr 1e-2, betas "
               "(0.9, 1.0) as momentum/shampoo_beta, epsilon 1e-12, max_preconditioner_dim "
               "1024, precondition_frequency 1) except grafting: 'adam' with "
               "AdamPreconditionerConfig's defaults (beta2 0.999, epsilon 1e-10), since the "
               "reference calls grafting 'the key ingredient to making Shampoo work in "
               "practice' and grafts in every README example (its constructor default is "
               "no grafting: grafting='none'; ungrafted Shampoo needs a per-problem lr). "
               "For LMs the README uses precondition_frequency=100. Not offered: other "
               "preconditioner configs (eigenvalue-corrected, KL), beta3, iterate "
               "averaging, L2/corrected weight decay, distributed options. The reference "
               "raises on a non-finite factor; here: " + _NONFINITE),
    ),
    "psgd_kron": Entry(
        family="curvature",
        paper=Paper("Preconditioned Stochastic Gradient Descent (Xi-Lin Li); Kron "
                    "preconditioner: Black Box Lie Group Preconditioners for SGD (Li)",
                    "1512.04202", 2015),
        reference="kron-torch 0.3.3 (kron_torch.Kron, after lixilinx/psgd_torch); tested "
                  "against it",
        weight_decay="decoupled (p *= 1 - lr*wd) before the update, on tensors of two or "
                     "more dimensions only (the reference adds wd*p to the direction only "
                     "when p.dim() >= 2)",
        notes=("betas=(b1,) is the reference's b1 (debiased momentum). The update "
               "probability schedule (max_prob, min_prob, prob_decay, flat_start; or a fixed "
               "preconditioner_update_probability) and the update counter are per tensor "
               "(the reference keeps one counter for the optimizer; identical when all "
               "tensors step together). Random draws (the probe V and the 1% balancing "
               "draw) come from a counter-based generator keyed by seed, step and the "
               "tensor's index, so resume is bit-exact; the reference uses the global torch "
               "RNG and random.Random(42). As the reference, the momentum used for the "
               "direction at an update step carries the probe perturbation sqrt(eps32) "
               "mean|m| V. Departures: the triangular solve runs in the compute dtype (the "
               "reference casts it to float32); with momentum_into_precond_update=False the "
               "gradient itself is not modified (the reference perturbs p.grad in place); "
               "mu_dtype/precond_dtype are replaced by state_precision (factors are exact "
               "slots in the compute dtype)."),
    ),
    "asgo": Entry(
        family="curvature",
        paper=Paper("ASGO: Adaptive Structured Gradient Optimization (An et al., NeurIPS "
                    "2025)", "2503.20762", 2025),
        reference="infinity-stars/ASGO (optimizers/asgo.py, Polar-Express inverse root); "
                  "tested against an independent float64 reference",
        weight_decay="decoupled (p *= 1 - lr*wd) before the update",
        notes=("M = lerp(M, G, 1 - momentum); V = lerp(V, GG^T or G^TG on the smaller side "
               "(rows when m < n), 1 - beta2); U = V^{-1/2} M (or M V^{-1/2}) by 10 coupled "
               "Polar-Express steps (eps only in the normaliser, as the reference), "
               "rescaled to 0.2 sqrt(mn)/||U||_F. Hidden matrices only; embeddings, the "
               "head, norms and biases go to Adam (0.9, 0.95), eps 1e-8, no decay, as the "
               "reference's training script (which also sends the output head to ASGO). "
               "Departures: >2-D tensors use their (out, -1) matrix view (the reference "
               "rejects them); the inverse root runs in the compute dtype (the reference "
               "casts to float32); a zero update stays zero (the reference divides by its "
               "zero norm). A non-finite root falls back to the identity, as the reference, "
               "with a RuntimeWarning; a non-finite V is also reset to zero."),
    ),
    "splus": Entry(
        family="curvature",
        paper=Paper("A Stable Whitening Optimizer for Efficient Neural Network Training "
                    "(Frans, Levine, Abbeel)", "2506.07254", 2025),
        reference="kvfrans/splus (optax/splus.py, the JAX version the paper's experiments "
                  "use); tested against an independent float64 reference written from it",
        weight_decay="decoupled, scaled by the shape scale as the step (p -= lr*s*(u + "
                     "wd*p): the reference adds wd*p before its shape scaling)",
        notes=("M = EMA_b1(G); U = Q_L sign(Q_L^T M Q_R) Q_R^T with Q the eigenvectors "
               "(eigh(F + eps I)) of L = EMA_b2(G G^T), R = EMA_b2(G^T G), recomputed after "
               "the update at step 1 and every inverse_every steps (identity before); sides "
               "of max_dim or more keep no factor and are not rotated. Step scale 2/(m+n) "
               "for matrices with both sides below max_dim whose name contains none of "
               "nonstandard_strings ('embed', 'layernorm', matched lower-cased in the "
               "parameter's name, as the reference's paths); nonstandard_constant (0.001) "
               "for everything else, including vectors and >2-D tensors, which take sign(M) "
               "unrotated. Applies to every parameter, as the reference. Evaluation weights: "
               "the EMA (ema_rate) of the weights each step starts from, bias-corrected "
               "(splus_get_eval_params), through optimizer.eval()/train(); in eval mode the "
               "state 'ema' holds the training weights (swapped back exactly by train()), so "
               "no third weight copy is kept. Defaults: the reference's (b1 0.9, b2 0.999, "
               "ema_rate 0.999, eps 1e-30, inverse_every 100, weight_decay 1e-2, max_dim "
               "10000, nonstandard_constant 0.001) and lr 0.1, its PyTorch port's default "
               "(the README suggests about 0.2 for transformers, or Adam's lr times twice the "
               "width). The PyTorch port in the same repository departs from the JAX code "
               "(EMA taken after the sign step, decay after the update, no name rule, "
               "'> max_dim' in the scale test); the JAX code is followed. Departures: "
               "unnamed parameters (a plain list) match no name rule; eigh runs in at least "
               "float32. " + _NONFINITE),
    ),
}
