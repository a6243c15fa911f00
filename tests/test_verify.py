"""`gemma-search verify`: the top trials re-run on new seeds in a companion study, and export
follows the mean."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from gemma_search.objective import checkpoint_dir
from gemma_search.ranking import ranked_trials
from gemma_search.spec import spec_from_text
from gemma_search.study import budget_used, create_study, load_study
from gemma_search.verify import (
    enqueue_verification,
    export_pick,
    load_companion,
    verification_summary,
)
from gemma_search.worker import _claim_trial

from .conftest import demo_spec_text, finished_study
from .test_cli import assert_one_line_error, run
from .test_fleet import create, fleet_spec

RESULTS = ((1e-3, 0.30), (4e-3, 0.35), (2e-2, 0.90), (7e-3, 0.50))


def verified_study(url: str, name: str, model: Path, data: tuple[Path, Path]) -> optuna.Study:
    return finished_study(url, name, model, data, RESULTS)


def test_reruns_live_in_a_linked_companion_and_export_follows_the_mean(
        storage_url: str, tmp_path: Path, tiny_model: Path,
        demo_data: tuple[Path, Path]) -> None:
    name = f"v-{tmp_path.name[-16:]}"  # PostgreSQL: one database for the whole session
    study = verified_study(storage_url, name, tiny_model, demo_data)
    spec = spec_from_text(demo_spec_text(name, tiny_model, *demo_data, max_trials=4))
    companion, added = enqueue_verification(study, spec, storage_url, top=2, seeds=2)
    assert added == [(0, 1), (0, 2), (1, 1), (1, 2)]  # the spec's seed is 0: new ones 1, 2
    assert enqueue_verification(study, spec, storage_url, top=2, seeds=2)[1] == []  # once

    # Linked both ways; the search study keeps exactly its budget's trials.
    assert companion.study_name == f"{name}.verify"
    assert study.user_attrs["verify_study"] == f"{name}.verify"
    assert companion.user_attrs["search_study"] == name
    assert load_companion(study, storage_url).study_name == companion.study_name
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == spec.budget.max_trials == budget_used(trials)
    waiting = companion.get_trials(deepcopy=False)
    assert [t.state for t in waiting] == [TrialState.WAITING] * 4
    assert [(t.user_attrs["verify_of"], t.user_attrs["verify_seed"]) for t in waiting] == added
    assert waiting[0].system_attrs["fixed_params"] == trials[0].params
    # Workers can run the companion: it has the spec under its own name, so checkpoints
    # and evaluation records of its trial 0 never meet those of search trial 0.
    loaded, companion_spec = load_study(companion.study_name, storage_url)
    assert companion_spec.name == companion.study_name
    assert companion_spec.budget == spec.budget and companion_spec.search == spec.search
    assert checkpoint_dir(companion_spec, 0) != checkpoint_dir(spec, 0)
    # ... and they run only the re-runs: with none waiting, a worker is done, adds nothing.
    for _ in added:
        companion.tell(companion.ask(), 0.5)
    assert _claim_trial(loaded, companion_spec) == "done"
    assert len(companion.get_trials(deepcopy=False)) == 4


def test_export_and_status_pick_by_the_mean_once_verified(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    study = verified_study(url, "v", tiny_model, demo_data)
    spec = spec_from_text(demo_spec_text("v", tiny_model, *demo_data, max_trials=4))
    code, out = run("status", "v", "--storage", url)
    assert code == 0, out
    assert "best single: trial 0" in out
    assert "export picks: trial 0, the best single; `gemma-search verify`" in out

    companion, _ = enqueue_verification(study, spec, url, top=2, seeds=2)
    summary = json.loads(run("status", "v", "--storage", url, "--json")[1])
    assert summary["export_pick"]["by"] == "single"
    assert summary["verification"]["pending"] == 4
    assert summary["verification"]["study"] == "v.verify"
    # Trial 0 was best once (0.30) but is worse on new seeds than trial 1 (0.35 once).
    for value in (0.41, 0.43, 0.36, 0.37):
        rerun = companion.ask()
        companion.tell(rerun, value)
    rows = verification_summary(study, spec, companion)
    assert [r["trial"] for r in rows] == [1, 0]
    assert rows[0]["mean"] == pytest.approx(0.365) and rows[0]["seeds"] == [1, 2]
    assert rows[1]["std"] == pytest.approx(0.0141421, rel=1e-4)
    assert rows[0]["verify_trials"] == [2, 3]  # trial numbers in the companion

    code, out = run("export", "v", "--out", str(tmp_path / "best"), "--storage", url)
    assert code == 0, out
    provenance = json.loads((tmp_path / "best" / "provenance.json").read_text())
    assert provenance["trial_number"] == 1
    selection = provenance["selection"]
    assert selection["by"].startswith("best mean val_loss over 2 new seed(s)")
    assert selection["mean"] == pytest.approx(0.365)
    assert selection["best_single_trial"] == 0 and selection["verify_study"] == "v.verify"
    assert "Chosen by its mean over 2 new seed(s)" in (
        tmp_path / "best" / "best_config.yaml").read_text()
    # The leaderboard ranks search trials only, best single first.
    board = (tmp_path / "best" / "leaderboard.csv").read_text().splitlines()
    assert [line.split(",")[1] for line in board[1:]] == ["0", "1", "3", "2"]

    summary = json.loads(run("status", "v", "--storage", url, "--json")[1])
    assert summary["best"]["trial"] == 0 and summary["budget_used"] == 4
    pick = summary["export_pick"]
    assert (pick["trial"], pick["by"], pick["n"]) == (1, "mean", 2)
    assert pick["mean"] == pytest.approx(0.365) and pick["best_single_trial"] == 0
    code, out = run("status", "v", "--storage", url)
    assert "best single: trial 0" in out
    assert "export picks: trial 1 by mean over 2 new seed(s) (0.365 ± 0.0071)" in out


def test_export_without_verification_says_how_it_chose(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    verified_study(url, "v", tiny_model, demo_data)
    assert run("export", "v", "--out", str(tmp_path / "best"), "--storage", url)[0] == 0
    provenance = json.loads((tmp_path / "best" / "provenance.json").read_text())
    assert provenance["trial_number"] == 0
    assert provenance["selection"]["by"].startswith("best single trial by val_loss")


def test_a_study_verified_by_the_previous_version_still_ranks_and_picks(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    """Before the companion study, re-runs were tagged trials of the search study itself."""
    url = f"sqlite:///{tmp_path / 'v.db'}"
    study = verified_study(url, "v", tiny_model, demo_data)
    spec = spec_from_text(demo_spec_text("v", tiny_model, *demo_data, max_trials=4))
    for seed, value in ((1, 0.10), (2, 0.12)):  # re-runs of trial 2 (0.90), lucky ones
        study.enqueue_trial(dict(study.trials[2].params),
                            user_attrs={"verify_of": 2, "verify_seed": seed})
        study.tell(study.ask(), value)
    trials = study.get_trials(deepcopy=False)
    assert budget_used(trials) == 4
    assert [t.number for t in ranked_trials(study, spec)] == [0, 1, 3, 2]  # re-runs left out
    pick = export_pick(study, spec, None)
    assert (pick["trial"], pick["by"], pick["best_single_trial"]) == (2, "mean", 0)
    # Verifying again goes on in a companion, and does not repeat the old seeds.
    companion, added = enqueue_verification(study, spec, url, top=2, seeds=2)
    assert added == [(0, 1), (0, 2), (1, 1), (1, 2)]
    added = enqueue_verification(study, spec, url, top=4, seeds=2)[1]
    assert added == [(3, 1), (3, 2)]  # trial 2 has its seeds 1 and 2 from before
    assert len(study.get_trials(deepcopy=False)) == 6  # nothing added to the search study
    assert len(companion.get_trials(deepcopy=False)) == 6


def test_verify_no_run_json_and_errors(tmp_path: Path, tiny_model: Path,
                                       demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    code, out = run("verify", "v", "--storage", url)
    assert_one_line_error(code, out, "does not exist", "gemma-search create SPEC")
    create_study(spec_from_text(demo_spec_text("v", tiny_model, *demo_data)), url)
    code, out = run("verify", "v", "--storage", url)
    assert_one_line_error(code, out, "no completed trial to verify yet")
    assert "v.verify" not in optuna.get_all_study_names(url)  # nothing made for nothing

    url2 = f"sqlite:///{tmp_path / 'v2.db'}"
    verified_study(url2, "v", tiny_model, demo_data)
    code, out = run("verify", "v", "--top", "1", "--seeds", "3", "--no-run", "--json",
                    "--storage", url2)
    assert code == 0, out
    rows = json.loads(out)
    assert [(r["trial"], r["pending"], r["n"]) for r in rows] == [(0, 3, 0)]
    code, out = run("verify", "v.verify", "--storage", url2)
    assert_one_line_error(code, out, "holds the verification re-runs of 'v'")

    # A user's own study that happens to have the companion's name is never mixed in.
    url3 = f"sqlite:///{tmp_path / 'v3.db'}"
    verified_study(url3, "w", tiny_model, demo_data)
    create_study(spec_from_text(demo_spec_text("w.verify", tiny_model, *demo_data)), url3)
    code, out = run("verify", "w", "--no-run", "--storage", url3)
    assert_one_line_error(code, out, "'w.verify'", "is not the verification study of 'w'")
    assert optuna.load_study(study_name="w.verify", storage=url3).trials == []


@pytest.mark.slow
def test_verify_reruns_on_new_seeds_unpruned_beside_the_search(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    path = fleet_spec(tmp_path, "seeds", tiny_model, demo_data, max_trials=2, max_tokens=800)
    # A median pruner that would stop every re-run at its first evaluation, compared with
    # the made-up trials below: re-runs must finish anyway.
    path.write_text(path.read_text().replace(
        "pruner: {type: none}", "pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 0}"))
    create(path, url)
    space = {"learning_rate": FloatDistribution(1e-3, 1e-2, log=True),
             "lora_r": CategoricalDistribution([4, 8])}
    study = optuna.load_study(study_name="seeds", storage=url)
    # The search, made up to keep this test short: its whole budget of 2 trials, with values
    # worse than any real run, so that a re-run counted in it would be its best trial.
    for lr, value in ((2e-3, 5.0), (5e-3, 4.0)):
        study.enqueue_trial({"learning_rate": lr, "lora_r": 4})
        study.tell(study.ask(space), value)

    code, out = run("verify", "seeds", "--top", "2", "--seeds", "2", "--no-run",
                    "--storage", url)
    assert code == 0, out
    companion = optuna.load_study(study_name="seeds.verify", storage=url)
    for _ in range(2):
        companion.add_trial(create_trial(params={"learning_rate": 1e-3, "lora_r": 8},
                                         distributions=space, value=0.0,
                                         intermediate_values={i: 0.0 for i in range(1, 50)}))
    code, out = run("verify", "seeds", "--top", "2", "--seeds", "2", "--workers", "1",
                    "--storage", url)
    assert code == 0, out
    assert "0 re-run(s) enqueued" in out and "export picks trial" in out
    assert len(study.get_trials(deepcopy=False)) == 2  # the budget, and nothing more

    reruns = [t for t in companion.get_trials(deepcopy=False) if "verify_of" in t.user_attrs]
    assert [t.state for t in reruns] == [TrialState.COMPLETE] * 4
    assert [(t.user_attrs["verify_of"], t.user_attrs["verify_seed"]) for t in reruns] == [
        (1, 1), (1, 2), (0, 1), (0, 2)]
    for t in reruns:
        original = study.trials[t.user_attrs["verify_of"]]
        assert t.params == original.params
        assert t.user_attrs["tokens_trained"] >= 800  # not cut short
        assert t.value < 4.0  # really trained
    assert len({t.value for t in reruns}) == 4  # another seed, another init and data order
    assert (tmp_path / "ckpt" / "seeds.verify").is_dir()  # checkpoints in their own folder

    # Plain Optuna names the same best trial as `status`, and `status` says what export picks.
    summary = json.loads(run("status", "seeds", "--storage", url, "--json")[1])
    best = subprocess.run([str(Path(sys.executable).parent / "optuna"), "best-trial",
                           "--study-name", "seeds", "--storage", url, "-f", "json"],
                          capture_output=True, text=True, check=True)
    assert json.loads(best.stdout)["number"] == summary["best"]["trial"] == 1
    assert summary["export_pick"]["by"] == "mean" and summary["export_pick"]["n"] == 2
    assert summary["budget_used"] == summary["max_trials"] == 2
