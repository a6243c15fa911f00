"""Study scale: what a person waits for when a study holds thousands of trials.

    python bench/study_scale.py --trials 1000 10000                 # PostgreSQL on 127.0.0.1
    python bench/study_scale.py --trials 1000 10000 --reuse --worker --write-docs
    python bench/study_scale.py --trials 30 --rounds 1 --url sqlite:////tmp/scale/scale.db

Each size gets a database of its own (the URL's database name, or SQLite file, with `_N`
appended; on PostgreSQL it is created when missing) holding a gemma-search study `scale-N`
of N finished trials and a small study `scale-small` (40 trials) beside it; one more
database (`_small`) holds the small study alone. The studies are made by gemma-search's
own `create_study` (the shipped demo_tiny spec: a stored spec, 10 searched settings, one of
them conditional). Their trials are synthetic: params drawn from the spec's search space
through `space.trial_config`, 10 intermediate values each (pruned ones fewer, failed ones
fewer still), the user attributes a worker writes. They are written straight into
Optuna's tables in batches (Optuna's `add_trials` takes 0.12 s a trial on this server, 20
minutes for 10,000): the same rows `study.add_trials` writes, and every trial is read back
through Optuna and compared with what was meant. `--reuse` keeps a study that already holds
its N trials and was made from the same spec.

Then, `--rounds` interleaved rounds (default 3), each timed as the min and median:

    status, status --json, export, report   `gemma-search ...` subprocesses, as a person
                                            runs them (start-up and imports included)
    small study status alone / beside       `status scale-small` in the database without
                                            and with the big study
    dashboard ready                         `gemma-search dashboard` started until it prints
                                            its link (a subprocess)
    dashboard study detail (cold), MB       its first GET /api/studies/ID, the call the
                                            study page makes, and the size of the answer
    dashboard importances                   GET /api/studies/ID/param_importances, next
    optuna study.trials, best_trial         plain Optuna on the same database, in-process
                                            (a fresh storage each round): the reference
    worker (with --worker)                  `gemma-search worker` on the big study, the
                                            shipped demo's tiny Gemma 2 on CPU (made once in
                                            --workdir): start until registered, the claim of
                                            its trial (count, enqueue, pop, TPE sample),
                                            start until its first evaluation is reported;
                                            then it is killed and what it wrote deleted

It prints a table; `--write-docs` writes it between the markers of its section at the end
of docs/benchmarks.md (`--docs` names another file), with the command, the machine, the
date, the load average and the commit of the gemma_search package that ran.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN = "<!-- bench/study_scale.py: begin -->"
END = "<!-- bench/study_scale.py: end -->"
HEADING = "## Study scale: status, export, report and the dashboard at thousands of trials"
DEFAULT_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/gs_study_scale"
SMALL = "scale-small"
STEPS = 10
BATCH = 1000
LR_OPT = 2.0e-3

#: Row key -> label, in table order.
ROWS: dict[str, str] = {
    "status": "`gemma-search status`",
    "status_json": "`gemma-search status --json`",
    "export": "`gemma-search export`",
    "report": "`gemma-search report`",
    "small_alone": "small study ({small} trials) `status`, alone in its database",
    "small_beside": "small study ({small} trials) `status`, beside the big one",
    "dash_ready": "`gemma-search dashboard`: start until it prints its link",
    "dash_detail": "dashboard: study detail API, cold (first call)",
    "dash_mb": "dashboard: study detail answer as sent to a browser (gzip), MB",
    "dash_json_mb": "dashboard: study detail answer unpacked (JSON), MB",
    "dash_importances": "dashboard: param importances API",
    "optuna_trials": "reference: plain Optuna `study.trials` (in-process)",
    "optuna_best": "reference: plain Optuna `study.best_trial` (in-process)",
    "worker_ready": "`gemma-search worker`: start until registered (tiny model loaded, "
                    "baselines measured)",
    "worker_claim": "worker: claim of its first trial (count, enqueue, pop, sample)",
    "worker_eval": "worker: start until its trial's first evaluation is reported",
    "worker_lock": "worker: its first claim's time under the study lock (in-process)",
    "worker_switch": "worker: from one trial's last step to the next trial's first "
                     "(in-process, median of 3 switches)",
}
#: Rows measured only with --worker.
WORKER_ROWS = {"worker_ready", "worker_claim", "worker_eval", "worker_lock",
               "worker_switch"}
#: Rows that are sizes, not seconds.
SIZES = {"dash_mb", "dash_json_mb"}


# --------------------------------------------------------------------------- databases


def size_url(base: str, suffix: str) -> str:
    """`base` with `_suffix` added to its database name (SQLite: to the file's stem)."""
    from sqlalchemy.engine import make_url

    url = make_url(base)
    database = url.database or ""
    if url.get_backend_name() == "sqlite":
        path = Path(database)
        database = str(path.with_name(f"{path.stem}_{suffix}{path.suffix or '.db'}"))
    else:
        database = f"{database}_{suffix}"
    return url.set(database=database).render_as_string(hide_password=False)


def ensure_database(url: str) -> None:
    """Create the database of `url` when it is missing (PostgreSQL), or its folder (SQLite)."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from gemma_search.storage import make_engine

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        Path(parsed.database or ".").parent.mkdir(parents=True, exist_ok=True)
        return
    name = parsed.database
    admin_url = parsed.set(database="postgres").render_as_string(hide_password=False)
    admin = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                           {"n": name}) is None:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()


def server_version(url: str) -> str:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from gemma_search.storage import make_engine

    parsed = make_url(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if parsed.get_backend_name() == "sqlite":
                return "SQLite " + str(conn.scalar(text("SELECT sqlite_version()")))
            return "PostgreSQL " + str(conn.scalar(text("SHOW server_version"))).split()[0]
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- trials


def bench_spec(name: str, n_trials: int, workdir: Path | None = None) -> Any:
    """The shipped demo_tiny spec as study `name`, its budget above `n_trials`, no warm
    start (that would enqueue a trial). Model, data and checkpoints in `workdir`: they need
    to exist only for `--worker` (`prepare_worker_files`)."""
    from gemma_search.spec import find_spec, load_spec

    where = (workdir or Path("/nonexistent")).resolve()
    return load_spec(find_spec("demo_tiny"), [
        f"name={name}", "warm_start.presets=[]", f"budget.max_trials={n_trials + 1000}",
        "storage.url=sqlite:////nonexistent/unused.db",
        f"model.name_or_path={where / 'tiny-gemma2'}",
        f"data.train={where / 'data' / 'train.jsonl'}",
        f"data.validation={where / 'data' / 'validation.jsonl'}",
        f"checkpoints.dir={where / 'checkpoints'}"])


def prepare_worker_files(workdir: Path) -> None:
    """The tiny Gemma 2 and the demo data the bench spec names, made once (`gemma-search
    demo` makes them the same way)."""
    from gemma_search.demo import write_demo_data
    from gemma_search.tiny import make_tiny_model

    if (workdir / "tiny-gemma2" / "config.json").is_file() and \
            (workdir / "data" / "validation.jsonl").is_file():
        return
    train, _ = write_demo_data(workdir / "data", n_train=400, n_validation=80)
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    make_tiny_model(workdir / "tiny-gemma2", texts)


class _Draw:
    """Stands in for an Optuna trial in `space.trial_config`: draws every searched setting
    at random and keeps the distribution Optuna would store with it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, Any] = {}

    def _keep(self, name: str, dist: Any, value: Any) -> Any:
        self.params[name] = value
        self.distributions[name] = dist
        return value

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False,
                      step: float | None = None) -> float:
        from optuna.distributions import FloatDistribution

        r = self.rng
        if log:
            value = math.exp(r.uniform(math.log(low), math.log(high)))
        elif step:
            value = low + step * r.randint(0, round((high - low) / step))
        else:
            value = r.uniform(low, high)
        return self._keep(name, FloatDistribution(low, high, log=log, step=step),
                          min(high, max(low, value)))

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False,
                    step: int = 1) -> int:
        from optuna.distributions import IntDistribution

        return self._keep(name, IntDistribution(low, high, log=log, step=step),
                          self.rng.randrange(low, high + 1, step))

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        from optuna.distributions import CategoricalDistribution

        return self._keep(name, CategoricalDistribution(choices), self.rng.choice(choices))


