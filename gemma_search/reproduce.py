"""Re-train an exported gemma-search trial with plain transformers + peft, and print its metric.

`gemma-search export` copies this file, unchanged, beside the files it reads; it imports
torch, transformers, peft and datasets (and TRL for causal_lm when installed), never
gemma_search:

    python reproduce.py                                # data files as recorded in data.json
    python reproduce.py --train T.jsonl --validation V.jsonl
    python reproduce.py --no-trl                       # causal_lm: Trainer instead of SFTTrainer

It reads, from its own folder:
    training_args.json   `TrainingArguments(**...)`: steps, warmup, evaluation schedule, ...
    lora_config.json     `LoraConfig(**...)`
    data.json            the examples (the selection rule and seeds), prompt, labels, head, loss
    early_stopping.json  `EarlyStoppingCallback(**...)`, when the trial stopped early on patience
    sft_config.json      causal_lm with TRL: `SFTConfig(**...)`

and prints the metric at every evaluation and the best, which is the value the study recorded
for the trial (a trial's value is its best evaluation). Three things make the run repeat the
study's own one step for step, beyond what the JSON files say:
    1. the examples come in the study's order: each epoch a permutation drawn with
       `torch.Generator().manual_seed(seed * 100003 + epoch)`, epochs back to back, so the
       Trainer's sampler is sequential over that order;
    2. the random stream at the first step continues from the adapters' initialisation (LoRA
       dropout masks match), where Trainer would re-seed;
    3. the loss of an optimizer step is the sum over its examples (causal_lm: their target
       tokens) divided by their count, and evaluations use the study's metrics (causal_lm:
       the loss per target token over the whole validation set); causal_lm with packing
       packs each step's examples into rows as the study did, one micro-batch of rows per
       dataset item, so that LoRA dropout draws its masks over the same shapes.
Token dropout and the L1 penalty, which TrainingArguments has no field for, come from
data.json. For your own training code, training_args.json and lora_config.json alone give
the same recipe with Trainer's own shuffling.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", help="training file (default: the path in data.json)")
    parser.add_argument("--validation", help="validation file (default: the path in data.json)")
    parser.add_argument("--output-dir", default=str(HERE / "reproduce-run"),
                        help="Trainer checkpoints and logs")
    parser.add_argument("--no-trl", action="store_true",
                        help="causal_lm: train with transformers' Trainer even if trl is installed")
    args = parser.parse_args()

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    data = _read_json("data.json")
    lora = _read_json("lora_config.json")
    training = _read_json("training_args.json")
    stopping = _read_json("early_stopping.json") if (HERE / "early_stopping.json").exists() \
        else None
    task, seed = data["task"], int(training["seed"])
    cuda = torch.cuda.is_available()

    tokenizer, model = _load_model(data["model"], task, data, cuda)
    train, validation = _examples(data, tokenizer, args.train, args.validation)
    order = _study_order(data, training)
    print(f"data: {len(train)} training examples ({len(order)} drawn over "
          f"{training['max_steps']} steps), {len(validation)} validation examples")
    model.config.use_cache = False  # with a cache, transformers would not see packed rows

    torch.manual_seed(seed)  # as the study: seed, then fresh adapters
    model = get_peft_model(model, LoraConfig(**lora))
    rng = _rng_state(torch, cuda)

    overrides: dict[str, Any] = {"output_dir": args.output_dir, "report_to": "none",
                                 "remove_unused_columns": False, "disable_tqdm": True,
                                 "logging_steps": training.get("eval_steps") or 500,
                                 "dataloader_pin_memory": cuda}
    if training.get("bf16") and not cuda:
        overrides["bf16"] = False
        print("no CUDA device: bf16 off, the run is in float32 (the study's trial used bf16)")
    use_trl = task == "causal_lm" and not args.no_trl and _has_trl()
    collator = _Collator(task, tokenizer.pad_token_id)
    if data["packing"]:
        # One dataset item per micro-batch of packed rows, as the study trained them.
        steps: Any = _packed_steps(order, train, data, training)
        train_collator: Any = _PackedCollator(train, tokenizer.pad_token_id)
        overrides["per_device_train_batch_size"] = 1
        print(f"packing: each optimizer step's examples go into rows of {data['max_seq_len']} "
              f"tokens, {training['per_device_train_batch_size']} rows per micro-batch, as the "
              "study did")
    else:
        steps, train_collator = train.select(range(data["train_examples"])).select(order), \
            collator
    callbacks = [_RestoreRandomStream(rng, cuda), _EvaluateAtEnd()]
    if stopping is not None:
        callbacks.append(transformers.EarlyStoppingCallback(**stopping))
    kwargs: dict[str, Any] = {"model": model, "train_dataset": steps, "eval_dataset": validation,
                              "data_collator": train_collator, "callbacks": callbacks}
    if use_trl:
        from trl import SFTConfig, SFTTrainer

        # The examples arrive tokenized (and packed, as the study packed them): TRL only
        # trains on them.
        sft = {**_read_json("sft_config.json"), **overrides, "packing": False,
               "padding_free": False, "max_length": data["max_seq_len"],
               "dataset_kwargs": {"skip_prepare_dataset": True}}
        trainer: Any = _with_study_parts(SFTTrainer)(
            args=SFTConfig(**sft), processing_class=tokenizer, **kwargs)
        print("trainer: trl.SFTTrainer with sft_config.json")
    else:
        trainer = _with_study_parts(transformers.Trainer)(
            args=transformers.TrainingArguments(**{**training, **overrides}),
            compute_loss_func=_loss_function(task, training.get("label_smoothing_factor", 0.0)),
            **kwargs)
        print("trainer: transformers.Trainer with training_args.json")
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
    trainer.study = {"data": data, "collator": collator, "cuda": cuda, "unk_token_id": unk}
    trainer.train()

    metric, bigger = data["metric"], data["greater_is_better"]
    history = trainer.study_history
    for row in history:
        shown = ", ".join(f"{k} {v:.6g}" for k, v in row.items() if k != "step")
        print(f"step {row['step']}: {shown}")
    best = (max if bigger else min)(history, key=lambda r: r[metric])
    print(f"best {metric}: {best[metric]:.6g} at step {best['step']}")
    print(json.dumps({"best": best[metric], "metric": metric, "history": history}))


def _read_json(name: str) -> Any:
    return json.loads((HERE / name).read_text())


def _has_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- model and data


def _load_model(spec: dict[str, Any], task: str, data: dict[str, Any], cuda: bool) -> Any:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(spec["name_or_path"], revision=spec["revision"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = spec["dtype"]
    if dtype == "auto":  # the study's rule: bf16 on a GPU, float32 on a CPU
        dtype = "bfloat16" if cuda else "float32"
    attention = spec["attn_implementation"]
    if attention == "flash_attention_2" and not _has_module("flash_attn"):
        attention = "flex_attention" if cuda else "eager"
    if attention == "flex_attention" and not cuda:
        attention = "eager"
    kwargs = {"revision": spec["revision"], "dtype": getattr(torch, dtype),
              "attn_implementation": attention}
    # The classification / regression head is not in the checkpoint: the study drew it with
    # seed 0, and so does this.
    torch.manual_seed(0)
    model: Any
    if task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(spec["name_or_path"], **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            spec["name_or_path"], num_labels=data["num_labels"],
            problem_type="regression" if task == "regression" else "single_label_classification",
            **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cuda:
        model.to("cuda")
    print(f"model: {spec['name_or_path']} ({dtype}, attention {attention})")
    return tokenizer, model


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _read(path: str, how: dict[str, Any], split: str) -> Any:
    """Read a data file as the study did (`read` in data.json)."""
    import csv

    import datasets

    if how["builder"] == "load_from_disk":
        loaded = datasets.load_from_disk(path)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    kwargs = dict(how["kwargs"])
    if how["strings"]:  # every column as the text the file holds, header or not
        names = kwargs.get("column_names")
        if not names:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                names = next(csv.reader(fh, delimiter=kwargs["delimiter"],
                                        quoting=kwargs["quoting"]))
        kwargs["column_names"] = names
        kwargs["features"] = datasets.Features({n: datasets.Value("string") for n in names})
    return datasets.load_dataset(how["builder"], data_files=path, split="train", **kwargs)


def _examples(data: dict[str, Any], tokenizer: Any, train_path: str | None,
              validation_path: str | None) -> tuple[Any, Any]:
    """The study's training and validation examples, tokenized as the study did."""
    files = data["files"]
    train_path = train_path or files["train"]
    validation_path = validation_path or files["validation"]
    rename = data["rename_columns"]

    def renamed(ds: Any) -> Any:
        mapping = {old: new for old, new in rename.items() if old in ds.column_names}
        return ds.rename_columns(mapping) if mapping else ds

    seed = data["seed"]
    train = renamed(_read(train_path, data["read"]["train"], "train"))
    if validation_path is not None:
        validation = renamed(_read(validation_path, data["read"]["validation"], "validation"))
    else:
        parts = train.train_test_split(test_size=data["validation_fraction"], seed=seed)
        train, validation = parts["train"], parts["test"]
    train = train.shuffle(seed=seed)
    if data["max_train_examples"] is not None:
        train = train.select(range(min(data["max_train_examples"], len(train))))
    if data["max_validation_examples"] is not None:
        validation = validation.shuffle(seed=seed)
        validation = validation.select(range(min(data["max_validation_examples"],
                                                 len(validation))))
    tokenize = _tokenizer_for(data, tokenizer)
    train = train.map(tokenize, batched=True, remove_columns=train.column_names)
    validation = validation.map(tokenize, batched=True, remove_columns=validation.column_names)
    expected = data["train_examples_available"]
    if expected is not None and len(train) != expected:
        raise SystemExit(f"these files give {len(train)} training examples where the study had "
                         f"{expected}: they are not the data the trial was trained on")
    return train, validation


