"""Memory-aware batch plan: estimate a LoRA step's peak device memory, then pick the micro-batch,
gradient accumulation and activation checkpointing that fit the GPU.

The estimate is pure arithmetic over the model's shapes (no torch): what autograd keeps alive per
token and per layer, read off Gemma 2's forward in transformers + peft (each saved tensor counted
once; checked on CPU with saved_tensors_hooks). It needs no calibration factor: as derived it
lands within 5% of every peak in docs/design.md's performance references (H200, Gemma 2 9B,
LoRA r16 on all seven projections, dropout 0.05, seq 1024, AdamW; max_memory_allocated):

| configuration (docs/design.md)         | measured GiB | estimate GiB |
| -------------------------------------- | ------------ | ------------ |
| plain, eager, checkpointing, b4        | 35           | 35.1 (+0.3%) |
| Liger, eager, checkpointing, b4        | 21           | 22.0 (+4.9%) |
| Liger, eager, no checkpointing, b4     | 89           | 88.5 (-0.6%) |
| Liger, flex_attention, no ckpt, b8     | 115          | 113.1 (-1.7%)|

Use at trial start, before the first window (the engine's OOM path, design decision 9, stays as
the safety net)::

    plan = plan_batch(ModelShapes.from_config(base.model.config),
                      free_bytes=free_device_bytes(base.device),
                      resident_bytes=base.memory_baseline, micro_batch=cfg.micro_batch_size,
                      grad_accum=cfg.gradient_accumulation_steps, seq_len=longest_example, ...)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ALL_LINEAR",
    "CHECKPOINT_SLOWDOWN",
    "GEMMA2_9B",
    "GiB",
    "BatchPlan",
    "MemoryEstimate",
    "ModelShapes",
    "estimate_peak_bytes",
    "free_device_bytes",
    "plan_batch",
]

GiB = 2**30

Attention = Literal["eager", "flex_attention", "flash_attention_2"]

#: The seven linear projections of a Gemma 2 decoder layer ("all-linear" in peft).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Per-token time with activation checkpointing over without: docs/design.md, H200, Liger, eager,
#: batch 4, 5,959 vs 4,303 tokens/s (the recomputed forward is ~28% of throughput).
CHECKPOINT_SLOWDOWN = 5959 / 4303

#: Assumed, not measured: a micro-batch of T tokens costs (1 + SMALL_BATCH_TOKENS / T) times the
#: per-token time of a very large one (kernel launches of 42 layers forward and backward, and
#: GEMMs with few rows). At 512, halving 8k -> 4k tokens costs ~6% and 2k -> 1k ~20%, both
#: cheaper than checkpointing's 38%; the two break even near 400 tokens per halved micro-batch.
#: Replace with a measured figure from bench/ once there is one.
SMALL_BATCH_TOKENS = 512

#: cuBLAS/cuDNN workspaces, eager causal masks, RoPE tables and the like: a flat allowance.
WORKSPACE_BYTES = 256 * 2**20

#: peft keeps adapters in fp32 over a bf16 base (get_peft_model's autocast_adapter_dtype=True).
ADAPTER_BYTES = 4

#: AdamW per trainable parameter: fp32 weight, fp32 gradient, two fp32 moments.
ADAPTER_STATE_BYTES = 16


@dataclass(frozen=True)
class ModelShapes:
    """The dimensions of a Gemma 2 model that decide its training memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    n_params: int
    """All parameters, the tied embedding counted once."""
    sliding_window: int | None = None
    """Local layers' window. It does not shrink eager's [seq, seq] scores (only masks them)."""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @classmethod
    def from_config(cls, config: Any) -> ModelShapes:
        """From a transformers Gemma2Config (or its config.json as a dict)."""
        def get(key: str) -> Any:
            return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

        def need(key: str) -> int:
            value = get(key)
            if value is None:
                raise ValueError(f"model config has no {key}; is it a Gemma 2 config?")
            return int(value)

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        window = get("sliding_window")
        shapes = cls(hidden=hidden, intermediate=need("intermediate_size"),
                     layers=need("num_hidden_layers"), heads=heads,
                     kv_heads=int(get("num_key_value_heads") or heads),
                     head_dim=int(get("head_dim") or hidden // heads), vocab=need("vocab_size"),
                     n_params=0, sliding_window=None if window is None else int(window))
        return cls(**{**shapes.__dict__, "n_params": _count_params(shapes)})

    @classmethod
    def gemma2_9b(cls) -> ModelShapes:
        """`google/gemma-2-9b` (config.json): 9,241,705,984 parameters."""
        return GEMMA2_9B


def _count_params(s: ModelShapes) -> int:
    """Gemma 2's parameters: tied embedding, per layer q/k/v/o, GeGLU MLP, 4 norms; final norm."""
    per_layer = (2 * s.hidden * s.q_dim + 2 * s.hidden * s.kv_dim + 3 * s.hidden * s.intermediate
                 + 4 * s.hidden)
    return s.embedding_params + s.layers * per_layer + s.hidden


GEMMA2_9B = ModelShapes(hidden=3584, intermediate=14336, layers=42, heads=16, kv_heads=8,
                        head_dim=256, vocab=256000, n_params=9_241_705_984, sliding_window=4096)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak device bytes of one training step, by part.

    `total` = weights + adapters + activations + attention_scores + max(logits, backward)
    + workspace: the loss's buffers are freed before the layers' backward begins, so the two
    transient parts never coexist. These are allocated bytes (what max_memory_allocated
    measures); allocator fragmentation is left to `plan_batch`'s headroom.
    """

    weights: int
    """The frozen base model."""
    adapters: int
    """LoRA weights, their gradients and AdamW's two moments, all fp32."""
    activations: int
    """Kept for backward over the whole forward: every layer's, or only layer inputs when
    checkpointing."""
    attention_scores: int
    """Eager attention's [b, heads, seq, seq] tensors kept for backward (0 for flex/flash and
    when checkpointing)."""
    logits: int
    """Peak of the loss: full [b, seq, vocab] logits and their gradient, or one fused chunk."""
    backward: int
    """One layer's backward in flight: gradient buffers, plus the recomputed layer when
    checkpointing."""
    workspace: int
    lora_params: int
    ignored_targets: tuple[str, ...] = ()
    """LoRA target names the estimate does not know (counted as nothing)."""

    @property
    def total(self) -> int:
        return (self.weights + self.adapters + self.activations + self.attention_scores
                + max(self.logits, self.backward) + self.workspace)

    def breakdown(self) -> dict[str, float]:
        """Each part and the total, in GiB."""
        parts = ("weights", "adapters", "activations", "attention_scores", "logits", "backward",
                 "workspace")
        out = {k: getattr(self, k) / GiB for k in parts}
        out["total"] = self.total / GiB
        return out


def estimate_peak_bytes(shapes: ModelShapes, *, micro_batch: int, seq_len: int,
                        weight_bytes: float = 2.0, lora_r: int = 16,
                        lora_targets: Iterable[str] = ALL_LINEAR, lora_dropout: float = 0.05,
                        checkpointing: bool = False, attention: Attention = "eager",
                        fused_loss: bool = False, fused_kernels: bool | None = None,
                        task: str = "causal_lm") -> MemoryEstimate:
    """Peak device memory of one LoRA training step with AdamW, after the first step.

    `weight_bytes`: 2 bf16, 4 fp32, ~0.55 4-bit (QLoRA; the embedding then stays bf16).
    `fused_loss`: a fused linear cross-entropy (Liger) that never materialises the logits.
    `fused_kernels`: Liger's RMSNorm / GeGLU / RoPE kernels; None means the same as
    `fused_loss`, since `apply_liger_kernel_to_gemma2` patches all of them together.
    Activations are bf16 unless the weights are fp32 (then fp32).
    """
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch {micro_batch} and seq_len {seq_len} must be >= 1")
    if attention not in ("eager", "flex_attention", "flash_attention_2"):
        raise ValueError(f"attention {attention!r} must be eager, flex_attention or "
                         "flash_attention_2 (sdpa drops Gemma 2's soft-cap)")
    fused = fused_loss if fused_kernels is None else fused_kernels
    act = 4 if weight_bytes >= 4 else 2
    tokens = micro_batch * seq_len
    modules, ignored = _lora_shapes(shapes, lora_targets)
    lora_params = shapes.layers * sum(lora_r * (n_in + n_out) for n_in, n_out in modules.values())

    # 1. weights: 4-bit quantisation (bitsandbytes) leaves the tied embedding in bf16
    if weight_bytes < 2:
        weights = (shapes.n_params - shapes.embedding_params) * weight_bytes \
            + shapes.embedding_params * 2
    else:
        weights = shapes.n_params * weight_bytes
    # 2. per token and layer, what autograd keeps; eager's scores per layer. Not calibrated:
    #    the count lands within 5% of all four reference rows as it is (see the module docstring).
    per_token = _layer_bytes_per_token(shapes, act=act, attention=attention, fused=fused,
                                       modules={n: io[0] for n, io in modules.items()},
                                       lora_r=lora_r, dropout=lora_dropout)
    layer = per_token * tokens
    if attention == "eager" and not checkpointing:
        # Training without checkpointing, transformers keeps use_cache=True from the config, so
        # a DynamicCache holds every layer's k and v; flex/flash keep those same tensors for
        # backward anyway, and checkpointing turns the cache off.
        layer += tokens * 2 * act * shapes.kv_dim
    scores = 0
    if attention == "eager":
        # tanh of the soft-capped scores (act), softmax output in fp32 (4), probs cast back
        # to act for the matmul with v (act; no copy when act is already fp32)
        score_bytes = act + 4 + (act if act != 4 else 0)
        scores = micro_batch * shapes.heads * seq_len * seq_len * score_bytes
    norm_in = act * shapes.hidden if fused else max(act, 4) * shapes.hidden
    head = tokens * (norm_in + act * shapes.hidden)  # final norm: its input and output
    # 3. one layer's backward in flight: an allowance, not a count, for the gradients of the
    #    MLP (three intermediate-wide) and residual stream (four hidden-wide) and, for eager,
    #    the scores' gradient (act probs, fp32 softmax input, act tanh)
    grads = tokens * (3 * act * shapes.intermediate + 4 * act * shapes.hidden)
    if attention == "eager":
        grads += micro_batch * shapes.heads * seq_len * seq_len * (4 + 2 * act)
    activations: float
    if checkpointing:
        # non-reentrant checkpointing keeps each layer's input; backward recomputes one layer
        activations = shapes.layers * tokens * act * shapes.hidden + head
        attention_scores = 0
        backward = layer + scores + grads
    else:
        activations = shapes.layers * layer + head
        attention_scores = shapes.layers * scores
        backward = grads
    return MemoryEstimate(
        weights=int(weights), adapters=lora_params * ADAPTER_STATE_BYTES,
        activations=int(activations), attention_scores=int(attention_scores),
        logits=int(_loss_bytes(shapes, tokens=tokens, act=act, fused=fused_loss, task=task)),
        backward=int(backward), workspace=WORKSPACE_BYTES, lora_params=lora_params,
        ignored_targets=ignored)


#: Which tensor each projection reads: q/k/v share the input norm's output, gate/up the
#: pre-feedforward norm's.
_LORA_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
               "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in",
               "down_proj": "mlp_product"}


