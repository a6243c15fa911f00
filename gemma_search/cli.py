"""gemma-search: hyperparameter search for LoRA fine-tuning of Gemma 2.

    gemma-search demo                                   # the whole flow on CPU, ~2 minutes
    gemma-search studies                                # the shipped studies, to run or copy
    gemma-search create sst2_gemma2_9b                  # validate a spec, create the study
    gemma-search launch sst2-gemma2-9b --gpus all       # one supervised worker per GPU
    gemma-search launch demo-tiny --workers 2           # N CPU workers
    gemma-search worker sst2-gemma2-9b                  # one worker (one per GPU)
    gemma-search status sst2-gemma2-9b                  # trials by state, best, running
    gemma-search verify sst2-gemma2-9b --top 3 --seeds 3  # re-run the best on new seeds
    gemma-search export sst2-gemma2-9b --out best/      # best config for standard tools

Storage: --storage URL, else $GEMMA_SEARCH_STORAGE, else the spec's storage.url (create), else
sqlite:///gemma_search.db. Errors you can fix print one line and exit with code 1 (a worker
stopped by an error in the spec, data or model: code 3, which `launch` does not restart).
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from gemma_search.errors import CONFIG_ERROR_EXIT, GemmaSearchError, is_config_error

app = typer.Typer(help="Hyperparameter search for LoRA fine-tuning of Gemma 2.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

F = TypeVar("F", bound=Callable[..., Any])

StorageOpt = Annotated[str | None, typer.Option(
    "--storage", help="Storage URL (default: $GEMMA_SEARCH_STORAGE or sqlite:///gemma_search.db)",
    show_default=False)]
StudyArg = Annotated[str, typer.Argument(help="Study name (the spec's `name`).")]


@app.callback()
def _quiet_libraries() -> None:
    """Keep library progress bars and load reports out of one-line errors and tables."""
    import os
    import sys

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # The variable is read when datasets is imported; a process that imported it already (a
    # test runner, a notebook) needs telling directly.
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["datasets"].disable_progress_bars()


def _user_errors(fn: F) -> F:
    """Print a GemmaSearchError as one line on stderr and exit 1; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GemmaSearchError as exc:
            typer.echo(f"error: {_printable(str(exc))}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _printable(text: str) -> str:
    """`text` with control and format characters escaped (ESC as \\x1b, a newline as \\n,
    U+202E as \\u202e): an error quotes what the user gave, and that must neither drive the
    terminal nor break the message into lines."""
    import unicodedata

    return "".join(ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch
                   for ch in text)


@app.command()
@_user_errors
def create(
    spec_path: Annotated[str, typer.Argument(
        metavar="SPEC", help="Study spec YAML, or a shipped study's name (`gemma-search "
                             "studies` lists them).")],
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a spec key: --set search.lora_r=8 (repeatable).")] = None,
    storage: StorageOpt = None,
) -> None:
    """Validate a spec, check its data, and create its study in the storage."""
    from gemma_search.spec import find_spec, load_spec
    from gemma_search.storage import redact, resolve_storage_url
    from gemma_search.study import check_data, create_study

    path = find_spec(spec_path)
    if str(path) != spec_path:
        typer.echo(f"spec: the shipped study {path}")
    spec = load_spec(path, overrides or [])
    check_data(spec)
    url = resolve_storage_url(storage, spec.storage.url)
    create_study(spec, url, say=typer.echo)
    typer.echo(f"study {spec.name!r} is ready in {redact(url)}; start workers with "
               f"{_launch_command(spec.name, url)}")


@app.command()
@_user_errors
def studies(
    name: Annotated[str | None, typer.Argument(
        help="A shipped study: print its YAML (or copy it with --copy).", show_default=False)
    ] = None,
    copy: Annotated[Path | None, typer.Option(
        "--copy", help="Copy the study's YAML into this folder, to edit it.",
        show_default=False)] = None,
) -> None:
    """The studies that ship with gemma-search: list them, print one, or copy one to edit.

    `gemma-search create NAME` runs one as it is; relative paths in it (its data) are then
    relative to the folder you run it from.
    """
    from gemma_search.spec import shipped_studies

    shipped = shipped_studies()
    if name is None:
        if copy is not None:
            raise GemmaSearchError("--copy needs a study name: gemma-search studies NAME "
                                   f"--copy {copy} (names: {', '.join(shipped)})")
        width = max(map(len, shipped))
        for study, path in shipped.items():
            typer.echo(f"{study:<{width}}  {_first_comment(path)}")
            typer.echo(f"{'':<{width}}  {path}")
        typer.echo("run one: gemma-search create NAME --set data.train=PATH ...; copy one to "
                   "edit: gemma-search studies NAME --copy DIR")
        return
    name = name.removesuffix(".yaml")
    if name not in shipped:
        raise GemmaSearchError(f"{name!r} is not a shipped study; the shipped studies are: "
                               f"{', '.join(shipped)}")
    if copy is None:
        typer.echo(shipped[name].read_text(), nl=False)
        return
    target = copy / shipped[name].name
    if target.exists():
        raise GemmaSearchError(f"{target} already exists; remove it or copy into another "
                               "folder")
    copy.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shipped[name], target)
    typer.echo(f"{target}: edit it, then `gemma-search create {target}` (its relative paths "
               "are now relative to that folder)")


