"""Catalogue entries of the methods in llmvalley's first releases (0.1 and 0.2)."""

from llmvalley.optim.catalogue.entry import Entry, Paper

ENTRIES: dict[str, Entry] = {
    "adabelief": Entry(
        family="adaptive",
        paper=Paper('AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed '
                    'Gradients (Zhuang et al., NeurIPS 2020)',
                    "2010.07468", 2020),
        reference=('juntang-zhuang/Adabelief-Optimizer; adabelief-pytorch 0.2.1 (tested '
                   'against)'),
        weight_decay=('decoupled (p *= 1 - lr*wd, or 1 - wd with fixed_decay) before the '
                      'update; weight_decouple=False gives coupled L2'),
        notes=('With amsgrad and rectify together the running maximum is used in the '
               'rectified branch too (the reference silently ignores it there).'),
    ),
    "adam": Entry(
        family="adaptive",
        paper=Paper('Adam: A Method for Stochastic Optimization (Kingma & Ba)',
                    "1412.6980", 2014),
        reference=('torch.optim.Adam'),
        weight_decay=('coupled L2 (g += wd*p), as torch.optim.Adam'),
        notes=("fused=None uses torch's fused kernel when it applies (same math); "
               'cautious=True masks the update (C-Adam).'),
    ),
    "adamw": Entry(
        family="adaptive",
        paper=Paper('Decoupled Weight Decay Regularization (Loshchilov & Hutter)',
                    "1711.05101", 2017),
        reference=('torch.optim.AdamW'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=("cautious=True gives C-AdamW (Liang et al., arXiv 2411.16085) with torch's eps"
               " form; the mask comes from the update's sign, not exp_avg**2."),
    ),
    "adan": Entry(
        family="adaptive",
        paper=Paper('Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep '
                    'Models (Xie et al.)',
                    "2208.06677", 2022),
        reference=('sail-sg/Adan (adan.py)'),
        weight_decay=('proximal after the update (p /= 1 + lr*wd); no_prox=True: decoupled '
                      'before'),
        notes=("betas follow the code's convention (1 minus the paper's). The reference's "
               'max_grad_norm option is not offered: clip the gradients before step() '
               'instead, which gives identical results (the clipped gradient is what Adan '
               'stores).'),
    ),
    "ademamix": Entry(
        family="adaptive",
        paper=Paper('The AdEMAMix Optimizer: Better, Faster, Older (Pagliardini et al.)',
                    "2409.03113", 2024),
        reference=('apple/ml-ademamix (pytorch/ademamix.py)'),
        weight_decay=('decoupled, lr-scaled, on the pre-update parameters (u += wd*p)'),
        notes=("alpha=8 is the README's language-model setting (the code's default is 2); the"
               ' paper sets alpha_warmup = beta3_warmup = the total number of steps.'),
    ),
    "grams": Entry(
        family="adaptive",
        paper=Paper('Grams: Gradient Descent with Adaptive Momentum Scaling (Cao, Li, Song)',
                    "2412.17107", 2024),
        reference=('Gunale0926/Grams; grams-pytorch 0.0.2 (tested against)'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=('HF epsilon form, as the reference. The reference overwrites p.grad with '
               'sign(g)*|m|; here the gradient is left untouched.'),
    ),
    "laprop": Entry(
        family="adaptive",
        paper=Paper('LaProp: Separating Momentum and Adaptivity in Adam (Ziyin, Wang, Ueda)',
                    "2002.04839", 2020),
        reference=('Z-T-WANG/LaProp-Optimizer (laprop.py)'),
        weight_decay=('decoupled, NOT scaled by lr (p -= wd*p), after the update, as the '
                      'official code'),
        notes=("The reference's `centered` option is not offered (it references undefined "
               'variables and cannot run).'),
    ),
    "mars": Entry(
        family="adaptive",
        paper=Paper('MARS: Unleashing the Power of Variance Reduction for Training Large '
                    'Models (Yuan et al.)',
                    "2411.10438", 2024),
        reference=("AGI-Arena/MARS (MARS/optimizers/mars.py, mars_type='mars-adamw', "
                   'is_approx=True)'),
        weight_decay=('decoupled, lr-scaled, inside the update (u += wd*p)'),
        notes=('The reference stores a reference to p.grad as last_grad (wrong when gradients'
               ' are zeroed in place); a copy is kept here. Non-2-D parameters take the '
               "reference's AdamW branch unless optimize_1d=True."),
    ),
    "nadam": Entry(
        family="adaptive",
        paper=Paper('Incorporating Nesterov Momentum into Adam (Dozat, ICLR workshop 2016)',
                    "n/a", 2016),
        reference=('torch.optim.NAdam'),
        weight_decay=('coupled L2 by default; decoupled_weight_decay=True gives NAdamW'),
        notes=(''),
    ),
    "sgd": Entry(
        family="classical",
        paper=Paper('On the importance of initialization and momentum in deep learning '
                    '(Sutskever et al., ICML 2013)',
                    "n/a", 2013),
        reference=('torch.optim.SGD'),
        weight_decay=('coupled L2 (g += wd*p), as torch.optim.SGD'),
        notes=(''),
    ),
    "adafactor": Entry(
        family="factored",
        paper=Paper('Adafactor: Adaptive Learning Rates with Sublinear Memory Cost (Shazeer &'
                    ' Stern)',
                    "1804.04235", 2018),
        reference=('torch.optim.Adafactor'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update, as torch'),
        notes=('lr caps the relative step size (rho_t = min(lr, 1/sqrt(t))), as torch. No '
               "first moment (beta1 = 0), as the paper's recommended setting and torch."),
    ),
    "came": Entry(
        family="factored",
        paper=Paper('CAME: Confidence-guided Adaptive Memory Efficient Optimization (Luo et '
                    'al., ACL 2023)',
                    "2307.02047", 2023),
        reference=('yangluo7/CAME; came-pytorch 0.1.3 (tested against)'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=("The reference has no default lr; 2e-4 is its README's example."),
    ),
    "adamuon": Entry(
        family="matrix",
        paper=Paper('AdaMuon: Adaptive Muon Optimizer (Si, Zhang, Shen)',
                    "2507.11005", 2025),
        reference=('Chongjie-Si/AdaMuon (gpt2/models/optimizers/adamuon.py, per '
                   'optimizers-part2.md); tested against an independent reference from the '
                   'equations'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=('O = NS5(sign(Nesterov momentum)); v = b v + (1-b) O^2 with b = momentum '
               '(0.95), no bias correction; O / (sqrt(v) + eps) rescaled to RMS 0.2 (0.2 '
               "sqrt(mn) / ||.||_F). The repository's top-level adamuon.py is a different "
               'variant (no sign, separate beta2=0.999 with bias correction, sqrt(min)/||.|| '
               "times 0.2 sqrt(max)); this recipe follows the GPT-2 code and the paper's "
               "Algorithm 1. NS5 normalizes its input by ||X||_F + 1e-7 (ns_eps_form='add', "
               "the default), as the reference; ns_eps_form='clamp' is torch.optim.Muon's "
               'max(||X||_F, ns_eps). The NS input is sign(.), of norm sqrt(mn) whatever the '
               'gradient scale, so the two forms differ only by about 1e-7 / sqrt(mn) '
               "relative. The reference's treatment of >2-D weights differs; here a kernel "
               '(out, in, kh, kw) is orthogonalized as its (out, in*kh*kw) matrix view '
               "(Keller's rule), the other steps being element-wise or over the whole tensor."),
    ),
    "auon": Entry(
        family="matrix",
        paper=Paper('AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates '
                    '(Maity)',
                    "2509.24320", 2025),
        reference=('ryyzn9/AuON (auon/optimizer.py, AuON); tested against an independent '
                   'reference'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=('EMA momentum with Nesterov look-ahead (always on in the reference); u = M~ / '
               '(sqrt(mean(cosh(gamma M~ / ||M~||)^2)) + 1e-8). For real layers the cosh '
               'factor is about 1, so AuON is close to unnormalized Nesterov SGD. No shape '
               'factor (the repository has none; some write-ups add sqrt(max(1, m/n))).'),
    ),
    "auon_hybrid": Entry(
        family="matrix",
        paper=Paper('AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates '
                    '(Maity)',
                    "2509.24320", 2025),
        reference=('ryyzn9/AuON (auon/optimizer.py, HybridAuON); tested against an '
                   'independent reference'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=("Hybrid-AuON: AuON's cosh brake applied to Newton-Schulz(M~). ns_steps=1 is "
               "the paper's 'single Newton-Schulz iteration'; the repository's HybridAuON "
               'class defaults to ns_steps=5 (pass ns_steps=5 to match it). The reference '
               "normalizes by ||X||_F + 1e-7 (ns_eps_form='add') and runs NS in the parameter"
               ' dtype; ns_dtype=None here means bf16 on CUDA as for every Muon-family method'
               " (pass ns_dtype='float32' for the reference's precision). The repository's "
               "HybridAuON treats >2-D weights differently; here a kernel (out, in, kh, kw) is "
               "orthogonalized as its (out, in*kh*kw) matrix view (Keller's rule), the cosh "
               'brake being over the whole tensor.'),
    ),
    "conda": Entry(
        family="matrix",
        paper=Paper('Conda: Column-Normalized Adam for Training Large Language Models Faster '
                    '(Wang et al.)',
                    "2509.24218", 2025),
        reference=("jie040109/Conda (conda_torch/conda.py + projector.py, proj_type 'std'); "
                   'tested against an independent reference from the equations'),
        weight_decay=('decoupled (p -= lr*wd*p), after the update as the reference'),
        notes=("Defaults are the LLaMA scripts' (lr 0.01, betas (0.9, 0.99), scale 0.25, "
               'update_proj_gap 2000, wd 0, eps 1e-8). The SVD of the momentum is refreshed '
               "at steps 1, 1 + gap, ... (the reference's pre-increment step % gap == 0); the"
               ' second moment is kept in the rotated basis and not rotated when the basis '
               'changes, as the reference. The SVD runs in float32 for low-precision states '
               'and in float64 for float64 ones (the reference casts everything that is not '
               "float32, float64 included, to float32). Only proj_type 'std' is offered. The "
               'reference trains all other parameters with the same optimizer as Hugging '
               'Face-style Adam (eps outside the bias correction, wd after) at the same lr; '
               'here they go to the AdamW fallback at lr 0.01 and betas (0.9, 0.99).'),
    ),
    "cosmos": Entry(
        family="matrix",
        paper=Paper('COSMOS: A Hybrid Adaptive Optimizer for Memory-Efficient Training of '
                    'LLMs (Liu et al.)',
                    "2502.17410", 2025),
        reference=('lliu606/COSMOS (COSMOS_optim.py, Nesterov on); tested against an '
                   'independent reference from the equations'),
        weight_decay=('decoupled (p *= 1 - lr*wd, unadjusted lr), before the update'),
        notes=("Defaults: the README's usage (lr 2e-3, betas (0.95, 0.95), wd 0.1, lr_ratio "
               "0.2) and the code's (rank 64, gamma 0.2, Nesterov, NS5 normalised by ||X|| + "
               '1e-7). The hidden-matrix step has RMS lr * lr_ratio. rank is capped at the '
               'input dimension (the reference fails when n < rank); at rank = n the '
               'Newton-Schulz residual term is dropped as exactly zero. NS runs in bf16 on '
               "CUDA and in the parameter's precision elsewhere (the reference always uses "
               "bf16; pass ns_dtype to choose). The reference's nestrov=False branch (which "
               'uses G / bc1, not the momentum) is not offered. Its Adam branch for other '
               'tensors hard-codes m = beta1 m + 0.1 g and bias correction 1 - 0.9^t; here '
               'those tensors go to a standard AdamW fallback with the same lr, betas and wd.'),
    ),
    "dion": Entry(
        family="matrix",
        paper=Paper('Dion: Distributed Orthonormalized Updates (Ahn et al.)',
                    "2504.05295", 2025),
        reference=('microsoft/dion (dion/dion_simple.py); tested against an independent '
                   'reference from the equations'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=('Single-process form: M += G; P = QR(MQ); R = M^T P; M -= (1-mu) P R^T; Q = R '
               '/ (||R||_col + eps); X -= lr sqrt(m/n) P Q^T. Householder QR as dion_simple '
               '(the distributed dion.py defaults to randomized Cholesky QR). rank = '
               'ceil(rank_fraction * min(m, n)). The reference routes the unembedding to '
               'AdamW or to Lion at lr/sqrt(d_in); here it goes to the AdamW fallback (pass a'
               ' rule to change).'),
    ),
    "muon": Entry(
        family="matrix",
        paper=Paper('Muon: An optimizer for hidden layers in neural networks (Jordan et al., '
                    'blog 2024); Muon is Scalable for LLM Training (Liu et al.)',
                    "2502.16982", 2024),
        reference=('KellerJordan/Muon (muon.py, SingleDeviceMuon); torch.optim.Muon (tested '
                   'against, bit-exact with ns_dtype=bfloat16)'),
        weight_decay=('decoupled (p *= 1 - lr*wd, unadjusted lr), before the update'),
        notes=("Keller's defaults (lr 0.02, EMA momentum 0.95 with Nesterov, NS5, sqrt(max(1,"
               " m/n)), wd 0); the fallback AdamW is MuonWithAuxAdam's (lr 3e-4, betas (0.9, "
               "0.95), eps 1e-10, wd 0). torch.optim.Muon's NS `eps` is `ns_eps` here. NS "
               'runs in fp32 on CPU by default (torch.optim.Muon always uses bf16); '
               "ns_dtype='bfloat16' reproduces torch bit for bit. The gradient is not "
               "modified (Keller's lerp_ on p.grad is done out of place)."),
    ),
    "namo": Entry(
        family="matrix",
        paper=Paper('Adam Improves Muon: Adaptive Moment Estimation with Orthogonalized '
                    'Momentum (Zhang et al.)',
                    "2602.17080", 2026),
        reference=('minxin-zhg/namo (src/namo.py, NAMO); tested against an independent '
                   'reference from the equations'),
        weight_decay=('W *= 1 - wd * min(alpha, 1) (alpha: the adaptive rate), before the '
                      'update'),
        notes=("mu2 is the paper's mu_2 (EMA of the squared raw-gradient norm), eps its "
               'adamnorm_eps; scale_coeff the 0.2 of 0.2 sqrt(max(m, n)). Defaults are '
               "src/namo.py's (lr 1e-2; the paper's GPT-2 configs tune lr, e.g. 0.012 / 0.009). "
               'Weight decay is scaled by the clamped adaptive rate, not by lr. The AdamW backup '
               '(betas (0.9, 0.95), eps 1e-8, wd as the method) is the fallback. NS5 normalizes '
               "its input by ||X||_F + 1e-7 (ns_eps_form='add', the default) as the reference "
               "does; ns_eps_form='clamp' (torch.optim.Muon's max(||X||_F, ns_eps)) differs "
               'materially only when ||M~||_F comes near 1e-7 (tiny gradients: a few percent of '
               "the step or more at gradient scale 1e-6). The reference's AdamW backup places "
               'eps as Hugging Face does, (sqrt(bc2)/bc1) m / (sqrt(v) + eps), the adamw '
               'fallback as torch, (m/bc1) / (sqrt(v/bc2) + eps): the two differ only through '
               "eps, HF's being torch's form with eps / sqrt(bc2) in place of eps (bc2 = 1 - "
               '0.95^t: 4.5x at step 1, within 1% from step 77), so only in early steps and '
               "where sqrt(v/bc2) is not far above eps. A >2-D kernel (out, in, kh, kw) is used "
               "as its (out, in*kh*kw) matrix view for NS and the norms, as the reference, but "
               "the reference takes the shape factor from the first two dimensions, "
               "sqrt(max(out, in)), where this uses the matrix view's sqrt(max(out, "
               "in*kh*kw))."),
    ),
    "namo_d": Entry(
        family="matrix",
        paper=Paper('Adam Improves Muon: Adaptive Moment Estimation with Orthogonalized '
                    'Momentum (Zhang et al.)',
                    "2602.17080", 2026),
        reference=('minxin-zhg/namo (src/namo.py, NAMO_D); tested against an independent '
                   'reference from the equations'),
        weight_decay=('per column: W_:,j *= max(1 - wd * min(c_j b, 1), 0), before the update'),
        notes=("mu2 is the paper's mu_2 (EMA of the squared raw-gradient norm), eps its "
               'adamnorm_eps; scale_coeff the 0.2 of 0.2 sqrt(max(m, n)). Defaults are '
               "src/namo.py's (lr 1e-2; the paper's GPT-2 configs tune lr, e.g. 0.012 / 0.009). "
               'Weight decay is scaled by the clamped adaptive rate, not by lr. The AdamW backup '
               '(betas (0.9, 0.95), eps 1e-8, wd as the method) is the fallback. col_clamp is '
               "the code's col_state_clamp_c (0.75; the paper's configs use 0.01); values "
               'outside (0, 1] disable the clamp. NS5 normalizes its input by ||X||_F + 1e-7 '
               "(ns_eps_form='add', the default) as the reference does; ns_eps_form='clamp' "
               "(torch.optim.Muon's max(||X||_F, ns_eps)) differs materially only when ||M~||_F "
               'comes near 1e-7 (tiny gradients: a few percent of the step or more at gradient '
               "scale 1e-6). The reference's AdamW backup places eps as Hugging Face does, "
               '(sqrt(bc2)/bc1) m / (sqrt(v) + eps), the adamw fallback as torch, (m/bc1) / '
               "(sqrt(v/bc2) + eps): the two differ only through eps, HF's being torch's form "
               'with eps / sqrt(bc2) in place of eps (bc2 = 1 - 0.95^t: 4.5x at step 1, within '
               '1% from step 77), so only in early steps and where sqrt(v/bc2) is not far above '
               "eps. A >2-D kernel (out, in, kh, kw) is used as its (out, in*kh*kw) matrix view "
               "for NS, the norms and the columns (n = in*kh*kw), as the reference, but the "
               "reference takes the shape factor from the first two dimensions, "
               "sqrt(max(out, in)), where this uses sqrt(max(out, in*kh*kw))."),
    ),
    "polargrad": Entry(
        family="matrix",
        paper=Paper('PolarGrad: A Class of Matrix-Gradient Optimizers from a Unifying '
                    'Preconditioning Perspective (Lau et al.)',
                    "2505.21799", 2025),
        reference=('timlautk/polargrad (polar_grad.py PolarGrad; qdwh.py / polar.py for the '
                   'QDWH polar factor); QDWH tested against an independent implementation '
                   'from the Nakatsukasa-Bai-Gygi equations and the SVD polar factor, the '
                   'optimizer against an independent reference in float64'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=('M = lerp(M, G, 1 - momentum); U = polar(M); W <- W(1 - lr wd) - lr <M, U> U '
               '(<M, U> = ||M||_* for the exact factor); polar_first=True: U = polar(G), M = '
               'lerp(M, U, 1 - momentum), W <- W(1 - lr wd) - lr <G, U> M. No shape scale: '
               'the step grows with the nuclear norm (so with the matrix size), hence much '
               "smaller rates than Muon on large layers. Defaults are polar_grad.py's (lr "
               '0.02, momentum 0.95, wd 0, qdwh, inner_steps 2; its README example uses lr '
               '1e-3, momentum 0.9; polar_grad_ddp.py differs: wd 0.01, inner_steps 5, bf16 '
               "buffers). QDWH is qdwh.py's: wide matrices transposed; x / sqrt(||x||_1 "
               "||x||_inf); l0 = the compute dtype's eps, so the schedule depends on the "
               'dtype (inner_steps=2 gives two QR-form iterations in fp32 and fp64, far from '
               'converged for small singular values, so <M, U> is below ||M||_* as in the '
               'reference); QR form for c > 100, then Cholesky form with the ||du||_F > (5 '
               'eps)^(1/3) test, then Halley (3, 1, 3) steps while not converged and below '
               'inner_steps; one final Newton-Schulz refinement. It runs in at least fp32 '
               '(bf16/fp16 promoted; the reference does not support bf16), one matrix at a '
               "time. polar_method='newton_schulz' / 'polar_express' / 'svd' are llmvalley's "
               "orthogonalizers with the ns_* options (ns_steps 5, Muon's conventions; "
               "inner_steps is QDWH's only), not the reference's ns / precond_ns code (which "
               'runs inner_steps bf16 NS iterations with ||X||_F + 1e-7: ns_steps=2, '
               "ns_eps_form='add', ns_dtype='bfloat16' come close); their U is cast to the "
               "momentum's dtype before <M, U>. zolo-pd and precond_ns are not offered. >2-D "
               'kernels use their (out, -1) matrix view (polar_grad.py takes 2-D only). The '
               "reference README has no auxiliary Adam: the AdamW fallback is Muon's (lr "
               '3e-4, betas (0.9, 0.95), eps 1e-10, wd 0). State: momentum (mn per matrix).'),
    ),
    "scale": Entry(
        family="normalized",
        paper=Paper('SCALE: Stochastic Column-normalized Last-layer Momentum (Glentis et al.)',
                    "2506.16659", 2025),
        reference=('OptimAI-Lab/Minimalist_LLM_Pretraining '
                   '(mem_eff_pt/pt_scale/scale_optimizer.py); tested against an independent '
                   "reference from that code's rules"),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=('Covers every parameter itself: >= 2-D weights take row-RMS-normalized '
               'gradients (embed_tokens: column-normalized, chosen by name); the output layer'
               " (momentum_layer=True; by default a name containing 'lm_head', and "
               'create_optimizer puts it in its own group) normalizes an EMA momentum (beta '
               "0.9); < 2-D parameters take the reference's HF-style AdamW at lr * "
               'adam_lr_ratio (adam_lr / max_lr in the reference, so it follows the '
               "schedule). adam_lr_ratio defaults to 20, the reference's LLaMA 60M-350M "
               'scripts (adam_lr 2e-2 with lr 1e-3); pass 1.0 for one rate for all. Memory: '
               'the head momentum plus Adam moments of the 1-D parameters.'),
    ),
    "sgd_sai": Entry(
        family="normalized",
        paper=Paper('No More Adam: Learning Rate Scaling at Initialization is All You Need '
                    '(Xu et al.)',
                    "2412.11768", 2024),
        reference=('AnonymousAlethiometer/SGD_SaI; sgd-sai 1.0.3 (tested against)'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=("gsnr = ||g0|| / (std(g0) + eps) from each tensor's first gradient, frozen; b "
               '= g0 then b = mu b + (1-mu) g; p *= 1 - lr wd; p -= lr gsnr b. momentum=0 '
               'works here (the reference fails on it). One-element tensors get gsnr = 1 (the'
               " reference's |g|/eps, about 1e8, diverges)."),
    ),
    "sinkgd": Entry(
        family="normalized",
        paper=Paper('Gradient Multi-Normalization for Stateless and Scalable LLM Training '
                    '(Scetbon et al.)',
                    "2502.06742", 2025),
        reference=("none released (paper's SR-Sinkhorn); tested against an independent "
                   'reference from the equations'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=('No official code: equations from the paper. L = sinkhorn_steps rounds of X <-'
               ' sqrt(n) diag(||X_i,:||)^-1 X then X <- sqrt(m) X diag(||X_:,j||)^-1; W <- W '
               '- lr X (entries of RMS about 1, so Adam-scale learning rates). [unverified] '
               "the paper's learning rate (a third-party port uses 0.05x the global lr for "
               'these layers).'),
    ),
    "swan": Entry(
        family="normalized",
        paper=Paper('SWAN: SGD with Normalization and Whitening Enables Stateless LLM '
                    'Training (Ma, Gong, Scetbon, Meeds, ICML 2025)',
                    "2412.13148", 2024),
        reference=("none released (paper's Algorithms 1-3); tested against an independent "
                   'reference from the equations'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=('No official code: equations from the paper. GradNorm standardizes each row '
               'over the d_in columns (biased std + eps); GradWhitening (G G^T)^{-1/2} G on '
               'the short side by coupled Newton-Schulz (ns_steps) or exactly '
               "(whitening='svd'); rescale=True restores ||GradNorm(G)||_F (update RMS 1). "
               '[unverified] lr, eps and ns_steps are not fixed by a reference '
               'implementation; third-party ports disagree (not used).'),
    ),
    "lion": Entry(
        family="sign",
        paper=Paper('Symbolic Discovery of Optimization Algorithms (Chen et al.)',
                    "2302.06675", 2023),
        reference=('google/automl lion (official); lion-pytorch 0.2.5 on PyPI (tested '
                   'against)'),
        weight_decay=('decoupled (p *= 1 - lr*wd), before the update'),
        notes=('Language-model settings in the paper: betas=(0.95, 0.98), lr 3-10x below '
               "AdamW's, weight decay 3-10x above. cautious=True gives C-Lion (mask from "
               'sign(c)*g).'),
    ),
    "signum": Entry(
        family="sign",
        paper=Paper('signSGD: Compressed Optimisation for Non-Convex Problems (Bernstein et '
                    'al., ICML 2018)',
                    "1802.04434", 2018),
        reference=('jxbz/signSGD; MXNet mx.optimizer.Signum (official)'),
        weight_decay=("decoupled (p *= 1 - lr*wd), before the update (MXNet's wd_lh)"),
        notes=('m = momentum*m + (1-momentum)*g from m=0; p -= lr*sign(m) (Algorithm 2). '
               "Defaults lr=0.01, momentum=0.9 as MXNet's Signum. MXNet's coupled `wd` (added"
               ' to the gradient before the momentum) is not offered: weight_decay is the '
               'decoupled wd_lh.'),
    ),
    "adamw8bit": Entry(
        family="adaptive",
        paper=Paper("8-bit Optimizers via Block-wise Quantization (Dettmers, Lewis, Shleifer, "
                    "Zettlemoyer, ICLR 2022)", "2110.02861", 2021),
        reference=("bitsandbytes AdamW8bit; torchao.optim.AdamW8bit (tested against)"),
        notes=("adamw with state_precision='int8': exp_avg and exp_avg_sq stored as blockwise "
               "dynamic 8-bit codes (signed / unsigned map, block 256 as bitsandbytes' and "
               "torchao's code; the paper's block is 2048) plus one float32 absmax per block; "
               "tensors under 4096 elements stay float32. The step uses the float32 moments "
               "before they are re-quantized, as both references. torchao leaves a tensor "
               "unquantized when its size is not a multiple of the block size; here the last "
               "block is partial."),
    ),
    "adamw4bit": Entry(
        family="adaptive",
        paper=Paper("Memory Efficient Optimizers with 4-bit States (Li, Chen, Zhu, NeurIPS "
                    "2023)", "2309.01507", 2023),
        reference=("thu-ml/low-bit-optimizers (lpmm); torchao.optim.AdamW4bit (the "
                   "implementation followed)"),
        notes=("adamw with state_precision='int4', as torchao's AdamW4bit: block 128, the "
               "signed 4-bit dynamic map for exp_avg and the zero-free linear map for "
               "exp_avg_sq, two codes a byte. The paper's best setting normalizes the second "
               "moment rank-1 (row and column maxima); torchao and this recipe use 128-element "
               "blocks for both moments. Tensors under 4096 elements stay float32."),
    ),
    "lion8bit": Entry(
        family="sign",
        paper=Paper("Symbolic Discovery of Optimization Algorithms (Chen et al.); 8-bit states "
                    "as Dettmers et al. 2022", "2302.06675", 2023),
        reference="bitsandbytes Lion8bit",
        notes=("lion with state_precision='int8': the momentum stored as blockwise dynamic "
               "8-bit codes (signed map, block 256) plus float32 block scales; tensors under "
               "4096 elements stay float32."),
    ),
}