def _lora_shapes(shapes: ModelShapes, targets: Iterable[str]
                 ) -> tuple[dict[str, tuple[int, int]], tuple[str, ...]]:
    """(in_features, out_features) of each targeted projection of one layer; unknown names."""
    h, i, q, kv = shapes.hidden, shapes.intermediate, shapes.q_dim, shapes.kv_dim
    known = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
             "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    names = [targets] if isinstance(targets, str) else list(targets)
    if names in (["all-linear"], ["all_linear"]):
        names = list(ALL_LINEAR)
    return ({n: known[n] for n in names if n in known},
            tuple(n for n in names if n not in known))


def _layer_bytes_per_token(shapes: ModelShapes, *, act: int, attention: str, fused: bool,
                           modules: dict[str, int], lora_r: int, dropout: float) -> float:
    """Bytes autograd keeps per token for one decoder layer (Gemma2DecoderLayer + peft LoRA).

    Read off the forward: each tensor some op saves for its backward, counted once. A frozen
    linear saves only its weight (the input gradient needs W, not x), so the base projections
    keep no activations; the ops around them do. Checked on CPU with saved_tensors_hooks on a
    9B-wide layer (plain path): the count matched to 0.1%.
    """
    h, i, q, kv = shapes.hidden, shapes.intermediate, shapes.q_dim, shapes.kv_dim
    # 1. four RMSNorms (input, post-attention, pre-feedforward, post-feedforward): HF's norm
    #    upcasts to fp32 and keeps that copy (and an fp32 rsqrt per token); Liger's keeps its
    #    act input.
    norms = 4 * (act * h if fused else max(act, 4) * h + 4)
    # 2. attention: RoPE (fused or not) keeps only cos/sin
    #    eager: q, and k and v repeated to every head by repeat_kv (copies), kept by the two
    #    matmuls; flex / flash: q, k, v (GQA without repeat), the output, fp32 logsumexp
    attn = 3 * act * q if attention == "eager" else act * (2 * q + 2 * kv) + 4 * shapes.heads
    # 3. GeGLU MLP: gate and up outputs, and gelu(gate) unless Liger fuses gelu and product
    mlp = (2 if fused else 3) * act * i
    # 4. LoRA per targeted projection: peft casts the input to the fp32 adapter dtype; dropout
    #    keeps a bool mask and lora_A its own fp32 copy, one per module even where q/k/v share
    #    an input. Without dropout and without a cast, lora_A keeps the shared input itself.
    #    lora_A's r-wide output is kept by lora_B.
    lora = 0.0
    shared: dict[str, int] = {}
    for name, n_in in modules.items():
        if dropout > 0:
            lora += (ADAPTER_BYTES + 1) * n_in
        elif act != ADAPTER_BYTES:
            lora += ADAPTER_BYTES * n_in
        else:
            shared[_LORA_INPUT[name]] = act * n_in
        lora += ADAPTER_BYTES * lora_r
    return norms + attn + mlp + lora + sum(shared.values())


