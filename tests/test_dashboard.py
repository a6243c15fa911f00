"""`gemma-search dashboard`: a real chromium opens the study page and sees its trials and plot;
off loopback it needs the printed token, and nothing it is sent changes the study.

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
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

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
API = "/api/studies/1"


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


def request(url: str, method: str = "GET", **headers: str) -> tuple[int, str]:
    """(status, body) of one HTTP request; errors are answers here, not exceptions."""
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=b"{}" if method in ("POST", "PUT") else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def trials_in(url: str) -> int:
    """The study's trials as the storage has them (raises if the study is gone)."""
    import optuna

    return len(optuna.load_study(study_name=STUDY, storage=url).trials)


def test_shared_dashboard_needs_its_token_and_changes_nothing(
        dashboard: Callable[..., Dashboard], study_url: str) -> None:
    """Bound to every interface, as `--host 0.0.0.0` on a head node or in a container."""
    need_browser()
    from playwright.sync_api import sync_playwright

    server = dashboard("--host", "0.0.0.0", "--port", "0")
    link = urlsplit(server.link())
    assert link.hostname == socket.gethostname()
    token = re.fullmatch(r"token=([\w-]+)", link.query).group(1)  # type: ignore[union-attr]
    assert len(token) >= 40  # secrets.token_urlsafe(32)
    note = server.wait_for(re.compile(r"^note: .*$", re.M), server.err).group(0)
    assert "read-only" in note and "secret" in note, note
    assert "sqlite" not in server.output()
    # From this machine, by address, as a colleague's browser reaches the head node.
    base = f"http://127.0.0.1:{link.port}"
    page_url = f"{base}{link.path}"

    # Without the token, or with a wrong one: refused, whatever the route and method.
    for url, method, headers in [
            (page_url, "GET", {}), (base + API, "GET", {}),
            (base + API, "DELETE", {}), (f"{page_url}?token={token[:-1]}x", "GET", {}),
            (base + API, "GET", {"Authorization": f"Bearer {token[:-1]}x"}),
            (base + API, "GET", {"Cookie": "gemma_search_dashboard=" + token})]:
        status, body = request(url, method, **headers)
        assert status == 401 and "token" in body, (url, method, status, body)
    # With it, as a script sends it: reads pass, every write is refused.
    bearer = {"Authorization": f"Bearer {token}"}
    status, body = request(base + API, **bearer)
    assert status == 200 and '"trials"' in body
    for path, method in [(API, "DELETE"), ("/api/studies", "POST"),
                         (f"{API}/rename", "POST"), (f"{API}/note", "PUT"),
                         ("/api/trials/1/user-attrs", "POST")]:
        status, body = request(base + path, method, **bearer)
        assert status == 405 and "read-only" in body, (path, method, status, body)
    assert trials_in(study_url) == N_TRIALS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                    timeout=60_000)
        try:
            # The printed link clicked on another site's page (a chat, a mail): the token
            # becomes a cookie and leaves the address bar.
            page = browser.new_page()
            page.set_content(f'<a href="{page_url}?token={token}">the study</a>')
            page.click("a")
            page.wait_for_url(page_url, timeout=30_000)
            history = page.locator(".MuiCard-root", has=page.get_by_role(
                "heading", name="History", exact=True))
            history.locator(".js-plotly-plot .scatterlayer .point").first.wait_for(
                timeout=30_000)
            assert "token" not in page.url
            (cookie,) = page.context.cookies()
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            # The browser's cookie opens the API, and a DELETE with it is still refused.
            assert page.request.get(base + API).status == 200
            deleted = page.request.delete(base + API)
            assert deleted.status == 405, deleted.text()
            # A browser without the cookie gets no page.
            stranger = browser.new_page()
            answer = stranger.goto(page_url)
            assert answer is not None and answer.status == 401
        finally:
            browser.close()
    assert trials_in(study_url) == N_TRIALS
    assert server.interrupt() == 0, server.output()
    assert "Traceback" not in server.output()


def test_loopback_refuses_other_host_names_and_cross_site_writes(
        dashboard: Callable[..., Dashboard], study_url: str) -> None:
    """Without a token the UI may delete studies: only loopback names and same-site pages."""
    server = dashboard("--port", "0")
    base = f"http://127.0.0.1:{urlsplit(server.link()).port}"
    assert request(base + API)[0] == 200
    # DNS rebinding: a page of attacker.example whose name now points at 127.0.0.1.
    status, body = request(base + API, Host="attacker.example")
    assert status == 403 and "loopback" in body
    status, _ = request(base + API, "DELETE", Origin="http://attacker.example")
    assert status == 403
    assert trials_in(study_url) == N_TRIALS
    assert request(base + API, Host="localhost:9000")[0] == 200  # ssh -L 9000:127.0.0.1:...
    assert server.interrupt() == 0, server.output()


