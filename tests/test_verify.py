"""`gemma-search verify`: the top trials re-run on new seeds, and export follows the mean."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from gemma_search.spec import spec_from_text
from gemma_search.study import budget_used, create_study
from gemma_search.verify import enqueue_verification, verification_summary

from .conftest import demo_spec_text, finished_study
from .test_cli import assert_one_line_error, run
from .test_fleet import create, fleet_spec


def verified_study(url: str, model: Path, data: tuple[Path, Path]) -> optuna.Study:
    return finished_study(url, "v", model, data,
                          ((1e-3, 0.30), (4e-3, 0.35), (2e-2, 0.90), (7e-3, 0.50)))


def test_verify_enqueues_tagged_reruns_once_and_export_follows_the_mean(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    study = verified_study(url, tiny_model, demo_data)
    spec = spec_from_text(demo_spec_text("v", tiny_model, *demo_data, max_trials=4))
    added = enqueue_verification(study, spec, top=2, seeds=2)
    assert added == [(0, 1), (0, 2), (1, 1), (1, 2)]  # the spec's seed is 0: new ones 1, 2
    assert enqueue_verification(study, spec, top=2, seeds=2) == []  # nothing twice
    trials = study.get_trials(deepcopy=False)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert [(t.user_attrs["verify_of"], t.user_attrs["verify_seed"]) for t in waiting] == added
    assert waiting[0].system_attrs["fixed_params"] == trials[0].params
    assert budget_used(trials) == 4  # re-runs are on top of the search budget

    # Trial 0 was best once (0.30) but is worse on new seeds than trial 1 (0.35 once).
    for value in (0.41, 0.43, 0.36, 0.37):
        rerun = study.ask()
        study.tell(rerun, value)
    rows = verification_summary(study, spec)
    assert [r["trial"] for r in rows] == [1, 0]
    assert rows[0]["mean"] == pytest.approx(0.365) and rows[0]["seeds"] == [1, 2]
    assert rows[1]["std"] == pytest.approx(0.0141421, rel=1e-4)

    code, out = run("export", "v", "--out", str(tmp_path / "best"), "--storage", url)
    assert code == 0, out
    provenance = json.loads((tmp_path / "best" / "provenance.json").read_text())
    assert provenance["trial_number"] == 1
    assert provenance["selection"]["by"].startswith("best mean val_loss over 2 new seed(s)")
    assert provenance["selection"]["mean"] == pytest.approx(0.365)
    assert provenance["selection"]["best_single_trial"] == 0
    assert "Chosen by its mean over 2 new seed(s)" in (
        tmp_path / "best" / "best_config.yaml").read_text()


def test_export_without_verification_says_how_it_chose(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    verified_study(url, tiny_model, demo_data)
    assert run("export", "v", "--out", str(tmp_path / "best"), "--storage", url)[0] == 0
    provenance = json.loads((tmp_path / "best" / "provenance.json").read_text())
    assert provenance["trial_number"] == 0
    assert provenance["selection"]["by"].startswith("best single trial by val_loss")


def test_verify_no_run_json_and_errors(tmp_path: Path, tiny_model: Path,
                                       demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    code, out = run("verify", "v", "--storage", url)
    assert_one_line_error(code, out, "does not exist", "gemma-search create SPEC")
    create_study(spec_from_text(demo_spec_text("v", tiny_model, *demo_data)), url)
    code, out = run("verify", "v", "--storage", url)
    assert_one_line_error(code, out, "no completed trial to verify yet")

    url2 = f"sqlite:///{tmp_path / 'v2.db'}"
    verified_study(url2, tiny_model, demo_data)
    code, out = run("verify", "v", "--top", "1", "--seeds", "3", "--no-run", "--json",
                    "--storage", url2)
    assert code == 0, out
    rows = json.loads(out)
    assert [(r["trial"], r["pending"], r["n"]) for r in rows] == [(0, 3, 0)]


@pytest.mark.slow
def test_verify_reruns_on_new_seeds_unpruned(tmp_path: Path, tiny_model: Path,
                                             demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    path = fleet_spec(tmp_path, "seeds", tiny_model, demo_data, max_trials=1, max_tokens=1600)
    # A median pruner that would stop every new trial at its first evaluation, because of
    # the made-up trial added below: re-runs must finish anyway.
    path.write_text(path.read_text().replace(
        "pruner: {type: none}", "pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 0}"))
    create(path, url)
    code, out = run("launch", "seeds", "--workers", "1", "--storage", url)
    assert code == 0, out
    study = optuna.load_study(study_name="seeds", storage=url)
    original = study.trials[0]
    assert original.state == TrialState.COMPLETE
    study.add_trial(create_trial(
        params={"learning_rate": 1e-3, "lora_r": 8},
        distributions={"learning_rate": FloatDistribution(1e-3, 1e-2, log=True),
                       "lora_r": CategoricalDistribution([4, 8])},
        value=10.0, intermediate_values={i: 0.0 for i in range(1, 50)}))

    code, out = run("verify", "seeds", "--top", "1", "--seeds", "2", "--workers", "1",
                    "--storage", url)
    assert code == 0, out
    assert "export picks trial 0" in out
    reruns = [t for t in study.get_trials(deepcopy=False) if "verify_of" in t.user_attrs]
    assert [t.state for t in reruns] == [TrialState.COMPLETE] * 2
    assert [t.user_attrs["verify_seed"] for t in reruns] == [1, 2]
    assert all(t.params == original.params for t in reruns)
    assert all(t.user_attrs["tokens_trained"] >= 1600 for t in reruns)  # not cut short
    values = {original.value, *(t.value for t in reruns)}
    assert len(values) == 3  # another seed, another adapter init and data order