def _tokenizer_for(data: dict[str, Any], tokenizer: Any) -> Any:
    """The study's tokenization: prompt + completion (+ <eos>) for causal_lm, the text and its
    label otherwise, cut to max_seq_len tokens."""
    task, max_len = data["task"], data["max_seq_len"]
    template, text_column = data["prompt_template"], data["text_column"]
    completion_column, label_column = data["completion_column"], data["label_column"]
    labels = data["labels"]
    eos = tokenizer.eos_token_id

    def render(batch: dict[str, list[Any]], i: int) -> str:
        if template is not None:
            return str(template.format(**{k: v[i] for k, v in batch.items()}))
        return str(batch[text_column][i])

    def label_of(value: Any) -> Any:
        if task == "regression":
            return float(value)
        if isinstance(value, str) and value in labels:
            return labels.index(value)
        return int(value)

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
        for i in range(len(next(iter(batch.values())))):
            if task == "causal_lm" and completion_column is not None:
                prompt = tokenizer(render(batch, i))["input_ids"]
                completion = tokenizer(str(batch[completion_column][i]),
                                       add_special_tokens=False)["input_ids"] + [eos]
                ids = (prompt + completion)[:max_len]
                target = ([-100] * len(prompt) + completion)[:max_len]
                if all(t == -100 for t in target):
                    continue  # the prompt fills the window: the study skipped it too
            elif task == "causal_lm":
                ids = (tokenizer(render(batch, i))["input_ids"] + [eos])[:max_len]
                target = list(ids)
            else:
                ids = tokenizer(render(batch, i), truncation=True, max_length=max_len)[
                    "input_ids"]
                target = label_of(batch[label_column][i])
            out["input_ids"].append(ids)
            out["labels"].append(target)
        return out

    return tokenize