def synthetic_trials(spec: Any, n: int, seed: int = 0) -> list[Any]:
    """`n` finished trials of `spec` as Optuna's `create_trial` makes them: ~1% failed, the
    worse ones mostly pruned after 1 to 5 of the 10 evaluations, the rest complete."""
    from optuna.trial import TrialState, create_trial

    from gemma_search.space import trial_config

    rng = random.Random(seed)
    start = datetime(2026, 1, 5, 9, 0, 0)
    out = []
    for i in range(n):
        draw = _Draw(rng)
        trial_config(draw, spec)
        p = draw.params
        final = (0.35 + 0.5 * math.log10(p["learning_rate"] / LR_OPT) ** 2
                 + 0.04 * (p["optimizer"] == "sgd") + 0.1 * p.get("lora_dropout", 0.0)
                 + 0.02 * (p.get("lr_schedule") == "constant") + rng.gauss(0, 0.01))
        curve = {s: round(final + 0.8 * math.exp(-0.45 * (s - 1)) + rng.gauss(0, 0.004), 6)
                 for s in range(1, STEPS + 1)}
        state, value, steps = TrialState.COMPLETE, None, STEPS
        attrs: dict[str, Any] = {"host": f"node{rng.randrange(8)}", "gpus": 1,
                                 "data_fingerprint": f"{rng.getrandbits(64):016x}"}
        if rng.random() < 0.01:
            state, steps = TrialState.FAIL, rng.randint(0, 3)
            attrs["fail_reason"] = "RuntimeError: CUDA error: an illegal memory access"
        elif final > 0.5 and rng.random() < 0.8:
            state, steps = TrialState.PRUNED, rng.randint(1, 5)
        curve = {s: v for s, v in curve.items() if s <= steps}
        if state == TrialState.COMPLETE:
            value = min(curve.values())
        elif state == TrialState.PRUNED:
            value = curve[steps]  # what Optuna's tell stores for a pruned trial
        if state != TrialState.FAIL:
            attrs.update({
                "val_loss": value, "accuracy": round(max(0.0, 1.0 - value / 2), 4),
                "tokens_trained": 2400 * steps, "optimizer_steps": 15 * steps,
                "wall_seconds": round(60.0 * steps + rng.random(), 3),
                "peak_memory_bytes": 20_000_000_000 + rng.randrange(10**9),
                "stop_reason": "pruned" if state == TrialState.PRUNED else "budget",
                "resumed_from_step": None,
                "schedule": {"max_steps": 150, "warmup_steps": 8, "eval_steps": 15,
                             "train_examples": 1200, "train_examples_available": 1200,
                             "validation_examples": 200, "micro_batch_size": 16,
                             "gradient_accumulation_steps": p["gradient_accumulation_steps"],
                             "device": "cuda", "mixed_precision": "bf16"},
                "engine": {"attention": "sdpa", "loss": "chunked", "fused_kernels": True,
                           "quantized": False, "micro_batch_size": 16,
                           "activation_checkpointing": False, "setup_seconds": 4.2}})
        t = create_trial(params=p, distributions=draw.distributions, state=state,
                         value=value, intermediate_values=curve, user_attrs=attrs)
        # Eight workers, a trial started every 90 s, each as long as its evaluations.
        t.datetime_start = start + timedelta(seconds=90 * i)
        t.datetime_complete = t.datetime_start + timedelta(seconds=70 * max(1, steps))
        out.append(t)
    return out


