"""The fused causal-LM loss equals the eager reference on a tiny Gemma 2, soft-cap included,
and never builds a [batch, seq, vocab] tensor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gemma_search.errors import TrainingError
from gemma_search.train.data import collate
from gemma_search.train.loss import causal_lm_loss_sum, fused_loss_available
from gemma_search.train.model import BaseModel, attach_lora, load_base_model

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAIRS = [
    ("review: a fine and moving film\nsentiment:", " positive"),
    ("review: dull\nsentiment:", " negative"),
    ("question: what is two plus two? answer:", " four, and that is all there is to it"),
]


def load(tiny_model: Path, device: str = "cpu", dtype: str = "float32") -> BaseModel:
    return load_base_model(name_or_path=str(tiny_model), revision=None, task="causal_lm",
                           num_labels=1, dtype=dtype, attn_implementation="eager",
                           device=torch.device(device))


def lora(base: BaseModel) -> Any:
    """Adapters as the engine attaches them, with B random: at B = 0 the grads of A vanish."""
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def sft_batch(tokenizer: Any) -> dict[str, Any]:
    """Right-padded prompt + completion rows, prompt and padding labelled -100 (as collate)."""
    rows = []
    for prompt, completion in PAIRS:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return collate(rows, "causal_lm", tokenizer.pad_token_id)


def reference(model: Any, batch: dict[str, Any]) -> Any:
    """The engine's current `_loss_sum`: full logits, soft-capped by Gemma 2's forward.

    `use_cache=False`: with a cache, transformers builds no per-document mask from packed
    position ids (masking_utils: "only if ... we don't have cache").
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), use_cache=False).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                           batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def fused(model: Any, batch: dict[str, Any], **kwargs: Any) -> Any:
    return causal_lm_loss_sum(model, batch["input_ids"], batch.get("attention_mask"),
                              batch["labels"], batch.get("position_ids"), **kwargs)


