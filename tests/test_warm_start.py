"""Warm start: presets, listed configs and an earlier study's best run first, exactly once."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from gemma_search.errors import SpecError
from gemma_search.spec import PRESETS, fit_to_search, load_spec, spec_from_text

from .conftest import demo_spec_text, finished_study, write_spec
from .test_cli import assert_one_line_error, run
from .test_fleet import fleet_spec
from .test_launcher import _launch_process


def spec_text(name: str, tmp_path: Path, warm: str, **kwargs: object) -> str:
    return demo_spec_text(name, tmp_path / "model", tmp_path / "t.jsonl", tmp_path / "v.jsonl",
                          extra=warm, **kwargs)  # type: ignore[arg-type]


def test_the_gemma2_preset_is_the_known_recipe() -> None:
    assert PRESETS["gemma2-lora"] == {
        "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "lora_targets": "all_linear",
        "learning_rate": 2.0e-4, "optimizer": "adamw", "lr_schedule": "constant",
        "warmup_ratio": 0.03, "max_grad_norm": 0.3}


def test_preset_settings_outside_the_space_are_left_to_the_sampler(tmp_path: Path) -> None:
    spec = spec_from_text(spec_text("p", tmp_path, ""))
    params, notes = fit_to_search(spec, PRESETS["gemma2-lora"])
    # searched here: learning_rate (range), optimizer (choice); lora_r 16 is not a choice
    assert params == {"learning_rate": 2.0e-4, "optimizer": "adamw"}
    assert ("lora_r 16 is not among search.lora_r choices [4, 8]; left to the sampler"
            in notes)
    # the spec's defaults equal the preset (lora_alpha 16, dropout 0.05): nothing to note
    assert not any(n.startswith("lora_alpha") or n.startswith("lora_dropout") for n in notes)


def test_preset_settings_this_spec_fixes_keep_the_specs_value(tmp_path: Path) -> None:
    spec = spec_from_text(spec_text("p", tmp_path, ""))
    _, notes = fit_to_search(spec, {**PRESETS["gemma2-lora"], "lora_rank": 8})
    # lora_targets is fixed at attention here: the trial keeps it, no sampler involved.
    assert ("lora_targets 'all_linear' is not tried; this spec fixes it: kept at the spec's "
            "value 'attention'") in notes
    assert not any("fixed" in n and "sampler" in n for n in notes)
    assert "lora_rank is not a search setting; ignored" in notes


@pytest.mark.parametrize(("warm", "message"), [
    ("warm_start: {presets: [gemma2-qlora]}",
     "warm_start.presets[0] is 'gemma2-qlora' but the known presets are: gemma2-lora"),
    ("warm_start: {configs: [{learning_rate: 0.5}]}",
     "warm_start.configs[0]: learning_rate 0.5 is outside search.learning_rate"),
    ("warm_start: {configs: [{lora_rank: 8}]}",
     "warm_start.configs[0]: lora_rank is not a search setting"),
    ("warm_start: {configs: [{lora_r: 16}]}",
     "warm_start.configs[0]: lora_r 16 is not among search.lora_r choices [4, 8]"),
    ("warm_start: {configs: [{optimizer: adamw}, {optimizer: sgd}, {lora_r: 4}]}",
     "warm_start lists 3 configurations but budget.max_trials is 2"),
])
def test_bad_warm_start_is_one_clear_error(tmp_path: Path, warm: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_text(spec_text("bad", tmp_path, warm, max_trials=2))
    assert message in str(info.value)


def test_create_enqueues_presets_then_configs_once(tmp_path: Path, tiny_model: Path,
                                                   demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    path = write_spec(tmp_path / "w.yaml", demo_spec_text(
        "warm", tiny_model, *demo_data, extra="""warm_start:
  presets: [gemma2-lora]
  configs: [{learning_rate: 1.0e-3, optimizer: sgd, lora_r: 8}]"""))
    code, out = run("create", str(path), "--storage", url)
    assert code == 0, out
    assert "warm start: preset gemma2-lora enqueued first" in out
    assert "warm start: config 0 enqueued first" in out
    assert ("warm start: preset gemma2-lora: lora_r 16 is not among search.lora_r choices "
            "[4, 8]; left to the sampler") in out
    assert ("warm start: preset gemma2-lora: lora_targets 'all_linear' is not tried; this "
            "spec fixes it: kept at the spec's value 'attention'") in out
    assert run("create", str(path), "--storage", url)[0] == 0  # again: nothing more enqueued
    study = optuna.load_study(study_name="warm", storage=url)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.WAITING] * 2
    assert [t.user_attrs["warm_start"] for t in trials] == ["preset gemma2-lora", "config 0"]
    assert trials[0].system_attrs["fixed_params"] == {"learning_rate": 2.0e-4,
                                                      "optimizer": "adamw"}
    assert trials[1].system_attrs["fixed_params"] == {"learning_rate": 1.0e-3,
                                                      "optimizer": "sgd", "lora_r": 8}


def _finished_study(url: str, name: str, model: Path, data: tuple[Path, Path]) -> None:
    finished_study(url, name, model, data, ((1e-3, 0.5), (4e-3, 0.3), (2e-2, 0.9), (7e-3, 0.35)))


def test_a_study_seeds_itself_from_an_earlier_studys_best(tmp_path: Path, tiny_model: Path,
                                                          demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    _finished_study(url, "first", tiny_model, demo_data)
    best_two = sorted(optuna.load_study(study_name="first", storage=url).trials,
                      key=lambda t: t.value)[:2]
    path = write_spec(tmp_path / "w.yaml", demo_spec_text(
        "second", tiny_model, *demo_data,
        extra="warm_start: {from_study: first, from_study_top: 2}"))
    code, out = run("create", str(path), "--storage", url)
    assert code == 0, out
    waiting = optuna.load_study(study_name="second", storage=url).get_trials(deepcopy=False)
    assert [t.system_attrs["fixed_params"] for t in waiting] == [t.params for t in best_two]
    assert [t.user_attrs["warm_start"] for t in waiting] == [
        f"study first trial {t.number}" for t in best_two]


def test_warm_start_takes_the_earlier_studys_search_trials_not_its_reruns(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    first = finished_study(url, "first", tiny_model, demo_data,
                           ((1e-3, 0.5), (4e-3, 0.3), (2e-2, 0.9), (7e-3, 0.35)))
    # A re-run kept inside the study by an earlier gemma-search `verify`: lucky, not a search
    # trial of its own.
    first.enqueue_trial(dict(first.trials[2].params),
                        user_attrs={"verify_of": 2, "verify_seed": 1})
    first.tell(first.ask(), 0.01)
    path = write_spec(tmp_path / "w.yaml", demo_spec_text(
        "second", tiny_model, *demo_data,
        extra="warm_start: {from_study: first, from_study_top: 2}"))
    code, out = run("create", str(path), "--storage", url)
    assert code == 0, out
    waiting = optuna.load_study(study_name="second", storage=url).get_trials(deepcopy=False)
    assert [t.user_attrs["warm_start"] for t in waiting] == [
        "study first trial 1", "study first trial 3"]


def test_an_earlier_study_on_another_model_is_refused_and_nothing_is_written(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    _finished_study(url, "first", tiny_model, demo_data)
    other = tmp_path / "other-model"
    other.mkdir()
    path = write_spec(tmp_path / "w.yaml", demo_spec_text(
        "third", other, *demo_data, extra="warm_start: {from_study: first}"))
    code, out = run("create", str(path), "--storage", url)
    assert_one_line_error(code, out, "warm_start.from_study 'first' tuned", "same model and task")
    names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    assert names == ["first"]
    code, out = run("create", str(path), "--set", "warm_start.from_study=nope", "--storage", url)
    assert_one_line_error(code, out, "warm_start.from_study is 'nope'")


@pytest.mark.slow
def test_warm_starts_run_first_and_exactly_once_across_workers(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path],
        postgres_url: str) -> None:
    name = f"warm-{tmp_path.name[-12:]}"
    path = fleet_spec(tmp_path, name, tiny_model, demo_data, max_trials=5, max_tokens=1600,
                      grace_period=60)
    configs = [{"learning_rate": 1.5e-3, "lora_r": 4}, {"learning_rate": 3e-3, "lora_r": 8},
               {"learning_rate": 6e-3, "lora_r": 4}]
    path.write_text(path.read_text() + "warm_start:\n  configs:\n" + "".join(
        f"    - {{learning_rate: {c['learning_rate']}, lora_r: {c['lora_r']}}}\n"
        for c in configs))
    assert load_spec(path).warm_start.configs
    code, out = run("create", str(path), "--storage", postgres_url)
    assert code == 0, out
    proc = _launch_process(name, postgres_url, "--workers", "3")
    out_bytes, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out_bytes.decode()[-3000:]
    trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials(deepcopy=False)
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    warm = [t for t in trials if "warm_start" in t.user_attrs]
    assert [t.number for t in warm] == [0, 1, 2]
    ran = sorted((t.params["learning_rate"], t.params["lora_r"]) for t in warm)
    assert ran == sorted((c["learning_rate"], c["lora_r"]) for c in configs)  # each once
    first_sampled = min(t.datetime_start for t in trials if "warm_start" not in t.user_attrs)
    assert all(t.datetime_start <= first_sampled for t in warm)
