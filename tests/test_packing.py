"""Sequence packing: a packed batch scores every document exactly as the document run alone.

The model runs in fp32 on CPU with eager attention; flex_attention and flash_attention_2 run
in the GPU checks (flex on CPU too with GEMMA_SEARCH_TEST_FLEX_CPU=1: its first inductor
compile takes over a minute on two cores).
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from gemma_search.train.data import collate
from gemma_search.train.packing import IGNORE_INDEX, collate_packed, micro_batches, pack_rows

#: Document lengths: longer than a sliding window of 4, and packed rows of 96 longer than the
#: tiny model's own window of 64; one document of a single token (it has no target).
LENGTHS = [23, 7, 12, 2, 30, 16, 9, 1, 40]
FLEX_CPU_ENV = "GEMMA_SEARCH_TEST_FLEX_CPU"


def make_rows(lengths: list[int], seed: int = 0, vocab: int = 300) -> list[dict[str, Any]]:
    """Rows as data.py writes them, <bos> first: even rows prompt + completion (the first
    third's labels -100), odd rows plain text (every token a label, <bos> too)."""
    rng = random.Random(seed)
    rows = []
    for k, n in enumerate(lengths):
        ids = [2] + [rng.randrange(4, vocab) for _ in range(n - 1)]
        prompt = max(1, n // 3) if k % 2 == 0 else 0
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def load_model(tiny_model: Path, attn: str = "eager", sliding_window: int | None = None,
               device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"attn_implementation": attn, "dtype": dtype}
    if sliding_window is not None:
        kwargs["sliding_window"] = sliding_window  # a config override; the weights are the same
    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model, **kwargs)
    assert sliding_window is None or model.config.sliding_window == sliding_window
    assert "sliding_attention" in model.config.layer_types
    return model.to(device).eval()


def named(what: str) -> Callable[[str], str]:
    """An `assert_close` message that says which document or parameter differs."""
    return lambda message: f"{what}: {message}"


def forward(model: Any, batch: dict[str, Any], **kwargs: Any) -> Any:
    """The call the engine makes for a packed batch."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 attention_mask=None, use_cache=False, **kwargs).logits.float()


def alone(model: Any, row: dict[str, Any]) -> tuple[Any, Any]:
    """Logits and summed NLL of one document run by itself (a batch of 1, no padding)."""
    device = next(model.parameters()).device
    ids = torch.tensor([row["input_ids"]], device=device)
    labels = torch.tensor(row["labels"], device=device)
    logits = model(input_ids=ids, use_cache=False).logits.float()[0]
    return logits, F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX,
                                   reduction="sum")


def document_nll(logits: Any, batch: dict[str, Any], n_documents: int) -> Any:
    """Summed NLL per document of a packed batch (output t scores label t+1)."""
    labels, documents = batch["labels"][:, 1:].reshape(-1), batch["document_ids"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels,
                          ignore_index=IGNORE_INDEX, reduction="none")
    keep = labels != IGNORE_INDEX
    return torch.zeros(n_documents, dtype=nll.dtype, device=nll.device).index_add_(
        0, documents.reshape(-1)[keep], nll[keep])


def packed_batches(rows: list[dict[str, Any]], max_len: int, rows_per_batch: int,
                   one_row: bool, device: str = "cpu") -> list[dict[str, Any]]:
    """A window's rows as the engine feeds them: packed, split into micro-batches."""
    chunks = micro_batches(pack_rows(rows, max_len), rows_per_batch, one_row=one_row)
    return [{k: v.to(device) for k, v in collate_packed(rows, chunk, 0).items()}
            for chunk in chunks]


def assert_same_as_alone(model: Any, rows: list[dict[str, Any]], max_len: int,
                         one_row: bool, rtol: float, atol: float) -> None:
    references = [alone(model, row) for row in rows]
    packed = torch.zeros(len(rows), device=references[0][1].device)
    batches = packed_batches(rows, max_len, 2, one_row, str(packed.device))
    # the packed rows are longer than the sliding window: the local layers' mask is tested
    assert max(b["input_ids"].shape[1] for b in batches) > model.config.sliding_window
    for batch in batches:
        logits = forward(model, batch)
        packed += document_nll(logits, batch, len(rows))
        # (b) every token's logits are the document's own: nothing leaks across documents
        for b in range(batch["input_ids"].shape[0]):
            for i in batch["document_ids"][b].unique().tolist():
                if i < 0:
                    continue
                span = batch["document_ids"][b] == i
                torch.testing.assert_close(logits[b, span], references[i][0], rtol=rtol,
                                           atol=atol, msg=named(f"document {i}"))
    # (a) per-document summed NLL
    expected = torch.stack([nll for _, nll in references])
    torch.testing.assert_close(packed, expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("one_row", [False, True], ids=["rows", "one-row"])
@pytest.mark.parametrize(("sliding_window", "max_len"), [(None, 96), (4, 48)],
                         ids=["window64-rows96", "window4-rows48"])
def test_packed_documents_score_as_alone(tiny_model: Path, sliding_window: int | None,
                                         max_len: int, one_row: bool) -> None:
    """(a) per-document NLL and (b) per-token logits equal the unpacked runs, on the global
    and the sliding-window layers, in the padded many-row layout and in flash's one-row one."""
    model = load_model(tiny_model, sliding_window=sliding_window)
    rows = make_rows(LENGTHS)
    with torch.no_grad():
        assert_same_as_alone(model, rows, max_len, one_row, rtol=1e-5, atol=1e-5)


def test_documents_leak_without_the_two_conditions(tiny_model: Path) -> None:
    """The checks above can fail: with a cache (Gemma 2's config default) or with position
    ids that run on, the second document of a row sees the first."""
    model = load_model(tiny_model)
    rows = make_rows([10, 12])
    batch = collate_packed(rows, [[0, 1]], 0)
    with torch.no_grad():
        reference, _ = alone(model, rows[1])
        second = batch["document_ids"][0] == 1
        packed = forward(model, batch)[0, second]
        torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        run_on = model(input_ids=batch["input_ids"], use_cache=False).logits
    for leaked in (cached[0, second], run_on[0, second]):
        assert (leaked.float() - reference).abs().max() > 1e-2


def test_lora_gradients_of_a_packed_batch_are_the_sum_over_documents(tiny_model: Path) -> None:
    """(c) one backward over packed rows gives the adapters the gradient of the documents'
    losses run one by one."""
    from peft import LoraConfig, get_peft_model

    model = load_model(tiny_model, sliding_window=4)
    model.requires_grad_(False)
    torch.manual_seed(0)
    # B starts random (not 0), so that both LoRA factors get a non-zero gradient.
    model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    model.train()
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    rows = make_rows(LENGTHS, seed=1)

    for row in rows:
        alone(model, row)[1].backward()
    expected = {n: p.grad.clone() for n, p in adapters.items()}  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    for batch in packed_batches(rows, 48, 2, one_row=False):
        logits = forward(model, batch)
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                        batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                        reduction="sum").backward()
    for name, param in adapters.items():
        assert param.grad is not None and expected[name].abs().max() > 0, name
        # fp32 sums in another order: an element near 0 differs by ~1e-6 of the largest one
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=named(name))