@app.command()
@_user_errors
def worker(
    study: StudyArg,
    storage: StorageOpt = None,
    index: Annotated[int, typer.Option(help="Worker index (offsets the sampler seed).")] = 0,
) -> None:
    """Run trials of a study until its budget is spent (one worker per GPU).

    An error in the spec, the data or the model exits with code 3, not 1: `launch` restarts a
    worker that crashed, but not one that a restart would stop the same way.
    """
    from gemma_search.storage import (
        STORAGE_ENV,
        STORAGE_FILE_ENV,
        has_password,
        resolve_storage_url,
    )
    from gemma_search.worker import StopFlag, run_worker

    if storage is not None and has_password(storage):
        # Warned, not refused: the process list has shown it by now anyway, and a worker
        # started by hand must still run. `launch` hands its workers the URL in the
        # environment, never on the command line.
        typer.echo(f"warning: --storage holds a password, which `ps` shows to every user of "
                   f"this machine for as long as the worker runs; put the URL in "
                   f"{STORAGE_ENV}, or in a file that {STORAGE_FILE_ENV} names, instead",
                   err=True)
    stop = StopFlag()
    stop.install()
    try:
        ran = run_worker(study, resolve_storage_url(storage), index=index, stop=stop)
    except GemmaSearchError as exc:
        if not is_config_error(exc):
            raise  # one line and exit code 1 (`_user_errors`): `launch` restarts the worker
        typer.echo(f"error: {_printable(str(exc))}", err=True)
        raise typer.Exit(CONFIG_ERROR_EXIT) from None
    why = "budget spent"
    if stop.requested:  # a signal between trials, or while one ran
        why = ("stopped by signal between trials" if stop.handed_back is None else
               f"stopped by signal, trial {stop.handed_back} checkpointed and re-queued")
    typer.echo(f"worker {index}: ran {ran} trial{'' if ran == 1 else 's'}; {why}")


@app.command()
@_user_errors
def launch(
    study: StudyArg,
    gpus: Annotated[str | None, typer.Option(
        help="One worker per GPU: `all` or ids like 0,1,3 (each child sees only its GPU).",
        show_default=False)] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="CPU workers to start (without --gpus; default 1).", show_default=False)
    ] = None,
    max_restarts: Annotated[int, typer.Option(
        min=0, help="Crashes in a row after which a worker is given up on.")] = 5,
    storage: StorageOpt = None,
) -> None:
    """Start supervised workers on this machine (one per GPU), show progress, wait for them.

    A crashed worker is restarted with backoff; Ctrl-C or SIGTERM stops all of them, and each
    checkpoints and re-queues its trial first. The last line says how the study stands; the
    exit code is 0 only when every planned trial finished, complete or pruned.
    """
    from gemma_search.storage import resolve_storage_url

    gpu_ids = _gpu_ids(gpus, workers)
    result = _run_workers(study, resolve_storage_url(storage),
                          again=f"gemma-search launch {study}", workers=workers, gpus=gpu_ids,
                          max_restarts=max_restarts)
    if not result.ok:
        raise GemmaSearchError(result.line)
    typer.echo(result.line)