def _study_order(data: dict[str, Any], training: dict[str, Any]) -> list[int]:
    """Indices into the first `train_examples` examples, in the order the trial's optimizer
    steps took them: one seeded permutation per epoch, epochs back to back."""
    import torch

    n = data["train_examples"]
    seed = int(training["seed"])
    per_step = training["per_device_train_batch_size"] * training["gradient_accumulation_steps"]
    wanted = training["max_steps"] * per_step
    order: list[int] = []
    epoch = 0
    while len(order) < wanted:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order += torch.randperm(n, generator=generator).tolist()
        epoch += 1
    return order[:wanted]


def _packed_steps(order: list[int], train: Any, data: dict[str, Any],
                  training: dict[str, Any]) -> Any:
    """causal_lm with packing: item k is micro-batch k % accumulation of optimizer step
    k // accumulation, as the example indices of its rows. A step's examples are packed
    first-fit decreasing into rows of max_seq_len tokens, the rows go
    `per_device_train_batch_size` to a micro-batch, and a step with fewer micro-batches than
    the accumulation is filled up with empty ones, which train nothing."""
    import datasets

    micro = training["per_device_train_batch_size"]
    accum = training["gradient_accumulation_steps"]
    # flash_attention_2 reads packed documents only from a single row per micro-batch
    one_row = data["model"]["attn_implementation"] == "flash_attention_2"
    items: list[dict[str, Any]] = []
    for start in range(0, len(order), micro * accum):
        window = order[start:start + micro * accum]
        groups = [[window[i] for i in g] for g in _pack([train[j] for j in window],
                                                         data["max_seq_len"])]
        chunks = [groups[i:i + micro] for i in range(0, len(groups), micro)]
        if one_row:
            chunks = [[[i for g in chunk for i in g]] for chunk in chunks]
        items += [{"rows": chunk, "share": 1.0 / len(chunks)} for chunk in chunks]
        items += [{"rows": [], "share": 0.0}] * (accum - len(chunks))
    return datasets.Dataset.from_list(items)


