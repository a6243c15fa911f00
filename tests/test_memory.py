"""The memory estimate against the measured peaks of docs/design.md, and the batch plan built on it.

Pure arithmetic: no torch, no transformers (the config is duck-typed), well under a second.
"""

from __future__ import annotations

import itertools
import math
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from gemma_search.train.memory import (
    ALL_LINEAR,
    GEMMA2_9B,
    GiB,
    ModelShapes,
    estimate_peak_bytes,
    free_device_bytes,
    plan_batch,
)

# docs/design.md's performance references: H200, Gemma 2 9B shapes, LoRA r16 all-linear, seq 1024,
# bf16 weights, AdamW. "Liger" = fused linear cross-entropy + RMSNorm + GeGLU + RoPE kernels.
REFERENCE_ROWS = [
    pytest.param(dict(micro_batch=4, attention="eager", checkpointing=True, fused_loss=False),
                 35, id="plain-eager-ckpt-b4"),
    pytest.param(dict(micro_batch=4, attention="eager", checkpointing=True, fused_loss=True),
                 21, id="liger-eager-ckpt-b4"),
    pytest.param(dict(micro_batch=4, attention="eager", checkpointing=False, fused_loss=True),
                 89, id="liger-eager-b4"),
    pytest.param(dict(micro_batch=8, attention="flex_attention", checkpointing=False,
                      fused_loss=True), 115, id="liger-flex-b8"),
]

# tiny.py's Gemma 2, with the attribute names of transformers' Gemma2Config
TINY = SimpleNamespace(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       sliding_window=64)


def estimate(**kw: Any) -> int:
    args: dict[str, Any] = dict(micro_batch=4, seq_len=1024, lora_r=16,
                                lora_targets=ALL_LINEAR)
    args.update(kw)
    return estimate_peak_bytes(GEMMA2_9B, **args).total


@pytest.mark.parametrize(("kwargs", "measured_gib"), REFERENCE_ROWS)
def test_estimate_within_20_percent_of_design_table(kwargs: dict[str, Any],
                                                    measured_gib: float) -> None:
    got = estimate(**kwargs) / GiB
    assert abs(got - measured_gib) <= 0.2 * measured_gib, f"{got:.1f} vs {measured_gib} GiB"


def test_gemma2_9b_shapes() -> None:
    config = dict(vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                  num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=256, sliding_window=4096)
    assert ModelShapes.from_config(config) == GEMMA2_9B == ModelShapes.gemma2_9b()
    assert GEMMA2_9B.n_params == pytest.approx(9.24e9, rel=0.001)


def test_breakdown_parts() -> None:
    plain = estimate_peak_bytes(GEMMA2_9B, micro_batch=4, seq_len=1024, checkpointing=True)
    parts = plain.breakdown()
    assert parts["weights"] == pytest.approx(9_241_705_984 * 2 / GiB)
    # r16 on all seven projections: 1,286,144 adapter params per layer, 16 bytes each
    assert plain.lora_params == 42 * 1_286_144
    assert parts["adapters"] == pytest.approx(plain.lora_params * 16 / GiB)
    assert parts["logits"] > parts["backward"]  # unfused 256k-vocab logits dominate
    assert parts["attention_scores"] == 0  # checkpointed: recomputed per layer
    assert parts["total"] == pytest.approx(plain.total / GiB)


