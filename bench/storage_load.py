"""Storage load: many worker processes, a near-free objective, one PostgreSQL.

    python bench/storage_load.py --url postgresql+psycopg2://postgres@127.0.0.1:5432/test \\
        --workers 32 128 --trials-per-worker 4
    python bench/storage_load.py --workers 256 --trials-per-worker 2 --modes gemma-search \\
        --pgbouncer session transaction

For each worker count it runs each set-up against a fresh database on the server:
  plain          Optuna defaults: `optuna.load_study(storage=URL)`, `optimize(n_trials=k)`
  gemma-search   `storage.open_storage` (no pool, connection retries, heartbeats) and the
                 worker's claim under the study lock with a study-wide `max_trials`
With `--pgbouncer MODE...` each set-up runs again through pgbouncer in each pool mode
(default: session): Debian's pgbouncer, installed with apt-get if missing, started here as
a child process on a free port with its config in a temp folder (auth_type trust, as the
test server trusts 127.0.0.1), `--pool-size` server connections at most, so that the server
stays under its max_connections whatever the number of workers.

It prints trials/s, per-trial overhead p50/p99, errors, duplicate trial numbers, the
connection refusals workers waited out, the peak number of server connections (sampled from
pg_stat_activity every 50 ms), through pgbouncer the peak of its client connections and of
those waiting for a server connection (SHOW POOLS), and the least memory available. The
objective suggests 3 parameters and reports / asks should_prune 5 times.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
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


class _Waits(logging.Handler):
    """Counts the connection refusals a worker waited out (`storage.retry_connects` logs
    one line per refused connection it retries, per reason)."""

    count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying the connection" in record.getMessage():
            _Waits.count += 1


def child(mode: str, url: str, study_name: str, trials: int, total: int) -> None:
    """One worker process: run trials, print one JSON line with what it saw."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("gemma_search.storage").addHandler(_Waits())
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
    print(json.dumps({"done": done, "durations": durations, "errors": errors,
                      "waits": _Waits.count}), flush=True)


# --- pgbouncer ------------------------------------------------------------------------------


def pgbouncer_binary() -> str:
    """Debian's pgbouncer; installed with apt-get where it is missing and we are root."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("pgbouncer is not installed: run `sudo apt-get install -y pgbouncer`")
    print("installing pgbouncer: apt-get install -y pgbouncer", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "pgbouncer"], check=True,
                   stdout=subprocess.DEVNULL)
    found = shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if not found:
        sys.exit("apt-get installed pgbouncer, but no pgbouncer binary was found")
    return found


class PgBouncer:
    """pgbouncer in front of the server of `server_url`, as a child process of this one.

    Its config, auth file and log live in a temp folder removed on exit. Run as root, it
    drops to the `postgres` user (pgbouncer refuses to run as root).
    """

    def __init__(self, server_url: str, pool_mode: str, pool_size: int,
                 max_clients: int) -> None:
        from sqlalchemy.engine import make_url

        self.server = make_url(server_url)
        self.pool_mode, self.pool_size, self.max_clients = pool_mode, pool_size, max_clients
        self.port = _free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="gs-pgbouncer-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        """`database` on the server, reached through pgbouncer."""
        return self.server.set(host="127.0.0.1", port=self.port, database=database) \
            .render_as_string(hide_password=False)

    def __enter__(self) -> PgBouncer:
        user = self.server.username or "postgres"
        (self.folder / "userlist.txt").write_text(f'"{user}" ""\n')
        # session: a server connection belongs to a client connection for its life;
        # transaction: to a client's transaction only. server_reset_query (DISCARD ALL, in
        # session mode) ends whatever session state a client left, advisory locks included.
        (self.folder / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={self.server.host or '127.0.0.1'} port={self.server.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.folder / 'userlist.txt'}
admin_users = {user}
pool_mode = {self.pool_mode}
default_pool_size = {self.pool_size}
max_db_connections = {self.pool_size}
reserve_pool_size = 0
max_client_conn = {self.max_clients}
logfile = {self.folder / 'pgbouncer.log'}
""")
        command = [pgbouncer_binary(), "-q", str(self.folder / "pgbouncer.ini")]
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
            for path in self.folder.iterdir():
                shutil.chown(path, "postgres")
            command[1:1] = ["-u", "postgres"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    log = (self.folder / "pgbouncer.log")
                    raise RuntimeError(f"pgbouncer did not start: {err}"
                                       f"{log.read_text() if log.exists() else ''}") from None
                time.sleep(0.1)

    def pools(self, database: str) -> tuple[int, int]:
        """(client connections, clients waiting for a server connection) of `database`."""
        import psycopg2

        # The admin console speaks only SHOW and a few commands, not the SQL SQLAlchemy's
        # dialect sends when it connects: a bare psycopg2 connection, autocommit.
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, dbname="pgbouncer",
                                user=self.server.username or "postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SHOW POOLS")
                names = [c[0] for c in cur.description]
                rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()
        mine = [r for r in rows if r["database"] == database]
        return (sum(r["cl_active"] + r["cl_waiting"] for r in mine),
                sum(r["cl_waiting"] for r in mine))

    def __exit__(self, *_: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# --- one set-up -------------------------------------------------------------------------------


def run(mode: str, base_url: str, workers: int, per_worker: int,
        bouncer: PgBouncer | None = None) -> dict[str, Any]:
    import optuna
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from gemma_search.storage import make_engine

    db_name = f"gs_load_{uuid.uuid4().hex[:8]}"
    # CREATE / DROP DATABASE run outside a transaction.
    admin = make_engine(base_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    direct = make_url(base_url).set(database=db_name).render_as_string(hide_password=False)
    url = bouncer.url(db_name) if bouncer else direct  # where the workers connect
    optuna.create_study(study_name="load", storage=direct)
    peak = {"server": 0, "clients": 0, "waiting": 0, "min_available_gib": _available_gib()}
    stop = threading.Event()

    def sample() -> None:
        with admin.connect() as conn:
            while not stop.is_set():
                n = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                      ":d"), {"d": db_name}).scalar_one()
                peak["server"] = max(peak["server"], int(n))
                if bouncer is not None:
                    clients, waiting = bouncer.pools(db_name)
                    peak["clients"] = max(peak["clients"], clients)
                    peak["waiting"] = max(peak["waiting"], waiting)
                peak["min_available_gib"] = min(peak["min_available_gib"], _available_gib())
                time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    total = workers * per_worker
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--child", mode, url, "load",
                               str(per_worker), str(total)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(workers)]
    results: list[dict[str, Any]] = []
    crashed = 0
    for p in procs:
        out, err = p.communicate(timeout=1800)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if p.returncode != 0 or not lines:
            crashed += 1
            results.append({"done": 0, "durations": [], "errors": [err.strip()[-200:]],
                            "waits": 0})
        else:
            results.append(json.loads(lines[-1]))
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    study = optuna.load_study(study_name="load", storage=direct)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    finished = [t for t in trials if t.state.is_finished()]
    durations = sorted(d for r in results for d in r["durations"])
    errors = [e for r in results for e in r["errors"]]
    optuna.delete_study(study_name="load", storage=direct)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{db_name}" WITH (FORCE)'))
    admin.engine.dispose()
    return {
        "mode": mode, "via": f"pgbouncer {bouncer.pool_mode}" if bouncer else "direct",
        "workers": workers, "trials": len(finished), "target": total,
        "wall_s": wall, "trials_per_s": len(finished) / wall,
        "p50_ms": 1000 * statistics.median(durations) if durations else float("nan"),
        "p99_ms": 1000 * durations[int(0.99 * (len(durations) - 1))] if durations
        else float("nan"),
        "errors": len(errors), "workers_failed": sum(1 for r in results if r["errors"]),
        "duplicates": len(numbers) - len(set(numbers)),
        "connection_waits": sum(r.get("waits", 0) for r in results),
        "peak_connections": peak["server"], "peak_clients": peak["clients"],
        "peak_waiting": peak["waiting"], "min_available_gib": peak["min_available_gib"],
        "load_before": load_before, "first_error": errors[0] if errors else "",
    }


