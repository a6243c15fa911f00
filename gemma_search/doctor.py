"""`gemma-search doctor`: can this machine (or container) run the study's workers?

    gemma-search doctor                                   # CUDA, cards, kernels
    gemma-search doctor --study sst2-gemma2-9b            # + storage, model, memory plan
    gemma-search doctor --require-gpu                     # a GPU host: no CUDA is a failure

It checks, in order: CUDA (torch's build and whether it sees a device), each card's free and
total memory, the attention kernel `auto` (or the study's `model.attn_implementation`)
resolves to, whether Liger Kernel and bitsandbytes import (the `gpu` extra), whether the
storage is reachable with gemma-search's tables at head, whether the study's model is
readable (config and tokenizer through `from_pretrained`, no weights), and, with a study on
a GPU, the memory plan (`train.memory.plan_batch`) against the free memory of the fullest card.

It needs nothing but the installed package, so the image runs it as its self-check (the
tests folder is not in the image). A check that cannot apply is skipped, never failed: on a
CPU machine CUDA is `absent` and the GPU-only checks are skipped. Each check is a function
that returns a `Check`; `run_checks` hands later checks what earlier ones found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gemma_search.errors import GemmaSearchError, first_line

if TYPE_CHECKING:
    from gemma_search.spec import StudySpec

__all__ = ["Card", "Check", "Cuda", "failures", "memory_check", "probe_cuda", "render",
           "run_checks", "storage_to_check", "summary"]

#: ok: fine. absent: CUDA is not there, which is no failure on a CPU machine. skipped: the
#: check does not apply here (no CUDA, no storage, no study). failed: the reason says what to do.
Status = Literal["ok", "absent", "skipped", "failed"]

GiB = 2**30
_GPU_EXTRA = "pip install 'gemma-search[gpu]'"


@dataclass(frozen=True)
class Check:
    """One row of the report."""

    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class Card:
    """One CUDA device as torch sees it now."""

    index: int
    name: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Cuda:
    """What torch says about CUDA on this machine."""

    torch_version: str
    cuda_version: str | None
    """The CUDA torch was built for; None for a CPU build."""
    cards: tuple[Card, ...] = ()
    error: str | None = None
    """Why torch or a card could not be asked (a broken install, a failing device)."""

    @property
    def available(self) -> bool:
        return bool(self.cards) and self.error is None


@dataclass
class _Found:
    """What the earlier checks learnt that the later ones need."""

    cuda: Cuda
    attention: str | None = None
    liger: bool = False
    spec: StudySpec | None = None
    model_config: Any = None
    checks: list[Check] = field(default_factory=list)


def probe_cuda() -> Cuda:
    """torch's version, its CUDA build, and every visible card's free and total memory."""
    try:
        import torch
    except Exception as exc:  # a broken torch install raises anything: report it
        return Cuda("not importable", None, error=f"torch does not import "
                                                  f"({type(exc).__name__}: {first_line(exc)})")
    version, built_for = str(torch.__version__), torch.version.cuda
    cards: list[Card] = []
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                cards.append(Card(i, torch.cuda.get_device_name(i), int(free), int(total)))
    except RuntimeError as exc:  # a card in a bad state (ECC, busy, lost): CUDA errors
        return Cuda(version, built_for, tuple(cards), error=f"card {len(cards)} cannot be "
                                                            f"queried: {first_line(exc)}")
    return Cuda(version, built_for, tuple(cards))


def run_checks(*, storage: str | None, study: str | None, require_gpu: bool = False,
               cuda: Cuda | None = None) -> list[Check]:
    """Every check, in report order. `storage`: the --storage flag (resolved as every command
    resolves it, see `storage_to_check`). `cuda`: for tests; probed when None."""
    found = _Found(cuda=cuda if cuda is not None else probe_cuda())
    add = found.checks.append
    add(cuda_check(found.cuda, require_gpu=require_gpu))
    for card in found.cuda.cards:
        add(Check(f"GPU {card.index}", "ok", f"{card.name}: {_gib(card.free_bytes)} GiB free "
                  f"of {_gib(card.total_bytes)} GiB"))
    storage_row, found.spec = _storage_and_study(storage, study)
    add(_attention_check(found))
    liger = import_check("Liger Kernel", "liger_kernel.transformers", "liger-kernel",
                         found.cuda, needed_for="fused RMSNorm, GeGLU, RoPE and loss kernels")
    found.liger = liger.status == "ok"
    add(liger)
    add(import_check("bitsandbytes", "bitsandbytes", "bitsandbytes", found.cuda,
                     needed_for="model.quantization: 4bit"))
    add(storage_row)
    if study is None:
        add(Check("model", "skipped", "no --study"))
    elif found.spec is None:
        add(Check("model", "skipped", "the study's spec could not be read"))
    else:
        model_row, found.model_config = model_check(found.spec)
        add(model_row)
    add(_memory_row(found, study))
    return found.checks


def _storage_and_study(flag: str | None, study: str | None) -> tuple[Check, StudySpec | None]:
    """The storage row, and the study's spec when `--study` names one that can be read."""
    try:
        url = storage_to_check(flag)
    except GemmaSearchError as exc:  # an unreadable $GEMMA_SEARCH_STORAGE_FILE
        return Check("storage", "failed", str(exc)), None
    if study is None:
        return storage_check(url), None
    if url is None:
        return Check("storage", "failed", f"--study {study} needs the storage that holds it: "
                                          "--storage URL or $GEMMA_SEARCH_STORAGE"), None
    return study_spec(url, study)


