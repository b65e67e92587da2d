"""``valley report``: a Markdown summary and one self-contained HTML page from a results folder.

Writes ``report.md`` (tables; figures linked from ``plots/``), ``report.html`` (the same tables,
figures embedded as base64 PNG, so the page opens offline), ``plots/*.png`` and ``metrics.json``
(every metric, for other tools). The HTML marks its parts for machines: each figure is an
``<img>`` with ``id="fig-STEM"``, each leaderboard a ``<table class="leaderboard"
data-model="MODEL">`` with one ``<tr data-optimizer="NAME">`` per optimizer; the other tables
(``tuning-cost`` per model, ``profile`` across models, ``complexity``) are marked the same way.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmvalley.bench.analysis import (
    BOOTSTRAP_SAMPLES,
    SIGNIFICANCE_SE,
    CellMetrics,
    Results,
    analyse,
    weak_baseline,
)
from llmvalley.bench.compare import BASELINE, FALLBACK_KEYS
from llmvalley.bench.records import json_safe

MB = 1024**2
TIME_COLUMN = "time to target (AdamW-step units; raw wall-clock)"
DATA_COLUMN = "data speedup D_eff/D [90% CI]"
SHIFTED_COLUMN = "shifted-corpus loss (vs AdamW)"
COLUMNS = (
    "optimizer", "final val loss", "vs AdamW", SHIFTED_COLUMN, "bits/byte", DATA_COLUMN,
    "tokens speedup", "wall-clock speedup", TIME_COLUMN, "best lr", "LR width (log2)", "state MiB",
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


def _times(value: float) -> str:
    return "∞" if value == float("inf") else f"{value:.2f}x"


def data_speedup_text(c: CellMetrics) -> str:
    """The effective-data speedup ``D_eff / D`` with its bootstrap interval; marked as a bound
    when the loss is beyond AdamW's fitted asymptote (a lower bound) or a best learning rate
    sits at a grid edge (as the tokens speedup); flagged when extrapolated from the fit."""
    d = c.data_speedup
    if d is None:
        return "–"
    if d.value is None:
        return "–" if c.optimizer == BASELINE else f"– ({d.note})"
    if c.optimizer == BASELINE:
        return f"baseline (fit {d.value:.2f}x)"
    bounds = {b for b in (d.bound, c.speedup_bound) if b}
    bound = ("unknown" if "unknown" in bounds or bounds == {"lower", "upper"}
             else next(iter(bounds), None))
    text = f"{BOUND_MARKS.get(bound or '', '')}{d.value:.2f}x"
    if d.low is not None and d.high is not None:
        text += f" [{_times(d.low).removesuffix('x')}–{_times(d.high)}]"
    if d.bound == "lower":
        text += " (beyond AdamW's asymptote)"
    elif d.extrapolated:
        text += " (extrapolated)"
    return text


def shifted_text(c: CellMetrics) -> str:
    """The shifted corpus's mean final loss over seeds, and its gap to AdamW's."""
    if c.shifted_loss_mean is None:
        return "–"
    if c.optimizer == BASELINE:
        return f"{c.shifted_loss_mean:.4f} (baseline)"
    return f"{c.shifted_loss_mean:.4f} ({_num(c.shifted_delta_vs_baseline, '+.4f')})"


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
    best_lr = _num(c.best_lr, ".3g") + (" (edge)" if c.best_at_edge else "") + (
        " (untuned: default)" if c.untuned else "")
    return {
        "optimizer": c.optimizer,
        "final val loss": loss,
        "vs AdamW": delta,
        SHIFTED_COLUMN: shifted_text(c),
        "bits/byte": _num(c.final_bpb_mean, ".4f"),
        DATA_COLUMN: data_speedup_text(c),
        "tokens speedup": token,
        "wall-clock speedup": wall,
        TIME_COLUMN: time_to_target_text(c),
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


def time_to_target_text(c: CellMetrics) -> str:
    """The load-independent time to target first (steps to target x this optimizer's step time
    over AdamW's, in AdamW step times), then the raw wall-clock seconds, labelled as such."""
    if c.tokens_to_target is None:
        return "–"
    parts = []
    if c.tokens_per_step and c.step_time_ratio is not None:
        steps = c.tokens_to_target / c.tokens_per_step
        parts.append(f"{steps * c.step_time_ratio:.1f} AdamW steps")
    if c.seconds_to_target is not None:
        parts.append(f"raw wall-clock {c.seconds_to_target:.1f} s")
    return "; ".join(parts) or "–"


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
        ("search", f"{spec['trials']} trials per optimizer and size: "
                   + (f"coordinate descent (Wen et al. 2025) over the learning rate (grid "
                      f"factor {spec['factor']:g}, first round {spec['grid_points']} points) "
                      "and each method's beta2 or momentum, weight decay and warmup; "
                      if spec.get("search") == "coordinate" else
                      f"learning-rate grid of {spec['grid_points']} points, factor "
                      f"{spec['factor']:g}, extended by one point per further trial; ")
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
    if results.budgets != [1.0]:
        facts.append(("token budgets", ", ".join(f"{b:g}x" for b in results.budgets)
                      + " of the workload's, each size tuned and seeded at each budget "
                        "(scales " + ", ".join(results.models) + ")"))
    for size, fit in results.fits.items():
        budgets = ", ".join(f"{d:,.0f}" for d in fit.budgets)
        if fit.law is None:
            facts.append((f"AdamW's loss against data ({size})",
                          f"no fit: {fit.reason} (budgets {budgets} tokens)"))
            continue
        law = fit.law
        facts.append((f"AdamW's loss against data ({size})",
                      f"L(D) = {law.a_tokens:.4g} D^-{law.b:.3f} + {law.c:.4f} nats/token over "
                      f"D = {budgets} tokens (mean over seeds; rms residual {fit.rms:.4f})"))
    corpora = sorted({c.shifted_corpus for cells in results.cells.values() for c in cells
                      if c.shifted_corpus})
    if corpora:
        facts.append(("shifted held-out corpus", ", ".join(corpora) + " (final validation "
                      "loss on another kind of text than the training corpus, tokenized alike; "
                      "fewer evaluation batches than the in-domain set)"))
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
    "target: first the load-independent figure, steps to target x (this optimizer's step time "
    "/ AdamW's) in AdamW step times; then the raw wall-clock seconds on the seed-mean curve "
    "(evaluation included; they move with the machine's load).",
    "LR width: log2 width of the learning-rate range whose final loss is within the margin of "
    "the best trial (≥: the range reaches the edge of the grid); best lr (edge): the best "
    "trial sits at the edge of the grid.",
    "Figures: lines are the seed mean of the best configuration; the shaded seed bands span "
    "the lowest to the highest seed (min-max over seeds) at each evaluation point.",
    "optimizer share: optimizer-step time / training-step time; peak: CUDA max allocated, or "
    "the run's process peak RSS on CPU (the memory figure shows the peak above the model's "
    "own instead: this peak less AdamW's peak without its state); spikes: loss spikes over all "
    "trials and seeds; max grad norm: largest pre-clipping gradient norm over the seed runs.",
    f"{SHIFTED_COLUMN}: mean final validation loss over the seeds on the shifted held-out "
    "corpus (another kind of text, e.g. English prose for a model trained on Python source; "
    "see the facts above), and its difference to AdamW's; – when the runs did not record one.",
    "Caveats: tuning trials use seed 0 and the seed runs fresh seeds, so the seed mean carries "
    "no selection bias from picking the best trial; wall-clock numbers depend on the machine's "
    "load.",
]
ONE_BUDGET_NOTE = (
    f"{DATA_COLUMN}: needs three or more token budgets per size (valley compare --budgets "
    "1,2,4); here every speedup is measured at one budget per size (tokens-to-target, no "
    "fitted scaling law).")
DATA_NOTE = (
    f"{DATA_COLUMN} (Wen et al. 2025): AdamW's mean final loss at each budget of a size is "
    "fitted by L(D) = a D^-b + c; D_eff is the data AdamW would need to reach this optimizer's "
    "mean final loss, D the data it used. In brackets the 5–95% range of a paired bootstrap "
    "over seeds (the same seed draw for every series; ∞: some resamples fall beyond AdamW's "
    "asymptote). \"beyond AdamW's asymptote\": the loss is at or below the fitted c, so no "
    "finite D_eff exists on the fit; shown is the lower bound AdamW's largest budget / D "
    "(AdamW did not reach that loss there). \"extrapolated\": D_eff lies outside AdamW's "
    "budgets, so it rests on the fitted form only. AdamW's own row shows the fit's value at "
    "its budget (1.00x up to the fit's residual).")


def notes(results: Results) -> list[str]:
    """The notes under the leaderboards (the bound note when a speedup is a bound)."""
    bounded = any(c.speedup_bound or (c.data_speedup and c.data_speedup.bound)
                  for cells in results.cells.values() for c in cells)
    return NOTES + [DATA_NOTE if results.fits else ONE_BUDGET_NOTE] + (
        [BOUND_NOTE] if bounded else [])


@dataclass
class Section:
    """A table of the report besides the leaderboards (rendered to Markdown and HTML)."""

    title: str
    intro: str
    kind: str  # the HTML table's class
    headers: list[str]
    rows: list[list[str]]  # first cell: the optimizer
    model: str | None = None


def _powers(n: int) -> list[int]:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k < n]
    return ks + [n]


