"""Catalogue entries: Adam variants (DiffGrad, AdamP/SGDP, EXAdam, FAdam, AdaMomentum, TAM,
Ano) and the classical adaptive methods (Adagrad, RMSprop)."""

from llmvalley.optim.catalogue.entry import Entry, Paper

ENTRIES: dict[str, Entry] = {
    "diffgrad": Entry(
        family="adaptive",
        paper=Paper("diffGrad: An Optimization Method for Convolutional Neural Networks "
                    "(Dubey et al., IEEE TNNLS 2019)", "1909.11015", 2019),
        reference=("shivram1987/diffGrad (diffGrad_v2.py); tested against an independent "
                   "reference from the equations in tests/test_adaptive_variants.py"),
        weight_decay="coupled L2 (g += wd*p), as the official code",
        notes=("Adam with the HF eps form, its first moment multiplied by the friction "
               "xi = sigmoid(|g_prev - g|) (g includes the L2 term; g_prev = 0 before the "
               "first step). Follows diffGrad_v2.py: the first release (diffGrad.py, the "
               "paper's code) stored previous_grad as an alias of the gradient, so the "
               "difference was always zero and xi a constant 0.5; here it is a copy. The "
               "reference adds the L2 term into p.grad in place; here the gradient is left "
               "untouched."),
    ),
    "adamp": Entry(
        family="adaptive",
        paper=Paper("AdamP: Slowing Down the Slowdown for Momentum Optimizers on "
                    "Scale-invariant Weights (Heo et al., ICLR 2021)", "2006.08217", 2020),
        reference="clovaai/AdamP; adamp 0.3.0 (AdamP, tested against)",
        weight_decay=("decoupled (p *= 1 - lr*wd), before the update; times wd_ratio on "
                      "tensors detected as scale-invariant"),
        notes=("Adam (torch eps form) whose step loses its radial component on weights of "
               "two or more dimensions when max |cos(g, w)| < delta / sqrt(d), tested per "
               "output channel, then over the whole tensor. Vectors and scalars are never "
               "projected, as the reference."),
    ),
    "sgdp": Entry(
        family="adaptive",
        paper=Paper("AdamP: Slowing Down the Slowdown for Momentum Optimizers on "
                    "Scale-invariant Weights (Heo et al., ICLR 2021)", "2006.08217", 2020),
        reference=("clovaai/AdamP; adamp 0.3.0 (SGDP, tested against with nesterov=True; "
                   "see notes)"),
        weight_decay=("decoupled (p *= 1 - lr*wd*r / (1 - momentum)), before the update, "
                      "with r = wd_ratio on tensors detected as scale-invariant, else 1, as the"
                      " reference"),
        notes=("Heavy ball that starts from zero (b = momentum*b + (1 - dampening)*g), "
               "then AdamP's projection of the step. The reference has no default lr; 1e-3 "
               "is the library's SGD default (its README uses lr=0.1 with momentum=0.9, "
               "nesterov=True). Departure (a reference bug): with nesterov=False the "
               "reference's step aliases the momentum buffer, so the projection is written "
               "into the buffer and carried into later steps; the paper's SGDP algorithm "
               "projects only the step, which is what is done here (identical to the reference"
               " when nesterov=True or when no projection happens)."),
    ),
    "exadam": Entry(
        family="adaptive",
        paper=Paper("EXAdam: The Power of Adaptive Cross-Moments (Adly)", "2412.20302", 2024),
        reference=("AhmedMostafa16/EXAdam (exadam.py, both revisions); tested against an "
                   "independent reference from the equations"),
        weight_decay="decoupled (p *= 1 - lr*wd), before the update, as the official code",
        notes=("d1 = 1 + beta2^t v/(v + eps), d2 = 1 + beta1^t m^2/(m^2 + eps); direction "
               "(m + g) d1 / bc1 / (sqrt(d2 v / bc2) + eps). version=2 (default) is the "
               "current paper and code (step size lr); version=1 is the first arXiv version "
               "and first code revision, whose step size grows as lr*ln(sqrt(2)*sqrt(t + 1)) "
               "(the weight decay keeps lr, as that code)."),
    ),
    "fadam": Entry(
        family="adaptive",
        paper=Paper("FAdam: Adam is a natural gradient optimizer using diagonal empirical "
                    "Fisher information (Hwang)", "2405.12807", 2024),
        reference=("paper Algorithm 1; lessw2020/FAdam_PyTorch for defaults; tested against an "
                   "independent reference from the equations"),
        weight_decay=("in natural-gradient form inside the direction: lr*wd*clip(p / "
                      "(f^p + eps_t)), not a shell decay"),
        notes=("Fisher EMA with the debiased beta2_t = beta2 (1 - beta2^(t-1)) / (1 - beta2^t);"
               " adaptive eps_t = eps*min(1, RMS(g)) as the paper (and the code's revision "
               "'per v3 paper algo'; a later community patch there uses max); the natural "
               "gradient and the weight-decay term are each divided by max(1, RMS/clip) as "
               "the paper (the code multiplies by clip / max(1, RMS), the same only for "
               "clip=1); momentum without bias correction. Defaults are the code's (wd 0.1, "
               "clip 1, p 0.5, eps 1e-8). When a tensor's gradient is all zero eps_t = eps "
               "(the formula would divide 0 by 0). The code's momentum_dtype / fim_dtype are "
               "covered by state_precision."),
    ),
    "adamomentum": Entry(
        family="adaptive",
        paper=Paper("Rethinking Adam: A Twofold Exponential Moving Average Approach / "
                    "AdaMomentum (Wang et al.)", "2106.11514", 2021),
        reference=("wyzjack/AdaM3 (CNN_CIFAR/optimizers/AdaM3.py, rectify=False); tested "
                   "against an independent reference from the equations"),
        weight_decay=("decoupled (p *= 1 - lr*wd, or 1 - wd with fixed_decay) before the "
                      "update; weight_decouple=False gives coupled L2, as the official code"),
        notes=("v = beta2 v + (1 - beta2) m^2 + eps (the EMA of the squared momentum, eps "
               "added into the state), direction (m/bc1)/sqrt(v/bc2). eps=1e-16 is the "
               "code's default (its CIFAR scripts pass 1e-8). The code's RAdam-style "
               "rectify option (off by default in its CNN code) is not offered."),
    ),
    "tam": Entry(
        family="adaptive",
        paper=Paper("Torque-Aware Momentum (Malviya et al.)", "2412.18790", 2024),
        reference=("paper equations (no official code); tested against an independent "
                   "reference from the equations"),
        weight_decay="coupled L2 (g += wd*p), as the SGD with momentum it replaces",
        notes=("s = decay_rate*s + (1 - decay_rate)*cos(m_prev, g) with the cosine over the "
               "whole tensor (0 while m_prev = 0, i.e. at the first step); m = momentum*m + "
               "(eps + (1 + s)/2) g; step lr*m. The pytorch_optimizer TAM takes an "
               "element-wise product of dim-0-normalized tensors instead of the cosine and "
               "starts the momentum at g; neither is followed."),
    ),
    "ano": Entry(
        family="adaptive",
        paper=Paper("Ano: Faster is Better in Noisy Landscapes (Kegreisz)", "2508.18258", 2025),
        reference=("Adrienkgz/ano-experiments; ano-optimizer 1.0.0 (ano_pytorch.py); tested "
                   "against an independent reference from the equations"),
        weight_decay="decoupled (p *= 1 - lr*wd), before the update, as the official code",
        notes=("v = beta2 v + (1 - beta2) sign(g^2 - v) g^2; direction |g| sign(m) / "
               "sqrt(v/bc2 + eps) (eps inside the root, as the official code; pytorch_"
               "optimizer puts it outside). logarithmic_schedule=True is Anolog "
               "(beta1 = 1 - 1/ln(max(2, t)), as the code). beta2 must be >= 0.5 (below, v "
               "can turn negative)."),
    ),
    "adagrad": Entry(
        family="adaptive",
        paper=Paper("Adaptive Subgradient Methods for Online Learning and Stochastic "
                    "Optimization (Duchi, Hazan, Singer, JMLR 2011)", "n/a", 2011),
        reference="torch.optim.Adagrad (tested against)",
        weight_decay="coupled L2 (g += wd*p), as torch.optim.Adagrad",
        notes=("All of torch's options: lr_decay (lr / (1 + (t - 1) lr_decay)), "
               "initial_accumulator_value, eps (1e-10), weight_decay. The sum is created at "
               "the first step rather than at construction (same values; state_bytes counts "
               "it before the first step)."),
    ),
    "rmsprop": Entry(
        family="adaptive",
        paper=Paper("Lecture 6e, rmsprop (Hinton, Srivastava, Swersky, Coursera 2012)",
                    "n/a", 2012),
        reference="torch.optim.RMSprop (tested against)",
        weight_decay="coupled L2 (g += wd*p), as torch.optim.RMSprop",
        notes=("All of torch's options: alpha, eps, momentum, centered, weight_decay. "
               "alpha must lie in [0, 1] (torch checks only alpha >= 0) and momentum in "
               "[0, 1) (the library's common rule)."),
    ),
}
