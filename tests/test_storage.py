"""Storage URLs: where they come from, and that a password never shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma_search.errors import StorageError
from gemma_search.storage import is_transient, redact, resolve_storage_url


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "url"
    secret.write_text("postgresql+psycopg2://u:pw@db/x\n")
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE", raising=False)
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE_FILE", raising=False)
    assert resolve_storage_url(None) == "sqlite:///gemma_search.db"
    assert resolve_storage_url(None, "sqlite:///spec.db") == "sqlite:///spec.db"
    monkeypatch.setenv("GEMMA_SEARCH_STORAGE_FILE", str(secret))
    assert resolve_storage_url(None, "sqlite:///spec.db") == "postgresql+psycopg2://u:pw@db/x"
    monkeypatch.setenv("GEMMA_SEARCH_STORAGE", "sqlite:///env.db")
    assert resolve_storage_url(None) == "sqlite:///env.db"
    assert resolve_storage_url("sqlite:///flag.db") == "sqlite:///flag.db"


def test_unreadable_url_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE", raising=False)
    monkeypatch.setenv("GEMMA_SEARCH_STORAGE_FILE", str(tmp_path / "missing"))
    with pytest.raises(StorageError, match="cannot be read"):
        resolve_storage_url(None)
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("GEMMA_SEARCH_STORAGE_FILE", str(tmp_path / "empty"))
    with pytest.raises(StorageError, match="is empty"):
        resolve_storage_url(None)


def test_redact_hides_the_password() -> None:
    assert redact("postgresql+psycopg2://gemma:hunter2@db:5432/gs") == (
        "postgresql+psycopg2://gemma:***@db:5432/gs")
    assert redact("sqlite:///x.db") == "sqlite:///x.db"
    assert "hunter2" not in redact("not a url hunter2")


def test_transient_errors_are_read_through_the_chain() -> None:
    try:
        try:
            raise RuntimeError("FATAL: sorry, too many clients already")
        except RuntimeError as inner:
            raise ValueError("An exception is raised during the commit") from inner
    except ValueError as outer:
        assert is_transient(outer)
    assert not is_transient(ValueError('password authentication failed for user "x"'))
