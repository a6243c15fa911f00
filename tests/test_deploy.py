"""docker/: the compose, Kubernetes and SLURM files, checked with no Docker engine.

What can be checked here is: every YAML parses; compose references resolve (Kubernetes:
tests/test_k8s.py; the image and its build context: tests/test_image.py); GPUs and worker
indexes are wired as design decision 12 says; every `gemma-search` command these files and
README.md run exists with the options they pass; no password is committed; and the two shell
wrappers (the SLURM batch script, the Kubernetes worker) give the worker exactly one SIGTERM
and exit as SLURM and the Job controller need.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from gemma_search.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
SBATCH = DOCKER / "slurm" / "workers.sbatch"
LAUNCH_DOC = REPO / "README.md"
STUDIES = REPO / "gemma_search" / "studies"  # each opens with the commands that run it
GRACE_SECONDS = 120  # a worker needs one optimizer step and a checkpoint after SIGTERM


# --- helpers -------------------------------------------------------------------------------

def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in _k8s_docs()
             if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} manifests"
    return found[0]


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for filename, doc in _k8s_docs():
        if doc["kind"] in ("Job", "Deployment"):
            yield f"{filename}:{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _uses_our_image(service: dict[str, Any]) -> bool:
    return "build" in service


def _duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} as its default; ${VAR} and ${VAR:?message} as VAR."""
    text = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", text)
    return re.sub(r"\$\{(\w+)[^}]*\}", r"\1", text)