@app.command()
@_user_errors
def status(
    study: StudyArg,
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    watch: Annotated[bool, typer.Option(
        "--watch", help="Refresh the view until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(
        min=0.5, help="Seconds between refreshes with --watch.")] = 5.0,
) -> None:
    """The fleet (workers, GPUs, speed, heartbeats), trials by state, best value and params,
    budget left and time to finish."""
    import sys
    import time

    from rich.console import Console
    from rich.live import Live

    from gemma_search import db
    from gemma_search.status import render_status, study_status
    from gemma_search.storage import (
        backoff,
        cause_line,
        is_transient,
        redact_text,
        resolve_storage_url,
    )
    from gemma_search.study import load_study
    from gemma_search.verify import load_companion

    url = resolve_storage_url(storage)
    loaded, spec = load_study(study, url)
    engine = db.make_engine(url)
    companion = None

    def summary() -> dict[str, Any]:
        nonlocal companion  # verify may create it while we watch
        companion = companion or load_companion(loaded, url)
        return study_status(loaded, spec, engine, companion=companion)

    if as_json:
        typer.echo(json.dumps(summary(), indent=2, default=str))
        return
    if not watch:
        # Piped or captured: wide enough that the workers table is not wrapped into shreds.
        console = Console() if sys.stdout.isatty() else Console(width=160)
        console.print(render_status(summary()))
        return
    from rich.console import Group
    from rich.text import Text

    view = render_status(summary())
    patience = spec.storage.reconnect_seconds
    with Live(view, auto_refresh=False) as live:
        try:
            wait, failing_since, attempt = interval, None, 0
            while True:
                time.sleep(wait)
                try:
                    view = render_status(summary())
                except Exception as exc:  # a database restart: keep watching, as workers do
                    if not is_transient(exc):
                        raise
                    now = time.monotonic()
                    failing_since = failing_since or now
                    why = redact_text(cause_line(exc), url)
                    if now - failing_since >= patience:
                        raise GemmaSearchError(
                            f"storage unreachable for {now - failing_since:.0f} s "
                            f"(storage.reconnect_seconds is {patience}): {why}") from None
                    live.update(Group(view, Text(f"storage unreachable ({why}); showing the "
                                                 "last view, retrying", style="red")),
                                refresh=True)
                    wait, attempt = min(interval, backoff(attempt)), attempt + 1
                    continue
                live.update(view, refresh=True)
                wait, failing_since, attempt = interval, None, 0
        except KeyboardInterrupt:
            pass


@app.command()
@_user_errors
def dashboard(
    study: StudyArg,
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(
        help="Address to listen on. Anything but loopback serves read-only and asks for a "
             "token (printed in the link, or --token-file).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")
                    ] = 8080,
    read_only: Annotated[bool, typer.Option(
        "--read-only", help="Refuse every change (always so off loopback).")] = False,
    token_file: Annotated[Path | None, typer.Option(
        help="Ask for the token on this file's first line (off loopback: instead of a "
             "generated one).", show_default=False)] = None,
) -> None:
    """Serve optuna-dashboard (plots, trials, params) for a study until Ctrl-C."""
    from gemma_search.dashboard import access_for, serve
    from gemma_search.storage import resolve_storage_url

    access = access_for(host, read_only=read_only, token_file=token_file)
    serve(study, resolve_storage_url(storage), host, port, access=access,
          warn=lambda note: typer.echo(note, err=True),
          ready=lambda link: typer.echo(f"dashboard of study {study!r}: open {link} "
                                        "(Ctrl-C stops it)"))


