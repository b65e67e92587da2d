"""``valley report``: a Markdown summary and one self-contained HTML page from a results folder.

Writes ``report.md`` (tables; figures linked from ``plots/``), ``report.html`` (the same tables,
figures embedded as base64 PNG, so the page opens offline), ``plots/*.png`` and ``metrics.json``
(every metric, for other tools). The HTML marks its parts for machines: each figure is an
``<img>`` with ``id="fig-STEM"``, each leaderboard a ``<table class="leaderboard"
data-model="MODEL">`` with one ``<tr data-optimizer="NAME">`` per optimizer.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from llmvalley.bench.analysis import (
    SIGNIFICANCE_SE,
    CellMetrics,
    Results,
    analyse,
    weak_baseline,
)
from llmvalley.bench.compare import BASELINE, FALLBACK_KEYS
from llmvalley.bench.records import json_safe

MB = 1024**2
COLUMNS = (
    "optimizer", "final val loss", "vs AdamW", "bits/byte", "tokens speedup",
    "wall-clock speedup", "time to target", "best lr", "LR width (log2)", "state MiB",
    "state B/param", "peak MiB", "optimizer share", "spikes", "max grad norm", "diverged",
)


#: How a speedup that is a bound is marked (see analysis.speedup_bound and BOUND_NOTE).
BOUND_MARKS = {"lower": "≥", "upper": "≤", "unknown": "~"}
BOUND_NOTE = (
    "≥, ≤, ~ on a speedup: a bound, not a measurement, because a best learning rate sits at "
    "the edge of its grid (best lr \"(edge)\"), so it is not a tuned value. ≥: this "
    "optimizer's best is at an edge (tuned, it could only do better: a lower bound); ≤: "
    "AdamW's is (a tuned baseline sets a lower target: an upper bound); ~: both are (neither "
    "bound holds). \"did not reach (edge)\": this optimizer might reach the target once tuned. "
    "Give the sweep more trials or move its grid center.")


def _num(value: float | None, fmt: str, missing: str = "–") -> str:
    return missing if value is None else format(value, fmt)


def speedup_text(value: float | None, reached_curve: bool, bound: str | None) -> str:
    """A speedup cell: ``1.80x``, marked ``≥``/``≤``/``~`` when it is a bound."""
    if value:
        return f"{BOUND_MARKS.get(bound or '', '')}{value:.2f}x"
    if not reached_curve:
        return "–"
    # an under-tuned optimizer might reach the target once tuned; an under-tuned baseline
    # only lowers the target, so "did not reach" stays true
    return "did not reach (edge)" if bound in ("lower", "unknown") else "did not reach"


def leaderboard_rows(results: Results, model: str) -> list[dict[str, str]]:
    """One row per optimizer at ``model``, best mean final loss first (text cells)."""
    cells = sorted(results.cells[model], key=lambda c: (c.final_loss_mean is None,
                                                        c.final_loss_mean or 0.0))
    return [row(c) for c in cells]


def row(c: CellMetrics) -> dict[str, str]:
    """The leaderboard cells of one optimizer."""
    loss = "–"
    if c.final_loss_mean is not None:
        loss = f"{c.final_loss_mean:.4f}"
        if c.final_loss_std is not None:
            loss += f" ± {c.final_loss_std:.4f}"
        loss += f" (n={c.seeds - c.seeds_diverged})"
    delta = "baseline" if c.optimizer == BASELINE else _num(c.delta_vs_baseline, "+.4f")
    if c.significant:
        delta += " *"
    reached = c.mean is not None
    token = speedup_text(c.token_speedup, reached, c.speedup_bound)
    wall = speedup_text(c.wall_speedup, reached, c.speedup_bound)
    sens = c.sensitivity
    width = "–"
    if sens and sens.width_log2 is not None:
        width = f"{'≥' if sens.lower_bound else ''}{sens.width_log2:.2f}"
    best_lr = _num(c.best_lr, ".3g") + (" (edge)" if c.best_at_edge else "")
    return {
        "optimizer": c.optimizer,
        "final val loss": loss,
        "vs AdamW": delta,
        "bits/byte": _num(c.final_bpb_mean, ".4f"),
        "tokens speedup": token,
        "wall-clock speedup": wall,
        "time to target": _num(c.seconds_to_target, ".1f") + " s"
        if c.seconds_to_target is not None else "–",
        "best lr": best_lr,
        "LR width (log2)": width,
        "state MiB": _num(c.state_bytes / MB if c.state_bytes is not None else None, ".2f"),
        "state B/param": _num(c.state_bytes_per_param, ".2f"),
        "peak MiB": _num(c.peak_memory_bytes / MB if c.peak_memory_bytes else None, ".0f"),
        "optimizer share": "–" if c.optimizer_share is None
        else f"{100 * c.optimizer_share:.1f} %",
        "spikes": f"{c.spikes_sweep + c.spikes_seeds}",
        "max grad norm": _num(c.max_grad_norm, ".2f"),
        "diverged": f"{c.trials_diverged}/{c.trials} trials, {c.seeds_diverged}/{c.seeds} seeds",
    }


def header_facts(results: Results) -> list[tuple[str, str]]:
    """Command, date, machine, workload and protocol, as (label, text) pairs."""
    m, spec = results.manifest, results.manifest["spec"]
    machine = m.get("machine", {})
    hardware = machine.get("cuda") or f"CPU ({machine.get('cpu_count')} cores, " \
                                      f"{machine.get('processor') or machine.get('platform')})"
    facts = [
        ("command", m.get("command") or "(not recorded)"),
        ("date", f"{m.get('started')} to {m.get('finished') or 'unfinished'}"),
        ("wall time", f"{m['wall_s'] / 60:.1f} min" if m.get("wall_s") else "unfinished"),
        ("machine", f"{hardware}; torch {machine.get('torch')}, Python {machine.get('python')}"),
        ("workload", ", ".join(f"{k}={v}" for k, v in spec["workload"].items())),
        ("search", f"{spec['trials']} trials per optimizer and size: learning-rate grid of "
                   f"{spec['grid_points']} points, factor {spec['factor']:g}, extended by one "
                   f"point per further trial; "
                   + (f"TPE over {', '.join(t['name'] for t in spec['tune'])}; "
                      if spec.get("tune") else "")
                   + f"best configuration re-run with {spec['seeds']} fresh seed(s)"),
        ("optimizers", ", ".join(spec["optimizers"])
         + (f" (skipped, not registered: {', '.join(spec['skipped'])})"
            if spec.get("skipped") else "")),
    ]
    for model, settings in results.baseline.items():
        text = ", ".join(f"{k}={settings[k]}" for k in FALLBACK_KEYS if k in settings)
        if weak_baseline(settings):
            text += (" (library defaults: a weak baseline by benchmark-protocol.md, which asks "
                     "for betas (0.9, 0.95) and weight decay 0.1; speedups against it overstate "
                     "the gains)")
        facts.append((f"AdamW baseline ({model})", text))
    fallbacks = {cell: v["fallback_args"] for cell, v in m.get("cells", {}).items()
                 if v.get("fallback_args")}
    if fallbacks:
        facts.append(("matrix fallback", "; ".join(
            f"{cell}: AdamW {', '.join(f'{k}={v}' for k, v in args.items())}"
            for cell, args in fallbacks.items())))
    if m.get("errors"):
        facts.append(("failed cells", "; ".join(m["errors"])))
    return facts


NOTES = [
    "final val loss: mean ± sample standard deviation over the seed runs of the best "
    "configuration (nats/token); `*` in *vs AdamW*: the difference exceeds "
    f"{SIGNIFICANCE_SE:g} standard errors.",
    "tokens speedup: AdamW's tokens to reach AdamW's mean final loss divided by this "
    "optimizer's, first crossing on the seed-mean validation curve, linearly interpolated. "
    "wall-clock speedup: tokens speedup x (AdamW step time / this optimizer's step time), step "
    "times from the optimizer share measured inside each run (robust to machine load). time to "
    "target: measured seconds on the seed-mean curve (evaluation included; moves with load).",
    "LR width: log2 width of the learning-rate range whose final loss is within the margin of "
    "the best trial (≥: the range reaches the edge of the grid); best lr (edge): the best "
    "trial sits at the edge of the grid.",
    "optimizer share: optimizer-step time / training-step time; peak: CUDA max allocated, or "
    "the run's process peak RSS on CPU; spikes: loss spikes over all trials and seeds; max grad "
    "norm: largest pre-clipping gradient norm over the seed runs.",
    "Caveats: tuning trials use seed 0 and the seed runs fresh seeds, so the seed mean carries "
    "no selection bias from picking the best trial; the speedups are measured at one token "
    "budget per size (no fitted scaling law); wall-clock numbers depend on the machine's load.",
]


def notes(results: Results) -> list[str]:
    """The notes under the leaderboards (the bound note when a speedup is a bound)."""
    bounded = any(c.speedup_bound for cells in results.cells.values() for c in cells)
    return NOTES + ([BOUND_NOTE] if bounded else [])


def markdown(results: Results, figures: list[tuple[str, str]]) -> str:
    """The Markdown summary (figures linked from ``plots/``)."""
    lines = ["# Optimizer comparison", ""]
    lines += [f"- **{label}**: `{text}`" if label == "command" else f"- **{label}**: {text}"
              for label, text in header_facts(results)]
    lines += [f"- **LR sensitivity margin**: {results.margin:g} nats", ""]
    for model in results.models:
        lines += [f"## Leaderboard: {model}", ""]
        target = results.target(model)
        if target is not None:
            lines += [f"Target (AdamW mean final validation loss): {target:.4f} nats/token.", ""]
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for r in leaderboard_rows(results, model):
            lines.append("| " + " | ".join(r[c] for c in COLUMNS) + " |")
        lines.append("")
    lines += ["Notes:", ""] + [f"- {n}" for n in notes(results)] + [""]
    lines += ["## Figures", ""]
    for stem, title in figures:
        lines += [f"### {title}", "", f"![{title}](plots/{stem}.png)", ""]
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.5em 0; } img { max-width: 100%; } code { font-size: 12px; }
.facts td { text-align: left; } .notes { font-size: 13px; color: #444; }
"""


