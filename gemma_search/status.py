"""What a study is doing: the fleet of workers, trials by state, the best so far, what is
running, what budget is left and when it should finish."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gemma_search.baselines import BASELINES_ATTR, compare_to_baselines
from gemma_search.promotion import PAUSED, is_paused, tokens_exhausted, tokens_spent
from gemma_search.spec import StudySpec
from gemma_search.study import budget_used, gpu_hours_used

__all__ = ["estimate_seconds_left", "render_status", "study_status"]


def study_status(study: Any, spec: StudySpec, engine: Any = None,
                 now: datetime | None = None, *, companion: Any = None,
                 trials: list[Any] | None = None) -> dict[str, Any]:
    """A plain summary of the study (what `status --json` prints).

    `engine`: of gemma-search's own tables, for the workers; without it none are listed.
    `companion`: the study of its verification re-runs (`verify.load_companion`), for the
    trial `export` picks; without it the pick ignores re-runs made since the companion
    existed.
    `trials`: the study's trials when the caller has read them already.

    The study's trials are read once (`reads.read_trials`), the companion's once, and every
    part of the summary works on those lists: how long this takes grows with the study's
    trials, never with other studies in the same database, and the statements it issues
    are the same whatever the number of trials.
    """
    from optuna.trial import TrialState

    from gemma_search import db
    from gemma_search.analysis import recommendation
    from gemma_search.ranking import ranked_trials
    from gemma_search.reads import count_states, read_trials
    from gemma_search.verify import (
        export_pick,
        rerun_progress,
        search_study_of,
        verification_summary,
    )

    if trials is None:
        trials = read_trials(study)
    companion_trials = None if companion is None else read_trials(companion)
    counts = count_states(trials)
    ranked = ranked_trials(trials, spec)
    best = None
    if ranked:
        b = ranked[0]
        best = {"trial": b.number, "value": b.value, "params": b.params,
                "metrics": {k: v for k, v in b.user_attrs.items() if isinstance(v, int | float)},
                # Left paused at a rung: its value is its best so far, after this evaluation.
                "paused_after_eval": b.system_attrs[PAUSED]["eval"] if is_paused(b) else None}
    # A companion (`STUDY.verify`) runs exactly the re-runs enqueued in it: that is its
    # budget; what they show belongs to the search study's status.
    verifies = search_study_of(study)
    used, max_trials = budget_used(trials), spec.budget.max_trials
    verified = []
    if verifies is None:
        verified = verification_summary(study, spec, companion, trials=trials,
                                        companion_trials=companion_trials)
    else:
        used = max_trials = rerun_progress(trials)[1]
    verification = None if not verified else {
        "study": None if companion is None else companion.study_name,
        "complete": sum(r["n"] for r in verified),
        "pending": sum(r["pending"] for r in verified),
        "trials": verified}
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
    listed = ([] if engine is None else
              db.list_workers(engine, spec.name, stale_after=spec.storage.grace_period))
    workers = [
        {**w, "started_at": w["started_at"].isoformat(), "last_seen": w["last_seen"].isoformat()}
        for w in listed if w["state"] == "running"]
    alive = sum(1 for w in workers if w["alive"])
    hours = gpu_hours_used(trials, now)
    max_hours = spec.budget.max_gpu_hours
    return {
        "study": spec.name,
        "metric": spec.objective.metric,
        "direction": spec.direction,
        "max_trials": max_trials,
        "budget_used": used,
        "max_gpu_hours": max_hours,
        "gpu_hours_used": round(hours, 4),
        "gpu_hours_left": None if max_hours is None else round(max(0.0, max_hours - hours), 4),
        # budget.max_tokens: tokens trained and reserved by running trials, all together.
        "max_tokens": spec.budget.max_tokens,
        "tokens_used": None if spec.budget.max_tokens is None else tokens_spent(trials),
        # Less left than the next run needs: the rest stays unspent.
        "tokens_exhausted": tokens_exhausted(trials, spec),
        # What those hours ran on: the workers that ever ran this study (exited ones too).
        "device": _device(listed),
        "trials": counts,
        "best": best,
        "export_pick": None if verifies else export_pick(study, spec, companion, trials=trials,
                                                         companion_trials=companion_trials),
        "verification": verification,
        "verifies": verifies,
        "running": running,
        "workers": workers,
        "workers_alive": alive,
        "eta_seconds": estimate_seconds_left(trials, spec, alive, now,
                                             not_created=0 if verifies is not None else None),
        "recommendation": recommendation(study, spec, trials=trials) if ranked else None,
        # The untrained start and the trivial predictor, with the best held against them.
        "baselines": compare_to_baselines(spec, study.user_attrs.get(BASELINES_ATTR),
                                          None if best is None else best["value"]),
    }


def estimate_seconds_left(trials: list[Any], spec: StudySpec, workers: int,
                          now: datetime | None = None, *,
                          not_created: int | None = None) -> float | None:
    """Wall seconds until the study's budget is spent, at the pace of its finished trials.

    Trials not yet started and waiting ones each take the mean duration of the finished
    trials (pruned ones included: they are part of the pace); running ones take what is
    left of it. The work is shared by the `workers` alive now; `max_gpu_hours` caps it, as
    the study stops there. None when nothing has finished yet or no worker is alive.
    `not_created`: trials the budget still allows that no worker has created yet (default:
    `budget.max_trials` less `budget_used`; 0 for a verify companion, which runs only what
    was enqueued).
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
    not_started = (max(0, spec.budget.max_trials - budget_used(trials)) if not_created is None
                   else not_created)
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
    states: tuple[str, ...] = ("complete", "pruned", "running", "waiting", "fail")
    if summary["trials"].get("paused"):  # a study whose trials pause at rungs
        states = ("complete", "paused", "pruned", "running", "waiting", "fail")
    for state in states:
        counts.add_column(state)
    counts.add_row(*(str(summary["trials"][s]) for s in states))
    parts: list[Any] = [counts, _budget_line(summary)]
    if summary.get("verifies"):
        parts.append(Text(f"verification re-runs of study {summary['verifies']!r}; "
                          f"`gemma-search status {summary['verifies']}` shows what export "
                          "picks"))
    best = summary["best"]
    if best is not None:
        title = (f"best single: trial {best['trial']}, {summary['metric']} = "
                 f"{best['value']:.6g} ({summary['direction']})")
        if best.get("paused_after_eval") is not None:
            title += f", paused after evaluation {best['paused_after_eval']} (best so far)"
        if not best["params"]:  # nothing searched: no table to show
            parts.append(Text(title))
        else:
            table = Table(title=title)
            table.add_column("param")
            table.add_column("value")
            for key, value in best["params"].items():
                table.add_row(key, _fmt(value))
            parts.append(table)
    lines = _pick_lines(summary)
    baselines = summary.get("baselines")
    if baselines is not None:
        lines.append(baselines["line"])
    if lines:
        parts.append(Text("\n".join(lines)))
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


