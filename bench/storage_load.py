"""Storage load: many worker processes, a near-free objective, one PostgreSQL.

    python bench/storage_load.py --url postgresql+psycopg2://postgres@127.0.0.1:5432/test \
        --workers 32 128 --trials-per-worker 4

For each worker count it runs two set-ups against a fresh database on the server:
  plain          Optuna defaults: `optuna.load_study(storage=URL)`, `optimize(n_trials=k)`
  gemma-search   `storage.open_storage` (no pool, connection retries, heartbeats) and the
                 worker's claim under the study lock with a study-wide `max_trials`
and prints trials/s, per-trial overhead p50/p99, errors, duplicate trial numbers and the
peak number of server connections (sampled from pg_stat_activity every 50 ms). The
objective suggests 3 parameters and reports / asks should_prune 5 times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

SPEC = {
    "name": "load",
    "model": {"name_or_path": "none"},
    "task": {"type": "classification", "text_column": "text", "labels": ["a", "b"]},
    "data": {"train": "/nonexistent"},
    "budget": {"max_trials": 1, "eval_every_steps": 1},
    "pruner": {"type": "median"},
}


def objective(trial: Any) -> float:
    x = trial.suggest_float("x", -10, 10)
    y = trial.suggest_int("y", 0, 10)
    trial.suggest_categorical("z", ["a", "b"])
    for step in range(5):
        trial.report(x * x + y + step, step)
        trial.should_prune()
    return x * x + y


def child(mode: str, url: str, study_name: str, trials: int, total: int) -> None:
    """One worker process: run trials, print one JSON line with what it saw."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    durations: list[float] = []
    errors: list[str] = []
    done = 0
    try:
        if mode == "plain":
            study = optuna.load_study(study_name=study_name, storage=url)
            for _ in range(trials):
                started = time.perf_counter()
                study.optimize(objective, n_trials=1)
                durations.append(time.perf_counter() - started)
                done += 1
        else:
            from gemma_search.spec import spec_from_dict
            from gemma_search.storage import StudyLock, open_storage
            from gemma_search.worker import _claim_trial

            spec = spec_from_dict({**SPEC, "budget": {"max_trials": total,
                                                       "eval_every_steps": 1}})
            storage = open_storage(url, heartbeat=(30, 120, 3), connect_patience=300)
            study = optuna.load_study(study_name=study_name, storage=storage)
            lock = StudyLock(url, study_name, connect_patience=300)

            def released(trial: Any) -> float:
                lock.release()
                return objective(trial)

            while True:
                started = time.perf_counter()
                lock.acquire()
                try:
                    action = _claim_trial(study, spec)
                    if action == "run":
                        study.optimize(released, n_trials=1)
                finally:
                    lock.release()
                if action == "done":
                    break
                if action == "wait":
                    time.sleep(0.2)
                    continue
                durations.append(time.perf_counter() - started)
                done += 1
    except Exception as exc:  # the benchmark counts errors instead of stopping
        cause = exc.__cause__ or exc.__context__
        detail = f" <- {str(cause).splitlines()[0][:160]}" if cause else ""
        errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}{detail}")
    print(json.dumps({"done": done, "durations": durations, "errors": errors}), flush=True)


def run(mode: str, base_url: str, workers: int, per_worker: int) -> dict[str, Any]:
    import optuna
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    db_name = f"gs_load_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    url = make_url(base_url).set(database=db_name).render_as_string(hide_password=False)
    optuna.create_study(study_name="load", storage=url)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        engine = create_engine(base_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            while not stop.is_set():
                n = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                      ":d"), {"d": db_name}).scalar_one()
                peak = max(peak, int(n))
                time.sleep(0.05)
        engine.dispose()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    total = workers * per_worker
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--child", mode, url, "load",
                               str(per_worker), str(total)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(workers)]
    results, crashed = [], 0
    for p in procs:
        out, err = p.communicate(timeout=1800)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if p.returncode != 0 or not lines:
            crashed += 1
            results.append({"done": 0, "durations": [], "errors": [err.strip()[-200:]]})
        else:
            results.append(json.loads(lines[-1]))
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    study = optuna.load_study(study_name="load", storage=url)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    finished = [t for t in trials if t.state.is_finished()]
    durations = sorted(d for r in results for d in r["durations"])
    errors = [e for r in results for e in r["errors"]]
    optuna.delete_study(study_name="load", storage=url)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{db_name}" WITH (FORCE)'))
    admin.dispose()
    return {
        "mode": mode, "workers": workers, "trials": len(finished), "target": total,
        "trials_per_s": len(finished) / wall,
        "p50_ms": 1000 * statistics.median(durations) if durations else float("nan"),
        "p99_ms": 1000 * durations[int(0.99 * (len(durations) - 1))] if durations
        else float("nan"),
        "errors": len(errors), "workers_failed": sum(1 for r in results if r["errors"]),
        "duplicates": len(numbers) - len(set(numbers)), "peak_connections": peak,
        "first_error": errors[0] if errors else "",
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, url, name, trials, total = sys.argv[2:7]
        child(mode, url, name, int(trials), int(total))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get(
        "GEMMA_SEARCH_TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--workers", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--trials-per-worker", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["plain", "gemma-search"])
    args = parser.parse_args()
    rows = []
    for workers in args.workers:
        for mode in args.modes:
            row = run(mode, args.url, workers, args.trials_per_worker)
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = ("| set-up | workers | trials (target) | trials/s | overhead p50 ms | p99 ms | "
              "errors | workers failed | duplicate numbers | peak connections |")
    print(header)
    print("|" + " --- |" * 10)
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} | {r['trials']} ({r['target']}) | "
              f"{r['trials_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['errors']} | {r['workers_failed']} | {r['duplicates']} | "
              f"{r['peak_connections']} |")
    for r in rows:
        if r["first_error"]:
            print(f"{r['mode']} x{r['workers']} first error: {r['first_error']}")


if __name__ == "__main__":
    main()