@pytest.mark.slow
def test_flex_attention_on_cpu(tiny_model: Path) -> None:
    """(f) flex_attention builds the same document mask (a BlockMask); CPU is opt-in."""
    if not os.environ.get(FLEX_CPU_ENV):
        pytest.skip(f"flex_attention on CPU compiles with inductor for ~70 s cold (~12 s warm) "
                    f"on two cores; set {FLEX_CPU_ENV}=1 to run it (the GPU test runs flex)")
    model = load_model(tiny_model, attn="flex_attention", sliding_window=4)
    with torch.no_grad():
        assert_same_as_alone(model, make_rows(LENGTHS), 48, False, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn", ["flex_attention", "flash_attention_2"])
def test_packed_documents_score_as_alone_on_gpu(tiny_model: Path, attn: str) -> None:
    """(f) the GPU kernels: flex in fp32 with a packed many-row batch; flash (bf16 only) with
    the one-row layout its varlen path needs."""
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    flash = attn == "flash_attention_2"
    model = load_model(tiny_model, attn=attn, sliding_window=4, device="cuda",
                       dtype=torch.bfloat16 if flash else torch.float32)
    with torch.no_grad():
        if flash:
            assert_same_as_alone(model, make_rows(LENGTHS), 48, True, rtol=2e-2, atol=5e-2)
        else:
            assert_same_as_alone(model, make_rows(LENGTHS), 48, False, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the layout


def test_pack_rows_is_deterministic_and_within_max_len() -> None:
    """(d) same lengths, same groups; every row once; no group over max_len unless it is a
    single over-long row."""
    rng = random.Random(0)
    for trial in range(50):
        lengths = [rng.randint(1, 70) for _ in range(rng.randint(1, 40))]
        rows = make_rows(lengths, seed=trial)
        groups = pack_rows(rows, 64)
        assert groups == pack_rows(make_rows(lengths, seed=trial + 1), 64)
        assert sorted(i for g in groups for i in g) == list(range(len(rows)))
        for g in groups:
            assert g == sorted(g)
            total = sum(lengths[i] for i in g)
            assert total <= 64 or (len(g) == 1 and total > 64)
        # first-fit decreasing never needs more rows than one row per 64 tokens, plus the
        # over-long rows, plus one half-empty row per pair (a loose bound that catches
        # a regression to one row per document)
        assert len(groups) <= 2 * -(-sum(lengths) // 64) + sum(n > 64 for n in lengths)


def test_pack_rows_first_fit_decreasing() -> None:
    rows = make_rows([5, 9, 3, 7, 12, 1])
    assert pack_rows(rows, 12) == [[4], [1, 2], [0, 3], [5]]
    assert pack_rows(rows, 100) == [[0, 1, 2, 3, 4, 5]]
    assert pack_rows(make_rows([30, 4]), 10) == [[0], [1]]
    assert pack_rows([], 10) == []
    with pytest.raises(ValueError, match="max_len"):
        pack_rows(rows, 0)


def test_padding_and_document_starts_are_never_targets() -> None:
    """(e) pad tokens and the first token of each document carry label -100; the targets
    are exactly those of the unpadded, unpacked rows."""
    rows = make_rows([6, 3, 9, 4, 1])  # odd rows: plain causal_lm, <bos> is a label too
    batch = collate_packed(rows, [[0, 1], [2], [3, 4]], pad_token_id=0)
    ids, pos, labels, docs = (batch[k] for k in ("input_ids", "position_ids", "labels",
                                                 "document_ids"))
    assert "attention_mask" not in batch
    assert ids.shape == (3, 9)
    assert pos.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2],
                            [0, 1, 2, 3, 4, 5, 6, 7, 8],
                            [0, 1, 2, 3, 0, 1, 2, 3, 4]]  # padding continues the last doc
    assert docs.tolist() == [[0] * 6 + [1] * 3, [2] * 9, [3] * 4 + [4] + [-1] * 4]
    padding = docs < 0
    assert (ids[padding] == 0).all() and (labels[padding] == IGNORE_INDEX).all()
    assert (labels[pos == 0] == IGNORE_INDEX).all()
    assert labels[0, 6] == IGNORE_INDEX and rows[1]["labels"][0] == 2
    unpacked = collate(rows, "causal_lm", 0)
    assert int((labels[:, 1:] != IGNORE_INDEX).sum()) == int(
        (unpacked["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(padding.logical_not().sum()) == int(unpacked["attention_mask"].sum())
    with pytest.raises(ValueError, match="non-empty"):
        collate_packed(rows, [[0], []], 0)


def test_micro_batches() -> None:
    groups = [[4], [1, 2], [0, 3], [5]]
    assert micro_batches(groups, 3) == [[[4], [1, 2], [0, 3]], [[5]]]
    assert micro_batches(groups, 3, one_row=True) == [[[4, 1, 2, 0, 3]], [[5]]]
    with pytest.raises(ValueError, match="rows_per_batch"):
        micro_batches(groups, 0)