def tuning_cost_sections(results: Results) -> list[Section]:
    """Per size: each optimizer's expected best final loss after k of its trials."""
    sections = []
    for model in results.models:
        cells = [c for c in results.cells[model] if c.tuning_curve]
        if not cells:
            continue
        n = max(len(c.tuning_curve) for c in cells)
        ks = _powers(n)
        rows = []
        for c in cells:
            by_k = {k: (e, lo, hi) for k, e, lo, hi in c.tuning_curve}
            rows.append([c.optimizer, str(c.trials)] + [
                f"{by_k[k][0]:.4f} [{by_k[k][1]:.4f}–{by_k[k][2]:.4f}]" if k in by_k else "–"
                for k in ks])
        sections.append(Section(
            f"Tuning cost: {model}",
            "Expected best final validation loss after k trials drawn from each optimizer's "
            "finished tuning trials (exact bootstrap expectation; in brackets the 10–90% band "
            f"of {BOOTSTRAP_SAMPLES} bootstrap resamples). A diverged or failed trial counts as "
            "the worst finite trial loss at this size. Grid and coordinate-descent trials are "
            "not independent draws: read it as how forgiving an optimizer's trials were "
            "(Sivaprasad et al. 2020).",
            "tuning-cost", ["optimizer", "trials"] + [f"k={k}" for k in ks], rows, model))
    return sections


