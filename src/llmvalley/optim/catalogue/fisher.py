"""Catalogue entries: AdaFisher and AdaFisherW (diagonal block-Kronecker Fisher)."""

from llmvalley.optim.catalogue.entry import Entry, Paper

ADAFISHER_PAPER = Paper("AdaFisher: Adaptive Second Order Optimization via Fisher Information "
                        "(Gomes, Zhang, Belilovsky, Wolf, Hosseini; ICLR 2025)", "2405.16397",
                        2024)

_REFERENCE = ("AtlasAnalyticsLab/AdaFisher optimizers/AdaFisher.py (official, read at eb858c6; "
              "damien3008/AdaFisher could not be fetched); tested against an independent "
              "reference in tests/test_fisher.py and, where the official code pairs "
              "parameters correctly, against its numbers")

_NOTES = (
    "For each nn.Linear (out x in): H = diag E[a a^T] over the tokens of its input (plus the "
    "homogeneous 1 with a bias), S = diag E[s s^T] over the tokens of its output gradient; each "
    "capture is Min-Max normalised ((x - min) / (max - min + 1e-6), +-inf read as 1 / 0) and "
    "folded as H <- 0.1 gamma H + 0.01 gamma h from ones (the official code's running average; "
    "gamma 0.8 gives its former gammas (0.92, 0.008) form 0.08 H + 0.008 h), on steps t with "
    "t - 1 divisible by fisher_interval (the official TCov, 100; the LM script uses 10). "
    "m = beta m + (1 - beta) g; p -= lr * (m / (1 - beta^t)) / (S H^T + damping); no square "
    "root. Defaults: the official code's (lr 1e-3, beta 0.9, Lambda = damping 1e-3, gamma "
    "0.8, TCov 100, wd 0). The statistics need module hooks: llmvalley.optim.transforms."
    "fisher.attach_fisher(optimizer, model) registers them (forward hook on the layer, a "
    "gradient hook on its output instead of a full backward hook: the same tensor). Parameters "
    "of other modules (Embedding, RMSNorm, a weight tied to an embedding) take the official "
    "code's fallback F = 1, a bias-corrected momentum step; without hooks every parameter "
    "does (a warning says so at the first step). Departures: (1) the official step() pairs "
    "parameters with hooked modules by position and shape and loops len(modules) times, so on "
    "a model with unsupported parameters (a LLaMA: embedding and RMSNorm weights) the last "
    "that-many parameters are never updated (measured: the last block's MLP, the final norm "
    "and lm_head of a 2-layer LLaMA), and a parameter whose shape matches the next module's "
    "weight takes that module's Fisher; we pair each weight with its own layer and step every "
    "parameter, as the paper describes. (2) Conv2d, BatchNorm2d and LayerNorm statistics of "
    "the official code are not implemented: attach_fisher refuses such modules among the "
    "AdaFisher parameters (route them elsewhere with a rule). (3) With several forward passes "
    "at the first statistics step (gradient accumulation) the official code re-initialises to "
    "ones on each, keeping the last micro-batch only; we fold every capture in order, as at "
    "later statistics steps. (4) A supported layer that receives no statistics at step 1 "
    "steps with F = 1 until it does (the official code fails with a KeyError). Statistics are "
    "computed in float32 for half-precision activations. The paper's Algorithm writes a "
    "gamma-EMA of the factors; we follow the code's coefficients.")

ENTRIES: dict[str, Entry] = {
    "adafisher": Entry(
        family="curvature",
        paper=ADAFISHER_PAPER,
        reference=_REFERENCE,
        weight_decay="coupled (g += wd * p before the momentum), as the official AdaFisher",
        notes=_NOTES,
    ),
    "adafisherw": Entry(
        family="curvature",
        paper=ADAFISHER_PAPER,
        reference=_REFERENCE,
        weight_decay="decoupled (p *= 1 - lr*wd), before the update: the official AdaFisherW's "
                     "p -= lr * (m_hat / F + wd * p)",
        notes="AdaFisher with decoupled weight decay (AdaFisherW of the official code). "
              + _NOTES,
    ),
}
