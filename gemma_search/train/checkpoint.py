"""Trial checkpoints: adapter weights, optimizer, scheduler, RNG and data position.

A retried trial continues from its predecessor's latest checkpoint instead of restarting
from zero (design decision 3; optuna#3351). A checkpoint is a folder written under a temporary
name and renamed into place, so a reader never sees half of one.

A checkpoint holds tensors and plain values only (safetensors for the adapters; for the rest,
a file torch's `weights_only` unpickler reads), because the folder it is read from comes out
of the database: whoever can write a `gs_checkpoints` row could otherwise run code on every
worker that resumes from it.
"""

from __future__ import annotations

import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gemma_search.errors import TrainingError

__all__ = ["CheckpointRefused", "Checkpointing", "TrainState", "check_checkpoint",
           "load_checkpoint", "save_checkpoint"]

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
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": _plain(asdict(state)),
        "rng": {
            "python": random.getstate(),  # (version, 625 ints, gauss): plain values already
            # numpy's state as plain values: a pickled ndarray needs weights_only=False.
            "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
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
    """Restore adapters, optimizer, scheduler and RNG from `path`; return the state.

    Nothing in the folder is run: the trainer file is read with `weights_only=True`
    (a CheckpointRefused otherwise). Call `check_checkpoint` first to decide whether to
    resume at all.
    """
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = _read_trainer(path / TRAINER_FILE, mmap=False)
    set_peft_model_state_dict(model, load_file(str(path / ADAPTER_FILE)))
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = saved["rng"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = rng["numpy"]
    np.random.set_state((numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    # Keys of older versions (e.g. next_eval_tokens, before evaluations were planned in
    # steps) are dropped: the step count alone now says when the next evaluation is due.
    known = {f.name for f in fields(TrainState)}
    return TrainState(**{k: v for k, v in saved["state"].items() if k in known})


class CheckpointRefused(TrainingError):
    """A checkpoint a retry does not resume from: outside the study's checkpoint folder,
    not readable here, or holding more than tensors and plain values."""


def check_checkpoint(path: Path, root: Path) -> Path:
    """`path` resolved, if a retry may resume from it; else CheckpointRefused says why.

    `root` is the study's checkpoint folder: a path from the database is accepted only inside
    it, symlinks followed, so a row cannot send a worker to read another folder. The trainer
    file must load with torch's `weights_only` unpickler, which builds tensors and plain
    values and calls nothing else, and hold what `save_checkpoint` writes; its tensors are
    mapped, not read (`mmap`), so the check costs little even for a large optimizer state.
    """
    from safetensors import safe_open

    root = root.resolve()
    real = path.resolve()
    if not real.is_relative_to(root):
        raise CheckpointRefused(f"{path} is outside the study's checkpoint folder {root}")
    for name in (ADAPTER_FILE, TRAINER_FILE):
        file = real / name
        if not file.is_file():
            # Recorded on another machine's local disk: checkpoints.dir should be shared.
            raise CheckpointRefused(f"{file} is not readable here; checkpoints.dir must be a "
                                    "folder every worker reaches")
        if not file.resolve().is_relative_to(root):
            raise CheckpointRefused(f"{file} links to {file.resolve()}, outside the study's "
                                    f"checkpoint folder {root}")
    _read_trainer(real / TRAINER_FILE, mmap=True)
    try:
        with safe_open(str(real / ADAPTER_FILE), framework="pt") as adapters:
            adapters.keys()
    except Exception as exc:  # safetensors only parses: a bad header is all it can meet
        raise CheckpointRefused(f"{real / ADAPTER_FILE} is not a safetensors file "
                                f"({type(exc).__name__})") from None
    return real


#: The global a refused trainer file asked for, in torch's UnpicklingError message.
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _read_trainer(file: Path, *, mmap: bool) -> dict[str, Any]:
    """The trainer file as `save_checkpoint` wrote it, read with `weights_only=True`."""
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it did not write
            warnings.simplefilter("ignore", UserWarning)
            saved = torch.load(file, weights_only=True, mmap=mmap,
                               map_location="cpu" if mmap else None)
    except Exception as exc:
        # weights_only refuses any object beyond tensors and plain values before building it.
        asked = _GLOBAL.search(str(exc))
        if asked is not None and asked.group(1).startswith("numpy"):
            raise CheckpointRefused(
                f"{file} was written by gemma-search before checkpoints held plain values "
                "only (its numpy state is pickled), and that format is not loaded") from None
        why = (f"it asks to call {asked.group(1)}" if asked is not None
               else type(exc).__name__)
        raise CheckpointRefused(f"{file} holds more than tensors and plain values ({why}); "
                                "it was not written by gemma-search") from None
    problem = _layout_problem(saved)
    if problem is not None:
        raise CheckpointRefused(f"{file} is not a gemma-search checkpoint: {problem}")
    return saved  # type: ignore[no-any-return]


def _layout_problem(saved: Any) -> str | None:
    """What in `saved` differs from what `save_checkpoint` writes, or None."""
    import torch

    if not isinstance(saved, dict):
        return f"it holds a {type(saved).__name__}, not a mapping"
    missing = {"optimizer", "scheduler", "state", "rng"} - set(saved)
    if missing:
        return f"{', '.join(sorted(missing))} missing"
    rng = saved["rng"]
    if not (isinstance(saved["optimizer"], dict) and isinstance(saved["scheduler"], dict)
            and isinstance(saved["state"], dict) and isinstance(rng, dict)):
        return "optimizer, scheduler, state and rng must be mappings"
    python, numpy_state = rng.get("python"), rng.get("numpy")
    if not (isinstance(python, tuple | list) and len(python) == 3
            and isinstance(python[1], tuple | list)):
        return "rng.python is not Python's random state"
    if not (isinstance(numpy_state, dict)
            and {"kind", "keys", "pos", "has_gauss", "cached_gaussian"} <= set(numpy_state)):
        return "rng.numpy is not numpy's random state"
    if not isinstance(rng.get("torch"), torch.Tensor):
        return "rng.torch is not a tensor"
    return None


def _plain(value: Any) -> Any:
    """`value` with numpy scalars as Python numbers, which `weights_only` reads back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    item = getattr(value, "item", None)
    if item is not None and type(value).__module__ == "numpy":
        return item()
    return value