def describe(base_url: str) -> str:
    """The machine and the server, for the record beside the figures."""
    from sqlalchemy import text

    from gemma_search.storage import make_engine, redact

    engine = make_engine(base_url)
    with engine.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar_one()
        most = conn.execute(text("SHOW max_connections")).scalar_one()
    engine.dispose()
    memory = Path("/proc/meminfo").read_text().split()[1]
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {platform.node()}: {os.cpu_count()} "
            f"cores, {int(memory) / 2**20:.0f} GiB, Python {platform.python_version()}; "
            f"PostgreSQL {version} at {redact(base_url)}, max_connections {most}; load "
            f"average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


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
    parser.add_argument("--modes", nargs="+", default=["plain", "gemma-search"],
                        choices=["plain", "gemma-search"])
    parser.add_argument("--pgbouncer", nargs="*", choices=["session", "transaction"],
                        help="also run each set-up through pgbouncer in these pool modes "
                             "(no mode named: session)")
    parser.add_argument("--pool-size", type=int, default=80,
                        help="pgbouncer's server connections (default_pool_size and "
                             "max_db_connections): keep it under the server's "
                             "max_connections, less what others use")
    args = parser.parse_args()
    pool_modes = [] if args.pgbouncer is None else (args.pgbouncer or ["session"])
    print(describe(args.url), flush=True)
    rows: list[dict[str, Any]] = []
    for workers in args.workers:
        for mode in args.modes:
            for via in [None, *pool_modes]:
                if via is None:
                    row = run(mode, args.url, workers, args.trials_per_worker)
                else:
                    # Each worker opens a few connections at once (the study lock's, the
                    # storage's, our tables'): room for all, with margin.
                    with PgBouncer(args.url, via, args.pool_size, 4 * workers + 100) as bouncer:
                        row = run(mode, args.url, workers, args.trials_per_worker, bouncer)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"finished; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = ("| set-up | via | workers | trials (target) | trials/s | overhead p50 ms | "
              "p99 ms | errors | workers failed | duplicate numbers | refusals waited out | "
              "peak server connections | peak pgbouncer clients (waiting) |")
    print(header)
    print("|" + " --- |" * 13)
    for r in rows:
        clients = f"{r['peak_clients']} ({r['peak_waiting']})" if r["via"] != "direct" else "-"
        print(f"| {r['mode']} | {r['via']} | {r['workers']} | {r['trials']} ({r['target']}) | "
              f"{r['trials_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['errors']} | {r['workers_failed']} | {r['duplicates']} | "
              f"{r['connection_waits']} | {r['peak_connections']} | {clients} |")
    for r in rows:
        if r["first_error"]:
            print(f"{r['mode']} via {r['via']} x{r['workers']} first error: {r['first_error']}")


if __name__ == "__main__":
    main()
