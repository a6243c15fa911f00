"""Specs: every shipped study loads; every bad input is one clear SpecError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gemma_search.errors import SpecError
from gemma_search.spec import (
    Choice,
    FloatRange,
    IntRange,
    apply_overrides,
    dump_spec,
    find_spec,
    load_spec,
    shipped_studies,
    spec_from_dict,
    spec_from_text,
    spec_hash,
)

STUDIES = sorted((Path(__file__).resolve().parents[1] / "gemma_search" / "studies").glob(
    "*.yaml"))


def raw_spec(**sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "t",
        "model": {"name_or_path": "google/gemma-2-9b"},
        "task": {"type": "classification", "text_column": "text", "labels": ["neg", "pos"]},
        "data": {"train": "/data/train.jsonl"},
        "budget": {"eval_every_tokens": 1000},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_loads_and_round_trips(path: Path) -> None:
    spec = load_spec(path)
    again = spec_from_text(dump_spec(spec))
    assert again == spec
    assert spec_hash(again) == spec_hash(spec)


def test_no_shipped_gpu_study_pins_eager_attention() -> None:
    """A 9B study pinned to eager would take the slow attention path on every GPU step;
    `auto` picks flash-attn or flex_attention there (both keep Gemma 2's soft-cap)."""
    for path in STUDIES:
        spec = load_spec(path)
        if "gemma-2-9b" in spec.model.name_or_path:
            assert spec.model.attn_implementation == "auto", path.name


def test_studies_cover_the_required_tasks() -> None:
    tasks = {load_spec(p).task.type for p in STUDIES}
    models = {load_spec(p).model.name_or_path for p in STUDIES}
    assert {"classification", "causal_lm", "regression"} <= tasks
    assert any("gemma-2-9b" in m for m in models)
    assert len(STUDIES) >= 4


def test_the_shipped_studies_are_found_by_name_from_any_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert list(shipped_studies().values()) == STUDIES
    monkeypatch.chdir(tmp_path)
    assert find_spec("sst2_gemma2_9b") == STUDIES[[p.stem for p in STUDIES].index(
        "sst2_gemma2_9b")]
    spec = load_spec("sst2_gemma2_9b")
    # A shipped study's relative paths are the user's: relative to where they run it.
    assert spec.data.train == str(tmp_path / "data" / "sst2" / "train.tsv")
    assert spec.checkpoints.dir == str(tmp_path / "gemma-search-checkpoints")
    # A file of that name in the folder is the user's own spec, and wins.
    own = tmp_path / "sst2_gemma2_9b"
    own.write_text(yaml.safe_dump(raw_spec(name="mine")))
    assert load_spec("sst2_gemma2_9b").name == "mine"


def test_a_spec_that_is_neither_a_file_nor_a_shipped_study(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        load_spec("studies/sst2_gemma2_9b.yaml")  # the old checkout path
    message = str(info.value)
    assert message.startswith("spec file studies/sst2_gemma2_9b.yaml does not exist")
    assert "sst2_gemma2_9b" in message.split(";", 1)[1] and "gemma-search studies" in message


def test_search_values_parse_as_fixed_range_and_choice() -> None:
    spec = spec_from_dict(raw_spec(search={
        "learning_rate": {"low": "1e-5", "high": 1e-3, "log": True},  # PyYAML reads 1e-5 as str
        "lora_r": {"choices": [8, 16]},
        "micro_batch_size": {"low": 1, "high": 8, "step": 1},
        "weight_decay": 0.01,
    }))
    assert spec.search.learning_rate == FloatRange(1e-5, 1e-3, log=True)
    assert spec.search.lora_r == Choice((8, 16))
    assert spec.search.micro_batch_size == IntRange(1, 8)
    assert spec.search.weight_decay == 0.01
    assert spec.direction == "minimize"


def test_unknown_key_names_the_key_and_the_likely_fix() -> None:
    message = error_of(raw_spec(search={"learning_rat": 1e-4}))
    assert "search.learning_rat is not a known key" in message
    assert "did you mean learning_rate" in message


def test_unknown_section_is_refused() -> None:
    assert "pruners is not a known key" in error_of(raw_spec(pruners={"type": "median"}))


def test_range_low_not_below_high() -> None:
    message = error_of(raw_spec(search={"learning_rate": {"low": 0.1, "high": 0.01}}))
    assert message.startswith("search.learning_rate.low is 0.1 but must be < high (0.01)")


def test_log_range_needs_positive_low() -> None:
    message = error_of(raw_spec(search={"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}))
    assert "search.weight_decay.low is 0.0 but a log range needs low > 0" in message


def test_value_outside_its_rule() -> None:
    assert "search.train_fraction is 1.5 but must be <= 1" in error_of(
        raw_spec(search={"train_fraction": 1.5}))
    assert "search.optimizer.choices[1] is 'lion'" in error_of(
        raw_spec(search={"optimizer": {"choices": ["adamw", "lion"]}}))


def test_task_without_its_columns() -> None:
    message = error_of(raw_spec(task={"type": "classification", "text_column": None,
                                      "labels": ["a", "b"]}))
    assert "task.text_column is missing" in message
    message = error_of(raw_spec(task={"type": "causal_lm", "text_column": None, "labels": None,
                                      "completion_column": "output"}))
    assert "task.prompt_template is missing" in message
    assert "task.labels" in error_of(raw_spec(task={"labels": ["only"]}))


def test_sdpa_is_refused_for_gemma2() -> None:
    message = error_of(raw_spec(model={"attn_implementation": "sdpa"}))
    assert "soft-cap" in message and "eager" in message


def test_metric_must_belong_to_the_task() -> None:
    message = error_of(raw_spec(objective={"metric": "rmse"}))
    assert "objective.metric is 'rmse'" in message and "accuracy" in message


def test_eval_points_exactly_one() -> None:
    raw = raw_spec()
    raw["budget"] = {"eval_every_tokens": 10, "eval_every_steps": 5}
    assert "set exactly one" in error_of(raw)


def test_missing_required_key() -> None:
    raw = raw_spec()
    del raw["data"]
    assert error_of(raw) == "data is missing; add it to the spec"


def test_lora_targets_must_name_a_module_set() -> None:
    message = error_of(raw_spec(search={"lora_targets": "mlp_only"}))
    assert "search.lora_targets is 'mlp_only'" in message and "all_linear" in message


def test_overrides_set_nested_keys_and_parse_yaml_values() -> None:
    raw = apply_overrides(raw_spec(), ["search.lora_r=8", "search.optimizer={choices: [sgd]}",
                                       "budget.max_trials=3"])
    spec = spec_from_dict(raw)
    assert spec.search.lora_r == 8
    assert spec.search.optimizer == Choice(("sgd",))
    assert spec.budget.max_trials == 3
    with pytest.raises(SpecError, match="key.path=value"):
        apply_overrides(raw_spec(), ["search.lora_r"])


def test_relative_data_paths_resolve_against_the_spec_file(tmp_path: Path) -> None:
    folder = tmp_path / "studies"
    folder.mkdir()
    raw = raw_spec(data={"train": "../data/train.jsonl"})
    (folder / "s.yaml").write_text(yaml.safe_dump(raw))
    spec = load_spec(folder / "s.yaml")
    assert spec.data.train == str((tmp_path / "data" / "train.jsonl").resolve())
    assert spec.model.name_or_path == "google/gemma-2-9b"  # a hub id stays a hub id


def test_missing_and_broken_spec_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_spec(bad)


def test_whole_epochs_read_and_dump_as_integers() -> None:
    spec = spec_from_dict(raw_spec(search={"epochs": 2}))
    assert spec.search.epochs == 2 and isinstance(spec.search.epochs, int)
    assert "epochs: 2\n" in dump_spec(spec)
    spec = spec_from_dict(raw_spec(search={"epochs": {"choices": [1, 2.0, 1.5]}}))
    assert spec.search.epochs == Choice((1, 2, 1.5))
    assert [type(v) for v in spec.search.epochs.choices] == [int, int, float]
    assert "choices:\n    - 1\n    - 2\n    - 1.5\n" in dump_spec(spec).split("epochs:")[1]
    assert spec_from_dict(raw_spec()).search.epochs == 1  # the default, too
    assert "epochs: 1\n" in dump_spec(spec_from_dict(raw_spec()))
    assert "search.epochs is 0 but must be > 0" in error_of(raw_spec(search={"epochs": 0}))


def test_only_causal_lm_specs_say_they_pack() -> None:
    spec = spec_from_dict(raw_spec())  # classification; packing defaults to on
    assert spec.data.packing is False and "packing: false" in dump_spec(spec)
    lm = spec_from_dict(raw_spec(task={"type": "causal_lm", "labels": None}))
    assert lm.data.packing is True and "packing: true" in dump_spec(lm)
    assert spec_from_dict(raw_spec(task={"type": "causal_lm", "labels": None},
                                   data={"packing": False})).data.packing is False


def test_a_spec_stored_by_an_earlier_version_loads_to_the_same_spec() -> None:
    """Earlier versions dumped `epochs: 2.0` and `packing: true` for every task; such a
    stored spec is the spec this version dumps, hash included."""
    spec = spec_from_dict(raw_spec(search={"epochs": 2, "lora_r": {"choices": [8, 16]}}))
    old = dump_spec(spec).replace("epochs: 2\n", "epochs: 2.0\n").replace(
        "packing: false", "packing: true")
    assert "epochs: 2.0" in old and "packing: true" in old
    assert spec_from_text(old) == spec
    assert spec_hash(spec_from_text(old)) == spec_hash(spec)


# --------------------------------------------------------------------------- untrusted input


@pytest.mark.parametrize("name", ["sst2-gemma2-9b", "a", "A.b_c-9", "x" * 128, "x" * 128 +
                                  ".verify", "_leading-underscore"])
def test_names_that_are_identifiers(name: str) -> None:
    assert spec_from_dict(raw_spec(name=name)).name == name


@pytest.mark.parametrize("name", ["", "..", ".", ".verify", "../x", "a/b", "/abs", "x" * 129,
                                  "a b", "a\x1b[31m", "naïve", "x" * 129 + ".verify"])
def test_names_that_are_not(name: str) -> None:
    message = error_of(raw_spec(name=name))
    assert message.startswith("name is ") or "must be a non-empty string" in message
    assert "\x1b" not in message and len(message) < 300


def test_warm_start_from_study_is_a_name_too() -> None:
    assert "warm_start.from_study is '../other'" in error_of(raw_spec(
        warm_start={"from_study": "../other"}))


@pytest.mark.parametrize("section, key, value", [
    ("data", "max_seq_len", 2**20 + 1), ("budget", "max_trials", 10**6 + 1),
    ("budget", "max_tokens_per_trial", 10**13 + 1), ("budget", "eval_every_tokens", 10**13 + 1),
    ("storage", "max_retries", 101), ("storage", "reconnect_seconds", 10**9),
    ("sampler", "seed", 2**31), ("sampler", "seed", -1), ("pruner", "n_warmup_steps", 10**7),
    ("checkpoints", "every_steps", 10**10), ("warm_start", "from_study_top", 10**4),
])
def test_counts_have_bounds(section: str, key: str, value: int) -> None:
    message = error_of(raw_spec(**{section: {key: value}}))
    assert message.startswith(f"{section}.{key} is {value} but must be between ")


def test_yaml_aliases_and_anchors_are_refused_everywhere(tmp_path: Path) -> None:
    text = dump_spec(spec_from_dict(raw_spec()))
    anchored = text.replace("name: t\n", "name: &n t\n")
    with pytest.raises(SpecError, match="anchor &n is not allowed in a spec"):
        spec_from_text(anchored)
    path = tmp_path / "s.yaml"
    path.write_text(anchored + "extra: *n\n")
    with pytest.raises(SpecError, match=r"s\.yaml at line 1: the anchor &n"):
        load_spec(path)
    with pytest.raises(SpecError, match="--set search.lora_r at line 1: the anchor &a"):
        apply_overrides({}, ["search.lora_r=[&a 1, *a]"])
