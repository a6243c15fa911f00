"""`gemma-search launch`: worker processes on one machine, one per GPU, supervised.

Each child is a plain `gemma-search worker` process (docs/design.md, decision 12: no home-made
scheduler beyond one machine; here the supervisor only restarts what crashed):

- `--gpus all|0,1,3`: one child per GPU, `CUDA_VISIBLE_DEVICES` set to that GPU alone;
  `--workers N`: N CPU children.
- A child that exits 0 is done (the study's budget is spent). One that crashes (non-zero
  exit, a signal, kill -9) is restarted after a backoff of 2, 4, 8, ... seconds (at most 60);
  after `max_restarts` crashes in a row it is given up on, with a message saying so, and the
  others go on. A run that lasted `STABLE_SECONDS` clears the count: crashes hours apart are
  not "repeated".
- A child that exits with `CONFIG_ERROR_EXIT` stopped on an error in the spec, the data or
  the model (its own one-line error is on its stderr). Every restart would load the model
  only to stop the same way, and the other children share the same study: none is
  restarted, the others are stopped as on Ctrl-C, and `launch` returns `CONFIG_ERROR_EXIT`.
- Ctrl-C or SIGTERM to the launcher sends one SIGTERM to every child (each checkpoints its
  trial, re-queues it and exits); a second sends another, on which they exit at once.
- Progress is read from the storage in a thread of its own, so a database outage (or a
  host that does not answer) never holds up the supervision: the children keep their
  supervisor, their restarts and their signals. Should `launch` itself fail, it stops its
  children before it goes: none is left running without a supervisor.
- When the children are done, `outcome` says how the study stands: every planned trial
  complete or pruned, or how many failed (and why), wait, run or never started.

The storage URL goes to the children in the environment, never on the command line, so that
a password does not show in process listings. Children run in their own session: a Ctrl-C in
the terminal reaches only the launcher, which decides what the children get.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gemma_search.errors import CONFIG_ERROR_EXIT, GemmaSearchError
from gemma_search.storage import STORAGE_ENV, cause_line, redact_text

__all__ = ["Outcome", "Slot", "Supervisor", "launch", "outcome", "parse_gpus", "restart_delay"]

log = logging.getLogger("gemma_search.launcher")

#: A child that ran this long before crashing starts its crash count afresh.
STABLE_SECONDS = 600.0
#: Seconds the children of a failing `launch` get to checkpoint and exit before they are killed.
STOP_SECONDS = 120.0


def restart_delay(crashes: int, base: float = 2.0) -> float:
    """Seconds to wait before restarting a child that crashed `crashes` times in a row."""
    return min(60.0, base * 2 ** max(0, crashes - 1))


def parse_gpus(value: str, visible: str | None = None, count: Callable[[], int] | None = None
               ) -> list[str]:
    """The GPU ids `--gpus` names, as `CUDA_VISIBLE_DEVICES` values for one child each.

    `all` is every GPU this process sees: the entries of `CUDA_VISIBLE_DEVICES` when it is set
    (so `CUDA_VISIBLE_DEVICES=2,3 gemma-search launch --gpus all` uses GPUs 2 and 3), else
    0 .. device_count - 1. A list (`0,1,3`) is taken as given, UUIDs (`GPU-...`) included.
    """
    value = value.strip()
    if value != "all":
        ids = [part.strip() for part in value.split(",")]
        if not all(ids) or not all(i.isdigit() or i.startswith(("GPU-", "MIG-")) for i in ids):
            raise GemmaSearchError(f"--gpus {value!r} is not `all` or a list of GPU ids like "
                                   "0,1,3")
        if len(set(ids)) != len(ids):
            raise GemmaSearchError(f"--gpus {value!r} names a GPU twice; one worker per GPU")
        return ids
    if visible is not None and visible.strip():
        return [part.strip() for part in visible.split(",") if part.strip()]
    n = (count or _cuda_device_count)()
    if n == 0:
        raise GemmaSearchError("--gpus all: no CUDA GPU is visible on this machine; use "
                               "--workers N to run N CPU workers")
    return [str(i) for i in range(n)]


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class Slot:
    """One place for a worker: its index (sampler seed offset) and GPU, and its child now."""

    index: int
    gpu: str | None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    crashes: int = 0
    restart_at: float | None = None
    state: str = "starting"
    """starting, running, waiting (to restart), done, given_up, stopped, config_error."""
    restarts: int = 0
    last_code: int | None = None

    @property
    def label(self) -> str:
        return f"worker {self.index}" + (f" (GPU {self.gpu})" if self.gpu is not None else "")


class Supervisor:
    """Start, watch and restart the children of one `launch`."""

    def __init__(self, name: str, url: str, slots: Sequence[Slot], *, threads: int,
                 max_restarts: int = 5, base_delay: float = 2.0,
                 say: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.slots = list(slots)
        self.max_restarts = max_restarts
        self.base_delay = base_delay
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.stopping = 0
        self.config_error = False  # a child stopped on one, and the others were stopped
        env = dict(os.environ)
        env[STORAGE_ENV] = url
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._env = env

    def start(self, slot: Slot) -> None:
        env = dict(self._env)
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        slot.proc = subprocess.Popen(
            [sys.executable, "-m", "gemma_search", "worker", self.name, "--index",
             str(slot.index)], env=env, start_new_session=True)
        slot.started = time.monotonic()
        slot.state, slot.restart_at = "running", None

    def step(self) -> None:
        """Collect children that exited; restart crashed ones whose backoff has passed."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "waiting" and slot.restart_at is not None and now >= slot.restart_at:
                if self.stopping:
                    slot.state = "stopped"
                    continue
                slot.restarts += 1
                self.start(slot)
                self.say(f"{slot.label}: restarted (pid {slot.proc.pid if slot.proc else '?'}, "
                         f"restart {slot.restarts})")
                continue
            if slot.state != "running" or slot.proc is None or slot.proc.poll() is None:
                continue
            code = slot.proc.returncode
            slot.last_code = code
            if code == 0:
                slot.state = "done"
            elif code == CONFIG_ERROR_EXIT:
                self._config_error(slot)
            elif self.stopping:
                slot.state = "stopped"
            else:
                self._crashed(slot, code, now)

    def _config_error(self, slot: Slot) -> None:
        slot.state = "config_error"
        if self.config_error:  # the others meet the same error as they load
            self.say(f"{slot.label}: stopped on a configuration error too (exit code "
                     f"{CONFIG_ERROR_EXIT})")
            return
        self.config_error = True
        self.say(f"{slot.label}: stopped on a configuration error (exit code "
                 f"{CONFIG_ERROR_EXIT}; its error is above), which a restart would meet "
                 "again; not restarting it, and stopping the other workers")
        if not self.stopping:
            self.stop()

    def _crashed(self, slot: Slot, code: int, now: float) -> None:
        if now - slot.started >= STABLE_SECONDS:
            slot.crashes = 0
        slot.crashes += 1
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        if slot.crashes > self.max_restarts:
            slot.state = "given_up"
            in_a_row = "once" if slot.crashes == 1 else f"{slot.crashes} times in a row"
            self.say(f"{slot.label}: crashed {in_a_row} (last: {how}); "
                     "giving up on it, the other workers go on. See its output above; "
                     f"`gemma-search worker {self.name}` runs one by hand")
            return
        delay = restart_delay(slot.crashes, self.base_delay)
        slot.state, slot.restart_at = "waiting", now + delay
        self.say(f"{slot.label}: crashed ({how}); restarting in {delay:.0f} s "
                 f"(crash {slot.crashes} of {self.max_restarts} allowed in a row)")

    def stop(self) -> None:
        """Ask every live child to checkpoint and exit (a second call: to exit at once)."""
        self.stopping += 1
        for slot in self.slots:
            if slot.state == "waiting":
                slot.state = "stopped"
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)

    @property
    def active(self) -> bool:
        return any(s.state in ("running", "waiting", "starting") for s in self.slots)

    def exit_code(self) -> int:
        """0 when every child finished the study; `CONFIG_ERROR_EXIT` when one stopped on a
        configuration error; else the worst code seen, or 1."""
        if self.config_error:
            return CONFIG_ERROR_EXIT
        if all(s.state == "done" for s in self.slots):
            return 0
        codes = [s.last_code for s in self.slots if s.last_code not in (None, 0)]
        return max((abs(c) for c in codes if c is not None), default=1)


