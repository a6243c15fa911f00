"""Load the base model once, attach fresh LoRA adapters per trial, detach them after.

Loading Gemma 2 9B takes 15 s from page cache and minutes from network disk (design
decision 6 in docs/design.md), so a worker keeps the base resident and only adapters come
and go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gemma_search.errors import TrainingError, first_line

__all__ = ["BaseModel", "attach_lora", "detach_lora", "load_base_model", "resolve_attention",
           "resolve_dtype"]

#: flash-attn releases before 2.6 have no soft-cap: Gemma 2 would silently lose it.
FLASH_ATTN_MIN = (2, 6)


@dataclass
class BaseModel:
    """A loaded base model and tokenizer, resident for the life of a worker."""

    model: Any
    tokenizer: Any
    task: str
    device: Any
    head_state: dict[str, Any]
    """Initial weights of the classification/regression head, restored after each trial."""
    memory_baseline: int = 0
    """Device bytes allocated right after loading: where every trial must leave memory."""
    attn_implementation: str = "eager"
    """The attention kernel the model was loaded with (`auto` resolved)."""
    quantized: bool = False
    """The base is 4-bit (QLoRA)."""
    fused_kernels: bool = False
    """Liger Kernel's RMSNorm, GeGLU and RoPE kernels are patched in (CUDA, liger-kernel)."""
    activation_checkpointing: bool = False
    """Turned on for the running trial by its memory plan; off again after it."""

    def memory_above_baseline(self) -> int:
        """Device bytes still allocated beyond the post-load baseline (0 on CPU).

        Adapters, optimizer state and gradients that outlive a trial show up here
        (transformers#13019, optuna#5931; design decision 8).
        """
        if self.device.type != "cuda":
            return 0
        import torch

        return max(0, int(torch.cuda.memory_allocated(self.device)) - self.memory_baseline)


def resolve_attention(requested: str, device_type: str) -> str:
    """The attention kernel to load: one that keeps Gemma 2's attention soft-cap.

    `auto`: flash_attention_2 when flash-attn >= 2.6 is installed on a GPU (varlen packing,
    no [seq, seq] scores), else flex_attention on a GPU, else eager. transformers' `sdpa`
    silently drops the soft-cap (design decision 7), so it is refused outright.
    """
    if requested == "sdpa":
        raise TrainingError("model.attn_implementation is 'sdpa', which drops Gemma 2's "
                            "attention soft-cap; use auto, eager, flex_attention or "
                            "flash_attention_2")
    flash = _flash_attn_version()
    if requested == "flash_attention_2" and (flash is None or flash < FLASH_ATTN_MIN):
        found = "not installed" if flash is None else ".".join(map(str, flash))
        raise TrainingError(f"model.attn_implementation is 'flash_attention_2' but flash-attn "
                            f"is {found}; Gemma 2's soft-cap needs flash-attn >= 2.6 (pip "
                            "install 'flash-attn>=2.6'), or use auto / flex_attention")
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "eager"  # flex_attention on CPU compiles slowly and gains nothing here
    if flash is not None and flash >= FLASH_ATTN_MIN:
        return "flash_attention_2"
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return "eager"
    return "flex_attention"


def _flash_attn_version() -> tuple[int, ...] | None:
    from importlib import metadata

    try:
        raw = metadata.version("flash-attn")
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in raw.split(".")[:2] if part.isdigit())