class _PackedCollator:
    """One item (batch size 1) of `_packed_steps` -> its packed rows as tensors."""

    def __init__(self, train: Any, pad_token_id: int) -> None:
        self.train, self.pad = train, pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        groups, share = items[0]["rows"], items[0]["share"]
        if not groups:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {"input_ids": empty, "position_ids": empty, "labels": empty,
                    "document_ids": empty, "share": 0.0}
        rows = {i: self.train[i] for g in groups for i in g}
        return {**_collate_packed(rows, groups, self.pad), "share": share}


def _pack(rows: list[dict[str, Any]], max_len: int) -> list[list[int]]:
    """First-fit decreasing: longest rows first (ties by index), each into the first row it
    fits; each group's indices in increasing order."""
    lengths = [len(r["input_ids"]) for r in rows]
    groups: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: (-lengths[i], i)):
        for g, room in enumerate(free):
            if lengths[i] <= room:
                groups[g].append(i)
                free[g] -= lengths[i]
                break
        else:
            groups.append([i])
            free.append(max_len - lengths[i])
    return [sorted(g) for g in groups]


def _collate_packed(rows: Any, groups: list[list[int]],
                    pad_token_id: int) -> dict[str, Any]:
    """One row per group: position ids restart per document, its first token is no target,
    and the padded tail continues the last document's positions (labels -100)."""
    import torch

    width = max(sum(len(rows[i]["input_ids"]) for i in g) for g in groups)
    ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    labels = torch.full((len(groups), width), -100, dtype=torch.long)
    documents = torch.full((len(groups), width), -1, dtype=torch.long)
    for b, group in enumerate(groups):
        start = 0
        for i in group:
            n = len(rows[i]["input_ids"])
            ids[b, start:start + n] = torch.tensor(rows[i]["input_ids"])
            positions[b, start:start + n] = torch.arange(n)
            labels[b, start:start + len(rows[i]["labels"])] = torch.tensor(rows[i]["labels"])
            labels[b, start] = -100
            documents[b, start:start + n] = i
            start += n
        last = len(rows[group[-1]]["input_ids"])
        positions[b, start:] = torch.arange(last, last + width - start)
    return {"input_ids": ids, "position_ids": positions, "labels": labels,
            "document_ids": documents}


