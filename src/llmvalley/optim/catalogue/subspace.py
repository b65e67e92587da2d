"""Catalogue entries: subspace and compressed-state methods: Subset-Norm / Subspace-Momentum
(and their combination), DCT-AdamW, SMMF, MicroAdam."""

from llmvalley.optim.catalogue.entry import Entry, Paper

_SNSM_PAPER = Paper("Lean and Mean Adaptive Optimization via Subset-Norm and Subspace-Momentum "
                    "with Convergence Guarantees (Nguyen & Nguyen, ICML 2025)",
                    "2411.07120", 2024)
_SNSM_REFERENCE = ("timmytonga/sn-sm (GenericOptim.py, subset_norm.py, subspace_momentum.py, "
                   "projectors/); not on PyPI: tested against an independent reference of the "
                   "paper's update written in tests/test_subspace.py")
_SNSM_DECAY = "decoupled (p -= lr*wd*p) after the update, as GenericOptim"
_SNSM_COMMON = (
    "HF-style step lr*sqrt(1-beta2^t)/(1-beta1^t) and eps 1e-6, as GenericOptim. Weight "
    "matrices only (the reference compresses nn.Linear weights): create_optimizer routes "
    "embeddings, the head, norms and biases to AdamW with eps 1e-6 (the reference runs its "
    "own HF-form Adam there, including on the head, which is an nn.Linear). lr defaults to "
    "GenericOptim's 1e-3; the paper trains with about 10x Adam's rate (5e-2 at 60M, with "
    "gradient clipping 1.0).")
_SM_NOTES = (
    "Subspace refreshed at the first step and whenever t % update_proj_gap == 0 (rank 128, "
    "gap 200, proj_type 'svd': the training script's defaults); 'topk' and 'uniform' select "
    "rows (m >= n) or columns. The momentum is reset when the subspace changes, at that step, "
    "as the paper says: the reference swaps the zeroed buffer in after taking its local "
    "reference, so its reset lands one step late (the refresh step mixes the old momentum, "
    "in the old basis, with the new projected gradient). 'uniform' draws its rows from a "
    "seed derived from (seed, parameter name, step), so resume is exact; the reference draws "
    "from torch's global generator. The reference's 'srht' and approximate-SVD projectors "
    "(fast_hadamard_transform) and its 'overlap_state' option are not offered. A rank at or "
    "above the smaller side of a matrix raises ValueError (the reference would silently run "
    "at full rank).")

