"""Catalogue entries: Wrappers over any recipe: Lookahead."""

from llmvalley.optim.catalogue.entry import Entry, Paper

ENTRIES: dict[str, Entry] = {
    "lookahead": Entry(
        family="wrapper",
        paper=Paper("Lookahead Optimizer: k steps forward, 1 step back (Zhang, Lucas, Hinton, "
                    "Ba)", "1907.08610", 2019),
        reference="michaelrzhang/lookahead (tested against an independent reference over "
                  "torch.optim.AdamW)",
        weight_decay="the base recipe's (AdamW's by default), applied on the fast steps",
        notes=("base= names the wrapped recipe (default adamw) and its hyperparameters are "
               "accepted; lookahead_spec(base) wraps a matrix-only or unregistered spec. Slow "
               "weights start at the initial point and sync every k steps "
               "(phi += alpha*(theta - phi); theta = phi). Bases with train/eval iterates or a "
               "curvature estimate, and cautious=True, are refused. The reference's "
               "pullback_momentum option (reset/pullback of the inner momentum) is not "
               "offered: the inner state is left as is (its default, 'none')."),
    ),
}
