"""Training throughput: plain transformers + peft against gemma-search's engine, one process.

    python bench/throughput.py                  # Gemma 2 9B shapes, random weights, on the GPU
    python bench/throughput.py --tiny           # a 2-layer Gemma 2 on CPU: a smoke test only

Both sides train the same resident model (Gemma 2 9B architecture, random bf16 weights, no
hub) with LoRA r=16 on all seven linear projections, on the same random token sequences of
`--seq` tokens, and are timed over the same number of optimizer steps after warm-up:

  plain    what a user writes by hand from the transformers and peft docs: eager
           attention, gradient checkpointing, `model(input_ids, labels=...)`, batch 4
  engine   `gemma_search.train.engine.train_trial`, the code a worker runs, with its own
           choices: attention kernel, fused loss, batch plan for the free memory

It prints a table: useful (non-padding) tokens/s, useful TFLOP/s and MFU against the bf16
matmul ceiling measured on the same card, peak GiB, and the trial switch (from the end of one
trial's training to the next trial's first optimizer step, base model resident), and writes
the rows as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Setup:
    device: Any
    dtype: Any
    seq: int
    steps: int
    warmup: int


def gemma2_config(tiny: bool) -> Any:
    from transformers import Gemma2Config

    if tiny:
        return Gemma2Config(vocab_size=1024, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, sliding_window=64, final_logit_softcapping=30.0,
                            attn_logit_softcapping=50.0)
    # google/gemma-2-9b's config.json
    return Gemma2Config(vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                        num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                        head_dim=256, max_position_embeddings=8192, sliding_window=4096,
                        query_pre_attn_scalar=256, final_logit_softcapping=30.0,
                        attn_logit_softcapping=50.0)


def build_model(config: Any, setup: Setup) -> Any:
    """Random weights, built directly on the device in the training dtype."""
    import torch
    from transformers import Gemma2ForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(setup.dtype)
    try:
        with torch.device(setup.device):
            model = Gemma2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    return model


def useful_flops_per_token(config: Any, n_params: int, seq: int) -> float:
    """Forward 2N + activation-gradient backward 2N (a frozen base has no weight gradients),
    plus attention scores and values, forward and backward (causal: half the square)."""
    attention = 2 * 2 * config.num_hidden_layers * seq * config.num_attention_heads \
        * config.head_dim * 2 / 2
    return 4.0 * n_params + attention


def matmul_ceiling_tflops(setup: Setup) -> float:
    import torch

    n = 8192 if setup.device.type == "cuda" else 512
    a = torch.randn(n, n, device=setup.device, dtype=setup.dtype)
    b = torch.randn(n, n, device=setup.device, dtype=setup.dtype)
    for _ in range(3):
        a @ b
    _sync(setup)
    started = time.perf_counter()
    reps = 20 if setup.device.type == "cuda" else 5
    for _ in range(reps):
        a @ b
    _sync(setup)
    return reps * 2 * n**3 / (time.perf_counter() - started) / 1e12


def plain_baseline(model: Any, setup: Setup, batch: int, ids: Any) -> dict[str, Any]:
    """The hand-written objective: peft + eager + gradient checkpointing, HF's own loss."""
    import peft
    import torch

    model.set_attn_implementation("eager")
    lora = peft.get_peft_model(model, peft.LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.05, target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM"))
    lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora.enable_input_require_grads()
    lora.train()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    _reset_peak(setup)
    times = []
    for i in range(setup.warmup + setup.steps):
        x = ids[i % len(ids)][:batch].to(setup.device)
        _sync(setup)
        started = time.perf_counter()
        with torch.autocast(setup.device.type, dtype=setup.dtype,
                            enabled=setup.device.type == "cuda"):
            loss = lora(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(setup)
        if i >= setup.warmup:
            times.append(time.perf_counter() - started)
    peak = _peak_gib(setup)
    lora.gradient_checkpointing_disable()
    lora.unload()
    del lora, opt
    _free(setup)
    seconds = sorted(times)[len(times) // 2]
    return {"label": "plain transformers+peft (eager, grad ckpt)", "batch": batch,
            "tokens_per_s": batch * setup.seq / seconds, "peak_gib": peak,
            "checkpointing": True, "attention": "eager", "switch_s": None}


class TimingReporter:
    """Records (time, tokens) at each evaluation: throughput between evaluations."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def report(self, step: int, value: float, metrics: Mapping[str, float]) -> None:
        self.marks.append((time.perf_counter(), float(metrics["tokens"])))

    def should_prune(self) -> bool:
        return False


def engine(model: Any, tokenizer_ids: dict[str, int], setup: Setup, batch: int,
           ids: Any, trials: int = 2) -> dict[str, Any]:
    """`train_trial` on the resident base, twice: throughput of the second, and the switch."""
    import datasets
    import torch

    from gemma_search.train.config import TrialConfig
    from gemma_search.train.data import TaskData
    from gemma_search.train.engine import train_trial
    from gemma_search.train.model import BaseModel, resolve_attention

    attention = resolve_attention("auto", setup.device.type)
    model.set_attn_implementation(attention)
    rows = [list(map(int, seq)) for chunk in ids for seq in chunk]
    train = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows,
                                        "length": [len(r) for r in rows]})
    validation = train.select(range(1))  # evaluations only mark time: keep them cheap
    data = TaskData(train=train, validation=validation, task="causal_lm", num_labels=0,
                    pad_token_id=tokenizer_ids["pad"], unk_token_id=tokenizer_ids["unk"],
                    fingerprint="random")
    baseline = int(torch.cuda.memory_allocated(setup.device)) if setup.device.type == "cuda" \
        else 0
    base = BaseModel(model=model, tokenizer=None, task="causal_lm", device=setup.device,
                     head_state={}, memory_baseline=baseline, attn_implementation=attention)
    every = max(1, setup.warmup)
    cfg = TrialConfig(
        task="causal_lm", learning_rate=1e-4, micro_batch_size=batch,
        gradient_accumulation_steps=1, epochs=100.0, optimizer="adamw", momentum=None,
        adam_beta2=0.999, lr_schedule="constant", warmup_ratio=0.0, weight_decay=0.0,
        l1_penalty=0.0, lora_dropout=0.05, lora_r=16, lora_alpha=16, lora_targets="all_linear",
        lora_target_modules=LORA_TARGETS, early_stopping_patience=0, train_fraction=1.0,
        max_grad_norm=1.0, label_smoothing=0.0, token_dropout=0.0, seed=0, metric="val_loss",
        maximize=False, max_tokens=(setup.warmup + setup.steps) * batch * setup.seq,
        eval_every_steps=every)
    results = []
    for seed in range(trials):
        reporter = TimingReporter()
        _reset_peak(setup)
        result = train_trial(base, data, dataclasses.replace(cfg, seed=seed), reporter)
        results.append((result, reporter, _peak_gib(setup)))
    result, reporter, peak = results[-1]
    (t0, tok0), (t1, tok1) = reporter.marks[0], reporter.marks[-1]
    switch = results[0][0].teardown_seconds + result.setup_seconds
    return {"label": "gemma-search engine", "batch": result.micro_batch_size,
            "tokens_per_s": (tok1 - tok0) / (t1 - t0), "peak_gib": peak,
            "checkpointing": result.activation_checkpointing, "attention": attention,
            "loss": result.loss_backend, "switch_s": switch}


def random_ids(vocab: int, setup: Setup, batch: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(1)
    # Token ids 2.. (0 and 1 are pad and eos in Gemma's vocabulary): every token is useful.
    return torch.randint(2, vocab, (setup.warmup + setup.steps, batch, setup.seq), generator=g)


def main(argv: list[str] | None = None) -> int:
    import torch
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer Gemma 2 on CPU (smoke)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps")
    parser.add_argument("--plain-batch", type=int, default=4)
    parser.add_argument("--engine-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench-results/throughput.json"))
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    setup = Setup(device=device, dtype=torch.bfloat16 if cuda else torch.float32,
                  seq=args.seq or (1024 if not args.tiny else 64),
                  steps=args.steps or (8 if cuda else 3), warmup=2)
    config = gemma2_config(args.tiny or not cuda)
    model = build_model(config, setup)
    n_params = sum(p.numel() for p in model.parameters())
    flops = useful_flops_per_token(config, n_params, setup.seq)
    ceiling = matmul_ceiling_tflops(setup)
    env = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor()
           or "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
           "params": n_params, "seq": setup.seq,
           "matmul_ceiling_tflops": float(f"{ceiling:.3g}"),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(env), flush=True)

    batch = max(args.plain_batch, args.engine_batch)
    ids = random_ids(config.vocab_size, setup, batch)
    rows = [plain_baseline(model, setup, args.plain_batch, ids)]
    print(json.dumps(rows[-1]), flush=True)
    rows.append(engine(model, {"pad": 0, "unk": 3}, setup, args.engine_batch,
                       ids[:, :args.engine_batch]))
    print(json.dumps(rows[-1]), flush=True)

    for row in rows:
        tflops = row["tokens_per_s"] * flops / 1e12
        row.update(useful_tflops=float(f"{tflops:.3g}"), mfu=round(tflops / ceiling, 3),
                   tokens_per_s=round(row["tokens_per_s"], 1),
                   peak_gib=round(row["peak_gib"], 2))
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows, "speedup": speedup}, indent=2))

    print(f"\n{env['device']}, Gemma 2 {'9B' if cuda else 'tiny'} shapes, seq "
          f"{setup.seq}, LoRA r16 all linear; matmul ceiling {ceiling:.3g} TFLOP/s")
    print("| setup | batch | attention | ckpt | tokens/s | useful TFLOP/s | MFU | peak GiB "
          "| trial switch s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        switch = "-" if r["switch_s"] is None else f"{r['switch_s']:.2f}"
        print(f"| {r['label']} | {r['batch']} | {r['attention']} | {r['checkpointing']} | "
              f"{r['tokens_per_s']:,.0f} | {r['useful_tflops']} | {r['mfu']:.1%} | "
              f"{r['peak_gib']} | {switch} |")
    print(f"engine / plain: {speedup:.2f}x")
    return 0


def _sync(setup: Setup) -> None:
    import torch

    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)


def _reset_peak(setup: Setup) -> None:
    import torch

    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)


def _peak_gib(setup: Setup) -> float:
    import torch

    if setup.device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(setup.device) / 2**30


def _free(setup: Setup) -> None:
    import torch

    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
