"""One exception tree for everything a user can get wrong.

The CLI prints a `GemmaSearchError` as one line and exits with code 1; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "GemmaSearchError",
    "SpecError",
    "StorageError",
    "StudyNotFoundError",
    "TrainingError",
    "first_line",
]


class GemmaSearchError(Exception):
    """Base of every error the user can fix; the message says what and how."""


class SpecError(GemmaSearchError):
    """A study spec key is unknown, missing, or has a value outside its rule."""


class DataError(GemmaSearchError):
    """A data file is missing, unreadable, lacks a column, or yields an empty split."""


class StorageError(GemmaSearchError):
    """The Optuna storage cannot be reached or does not hold what was asked for."""


class StudyNotFoundError(StorageError):
    """No study of that name exists in the storage."""


class TrainingError(GemmaSearchError):
    """A trial cannot be trained as configured (e.g. the model cannot be loaded)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: enough to name a cause in one line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