def html_page(results: Results, figures: list[tuple[str, str, bytes]]) -> str:
    """The self-contained HTML page: tables and base64-embedded PNG figures."""
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             "<title>llmvalley optimizer comparison</title>", f"<style>{CSS}</style>",
             "</head><body>", "<h1>Optimizer comparison</h1>", "<table class='facts'>"]
    parts += [f"<tr><th>{e(label)}</th><td>{e(text)}</td></tr>"
              for label, text in header_facts(results)]
    parts.append(f"<tr><th>LR sensitivity margin</th><td>{results.margin:g} nats</td></tr>")
    parts.append("</table>")
    for model in results.models:
        parts.append(f"<h2>Leaderboard: {e(model)}</h2>")
        target = results.target(model)
        if target is not None:
            parts.append(f"<p>Target (AdamW mean final validation loss): {target:.4f} "
                         "nats/token.</p>")
        parts.append(f"<table class='leaderboard' data-model='{e(model)}'><thead><tr>"
                     + "".join(f"<th>{e(c)}</th>" for c in COLUMNS) + "</tr></thead><tbody>")
        for r in leaderboard_rows(results, model):
            parts.append(f"<tr data-optimizer='{e(r['optimizer'])}'>"
                         + "".join(f"<td>{e(r[c])}</td>" for c in COLUMNS) + "</tr>")
        parts.append("</tbody></table>")
    parts.append("<ul class='notes'>" + "".join(f"<li>{e(n)}</li>" for n in notes(results))
                 + "</ul>")
    for stem, title, png in figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img id='fig-{stem}' alt='{e(title)}' "
                     f"src='data:image/png;base64,{data}'><figcaption>{e(title)}"
                     "</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(folder: str | Path, margin: float | None = None) -> list[Path]:
    """Analyse ``folder`` and write ``report.md``, ``report.html``, ``plots/`` and
    ``metrics.json``; returns the paths of the two reports."""
    from llmvalley.bench.plots import FIGURES, png_bytes

    folder = Path(folder)
    results = analyse(folder) if margin is None else analyse(folder, margin)
    plots_dir = folder / "plots"
    plots_dir.mkdir(exist_ok=True)
    rendered = []
    for stem, title, build in FIGURES:
        png = png_bytes(build(results))
        (plots_dir / f"{stem}.png").write_bytes(png)
        rendered.append((stem, title, png))
    md_path, html_path = folder / "report.md", folder / "report.html"
    md_path.write_text(markdown(results, [(s, t) for s, t, _ in rendered]), encoding="utf-8")
    html_path.write_text(html_page(results, rendered), encoding="utf-8")
    metrics: dict[str, Any] = {model: [c.to_dict() for c in cells]
                               for model, cells in results.cells.items()}
    (folder / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1) + "\n")
    return [md_path, html_path]