def test_answers_are_gzipped_for_a_client_that_accepts_it(
        dashboard: Callable[..., Dashboard]) -> None:
    """The study page's trials travel compressed to a browser, unchanged once unpacked, and
    plain to a client that does not ask for gzip."""
    import gzip
    import json

    from gemma_search.dashboard import accepts_gzip

    server = dashboard("--port", "0")
    base = f"http://127.0.0.1:{urlsplit(server.link()).port}"

    def get(**headers: str) -> tuple[dict[str, str], bytes]:
        req = urllib.request.Request(base + API, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as answer:
            return dict(answer.headers), answer.read()

    plain_headers, plain = get()
    assert "Content-Encoding" not in plain_headers
    packed_headers, packed = get(**{"Accept-Encoding": "br, gzip;q=0.8"})
    assert packed_headers["Content-Encoding"] == "gzip"
    assert int(packed_headers["Content-Length"]) == len(packed) < len(plain) / 3
    assert json.loads(gzip.decompress(packed))["trials"] == json.loads(plain)["trials"]
    assert len(json.loads(plain)["trials"]) == N_TRIALS
    refused_headers, _ = get(**{"Accept-Encoding": "gzip;q=0"})
    assert "Content-Encoding" not in refused_headers
    assert [accepts_gzip(h) for h in ("gzip", "deflate, GZIP", "*", "br", "", "gzip;q=0.0",
                                      "identity")] == [True, True, True, False, False, False,
                                                       False]
    assert server.interrupt() == 0, server.output()


def test_token_file_and_read_only_on_loopback(dashboard: Callable[..., Dashboard],
                                              study_url: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a-token-from-a-file-0123456789\n")
    server = dashboard("--port", "0", "--read-only", "--token-file", str(token_file))
    link = urlsplit(server.link())
    assert link.query == ""  # the token stays in its file, out of the terminal and logs
    assert "a-token-from-a-file" not in server.output()
    assert str(token_file) in server.wait_for(re.compile(r"^note: .*$", re.M), server.err)[0]
    base = f"http://127.0.0.1:{link.port}"
    assert request(base + API)[0] == 401
    bearer = {"Authorization": "Bearer a-token-from-a-file-0123456789"}
    assert request(base + API, **bearer)[0] == 200
    assert request(base + API, "DELETE", **bearer)[0] == 405
    assert trials_in(study_url) == N_TRIALS
    assert server.interrupt() == 0, server.output()


def test_read_only_storage_refuses_writes(study_url: str) -> None:
    from gemma_search.dashboard import ReadOnlyStorage
    from gemma_search.errors import GemmaSearchError
    from gemma_search.storage import open_storage

    storage = open_storage(study_url, must_exist=True)
    read_only = ReadOnlyStorage(storage)
    study_id = read_only.get_study_id_from_name(STUDY)
    assert len(read_only.get_all_trials(study_id)) == N_TRIALS
    assert read_only.get_best_trial(study_id).number == 6
    for write in (lambda: read_only.delete_study(study_id),
                  lambda: read_only.set_study_user_attr(study_id, "k", 1),
                  lambda: read_only.create_new_trial(study_id)):
        with pytest.raises(GemmaSearchError, match="read-only"):
            write()
    assert trials_in(study_url) == N_TRIALS
    storage.engine.dispose()


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


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"), ("short\n", "at least 16"), ("", "holds 0 characters")])
def test_bad_token_file_is_one_line(study_url: str, tmp_path: Path, content: str | None,
                                    fragment: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    assert_one_line_error([STUDY, "--storage", study_url, "--token-file", str(path)],
                          f"--token-file {path}", fragment)


def test_access_rules_and_links() -> None:
    from gemma_search.dashboard import access_for, dashboard_link, is_loopback, sharing_note

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
        access = access_for(host)
        assert access.token is None and not access.read_only
        assert sharing_note(host, access) is None
    assert access_for("127.0.0.1", read_only=True).read_only
    for host in ("0.0.0.0", "::", "10.1.2.3", "head-node"):
        assert not is_loopback(host)
        access = access_for(host)
        assert access.read_only and access.token and len(access.token) >= 40
        assert "read-only" in (sharing_note(host, access) or "")
    assert access_for("0.0.0.0").token != access_for("0.0.0.0").token
    assert dashboard_link("::1", 8080, 3) == "http://[::1]:8080/dashboard/studies/3"
    assert dashboard_link("127.0.0.1", 80, None) == "http://127.0.0.1:80/dashboard/"
    assert (dashboard_link("10.1.2.3", 80, 1, "a-b_c")
            == "http://10.1.2.3:80/dashboard/studies/1?token=a-b_c")