class _Collator:
    """Right-pad a list of examples; causal_lm labels pad with -100, and position 0 is never
    a target (the loss shifts labels), so both trainers count the same target tokens."""

    def __init__(self, task: str, pad_token_id: int) -> None:
        self.task, self.pad = task, pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, :len(r["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.task == "causal_lm":
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
            labels[:, 0] = -100
            batch["labels"] = labels
        else:
            dtype = torch.float32 if self.task == "regression" else torch.long
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=dtype)
        return batch


# --------------------------------------------------------------------------- training parts


def _loss_function(task: str, label_smoothing: float) -> Any:
    """`compute_loss_func`: the step's summed loss over its examples (causal_lm: target
    tokens), divided by their count (`num_items_in_batch`), as the study trains."""
    import torch.nn.functional as F

    def loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        logits = outputs.logits.float()
        if task == "causal_lm":
            total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                    labels[:, 1:].reshape(-1), ignore_index=-100,
                                    reduction="sum")
        elif task == "classification":
            total = F.cross_entropy(logits, labels, label_smoothing=label_smoothing,
                                    reduction="sum")
        else:
            total = F.mse_loss(logits.squeeze(-1), labels, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else (
            (labels[:, 1:] != -100).sum() if task == "causal_lm" else len(labels))
        return total / count

    return loss


def _with_study_parts(base: type) -> type:
    """`base` (Trainer or SFTTrainer) with the study's sampler (sequential over the study's
    order) and evaluation (its metrics, over the whole validation set)."""

    class StudyTrainer(base):  # type: ignore[misc, valid-type]
        study: dict[str, Any]
        study_history: list[dict[str, float]] = []

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            import torch

            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            """The study's two regularisers that TrainingArguments has no field for:
            token dropout (input tokens but the first become <unk> with probability p) and
            an L1 penalty on the adapter weights, spread over the step's micro-batches."""
            import torch

            data = self.study["data"]
            inputs = dict(inputs)
            documents = inputs.pop("document_ids", None)  # packed rows: which tokens are real
            share = inputs.pop("share", 1.0 / self.args.gradient_accumulation_steps)
            if model.training and data["token_dropout"] > 0:
                ids = inputs["input_ids"]
                if documents is not None:
                    droppable = (documents >= 0) & (inputs["position_ids"] > 0)
                else:
                    droppable = inputs["attention_mask"].bool()
                    droppable[:, 0] = False
                drop = (torch.rand(ids.shape, device=ids.device) < data["token_dropout"]) \
                    & droppable
                inputs = {**inputs, "input_ids": torch.where(
                    drop, torch.full_like(ids, self.study["unk_token_id"]), ids)}
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if model.training and data["l1_penalty"] > 0:
                l1 = sum(p.abs().sum() for n, p in model.named_parameters()
                         if p.requires_grad and "lora_" in n)
                extra = data["l1_penalty"] * l1 * share
                result = (result[0] + extra, *result[1:]) if return_outputs else result + extra
            return result

        def training_step(self, model: Any, inputs: dict[str, Any],
                          num_items_in_batch: Any = None) -> Any:
            import torch

            if inputs["input_ids"].numel() == 0:  # a packed step's filler: nothing to train
                return torch.zeros((), device=self.args.device)
            return super().training_step(model, inputs, num_items_in_batch)

        def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                     metric_key_prefix: str = "eval") -> dict[str, float]:
            metrics = _study_metrics(self.model, self.eval_dataset, self.study,
                                     self.args.per_device_eval_batch_size)
            self.study_history = [*self.study_history,
                                  {"step": self.state.global_step, **metrics}]
            out = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
            self.log(out)
            this: Any = self  # Trainer's attributes, untyped for mypy's sake
            this.control = this.callback_handler.on_evaluate(this.args, this.state,
                                                             this.control, out)
            return out

    StudyTrainer.__name__ = f"Study{base.__name__}"
    return StudyTrainer