def loss_and_grads(model: Any, loss_fn: Any) -> tuple[float, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def relative(a: Any, b: Any) -> float:
    """Max abs difference over max abs value of the reference."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def assert_same(model: Any, batch: dict[str, Any], tol: float, **kwargs: Any) -> None:
    ref_loss, ref_grads = loss_and_grads(model, lambda: reference(model, batch))
    loss, grads = loss_and_grads(model, lambda: fused(model, batch, **kwargs))
    assert abs(loss - ref_loss) <= tol * abs(ref_loss), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        assert ref_grads[name].abs().max() > 0, name  # the comparison means something
        assert relative(g, ref_grads[name]) <= tol, name


@pytest.fixture
def peft_model(tiny_model: Path) -> Iterator[tuple[Any, BaseModel]]:
    base = load(tiny_model)
    yield lora(base), base


@pytest.mark.parametrize("chunk_tokens", [1, 3, 4096])
def test_loss_and_grads_equal_reference(peft_model: tuple[Any, BaseModel],
                                        chunk_tokens: int) -> None:
    model, base = peft_model
    batch = sft_batch(base.tokenizer)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert 3 < n_targets < 4096 and bool((batch["attention_mask"] == 0).any())
    assert_same(model, batch, 1e-4, chunk_tokens=chunk_tokens, backend="chunked")
    with torch.no_grad():  # evaluation takes the path without gradients
        assert float(fused(model, batch, chunk_tokens=chunk_tokens)) == pytest.approx(
            float(reference(model, batch)), rel=1e-4)


def test_packed_documents_pass_position_ids(peft_model: tuple[Any, BaseModel]) -> None:
    """Sequence packing: no attention mask, position ids restart at 0 per document."""
    model, base = peft_model
    rows = sft_batch(base.tokenizer)
    docs = [rows["input_ids"][i][rows["attention_mask"][i].bool()] for i in range(2)]
    labels = [rows["labels"][i][rows["attention_mask"][i].bool()] for i in range(2)]
    labels[1][0] = -100  # the last token of one document does not predict the next one
    batch = {"input_ids": torch.cat(docs)[None], "labels": torch.cat(labels)[None],
             "position_ids": torch.cat([torch.arange(len(d)) for d in docs])[None]}
    assert_same(model, batch, 1e-4, chunk_tokens=3, backend="chunked")
    # the documents really are masked from each other: packed = each document on its own
    with torch.no_grad():
        alone = sum(float(fused(model, {"input_ids": d[None], "labels": lab[None]}))
                    for d, lab in zip(docs, labels, strict=True))
        assert float(fused(model, batch)) == pytest.approx(alone, rel=1e-4)


def test_soft_cap_is_applied(tiny_model: Path) -> None:
    base = load(tiny_model)
    cap = base.model.config.final_logit_softcapping
    assert cap == 30.0
    with torch.no_grad():  # logits far beyond the cap (the head is tied to the embedding)
        base.model.get_output_embeddings().weight.mul_(50.0)
    model = lora(base)
    batch = sft_batch(base.tokenizer)
    hidden = base.model.model(input_ids=batch["input_ids"]).last_hidden_state
    raw = hidden @ base.model.get_output_embeddings().weight.t()
    assert float(raw.abs().max()) > 3 * cap

    assert_same(model, batch, 1e-4, chunk_tokens=3, backend="chunked")
    capped = float(fused(model, batch, chunk_tokens=3, backend="chunked"))
    base.model.config.final_logit_softcapping = None
    uncapped = float(fused(model, batch, chunk_tokens=3, backend="chunked"))
    assert abs(uncapped - capped) > 0.05 * capped  # a missing cap would be caught above
    assert_same(model, batch, 1e-4, chunk_tokens=3, backend="chunked")


class VocabSizedTensors(TorchDispatchMode):
    """Records the leading size of every new op output whose last dimension is the vocabulary.

    Every aten op, forward and backward, passes through a dispatch mode, whatever module or
    function issued it: a full [batch, seq, vocab] logits tensor cannot slip past unseen.
    Views allocate nothing (`weight.t()` is [hidden, vocab]) and are left out.
    """

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.rows = vocab, [0]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.rows.append(t.numel() // self.vocab)
        return out


def test_no_full_logits(peft_model: tuple[Any, BaseModel]) -> None:
    model, base = peft_model
    batch = sft_batch(base.tokenizer)
    vocab = base.model.config.vocab_size
    full = batch["input_ids"].numel()

    with VocabSizedTensors(vocab) as seen:  # the detector does see the reference's logits
        reference(model, batch).backward()
    assert max(seen.rows) >= full

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("lm_head was called on the full sequence")

    head = base.model.get_output_embeddings()
    head.forward = refuse
    model.zero_grad(set_to_none=True)
    with VocabSizedTensors(vocab) as seen:
        fused(model, batch, chunk_tokens=4, backend="chunked").backward()
    assert max(seen.rows) == 4  # one chunk's logits at most, and the chunks did run
    del head.forward


def test_no_targets_gives_zero_with_a_graph(peft_model: tuple[Any, BaseModel]) -> None:
    model, base = peft_model
    batch = sft_batch(base.tokenizer)
    batch["labels"][:] = -100
    loss = fused(model, batch)
    loss.backward()
    assert float(loss) == 0.0


def test_backend_choice(peft_model: tuple[Any, BaseModel]) -> None:
    model, base = peft_model
    assert fused_loss_available(torch.device("cpu")) == "chunked"
    assert fused_loss_available("cpu") == "chunked"
    batch = sft_batch(base.tokenizer)
    with pytest.raises(TrainingError, match="CUDA"):
        fused(model, batch, backend="liger")
    with pytest.raises(ValueError, match="backend"):
        fused(model, batch, backend="triton")


def norm_relative(got: dict[str, Any], want: dict[str, Any]) -> float:
    """|got - want| / |want| over all gradients together: bf16 noise makes max-abs erratic."""
    a = torch.cat([got[k].float().flatten() for k in want])
    b = torch.cat([want[k].float().flatten() for k in want])
    return float((a - b).norm() / b.norm())


def check_bf16(tiny_model: Path, device: str, backend: str) -> None:
    """bf16 under autocast, as the engine trains, against the eager bf16 and fp32 paths.

    The gradient the loss hands to the decoder (at the final norm's output) must be within
    1e-2. The LoRA gradients come out of a bf16 backward through the decoder that amplifies
    any rounding of the head: on the tiny model both bf16 paths are about 2.5% (norm) from
    the fp32 gradients and 1% from each other, as is an eager head computed in fp32. So
    they get 2e-2, and the fused path must be as close to the fp32 ones as the eager path.
    """
    exact_base = load(tiny_model, device=device)
    exact_model = lora(exact_base)
    batch = {k: v.to(device) for k, v in sft_batch(exact_base.tokenizer).items()}
    _, exact = loss_and_grads(exact_model, lambda: reference(exact_model, batch))
    base = load(tiny_model, device=device, dtype="bfloat16")
    model = lora(base)
    decoder_out: list[Any] = []

    def keep(module: Any, args: Any, out: Any) -> None:
        out.retain_grad()
        decoder_out.append(out)

    base.model.model.norm.register_forward_hook(keep)
    with torch.autocast(device, dtype=torch.bfloat16):
        ref_loss, ref = loss_and_grads(model, lambda: reference(model, batch))
        loss, got = loss_and_grads(
            model, lambda: fused(model, batch, chunk_tokens=3, backend=backend))
    ref_out, got_out = (t.grad.float() for t in decoder_out)
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert float((got_out - ref_out).norm() / ref_out.norm()) <= 1e-2
    assert norm_relative(got, ref) <= 2e-2
    assert norm_relative(got, exact) <= 1.25 * norm_relative(ref, exact)


def test_bf16_on_cpu_equals_reference(tiny_model: Path) -> None:
    check_bf16(tiny_model, "cpu", "chunked")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "chunked"])
def test_bf16_on_gpu_equals_reference(tiny_model: Path, backend: str) -> None:
    """`auto` is Liger Kernel where it is installed."""
    check_bf16(tiny_model, "cuda", backend)
