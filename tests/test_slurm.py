"""docker/slurm/workers.sbatch on a real SLURM cluster: one node, CPUs only, no GRES.

The fixture starts Debian's munged, slurmctld and slurmd in the foreground, from a
temporary folder (its own munge key, slurm.conf, state and logs; SLURM_CONF points there,
ports are free ones), with no cgroups, which containers lack. The test submits the batch
script as README.md does, as a 2-task array on a tiny study in PostgreSQL, overriding only
the GPU, CPU and memory requests; then signals each task as SLURM would:
- `scancel --batch --signal=USR1`: what `#SBATCH --signal=B:USR1@300` sends before the time
  limit. The task's worker checkpoints and re-queues its trial, the task requeues itself
  and, run again, goes on with the study.
- `scancel --full --signal=TERM`: README's graceful stop. The worker checkpoints, re-queues
  its trial and exits; the task ends, not requeued.
Both tasks run trials, the study ends with exactly `max_trials` complete trials, and each
trial handed back is resumed from its checkpoint by a retry.

It needs root (slurmd starts each job as its submitter, which only root may do) and the
slurm-wlm and munge packages, which `.ci/run` installs. It runs in CI (CI=true), where it
fails without them; elsewhere it skips unless GEMMA_SEARCH_TEST_SLURM=1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "docker" / "slurm" / "workers.sbatch"
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol",
         "squeue", "sinfo")
#: The daemons live in /usr/sbin, which a CI user's PATH may lack.
PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
#: What the test asks instead of the script's one GPU, 8 CPUs and 96 GB: this node has no
#: GRES, and two CPUs for two tasks. `--gres=none` drops the script's `--gres=gpu:1`
#: (`--gres=` is refused, `--gpus=0` too).
CPU_ONLY = ("--gres=none", "--cpus-per-task=1", "--mem=2G")
#: A trial here runs 588 optimizer steps in about 8 s; signalled within its first 100, it
#: is surely mid-trial when the signal lands.
EARLY_STEPS = 100


def _skip_reason() -> str | None:
    """Run in CI, or with GEMMA_SEARCH_TEST_SLURM=1; as root; on 2 CPUs; with SLURM and munge
    (whose absence in CI is a failure, in the fixture)."""
    ci = bool(os.environ.get("CI"))
    if not ci and os.environ.get("GEMMA_SEARCH_TEST_SLURM") != "1":
        return ("starts a real SLURM cluster: runs in CI (CI=true), or set "
                "GEMMA_SEARCH_TEST_SLURM=1 (as root, with slurm-wlm and munge)")
    if os.geteuid() != 0:
        return "the SLURM daemons run as root here (SlurmUser=SlurmdUser=root)"
    if (os.cpu_count() or 1) < 2:
        return "two array tasks at one CPU each need two CPUs"
    if _missing() and not ci:
        return f"no {', '.join(_missing())}: apt-get install slurm-wlm munge"
    return None


def _missing() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool, path=PATH) is None]


# Decided before any fixture runs: a skip costs no tiny model.
pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str,
             on_timeout: Callable[[], str] = lambda: "") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{on_timeout()}")


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports nothing listens on (all held open while they are picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


class Cluster:
    """munged, slurmctld and slurmd of one node, each a child of this process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "PATH": PATH, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outs: list[IO[bytes]] = []
        self.jobs: list[str] = []

    def start(self) -> None:
        root = self.root
        for sub in ("key", "run", "state", "spool", "log"):
            (root / sub).mkdir()
        # munged refuses a key others can read and a socket folder they cannot enter.
        (root / "key").chmod(0o700)
        for path in (root, root / "run"):
            path.chmod(0o755)
        key, sock = root / "key" / "munge.key", root / "run" / "munge.socket"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], env=self.env,
                       check=True)
        self._spawn("munged", "--foreground", f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={root / 'run' / 'munged.pid'}",
                    f"--log-file={root / 'log' / 'munged.log'}",
                    f"--seed-file={root / 'run' / 'munged.seed'}")
        wait_for(sock.exists, 10, "munged's socket", self.logs)
        # `slurmd -C`: this machine's CPUs, sockets, cores and memory, as a NodeName= line.
        node = subprocess.run(["slurmd", "-C"], env=self.env, capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]
        name = re.match(r"NodeName=(\S+)", node)
        assert name, node
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(f"""\
ClusterName=gemma-search-test
SlurmctldHost={name[1]}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (120 s by
# default); and a scheduling pass every second, not every 30 to 60: a test-sized wait.
AuthInfo=socket={sock},cred_expire=5
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}
SlurmdPidFile={root / 'run' / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
# No cgroups (containers lack them): processes tracked by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
KillWait=5
ReturnToService=2
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("slurmctld", "-D", "-i")
        self._spawn("slurmd", "-D")
        wait_for(lambda: self.run("sinfo", "-h", "-o", "%T").strip() == "idle", 30,
                 "the node to be idle", self.logs)

    def _spawn(self, *argv: str) -> None:
        out = open(self.root / "log" / f"{argv[0]}.out", "wb")  # noqa: SIM115 (closed in stop)
        self.outs.append(out)
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=out,
                                           stderr=subprocess.STDOUT))

    def run(self, *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None
            ) -> str:
        out = subprocess.run(argv, env=env or self.env, cwd=cwd, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, f"{' '.join(argv)}: {out.stderr}\n{self.logs()}"
        return out.stdout

    def job(self, task: str) -> dict[str, str]:
        """`scontrol show job TASK` as a dict (JobState, Restarts, ExitCode, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "-o", "show", "job", task)))

    def state(self, task: str) -> str:
        return self.job(task)["JobState"]

    def logs(self) -> str:
        tails = []
        for path in sorted((self.root / "log").iterdir()):
            lines = path.read_text(errors="replace").splitlines()[-15:]
            tails.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(tails)

    def stop(self) -> None:
        """Cancel every job, wait for them to go, then stop the daemons, newest first."""
        for job in self.jobs:
            subprocess.run(["scancel", job], env=self.env, capture_output=True, timeout=30)
        try:
            wait_for(lambda: not self.run("squeue", "-h"), 30, "the jobs to end")
        except AssertionError:
            self._kill_leftovers()
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for out in self.outs:
            out.close()
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Processes of this cluster's jobs still alive (slurmstepd outlives slurmd): the
        ones whose environment names this cluster's slurm.conf, by pid."""
        mark = f"SLURM_CONF={self.conf}".encode()
        mine = {p.pid for p in self.procs}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in mine | {os.getpid()}:
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if mark in environ:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture
def slurm() -> Iterator[Cluster]:
    if _missing():
        pytest.fail(f"no {', '.join(_missing())}; in CI it must run (.ci/run installs "
                    "slurm-wlm and munge)")
    # Not pytest's tmp_path: munged needs every folder up to its socket open to all.
    root = Path(tempfile.mkdtemp(prefix="gemma-search-slurm-"))
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- the study ------------------------------------------------------------------------------