def _utc(value: datetime | None) -> datetime | None:
    """What Optuna's TrialModel stores for a naive local datetime: naive UTC."""
    from datetime import UTC

    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


def add_trials_bulk(storage: Any, study_id: int, trials: list[Any]) -> None:
    """Write `trials` (finished, single-objective) into Optuna's tables as
    `study.add_trials` would, one transaction per `BATCH` trials.

    Row for row what `RDBStorage.create_new_trial(study_id, template_trial)` inserts: the
    trial (number = the trials before it in the study), its value, its params in Optuna's
    internal representation with the distribution's JSON, its user and system attributes
    as JSON and its intermediate values. `check_fill` reads them back through Optuna.
    """
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models
    from sqlalchemy import func, insert, select

    trial_t = models.TrialModel.__table__
    value_t = models.TrialValueModel.__table__
    param_t = models.TrialParamModel.__table__
    inter_t = models.TrialIntermediateValueModel.__table__
    user_t = models.TrialUserAttributeModel.__table__
    system_t = models.TrialSystemAttributeModel.__table__
    value_repr = models.TrialValueModel.value_to_stored_repr
    inter_repr = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr
    dist_json: dict[Any, str] = {}
    for lo in range(0, len(trials), BATCH):
        batch = trials[lo:lo + BATCH]
        with storage.engine.begin() as conn:
            # The study row is locked as Optuna locks it to number a new trial.
            conn.execute(select(models.StudyModel.__table__.c.study_id)
                         .where(models.StudyModel.__table__.c.study_id == study_id)
                         .with_for_update())
            first = int(conn.scalar(select(func.count()).select_from(trial_t)
                                    .where(trial_t.c.study_id == study_id)) or 0)
            conn.execute(insert(trial_t), [
                {"number": first + i, "study_id": study_id, "state": t.state,
                 "datetime_start": _utc(t.datetime_start),
                 "datetime_complete": _utc(t.datetime_complete)}
                for i, t in enumerate(batch)])
            ids = dict(conn.execute(
                select(trial_t.c.number, trial_t.c.trial_id)
                .where(trial_t.c.study_id == study_id, trial_t.c.number >= first)).all())
            if len(ids) != len(batch):
                raise RuntimeError(f"study {study_id}: {len(ids)} trials numbered from "
                                   f"{first}, {len(batch)} written")
            values, params, inter, user, system = [], [], [], [], []
            for i, t in enumerate(batch):
                tid = ids[first + i]
                if t.values is not None:
                    for objective, v in enumerate(t.values):
                        stored, kind = value_repr(v)
                        values.append({"trial_id": tid, "objective": objective,
                                       "value": stored, "value_type": kind})
                for name, v in t.params.items():
                    dist = t.distributions[name]
                    if dist not in dist_json:
                        dist_json[dist] = distribution_to_json(dist)
                    params.append({"trial_id": tid, "param_name": name,
                                   "param_value": dist.to_internal_repr(v),
                                   "distribution_json": dist_json[dist]})
                user += [{"trial_id": tid, "key": k, "value_json": json.dumps(v)}
                         for k, v in t.user_attrs.items()]
                system += [{"trial_id": tid, "key": k, "value_json": json.dumps(v)}
                           for k, v in t.system_attrs.items()]
                for step, v in t.intermediate_values.items():
                    stored, kind = inter_repr(v)
                    inter.append({"trial_id": tid, "step": step, "intermediate_value": stored,
                                  "intermediate_value_type": kind})
            for table, rows in ((value_t, values), (param_t, params), (user_t, user),
                                (system_t, system), (inter_t, inter)):
                if rows:
                    conn.execute(insert(table), rows)


