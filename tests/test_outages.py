"""Database outages under real workers, and stop reasons that belong to one run (issue 12).

Tests that stop, crash or restart PostgreSQL run a cluster of their own (`ScratchCluster`, on
a free port in a temporary folder), so the shared test server is never disturbed. They need
the PostgreSQL server binaries (`GEMMA_SEARCH_PG_BIN`, default /usr/lib/postgresql/15/bin):
without them they skip, and in CI (`CI=true`) they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from gemma_search import db
from gemma_search.study import budget_used
from tests.test_fleet import create, fleet_spec, running_with_checkpoint, start_worker, wait_for

pytestmark = pytest.mark.slow

PG_BIN = Path(os.environ.get("GEMMA_SEARCH_PG_BIN", "/usr/lib/postgresql/15/bin"))


class ScratchCluster:
    """A PostgreSQL cluster in a temporary folder, on a free port, for one test to stop,
    crash and start. As root (PostgreSQL refuses to run as root) its programs run as the
    `postgres` user, which owns the folder."""

    def __init__(self, *, password: str | None = None, **settings: Any) -> None:
        """`password`: TCP connections must give it (SCRAM); else no password (trust).
        `settings`: server settings, `-c name=value`."""
        self.root = Path(tempfile.mkdtemp(prefix="gs-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.settings = {"listen_addresses": "127.0.0.1", "port": self.port,
                         "unix_socket_directories": str(self.root), "fsync": "off",
                         "max_connections": 100, **settings}
        self._as_postgres = os.geteuid() == 0
        auth = ["-A", "trust"]
        if password is not None:
            (self.root / "pw").write_text(password + "\n")
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256",
                    f"--pwfile={self.root / 'pw'}"]
        if self._as_postgres:
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), *auth, "-U", "postgres", "--no-sync",
                  "-E", "UTF8")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, *, wait: bool = True, standby: bool = False) -> None:
        """`standby`: start in standby mode with hot standby off, as a server in recovery
        that refuses every connection ("the database system is not accepting connections",
        SQLSTATE 57P03) until `promote`."""
        settings = {**self.settings, **({"hot_standby": "off"} if standby else {})}
        if standby:
            (self.data / "standby.signal").touch()
        options = " ".join(f"-c {k}={v}" for k, v in settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l",
                  str(self.root / "server.log"), *(["-w"] if wait else ["-W"]), "start")

    def promote(self) -> None:
        """End a standby start: the server leaves recovery and accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def stop(self, mode: str = "fast") -> None:
        """`mode`: "fast" (a clean shutdown) or "immediate" (as a crash: recovery follows)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def accepting(self) -> bool:
        import psycopg2

        try:
            psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._command("pg_ctl", "-D", str(self.data), "-m", "immediate",
                                         "-w", "stop"), capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(PG_BIN / program), *args]
        return ["runuser", "-u", "postgres", "--", *command] if self._as_postgres else command

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(self._command(program, *args), capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed: {done.stdout}{done.stderr}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_server_binaries() -> None:
    """Skip without the PostgreSQL server binaries; in CI, fail: these tests must run."""
    missing = not (PG_BIN / "initdb").is_file() or (
        os.geteuid() == 0 and shutil.which("runuser") is None)
    if missing:
        why = f"no PostgreSQL server binaries in {PG_BIN} (set GEMMA_SEARCH_PG_BIN)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: the outage tests must run in CI")
        pytest.skip(why)


@pytest.fixture
def cluster() -> Iterator[ScratchCluster]:
    """A running scratch cluster with an empty database `gs`; `cluster.url("gs")`."""
    need_server_binaries()
    scratch = ScratchCluster()
    try:
        scratch.start()
        scratch.create_database("gs")
        yield scratch
    finally:
        scratch.destroy()


def _launch(name: str, url: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GEMMA_SEARCH_STORAGE": url, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gemma_search", "launch", name, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in found.read_text().split()] if found.exists() else []


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)" and the state


def _counted(trials: list[Any]) -> list[Any]:
    """The trials the budget counts: a failed trial that was re-queued counts through its
    retry."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return [t for t in trials if t.number not in retried]