def cuda_check(cuda: Cuda, *, require_gpu: bool) -> Check:
    if cuda.error is not None:
        return Check("CUDA", "failed", f"{cuda.error}; check the driver with nvidia-smi")
    if cuda.available:
        n = len(cuda.cards)
        return Check("CUDA", "ok", f"torch {cuda.torch_version}, CUDA {cuda.cuda_version}, "
                                   f"{n} card{'s' * (n != 1)}")
    if cuda.cuda_version is None:
        why = f"torch {cuda.torch_version} is a CPU build"
        fix = "install the torch build for your CUDA (README: TORCH=...)"
    else:
        why = f"torch {cuda.torch_version} (CUDA {cuda.cuda_version}) sees no GPU"
        fix = ("start the container with GPUs (docker run --gpus all; Kubernetes: "
               "nvidia.com/gpu) and check the driver with nvidia-smi")
    if require_gpu:
        return Check("CUDA", "failed", f"{why}; {fix}")
    return Check("CUDA", "absent", f"{why}; the GPU checks are skipped")


def _attention_check(found: _Found) -> Check:
    from gemma_search.train.model import resolve_attention

    requested = found.spec.model.attn_implementation if found.spec is not None else "auto"
    device = "cuda" if found.cuda.available else "cpu"
    try:
        found.attention = resolve_attention(requested, device)
    except GemmaSearchError as exc:
        return Check("attention", "failed", str(exc))
    return Check("attention", "ok", f"{requested} -> {found.attention} on {device.upper()}")


def import_check(name: str, module: str, dist: str, cuda: Cuda, *, needed_for: str) -> Check:
    """Whether `module` imports. It is part of the `gpu` extra: missing is a failure on a GPU
    machine (the image claims to have it) and no failure without CUDA, where it is unused."""
    import importlib
    from importlib import metadata

    try:
        importlib.import_module(module)
        version = metadata.version(dist)
    except Exception as exc:  # a broken install raises anything from its import: report it
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == module.split(".")[0]
        why = ("not installed" if missing
               else f"{module} does not import ({type(exc).__name__}: {first_line(exc)})")
        if not cuda.available:
            return Check(name, "skipped", f"{why}; used on CUDA only ({needed_for})")
        return Check(name, "failed", f"{why}; without it no {needed_for}: {_GPU_EXTRA}")
    where = "" if cuda.available else "; used on CUDA only"
    return Check(name, "ok", f"{dist} {version}{where}")


def storage_check(url: str | None) -> Check:
    """Reachable, with gemma-search's tables at the head this version knows. The password is
    never shown: URLs are printed through `redact`, driver errors through `StorageError`."""
    from gemma_search import db
    from gemma_search.storage import redact

    if url is None:
        return Check("storage", "skipped", "no --storage, $GEMMA_SEARCH_STORAGE or "
                                           "$GEMMA_SEARCH_STORAGE_FILE")
    shown = redact(url)
    try:
        revision, head = db.current(url), db.head_revision()
    except GemmaSearchError as exc:
        return Check("storage", "failed", str(exc))
    if revision is None:
        return Check("storage", "failed", f"{shown} has no gemma-search tables; run "
                                          "`gemma-search db upgrade`")
    if revision != head:
        return Check("storage", "failed", f"{shown}: gemma-search tables at {revision}, this "
                                          f"version needs {head}; run `gemma-search db upgrade`")
    return Check("storage", "ok", f"{shown}: reachable, gemma-search tables at {head} (head)")


def study_spec(url: str, study: str) -> tuple[Check, StudySpec | None]:
    """The storage row, and the study's stored spec (None if the storage or study fails)."""
    from gemma_search import db
    from gemma_search.spec import spec_from_text
    from gemma_search.storage import redact

    row = storage_check(url)
    if row.status != "ok":
        return row, None
    try:
        engine = db.make_engine(url)
        try:
            stored = db.load_study_spec(engine, study)
        finally:
            engine.dispose()
        if stored is None:
            return Check("storage", "failed", f"{redact(url)} holds no study {study!r} created "
                                              "by gemma-search; create it with `gemma-search "
                                              "create SPEC`"), None
        spec = spec_from_text(stored[0])
    except GemmaSearchError as exc:
        return Check("storage", "failed", str(exc)), None
    return Check("storage", "ok", f"{row.detail}; study {study!r} found"), spec


