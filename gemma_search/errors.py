"""One exception tree for everything a user can get wrong.

The CLI prints a `GemmaSearchError` as one line and exits with code 1; any other exception is a
bug and keeps its traceback. A worker stopped by a configuration error (`is_config_error`)
exits with `CONFIG_ERROR_EXIT` instead, so that `launch` knows a restart would fail the same way.
"""

from __future__ import annotations

__all__ = [
    "CONFIG_ERROR_EXIT",
    "DataError",
    "GemmaSearchError",
    "SpecError",
    "StorageError",
    "StudyNotFoundError",
    "TrainingError",
    "first_line",
    "is_config_error",
]

#: Exit code of a worker stopped by an error in what the user gave it (spec, data, model):
#: `launch` does not restart such a worker, and stops the others, for every restart would
#: load the model again only to stop on the same error.
CONFIG_ERROR_EXIT = 3


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


def is_config_error(exc: BaseException) -> bool:
    """Whether `exc` needs the user to change the spec, the data or the model before a worker
    can run, so that a restart cannot cure it. A `StorageError` is not one: it can be an
    outage that passes (and `launch` finds a missing study before it starts any worker)."""
    return isinstance(exc, SpecError | DataError | TrainingError)