def _collect(proc: subprocess.Popen[bytes], into: list[str]) -> threading.Thread:
    """Read a child's output as it comes (a full pipe would block the child)."""
    def read() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            into.append(line.decode(errors="replace"))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_launch_rides_out_a_database_outage(tmp_path: Path, tiny_model: Path,
                                            demo_data: tuple[Path, Path],
                                            cluster: ScratchCluster) -> None:
    """The server is down for 15 s while two workers train under `launch`: `launch` keeps
    supervising them (their parent stays `launch`), and the study ends with exactly its
    budget, every trial complete."""
    url = cluster.url("gs")
    name = "outage"
    # grace_period 60: a 15 s outage must not make running trials look dead.
    spec = create(fleet_spec(tmp_path, name, tiny_model, demo_data, max_trials=4,
                             max_tokens=4000, grace_period=60), url)
    output: list[str] = []
    proc = _launch(name, url, "--workers", "2")
    reader = _collect(proc, output)
    try:
        study = optuna.load_study(study_name=name, storage=url)
        wait_for(lambda: len([t for t in study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING,)) if t.intermediate_values]) == 2,
            120, "2 trials training")
        workers = _children(proc.pid)
        assert len(workers) == 2
        cluster.stop("fast")
        down = time.monotonic()
        time.sleep(15)
        assert proc.poll() is None, "".join(output)[-3000:]
        assert [_parent(pid) for pid in workers] == [proc.pid] * 2  # still supervised
        cluster.start()
        outage = time.monotonic() - down
        proc.wait(timeout=300)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(output)
    assert proc.returncode == 0, text[-4000:]
    assert "Traceback" not in text
    assert "progress: cannot read the study" in text
    assert "progress: the study can be read again" in text
    assert "crashed" not in text  # no worker died: no restart was needed
    assert text.strip().splitlines()[-1] == (
        f"study {name}: 4 of 4 trials done (4 complete, 0 pruned)")
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    assert budget_used(trials) == 4
    counted = _counted(trials)
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted), [
        (t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert 14 < outage < 30
    engine = db.make_engine(url)
    try:
        rows = db.list_workers(engine, spec.name, stale_after=60)
    finally:
        engine.dispose()
    assert len(rows) == 2 and {r["state"] for r in rows} == {"exited"}  # none restarted


def test_workers_ride_out_a_crash_and_its_recovery(tmp_path: Path, tiny_model: Path,
                                                   demo_data: tuple[Path, Path],
                                                   cluster: ScratchCluster) -> None:
    """An immediate stop (a crash: the server recovers from its WAL when it starts) while
    three workers are mid-trial, then 5 s of a server in recovery that refuses connections
    ("not accepting connections", 57P03: it starts as a standby without hot standby, then is
    promoted). No worker exits before the budget is spent, no trial is left RUNNING, and
    the study holds exactly its budget."""
    url = cluster.url("gs")
    name = "crash"
    create(fleet_spec(tmp_path, name, tiny_model, demo_data, max_trials=6, max_tokens=4000,
                      grace_period=60), url)
    study = optuna.load_study(study_name=name, storage=url)
    workers = [start_worker(name, url, i) for i in range(3)]
    outputs: list[list[str]] = [[] for _ in workers]
    readers = [_collect(w, out) for w, out in zip(workers, outputs, strict=True)]
    try:
        wait_for(lambda: len([t for t in study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING,)) if t.intermediate_values]) == 3,
            180, "3 trials training")
        cluster.stop("immediate")
        down = time.monotonic()
        time.sleep(3)
        cluster.start(wait=False, standby=True)  # crash recovery, then refusals
        time.sleep(5)
        cluster.promote()
        wait_for(cluster.accepting, 60, "the server to finish recovery")
        outage = time.monotonic() - down
        assert all(w.poll() is None for w in workers), "a worker exited during the outage"
        for w in workers:
            w.wait(timeout=300)
        for r in readers:
            r.join(timeout=10)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    texts = ["".join(out) for out in outputs]
    for w, text in zip(workers, texts, strict=True):
        assert w.returncode == 0, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
        assert "budget spent" in text
    assert any("storage unavailable" in text for text in texts), texts  # the outage was met
    assert any("not accepting connections" in text for text in texts), texts  # and 57P03
    # A new storage: the test's own pooled connections died with the server.
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert budget_used(trials) == 6
    counted = _counted(trials)
    assert len(counted) == 6 and all(t.state == TrialState.COMPLETE for t in counted), [
        (t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert 8 < outage < 60


def test_a_retry_that_fails_is_a_failure_of_its_own(tmp_path: Path, tiny_model: Path,
                                                    demo_data: tuple[Path, Path],
                                                    postgres_url: str) -> None:
    """A trial handed back on SIGTERM, whose newest checkpoint is then overwritten with
    garbage: its retry fails with its own reason (not the predecessor's `preempted`), is not
    re-queued, and `launch` exits 1 with a last line that says so."""
    import torch

    name = f"corrupt-{tmp_path.name[-12:]}"
    spec = create(fleet_spec(tmp_path, name, tiny_model, demo_data, max_trials=2,
                             max_tokens=6000), postgres_url)
    study = optuna.load_study(study_name=name, storage=postgres_url)
    worker = start_worker(name, postgres_url)
    try:
        victim = wait_for(lambda: running_with_checkpoint(study, spec, postgres_url), 120,
                          "a checkpoint")
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, out.decode()[-3000:]
    engine = db.make_engine(postgres_url)
    try:
        newest = db.latest_checkpoint(engine, name, [victim.number])
    finally:
        engine.dispose()
    assert newest is not None
    # Garbage of the right shape: tensors and plain values laid out as a checkpoint (so a
    # retry tries to resume from it), but an optimizer state of no parameter group, which
    # `load_state_dict` refuses. Bytes that do not load at all are refused before resuming.
    trainer = Path(newest["path"]) / "trainer.pt"
    saved = torch.load(trainer, weights_only=True)
    saved["optimizer"]["param_groups"] = []
    torch.save(saved, trainer)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [t.system_attrs["retry_history"] for t in waiting] == [[victim.number]]

    proc = _launch(name, postgres_url, "--workers", "1")
    out, _ = proc.communicate(timeout=300)
    text = out.decode()
    assert proc.returncode == 1, text[-4000:]
    retry = study.get_trials(deepcopy=False)[waiting[0].number]
    assert retry.state == TrialState.FAIL
    reason = retry.user_attrs["fail_reason"]
    assert reason and "preempted" not in reason
    assert retry.user_attrs.get("stop_reason") is None  # not the predecessor's
    assert retry.user_attrs["predecessor_stop"] == "preempted"
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.WAITING]  # not handed back
    assert not any(retry.number in t.system_attrs.get("retry_history", ()) for t in trials)
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"error: study {name}: 1 complete, 1 failed (trial "
                           f"{retry.number}: "), last
    assert reason[:40] in last


