"""A study's report: PNG plots, a self-contained `report.html` and `summary.json`.

    optimization_history.png   objective value per trial (points) and the best so far
    intermediate_values.png    every trial's evaluations; pruned trials in red, ending in an x
                               (past 60 trials: the spread of all trials per step, the best
                               10 as lines, where pruned trials stopped)
    param_importances.png      PED-ANOVA importances (the numbers `analysis` gives)
    parallel_coordinate.png    searched params of the complete trials, coloured by value
                               (past 60 trials: all grey, the best tenth coloured)
    slice_learning_rate.png    learning rate vs the metric (when learning_rate is searched)
    report.html                all of the above, images embedded: one file to mail or archive
    summary.json               the same facts for scripts

A plot that cannot be drawn yet (too few trials) is skipped and the report says why.
Every plot draws a bounded number of artists (one collection for many points), so a study
of 10,000 trials draws about as fast as one of 100.
"""

from __future__ import annotations

import base64
import html
import json
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from gemma_search import analysis
from gemma_search.ranking import ranked_trials
from gemma_search.spec import Choice, StudySpec

__all__ = ["PLOTS", "write_report"]

#: Plot key -> (file name, title).
PLOTS: dict[str, tuple[str, str]] = {
    "optimization_history": ("optimization_history.png", "Optimization history"),
    "intermediate_values": ("intermediate_values.png",
                            "Intermediate values (pruned trials marked)"),
    "param_importances": ("param_importances.png", "Parameter importances (PED-ANOVA)"),
    "parallel_coordinate": ("parallel_coordinate.png", "Parallel coordinates"),
    "slice_learning_rate": ("slice_learning_rate.png", "Learning rate vs objective"),
}
_DPI = 100


