"""`gemma-search dashboard`: a real chromium opens the study page and sees its trials and plot.

The browser is Debian's chromium (apt), driven by Playwright for Python; nothing is downloaded.
Without chromium or playwright the browser test skips, and in CI (`CI=true`) it fails.
`GEMMA_SEARCH_SAVE_SCREENSHOTS=1` also copies the screenshot to docs/img/dashboard.png.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from typer.testing import CliRunner

from gemma_search.cli import app

from .conftest import REPO, demo_spec_text

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
STUDY = "dash"
N_TRIALS = 8
#: First validation loss of each trial: uneven, so the best-so-far line has steps.
STARTS = [0.74, 0.80, 0.86, 0.69, 0.77, 0.90, 0.64, 0.72]
LINK = re.compile(r"open (http://\S+/dashboard/\S*)")


def need_browser() -> None:
    """Skip without chromium or playwright; in CI their absence is a failure."""
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if not missing:
        return
    reason = "the dashboard browser test needs " + " and ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; in CI it must run (.ci/run installs chromium)")
    pytest.skip(reason)


def make_study(url: str) -> None:
    """A finished study without training: the stored spec, then trials added through Optuna.

    Paths in the spec need not exist: `create_study` stores the spec, only `create` (the
    command) reads data, and nothing here loads a model.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from gemma_search.spec import spec_from_text
    from gemma_search.study import create_study

    missing = Path("/nonexistent")
    spec = spec_from_text(demo_spec_text(STUDY, missing / "model", missing / "train.jsonl",
                                         missing / "validation.jsonl"))
    study = create_study(spec, url)
    study.set_metric_names([spec.objective.metric])  # the plots' axis says val_loss
    distributions = {"learning_rate": FloatDistribution(1.0e-4, 3.0e-2, log=True),
                     "optimizer": CategoricalDistribution(["adamw", "sgd"]),
                     "lora_r": CategoricalDistribution([4, 8])}
    for number in range(N_TRIALS):
        pruned = number % 3 == 2
        start = STARTS[number]
        steps = 2 if pruned else 8
        curve = {step: start * (0.45 + 0.55 * 0.7 ** step) + (0.1 if pruned else 0.0)
                 for step in range(1, steps + 1)}
        study.add_trial(create_trial(
            params={"learning_rate": 1.0e-4 * 1.9 ** number,
                    "optimizer": ["adamw", "sgd"][number % 2], "lora_r": [4, 8][number // 4]},
            distributions=distributions, intermediate_values=curve,
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            value=None if pruned else min(curve.values())))


class Dashboard:
    """`gemma-search dashboard` in a subprocess, its output read by threads as it comes."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gemma_search", "dashboard", STUDY, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.out: list[str] = []
        self.err: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    def _read(self, stream: IO[str], sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            self._lines.put(line)

    def wait_for(self, pattern: re.Pattern[str], lines: list[str],
                 timeout: float = 30.0) -> re.Match[str]:
        """The first match of `pattern` in `lines` (self.out or self.err) as they arrive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = pattern.search("".join(lines))
            if found:
                return found
            if self.proc.poll() is not None and self._lines.empty():
                break
            with contextlib.suppress(queue.Empty):
                self._lines.get(timeout=0.2)
        pytest.fail(f"no {pattern.pattern!r} (exit {self.proc.poll()}): {self.output()}")

    def link(self) -> str:
        """The address the command printed once it listens."""
        return self.wait_for(LINK, self.out).group(1)

    def output(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def interrupt(self) -> int:
        """Ctrl-C, as a person stops it; the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=15)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def study_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('dashboard') / 'study.db'}"
    make_study(url)
    return url


@pytest.fixture
def dashboard(study_url: str) -> Iterator[Callable[..., Dashboard]]:
    """Start dashboards with `dashboard(*args)`; every one is killed after the test."""
    started: list[Dashboard] = []

    def start(*args: str) -> Dashboard:
        started.append(Dashboard("--storage", study_url, *args))
        return started[-1]

    try:
        yield start
    finally:
        for one in started:
            one.kill()


def test_browser_shows_trials_and_history_plot(dashboard: Callable[..., Dashboard], tmp_path: Path,
                                               study_url: str) -> None:
    need_browser()
    from playwright.sync_api import sync_playwright

    server = dashboard("--port", "0")
    link = server.link()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/dashboard/studies/1", link), link
    assert study_url not in server.output() and "sqlite" not in server.output()
    assert "warning" not in server.output()  # loopback: nothing to warn about

    shot = tmp_path / "dashboard.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                    timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # (b) the optimization history: a plotly plot in the "History" card, with a
            # marker for each completed trial.
            page.goto(link)
            history = page.locator(".MuiCard-root", has=page.get_by_role(
                "heading", name="History", exact=True))
            points = history.locator(".js-plotly-plot .scatterlayer .point")
            points.first.wait_for(timeout=30_000)
            complete = N_TRIALS - sum(n % 3 == 2 for n in range(N_TRIALS))
            assert points.count() >= complete
            assert history.locator(".main-svg").count() > 0
            page.wait_for_timeout(500)  # let plotly finish its other plots for the picture
            page.screenshot(path=str(shot))
            # (a) the trials list names every trial and shows the pruned ones.
            page.goto(f"{link}/trials")
            page.get_by_text(f"Trial {N_TRIALS - 1}", exact=True).first.wait_for(timeout=30_000)
            text = page.locator("body").inner_text()
        finally:
            browser.close()
    for number in range(N_TRIALS):
        assert re.search(rf"\bTrial {number}\b", text), text[:2000]
    assert "Pruned" in text and "Complete" in text
    assert shot.stat().st_size > 10_000
    if os.environ.get("GEMMA_SEARCH_SAVE_SCREENSHOTS") == "1":
        target = REPO / "docs" / "img" / "dashboard.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    assert server.interrupt() == 0, server.output()


def test_public_host_warns_and_ctrl_c_exits_0(dashboard: Callable[..., Dashboard]) -> None:
    server = dashboard("--host", "0.0.0.0", "--port", "0")
    link = server.link()
    assert link.startswith(f"http://{socket.gethostname()}:")
    warning = server.wait_for(re.compile(r"^warning: .*$", re.M), server.err).group(0)
    assert "no authentication" in warning and "ssh -L" in warning, warning
    assert server.interrupt() == 0, server.output()
    assert "Traceback" not in server.output()


runner = CliRunner()


def assert_one_line_error(args: list[str], *fragments: str) -> str:
    result = runner.invoke(app, ["dashboard", *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_unknown_study_is_one_line(study_url: str) -> None:
    assert_one_line_error(["nope", "--storage", study_url], "study 'nope' does not exist",
                          f"studies there: {STUDY}")


def test_port_in_use_is_one_line(study_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error([STUDY, "--storage", study_url, "--port", str(port)],
                              f"port {port}", "already in use", "--port")


def test_storage_password_is_never_printed() -> None:
    line = assert_one_line_error(
        [STUDY, "--storage", "postgresql+psycopg2://gemma:s3cret-pw@127.0.0.1:1/gemma"],
        "cannot connect to storage", "gemma:***@127.0.0.1")
    assert "s3cret-pw" not in line


def test_public_host_warning() -> None:
    from gemma_search.dashboard import dashboard_link, public_host_warning

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert public_host_warning(host) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "head-node"):
        assert "no authentication" in (public_host_warning(host, 8081) or "")
    assert "ssh -L 8081:127.0.0.1:8081" in (public_host_warning("0.0.0.0", 8081) or "")
    assert dashboard_link("::1", 8080, 3) == "http://[::1]:8080/dashboard/studies/3"
    assert dashboard_link("127.0.0.1", 80, None) == "http://127.0.0.1:80/dashboard/"