def trial_facts(t: Any) -> tuple[Any, ...]:
    """What a trial is, as Optuna reads it back; its storage id left out."""
    return (t.number, t.state, t.values, t.params, t.distributions, t.user_attrs,
            t.system_attrs, t.intermediate_values, t.datetime_start, t.datetime_complete)


def check_fill(url: str, name: str, trials: list[Any], first: int = 0) -> None:
    """Read study `name` back through Optuna: the trials from number `first` on must be
    `trials`, field for field."""
    import optuna

    from gemma_search.storage import open_storage

    storage = open_storage(url, must_exist=True)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        read = [t for t in study.get_trials(deepcopy=False) if t.number >= first]
        if len(read) != len(trials):
            raise RuntimeError(f"study {name}: {len(read)} trials read back, "
                               f"{len(trials)} written")
        for i, (got, meant) in enumerate(zip(read, trials, strict=True)):
            want = (first + i, *trial_facts(meant)[1:])
            if trial_facts(got) != want:
                raise RuntimeError(f"study {name}: trial {first + i} reads back as "
                                   f"{trial_facts(got)}, written as {want}")
    finally:
        storage.engine.dispose()


def fill_study(url: str, name: str, n: int, *, reuse: bool, seed: int, workdir: Path,
               say: Callable[[str], None]) -> None:
    """Study `name` in `url` with `n` synthetic trials; kept as it is with `reuse` when it
    already holds `n` trials and this very spec, else made again."""
    import optuna

    from gemma_search import db
    from gemma_search.spec import spec_hash, without_secrets
    from gemma_search.storage import open_storage
    from gemma_search.study import create_study

    ensure_database(url)
    spec = bench_spec(name, n, workdir)
    storage = open_storage(url)
    engine = db.make_engine(url)
    try:
        if name in optuna.get_all_study_names(storage):
            study_id = storage.get_study_id_from_name(name)
            held = storage.get_n_trials(study_id)
            stored = db.load_study_spec(engine, name)
            same = stored is not None and stored[1] == spec_hash(without_secrets(spec))
            if reuse and held == n and same:
                say(f"{name}: reusing its {n} trials in {_shown(url)}")
                return
            say(f"{name}: deleting the {held} trials it holds")
            optuna.delete_study(study_name=name, storage=storage)
            db.delete_study_records(engine, name)
        t0 = time.perf_counter()
        study = create_study(spec, url)
        trials = synthetic_trials(spec, n, seed)
        add_trials_bulk(storage, study._study_id, trials)
        filled = time.perf_counter() - t0
        check_fill(url, name, trials)
        say(f"{name}: {n} trials written in {filled:.1f} s and read back through Optuna, "
            f"{_shown(url)}")
    finally:
        storage.engine.dispose()
        engine.dispose()