def slurm_spec(tmp_path: Path, name: str, model: Path, data: tuple[Path, Path],
               max_trials: int) -> Path:
    """Trials of about 10 s on one CPU, with a checkpoint every 4 optimizer steps."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
name: {name}
model: {{name_or_path: {model}, dtype: float32}}
task: {{type: classification, text_column: text, labels: [negative, positive]}}
data: {{train: {data[0]}, validation: {data[1]}, max_seq_len: 32}}
search:
  learning_rate: {{low: 1.0e-3, high: 1.0e-2, log: true}}
  micro_batch_size: 8
  gradient_accumulation_steps: 1
  epochs: 20
  lora_r: {{choices: [4, 8]}}
  lora_targets: attention
pruner: {{type: none}}
budget: {{max_trials: {max_trials}, max_tokens_per_trial: 40000, eval_every_tokens: 8000}}
storage: {{heartbeat_interval: 1, grace_period: 60}}
checkpoints: {{dir: {tmp_path / 'ckpt'}, every_steps: 4}}
""")
    return path


class Watch:
    """Polls the study and its workers: which array task ran which trial.

    A worker's `gs_workers` row names its pid and its current trial; the pid's environment
    names its array task (the node is this machine).
    """

    def __init__(self, url: str, name: str) -> None:
        import optuna

        from gemma_search.storage import make_engine

        self.study = optuna.load_study(study_name=name, storage=url)
        self.engine = make_engine(url)
        self.name = name
        self.task_of_pid: dict[int, str] = {}
        self.ran: dict[int, set[str]] = {}  # trial number -> the tasks seen running it

    def poll(self) -> None:
        from gemma_search.db import list_workers

        for w in list_workers(self.engine, self.name, stale_after=60):
            if w["state"] != "running" or w["current_trial"] is None:
                continue
            task = self.task_of_pid.get(w["pid"]) or _array_task(w["pid"])
            if task:
                self.task_of_pid[w["pid"]] = task
                self.ran.setdefault(w["current_trial"], set()).add(task)

    def trials(self) -> list[Any]:
        return list(self.study.get_trials(deepcopy=False))

    def early_with_checkpoint(self, task: str, spec: Any) -> Any:
        """A trial task `task` is running that has a checkpoint on disk, and is in its first
        EARLY_STEPS optimizer steps: a signal then reaches it well before it ends."""
        from optuna.trial import TrialState

        from gemma_search.objective import checkpoint_dir

        self.poll()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            steps = [int(p.name.removeprefix("step-"))
                     for p in checkpoint_dir(spec, t.number).glob("step-*")]
            if task in self.ran.get(t.number, ()) and steps and max(steps) <= EARLY_STEPS:
                return t
        return None

    def retry_of(self, number: int) -> Any:
        self.poll()
        return next((t for t in self.trials()
                     if number in t.system_attrs.get("retry_history", ())), None)