@app.command()
@_user_errors
def verify(
    study: StudyArg,
    top: Annotated[int, typer.Option(min=1, help="How many of the best trials to re-run.")] = 3,
    seeds: Annotated[int, typer.Option(min=1, help="New training seeds per trial.")] = 3,
    gpus: Annotated[str | None, typer.Option(
        help="Run the re-runs on one worker per GPU: `all` or ids like 0,1,3.",
        show_default=False)] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="CPU workers to run them (without --gpus; default 1).", show_default=False)
    ] = None,
    no_run: Annotated[bool, typer.Option(
        "--no-run", help="Only enqueue them; `gemma-search launch STUDY.verify` (or "
                         "`worker STUDY.verify`) runs them later.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    storage: StorageOpt = None,
) -> None:
    """Re-run the top K trials with S new seeds, report the mean and spread; `export` then
    picks the best by mean.

    The re-runs are trials of a companion study, STUDY.verify (its workers run only them),
    so STUDY keeps exactly its search trials. It re-checks the best trials finished so far:
    run it once the search has spent its budget.
    """
    from rich.console import Console
    from rich.table import Table

    from gemma_search.storage import resolve_storage_url, retry_transient
    from gemma_search.study import load_study
    from gemma_search.verify import enqueue_verification, verification_summary

    gpu_ids = _gpu_ids(gpus, workers)  # bad --gpus fails before anything is enqueued
    url = resolve_storage_url(storage)
    loaded, spec = load_study(study, url)
    companion, added = enqueue_verification(loaded, spec, url, top=top, seeds=seeds)
    if not as_json:
        typer.echo(f"verify: {len(added)} re-run(s) enqueued in study "
                   f"{companion.study_name!r} ({top} best trial(s) x {seeds} new seed(s), "
                   "earlier ones kept)")
    rows = verification_summary(loaded, spec, companion)
    result = None
    if any(r["pending"] for r in rows) and not no_run:
        result = _run_workers(companion.study_name, url, again=f"gemma-search verify {study}",
                              workers=workers, gpus=gpu_ids)
        rows = retry_transient(lambda: verification_summary(loaded, spec, companion),
                               patience=spec.storage.reconnect_seconds,
                               what="read the re-runs")
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
    else:
        table = Table(title=f"{spec.objective.metric} on new seeds ({spec.direction}), best "
                      "mean first")
        for col in ("trial", "own value", "seeds", "mean", "std", "values", "pending"):
            table.add_column(col)
        for r in rows:
            table.add_row(str(r["trial"]), _cell(r["original_value"]),
                          ",".join(map(str, r["seeds"])) or "-", _cell(r["mean"]),
                          _cell(r["std"]), " ".join(_cell(v) for v in r["values"]) or "-",
                          str(r["pending"]))
        Console(width=160).print(table)
        if rows and rows[0]["mean"] is not None:
            typer.echo(f"export picks trial {rows[0]['trial']} (best mean over its new seeds)")
    if result is not None and not result.ok:
        raise GemmaSearchError(result.line)  # after the table: the re-runs that did finish


@app.command()
@_user_errors
def export(
    study: StudyArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the files to.")],
    storage: StorageOpt = None,
    top_k: Annotated[int, typer.Option(min=1, help="Rows of leaderboard.csv.")] = 10,
) -> None:
    """Write the best trial as best_config.yaml, training_args.json, lora_config.json, ..."""
    from gemma_search.export import export_study
    from gemma_search.storage import resolve_storage_url

    paths = export_study(study, resolve_storage_url(storage), out, top_k=top_k)
    for path in paths.values():
        typer.echo(str(path))


@app.command()
@_user_errors
def report(
    study: StudyArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the report to.")],
    storage: StorageOpt = None,
    top_k: Annotated[int, typer.Option(min=1, help="Rows of the leaderboard.")] = 10,
) -> None:
    """Write report.html (plots, leaderboard, importances, good regions) and summary.json."""
    from gemma_search.report import write_report
    from gemma_search.storage import resolve_storage_url

    paths = write_report(study, resolve_storage_url(storage), out, top_k=top_k)
    for path in paths.values():
        typer.echo(str(path))


@app.command()
@_user_errors
def gc(
    study: StudyArg,
    storage: StorageOpt = None,
    paused: Annotated[bool, typer.Option(
        "--paused", help="Also paused trials' checkpoints, while the study still runs "
        "(those trials then stay paused for good).")] = False,
) -> None:
    """Delete the checkpoints no trial will resume from: finished trials', and paused
    trials' once nothing runs or waits in the study."""
    from gemma_search.promotion import collect_checkpoints
    from gemma_search.storage import resolve_storage_url
    from gemma_search.study import load_study

    found, spec = load_study(study, resolve_storage_url(storage))
    removed, freed = collect_checkpoints(found, spec, paused=paused)
    typer.echo(f"removed the checkpoints of {len(removed)} trial(s), "
               f"{freed / 2**20:.1f} MiB" + (f": {', '.join(map(str, removed))}"
                                             if removed else ""))


db_app = typer.Typer(help="gemma-search's own tables (beside Optuna's) and their migrations.",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
@_user_errors
def db_upgrade(storage: StorageOpt = None) -> None:
    """Upgrade Optuna's schema, then gemma-search's tables, to the newest version."""
    from gemma_search import db
    from gemma_search.storage import open_storage, redact, resolve_storage_url

    url = resolve_storage_url(storage)
    open_storage(url)  # a clear one-line error if the server cannot be reached
    optuna_rev, ours = db.upgrade_all(url)
    typer.echo(f"{redact(url)}: Optuna schema at {optuna_rev}, gemma-search tables at {ours}")


@db_app.command("downgrade")
@_user_errors
def db_downgrade(
    storage: StorageOpt = None,
    revision: Annotated[str, typer.Option(help="Target revision ('base' drops our tables).")
                        ] = "base",
) -> None:
    """Downgrade gemma-search's own tables (Optuna's are never touched)."""
    from gemma_search import db
    from gemma_search.storage import redact, resolve_storage_url

    url = resolve_storage_url(storage)
    db.downgrade(url, revision)
    typer.echo(f"{redact(url)}: gemma-search tables at {db.current(url) or 'base'}")


@db_app.command("current")
@_user_errors
def db_current(storage: StorageOpt = None) -> None:
    """Print the revision of gemma-search's tables."""
    from gemma_search import db
    from gemma_search.storage import resolve_storage_url

    typer.echo(db.current(resolve_storage_url(storage)) or "base (no gemma-search tables)")


@app.command("make-tiny-model")
@_user_errors
def make_tiny_model_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to save model and tokenizer in.")],
    text_file: Annotated[list[Path] | None, typer.Option(
        "--text", help="Text or JSONL files to train the tokenizer on (default: demo text).")
    ] = None,
) -> None:
    """Build a tiny Gemma 2 (2 layers, soft-caps on) and a tokenizer; save_pretrained both."""
    from gemma_search.demo import demo_sentences
    from gemma_search.tiny import make_tiny_model

    texts: list[str] = []
    for path in text_file or []:
        if not path.is_file():
            raise GemmaSearchError(f"--text file {path} does not exist")
        texts += path.read_text(errors="replace").splitlines()
    if not texts:
        texts = [row["text"] for row in demo_sentences(2000, seed=0)]
    typer.echo(str(make_tiny_model(out_dir, texts)))


@app.command()
@_user_errors
def demo(
    workdir: Annotated[Path, typer.Option("--dir", help="Where model, data, DB go.")] = Path(
        "demo-run"),
    spec_path: Annotated[str, typer.Option(
        "--spec", help="Demo spec: a YAML path or a shipped study's name.")] = "demo_tiny",
    workers: Annotated[int, typer.Option(min=1)] = 2,
    trials: Annotated[int, typer.Option(min=1, help="budget.max_trials")] = 12,
) -> None:
    """The whole flow on CPU: tiny Gemma 2, generated data, SQLite, 2 workers, export."""
    from rich.console import Console
    from rich.syntax import Syntax

    from gemma_search.demo import write_demo_data
    from gemma_search.export import export_study
    from gemma_search.spec import load_spec
    from gemma_search.study import check_data, create_study
    from gemma_search.tiny import make_tiny_model

    console = Console()
    workdir = workdir.resolve()
    console.rule("1. data and a tiny Gemma 2")
    train, validation = write_demo_data(workdir / "data")
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    model_dir = make_tiny_model(workdir / "tiny-gemma2", texts)
    console.print(f"data: {train}, {validation}\nmodel: {model_dir}")

    console.rule("2. study")
    db_file = workdir / "demo.db"
    db_file.unlink(missing_ok=True)  # the demo's own database: start afresh each run
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    url = f"sqlite:///{db_file}"
    spec = load_spec(spec_path, [f"model.name_or_path={model_dir}", f"data.train={train}",
                                 f"data.validation={validation}", f"storage.url={url}",
                                 f"budget.max_trials={trials}",
                                 f"checkpoints.dir={workdir / 'checkpoints'}"])
    check_data(spec)
    create_study(spec, url, say=console.print)
    console.print(f"study {spec.name!r} in {url}: up to {trials} trials, pruner "
                  f"{spec.pruner.type}, sampler {spec.sampler.type}")

    console.rule(f"3. search with {workers} workers")
    code = _launch_with_progress(spec.name, url, workers=workers)
    if code != 0:
        raise GemmaSearchError(f"a demo worker exited with code {code}; see its output above")

    console.rule("4. leaderboard")
    _print_leaderboard(console, spec.name, url)
    console.rule("5. export")
    paths = export_study(spec.name, url, workdir / "export")
    console.print(Syntax(paths["best_config.yaml"].read_text(), "yaml"))
    console.print("exported: " + ", ".join(str(p) for p in paths.values()))


@app.command()
@_user_errors
def doctor(
    storage: StorageOpt = None,
    study: Annotated[str | None, typer.Option(
        help="Also check this study: its model (config, tokenizer) and, on a GPU, its memory "
             "plan.", show_default=False)] = None,
    require_gpu: Annotated[bool, typer.Option(
        "--require-gpu", help="No CUDA is a failure (a GPU host, the image on one).")] = False,
) -> None:
    """Check this machine for workers: CUDA, cards, kernels, storage, model, memory plan."""
    from gemma_search.doctor import failures, render, run_checks, summary

    checks = run_checks(storage=storage, study=study, require_gpu=require_gpu)
    typer.echo(render(checks))
    typer.echo(summary(checks))
    failed = failures(checks)
    for line in failed:
        typer.echo(f"error: {_printable(line)}", err=True)
    if failed:
        raise typer.Exit(1)


def _launch_command(study: str, url: str) -> str:
    """`gemma-search launch STUDY` in backticks, with `--storage` when `launch` would not find
    `url` by itself ($GEMMA_SEARCH_STORAGE, its file, or the default). Never the password."""
    from gemma_search.storage import has_password, redact, resolve_storage_url

    try:
        found = resolve_storage_url(None)
    except GemmaSearchError:  # an unreadable $GEMMA_SEARCH_STORAGE_FILE: name the URL
        found = None
    if found == url:
        return f"`gemma-search launch {study}`"
    command = f"`gemma-search launch {study} --storage {redact(url)}`"
    if has_password(url):  # in the user-info or the query (?password=)
        command += (" with the password in place of *** (better: export GEMMA_SEARCH_STORAGE "
                    "and leave out --storage)")
    return command


def _first_comment(path: Path) -> str:
    """A shipped study's first line (`# Gemma 2 9B, sentiment ...`): what it is for."""
    first = path.read_text().splitlines()[:1]
    return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""


def _gpu_ids(gpus: str | None, workers: int | None) -> list[str] | None:
    """`--gpus` / `--workers` of `launch` and `verify`: GPU ids, or None for CPU workers."""
    import os

    from gemma_search.launcher import parse_gpus

    if gpus is not None and workers is not None:
        raise GemmaSearchError("--gpus and --workers both given: use --gpus for one worker per "
                               "GPU, or --workers N for N CPU workers")
    return None if gpus is None else parse_gpus(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))


