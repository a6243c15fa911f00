"""Loading the base: an attention kernel that keeps Gemma 2's soft-cap, and the QLoRA option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma_search.errors import TrainingError
from gemma_search.train import model as model_module
from gemma_search.train.model import load_base_model, resolve_attention


def test_auto_attention_is_eager_on_cpu_and_never_sdpa() -> None:
    assert resolve_attention("auto", "cpu") == "eager"
    assert resolve_attention("eager", "cuda") == "eager"
    assert resolve_attention("flex_attention", "cuda") == "flex_attention"
    with pytest.raises(TrainingError, match="'sdpa', which drops Gemma 2's attention soft-cap"):
        resolve_attention("sdpa", "cuda")


def test_auto_attention_on_gpu_prefers_flash_then_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module, "_flash_attn_version", lambda: (2, 7))
    assert resolve_attention("auto", "cuda") == "flash_attention_2"
    monkeypatch.setattr(model_module, "_flash_attn_version", lambda: (2, 5))
    assert resolve_attention("auto", "cuda") == "flex_attention"  # 2.5 has no soft-cap
    with pytest.raises(TrainingError, match=r"flash-attn is 2\.5; .* needs flash-attn >= 2\.6"):
        resolve_attention("flash_attention_2", "cuda")
    monkeypatch.setattr(model_module, "_flash_attn_version", lambda: None)
    assert resolve_attention("auto", "cuda") == "flex_attention"
    with pytest.raises(TrainingError, match="flash-attn is not installed"):
        resolve_attention("flash_attention_2", "cuda")


def test_the_loaded_model_keeps_its_soft_caps(tiny_model: Path) -> None:
    base = load_base_model(name_or_path=str(tiny_model), revision=None, task="causal_lm",
                           num_labels=1, dtype="float32", attn_implementation="auto",
                           device=torch.device("cpu"))
    assert base.attn_implementation == "eager"
    assert base.model.config._attn_implementation == "eager"
    assert base.model.config.attn_logit_softcapping == 50.0
    assert base.model.config.final_logit_softcapping == 30.0


def test_four_bit_needs_a_gpu(tiny_model: Path) -> None:
    with pytest.raises(TrainingError, match="'4bit', which needs a CUDA GPU"):
        load_base_model(name_or_path=str(tiny_model), revision=None, task="causal_lm",
                        num_labels=1, dtype="auto", attn_implementation="auto",
                        device=torch.device("cpu"), quantization="4bit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_four_bit_base_trains_lora_on_gpu(tiny_model: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from gemma_search.train.model import attach_lora, detach_lora

    base = load_base_model(name_or_path=str(tiny_model), revision=None, task="causal_lm",
                           num_labels=1, dtype="auto", attn_implementation="auto",
                           device=torch.device("cuda"), quantization="4bit")
    assert base.quantized
    peft_model = attach_lora(base, r=4, alpha=8, dropout=0.0, target_modules=("q_proj",))
    ids = torch.randint(0, 100, (2, 16), device="cuda")
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    detach_lora(base, peft_model)