def test_workers_ride_out_a_server_restart(tmp_path: Path, tiny_model: Path,
                                          demo_data: tuple[Path, Path],
                                          cluster: ScratchCluster) -> None:
    """A plain restart (a fast stop, then a start) between and during trials of two workers,
    with a 3 s grace period: the workers carry on and the budget holds."""
    url = cluster.url("gs")
    name = "restart"
    spec = create(fleet_spec(tmp_path, name, tiny_model, demo_data, max_trials=6,
                             max_tokens=6000, checkpoint_every=5), url)
    workers = [start_worker(name, url, i) for i in range(2)]

    def some_complete() -> bool:
        study = optuna.load_study(study_name=name, storage=url)
        return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    try:
        wait_for(some_complete, 180, "a first completed trial")
        cluster.stop("fast")
        cluster.start()
        outputs = []
        for w in workers:
            out, _ = w.communicate(timeout=600)
            outputs.append(out.decode())
            assert w.returncode == 0, outputs[-1][-3000:]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    trials = optuna.load_study(study_name=spec.name, storage=url).get_trials(deepcopy=False)
    assert budget_used(trials) == 6
    counted = _counted(trials)
    assert len(counted) == 6 and all(t.state == TrialState.COMPLETE for t in counted), (
        [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials],
        [o[-3000:] for o in outputs])


def test_status_watch_rides_out_a_database_outage(tiny_model: Path,
                                                  demo_data: tuple[Path, Path],
                                                  cluster: ScratchCluster) -> None:
    """`status --watch` through 6 s without a server: it says the storage is unreachable,
    keeps the last view, and shows the study again once the server is back."""
    from tests.conftest import finished_study

    url = cluster.url("gs")
    finished_study(url, "watched", tiny_model, demo_data, ((1e-3, 0.3), (4e-3, 0.2)))
    import pty

    env = {**os.environ, "GEMMA_SEARCH_STORAGE": url, "COLUMNS": "200", "LINES": "60"}
    # A terminal: rich redraws the live view there (into a pipe it prints only the last).
    terminal, child_end = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "gemma_search", "status", "watched",
                             "--watch", "--interval", "0.5"], env=env,
                            stdout=child_end, stderr=child_end)
    os.close(child_end)
    output: list[str] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # the child closed the terminal
                return
            if not chunk:
                return
            output.append(chunk.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        time.sleep(4)
        cluster.stop("fast")
        time.sleep(6)
        assert proc.poll() is None, "".join(output)[-3000:]
        cluster.start()
        time.sleep(4)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(terminal)
    text = "".join(output)
    assert proc.returncode == 0, text[-3000:]
    assert "storage unreachable (" in text and "Connection refused" in text, text[-3000:]
    assert "Traceback" not in text
    # drawn again once the server was back: the last view has no outage line
    assert "best single: trial 1" in text.rsplit("storage unreachable", 1)[1]