def profile_sections(results: Results) -> list[Section]:
    """Across sizes (workloads): the performance-profile score and geometric-mean speedup."""
    profile = results.profile()
    if profile is None:
        return []
    rows = []
    for optimizer in sorted(profile.ratios, key=lambda o: -profile.score(o)):
        mean, missed = results.geomean_speedup(optimizer)
        ratios = ", ".join("–" if r == float("inf") else f"{r:.2f}"
                           for r in profile.ratios[optimizer])
        rows.append([optimizer, f"{profile.score(optimizer):.3f}",
                     _num(mean, ".2f") + ("x" if mean else "")
                     + (f" (did not reach on {missed})" if missed else ""), ratios])
    return [Section(
        "Across workloads: performance profile",
        f"Workloads: {', '.join(profile.workloads)}. Ratio: tokens-to-target over the fastest "
        "optimizer's on each workload (–: did not reach). Score: normalized area under the "
        f"performance profile rho(tau) for tau in [1, {profile.tau_max:g}] (AlgoPerf; 1: the "
        "fastest everywhere). Geometric-mean speedup over AdamW across the workloads where the "
        "optimizer reached the target.",
        "profile", ["optimizer", "profile score", "geometric-mean token speedup",
                    "ratio to the fastest per workload"], rows)]


def complexity_section(results: Results) -> Section:
    """Each optimizer's extra hyperparameters, state formula, decompositions and step time."""
    from llmvalley.bench.complexity import complexity

    rows = []
    for optimizer in results.optimizers:
        facts = complexity(optimizer)
        extra = facts.extra_hyperparameters
        ratios = []
        for model in results.models:
            c = results.cell(model, optimizer)
            if c is not None and c.step_time_ratio is not None:
                ratios.append(f"{model} {c.step_time_ratio:.2f}x")
        decomposition = "none" if not facts.decompositions else (
            f"{facts.decompositions_per_step:.4g} ({'; '.join(facts.decompositions)})")
        rows.append([optimizer, f"{len(extra)}" + (f": {', '.join(extra)}" if extra else ""),
                     facts.matrix_state, facts.vector_state, decomposition,
                     ", ".join(ratios) or "–"])
    return Section(
        "Implementation complexity",
        "From the registry and the runs. Extra hyperparameters: registry defaults beyond "
        "AdamW's (lr, betas, eps, weight_decay, amsgrad, fused). State: elements kept for an "
        "m x n matrix and for a vector of n (spec.state_numel at the defaults; bytes depend on "
        "the state precision, see state B/param). Decompositions: matrix decompositions per "
        "hidden matrix per step, amortized (one every 200 steps counts 0.005), from the "
        "transform chain. Step time: training-step time over AdamW's, from the optimizer "
        "share measured inside the runs (load-independent).",
        "complexity", ["optimizer", "extra hyperparameters", "state (m x n matrix)",
                       "state (vector n)", "decompositions / step", "step time vs AdamW"],
        rows)