ENTRIES: dict[str, Entry] = {
    "subset_norm": Entry(
        family="subspace",
        paper=_SNSM_PAPER,
        reference=_SNSM_REFERENCE,
        weight_decay=_SNSM_DECAY,
        notes=("AdamSN: Adam's first moment over a Subset-Norm second moment (the EMA of the "
               "sum of g^2 over each row when m >= n, else each column: max(m, n) numbers; "
               "subset_size=k groups k consecutive elements instead, k the largest divisor "
               "of numel <= k, or of sqrt(numel)/|k| for k < 0). " + _SNSM_COMMON),
    ),
    "subspace_momentum": Entry(
        family="subspace",
        paper=_SNSM_PAPER,
        reference=_SNSM_REFERENCE,
        weight_decay=_SNSM_DECAY,
        notes=("AdamSM: the numerator is P m + (g - P P^T g) (momentum in a rank-r subspace, "
               "plain SGD on the complement) over Adam's full second moment. " + _SM_NOTES
               + " " + _SNSM_COMMON),
    ),
    "snsm": Entry(
        family="subspace",
        paper=_SNSM_PAPER,
        reference=_SNSM_REFERENCE,
        weight_decay=_SNSM_DECAY,
        notes=("AdamSNSM, the paper's main method (its headline results and the README's "
               "example): Subspace-Momentum's numerator over Subset-Norm's denominator; state "
               "r*max(m, n) (momentum) + r*min(m, n) (the SVD basis) + max(m, n). " + _SM_NOTES
               + " " + _SNSM_COMMON),
    ),
    "dct_adamw": Entry(
        family="subspace",
        paper=Paper("FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization "
                    "of Large Language Models (Modoranu et al.; v1: SVD-Free Low-Rank Adaptive "
                    "Gradient Optimization)", "2505.17967", 2025),
        reference=("ista-daslab-optimizers 1.1.15 (fft_low_rank/dct_adamw.py, "
                   "fft_projector.py); not installable without CUDA, tested against its "
                   "DCTAdamW loaded from the unpacked wheel when present, and against an "
                   "independent reference of the paper's update"),
        weight_decay="decoupled (p *= 1 - lr*wd), before the update",
        notes=("Adam (torch eps form, as the reference's eps*sqrt(bc2)) on r columns of a "
               "fixed orthogonal DCT matrix of the short side, chosen by the l1 norm of G Q "
               "(Q^T G for wide matrices) at the first step and every update_proj_gap steps; "
               "m and v are rotated by Q_prev^T Q_crt on each change (|v R| for v). Only the "
               "r indices are state. The reference has no defaults for rank, update_proj_gap "
               "and rotate_subspace (constructor: gap 1, no rotation); rank 256, gap 200 and "
               "rotation on follow the paper's pre-training setup. sim_type='matmul' (the "
               "reference default) selects among the columns of the matrix the reference "
               "calls DCT-3; 'makhoul' among those of its transpose (the DCT-II basis, which "
               "the reference computes by FFT; here by matmul, the same numbers). Departures: "
               "the reference builds one Q for the whole model from the first matrix's short "
               "side (wrong for other sizes) in float32; here Q is built per size in float64 "
               "and cast. Its hard-coded exception that projects 512/1024 x 3584/4096 "
               "matrices on the long side is not copied, nor its max_shape (layers with a "
               "side >= 32000 get AdamW: the router sends embeddings and the head to AdamW "
               "instead), its error feedback (use_ef) or its Hadamard / random-QR bases. "
               "Weight matrices only; a rank at or above the short side raises ValueError."),
    ),
    "smmf": Entry(
        family="factored",
        paper=Paper("SMMF: Square-Matricized Momentum Factorization for Memory-Efficient "
                    "Optimization (Park et al., AAAI 2025)", "2412.08894", 2024),
        reference=("eai-lab/SMMF (SMMF/SMMF.py); not on PyPI: tested against an independent "
                   "reference of the paper's algorithm written in tests/test_subspace.py"),
        weight_decay=("decoupled (p *= 1 - lr*wd) before the update; "
                      "weight_decay_mode='adam' adds wd*p to the gradient instead"),
        notes=("Every tensor (vectors and scalars too, vector_reshape=True) is viewed as a "
               "near-square a x b matrix; both moments are rank-1 NNMF factors (row and "
               "column sums), the first moment's signs kept apart; beta_m = beta1 * "
               "growth_rate^(t-1), beta_v = 1 - t^decay_rate, no bias correction. "
               "betas=(beta1,) is the reference's beta. decay_rate defaults to -0.8, the "
               "README's setting for Transformers (the code's default is -0.5, for CNNs). "
               "The signs are packed 32 to a state element (1 bit each, the paper's memory "
               "count: a + b + ab/32 + a + b elements); the reference keeps one bool byte "
               "each. The reference's beta=None mode (no first moment) is not offered."),
    ),
    "microadam": Entry(
        family="low-bit",
        paper=Paper("MicroAdam: Accurate Adaptive Optimization with Low Space Overhead and "
                    "Provable Convergence (Modoranu et al., NeurIPS 2024)", "2405.15593", 2024),
        reference=("IST-DASLab/MicroAdam; ista-daslab-optimizers 1.1.15 (micro_adam.py over "
                   "the CUDA kernels of ISTA-DASLab-Optimizers-CUDA, bf16 only); not runnable "
                   "here: tested against an independent reference of Algorithm 1 with the "
                   "kernels' conventions in tests/test_microadam.py"),
        weight_decay="decoupled (p *= 1 - lr*wd), before the update, as the reference",
        notes=("Adam's moments recomputed each step from a ring of the last m Top-K "
               "gradients (int16 block-local indices, bf16 values; weights beta^age, the "
               "newest row age 0) with c_j = (1-beta_j)/(1-beta_j^t) and eps outside the "
               "root, as the reference's kernel; the Top-K residual is the error feedback, "
               "4-bit asymmetric per bucket of quant_block_size (bf16 min/max, round half "
               "up), added to the next gradient before Top-K. The update is sparse. "
               "Defaults: m=10, k_init=0.01 (paper), quant_block_size=100000 and lr=1e-4 "
               "(the official run scripts and README), betas/eps/weight_decay the reference "
               "constructor's. topk_block_size=20864 is what the reference derives from an "
               "A100's shared memory (half of it in floats); it picks another block on other "
               "GPUs. State: 4mk + ceil(d/2) + 4*ceil(d/quant_block_size) bytes per tensor "
               "(words of 4 bytes, exact for fp32/bf16 parameters when 8 divides d; float64 "
               "parameters use 8-byte words). Departures: the reference computes in bf16 "
               "(gradient, error sum, update); here in the compute dtype (float32 for bf16 "
               "parameters), so Top-K values are rounded to bf16 when stored and that "
               "rounding is not fed back. Codes are clamped to [0, 15] (the reference's "
               "byte would wrap if bf16 rounding of a bucket's range excluded an element "
               "by more than half a step) and a flat bucket gets code 0 (the reference "
               "divides by zero; both decode to the bucket's min). Top-K ties may pick other "
               "indices than the CUDA topk. The min/max arrays hold exactly ceil(d/B_q) "
               "buckets (the reference allocates one spare). The reference's alpha options "
               "(densifying the update with a fraction of the error feedback) are not "
               "offered: alpha=0, the paper's algorithm."),
    ),
}