def _run_workers(study: str, url: str, *, again: str, **launch_args: Any) -> Any:
    """Run supervised workers with a progress bar, then read how the study stands: a
    `launcher.Outcome`, whose line says what failed (and why), waits or never started.
    An interrupt or a configuration error is a one-line error (`again`: the command that
    carries on)."""
    from gemma_search.launcher import Outcome
    from gemma_search.study import load_study

    # The study's patience for an outage at the end; a study that is not there fails here.
    patience = float(load_study(study, url)[1].storage.reconnect_seconds)
    try:
        code = _launch_with_progress(study, url, **launch_args)
    except KeyboardInterrupt:
        raise GemmaSearchError("interrupted: workers checkpointed and re-queued their trials; "
                               f"`{again}` continues the study") from None
    if code == CONFIG_ERROR_EXIT:
        raise GemmaSearchError(f"a worker of study {study!r} stopped on a configuration error "
                               f"(its one-line error is above); fix it, then run `{again}` "
                               "again")
    result = _study_outcome(study, url, patience)
    if result.ok and code == 0:
        return result
    line = result.line
    if code != 0:
        line += f"; a worker exited with code {code} (its output is above)"
    if result.unfinished:
        line += f"; `{again}` runs what is left"
    return Outcome(False, line, result.failed, result.unfinished)