def resolve_dtype(dtype: str, device_type: str) -> Any:
    """`auto` is bfloat16 on GPU and float32 on CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_base_model(
    *,
    name_or_path: str,
    revision: str | None,
    task: str,
    num_labels: int,
    dtype: str,
    attn_implementation: str,
    device: Any,
    quantization: str = "none",
) -> BaseModel:
    """`from_pretrained` on a hub id or a local folder; the same path for 9B and tiny."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    attn = resolve_attention(attn_implementation, device.type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"model.name_or_path {name_or_path!r} has no loadable tokenizer: "
                            f"{first_line(exc)}; give a local folder written by "
                            "save_pretrained or a hub id you can access (huggingface-cli "
                            "login)") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {
        "revision": revision,
        "dtype": resolve_dtype(dtype, device.type),
        "attn_implementation": attn,
    }
    if quantization == "4bit":
        kwargs.update(_four_bit(device, kwargs["dtype"]))
    # The classification/regression head is missing from the checkpoint and initialised at
    # random: seed it, so that every worker of a study starts its trials from the same head.
    torch.manual_seed(0)
    try:
        if task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path,
                num_labels=num_labels,
                problem_type="regression" if task == "regression" else
                "single_label_classification",
                **kwargs,
            )
    except (OSError, ValueError, ImportError) as exc:
        raise TrainingError(f"model.name_or_path {name_or_path!r} cannot be loaded: "
                            f"{first_line(exc)}") from None
    # The sequence-classification head pools the last non-pad token: it must know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    if quantization != "4bit":
        model.to(device)  # 4-bit weights were placed by device_map and cannot be moved
    fused = _apply_liger_kernels(model, device)
    head = _head(model)
    head_state = {k: v.detach().clone() for k, v in head.state_dict().items()} if head else {}
    baseline = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0
    return BaseModel(model=model, tokenizer=tokenizer, task=task, device=device,
                     head_state=head_state, memory_baseline=baseline, attn_implementation=attn,
                     quantized=quantization == "4bit", fused_kernels=fused)


def _apply_liger_kernels(model: Any, device: Any) -> bool:
    """Patch Liger Kernel's Triton RMSNorm, GeGLU and RoPE into the loaded Gemma 2 (CUDA).

    The loss is not patched here: `train.loss` fuses it, with the final soft-cap, for every
    model head. LoRA still applies: Liger's GeGLU calls the (LoRA-wrapped) projections.
    Without liger-kernel (`pip install gemma-search[gpu]`) the model is left as loaded.
    """
    if device.type != "cuda" or getattr(model.config, "model_type", "") != "gemma2":
        return False
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_gemma2
    except ImportError:
        return False
    apply_liger_kernel_to_gemma2(rope=True, rms_norm=True, geglu=True, cross_entropy=False,
                                 fused_linear_cross_entropy=False, model=model)
    return True


def _four_bit(device: Any, compute_dtype: Any) -> dict[str, Any]:
    """`from_pretrained` arguments for a QLoRA base: NF4 weights, double quantisation,
    bf16 compute (Dettmers et al. 2023), placed on `device` by bitsandbytes."""
    if device.type != "cuda":
        raise TrainingError("model.quantization is '4bit', which needs a CUDA GPU "
                            "(bitsandbytes); use quantization: none on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainingError("model.quantization is '4bit' but bitsandbytes is not installed; "
                            "pip install bitsandbytes, or use quantization: none") from None
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    return {"quantization_config": config, "device_map": {"": device.index or 0}}


def attach_lora(base: BaseModel, *, r: int, alpha: int, dropout: float,
                target_modules: Sequence[str]) -> Any:
    """Wrap the resident model with fresh LoRA adapters (the head trains too, for cls/reg)."""
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = TaskType.CAUSAL_LM if base.task == "causal_lm" else TaskType.SEQ_CLS
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules), task_type=task_type, bias="none")
    try:
        return get_peft_model(base.model, config)
    except ValueError as exc:
        raise TrainingError(f"search.lora_targets {list(target_modules)} do not fit this model: "
                            f"{first_line(exc)}") from None


def detach_lora(base: BaseModel, peft_model: Any) -> None:
    """Remove the adapters and restore the head, leaving the base as it was loaded."""
    import torch

    model = peft_model.unload()
    if model is not base.model:
        raise RuntimeError("peft unload returned a different module than the resident base")
    head = _head(model)
    if head is not None:
        with torch.no_grad():
            for name, tensor in head.state_dict().items():
                tensor.copy_(base.head_state[name])
        head.requires_grad_(False)
    model.requires_grad_(False)


def _head(model: Any) -> Any:
    """The task head that LoRA's SEQ_CLS mode trains in full (Gemma 2 calls it `score`)."""
    return getattr(model, "score", None)

