"""Causal-LM loss over Gemma 2's 256k vocabulary without materialising the logits.

`model(...).logits` for a micro-batch of 4 x 1024 tokens is 4096 x 256,000 values: 2 GiB in
bf16, 4 GiB more once upcast to fp32, and autograd keeps several such tensors for backward
(design decision 7). Here the decoder body runs alone, only the hidden states whose next
token is a target are kept (prompt-masked SFT has few), and those are projected onto the
vocabulary a chunk at a time, with Gemma 2's final soft-cap `cap * tanh(logits / cap)`:

- `liger`: Liger Kernel's fused linear cross-entropy (Triton, CUDA only), which takes the
  soft-cap as an argument;
- `chunked`: the same fusion in plain torch (`_autograd_function`): each chunk's
  gradient is computed in the forward pass and only the [tokens, hidden] gradient is kept,
  so the peak extra memory is one chunk's logits: two fp32 buffers of chunk x vocabulary,
  3.9 GiB at 2048 tokens x 256k (lower `chunk_tokens` to trade speed for memory).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from gemma_search.errors import TrainingError

__all__ = ["BACKENDS", "IGNORE_INDEX", "causal_lm_loss_sum", "fused_loss_available"]

#: Label value of positions that are not predicted (prompt, padding).
IGNORE_INDEX = -100

#: `auto` picks `liger` on CUDA when liger-kernel is installed, else `chunked`.
BACKENDS = ("auto", "chunked", "liger")


def fused_loss_available(device: Any) -> str:
    """The backend `backend="auto"` picks on `device` (a torch.device or a string)."""
    device_type = device if isinstance(device, str) else device.type
    if device_type.split(":")[0] == "cuda" and importlib.util.find_spec("liger_kernel"):
        return "liger"
    return "chunked"


def causal_lm_loss_sum(model: Any, input_ids: Any, attention_mask: Any, labels: Any,
                       position_ids: Any = None, *, chunk_tokens: int = 2048,
                       backend: str = "auto") -> Any:
    """Summed next-token NLL over the positions whose label is not -100, as an fp32 scalar.

    Equals `F.cross_entropy(model(...).logits[:, :-1].float(), labels[:, 1:],
    ignore_index=-100, reduction="sum")` (labels aligned with `input_ids`: hidden state t
    predicts label t+1) for a plain or peft-wrapped Gemma2ForCausalLM, without the full
    logits. `attention_mask` and `position_ids` go to the decoder unchanged; packed batches
    pass `attention_mask=None` and position ids that restart at 0 per document.
    """
    import torch

    if backend not in BACKENDS:
        raise ValueError(f"backend is {backend!r} but must be one of {BACKENDS}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens is {chunk_tokens} but must be >= 1")
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        # A LoRA-wrapped lm_head would be bypassed by projecting with its base weight.
        raise TrainingError(f"the output layer is a {type(head).__name__}, not a plain Linear "
                            "(adapters on lm_head?); the fused loss needs it frozen: drop "
                            "lm_head from search.lora_targets")
    softcap = causal_lm.config.final_logit_softcapping

    # 1. the decoder body only: `last_hidden_state` is already through the final norm
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False).last_hidden_state
    # 2. keep the states whose next label is a target
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden = hidden[:, :-1][keep]
    targets = targets[keep]
    if targets.numel() == 0:
        return hidden.float().sum() * 0.0  # still in the graph: backward() works
    # 3. project, soft-cap and score
    if backend == "auto":
        backend = fused_loss_available(hidden.device)
    if backend == "liger":
        return _liger_loss_sum(hidden, head.weight, head.bias, targets, softcap)
    if not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (hidden, head.weight, head.bias)):
        return _fused_pass(hidden, head.weight, head.bias, targets, softcap, chunk_tokens,
                           (False, False, False))[0]
    return _autograd_function().apply(hidden, head.weight, head.bias, targets, softcap,
                                      chunk_tokens)


def _liger_loss_sum(hidden: Any, weight: Any, bias: Any, targets: Any,
                    softcap: float | None) -> Any:
    if hidden.device.type != "cuda":
        raise TrainingError("the liger loss backend needs a CUDA device; use backend "
                            "'chunked' (or 'auto') on CPU")
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )
    except ImportError:
        raise TrainingError("the liger loss backend needs liger-kernel: pip install "
                            "liger-kernel, or use backend 'chunked'") from None
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum",
                                               softcap=softcap)
    out = loss_fn(weight, hidden, targets, bias)
    # Newer liger returns a CrossEntropyOutput when extra outputs are asked for; not here.
    return getattr(out, "loss", out).float()


def _fused_pass(hidden: Any, weight: Any, bias: Any, targets: Any, softcap: float | None,
                chunk_tokens: int, needs: tuple[bool, ...]) -> tuple[Any, Any, Any, Any]:
    """Loss sum and the gradients wrt hidden, weight and bias that `needs` asks for.

    The gradient wrt the capped logits is softmax - onehot; through the cap it is scaled
    by 1 - tanh^2. Computing it here, while the chunk's logits exist, is what lets the
    backward pass keep nothing of vocabulary size (the Liger Kernel approach).
    """
    import torch
    import torch.nn.functional as F

    need_h, need_w, need_b = needs[:3]
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start:start + chunk_tokens]
        t = targets[start:start + chunk_tokens]
        # 1. logits of this chunk in fp32, soft-capped in place
        logits = F.linear(h, weight, bias).float()
        tanh = None
        if softcap is not None:
            tanh = logits.div_(softcap).tanh_()
            logits = tanh * softcap
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        if not any(needs):
            continue
        # 2. d loss / d logits, in place over the capped logits
        grad = logits.sub_(lse[:, None]).exp_()
        grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
        if tanh is not None:
            grad.mul_(tanh.square_().neg_().add_(1.0))
            del tanh
        # 3. back through the projection, in the weight's dtype (bf16 matmuls on GPU)
        g = grad.to(weight.dtype)
        del grad, logits
        if grad_h is not None:
            grad_h[start:start + chunk_tokens] = g @ weight
        if grad_w is not None:
            grad_w += g.t() @ h.to(weight.dtype)
        if grad_b is not None:
            grad_b += g.sum(0)
    return loss, grad_h, grad_w, grad_b


@functools.cache
def _autograd_function() -> Any:
    """`_fused_pass` as a torch.autograd.Function, defined on first use (torch stays lazy).

    Backward only scales the gradients stored by the forward pass by the incoming one.
    """
    import torch

    class FusedLinearSoftcapCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, targets: Any,
                    softcap: float | None, chunk_tokens: int) -> Any:
            loss, grad_h, grad_w, grad_b = _fused_pass(hidden, weight, bias, targets, softcap,
                                                       chunk_tokens, ctx.needs_input_grad)
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            return loss

        @staticmethod
        def backward(ctx: Any, grad_loss: Any) -> tuple[Any, ...]:
            grads = [None if g is None else (g * grad_loss).to(dtype)
                     for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)]
            return (*grads, None, None, None)

    return FusedLinearSoftcapCE