def _study_outcome(study: str, url: str, patience: float) -> Any:
    """`launcher.outcome` of the study now, read once the server answers (for up to
    `patience` s): the workers may have outlived an outage that is still going on."""
    from gemma_search.launcher import outcome
    from gemma_search.promotion import pausing
    from gemma_search.storage import retry_transient
    from gemma_search.study import load_study
    from gemma_search.verify import rerun_progress, search_study_of

    def read() -> Any:
        loaded, spec = load_study(study, url)
        trials = loaded.get_trials(deepcopy=False)
        verifying = search_study_of(loaded) is not None
        planned = rerun_progress(trials)[1] if verifying else spec.budget.max_trials
        return outcome(study, trials, planned, verifying=verifying, pausing=pausing(spec))

    return retry_transient(read, patience=patience, what=f"read study {study}")


def _launch_with_progress(study: str, url: str, **launch_args: Any) -> int:
    """Run `launcher.launch` with a live progress bar fed from the storage."""
    from optuna.trial import TrialState
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gemma_search.launcher import launch
    from gemma_search.ranking import ranked_trials
    from gemma_search.study import budget_used, load_study
    from gemma_search.verify import rerun_progress, search_study_of

    loaded, spec = load_study(study, url)
    # A verify companion's workers run exactly its enqueued re-runs; a search, its budget.
    verifying = search_study_of(loaded) is not None
    total = (rerun_progress(loaded.get_trials(deepcopy=False))[1] if verifying
             else spec.budget.max_trials)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn()) as progress:
        task = progress.add_task(study, total=total, detail="starting workers")

        def poll() -> None:
            trials = loaded.get_trials(deepcopy=False)
            if verifying:
                done, enqueued = rerun_progress(trials)
            else:  # re-queued failures count once, through their retry
                done = budget_used([t for t in trials if t.state.is_finished()])
                enqueued = spec.budget.max_trials
            pruned = sum(t.state == TrialState.PRUNED for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            # A full bar is not a good end by itself: failed trials count as done.
            retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
            failed = sum(t.state == TrialState.FAIL and t.number not in retried
                         for t in trials)
            ranked = ranked_trials(trials, spec)
            best = f", best {ranked[0].value:.4g}" if ranked else ""
            failures = f", {failed} failed" if failed else ""
            progress.update(task, completed=done, total=enqueued,
                            detail=f"{running} running, {pruned} pruned{failures}{best}")

        def say(line: str) -> None:
            # soft_wrap: one message, one line, also in a log that is not a terminal.
            progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

        return launch(study, url, poll=poll, say=say, **launch_args)


def _print_leaderboard(console: Any, study: str, url: str) -> None:
    from rich.table import Table

    from gemma_search.export import leaderboard
    from gemma_search.spec import TASK_METRICS
    from gemma_search.status import study_status
    from gemma_search.study import load_study

    loaded, spec = load_study(study, url)
    summary = study_status(loaded, spec)
    counts = ", ".join(f"{n} {s}" for s, n in summary["trials"].items() if n)
    console.print(f"trials: {counts}")
    rows = leaderboard(loaded, spec, top_k=5)
    if not rows:
        return
    table = Table(title=f"top {len(rows)} by {spec.objective.metric} ({spec.direction})")
    metrics = [m for m in TASK_METRICS[spec.task.type] if m != spec.objective.metric]
    params = [p for p in ("learning_rate", "optimizer", "lora_r") if p in rows[0]]
    keys = ["rank", "trial", "value", *metrics, *params, "tokens_trained"]
    for key in keys:
        table.add_column(key)
    for row in rows:
        table.add_row(*(_cell(row.get(k)) for k in keys))
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
