"""The report's figures, drawn with matplotlib (Agg) from :class:`~analysis.Results`.

Each function returns a finished figure; :func:`png_bytes` renders it. Colours are fixed per
optimizer (its position in the comparison), so a method has the same colour in every figure.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402

from llmvalley.bench.analysis import Results  # noqa: E402
from llmvalley.bench.compare import BASELINE  # noqa: E402

PALETTE = ("#222222", "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
           "#e377c2", "#17becf", "#bcbd22")
MB = 1024**2


def colours(results: Results) -> dict[str, str]:
    """One colour per optimizer; the AdamW baseline is always dark grey."""
    others = [o for o in results.optimizers if o != BASELINE]
    mapping = {BASELINE: PALETTE[0]}
    mapping.update({o: PALETTE[1 + i % (len(PALETTE) - 1)] for i, o in enumerate(others)})
    return mapping


def workload_note(results: Results) -> str:
    """One line stating the workload, budget and seeds (every figure carries it)."""
    spec = results.manifest["spec"]
    w = spec["workload"]
    budget = (f"{spec['tokens_per_param']:g} tokens/param" if spec.get("tokens_per_param")
              else f"{w.get('steps') or w.get('tokens')} {'steps' if w.get('steps') else 'tokens'}")
    return (f"data {w.get('data', 'stdlib')}, batch {w.get('batch_size', 32)}, {budget}, "
            f"{w.get('schedule', 'cosine')} schedule; {spec['trials']} trials + "
            f"{spec['seeds']} seed(s) per optimizer")


def _figure(n_panels: int, title: str, results: Results) -> tuple[Figure, list[Any]]:
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels + 0.6, 4.2), squeeze=False)
    fig.suptitle(title, fontsize=12)
    fig.text(0.5, 0.005, workload_note(results), ha="center", va="bottom", fontsize=8,
             color="#555555")
    return fig, list(axes[0])


def _finish(fig: Figure) -> Figure:
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    return fig


def _scale_title(results: Results, model: str) -> str:
    cells = results.cells.get(model, [])
    n_params = next((c.n_params for c in cells if c.n_params), None)
    return f"{model} ({n_params / 1e6:.2f}M params)" if n_params else model


def loss_curves(results: Results, x: str) -> Figure:
    """Validation loss against tokens (``x="tokens"``) or wall-clock (``"seconds"``): seed mean
    of each optimizer's best configuration, shaded between the lowest and highest seed."""
    colour = colours(results)
    label = "tokens" if x == "tokens" else "wall-clock time (s)"
    title = f"Validation loss against {label}"
    if x == "seconds":
        title += "\n(measured, evaluation included: moves with the machine's load)"
    fig, axes = _figure(len(results.models), title, results)
    for ax, model in zip(axes, results.models):
        for cell in results.cells[model]:
            if cell.mean is None:
                continue
            xs = getattr(cell.mean, x)
            n = len(xs)
            ax.plot(xs, cell.mean.loss, color=colour[cell.optimizer], lw=1.8,
                    label=f"{cell.optimizer} (n={len(cell.curves)})")
            if len(cell.curves) > 1:
                lows = [min(c.loss[i] for c in cell.curves) for i in range(n)]
                highs = [max(c.loss[i] for c in cell.curves) for i in range(n)]
                ax.fill_between(xs, lows, highs, color=colour[cell.optimizer], alpha=0.18, lw=0)
        target = results.target(model)
        if target is not None:
            ax.axhline(target, color="#777777", ls="--", lw=0.9, label="target (AdamW mean)")
        ax.set_title(_scale_title(results, model), fontsize=10)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        finals = [c.mean.loss[-1] for c in results.cells[model] if c.mean]
        firsts = [c.mean.loss[len(c.mean.loss) // 4] for c in results.cells[model] if c.mean]
        if finals and firsts:  # zoom on the part of training where methods separate
            low, high = min(finals), max(firsts)
            pad = 0.05 * (high - low) if high > low else 0.1
            ax.set_ylim(low - pad, high + pad)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(fig)


def sensitivity(results: Results) -> Figure:
    """Final validation loss against learning rate for every sweep trial (diverged: x at the
    top); a translucent bar at each optimizer's best loss spans its within-margin range."""
    colour = colours(results)
    fig, axes = _figure(len(results.models), "Learning-rate sensitivity (tuning trials, seed 0)",
                        results)
    for ax, model in zip(axes, results.models):
        finite = [loss for c in results.cells[model] for _, loss, _ in c.trial_points
                  if loss is not None]
        top = max(finite) if finite else 1.0
        for cell in results.cells[model]:
            pts = sorted(cell.trial_points)
            done = [(lr, loss) for lr, loss, _ in pts if loss is not None]
            bad = [lr for lr, loss, _ in pts if loss is None]
            width = cell.sensitivity.width_log2 if cell.sensitivity else None
            text = f"{cell.optimizer} (width {width:.1f}" if width is not None else cell.optimizer
            if width is not None:
                text += "+)" if cell.sensitivity.lower_bound else ")"
            if done:
                ax.plot(*zip(*done), marker="o", ms=4, color=colour[cell.optimizer], label=text)
            if bad:
                ax.scatter(bad, [top] * len(bad), marker="x", s=40, color=colour[cell.optimizer],
                           label=f"{cell.optimizer} diverged")
            sens = cell.sensitivity
            if done and sens and sens.width_log2 is not None:  # the within-margin interval
                ax.hlines(min(loss for _, loss in done), sens.low_lr, sens.high_lr,
                          color=colour[cell.optimizer], lw=7, alpha=0.25)
        ax.plot([], [], color="#888888", lw=7, alpha=0.4,
                label=f"lr range within {results.margin:g} nats of the best")
        ax.set_xscale("log", base=2)
        ax.set_title(_scale_title(results, model), fontsize=10)
        ax.set_xlabel("peak learning rate (log2 scale)")
        ax.set_ylabel("final validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _finish(fig)


def memory(results: Results) -> Figure:
    """Optimizer state and peak memory (MiB) per optimizer, one bar group per scale."""
    colour = colours(results)
    fig, axes = _figure(2, "Memory", results)
    width = 0.8 / max(1, len(results.optimizers))
    for ax, attr, ylabel, fmt in ((axes[0], "state_bytes", "optimizer state (MiB)", "%.2f"),
                                  (axes[1], "peak_memory_bytes", "peak memory (MiB)", "%.0f")):
        for j, optimizer in enumerate(results.optimizers):
            xs, ys = [], []
            for i, model in enumerate(results.models):
                cell = results.cell(model, optimizer)
                if cell is not None and getattr(cell, attr):
                    xs.append(i + (j - (len(results.optimizers) - 1) / 2) * width)
                    ys.append(getattr(cell, attr) / MB)
            bars = ax.bar(xs, ys, width=width, color=colour[optimizer], label=optimizer)
            ax.bar_label(bars, fmt=fmt, fontsize=7)
        ax.set_xticks(range(len(results.models)), results.models)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the labels and the legend
        ax.set_xlabel("model")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_title("peak: CUDA max allocated, or process peak RSS on CPU", fontsize=8)
    return _finish(fig)


def speedup_vs_size(results: Results) -> Figure:
    """Tokens-to-target speedup over AdamW against parameters; "did not reach" sits on the
    bottom axis as an open marker."""
    colour = colours(results)
    fig, axes = _figure(2, "Speedup over AdamW against model size", results)
    for ax, attr, ylabel in ((axes[0], "token_speedup", "tokens-to-target speedup (x)"),
                             (axes[1], "wall_speedup", "wall-clock-to-target speedup (x)")):
        floor, values, sizes = 0.0, [1.0], []
        for optimizer in results.optimizers:
            xs, ys, missed = [], [], []
            for model in results.models:
                cell = results.cell(model, optimizer)
                if cell is None or not cell.n_params:
                    continue
                value = getattr(cell, attr)
                if value is None:
                    missed.append(cell.n_params)
                else:
                    xs.append(cell.n_params)
                    ys.append(value)
            values += ys
            sizes += xs + missed
            if xs:
                ax.plot(xs, ys, marker="o", color=colour[optimizer], label=optimizer)
                for x, y in zip(xs, ys):
                    ax.annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(6, 4),
                                fontsize=7, color=colour[optimizer])
            if missed:
                ax.scatter(missed, [floor] * len(missed), marker="v", facecolors="none",
                           edgecolors=colour[optimizer], s=50,
                           label=f"{optimizer}: did not reach")
        ax.axhline(1.0, color="#777777", ls="--", lw=0.9)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        ax.set_ylim(floor, max(values) * 1.15)
        if sizes:
            ax.set_xlim(min(sizes) / 2, max(sizes) * 2)
        if len(results.models) == 1:
            ax.set_title("one model size: add sizes (--models) to see the trend", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(fig)


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """Render and close ``fig``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


#: (file stem, title, builder) of every figure in the report, in order
FIGURES = (
    ("loss-vs-tokens", "Validation loss against tokens",
     lambda r: loss_curves(r, "tokens")),
    ("loss-vs-time", "Validation loss against wall-clock time",
     lambda r: loss_curves(r, "seconds")),
    ("lr-sensitivity", "Final loss against learning rate", sensitivity),
    ("memory", "Memory", memory),
    ("speedup-vs-size", "Speedup against model size", speedup_vs_size),
)