def launch(name: str, url: str, *, workers: int | None = None, gpus: list[str] | None = None,
           threads_per_worker: int | None = None, max_restarts: int = 5,
           base_delay: float = 2.0, poll: Callable[[], None] | None = None,
           poll_seconds: float = 1.0, say: Callable[[str], None] | None = None) -> int:
    """Run one supervised worker per GPU (`gpus`) or `workers` CPU workers; return a code
    (`CONFIG_ERROR_EXIT`: a worker stopped on a configuration error, and the others with it).

    `poll` (progress from the storage) runs every `poll_seconds` in a thread of its own; its
    errors are reported, never raised. Raises KeyboardInterrupt after Ctrl-C or SIGTERM, once
    every child has exited.
    """
    slots = ([Slot(i, gpu) for i, gpu in enumerate(gpus)] if gpus
             else [Slot(i, None) for i in range(workers or 1)])
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // len(slots))
    sup = Supervisor(name, url, slots, threads=threads, max_restarts=max_restarts,
                     base_delay=base_delay, say=say)
    poller = None if poll is None else _Poller(poll, poll_seconds, url, sup.say)
    # SIGTERM (a container stop, `kill`) is handled like Ctrl-C: children checkpoint first.
    # Python lets only the main thread set handlers; elsewhere the caller's handling stands.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if main:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for slot in slots:
            sup.start(slot)
        if poller is not None:
            poller.start()
        while sup.active:
            try:
                sup.step()
                time.sleep(poll_seconds)
            except KeyboardInterrupt:
                sup.stop()
        sup.step()
    except BaseException:
        # `launch` itself failed (a bug): its children stop with it, as on Ctrl-C, rather
        # than run on without a supervisor (parent pid 1, no restarts, no signals).
        _stop_children(sup)
        raise
    finally:
        if poller is not None:
            poller.finish()
        if main:
            signal.signal(signal.SIGTERM, previous)
    if sup.stopping and not sup.config_error:
        raise KeyboardInterrupt
    return sup.exit_code()


