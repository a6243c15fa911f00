"""What a study is doing: trials by state, the best so far, what is running."""

from __future__ import annotations

from typing import Any

from gemma_search.spec import StudySpec
from gemma_search.study import budget_used, gpu_hours_used

__all__ = ["render_status", "study_status"]


def study_status(study: Any, spec: StudySpec, engine: Any = None) -> dict[str, Any]:
    """A plain summary of the study (what `status --json` prints).

    `engine`: of gemma-search's own tables, for the workers; without it none are listed.
    """
    from optuna.trial import TrialState

    from gemma_search import db

    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): 0 for s in TrialState}
    for t in trials:
        counts[t.state.name.lower()] += 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        b = study.best_trial
        best = {"trial": b.number, "value": b.value, "params": b.params,
                "metrics": {k: v for k, v in b.user_attrs.items() if isinstance(v, int | float)}}
    running = [
        {"trial": t.number,
         "last_step": max(t.intermediate_values) if t.intermediate_values else None,
         "last_value": t.intermediate_values[max(t.intermediate_values)]
         if t.intermediate_values else None,
         "started": t.datetime_start.isoformat() if t.datetime_start else None,
         "params": t.params}
        for t in trials if t.state == TrialState.RUNNING
    ]
    workers = [] if engine is None else [
        {**w, "started_at": w["started_at"].isoformat(), "last_seen": w["last_seen"].isoformat()}
        for w in db.list_workers(engine, spec.name, stale_after=spec.storage.grace_period)
        if w["state"] == "running"]
    return {
        "study": spec.name,
        "metric": spec.objective.metric,
        "direction": spec.direction,
        "max_trials": spec.budget.max_trials,
        "budget_used": budget_used(trials),
        "max_gpu_hours": spec.budget.max_gpu_hours,
        "gpu_hours_used": round(gpu_hours_used(trials), 4),
        "trials": counts,
        "best": best,
        "running": running,
        "workers": workers,
    }


def render_status(summary: dict[str, Any]) -> Any:
    """A rich renderable of `study_status`'s summary."""
    from rich.console import Group
    from rich.table import Table

    counts = Table(title=f"study {summary['study']}: {summary['budget_used']} of "
                   f"{summary['max_trials']} trials", show_header=True)
    for state in ("complete", "pruned", "running", "waiting", "fail"):
        counts.add_column(state)
    counts.add_row(*(str(summary["trials"][s]) for s in
                     ("complete", "pruned", "running", "waiting", "fail")))
    parts: list[Any] = [counts]
    best = summary["best"]
    if best is not None:
        table = Table(title=f"best: trial {best['trial']}, {summary['metric']} = "
                      f"{best['value']:.6g} ({summary['direction']})")
        table.add_column("param")
        table.add_column("value")
        for key, value in best["params"].items():
            table.add_row(key, _fmt(value))
        parts.append(table)
    if summary["workers"]:
        table = Table(title="workers")
        for col in ("id", "host", "gpu", "pid", "trial", "step", "tokens/s", "last seen",
                    "alive"):
            table.add_column(col)
        for w in summary["workers"]:
            gpu = "-" if w["gpu_name"] is None else f"{w['gpu_index']}: {w['gpu_name']}"
            table.add_row(str(w["id"]), w["host"], gpu, str(w["pid"]),
                          _fmt(w["current_trial"]), _fmt(w["current_step"]),
                          _fmt(w["tokens_per_second"]), w["last_seen"][:19],
                          "yes" if w["alive"] else "stale")
        parts.append(table)
    if summary["running"]:
        table = Table(title="running")
        for col in ("trial", "last eval", "last value", "started"):
            table.add_column(col)
        for r in summary["running"]:
            table.add_row(str(r["trial"]), str(r["last_step"] or "-"), _fmt(r["last_value"]),
                          str(r["started"] or "-"))
        parts.append(table)
    return Group(*parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