def _study_metrics(model: Any, validation: Any, study: dict[str, Any],
                   batch_size: int) -> dict[str, float]:
    """The study's validation metrics: val_loss and the task's own."""
    import torch
    import torch.nn.functional as F

    task = study["data"]["task"]
    device = next(p.device for p in model.parameters())
    model.eval()
    total, count = 0.0, 0
    preds: list[Any] = []
    golds: list[Any] = []
    with torch.no_grad():
        for start in range(0, len(validation), batch_size):
            rows = [validation[i] for i in range(start, min(start + batch_size, len(validation)))]
            batch = {k: v.to(device) for k, v in study["collator"](rows).items()}
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits.float()
            if task == "causal_lm":
                total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100,
                                               reduction="sum"))
                count += int((labels[:, 1:] != -100).sum())
                continue
            if task == "classification":
                total += float(F.cross_entropy(logits, labels, reduction="sum"))
                preds.append(logits.argmax(-1).cpu())
            else:
                total += float(F.mse_loss(logits.squeeze(-1), labels, reduction="sum"))
                preds.append(logits.squeeze(-1).cpu())
            golds.append(labels.cpu())
            count += len(labels)
    model.train()
    val_loss = total / max(count, 1)
    if task == "causal_lm":
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}
    p, y = torch.cat(preds), torch.cat(golds)
    if task == "classification":
        return {"val_loss": val_loss, **_classification(p, y, study["data"]["num_labels"])}
    return {"val_loss": val_loss, **_regression(p.double(), y.double())}


def _classification(p: Any, y: Any, num_labels: int) -> dict[str, float]:
    f1s = []
    for c in range(num_labels):
        tp = int(((p == c) & (y == c)).sum())
        fp = int(((p == c) & (y != c)).sum())
        fn = int(((p != c) & (y == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0)
    return {"accuracy": float((p == y).double().mean()), "macro_f1": sum(f1s) / num_labels}


def _regression(p: Any, y: Any) -> dict[str, float]:
    """RMSE, Pearson and Spearman (average ranks for ties); a correlation of constant
    predictions is 0."""
    out = {"rmse": float(((p - y) ** 2).mean().sqrt()), "pearson": 0.0, "spearman": 0.0}
    if len(p) > 1 and float(p.max() - p.min()) > 0 and float(y.max() - y.min()) > 0:
        out["pearson"] = _pearson(p, y)
        out["spearman"] = _pearson(_ranks(p), _ranks(y))
    return out


def _pearson(a: Any, b: Any) -> float:
    a, b = a - a.mean(), b - b.mean()
    r = float((a * b).sum() / ((a * a).sum().sqrt() * (b * b).sum().sqrt()))
    return r if math.isfinite(r) else 0.0


def _ranks(values: Any) -> Any:
    import torch

    order = sorted(range(len(values)), key=lambda i: float(values[i]))
    ranks = torch.empty(len(values), dtype=torch.float64)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and float(values[order[j + 1]]) == float(values[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _rng_state(torch: Any, cuda: bool) -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else None}


class _RestoreRandomStream:
    """Trainer re-seeds when it is built; the study's run went on from the adapters'
    initialisation. Put that stream back before the first step, so dropout draws match."""

    def __init__(self, state: dict[str, Any], cuda: bool) -> None:
        self.state, self.cuda = state, cuda

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch

        if state.global_step == 0 and self.state is not None:
            torch.set_rng_state(self.state["cpu"])
            if self.cuda and self.state["cuda"] is not None:
                torch.cuda.set_rng_state_all(self.state["cuda"])
            self.state = None  # type: ignore[assignment]


class _EvaluateAtEnd:
    """Evaluate after the last step, as the study does (transformers >= 5.2x does it too)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control


if __name__ == "__main__":
    main()