class _Poller(threading.Thread):
    """Calls `poll` every `seconds` until `finish`, then once more. An error is one line
    when polling starts to fail and one when it works again, whatever it is: progress is
    for the eye, and the children are what `launch` is for."""

    def __init__(self, poll: Callable[[], None], seconds: float, url: str,
                 say: Callable[[str], None]) -> None:
        super().__init__(name="gs-launch-progress", daemon=True)
        self._poll, self._seconds, self._url, self._say = poll, seconds, url, say
        self._done = threading.Event()
        self._failing_since: float | None = None

    def run(self) -> None:
        while True:
            self._once()
            if self._done.wait(self._seconds):
                return

    def finish(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(timeout=self._seconds + 30)
        if not self.is_alive():  # else it is stuck on a host that does not answer
            self._once()

    def _once(self) -> None:
        try:
            self._poll()
        except Exception as exc:
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                why = redact_text(cause_line(exc), self._url)
                self._say(f"progress: cannot read the study ({why}); the workers go on, "
                          "retrying")
            return
        if self._failing_since is not None:
            self._say(f"progress: the study can be read again (after "
                      f"{time.monotonic() - self._failing_since:.0f} s)")
            self._failing_since = None


def _stop_children(sup: Supervisor) -> None:
    """SIGTERM to every live child (each checkpoints and re-queues its trial), a second one
    after `STOP_SECONDS`, then SIGKILL: no child outlives a failed `launch`."""
    for last_resort in (False, True):
        sup.stop()
        deadline = time.monotonic() + (10.0 if last_resort else STOP_SECONDS)
        for slot in sup.slots:
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if last_resort:
                    slot.proc.kill()
                    slot.proc.wait()
        if all(s.proc is None or s.proc.poll() is not None for s in sup.slots):
            return


@dataclass(frozen=True)
class Outcome:
    """How a study stands once its workers are done: `launch`'s last line and exit code."""

    ok: bool
    """Every planned trial finished, complete or pruned."""
    line: str
    failed: int = 0
    """Trials that failed for good (not re-queued)."""
    unfinished: int = 0
    """Trials waiting, running or not started."""


def outcome(name: str, trials: Sequence[Any], planned: int, *, verifying: bool = False,
            pausing: bool = False) -> Outcome:
    """Count the study's trials as its budget does (a failed trial that was re-queued counts
    through its retry, once): complete, pruned, failed (with the first failures' numbers and
    reasons), waiting, running, and not started (`planned` less every trial there is).

    `verifying`: a verify companion, whose plan is its enqueued re-runs; else the search
    study, whose re-runs kept by an earlier version (tagged `verify_of`) are left out.
    `pausing`: trials pause at rungs (`pruner.pause`). Paused trials count as done, as pruned
    ones do, and workers stop when the token budget leaves no promotion or new trial: the
    trials not started then were never going to be.
    """
    from optuna.trial import TrialState

    from gemma_search.ranking import is_verification
    from gemma_search.reads import count_states

    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    counted = [t for t in trials if is_verification(t) == verifying
               and not (t.state == TrialState.FAIL and t.number in retried)]
    counts = count_states(counted)  # a paused trial counts as paused, not as waiting
    complete, pruned, paused = counts["complete"], counts["pruned"], counts["paused"]
    waiting, running = counts["waiting"], counts["running"]
    failed = [t for t in counted if t.state == TrialState.FAIL]
    not_started = 0 if pausing else max(0, planned - len(counted))
    if not failed and not waiting and not running and not not_started:
        if pausing:
            return Outcome(True, f"study {name}: {complete + paused + pruned} trials done "
                                 f"({complete} complete, {paused} paused at a rung)")
        return Outcome(True, f"study {name}: {complete + pruned} of {planned} trials done "
                             f"({complete} complete, {pruned} pruned)")
    parts = [f"{complete} complete"] + ([f"{pruned} pruned"] if pruned else []) + (
        [f"{paused} paused"] if paused else [])
    if failed:
        reasons = "; ".join(f"trial {t.number}: {_reason(t)}" for t in failed[:3])
        more = f"; {len(failed) - 3} more" if len(failed) > 3 else ""
        parts.append(f"{len(failed)} failed ({reasons}{more})")
    parts += [f"{n} {what}" for n, what in ((waiting, "waiting"), (running, "running"),
                                            (not_started, "not started")) if n]
    return Outcome(False, f"study {name}: " + ", ".join(parts), len(failed),
                   waiting + running + not_started)


def _reason(trial: Any) -> str:
    reason = trial.user_attrs.get("fail_reason") or "no reason recorded"
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt
