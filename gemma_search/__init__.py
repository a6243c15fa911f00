"""gemma-search: hyperparameter search for LoRA fine-tuning of Gemma 2 9B.

Modules, one per stage of the flow: `spec` (YAML -> StudySpec), `space` (trial -> TrialConfig),
`storage` and `study` (Optuna storage and studies), `objective` and `worker` (trials),
`train/` (the fine-tuning engine, free of Optuna), `export`, `status`, `tiny`, `demo`, `cli`.
"""

from gemma_search.errors import (
    DataError,
    GemmaSearchError,
    SpecError,
    StorageError,
    StudyNotFoundError,
    TrainingError,
)
from gemma_search.spec import StudySpec, load_spec

__all__ = [
    "DataError",
    "GemmaSearchError",
    "SpecError",
    "StorageError",
    "StudyNotFoundError",
    "StudySpec",
    "TrainingError",
    "load_spec",
]
__version__ = "0.1.0"
