"""Trial checkpoints: adapter weights, optimizer, scheduler, RNG and data position.

A retried trial continues from its predecessor's latest checkpoint instead of restarting
from zero (DESIGN decision 3; optuna#3351). A checkpoint is a folder written under a temporary
name and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["Checkpointing", "TrainState", "load_checkpoint", "save_checkpoint"]

ADAPTER_FILE = "adapter.safetensors"
TRAINER_FILE = "trainer.pt"


@dataclass
class TrainState:
    """Where a trial stands: everything besides tensors that a resumed run needs."""

    step: int = 0
    tokens: int = 0
    evals: int = 0
    since_best: int = 0
    best: dict[str, float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0
    """Data position: the epoch's permutation and how many of its examples were used."""
    example_offset: int = 0
    micro_batch_size: int = 1
    """Current micro-batch; smaller than the config's after an out-of-memory retry."""
    gradient_accumulation_steps: int = 1
    oom_events: list[dict[str, int]] = field(default_factory=list)


@dataclass
class Checkpointing:
    """Where and when a trial saves checkpoints, and which one it resumes from."""

    directory: Path
    """This trial's folder; checkpoints go to step-NNNNNNNN/ under it."""
    every_steps: int | None = None
    """Save every this many optimizer steps; None: after every evaluation."""
    resume_from: Path | None = None
    """A checkpoint folder (usually the predecessor trial's latest) to continue from."""
    keep_last: int = 2
    """Older checkpoints of this trial are deleted."""
    on_saved: Callable[[int, int, Path], None] | None = None
    """Called with (step, tokens, path) after each save, e.g. to record it in the database."""


def save_checkpoint(ckpt: Checkpointing, model: Any, optimizer: Any, scheduler: Any,
                    state: TrainState) -> Path:
    """Write one checkpoint of the running trial; return its folder."""
    import numpy as np
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    final = ckpt.directory / f"step-{state.step:08d}"
    tmp = ckpt.directory / f".tmp-step-{state.step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    adapter = {k: v.detach().contiguous().cpu() for k, v in
               get_peft_model_state_dict(model).items()}
    save_file(adapter, str(tmp / ADAPTER_FILE))
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": asdict(state),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }, tmp / TRAINER_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(ckpt.directory.glob("step-*"))[:-ckpt.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    if ckpt.on_saved is not None:
        ckpt.on_saved(state.step, state.tokens, final)
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> TrainState:
    """Restore adapters, optimizer, scheduler and RNG from `path`; return the state."""
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / ADAPTER_FILE)))
    # weights_only=False: the file holds Python RNG state tuples; it is our own file.
    saved = torch.load(path / TRAINER_FILE, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = saved["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    # Keys of older versions (e.g. next_eval_tokens, before evaluations were planned in
    # steps) are dropped: the step count alone now says when the next evaluation is due.
    known = {f.name for f in fields(TrainState)}
    return TrainState(**{k: v for k, v in saved["state"].items() if k in known})