@pytest.mark.parametrize("attention", ["eager", "flex_attention", "flash_attention_2"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("fused_loss", [False, True])
def test_monotonic_in_micro_batch_and_seq_len(attention: str, checkpointing: bool,
                                              fused_loss: bool) -> None:
    kw: dict[str, Any] = dict(attention=attention, checkpointing=checkpointing,
                              fused_loss=fused_loss)
    by_batch = [estimate(micro_batch=b, **kw) for b in (1, 2, 3, 4, 8, 16)]
    by_seq = [estimate(seq_len=s, **kw) for s in (128, 512, 1024, 2048, 8192)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == len(by_batch)
    assert by_seq == sorted(by_seq) and len(set(by_seq)) == len(by_seq)


@pytest.mark.parametrize("attention", ["eager", "flex_attention", "flash_attention_2"])
def test_checkpointing_and_fused_loss_lower_the_estimate(attention: str) -> None:
    for micro_batch in (1, 4, 8):
        base = dict(micro_batch=micro_batch, attention=attention)
        assert estimate(checkpointing=True, **base) < estimate(checkpointing=False, **base)
        for ckpt in (False, True):
            assert (estimate(fused_loss=True, checkpointing=ckpt, **base)
                    < estimate(fused_loss=False, checkpointing=ckpt, **base))


def test_eager_costs_more_than_flex_for_long_sequences() -> None:
    eager = estimate(micro_batch=1, seq_len=8192, attention="eager", fused_loss=True)
    flex = estimate(micro_batch=1, seq_len=8192, attention="flex_attention", fused_loss=True)
    assert eager > flex + 40 * GiB  # 42 layers of [16, 8192, 8192] scores


def test_lora_targets_and_dropout() -> None:
    all_linear = estimate_peak_bytes(GEMMA2_9B, micro_batch=1, seq_len=1024,
                                     lora_targets="all-linear")
    listed = estimate_peak_bytes(GEMMA2_9B, micro_batch=1, seq_len=1024)
    assert all_linear == listed
    attn_only = estimate_peak_bytes(GEMMA2_9B, micro_batch=1, seq_len=1024,
                                    lora_targets=("q_proj", "v_proj", "lm_headish"))
    assert attn_only.ignored_targets == ("lm_headish",)
    assert attn_only.lora_params < listed.lora_params
    assert attn_only.total < listed.total
    no_dropout = estimate_peak_bytes(GEMMA2_9B, micro_batch=1, seq_len=1024, lora_dropout=0.0)
    assert no_dropout.activations < listed.activations


def test_quantised_weights_keep_the_embedding_in_bf16() -> None:
    qlora = estimate_peak_bytes(GEMMA2_9B, micro_batch=1, seq_len=1024, weight_bytes=0.55)
    embedding = GEMMA2_9B.vocab * GEMMA2_9B.hidden
    assert qlora.weights == int((GEMMA2_9B.n_params - embedding) * 0.55 + embedding * 2)
    fp32 = estimate_peak_bytes(GEMMA2_9B, micro_batch=1, seq_len=1024, weight_bytes=4)
    bf16 = estimate_peak_bytes(GEMMA2_9B, micro_batch=1, seq_len=1024)
    assert fp32.activations > bf16.activations  # fp32 weights mean fp32 activations


def test_classification_has_no_vocab_logits() -> None:
    causal = estimate_peak_bytes(GEMMA2_9B, micro_batch=4, seq_len=1024, checkpointing=True)
    cls = estimate_peak_bytes(GEMMA2_9B, micro_batch=4, seq_len=1024, checkpointing=True,
                              task="classification")
    assert cls.logits == 0 and cls.total < causal.total - 10 * GiB


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="sdpa"):
        estimate_peak_bytes(GEMMA2_9B, micro_batch=1, seq_len=8, attention="sdpa")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="micro_batch"):
        estimate_peak_bytes(GEMMA2_9B, micro_batch=0, seq_len=8)
    with pytest.raises(ValueError, match="no vocab_size"):
        ModelShapes.from_config({"hidden_size": 8, "num_attention_heads": 2,
                                 "intermediate_size": 16, "num_hidden_layers": 1})


# --------------------------------------------------------------------------- the plan


def plan(free_gib: float | None, **kw: Any) -> Any:
    args: dict[str, Any] = dict(micro_batch=8, grad_accum=2, seq_len=1024)
    args.update(kw)
    free = None if free_gib is None else int(free_gib * GiB)
    return plan_batch(GEMMA2_9B, free_bytes=free, **args)


def test_h200_keeps_b8_flex_without_checkpointing() -> None:
    # docs/design.md: Liger + flex_attention, no checkpointing, b8 measured 115 GiB on the H200
    p = plan(141, attention="flex_attention", fused_loss=True)
    assert (p.micro_batch, p.grad_accum, p.checkpointing, p.fits) == (8, 2, False, True)
    assert p.estimate.total <= p.budget_bytes


def test_80_gib_halves_the_micro_batch_rather_than_checkpoint() -> None:
    for kw in (dict(attention="flex_attention", fused_loss=True), dict()):
        p = plan(80, **kw)
        assert p.fits and p.micro_batch < 8 and not p.checkpointing
        assert p.micro_batch * p.grad_accum == 16
        assert p.estimate.total <= 0.9 * 80 * GiB
        assert "search.micro_batch_size" in p.reason
    assert plan(80, attention="flex_attention", fused_loss=True).micro_batch == 4


def test_checkpointing_when_nothing_fits_without_it() -> None:
    # Liger + checkpointing at b4 measured 21 GiB: on 24 GiB only checkpointing fits
    p = plan(24, attention="flex_attention", fused_loss=True)
    assert p.fits and p.checkpointing
    assert p.micro_batch * p.grad_accum == 16
    assert "with checkpointing" in p.reason


def test_24_gib_cannot_hold_bf16_9b_with_unfused_logits() -> None:
    p = plan(24)
    assert not p.fits
    assert (p.micro_batch, p.grad_accum, p.checkpointing) == (1, 16, True)
    assert "QLoRA" in p.reason and "data.max_seq_len" in p.reason
    qlora = plan(24, weight_bytes=0.55)
    assert qlora.fits and qlora.micro_batch * qlora.grad_accum == 16


def test_weights_alone_too_big_names_qlora() -> None:
    p = plan(16)
    assert not p.fits and "weights" in p.reason and "QLoRA" in p.reason


def test_resident_weights_count_toward_the_budget() -> None:
    weights = estimate_peak_bytes(GEMMA2_9B, micro_batch=1, seq_len=1024).weights
    p = plan_batch(GEMMA2_9B, free_bytes=141 * GiB - weights, resident_bytes=weights,
                   micro_batch=8, grad_accum=2, seq_len=1024, attention="flex_attention",
                   fused_loss=True)
    assert (p.micro_batch, p.checkpointing, p.fits) == (8, False, True)


def test_no_device_limit_keeps_the_request() -> None:
    p = plan(None, micro_batch=64, grad_accum=1, seq_len=8192)
    assert (p.micro_batch, p.grad_accum, p.checkpointing, p.fits) == (64, 1, False, True)


@pytest.mark.parametrize(("micro_batch", "grad_accum"), [(8, 2), (6, 1), (5, 3), (3, 4), (1, 7),
                                                         (16, 1), (12, 5)])
def test_effective_batch_is_preserved(micro_batch: int, grad_accum: int) -> None:
    effective = micro_batch * grad_accum
    for free, attention, fused, seq in itertools.product(
            (16, 24, 40, 80, 141, 1000), ("eager", "flex_attention"), (False, True),
            (256, 1024, 4096)):
        p = plan(free, micro_batch=micro_batch, grad_accum=grad_accum, attention=attention,
                 fused_loss=fused, seq_len=seq)
        # the engine slices a window of `effective` examples into micro-batches: the last may
        # be short, exactly as its OOM path's ceil leaves it
        assert p.grad_accum == math.ceil(effective / p.micro_batch)
        assert p.micro_batch * p.grad_accum >= effective
        assert (p.grad_accum - 1) * p.micro_batch < effective
        assert 1 <= p.micro_batch <= micro_batch
        if p.fits:
            assert p.estimate.total <= p.budget_bytes
            if p.micro_batch == micro_batch and not p.checkpointing:
                assert p.grad_accum == grad_accum


def test_tiny_model_config() -> None:
    shapes = ModelShapes.from_config(TINY)
    assert shapes.n_params == 156_224  # Gemma2ForCausalLM(tiny config).parameters(), counted
    assert shapes == ModelShapes.from_config(vars(TINY))
    est = estimate_peak_bytes(shapes, micro_batch=16, seq_len=64, weight_bytes=4, lora_r=8)
    assert 0 < est.total < 1 * GiB
    p = plan_batch(shapes, free_bytes=8 * GiB, micro_batch=16, grad_accum=1, seq_len=64)
    assert (p.micro_batch, p.checkpointing, p.fits) == (16, False, True)


def test_free_device_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = SimpleNamespace(mem_get_info=lambda device: (10 * GiB, 80 * GiB),
                           memory_reserved=lambda device: 3 * GiB,
                           memory_allocated=lambda device: 2 * GiB)
    fake = SimpleNamespace(device=lambda d: SimpleNamespace(type=str(d).split(":")[0]),
                           cuda=cuda)
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert free_device_bytes("cpu") is None
    assert free_device_bytes("cuda:0") == 11 * GiB  # free + reserved-but-unallocated