def _shown(url: str) -> str:
    from gemma_search.storage import redact

    return redact(url)


# --------------------------------------------------------------------------- timing


def gemma_search(*args: str) -> list[str]:
    return [sys.executable, "-m", "gemma_search", *args]


def run_timed(cmd: list[str], timeout: float = 900.0) -> float:
    """Seconds `cmd` took; a failure stops the benchmark with its output."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} exited {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return took


_LINK = re.compile(r"open (http://[^/\s]+)/dashboard/studies/(\d+)")


@contextlib.contextmanager
def dashboard(name: str, url: str) -> Iterator[tuple[float, str, int]]:
    """`gemma-search dashboard` on a free port: (seconds until it printed its link, the
    base address, the study id); stopped with Ctrl-C afterwards."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(gemma_search("dashboard", name, "--storage", url, "--port", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr or []), daemon=True).start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            found = _LINK.search(line)
            if found:
                ready = time.perf_counter() - t0
                break
        else:
            raise RuntimeError(f"dashboard exited {proc.wait()}: {''.join(err)[-2000:]}")
        yield ready, found.group(1), int(found.group(2))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(address: str, *, gzip: bool = False) -> tuple[float, int, int]:
    """Seconds of one GET, bytes sent, and bytes once unpacked. `gzip`: ask as a browser
    does (Accept-Encoding: gzip); the seconds include the server's compression."""
    import gzip as gz

    request = urllib.request.Request(address, headers={"Accept-Encoding": "gzip"} if gzip
                                     else {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=900) as answer:
        body = answer.read()
        packed = answer.headers.get("Content-Encoding") == "gzip"
    took = time.perf_counter() - t0
    return took, len(body), len(gz.decompress(body)) if packed else len(body)


def optuna_reference(name: str, url: str) -> tuple[float, float]:
    """Plain Optuna on a fresh storage: seconds of `study.trials`, then `study.best_trial`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=url)
    t0 = time.perf_counter()
    trials = study.trials
    t1 = time.perf_counter()
    study.best_trial  # noqa: B018 - the property's read is what is timed
    t2 = time.perf_counter()
    assert trials
    return t1 - t0, t2 - t1


def worker_timing(name: str, url: str, n: int, workdir: Path) -> tuple[float, float, float]:
    """`gemma-search worker` on study `name` (`n` trials): seconds from its start until it
    registered (model and data loaded, baselines measured), from then until its trial was
    claimed (its params set: counted, enqueued, popped and sampled), and from its start
    until that trial's first evaluation was reported; polled every 50 ms. Then the worker
    is killed and everything it wrote is deleted: the study holds its `n` trials again."""
    from optuna.storages._rdb import models
    from sqlalchemy import func, select

    from gemma_search import db
    from gemma_search.storage import make_engine, open_storage

    storage = open_storage(url, must_exist=True)
    study_id = storage.get_study_id_from_name(name)
    storage.engine.dispose()
    engine = make_engine(url)
    trial_t = models.TrialModel.__table__
    param_t = models.TrialParamModel.__table__
    inter_t = models.TrialIntermediateValueModel.__table__
    t0 = time.perf_counter()
    proc = subprocess.Popen(gemma_search("worker", name, "--storage", url),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    registered = claimed = evaluated = None
    try:
        deadline = t0 + 900
        while evaluated is None:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited {proc.returncode}: "
                                   f"{(proc.stderr.read() if proc.stderr else '')[-3000:]}")
            if time.perf_counter() > deadline:
                raise RuntimeError("worker: no evaluation reported within 900 s")
            with engine.connect() as conn:
                if registered is None and conn.scalar(
                        select(func.count()).select_from(db.GsWorker.__table__)
                        .where(db.GsWorker.study_name == name,
                               db.GsWorker.pid == proc.pid)):
                    registered = time.perf_counter() - t0
                row = conn.execute(
                    select(*(select(func.count()).select_from(t)
                             .where(t.c.trial_id == trial_t.c.trial_id).scalar_subquery()
                             for t in (param_t, inter_t)))
                    .where(trial_t.c.study_id == study_id, trial_t.c.number >= n)).first()
            now = time.perf_counter() - t0
            # Claimed once its params are set: counted and enqueued under the lock, popped
            # by `ask`, which samples (TPE) after the pop, then suggested by the objective.
            if row is not None and row[0] and claimed is None and registered is not None:
                claimed = now
            if row is not None and row[1] and claimed is not None:
                evaluated = now
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        undo_worker(engine, name, study_id, n)
        shutil.rmtree(workdir / "checkpoints" / name, ignore_errors=True)
        engine.dispose()
    assert registered is not None and claimed is not None
    return registered, claimed - registered, evaluated


def claim_under_lock(name: str, url: str, n: int) -> float:
    """Seconds a fresh worker's first claim holds the study lock: `worker._claim` in this
    process, on a newly loaded study (nothing read before), the lock timed from acquired to
    released; then the claimed trial is deleted."""
    from gemma_search import db
    from gemma_search.storage import StudyLock
    from gemma_search.study import load_study
    from gemma_search.worker import _claim

    study, spec = load_study(name, url, heartbeat=True)
    lock, engine = StudyLock(url, name), db.make_engine(url)
    held: list[float] = []
    acquire, release = lock.acquire, lock.release

    def timed_acquire() -> None:
        acquire()
        held.append(time.perf_counter())

    def timed_release() -> None:
        held.append(time.perf_counter())
        release()

    lock.acquire, lock.release = timed_acquire, timed_release  # type: ignore[method-assign]
    try:
        action, trial = _claim(study, spec, lock, engine)
        assert action == "run" and trial is not None, action
    finally:
        undo_worker(engine, name, study._study_id, n)
        study._storage._backend.engine.dispose()
        engine.dispose()
    return held[1] - held[0]


def trial_switches(name: str, url: str, n: int, workdir: Path, trials: int = 4
                   ) -> list[float]:
    """Seconds from one trial's last optimizer step to the next trial's first, for `trials`
    trials in a row of one worker (`worker.run_worker` in this process) on study `name`:
    the trial's teardown, its results written and told, the next claim and sampling, and the
    next trial's setup. The engine's own clocks (`setup_seconds`, `teardown_seconds`) place
    the steps. Then what the worker wrote is deleted."""
    import gemma_search.objective as objective
    from gemma_search import db
    from gemma_search.storage import open_storage
    from gemma_search.worker import StopFlag, run_worker

    real = objective.train_trial
    marks: list[tuple[float, float]] = []  # (first step, last step done) of each trial
    stop = StopFlag()

    def timed(*args: Any, **kwargs: Any) -> Any:
        entered = time.monotonic()
        result = real(*args, **kwargs)
        left = time.monotonic()
        marks.append((entered + result.setup_seconds, left - result.teardown_seconds))
        stop.requested = len(marks) >= trials  # the worker ends after this trial
        return result

    objective.train_trial = timed
    try:
        run_worker(name, url, stop=stop)
    finally:
        objective.train_trial = real
        storage = open_storage(url, must_exist=True)
        engine = db.make_engine(url)
        undo_worker(engine, name, storage.get_study_id_from_name(name), n)
        storage.engine.dispose()
        engine.dispose()
        shutil.rmtree(workdir / "checkpoints" / name, ignore_errors=True)
    assert len(marks) == trials, marks
    return [marks[i + 1][0] - marks[i][1] for i in range(trials - 1)]


def undo_worker(engine: Any, name: str, study_id: int, n: int) -> None:
    """Delete what a worker wrote to study `name`: its trials from number `n` on, its rows
    in gemma-search's tables and the baselines it measured."""
    from optuna.storages._rdb import models
    from sqlalchemy import delete, select

    from gemma_search import db
    from gemma_search.baselines import BASELINES_ATTR

    trial_t = models.TrialModel.__table__
    added = select(trial_t.c.trial_id).where(trial_t.c.study_id == study_id,
                                             trial_t.c.number >= n)
    with engine.begin() as conn:
        for model in (models.TrialParamModel, models.TrialValueModel,
                      models.TrialIntermediateValueModel, models.TrialUserAttributeModel,
                      models.TrialSystemAttributeModel, models.TrialHeartbeatModel):
            table = model.__table__
            conn.execute(delete(table).where(table.c.trial_id.in_(added)))
        conn.execute(delete(trial_t).where(trial_t.c.study_id == study_id,
                                           trial_t.c.number >= n))
        attrs = models.StudyUserAttributeModel.__table__
        conn.execute(delete(attrs).where(attrs.c.study_id == study_id,
                                         attrs.c.key == BASELINES_ATTR))
        for model in (db.GsWorker, db.GsCheckpoint, db.GsEvalMetric):
            conn.execute(delete(model.__table__).where(model.__table__.c.study_name == name))


def measure(sizes: list[int], urls: dict[int, str], alone: str, rounds: int, out: Path,
            say: Callable[[str], None], *, worker: bool = False,
            workdir: Path | None = None) -> dict[int, dict[str, list[float]]]:
    """Every row's samples per size, `rounds` interleaved rounds."""
    samples: dict[int, dict[str, list[float]]] = {n: {k: [] for k in ROWS} for n in sizes}
    for r in range(rounds):
        for n in sizes:
            name, url, got = f"scale-{n}", urls[n], samples[n]
            got["status"].append(run_timed(gemma_search("status", name, "--storage", url)))
            got["status_json"].append(run_timed(
                gemma_search("status", name, "--json", "--storage", url)))
            got["export"].append(run_timed(gemma_search(
                "export", name, "--out", str(out / f"export-{n}-{r}"), "--storage", url)))
            got["report"].append(run_timed(gemma_search(
                "report", name, "--out", str(out / f"report-{n}-{r}"), "--storage", url)))
            got["small_alone"].append(run_timed(gemma_search("status", SMALL, "--storage",
                                                             alone)))
            got["small_beside"].append(run_timed(gemma_search("status", SMALL, "--storage",
                                                              url)))
            with dashboard(name, url) as (ready, base, study_id):
                got["dash_ready"].append(ready)
                took, sent, size = get(f"{base}/api/studies/{study_id}?after=0", gzip=True)
                got["dash_detail"].append(took)
                got["dash_mb"].append(sent / 1e6)
                got["dash_json_mb"].append(size / 1e6)
                got["dash_importances"].append(
                    get(f"{base}/api/studies/{study_id}/param_importances")[0])
            trials_s, best_s = optuna_reference(name, url)
            got["optuna_trials"].append(trials_s)
            got["optuna_best"].append(best_s)
            if worker:
                assert workdir is not None
                registered, claim, evaluated = worker_timing(name, url, n, workdir)
                got["worker_ready"].append(registered)
                got["worker_claim"].append(claim)
                got["worker_eval"].append(evaluated)
                got["worker_lock"].append(claim_under_lock(name, url, n))
                got["worker_switch"].append(statistics.median(
                    trial_switches(name, url, n, workdir)))
            say(f"round {r + 1}/{rounds}, {n:,} trials: " + ", ".join(
                f"{k} {v[-1]:.2f}" for k, v in got.items() if v))
    return samples


# --------------------------------------------------------------------------- output


def table(sizes: list[int], samples: dict[int, dict[str, list[float]]], rounds: int,
          small: int) -> str:
    head = (f"| seconds (min / median of {rounds}) | "
            + " | ".join(f"{n:,} trials" for n in sizes) + " |")
    lines = [head, "|" + "---|" * (len(sizes) + 1)]
    for key, label in ROWS.items():
        if key in WORKER_ROWS and not any(samples[n][key] for n in sizes):
            continue  # not measured (no --worker)
        label = label.format(small=small)
        cells = []
        for n in sizes:
            values = samples[n][key]
            if not values:
                cells.append("-")
            elif key in SIZES:
                cells.append(f"{statistics.median(values):.2f} MB")
            else:
                cells.append(f"{min(values):.2f} / {statistics.median(values):.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(url: str) -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kib / 2**20:.0f} GiB"
    gpu = "a GPU" if shutil.which("nvidia-smi") else "no GPU"
    return (f"{os.cpu_count()}-core CPU ({cpu}), {mem} memory, {gpu}, {server_version(url)} "
            f"on the same machine; Python {platform.python_version()}")


def commit() -> str:
    """The commit of the gemma_search package that ran, and whether its tree was clean."""
    import gemma_search

    where = Path(gemma_search.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--",
                                str(where)], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (gemma_search is not in a git checkout)"
    return head + (" with uncommitted changes in gemma_search/" if dirty else "")


def docs_section(body: str) -> str:
    return f"{BEGIN}\n{body.strip()}\n{END}"


def write_docs(path: Path, body: str) -> None:
    """Replace the text between the markers in `path`, or add the section at its end."""
    text = path.read_text()
    section = docs_section(body)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{section}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[1000, 10000],
                        help="study sizes (one database each)")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="base database URL: each size appends _N to its name")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a study that already holds its trials")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=40, help="trials of the small study")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true",
                        help="write the table into docs/benchmarks.md (or --docs)")
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--json", type=Path, default=None, help="also write the samples here")
    parser.add_argument("--worker", action="store_true",
                        help="also time a worker on each big study (CPU, tiny model)")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "gemma-search-study-scale",
                        help="where the tiny model, data and checkpoints of --worker go")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = datetime.now().astimezone()
    load_before = os.getloadavg()
    sizes = sorted(set(args.trials))
    urls = {n: size_url(args.url, str(n)) for n in sizes}
    alone = size_url(args.url, "small")
    workdir = args.workdir.resolve()
    t0 = time.perf_counter()
    if args.worker:
        prepare_worker_files(workdir)
    fill = functools.partial(fill_study, reuse=args.reuse, workdir=workdir, say=say)
    for n in sizes:
        fill(urls[n], f"scale-{n}", n, seed=args.seed)
        fill(urls[n], SMALL, args.small, seed=args.seed + 1)
    fill(alone, SMALL, args.small, seed=args.seed + 1)
    fill_seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="study_scale-") as tmp:
        t1 = time.perf_counter()
        samples = measure(sizes, urls, alone, args.rounds, Path(tmp), say,
                          worker=args.worker, workdir=workdir)
        measure_seconds = time.perf_counter() - t1
    load_after = os.getloadavg()
    result = table(sizes, samples, args.rounds, args.small)
    print(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"sizes": sizes, "samples": samples}, indent=1) + "\n")
    if args.write_docs:
        command = "python bench/study_scale.py " + " ".join(
            a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:]))
        body = "\n".join([
            f"`{command}` ({_shown(args.url)}, a database per size), "
            f"{started:%Y-%m-%d %H:%M %Z}, gemma_search at commit {commit()}.",
            "",
            f"Machine: {machine(urls[sizes[0]])}. Load average (1 min) {load_before[0]:.2f} "
            f"before, {load_after[0]:.2f} after; the machine was shared with other work. "
            f"Filling took {fill_seconds:.0f} s, the rounds {measure_seconds:.0f} s.",
            "",
            "The studies are synthetic (demo_tiny's spec, 10 searched settings, one of them "
            "conditional, 10 evaluations a trial, ~1% failed, the worse trials mostly "
            "pruned), written straight into Optuna's tables and read back through Optuna. "
            "Commands are subprocesses, start-up included; the dashboard rows are the calls "
            "its study page makes first; the Optuna rows are the reference: reading the "
            "trials in-process, nothing else."
            + (" The worker trains demo_tiny's 2-layer Gemma 2 on CPU; after each "
               "measurement it is killed and what it wrote deleted." if args.worker else ""),
            "",
            result])
        write_docs(args.docs, body)
        say(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
