"""Sequence packing for causal_lm: several documents per row, none attending to another.

Right-padding a micro-batch to its longest row spends compute on pad tokens; packing puts
several tokenized rows ("documents") end to end in one row of at most `max_len` tokens.

Documents are kept apart by the position ids alone, with `attention_mask=None`: transformers
(checked in 5.17 and 5.24, `masking_utils.find_packed_sequence_indices`) starts a new
document wherever the position id does not go up by exactly 1 and ands a block-diagonal
document mask into the causal mask, and into the sliding-window mask of Gemma 2's local
layers, for eager, sdpa and flex_attention. flash_attention_2 instead reads the document
starts (position id 0) from `position_ids` and runs the varlen kernel, but only for a batch
of ONE row (`modeling_flash_attention_utils._is_packed_sequence`): with flash, a micro-batch
must be one flattened row (`micro_batches(..., one_row=True)`).

Two conditions, both silent if broken (the documents then attend to each other):

- no `attention_mask`: any 2D mask turns the position-id detection off;
- `use_cache=False`: Gemma 2's config says `use_cache=True`, the model then builds an empty
  `DynamicCache`, and with a cache transformers does not look for packed documents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["IGNORE_INDEX", "collate_packed", "micro_batches", "pack_rows"]

#: Label value of positions that are not predicted (prompt, padding, document starts).
IGNORE_INDEX = -100


def pack_rows(rows: Sequence[Mapping[str, Any]], max_len: int) -> list[list[int]]:
    """Group row indices so that each group's total `input_ids` length is <= `max_len`.

    First-fit decreasing: rows from longest to shortest (ties by index), each into the first
    group it fits, else a new group. A window's rows all feed one optimizer step, whose
    gradient is a sum over them, so their order does not matter and the tighter packing
    (FFD uses at most 11/9 of the optimal number of rows, plus one) is pure gain over a greedy
    pass in order. The sort key makes it deterministic: the same lengths give the same
    groups. A row longer than `max_len` is a group of its own (data.py already cut rows to
    `data.max_seq_len`, so this only happens if `max_len` is set below it).

    Each group's indices are in increasing order; groups come longest row first.
    """
    if max_len < 1:
        raise ValueError(f"max_len is {max_len} but must be >= 1")
    lengths = [len(r["input_ids"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    free: list[int] = []  # tokens still free in each group
    for i in order:
        n = lengths[i]
        for g, room in enumerate(free):
            if n <= room:
                groups[g].append(i)
                free[g] -= n
                break
        else:
            groups.append([i])
            free.append(max_len - n)  # negative for an over-long row: nothing else fits
    return [sorted(g) for g in groups]


def micro_batches(groups: Sequence[Sequence[int]], rows_per_batch: int, *,
                  one_row: bool = False) -> list[list[list[int]]]:
    """Split packed groups into micro-batches of `rows_per_batch` groups each.

    `one_row=True` (flash_attention_2) joins each micro-batch's groups into a single row, the
    only layout in which transformers runs flash's varlen kernel; it holds the same tokens,
    with no padding at all.
    """
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch is {rows_per_batch} but must be >= 1")
    chunks = [list(map(list, groups[i:i + rows_per_batch]))
              for i in range(0, len(groups), rows_per_batch)]
    if one_row:
        return [[[i for g in chunk for i in g]] for chunk in chunks]
    return chunks


def collate_packed(rows: Sequence[Mapping[str, Any]], groups: Sequence[Sequence[int]],
                   pad_token_id: int) -> dict[str, Any]:
    """One packed row per group: `input_ids`, `position_ids`, `labels`, `document_ids`.

    All are [len(groups), width] long tensors, width the longest group. There is no
    `attention_mask`: call the model with `attention_mask=None, use_cache=False` (module
    docstring). Per document:

    1. `position_ids` restart at 0;
    2. `labels` are the row's labels, with the document's first token set to -100: the loss
       pairs the output at t with the label at t+1, and the first token of a document has
       no predecessor in it (unpacked, it sits in column 0, which the shift never scores);
    3. `document_ids` hold the index in `rows` of the document each token belongs to.

    The padded tail continues the last document's position ids, so transformers sees it as
    part of that document rather than as a document of its own: it comes after every real
    token, so causality keeps real tokens from attending to it. Its labels are -100 and its
    `document_ids` -1, so it is never a target and `document_ids >= 0` counts real tokens.
    """
    import torch

    if not groups or not all(groups):
        raise ValueError("groups must be a non-empty list of non-empty groups (pack_rows)")
    width = max(sum(len(rows[i]["input_ids"]) for i in g) for g in groups)
    shape = (len(groups), width)
    ids = torch.full(shape, pad_token_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    documents = torch.full(shape, -1, dtype=torch.long)
    for b, group in enumerate(groups):
        start = 0
        for i in group:
            row_ids, row_labels = rows[i]["input_ids"], rows[i]["labels"]
            n = len(row_ids)
            end = start + n
            ids[b, start:end] = torch.tensor(row_ids, dtype=torch.long)
            positions[b, start:end] = torch.arange(n)
            labels[b, start:start + len(row_labels)] = torch.tensor(row_labels,
                                                                    dtype=torch.long)
            labels[b, start] = IGNORE_INDEX
            documents[b, start:end] = i
            start = end
        last = len(rows[group[-1]]["input_ids"])
        positions[b, start:] = torch.arange(last, last + width - start)
    return {"input_ids": ids, "position_ids": positions, "labels": labels,
            "document_ids": documents}