def model_check(spec: StudySpec) -> tuple[Check, Any]:
    """The study's model config and tokenizer, loaded as workers load them, without weights."""
    name, revision = spec.model.name_or_path, spec.model.revision
    try:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(name, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except Exception as exc:  # OSError (no access, no file), ValueError, hub errors alike
        return Check("model", "failed", f"model.name_or_path {name!r} cannot be read: "
                                        f"{type(exc).__name__}: {first_line(exc)}; give a "
                                        "local folder written by save_pretrained, or a hub id "
                                        "you can access (hf auth login)"), None
    layers = getattr(config, "num_hidden_layers", "?")
    return Check("model", "ok", f"{name}: {config.model_type}, {layers} layers, vocabulary "
                                f"{len(tokenizer)} ({type(tokenizer).__name__})"), config


def _memory_row(found: _Found, study: str | None) -> Check:
    if study is None:
        return Check("memory plan", "skipped", "no --study")
    if not found.cuda.available:
        return Check("memory plan", "skipped", "no CUDA: CPU trials plan no device memory")
    if found.spec is None or found.model_config is None or found.attention is None:
        return Check("memory plan", "skipped", "needs the study's model and attention")
    card = min(found.cuda.cards, key=lambda c: c.free_bytes)
    return memory_check(found.spec, found.model_config, card, attention=found.attention,
                        fused_kernels=found.liger)


def memory_check(spec: StudySpec, model_config: Any, card: Card, *, attention: str,
                 fused_kernels: bool) -> Check:
    """The engine's batch plan for the study's largest trial on `card`'s free memory.

    Largest: the biggest micro-batch, LoRA rank, dropout and target set the search can pick,
    at `data.max_seq_len`. Workers each have a card: the fullest one is the one to check.
    """
    from gemma_search.train.memory import ModelShapes, plan_batch

    try:
        shapes = ModelShapes.from_config(model_config)
    except ValueError as exc:
        return Check("memory plan", "skipped", str(exc))
    search, model = spec.search, spec.model
    targets = max((model.lora_target_modules[name] for name in _choices(search.lora_targets)),
                  key=len)
    weight_bytes = 0.55 if model.quantization == "4bit" else {
        "float32": 4.0}.get(model.dtype, 2.0)  # auto: bfloat16 on GPU
    plan = plan_batch(shapes, free_bytes=card.free_bytes,
                      micro_batch=int(max(_choices(search.micro_batch_size))),
                      grad_accum=int(max(_choices(search.gradient_accumulation_steps))),
                      seq_len=spec.data.max_seq_len, weight_bytes=weight_bytes,
                      lora_r=int(max(_choices(search.lora_r))), lora_targets=targets,
                      lora_dropout=float(max(_choices(search.lora_dropout))),
                      attention=attention,  # type: ignore[arg-type]
                      fused_loss=True, fused_kernels=fused_kernels, task=spec.task.type)
    where = f"GPU {card.index} ({_gib(card.free_bytes)} GiB free)"
    return Check("memory plan", "ok" if plan.fits else "failed", f"{where}: {plan.reason}")


def _choices(value: Any) -> tuple[Any, ...]:
    """Every value a search key can take that bounds memory: a range's ends, the choices, or
    the fixed value."""
    from gemma_search.spec import Choice, FloatRange, IntRange

    if isinstance(value, Choice):
        return tuple(value.choices)
    if isinstance(value, FloatRange | IntRange):
        return (value.low, value.high)
    return (value,)


def storage_to_check(flag: str | None) -> str | None:
    """The storage to check: as every command resolves it, except that the default SQLite file
    is only checked where it exists (doctor never creates a database)."""
    from gemma_search.storage import (
        DEFAULT_STORAGE,
        STORAGE_ENV,
        STORAGE_FILE_ENV,
        resolve_storage_url,
    )

    url = resolve_storage_url(flag)
    configured = flag or os.environ.get(STORAGE_ENV) or os.environ.get(STORAGE_FILE_ENV)
    if not configured and url == DEFAULT_STORAGE:
        return url if Path(url.removeprefix("sqlite:///")).exists() else None
    return url


def failures(checks: list[Check]) -> list[str]:
    """One line per failed check: `NAME: reason`."""
    return [f"{c.name}: {c.detail}" for c in checks if c.status == "failed"]


def summary(checks: list[Check]) -> str:
    """The verdict in one line, naming what was absent or skipped (neither is a failure)."""
    failed = sum(c.status == "failed" for c in checks)
    parts = [f"{failed} of {len(checks)} checks failed" if failed else "no check failed"]
    parts += [f"{c.name} is absent" for c in checks if c.status == "absent"]
    skipped = [c.name for c in checks if c.status == "skipped"]
    if skipped:
        parts.append(f"skipped (not failures): {', '.join(skipped)}")
    return "; ".join(parts)


def render(checks: list[Check]) -> str:
    """A plain-text table: no wrapping, so it reads the same in a terminal and in pod logs."""
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  {'result':<7}  detail"]
    lines += [f"{c.name:<{width}}  {c.status:<7}  {c.detail}" for c in checks]
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"