def _pick_lines(summary: dict[str, Any]) -> list[str]:
    """Which trial `export` picks and why; how far verification has got."""
    pick, check = summary.get("export_pick"), summary.get("verification")
    lines = []
    if pick is not None and pick["by"] == "mean":
        spread = "" if pick["std"] is None else f" ± {pick['std']:.2g}"
        lines.append(f"export picks: trial {pick['trial']} by mean over {pick['n']} new "
                     f"seed(s) ({pick['mean']:.4g}{spread})")
    elif pick is not None:
        lines.append(f"export picks: trial {pick['trial']}, the best single"
                     + ("" if check else "; `gemma-search verify` re-checks the top trials "
                        "on new seeds"))
    if check and check["pending"]:
        where = check["study"] or summary["study"]
        lines.append(f"verify: {check['pending']} re-run(s) pending in study {where!r} "
                     f"(`gemma-search launch {where}` runs them)")
    return lines


def _device(workers: list[Any]) -> str | None:
    """`gpu` or `cpu` when every worker had that, `mixed` when both ran, None before any."""
    kinds = {"cpu" if w["gpu_name"] is None else "gpu" for w in workers}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)


def _budget_line(summary: dict[str, Any]) -> str:
    # budget.max_gpu_hours counts a CPU worker's hours too: name them by what they ran on.
    unit = {"gpu": "GPU-hours", "cpu": "device-hours (CPU)"}.get(summary.get("device") or "",
                                                                 "device-hours")
    hours = f"{unit} used {summary['gpu_hours_used']:.3g}"
    if summary.get("max_tokens") is not None:
        hours = f"tokens {summary['tokens_used']:,} of {summary['max_tokens']:,}; " + hours
    if summary["max_gpu_hours"] is not None:
        hours += f" of {summary['max_gpu_hours']:g} ({summary['gpu_hours_left']:.3g} left)"
    eta = summary["eta_seconds"]
    tokens_spent = bool(summary.get("tokens_exhausted"))
    if ((summary["budget_used"] >= summary["max_trials"] or tokens_spent)
            and not summary["trials"]["running"]):
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