def _array_task(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    env = dict(e.decode(errors="replace").partition("=")[::2] for e in environ if b"=" in e)
    if "SLURM_ARRAY_JOB_ID" not in env:
        return None
    return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"


def test_array_shares_the_study_and_survives_time_limit_and_scancel(
        slurm: Cluster, tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path],
        postgres_url: str) -> None:
    from optuna.trial import TrialState
    from typer.testing import CliRunner

    from gemma_search.cli import app
    from gemma_search.spec import load_spec

    max_trials = 5
    name = f"slurm-{tmp_path.name[-12:]}"
    spec_file = slurm_spec(tmp_path, name, tiny_model, demo_data, max_trials)
    result = CliRunner().invoke(app, ["create", str(spec_file), "--storage", postgres_url])
    assert result.exit_code == 0, result.output
    spec = load_spec(spec_file)

    # README's submission: the storage URL in a mode-600 file, the venv and the model cache
    # from the environment sbatch passes on.
    url_file = tmp_path / "storage_url"
    url_file.write_text(postgres_url + "\n")
    url_file.chmod(0o600)
    venv = Path(sys.prefix)
    assert (venv / "bin" / "gemma-search").is_file(), f"no gemma-search in {venv}"
    env = {**slurm.env, "GEMMA_SEARCH_VENV": str(venv),
           "GEMMA_SEARCH_STORAGE_FILE": str(url_file), "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    job = slurm.run("sbatch", "--parsable", "--array=0-1", *CPU_ONLY, str(SBATCH), name,
                    cwd=tmp_path, env=env).strip()
    slurm.jobs.append(job)
    first, second = f"{job}_0", f"{job}_1"
    watch = Watch(postgres_url, name)

    def outputs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(tmp_path.glob("gemma-search-*.out")))

    def why() -> str:
        states = [(t.number, t.state.name, t.user_attrs.get("stop_reason"))
                  for t in watch.trials()]
        return f"trials: {states}\nran: {watch.ran}\n{outputs()}\n{slurm.logs()}"

    figures: dict[str, float] = {}

    # 1. The time limit: SLURM's USR1 to the batch shell of the second task.
    victim = wait_for(lambda: watch.early_with_checkpoint(second, spec), 180,
                      f"{second} to checkpoint a trial", why)
    sent = time.monotonic()
    slurm.run("scancel", "--batch", "--signal=USR1", second)
    wait_for(lambda: watch.retry_of(victim.number), 60,
             f"trial {victim.number} to be re-queued", why)
    figures["usr1_to_trial_requeued_s"] = time.monotonic() - sent
    wait_for(lambda: slurm.job(second)["Restarts"] == "1", 60, f"{second} to requeue", why)
    figures["usr1_to_task_requeued_s"] = time.monotonic() - sent
    wait_for(lambda: slurm.state(second) == "RUNNING", 60, f"{second} to run again", why)
    figures["usr1_to_task_running_again_s"] = time.monotonic() - sent
    requeued_victim = victim.number

    # 2. README's graceful stop, on the first task.
    victim = wait_for(lambda: watch.early_with_checkpoint(first, spec), 180,
                      f"{first} to checkpoint a trial", why)
    sent = time.monotonic()
    slurm.run("scancel", "--full", "--signal=TERM", first)
    wait_for(lambda: watch.retry_of(victim.number), 60,
             f"trial {victim.number} to be re-queued", why)
    figures["term_to_trial_requeued_s"] = time.monotonic() - sent
    wait_for(lambda: slurm.state(first) == "COMPLETED", 60, f"{first} to end", why)
    figures["term_to_task_ended_s"] = time.monotonic() - sent
    stopped_victim = victim.number

    # 3. The requeued task finishes the study: budget spent, it exits 0.
    def all_done() -> bool:
        watch.poll()
        return slurm.state(second) in ("COMPLETED", "FAILED", "CANCELLED")

    wait_for(all_done, 300, "the study to finish", why)
    figures["total_s"] = time.monotonic() - started

    assert slurm.job(second)["JobState"] == "COMPLETED", why()
    assert slurm.job(second)["ExitCode"] == "0:0", why()
    assert slurm.job(first)["ExitCode"] == "0:0", why()
    assert slurm.job(first)["Restarts"] == "0", why()  # a stop is not a requeue
    trials = watch.trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == max_trials, why()
    handed_back = sorted(t.number for t in trials if t.state != TrialState.COMPLETE)
    assert handed_back == sorted({requeued_victim, stopped_victim}), why()
    resumed = {}
    for number in handed_back:
        stopped = trials[number]
        assert stopped.user_attrs["stop_reason"] == "preempted", why()
        # Its next retry resumes from the checkpoint written at the step it stopped at
        # (a retry signalled in turn is itself retried: retry_history holds the chain).
        retry = min((t for t in trials if number in t.system_attrs.get("retry_history", ())),
                    key=lambda t: t.number)
        assert retry.params == stopped.params, why()
        assert retry.user_attrs["resumed_from_step"] == stopped.user_attrs["optimizer_steps"]
        assert retry.user_attrs["resumed_from_step"] > 0, why()
        resumed[number] = retry.user_attrs["resumed_from_step"]
        assert any(number in t.system_attrs.get("retry_history", ())
                   for t in complete), why()
    tasks = {task for ran in watch.ran.values() for task in ran}
    assert tasks == {first, second}, why()  # both tasks ran trials

    logs = {p.name: p.read_text() for p in tmp_path.glob("gemma-search-*.out")}
    assert f"requeueing array task {second}" in logs[f"gemma-search-{second}.out"], why()
    assert "requeueing" not in logs[f"gemma-search-{first}.out"], why()
    # Each worker got exactly one SIGTERM: the worker logs each, and exits at a second.
    for text in logs.values():
        assert text.count("checkpointing the running trial") == 1, why()
    # The figures docs/reliability.md quotes (`pytest -s` shows them).
    print(f"\nSLURM figures: {({k: round(v, 1) for k, v in figures.items()})}; "
          f"trials handed back -> steps their retries resumed from: {resumed}")
