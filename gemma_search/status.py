"""What a study is doing: the fleet of workers, trials by state, the best so far, what is
running, what budget is left and when it should finish."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gemma_search.spec import StudySpec
from gemma_search.study import budget_used, gpu_hours_used

__all__ = ["estimate_seconds_left", "render_status", "study_status"]


def study_status(study: Any, spec: StudySpec, engine: Any = None,
                 now: datetime | None = None) -> dict[str, Any]:
    """A plain summary of the study (what `status --json` prints).

    `engine`: of gemma-search's own tables, for the workers; without it none are listed.
    """
    from optuna.trial import TrialState

    from gemma_search import db
    from gemma_search.analysis import recommendation

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
    # Workers that exited are history; running ones are listed alive or stale (no heartbeat
    # within the grace period: a dead machine, or a lost connection to the database).
    workers = [] if engine is None else [
        {**w, "started_at": w["started_at"].isoformat(), "last_seen": w["last_seen"].isoformat()}
        for w in db.list_workers(engine, spec.name, stale_after=spec.storage.grace_period)
        if w["state"] == "running"]
    alive = sum(1 for w in workers if w["alive"])
    hours = gpu_hours_used(trials, now)
    max_hours = spec.budget.max_gpu_hours
    return {
        "study": spec.name,
        "metric": spec.objective.metric,
        "direction": spec.direction,
        "max_trials": spec.budget.max_trials,
        "budget_used": budget_used(trials),
        "max_gpu_hours": max_hours,
        "gpu_hours_used": round(hours, 4),
        "gpu_hours_left": None if max_hours is None else round(max(0.0, max_hours - hours), 4),
        "trials": counts,
        "best": best,
        "running": running,
        "workers": workers,
        "workers_alive": alive,
        "eta_seconds": estimate_seconds_left(trials, spec, alive, now),
        "recommendation": recommendation(study, spec) if complete else None,
    }


def estimate_seconds_left(trials: list[Any], spec: StudySpec, workers: int,
                          now: datetime | None = None) -> float | None:
    """Wall seconds until the study's budget is spent, at the pace of its finished trials.

    Trials not yet started and waiting ones each take the mean duration of the finished
    trials (pruned ones included: they are part of the pace); running ones take what is
    left of it. The work is shared by the `workers` alive now; `max_gpu_hours` caps it, as
    the study stops there. None when nothing has finished yet or no worker is alive.
    """
    from optuna.trial import TrialState

    finished = [t for t in trials if t.state.is_finished() and t.datetime_start is not None
                and t.datetime_complete is not None]
    if workers <= 0 or not finished:
        return None
    mean = sum((t.datetime_complete - t.datetime_start).total_seconds()
               for t in finished) / len(finished)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    not_started = max(0, spec.budget.max_trials - budget_used(trials))
    work = (not_started + waiting) * mean
    for t in running:
        start = t.datetime_start
        elapsed = (((now or datetime.now(start.tzinfo)) - start).total_seconds()
                   if start else 0.0)
        work += max(0.0, mean - elapsed)
    seconds = work / workers
    if spec.budget.max_gpu_hours is not None:
        hours_left = max(0.0, spec.budget.max_gpu_hours - gpu_hours_used(trials, now))
        seconds = min(seconds, hours_left * 3600.0 / workers)
    return round(seconds, 1)


def render_status(summary: dict[str, Any]) -> Any:
    """A rich renderable of `study_status`'s summary."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    counts = Table(title=f"study {summary['study']}: {summary['budget_used']} of "
                   f"{summary['max_trials']} trials", show_header=True)
    states = ("complete", "pruned", "running", "waiting", "fail")
    for state in states:
        counts.add_column(state)
    counts.add_row(*(str(summary["trials"][s]) for s in states))
    parts: list[Any] = [counts, _budget_line(summary)]
    best = summary["best"]
    if best is not None:
        table = Table(title=f"best: trial {best['trial']}, {summary['metric']} = "
                      f"{best['value']:.6g} ({summary['direction']})")
        table.add_column("param")
        table.add_column("value")
        for key, value in best["params"].items():
            table.add_row(key, _fmt(value))
        parts.append(table)
    advice = summary.get("recommendation")
    if advice:
        head = (f"what matters ({advice['evaluator']} importance over {advice['n_complete']} "
                f"complete trials; regions of the top {advice['n_top']}):")
        note = [f"  ({advice['importance_note']})"] if advice["importance_note"] else []
        parts.append(Text("\n".join([head, *note, *(f"  {line}" for line in advice["lines"])])))
    if summary["workers"]:
        table = Table(title=f"workers: {summary['workers_alive']} alive of "
                      f"{len(summary['workers'])}")
        for col in ("id", "host", "gpu", "pid", "trial", "step", "tokens/s",
                    "last heartbeat (UTC)", "state"):
            table.add_column(col)
        for w in summary["workers"]:
            gpu = "-" if w["gpu_name"] is None else f"{w['gpu_index']}: {w['gpu_name']}"
            table.add_row(str(w["id"]), w["host"], gpu, str(w["pid"]),
                          _fmt(w["current_trial"]), _fmt(w["current_step"]),
                          _fmt(w["tokens_per_second"]), w["last_seen"][:19],
                          "alive" if w["alive"] else "[red]stale[/red]")
        parts.append(table)
    if summary["running"]:
        table = Table(title="running trials")
        for col in ("trial", "last eval", "last value", "started"):
            table.add_column(col)
        for r in summary["running"]:
            table.add_row(str(r["trial"]), str(r["last_step"] or "-"), _fmt(r["last_value"]),
                          str(r["started"] or "-")[:19])
        parts.append(table)
    return Group(*parts)


def _budget_line(summary: dict[str, Any]) -> str:
    hours = f"GPU-hours used {summary['gpu_hours_used']:.3g}"
    if summary["max_gpu_hours"] is not None:
        hours += f" of {summary['max_gpu_hours']:g} ({summary['gpu_hours_left']:.3g} left)"
    eta = summary["eta_seconds"]
    if summary["budget_used"] >= summary["max_trials"] and not summary["trials"]["running"]:
        when = "budget spent"
    elif eta is None:
        when = "time to finish: unknown (no finished trial or no live worker yet)"
    else:
        when = f"time to finish: about {_duration(eta)} at the current pace"
    return f"{hours}; {when}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