def write_report(name: str, url: str, out_dir: str | Path, *,
                 top_k: int = 10) -> dict[str, Path]:
    """Write the plots, `report.html` and `summary.json` of study `name`; return their paths.

    Keys are the file names. Raises the usual one-line errors when the study does not exist;
    nothing is written then.

    The trials are read from the storage once (`reads.read_trials`: one statement per
    Optuna table, about 1 s for 10,000 trials where Optuna's `get_trials` takes 11 s); every
    part of the report (status, the leaderboard, the importances, each plot) works on that
    one list, and the importances are computed once, for the summary, the recommendation
    and the plot alike.
    """
    from gemma_search.export import leaderboard
    from gemma_search.reads import frozen_study, read_trials
    from gemma_search.status import study_status
    from gemma_search.storage import redact
    from gemma_search.study import load_study
    from gemma_search.verify import load_companion

    study, spec = load_study(name, url)
    trials = read_trials(study)
    # Optuna's plots take a study: this one answers from the list, not the storage.
    snapshot = frozen_study(study, trials)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    status = study_status(snapshot, spec, companion=load_companion(study, url), trials=trials)
    # `status` computed the recommendation, importances included, when a trial is ranked;
    # without one there is nothing to compute but the note that says so.
    rec = status.get("recommendation") or analysis.recommendation(snapshot, spec)
    importances = rec["importances"]
    board = leaderboard(trials, spec, top_k)
    facts = _Facts(trials, spec, rec)

    paths: dict[str, Path] = {}
    notes: dict[str, str] = {}
    for key, (filename, _) in PLOTS.items():
        reason = _draw(key, snapshot, facts, out / filename)
        if reason is None:
            paths[filename] = out / filename
        else:
            notes[key] = reason

    summary = {
        "study": spec.name,
        "metric": spec.objective.metric,
        "direction": spec.direction,
        "storage": redact(url),
        "generated_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "trials": status["trials"],
        "best": status["best"],
        "export_pick": status["export_pick"],
        "verification": status["verification"],
        "baselines": status["baselines"],
        "leaderboard": board,
        "importance_evaluator": rec["evaluator"],
        "importances": importances,
        "importance_note": rec["importance_note"],
        "recommendation": rec,
        "plots": {key: PLOTS[key][0] if key not in notes else None for key in PLOTS},
        "skipped_plots": notes,
    }
    paths["summary.json"] = out / "summary.json"
    paths["summary.json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["report.html"] = out / "report.html"
    paths["report.html"].write_text(_html(summary, out))
    return paths


# --------------------------------------------------------------------------- plots

#: Up to this many trials with evaluations, the intermediate-values plot draws each one;
#: beyond, the best `_TOP_LINES` as lines over the spread of all trials per step.
_ALL_LINES_MAX = 60
_TOP_LINES = 10
#: Scatter plots with more points than this are rasterized (one image, not a path a point).
_RASTER_POINTS = 1000
#: Parallel coordinates of many trials colour the best 1/_TOP_SHARE of them, at most _TOP_MAX.
_TOP_SHARE = 10
_TOP_MAX = 500


class _Facts:
    """What the plots need from the trials, computed once."""

    def __init__(self, trials: list[Any], spec: StudySpec, rec: dict[str, Any]) -> None:
        self.trials = trials
        self.spec = spec
        self.rec = rec
        self.ranked = ranked_trials(trials, spec)
        self.complete = sorted(self.ranked, key=lambda t: t.number)  # analysis.complete_trials
        self.searched = analysis.searched_params(spec)
        self.common = [name for name in self.searched
                       if self.complete and all(name in t.params for t in self.complete)]
        self.reported = [t for t in trials if t.intermediate_values]


def _draw(key: str, study: Any, facts: _Facts, path: Path) -> str | None:
    """Draw plot `key` to `path`; return why it was skipped, or None when written."""
    reason = _skip_reason(key, facts)
    if reason is not None:
        return reason
    if key == "intermediate_values":
        _save(intermediate_values_figure(facts.trials, facts.spec, facts.ranked), path)
    elif key == "optimization_history":
        _save(_history_figure(facts), path)
    elif key == "param_importances":
        _save(_importances_figure(facts), path)
    elif key == "parallel_coordinate":
        _save(_parallel_figure(facts), path)
    else:
        _optuna_plot(key, study, facts, path)
    return None


def _optuna_plot(key: str, study: Any, facts: _Facts, path: Path) -> None:
    """Optuna's own slice plot: one collection, whatever the number of trials."""
    import matplotlib

    # Optuna's matplotlib plots go through pyplot; Agg draws without a display (servers, CI).
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    metric = facts.spec.objective.metric
    ax: Any
    with warnings.catch_warnings():
        # Optuna marks its matplotlib plots experimental since 2.2; the API we use is stable.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if key == "slice_learning_rate":
            ax = ovm.plot_slice(study, params=["learning_rate"], target_name=metric)
        else:
            raise KeyError(key)
    # plot_slice returns an array of Axes when it draws several params.
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    try:
        for axes in fig.axes:
            for collection in axes.collections:
                if len(collection.get_paths()) > _RASTER_POINTS:
                    collection.set_rasterized(True)
        _save(fig, path)
    finally:
        plt.close(fig)  # pyplot keeps every figure alive until it is closed


def _skip_reason(key: str, facts: _Facts) -> str | None:
    """Why plot `key` cannot be drawn from this study yet; None when it can."""
    complete, common = facts.complete, facts.common
    if key == "optimization_history" and not complete:
        return "no complete trial yet"
    if key == "intermediate_values" and not facts.reported:
        return "no trial has reported an evaluation yet"
    if key == "param_importances":
        if facts.rec["importance_note"] is None and not facts.rec["importances"]:
            return "no importance was computed"
        return facts.rec["importance_note"]
    if key == "parallel_coordinate" and (len(complete) < 2 or not common):
        return (f"{len(complete)} complete trial(s) and {len(common)} "
                "searched parameter(s) they all have; parallel coordinates need 2 and 1")
    if key == "slice_learning_rate":
        if "learning_rate" not in facts.searched:
            return "learning_rate is fixed in this study's spec"
        n = sum("learning_rate" in t.params for t in complete)
        if n < 2:
            return f"{n} complete trial(s) with a learning rate; a slice needs 2"
    return None


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=_DPI)
    return fig, fig.subplots()