def scaling_sections(results: Results) -> list[Section]:
    """Per model size with several budgets: each optimizer's effective-data speedup at each
    budget, beside its tokens-to-target speedup."""
    sections = []
    for size, fit in results.fits.items():
        keys = results.budget_keys(size)
        rows = []
        for optimizer in results.optimizers:
            cells = [results.cell(key, optimizer) for key in keys]
            if not any(cells):
                continue
            rows.append([optimizer] + [
                "–" if c is None else f"{data_speedup_text(c)}; tokens "
                f"{speedup_text(c.token_speedup, c.mean is not None, c.speedup_bound)}"
                for c in cells])
        intro = ("Effective-data speedup D_eff/D over AdamW at each token budget [5–95% paired "
                 "bootstrap over seeds], then the tokens-to-target speedup at that budget. ")
        intro += (f"No fit: {fit.reason}." if fit.law is None else
                  f"AdamW's fit: L(D) = {fit.law.a_tokens:.4g} D^-{fit.law.b:.3f} + "
                  f"{fit.law.c:.4f} (rms residual {fit.rms:.4f} nats).")
        sections.append(Section(
            f"Scale dependence: {size}", intro, "scaling",
            ["optimizer"] + [f"{key} ({c.tokens:,.0f} tokens)" if (c := next(
                (x for x in results.cells[key] if x.tokens), None)) else key for key in keys],
            rows, size))
    return sections


def sections(results: Results) -> list[Section]:
    """Every table after the leaderboards, in order."""
    return [*scaling_sections(results), *tuning_cost_sections(results),
            *profile_sections(results), complexity_section(results)]


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
    for section in sections(results):
        lines += [f"## {section.title}", "", section.intro, ""]
        lines.append("| " + " | ".join(section.headers) + " |")
        lines.append("|" + "---|" * len(section.headers))
        lines += ["| " + " | ".join(r) + " |" for r in section.rows]
        lines.append("")
    lines += ["## Figures", ""]
    for stem, title in figures:
        lines += [f"### {title}", "", f"![{title}](plots/{stem}.png)", ""]
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.5em 0; } img { width: 100%; height: auto; } code { font-size: 12px; }
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
    for section in sections(results):
        model = f" data-model='{e(section.model)}'" if section.model else ""
        parts.append(f"<h2>{e(section.title)}</h2><p class='notes'>{e(section.intro)}</p>")
        parts.append(f"<table class='{section.kind}'{model}><thead><tr>"
                     + "".join(f"<th>{e(h)}</th>" for h in section.headers)
                     + "</tr></thead><tbody>")
        parts += [f"<tr data-optimizer='{e(r[0])}'>" + "".join(f"<td>{e(c)}</td>" for c in r)
                  + "</tr>" for r in section.rows]
        parts.append("</tbody></table>")
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
        fig = build(results)
        if fig is None:  # nothing to show (e.g. a profile of one workload)
            (plots_dir / f"{stem}.png").unlink(missing_ok=True)
            continue
        png = png_bytes(fig)
        (plots_dir / f"{stem}.png").write_bytes(png)
        rendered.append((stem, title, png))
    md_path, html_path = folder / "report.md", folder / "report.html"
    md_path.write_text(markdown(results, [(s, t) for s, t, _ in rendered]), encoding="utf-8")
    html_path.write_text(html_page(results, rendered), encoding="utf-8")
    metrics: dict[str, Any] = {model: [c.to_dict() for c in cells]
                               for model, cells in results.cells.items()}
    if results.fits:  # AdamW's loss-against-data fit per model size (several budgets)
        metrics["scaling_fits"] = {size: {**asdict(fit), "a_tokens": fit.law.a_tokens
                                          if fit.law else None}
                                   for size, fit in results.fits.items()}
    (folder / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1) + "\n")
    return [md_path, html_path]