def _loss_bytes(shapes: ModelShapes, *, tokens: int, act: int, fused: bool, task: str) -> float:
    """Peak bytes of the loss over the logits."""
    if task != "causal_lm":
        return 0.0  # a [b, num_labels] head: nothing next to the layers
    if fused:
        # Liger's fused linear cross-entropy: chunks of next_pow2(tokens / ceil(V / H)) rows,
        # logits in act and their fp32 math, plus the hidden-state gradient it returns
        rows = 1 << max(0, math.ceil(math.log2(max(1, tokens / math.ceil(shapes.vocab
                                                                         / shapes.hidden)))))
        return rows * shapes.vocab * (act + 4) + tokens * (act * shapes.hidden + 4)
    # Unfused, per logit, at the start of backward: the soft-capped logits and the tanh output
    # Gemma 2's forward keeps (act each), then the loss's fp32 upcast: log-softmax output, its
    # gradient and the input gradient (4 each). 16 bytes in bf16; the plain reference row (35 GiB)
    # bears it out. The engine's own slice-and-copy before cross_entropy adds ~4 more.
    return tokens * shapes.vocab * (2 * act + 12)


@dataclass(frozen=True)
class BatchPlan:
    """How a trial should run on this device: same examples per optimizer step."""

    micro_batch: int
    grad_accum: int
    """ceil(effective batch / micro_batch), as the engine's OOM path computes it: the last
    micro-batch of a window may be smaller."""
    checkpointing: bool
    estimate: MemoryEstimate
    fits: bool
    reason: str
    budget_bytes: int | None = None
    """headroom x free bytes + resident bytes; None when the device sets no limit."""
    tried: tuple[tuple[int, bool, int], ...] = field(default=(), repr=False)
    """(micro_batch, checkpointing, estimated bytes) of every candidate considered."""