def _history_figure(facts: _Facts) -> Any:
    """Each complete trial's value as a point, and the best so far as one step line."""
    spec, complete = facts.spec, facts.complete
    fig, ax = _figure()
    numbers = [t.number for t in complete]
    values = [t.value for t in complete]
    many = len(complete) > _RASTER_POINTS
    ax.scatter(numbers, values, s=6 if many else 18, alpha=0.35 if many else 0.9,
               color="tab:blue", linewidths=0, rasterized=many,
               label=f"{spec.objective.metric} ({len(complete)} complete trials)")
    pick = max if spec.direction == "maximize" else min
    best: list[float] = []
    for v in values:
        best.append(v if not best else pick(best[-1], v))
    ax.plot(numbers, best, color="tab:red", drawstyle="steps-post", linewidth=1.8,
            label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(spec.objective.metric)
    ax.set_title(f"Optimization history of {spec.name} ({spec.direction})")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _importances_figure(facts: _Facts) -> Any:
    """The importances the summary lists, most important on top."""
    importances = facts.rec["importances"]
    fig, ax = _figure()
    names = list(importances)[::-1]
    values = [importances[n] for n in names]
    bars = ax.barh(names, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" if v >= 0.01 else "<0.01" for v in values],
                 padding=3, fontsize=9)
    ax.set_xlim(0, max(values) * 1.15 if values and max(values) > 0 else 1)
    ax.set_xlabel(f"importance for {facts.spec.objective.metric} "
                  f"({facts.rec['evaluator']}, normalised)")
    ax.set_title(f"Parameter importances of {facts.spec.name}")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _parallel_figure(facts: _Facts) -> Any:
    """The metric and the searched params every complete trial has, one vertical axis
    each (most important param next to the metric), one line per complete trial.

    Up to `_ALL_LINES_MAX` complete trials every line is coloured by its value; beyond,
    all of them are a faint grey layer and the best tenth (`_TOP_SHARE`, at most
    `_TOP_MAX`) is coloured on top of it, so where the good trials run stays visible. The
    best trial is the red line (green is in the colour scale). Numeric axes span the search
    range (log where the spec searches on a log scale); categorical ones list the choices.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    spec, complete = facts.spec, facts.complete
    importances = facts.rec["importances"]
    names = sorted(facts.common, key=lambda n: -importances.get(n, -1.0))
    metric = spec.objective.metric
    values = np.array([t.value for t in complete], dtype=float)
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo or 1.0
    columns = [(values - lo) / span if hi > lo else np.full(len(values), 0.5)]
    ticks: list[list[tuple[float, str]]] = [[(0.0, _cell(lo)), (1.0, _cell(hi))]]
    # Spread within a choice, so that how many trials took it shows.
    jitter = np.random.default_rng(0).uniform(-0.06, 0.06, len(complete))
    for name in names:
        dist = facts.searched[name]
        raw = [t.params[name] for t in complete]
        if isinstance(dist, Choice):
            choices = list(dist.choices)
            index = {repr(c): i for i, c in enumerate(choices)}
            step = 1.0 / (len(choices) - 1) if len(choices) > 1 else 0.0
            pos = np.array([index.get(repr(v), 0) * step if step else 0.5 for v in raw])
            columns.append(np.clip(pos + jitter, 0.0, 1.0))
            ticks.append([(i * step if step else 0.5, str(c)) for i, c in enumerate(choices)])
            continue
        scale = np.log if dist.log else np.asarray
        low, high = float(scale(dist.low)), float(scale(dist.high))
        width = high - low or 1.0
        columns.append(np.clip((scale(np.asarray(raw, dtype=float)) - low) / width, 0, 1))
        ticks.append([(0.0, analysis._num(dist.low)), (1.0, analysis._num(dist.high))])
    ys = np.stack(columns, axis=1)  # trials x axes
    xs = np.arange(ys.shape[1], dtype=float)
    segments = np.stack([np.broadcast_to(xs, ys.shape), ys], axis=2)

    fig, ax = _figure()
    cmap = colormaps["viridis" if spec.direction == "maximize" else "viridis_r"]
    order = np.argsort(values if spec.direction == "maximize" else -values)  # best last
    if len(complete) > _ALL_LINES_MAX:
        ax.add_collection(LineCollection(list(segments), colors="0.6", linewidths=0.5,
                                         alpha=0.15, rasterized=True))
        n_top = min(_TOP_MAX, max(_ALL_LINES_MAX, len(complete) // _TOP_SHARE))
        shown = order[-n_top:]
        what = f"the best {n_top:,} of {len(complete):,} coloured, all grey"
    else:
        shown = order
        what = f"{len(complete)} complete trials"
    # The colours span the coloured lines' values: the differences among the best show.
    norm = Normalize(float(values[shown].min()), float(values[shown].max()))
    ax.add_collection(LineCollection(list(segments[shown]), cmap=cmap, norm=norm,
                                     array=values[shown], linewidths=1.0, alpha=0.8))
    ax.plot(xs, ys[order[-1]], color="tab:red", linewidth=2.5)
    ax.vlines(xs, 0, 1, color="black", linewidth=0.8)
    for x, marks in zip(xs, ticks, strict=True):
        for y, text in marks:
            ax.text(x + 0.04, y, text, fontsize=7, va="center", ha="left",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5})
    ax.set_xticks(xs, [metric, *names], rotation=30, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, xs[-1] + 0.6)
    ax.set_ylim(-0.05, 1.05)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric, pad=0.01)
    best = complete[int(order[-1])].number
    ax.set_title(f"Parallel coordinates of {spec.name} ({what}; red: the best, trial {best})",
                 fontsize=10)
    return fig


def intermediate_values_figure(trials: list[Any], spec: StudySpec,
                               ranked: list[Any] | None = None) -> Any:
    """Evaluations per step, pruned trials told apart: Optuna's own plot does not, and
    seeing where the pruner cut is the point of this plot.

    Up to `_ALL_LINES_MAX` trials with evaluations: one line each, by state, pruned ones
    ending in an x. Beyond, a line a trial would be a solid smear (and slow: 39 s at 10,000
    trials): the spread of all trials per step (10-90% and 25-75% bands, the median), the
    best `_TOP_LINES` trials as lines, and where pruned trials stopped as one layer of x
    marks. The number of artists is then the same at 100 trials and at 100,000.
    `ranked`: `ranking.ranked_trials(trials, spec)`, when already computed.
    """
    if ranked is None:
        ranked = ranked_trials(trials, spec)
    reported = [t for t in trials if t.intermediate_values]
    fig, ax = _figure()
    if len(reported) <= _ALL_LINES_MAX:
        handles = _every_line(ax, reported)
    else:
        handles = _spread(ax, reported, ranked)
    best = ranked[0] if ranked else None
    if best is not None and best.intermediate_values:
        from matplotlib.lines import Line2D

        steps = sorted(best.intermediate_values)
        ax.plot(steps, [best.intermediate_values[s] for s in steps], color="tab:green",
                linewidth=2.5, marker="o", markersize=5)
        handles.append(Line2D([], [], color="tab:green", linewidth=2.5, marker="o",
                              label=f"best (trial {best.number})"))
    ax.set_xlabel("evaluation (step)")
    ax.set_ylabel(spec.objective.metric)
    ax.set_title(f"Intermediate values of {spec.name} ({spec.direction})")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=9)
    return fig


_STYLES: dict[str, tuple[str, Any, str]] = {  # state name -> colour, line style, label
    "COMPLETE": ("tab:blue", "-", "complete"),
    "PRUNED": ("tab:red", "--", "pruned"),
    "RUNNING": ("tab:gray", ":", "running"),
    "FAIL": ("black", ":", "failed"),
}


def _every_line(ax: Any, reported: list[Any]) -> list[Any]:
    """One line per trial, by state (a small study)."""
    from matplotlib.lines import Line2D

    counts: dict[str, int] = {}
    for t in reported:
        state = t.state.name
        if state not in _STYLES:
            continue
        counts[state] = counts.get(state, 0) + 1
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        colour, style, _ = _STYLES[state]
        ax.plot(steps, values, color=colour, linestyle=style, linewidth=1, alpha=0.7,
                marker=".", markersize=4)
        if state == "PRUNED":
            ax.plot(steps[-1], values[-1], color=colour, marker="x", markersize=9,
                    markeredgewidth=2)
    return [Line2D([], [], color=_STYLES[s][0], linestyle=_STYLES[s][1],
                   marker="x" if s == "PRUNED" else ".", label=f"{_STYLES[s][2]} ({counts[s]})")
            for s in _STYLES if s in counts]


def _spread(ax: Any, reported: list[Any], ranked: list[Any]) -> list[Any]:
    """All trials as percentile bands per step, the best few as lines, pruned stops as x."""
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    by_step: dict[int, list[float]] = {}
    stops_x: list[float] = []
    stops_y: list[float] = []
    counts: dict[str, int] = {}
    for t in reported:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
        for step, value in t.intermediate_values.items():
            by_step.setdefault(step, []).append(value)
        if t.state.name == "PRUNED":
            last = max(t.intermediate_values)
            stops_x.append(last)
            stops_y.append(t.intermediate_values[last])
    steps = sorted(by_step)
    q = np.array([np.nanpercentile(np.asarray(by_step[s], dtype=float), [10, 25, 50, 75, 90])
                  if np.isfinite(by_step[s]).any() else [np.nan] * 5 for s in steps])
    ax.fill_between(steps, q[:, 0], q[:, 4], color="tab:gray", alpha=0.18, linewidth=0)
    ax.fill_between(steps, q[:, 1], q[:, 3], color="tab:gray", alpha=0.35, linewidth=0)
    ax.plot(steps, q[:, 2], color="dimgray", linewidth=1.5)
    trials_per_step = [len(by_step[s]) for s in steps]
    handles: list[Any] = [
        Patch(color="tab:gray", alpha=0.18, label="all trials: 10-90% per step"),
        Patch(color="tab:gray", alpha=0.45, label="25-75%"),
        Line2D([], [], color="dimgray", linewidth=1.5,
               label=f"median ({trials_per_step[0]:,} trials at step {steps[0]}, "
                     f"{trials_per_step[-1]:,} at {steps[-1]})")]
    if stops_x:
        # Jittered within the step, so that a column of stops shows how many there were.
        rng = np.random.default_rng(0)
        jitter = rng.uniform(-0.15, 0.15, len(stops_x))
        many = len(stops_x) > _RASTER_POINTS
        ax.scatter(np.asarray(stops_x) + jitter, stops_y, marker="x", color="tab:red",
                   s=12 if many else 30, linewidths=1, alpha=0.25 if many else 0.6,
                   rasterized=many)
        handles.append(Line2D([], [], color="tab:red", marker="x", linestyle="",
                              label=f"pruned: where it stopped ({len(stops_x):,})"))
    top = [t for t in ranked[1:_TOP_LINES] if t.intermediate_values]
    for t in top:
        s = sorted(t.intermediate_values)
        ax.plot(s, [t.intermediate_values[k] for k in s], color="tab:blue", linewidth=1,
                alpha=0.8, marker=".", markersize=4)
    if top:
        handles.append(Line2D([], [], color="tab:blue", marker=".",
                              label=f"next {len(top)} best trials"))
    shown = ", ".join(f"{counts[s]:,} {_STYLES[s][2]}" for s in _STYLES if s in counts)
    ax.text(0.01, 0.01, f"trials with evaluations: {shown}", transform=ax.transAxes,
            fontsize=8, color="dimgray", va="bottom")
    return handles


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    # No "Software" text chunk: the PNG is then the same bytes for the same study.
    fig.savefig(path, format="png", dpi=_DPI, metadata={"Software": None})


# --------------------------------------------------------------------------- html


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #8a5a00; }
.warning { color: #b00020; font-weight: bold; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""


def _html(s: dict[str, Any], out: Path) -> str:
    e = _esc
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>gemma-search report: {e(s['study'])}</title>", f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>Study <code>{e(s['study'])}</code></h1>",
        f"<p>metric <b>{e(s['metric'])}</b> ({e(s['direction'])}); storage "
        f"<code>{e(s['storage'])}</code>; generated {e(s['generated_at'])}</p>",
        "<h2>Trials</h2>",
        _table(["state", "trials"], [[k, v] for k, v in s["trials"].items()]),
    ]
    best = s["best"]
    parts.append("<h2>Best single trial</h2>")
    if best is None:
        parts.append("<p class='note'>no complete trial yet</p>")
    else:
        parts.append(f"<p>trial <b>{best['trial']}</b>: {e(s['metric'])} = "
                     f"<b>{e(_cell(best['value']))}</b></p>")
        pick = s["export_pick"]
        if pick["by"] == "mean":
            spread = "" if pick["std"] is None else f" ± {_cell(pick['std'])}"
            parts.append(f"<p>export picks trial <b>{pick['trial']}</b>: the best mean over "
                         f"{pick['n']} new seed(s) (gemma-search verify), "
                         f"{e(_cell(pick['mean']) + spread)}</p>")
        parts.append(_table(["param", "value"], list(best["params"].items())))
        if best["metrics"]:
            parts.append(_table(["metric", "value"], list(best["metrics"].items())))
    base = s["baselines"]
    parts.append("<h2>Baselines</h2>")
    if base is None:
        parts.append("<p class='note'>not measured yet: the first worker measures them</p>")
    else:
        warn = " class='warning'" if False in (base["beats_untrained"],
                                              base["beats_trivial"]) else ""
        parts.append(_table([base["metric"], "value"], [
            ["untrained start (fresh adapters, before the first step)", base["untrained"]],
            [base["trivial_predictor"], base["trivial"]], ["best single trial", base["best"]]]))
        parts.append(f"<p{warn}>{e(base['line'])}</p>")
    parts.append("<h2>Leaderboard</h2>")
    board = s["leaderboard"]
    if board:
        columns: list[str] = []
        for row in board:
            columns += [c for c in row if c not in columns]
        parts.append(_table(columns, [[row.get(c) for c in columns] for row in board]))
    else:
        parts.append("<p class='note'>no complete trial yet</p>")
    parts.append(f"<h2>Parameter importances ({e(s['importance_evaluator'])})</h2>")
    if s["importances"]:
        parts.append(_table(["param", "importance"], list(s["importances"].items())))
    else:
        parts.append(f"<p class='note'>not computed: {e(s['importance_note'] or 'no data')}</p>")
    rec = s["recommendation"]
    parts.append(f"<h2>Where the good trials lie</h2><p>the best {rec['n_top']} of "
                 f"{rec['n_complete']} complete trials (pruned trials have no final value)</p>")
    parts.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in rec["lines"]) + "</ul>")
    parts.append("<h2>Plots</h2>")
    for key, (filename, title) in PLOTS.items():
        parts.append(f"<h3>{e(title)}</h3>")
        if key in s["skipped_plots"]:
            parts.append(f"<p class='note'>skipped: {e(s['skipped_plots'][key])}</p>")
            continue
        data = base64.b64encode((out / filename).read_bytes()).decode("ascii")
        parts.append(f"<img alt='{e(title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _table(header: list[str], rows: list[Any]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_cell(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)
