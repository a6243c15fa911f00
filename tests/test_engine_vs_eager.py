"""The engine's whole causal_lm path against the plain eager one, loss and LoRA gradients.

Engine: `load_base_model(attn_implementation="auto")` (flex_attention or flash-attn on a
GPU, with Liger's kernels patched in where installed; eager on CPU), documents packed into
rows with per-document position ids, `causal_lm_loss_sum` (Liger's fused linear
cross-entropy on a GPU where installed, the chunked torch fusion otherwise).
Reference: `from_pretrained(attn_implementation="eager")`, each document run alone, the full
soft-capped logits, `F.cross_entropy`.

CPU: fp32 within 1e-4. GPU (`pytest -m gpu`): bfloat16 under autocast, as the engine trains;
the loss within 1e-2, the LoRA gradients as close to the fp32 ones as eager bf16's are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gemma_search.train.loss import causal_lm_loss_sum, fused_loss_available
from gemma_search.train.model import attach_lora, load_base_model

from .test_loss import LORA_TARGETS, norm_relative
from .test_packing import LENGTHS, alone, load_model, make_rows, packed_batches

Grads = dict[str, Any]


@pytest.fixture(scope="module")
def windowed_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma 2 with a sliding window of 4, so packed rows cross the local layers'
    window, saved as a model folder for `load_base_model`."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("windowed") / "tiny-gemma2-w4"
    load_model(tiny_model, sliding_window=4).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return path


def adapters(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def eager_reference(path: Path, device: str, dtype: torch.dtype,
                    rows: list[dict[str, Any]]) -> tuple[float, Grads, Grads]:
    """Summed NLL of each document run alone through the eager model, the LoRA gradients,
    and the LoRA weights (B random, so that both factors get a gradient)."""
    from peft import LoraConfig, get_peft_model

    model = load_model(path, device=device, dtype=dtype)
    model.requires_grad_(False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             init_lora_weights=False, bias="none",
                                             target_modules=list(LORA_TARGETS)))
    total = 0.0
    for row in rows:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = alone(model, row)
        loss.backward()
        total += float(loss.detach())
    params = adapters(model)
    return (total, {n: p.grad.detach().clone() for n, p in params.items()},
            {n: p.detach().clone() for n, p in params.items()})


def engine_path(path: Path, device: str, dtype: str, rows: list[dict[str, Any]],
                weights: Grads) -> tuple[float, Grads, str, str]:
    """The same documents through the engine's loader, packing and fused loss."""
    base = load_base_model(name_or_path=str(path), revision=None, task="causal_lm",
                           num_labels=1, dtype=dtype, attn_implementation="auto",
                           device=torch.device(device))
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS)
    params = adapters(model)
    assert params.keys() == weights.keys()
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    one_row = base.attn_implementation == "flash_attention_2"  # varlen wants one row
    total = 0.0
    for batch in packed_batches(rows, 48, 2, one_row=one_row, device=device):
        assert "attention_mask" not in batch
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = causal_lm_loss_sum(model, batch["input_ids"], None, batch["labels"],
                                      batch["position_ids"])
        loss.backward()
        total += float(loss.detach())
    return (total, {n: p.grad.detach().clone() for n, p in params.items()},
            base.attn_implementation, fused_loss_available(torch.device(device)))


def test_engine_path_equals_eager_in_fp32_on_cpu(windowed_model: Path) -> None:
    rows = make_rows(LENGTHS, seed=3)
    ref_loss, ref, weights = eager_reference(windowed_model, "cpu", torch.float32, rows)
    loss, got, attn, backend = engine_path(windowed_model, "cpu", "float32", rows, weights)
    assert (attn, backend) == ("eager", "chunked")
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    for name, g in got.items():
        scale = float(ref[name].abs().max())
        assert scale > 0, name  # the comparison means something
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_path_equals_eager_in_bf16_on_gpu(windowed_model: Path) -> None:
    """The reference runs first: on CUDA the engine's loader patches Liger's kernels into
    transformers' Gemma 2 module for the rest of the process."""
    rows = make_rows(LENGTHS, seed=3)
    _, exact, weights = eager_reference(windowed_model, "cuda", torch.float32, rows)
    ref_loss, ref, _ = eager_reference(windowed_model, "cuda", torch.bfloat16, rows)
    loss, got, attn, backend = engine_path(windowed_model, "cuda", "bfloat16", rows, weights)
    assert attn in ("flex_attention", "flash_attention_2")
    print(f"engine path on GPU: attention {attn}, loss {backend}; loss {loss:.4f} vs eager "
          f"{ref_loss:.4f}; grads vs eager bf16 {norm_relative(got, ref):.4f}, vs fp32 "
          f"{norm_relative(got, exact):.4f} (eager bf16 vs fp32 {norm_relative(ref, exact):.4f})")
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    # bf16 rounding through the decoder's backward puts any two bf16 paths ~1% apart on
    # the tiny model (test_loss.check_bf16); the engine must be as close to fp32 as eager.
    assert norm_relative(got, ref) <= 2e-2
    assert norm_relative(got, exact) <= 1.25 * norm_relative(ref, exact)