def _argv(text: str) -> list[str]:
    """Shell words up to the first operator (| ; & > ...) or comment."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    try:
        for word in lexer:
            if set(word) <= set(";&|()<>"):
                break
            words.append(word)
    except ValueError:  # an unclosed quote: what came before still counts
        pass
    return words


def _tracked_or_new(*paths: str) -> list[Path]:
    """Files git would commit (tracked, or new and not ignored); every file without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *paths],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [REPO / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        files = [p for path in paths for p in ((REPO / path).rglob("*")
                                                if (REPO / path).is_dir() else [REPO / path])]
    return [f for f in files if f.is_file()]


# --- every `gemma-search ...` the files run ------------------------------------------------

#: `gemma-search` where a shell command starts (not in prose: "the gemma-search image").
COMMAND_START = re.compile(
    r"(?:^|[;&|(]|\b(?:exec|until|while|if|then|do|time)\s|\s--\s)\s*gemma-search[ \t]+"
    r"(?=[a-z])(?P<rest>.*)")
DOCKER_RUN = re.compile(r"\bdocker run\b.*?\sgemma-search(?::\S+)?\s+(?P<rest>[a-z].*)")
COMPOSE_RUN = re.compile(r"\bdocker compose\b.*?\brun((?:\s+-[-\w]+)*)\s+(?P<service>[\w-]+)"
                         r"(?P<rest>.*)")


def _shell_lines(text: str) -> Iterator[str]:
    """Lines with backslash continuations joined (in comments too: `#   a \\ #   b`)."""
    pending = ""
    for line in text.splitlines():
        if pending.lstrip().startswith("#"):
            line = re.sub(r"^\s*#", "", line)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield pending + line
        pending = ""


def _code_in(path: Path) -> Iterator[str]:
    """The parts of a file that are commands rather than prose.

    Markdown: fenced blocks and inline code. Other files: inline code in comments, comment
    lines indented as examples (`#   gemma-search ...`), and non-comment lines.
    """
    text = path.read_text()
    yield from (m.group(1) for m in re.finditer(r"`([^`\n]+)`", text))
    if path.suffix == ".md":
        for block in re.findall(r"^\s*```[^\n]*\n(.*?)^\s*```", text, re.M | re.S):
            yield from (re.sub(r"^\s*", "", line) for line in _shell_lines(block))
        return
    for line in _shell_lines(text):
        example = re.match(r"\s*#\s{2,}(.*)", line)
        if example:
            yield example.group(1)
        elif not line.lstrip().startswith("#") and path.suffix not in (".yaml", ".yml"):
            yield line


def _invocations() -> list[tuple[str, list[str]]]:
    """(where, argv after `gemma-search`) for every command the deploy files run."""
    found: list[tuple[str, list[str]]] = []
    services = _compose()["services"]
    ours = {name for name, svc in services.items() if _uses_our_image(svc)}
    for name in sorted(ours):
        command = services[name].get("command", [])
        argv = command if isinstance(command, list) else _argv(_interpolate(command))
        if argv != ["--help"]:
            found.append((f"compose.yaml:{name}", argv))
    for where, pod in _pod_specs():
        for c in _containers(pod):
            command = c.get("command")
            if command is None:  # the image's ENTRYPOINT: gemma-search
                found.append((f"{where}:{c['name']}", c["args"]))
            elif command[:2] == ["sh", "-c"]:
                for line in command[2].splitlines():
                    for m in COMMAND_START.finditer(line):
                        found.append((f"{where}:{c['name']}", _argv(m.group("rest"))))
    files = [DOCKER / "Dockerfile", SBATCH, LAUNCH_DOC, DOCKER / "compose.yaml",
             *sorted(K8S.glob("*.yaml")), *sorted(STUDIES.glob("*.yaml"))]
    for path in files:
        for code in _code_in(path):
            if code.startswith("gemma-search "):
                found.append((path.name, _argv(code.split("`")[0][len("gemma-search "):])))
                continue
            for m in COMMAND_START.finditer(code):
                found.append((path.name, _argv(m.group("rest").split("`")[0])))
            run = COMPOSE_RUN.search(code)
            if run and run.group("service") in ours:
                found.append((path.name, _argv(run.group("rest"))))
            run = DOCKER_RUN.search(code)
            if run:
                found.append((path.name, _argv(run.group("rest"))))
    return found


def _check_invocation(argv: list[str]) -> str | None:
    """Why `gemma-search ARGV` would be refused by the CLI, or None."""
    root: Any = typer.main.get_command(app)  # a click Group (typer may vendor click)
    if not argv:
        return "no command"
    command = root.commands.get(argv[0])
    rest = argv[1:]
    if command is None:
        return f"{argv[0]!r} is not a command (commands: {sorted(root.commands)})"
    if hasattr(command, "commands"):  # a group: `db upgrade`
        if not rest or rest[0] not in command.commands:
            return f"{argv[0]} has no subcommand {rest[:1]} (has {sorted(command.commands)})"
        command, rest = command.commands[rest[0]], rest[1:]
    options = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    unknown = [w for w in rest if w.startswith("--") and w.split("=")[0] not in options]
    return f"{command.name} has no option {unknown} (has {sorted(options)})" if unknown else None


def test_every_gemma_search_command_in_the_deploy_files_exists() -> None:
    invocations = _invocations()
    names = {" ".join(argv[:2]) if argv[:1] == ["db"] else argv[0]
             for _, argv in invocations if argv}
    # The extraction itself: each of these is run somewhere in docker/ or README.md.
    assert {"worker", "launch", "dashboard", "db upgrade", "create", "status",
            "export"} <= names, names
    problems = [f"{where}: gemma-search {' '.join(argv)}: {why}"
                for where, argv in invocations if (why := _check_invocation(argv))]
    assert not problems, "\n".join(problems)


def test_every_spec_the_deploy_files_create_from_is_found() -> None:
    """`create SPEC` here and in the shipped studies' headers: a shipped study's name (found
    in the installed package, from any folder), or a path of the user's; never the
    checkout's old studies/ folder."""
    from gemma_search.spec import shipped_studies

    env = dict(re.findall(r"^(\w+)=(\S*)$", (DOCKER / ".env.example").read_text(), re.M))
    specs = [(where, argv[1]) for where, argv in _invocations()
             if argv[:1] == ["create"] and len(argv) > 1 and not argv[1].isupper()]  # SPEC
    specs.append((".env.example", env["SPEC"]))
    assert any(where.startswith("compose.yaml") for where, _ in specs), specs
    assert len(specs) >= 5, specs
    for where, spec in specs:
        assert not spec.startswith("studies/"), (where, spec)
        if "/" not in spec and not spec.endswith(".yaml"):
            assert spec in shipped_studies(), (where, spec)


def test_command_check_catches_typos() -> None:
    assert _check_invocation(["wrker", "s"]) is not None
    assert _check_invocation(["worker", "s", "--idx", "1"]) is not None
    assert _check_invocation(["db", "upgrad"]) is not None
    assert _check_invocation(["worker", "s", "--index", "1"]) is None
    assert _check_invocation(["db", "upgrade"]) is None


# --- YAML, compose ---------------------------------------------------------------------------

def test_every_yaml_under_docker_parses() -> None:
    paths = sorted([*DOCKER.rglob("*.yaml"), *DOCKER.rglob("*.yml")])
    assert DOCKER / "compose.yaml" in paths and K8S / "workers-job.yaml" in paths
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_compose_references_resolve() -> None:
    compose = _compose()
    services = compose["services"]
    volumes, secrets = set(compose.get("volumes") or {}), set(compose.get("secrets") or {})
    for name, svc in services.items():
        assert set(svc.get("depends_on") or {}) <= set(services), name
        assert set(svc.get("secrets") or []) <= secrets, name
        for mount in svc.get("volumes") or []:
            source = _interpolate(mount).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name}: volume {source!r} is not declared"
    for name, secret in compose["secrets"].items():
        example = DOCKER / f"{secret['file']}.example"
        assert example.is_file(), f"secret {name}: commit {example.name} to show its format"