def plan_batch(shapes: ModelShapes, *, free_bytes: int | None, micro_batch: int, grad_accum: int,
               seq_len: int, weight_bytes: float = 2.0, lora_r: int = 16,
               lora_targets: Iterable[str] = ALL_LINEAR, lora_dropout: float = 0.05,
               attention: Attention = "eager", fused_loss: bool = False,
               fused_kernels: bool | None = None, task: str = "causal_lm",
               resident_bytes: int = 0, headroom: float = 0.9) -> BatchPlan:
    """The fastest (micro-batch, accumulation, checkpointing) whose estimate fits the device.

    `free_bytes`: what the device has free now (`free_device_bytes`); None = no limit.
    `resident_bytes`: bytes of the estimate already allocated and so not in `free_bytes` (the
    resident base model's weights: `BaseModel.memory_baseline`).
    `headroom`: the share of free memory to plan for; the rest absorbs allocator fragmentation
    and the estimate's error.

    The rule: candidates are the requested micro-batch and its halvings down to 1 (as the
    engine's OOM path halves), each with and without checkpointing; the cheapest that fits
    wins, per-token cost being CHECKPOINT_SLOWDOWN (1.38) with checkpointing, times
    (1 + SMALL_BATCH_TOKENS / tokens per micro-batch); a tie keeps the larger micro-batch. So
    the requested micro-batch without checkpointing wins whenever it fits; halving beats
    checkpointing while the halved micro-batch keeps more than ~400 tokens (at seq 1024: always,
    down to micro-batch 1); checkpointing is used when no uncheckpointed plan fits, or when
    micro-batches would shrink below that.
    Nothing fits: the smallest plan (micro-batch 1, checkpointing), fits=False and a reason
    naming what to change.
    """
    if micro_batch < 1 or grad_accum < 1:
        raise ValueError(f"micro_batch {micro_batch} and grad_accum {grad_accum} must be >= 1")
    effective = micro_batch * grad_accum

    def estimate(mb: int, ckpt: bool) -> MemoryEstimate:
        return estimate_peak_bytes(shapes, micro_batch=mb, seq_len=seq_len,
                                   weight_bytes=weight_bytes, lora_r=lora_r,
                                   lora_targets=lora_targets, lora_dropout=lora_dropout,
                                   checkpointing=ckpt, attention=attention,
                                   fused_loss=fused_loss, fused_kernels=fused_kernels, task=task)

    def plan(mb: int, ckpt: bool, est: MemoryEstimate, fits: bool, reason: str,
             budget: int | None, tried: tuple[tuple[int, bool, int], ...] = ()) -> BatchPlan:
        return BatchPlan(micro_batch=mb, grad_accum=math.ceil(effective / mb),
                         checkpointing=ckpt, estimate=est, fits=fits, reason=reason,
                         budget_bytes=budget, tried=tried)

    requested = estimate(micro_batch, False)
    if free_bytes is None:
        return plan(micro_batch, False, requested, True, "no device memory limit (CPU)", None)
    budget = int(headroom * free_bytes) + resident_bytes
    what = f"{_gib(budget)} GiB ({headroom:g} x {_gib(free_bytes)} GiB free" + (
        f" + {_gib(resident_bytes)} GiB resident)" if resident_bytes else ")")
    if requested.total <= budget:
        return plan(micro_batch, False, requested, True,
                    f"micro-batch {micro_batch} needs ~{_gib(requested.total)} GiB of {what}",
                    budget)

    sizes = [micro_batch]
    while sizes[-1] > 1:
        sizes.append(max(1, sizes[-1] // 2))
    candidates = [(mb, ckpt, estimate(mb, ckpt)) for mb in sizes for ckpt in (False, True)]
    tried = tuple((mb, ckpt, est.total) for mb, ckpt, est in candidates)
    fitting = [c for c in candidates if c[2].total <= budget]
    if fitting:
        mb, ckpt, est = min(fitting, key=lambda c: (_step_cost(c[0] * seq_len, c[1]), -c[0]))
        if ckpt:
            smallest = min(e.total for _, c, e in candidates if not c)
            why = (f"without it even micro-batch 1 needs ~{_gib(smallest)} GiB"
                   if smallest > budget else "smaller micro-batches without it run slower")
            how = f"with checkpointing (~{CHECKPOINT_SLOWDOWN:.2f}x per token; {why})"
        else:
            how = (f"without checkpointing; search.micro_batch_size <= {mb} would ask for it "
                   "directly")
        return plan(mb, ckpt, est, True,
                    f"micro-batch {micro_batch} without checkpointing needs "
                    f"~{_gib(requested.total)} GiB but the budget is {what}; using micro-batch "
                    f"{mb} x accumulation {math.ceil(effective / mb)} (~{_gib(est.total)} GiB) "
                    f"{how}", budget, tried)

    mb, ckpt, est = candidates[-1]  # micro-batch 1 with checkpointing: the least memory
    fixed = est.weights + est.adapters + est.workspace
    if fixed > budget:
        fix = (f"the weights and adapter states alone need ~{_gib(fixed)} GiB: use a smaller "
               "model or QLoRA (4-bit weights)")
    else:
        fix = (f"lower data.max_seq_len (now {seq_len})"
               + (", use a fused loss (Liger Kernel)"
                  if task == "causal_lm" and not fused_loss else "")
               + f", or use a smaller model / QLoRA (4-bit weights; the weights take "
                 f"~{_gib(est.weights)} GiB now)")
    return plan(mb, ckpt, est, False,
                f"even micro-batch 1 with checkpointing needs ~{_gib(est.total)} GiB but the "
                f"budget is {what}; {fix}", budget, tried)


def _step_cost(tokens: int, checkpointing: bool) -> float:
    """Relative time per token of a micro-batch of `tokens` (see SMALL_BATCH_TOKENS)."""
    return (CHECKPOINT_SLOWDOWN if checkpointing else 1.0) * (1 + SMALL_BATCH_TOKENS / tokens)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def free_device_bytes(device: Any) -> int | None:
    """Bytes a trial can still allocate on `device`; None on CPU (no limit planned for).

    Free memory as the driver reports it, plus what PyTorch's caching allocator holds reserved
    but unallocated, which this process can reuse.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))
