"""The report's figures, drawn with matplotlib (Agg) from :class:`~analysis.Results`.

Each function returns a finished figure (or None when it has nothing to show); :func:`png_bytes`
renders it. Colours are fixed per optimizer (its position in the comparison), so a method has the
same colour in every figure. Layout rules: every figure is :data:`WIDTH` inches wide (the page
width; the HTML shows it at 100%), its title is the report's caption (not repeated inside), the
legend sits below the panels (it never covers a curve), and labels that would overlap are moved
apart (:func:`spread_labels`).
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

WIDTH = 11.0  # inches: every figure spans the page
MAX_COLUMNS = 3  # panels per row; more scales (sizes x budgets) wrap onto further rows
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
    if (spec.get("budgets") or [1.0]) != [1.0]:
        budget += " x " + "/".join(f"{b:g}" for b in spec["budgets"])
    return (f"data {w.get('data', 'stdlib')}, batch {w.get('batch_size', 32)}, {budget}, "
            f"{w.get('schedule', 'cosine')} schedule; {spec['trials']} trials + "
            f"{spec['seeds']} seed(s) per optimizer")


def _figure(n_panels: int, title: str, results: Results) -> tuple[Figure, list[Any]]:
    """A page-wide row of ``n_panels`` axes; ``title`` is the report's caption (kept as the
    figure's label only, not drawn, so the caption shows once)."""
    columns = min(n_panels, MAX_COLUMNS)
    rows = -(-n_panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(WIDTH, 4.6 + 3.4 * (rows - 1)),
                             squeeze=False)
    fig.set_label(title)
    fig.text(0.5, 0.005, workload_note(results), ha="center", va="bottom", fontsize=8,
             color="#555555")
    panels = [ax for row in axes for ax in row]
    for ax in panels[n_panels:]:  # the unused end of the last row
        fig.delaxes(ax)
    return fig, panels[:n_panels]