def test_compose_start_order() -> None:
    services = _compose()["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    done = "service_completed_successfully"
    assert services["create"]["depends_on"]["migrate"]["condition"] == done
    for name in ("worker", "dashboard"):
        assert services[name]["depends_on"]["create"]["condition"] == done, name


def test_compose_worker_has_every_gpu_one_worker_each() -> None:
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert [d["driver"] for d in devices] == ["nvidia"]
    assert "gpu" in devices[0]["capabilities"]
    # Replicas of a one-GPU container would all get the first GPU (docker/compose#11863)
    # and could not tell their --index apart: one container, `launch --gpus`, one child per GPU.
    assert worker["deploy"].get("replicas", 1) == 1
    assert devices[0]["count"] == "all"
    argv = _argv(_interpolate(worker["command"]))
    assert argv[0] == "launch" and "--gpus" in argv
    assert _duration_seconds(worker["stop_grace_period"]) >= GRACE_SECONDS
    # exit 0: budget spent, stay down; a bounded number of restarts: a configuration error
    # stops `launch` too, and restarting it for ever would reload the model for ever
    assert worker["restart"] == "on-failure:3"


def test_compose_storage_url_only_from_a_secret_file() -> None:
    for name, svc in _compose()["services"].items():
        if not _uses_our_image(svc):
            continue
        env = svc["environment"]
        assert "GEMMA_SEARCH_STORAGE" not in env, name
        path = env["GEMMA_SEARCH_STORAGE_FILE"]
        assert path.startswith("/run/secrets/") and path.rsplit("/", 1)[1] in svc["secrets"]
    postgres = _compose()["services"]["postgres"]["environment"]
    assert "POSTGRES_PASSWORD" not in postgres and "POSTGRES_PASSWORD_FILE" in postgres


def test_compose_workers_see_what_create_checked() -> None:
    services = _compose()["services"]
    create, worker = services["create"], services["worker"]

    def mounts(svc: dict[str, Any]) -> dict[str, str]:
        pairs = [_interpolate(m).split(":") for m in svc["volumes"]]
        return {target: source for source, target, *_ in pairs}

    for target in ("/data", "/checkpoints"):
        assert mounts(create)[target] == mounts(worker)[target], target
    argv = _argv(_interpolate(create["command"]))
    assert "checkpoints.dir=/checkpoints" in argv
    assert worker["environment"]["HF_TOKEN_PATH"].startswith("/run/secrets/")
    assert mounts(worker)["/cache/huggingface"] == "hf-cache"


def test_compose_publishes_on_loopback_only() -> None:
    for name, svc in _compose()["services"].items():
        for port in svc.get("ports") or []:
            host = _interpolate(port)
            assert host.startswith("127.0.0.1:"), f"{name} publishes {port}"


def test_compose_services_are_the_ones_readme_runs() -> None:
    """README.md's compose steps: PostgreSQL, `db upgrade`, `create`, the dashboard, the
    worker, and the `cli` tool; every service its commands name is one of them."""
    services = set(_compose()["services"])
    assert services == {"postgres", "migrate", "create", "dashboard", "worker", "cli"}
    readme = LAUNCH_DOC.read_text()
    section = readme[readme.index("## Launch with docker compose"):
                     readme.index("## Launch on Kubernetes")]
    named = re.findall(r"docker compose (?:run|logs|stop|up|start|restart)((?:[ \t]+-[-\w]+)*)"
                       r"[ \t]+([a-z][\w-]*)", section)
    assert {service for _, service in named} >= {"cli", "worker", "dashboard"}, named
    assert {service for _, service in named} <= services, named


def test_compose_healthchecks_and_build_hold() -> None:
    """A `service_healthy` dependency has a healthcheck to pass; a one-shot that others wait
    to complete is never restarted; every service that builds, builds docker/Dockerfile from
    the repository root, where .dockerignore is read."""
    services = _compose()["services"]
    for name, svc in services.items():
        for dep, how in (svc.get("depends_on") or {}).items():
            condition = how["condition"]
            if condition == "service_healthy":
                check = services[dep]["healthcheck"]
                assert check["test"][0] in ("CMD", "CMD-SHELL"), (name, dep)
                for key in ("interval", "timeout", "start_period"):
                    assert _duration_seconds(check[key]) > 0, (dep, key)
            else:
                assert condition == "service_completed_successfully", (name, dep, condition)
                assert services[dep]["restart"] == "no", dep
        if _uses_our_image(svc):
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert context == REPO and (context / ".dockerignore").is_file(), name
            assert (context / svc["build"]["dockerfile"]) == DOCKER / "Dockerfile", name


# --- Kubernetes: tests/test_k8s.py (the kustomize render, its schemas, run-time wiring)


# --- secrets ---------------------------------------------------------------------------------

#: user:password@ in a URL. A committed file may only hold a placeholder: an environment or
#: compose variable (${VAR}, $VAR, $(cmd)), printf's %s, ***, or a word in capitals
#: (PASSWORD), as README.md writes it.
URL_PASSWORD = re.compile(r"[a-z][\w+.-]*://[^\s:/@'\"]+:([^\s@/'\"]+)@")
PLACEHOLDER = re.compile(r"\$\{?\w+\}?|\$\(.+\)|%s|\*+|[A-Z][A-Z0-9_]*|<[\w-]+>")


def literal_passwords(text: str) -> list[str]:
    return [p for p in URL_PASSWORD.findall(text) if not PLACEHOLDER.fullmatch(p)]


def test_password_rule() -> None:
    assert literal_passwords("postgresql+psycopg2://gemma:s3cret@db:5432/x") == ["s3cret"]
    assert literal_passwords("url: 'postgresql://u:Hunter2@h/d'") == ["Hunter2"]
    for fine in ("postgresql+psycopg2://gemma:PASSWORD@db-host:5432/gemma_search",
                 "postgresql://gemma:${PGPASSWORD}@db/x", "postgresql://gemma:%s@postgres/x",
                 "postgresql://gemma:***@db/x", "postgresql+psycopg2://postgres@127.0.0.1/t"):
        assert literal_passwords(fine) == [], fine


def test_no_password_is_committed_under_docker() -> None:
    files = _tracked_or_new("docker", "README.md", ".dockerignore")
    assert DOCKER / "compose.yaml" in files and DOCKER / "secrets/storage_url.example" in files
    leaks = {str(f.relative_to(REPO)): found for f in files
             if (found := literal_passwords(f.read_text(errors="replace")))}
    assert not leaks, f"passwords in committed files: {leaks}"


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="not a git checkout")
def test_real_secrets_are_git_ignored() -> None:
    for path in ("docker/.env", "docker/secrets/storage_url", "docker/secrets/hf_token",
                 "docker/secrets/postgres_password"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
    for path in ("docker/.env.example", "docker/secrets/storage_url.example"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 1, path


# --- the shell wrappers, run with a fake worker ----------------------------------------------

FAKE_WORKER = r"""#!/bin/bash
# Stands in for `gemma-search worker`: logs its argv and each SIGTERM; after the first one
# it "checkpoints" for a moment (a second SIGTERM then would show in the log) and exits 0,
# as the real worker does.
echo "argv $*" >> "$FAKE_LOG"
echo "pid $$" >> "$FAKE_LOG"
terms=0
trap 'terms=$((terms + 1)); echo TERM >> "$FAKE_LOG"' TERM
[[ ${FAKE_MODE:-} == budget-spent ]] && exit 0
echo ready >> "$FAKE_LOG"
while (( terms == 0 )); do sleep 0.02; done
sleep 0.3
echo checkpointed >> "$FAKE_LOG"
exit 0
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "gemma-search").write_text(FAKE_WORKER)
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "scontrol $*" >> "$FAKE_LOG"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def _log(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _wait_for(path: Path, line: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 5
    while line not in _log(path):
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {line!r} in {_log(path)}"
        time.sleep(0.02)
    time.sleep(0.1)  # the shell has stored the worker's pid and sits in `wait`


def _start_sbatch(tmp_path: Path, fake_bin: Path, mode: str = "", url_mode: int = 0o600
                  ) -> tuple[subprocess.Popen[str], Path]:
    url_file = tmp_path / "storage_url"
    url_file.write_text("postgresql+psycopg2://gemma:PASSWORD@db/x\n")
    url_file.chmod(url_mode)
    log = tmp_path / "log"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FAKE_LOG": str(log),
           "FAKE_MODE": mode, "GEMMA_SEARCH_VENV": str(fake_bin.parent),
           "GEMMA_SEARCH_STORAGE_FILE": str(url_file), "SLURM_ARRAY_JOB_ID": "77",
           "SLURM_ARRAY_TASK_ID": "3", "SLURM_CPUS_PER_TASK": "4"}
    # The fake scontrol is found through the script's own PATH=$venv/bin:$PATH.
    proc = subprocess.Popen(["bash", str(SBATCH), "sst2-gemma2-9b"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, log


def test_sbatch_is_valid_bash() -> None:
    out = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = SBATCH.read_text()
    for directive in ("--array=", "--gres=gpu:1", "--signal=B:", "--requeue"):
        assert f"#SBATCH {directive}" in text, directive


def test_sbatch_time_limit_gives_one_sigterm_then_requeues(tmp_path: Path, fake_bin: Path
                                                           ) -> None:
    proc, log = _start_sbatch(tmp_path, fake_bin)
    _wait_for(log, "ready", proc)
    early = re.search(r"#SBATCH --signal=B:(\w+)@", SBATCH.read_text())
    assert early, "no #SBATCH --signal=B:SIG@SECONDS"
    proc.send_signal(getattr(signal, f"SIG{early[1]}"))  # what SLURM sends near the limit
    out, err = proc.communicate(timeout=10)
    lines = _log(log)
    assert proc.returncode == 0, err
    assert lines[0] == "argv worker sst2-gemma2-9b --index 3"
    assert lines.count("TERM") == 1 and "checkpointed" in lines, lines
    assert lines[-1] == "scontrol requeue 77_3", lines


def test_sbatch_scancel_term_is_not_passed_on_twice(tmp_path: Path, fake_bin: Path) -> None:
    proc, log = _start_sbatch(tmp_path, fake_bin)
    _wait_for(log, "ready", proc)
    worker_pid = int(next(line for line in _log(log) if line.startswith("pid "))[4:])
    # scancel / preemption: SLURM signals the batch shell and the worker, each once. The
    # shell must not pass its one on: the worker would exit on the second, uncheckpointed.
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.4)
    assert "TERM" not in _log(log)
    os.kill(worker_pid, signal.SIGTERM)
    proc.communicate(timeout=10)
    lines = _log(log)
    assert lines.count("TERM") == 1 and "checkpointed" in lines, lines
    assert not any(line.startswith("scontrol") for line in lines), lines


def test_sbatch_budget_spent_exits_without_requeue(tmp_path: Path, fake_bin: Path) -> None:
    proc, log = _start_sbatch(tmp_path, fake_bin, mode="budget-spent")
    proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert not any(line.startswith("scontrol") for line in _log(log))


def test_sbatch_refuses_a_storage_file_others_can_read(tmp_path: Path, fake_bin: Path) -> None:
    proc, log = _start_sbatch(tmp_path, fake_bin, url_mode=0o644)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1 and "chmod 600" in err
    assert _log(log) == []  # the worker never started


def _start_k8s_worker(tmp_path: Path, fake_bin: Path, mode: str = ""
                      ) -> tuple[subprocess.Popen[str], Path]:
    job = _k8s("Job", "gemma-search-workers")
    (worker,) = [c for c in job["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "worker"]
    log = tmp_path / "log"
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_MODE": mode,
           "STUDY": "sst2-gemma2-9b", "JOB_COMPLETION_INDEX": "5"}
    proc = subprocess.Popen(worker["command"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, log


def test_k8s_worker_told_to_stop_exits_143_after_checkpointing(tmp_path: Path,
                                                                fake_bin: Path) -> None:
    proc, log = _start_k8s_worker(tmp_path, fake_bin)
    _wait_for(log, "ready", proc)
    proc.send_signal(signal.SIGTERM)  # the kubelet signals PID 1 only
    proc.communicate(timeout=10)
    lines = _log(log)
    assert lines[0] == "argv worker sst2-gemma2-9b --index 5"
    assert lines.count("TERM") == 1 and "checkpointed" in lines, lines
    # not 0: an evicted pod's index must not count as complete (podFailurePolicy: Ignore)
    assert proc.returncode == 143
    rules = _k8s("Job", "gemma-search-workers")["spec"]["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and 143 in r.get("onExitCodes", {}).get("values", [])
               for r in rules)


def test_k8s_worker_budget_spent_exits_0(tmp_path: Path, fake_bin: Path) -> None:
    proc, log = _start_k8s_worker(tmp_path, fake_bin, mode="budget-spent")
    proc.communicate(timeout=10)
    assert proc.returncode == 0 and "TERM" not in _log(log)
