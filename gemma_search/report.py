"""A study's report: PNG plots, a self-contained `report.html` and `summary.json`.

    optimization_history.png   objective value per trial and the best so far
    intermediate_values.png    every trial's evaluations; pruned trials in red, ending in an x
    param_importances.png      PED-ANOVA importances (the numbers `analysis` gives)
    parallel_coordinate.png    searched params of the complete trials, coloured by value
    slice_learning_rate.png    learning rate vs the metric (when learning_rate is searched)
    report.html                all of the above, images embedded: one file to mail or archive
    summary.json               the same facts for scripts

A plot that cannot be drawn yet (too few trials) is skipped and the report says why.
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
from gemma_search.spec import StudySpec

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
    """
    from gemma_search.export import leaderboard
    from gemma_search.status import study_status
    from gemma_search.storage import redact
    from gemma_search.study import load_study
    from gemma_search.verify import load_companion

    study, spec = load_study(name, url)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    status = study_status(study, spec, companion=load_companion(study, url))
    importances = analysis.param_importances(study)
    rec = analysis.recommendation(study, spec, importances=importances)
    board = leaderboard(study, spec, top_k)

    paths: dict[str, Path] = {}
    notes: dict[str, str] = {}
    for key, (filename, _) in PLOTS.items():
        reason = _draw(key, study, spec, rec, out / filename)
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


def _draw(key: str, study: Any, spec: StudySpec, rec: dict[str, Any], path: Path) -> str | None:
    """Draw plot `key` to `path`; return why it was skipped, or None when written."""
    import matplotlib

    # Optuna's matplotlib plots go through pyplot; Agg draws without a display (servers, CI).
    matplotlib.use("Agg")
    import optuna
    import optuna.visualization.matplotlib as ovm

    reason = _skip_reason(key, study, spec, rec)
    if reason is not None:
        return reason
    if key == "intermediate_values":
        _intermediate_values(study, spec, path)
        return None
    metric = spec.objective.metric
    ax: Any
    with warnings.catch_warnings():
        # Optuna marks its matplotlib plots experimental since 2.2; the API we use is stable.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if key == "optimization_history":
            ax = ovm.plot_optimization_history(study, target_name=metric)
        elif key == "param_importances":
            ax = ovm.plot_param_importances(
                study, evaluator=analysis.importance_evaluator(rec["evaluator"]),
                target_name=metric)
        elif key == "parallel_coordinate":
            ax = ovm.plot_parallel_coordinate(study, params=_common_params(study, spec),
                                              target_name=metric)
        elif key == "slice_learning_rate":
            ax = ovm.plot_slice(study, params=["learning_rate"], target_name=metric)
        else:
            raise KeyError(key)
    # plot_slice returns an array of Axes when it draws several params.
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    _save(fig, path, close_pyplot=True)
    return None


def _common_params(study: Any, spec: StudySpec) -> list[str]:
    """Searched params every complete trial has. A conditional one (momentum: sgd only)
    would leave out every trial without it, or be missing from the study altogether."""
    complete = analysis.complete_trials(study)
    return [name for name in analysis.searched_params(spec)
            if complete and all(name in t.params for t in complete)]


def _skip_reason(key: str, study: Any, spec: StudySpec, rec: dict[str, Any]) -> str | None:
    """Why plot `key` cannot be drawn from this study yet; None when it can."""
    complete = analysis.complete_trials(study)
    searched = analysis.searched_params(spec)
    if key == "optimization_history" and not complete:
        return "no complete trial yet"
    if key == "intermediate_values" and not any(t.intermediate_values for t in
                                                 study.get_trials(deepcopy=False)):
        return "no trial has reported an evaluation yet"
    if key == "param_importances":
        return rec["importance_note"]
    if key == "parallel_coordinate" and (len(complete) < 2 or not _common_params(study, spec)):
        return (f"{len(complete)} complete trial(s) and {len(_common_params(study, spec))} "
                "searched parameter(s) they all have; parallel coordinates need 2 and 1")
    if key == "slice_learning_rate":
        if "learning_rate" not in searched:
            return "learning_rate is fixed in this study's spec"
        n = sum("learning_rate" in t.params for t in complete)
        if n < 2:
            return f"{n} complete trial(s) with a learning rate; a slice needs 2"
    return None


def _intermediate_values(study: Any, spec: StudySpec, path: Path) -> None:
    """Every trial's evaluations, by state: Optuna's own plot does not tell pruned trials apart,
    and seeing where the pruner cut is the point of this plot."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from optuna.trial import TrialState

    styles: dict[TrialState, tuple[str, Any, str]] = {  # state -> colour, line style, label
        TrialState.COMPLETE: ("tab:blue", "-", "complete"),
        TrialState.PRUNED: ("tab:red", "--", "pruned"),
        TrialState.RUNNING: ("tab:gray", ":", "running"),
        TrialState.FAIL: ("black", ":", "failed"),
    }
    ranked = ranked_trials(study, spec)
    best = ranked[0] if ranked else None
    fig = Figure(figsize=(8, 5), dpi=_DPI)
    ax = fig.subplots()
    counts: dict[TrialState, int] = {}
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values or t.state not in styles:
            continue
        counts[t.state] = counts.get(t.state, 0) + 1
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        colour, style, _ = styles[t.state]
        ax.plot(steps, values, color=colour, linestyle=style, linewidth=1, alpha=0.7,
                marker=".", markersize=4)
        if t.state == TrialState.PRUNED:
            ax.plot(steps[-1], values[-1], color=colour, marker="x", markersize=9,
                    markeredgewidth=2)
    handles = [Line2D([], [], color=styles[s][0], linestyle=styles[s][1],
                      marker="x" if s == TrialState.PRUNED else ".",
                      label=f"{styles[s][2]} ({counts[s]})") for s in styles if s in counts]
    if best is not None and best.intermediate_values:
        steps = sorted(best.intermediate_values)
        ax.plot(steps, [best.intermediate_values[s] for s in steps], color="tab:green",
                linewidth=2.5, marker="o", markersize=5)
        handles.append(Line2D([], [], color="tab:green", linewidth=2.5, marker="o",
                              label=f"best (trial {best.number})"))
    ax.set_xlabel("evaluation (step)")
    ax.set_ylabel(spec.objective.metric)
    ax.set_title(f"Intermediate values of {spec.name} ({spec.direction})")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles)
    _save(fig, path, close_pyplot=False)


def _save(fig: Any, path: Path, *, close_pyplot: bool) -> None:
    try:
        fig.tight_layout()
        # No "Software" text chunk: the PNG is then the same bytes for the same study.
        fig.savefig(path, format="png", dpi=_DPI, metadata={"Software": None})
    finally:
        if close_pyplot:  # pyplot keeps every figure alive until it is closed
            import matplotlib.pyplot as plt

            plt.close(fig)


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