def _finish(fig: Figure) -> Figure:
    """One legend for the figure, below the panels (outside every axes), then the layout."""
    handles, labels = [], []
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels and not label.startswith("_"):
                handles.append(handle)
                labels.append(label)
    bottom = 0.05
    if handles:
        ncol = min(len(labels), 4)
        rows = -(-len(labels) // ncol)
        bottom = 0.05 + 0.055 * rows
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.035))
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def spread_labels(ax: Any, points: list[tuple[float, float, str, str]],
                  gap_pt: float = 11.0) -> None:
    """Annotate ``(x, y, text, colour)`` points so that no two labels overlap: labels at
    about the same x are stacked at least ``gap_pt`` points apart vertically."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the data-to-display transform
    to_display = ax.transData.transform
    placed: list[tuple[float, float]] = []  # display (x, y) of placed labels
    scale = fig.dpi / 72.0
    for x, y, text, colour in sorted(points, key=lambda p: (p[0], p[1])):
        dx, dy = to_display((x, y))
        label_y = dy + 4 * scale
        for px, py in placed:
            if abs(px - dx) < 60 * scale and abs(py - label_y) < gap_pt * scale:
                label_y = py + gap_pt * scale
        placed.append((dx, label_y))
        ax.annotate(text, (x, y), textcoords="offset points",
                    xytext=(6, (label_y - dy) / scale), fontsize=7, color=colour)


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
        curves = [c for c in results.cells[model] if c.mean and c.mean.loss]
        if curves:  # the axes start where the curves start and end where they end
            lows = [min(min(curve.loss) for curve in c.curves) if c.curves else min(c.mean.loss)
                    for c in curves]
            highs = [max(max(curve.loss) for curve in c.curves) if c.curves else max(c.mean.loss)
                     for c in curves]
            low, high = min(lows), max(highs)
            pad = 0.03 * (high - low) if high > low else 0.1
            ax.set_ylim(low - pad, high + pad)
            starts = [getattr(c.mean, x)[0] for c in curves]
            ends = [getattr(c.mean, x)[-1] for c in curves]
            if max(ends) > min(starts):
                ax.set_xlim(min(starts), max(ends))
        ax.grid(alpha=0.3)
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
    return _finish(fig)


def memory(results: Results) -> Figure:
    """Optimizer state and the peak memory above the model's own (MiB) per optimizer, one bar
    group per scale. The peak above the model's own is this optimizer's peak less AdamW's peak
    without its state (:meth:`Results.peak_above_model`): on CPU the process peak RSS itself is
    dominated by the runtime and says nothing about the optimizer."""
    colour = colours(results)
    fig, axes = _figure(2, "Memory", results)
    width = 0.8 / max(1, len(results.optimizers))

    def state(model: str, optimizer: str) -> float | None:
        cell = results.cell(model, optimizer)
        return cell.state_bytes if cell is not None else None

    for ax, value, ylabel, fmt in (
            (axes[0], state, "optimizer state (MiB, exact)", "%.2f"),
            (axes[1], results.peak_above_model, "peak memory above the model's own (MiB)",
             "%.1f")):
        for j, optimizer in enumerate(results.optimizers):
            xs, ys = [], []
            for i, model in enumerate(results.models):
                v = value(model, optimizer)
                if v is not None:
                    xs.append(i + (j - (len(results.optimizers) - 1) / 2) * width)
                    ys.append(v / MB)
            bars = ax.bar(xs, ys, width=width, color=colour[optimizer], label=optimizer)
            ax.bar_label(bars, fmt=fmt, fontsize=7)
        ax.set_xticks(range(len(results.models)), results.models)
        low, high = ax.get_ylim()
        ax.set_ylim(min(0, low * 1.15), high * 1.15)  # room for the labels
        ax.axhline(0, color="#777777", lw=0.8)
        ax.set_xlabel("model")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_title("peak less AdamW's peak without its state (parameters, gradients, "
                      "activations, runtime)", fontsize=8)
    return _finish(fig)


def speedup_vs_size(results: Results) -> Figure:
    """Tokens-to-target speedup over AdamW against parameters; "did not reach" sits on the
    bottom axis as an open marker."""
    colour = colours(results)
    fig, axes = _figure(2, "Speedup over AdamW against model size", results)
    for ax, attr, ylabel in ((axes[0], "token_speedup", "tokens-to-target speedup (x)"),
                             (axes[1], "wall_speedup", "wall-clock-to-target speedup (x)")):
        floor, values, sizes = 0.0, [1.0], []
        labels: list[tuple[float, float, str, str]] = []
        for optimizer in results.optimizers:
            xs, ys, missed = [], [], []
            for model in results.size_keys() or results.models:
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
                labels += [(x, y, f"{y:.2f}x", colour[optimizer]) for x, y in zip(xs, ys)]
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
        if len(results.size_keys() or results.models) == 1:
            ax.set_title("one model size: add sizes (--models) to see the trend", fontsize=8)
        elif results.budgets != [1.0]:
            ax.set_title(f"at the {results.size_keys()[0].partition('@')[2] or '1x'} budget",
                         fontsize=8)
        ax.grid(alpha=0.3)
        spread_labels(ax, labels)
    return _finish(fig)


def data_speedup_vs_size(results: Results) -> Figure | None:
    """Effective-data speedup ``D_eff / D`` (AdamW's fitted loss against data) against
    parameters, one panel per budget, with the bootstrap interval as error bars; a lower bound
    (beyond AdamW's asymptote) is an upward triangle. None without a fit (one budget)."""
    if not results.fits:
        return None
    colour = colours(results)
    fig, axes = _figure(len(results.budgets), "Effective-data speedup against model size",
                        results)
    for ax, budget in zip(axes, results.budgets):
        values, sizes = [1.0], []
        labels: list[tuple[float, float, str, str]] = []
        for optimizer in results.optimizers:
            if optimizer == BASELINE:
                continue
            points, bounds = [], []
            for size in results.sizes:
                key = next((k for k, (s, b) in results.scales.items()
                            if s == size and b == budget), None)
                cell = results.cell(key, optimizer) if key else None
                d = cell.data_speedup if cell else None
                if cell is None or not cell.n_params or d is None or d.value is None:
                    continue
                sizes.append(cell.n_params)
                values.append(d.value)
                (bounds if d.bound else points).append((cell.n_params, d))
            if points:
                xs = [x for x, _ in points]
                ys = [d.value for _, d in points]
                lows = [max(0.0, d.value - d.low) if d.low is not None else 0.0
                        for _, d in points]
                highs = [max(0.0, (d.high if d.high is not None and d.high != float("inf")
                                   else d.value) - d.value) for _, d in points]
                values += [y + h for y, h in zip(ys, highs)]
                ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3,
                            color=colour[optimizer], label=optimizer)
                labels += [(x, y, f"{y:.2f}x", colour[optimizer]) for x, y in zip(xs, ys)]
            if bounds:
                ax.scatter([x for x, _ in bounds], [d.value for _, d in bounds], marker="^",
                           facecolors="none", edgecolors=colour[optimizer], s=60,
                           label=f"{optimizer}: lower bound (beyond AdamW's asymptote)")
        ax.axhline(1.0, color="#777777", ls="--", lw=0.9)
        ax.set_xscale("log")
        if sizes:
            ax.set_xlim(min(sizes) / 2, max(sizes) * 2)
        ax.set_ylim(0.0, max(values) * 1.15)
        ax.set_xlabel("parameters")
        ax.set_ylabel("effective-data speedup D_eff/D (x)")
        ax.set_title(f"budget {budget:g}x" + (" (one model size)" if len(results.sizes) == 1
                                              else ""), fontsize=9)
        ax.grid(alpha=0.3)
        spread_labels(ax, labels)
    return _finish(fig)


def tuning_cost(results: Results) -> Figure | None:
    """Expected best final loss against the number of trials (bootstrap over each
    optimizer's finished trials), with the 10-90% bootstrap band."""
    if not any(c.tuning_curve for cells in results.cells.values() for c in cells):
        return None
    colour = colours(results)
    fig, axes = _figure(len(results.models), "Tuning cost", results)
    for ax, model in zip(axes, results.models):
        for cell in results.cells[model]:
            if not cell.tuning_curve:
                continue
            ks, expected, lows, highs = zip(*cell.tuning_curve)
            ax.plot(ks, expected, marker="o", ms=3, color=colour[cell.optimizer],
                    label=cell.optimizer)
            ax.fill_between(ks, lows, highs, color=colour[cell.optimizer], alpha=0.15, lw=0)
        ax.set_title(_scale_title(results, model), fontsize=10)
        ax.set_xlabel("trials k")
        ax.set_ylabel("expected best final loss after k trials")
        ax.grid(alpha=0.3)
    return _finish(fig)


def performance_profile(results: Results) -> Figure | None:
    """rho(tau): the fraction of workloads (sizes) where each optimizer's tokens-to-target is
    within a factor tau of the fastest (AlgoPerf); None with one workload."""
    profile = results.profile()
    if profile is None:
        return None
    colour = colours(results)
    fig, axes = _figure(1, "Performance profile across workloads", results)
    ax = axes[0]
    taus = [1.0 + i * (profile.tau_max - 1.0) / 300 for i in range(301)]
    for optimizer in profile.ratios:
        ax.step(taus, [profile.rho(optimizer, t) for t in taus], where="post",
                color=colour.get(optimizer, "#888888"),
                label=f"{optimizer} (score {profile.score(optimizer):.2f})")
    ax.set_xlim(1.0, profile.tau_max)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("tau: tokens-to-target / fastest optimizer's")
    ax.set_ylabel("fraction of workloads within tau")
    ax.grid(alpha=0.3)
    return _finish(fig)


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """Render and close ``fig``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


#: figures that need several token budgets (valley compare --budgets)
NEEDS_BUDGETS = frozenset({"data-speedup-vs-size"})
#: (file stem, title, builder) of every figure in the report, in order
FIGURES = (
    ("loss-vs-tokens", "Validation loss against tokens (line: seed mean of the best "
     "configuration; band: min–max over seeds)",
     lambda r: loss_curves(r, "tokens")),
    ("loss-vs-time", "Validation loss against raw wall-clock time (measured, evaluation "
     "included: moves with the machine's load; band: min–max over seeds)",
     lambda r: loss_curves(r, "seconds")),
    ("lr-sensitivity", "Final loss against learning rate", sensitivity),
    ("memory", "Memory", memory),
    ("speedup-vs-size", "Speedup against model size", speedup_vs_size),
    ("data-speedup-vs-size", "Effective-data speedup D_eff/D against model size (AdamW's loss "
     "fitted against data, L(D) = a·D^-b + c, over the budgets; bars: 5–95% paired bootstrap "
     "over seeds)", data_speedup_vs_size),
    ("tuning-cost", "Tuning cost: expected best final loss after k trials", tuning_cost),
    ("performance-profile", "Performance profile across workloads (sizes)",
     performance_profile),
)

