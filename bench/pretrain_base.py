"""Pretrain the search-quality benchmark's tiny Gemma 2 on SST-2's unlabeled training text.

    python bench/pretrain_base.py --data ../shared/data/sst2 --work /tmp/gemma-search-bench/full
    python bench/pretrain_base.py --data ../shared/data/sst2 --work /tmp/x --quick

`bench/search_quality.py` calls `ensure_base`; the first command above pretrains in the
folder the full benchmark uses by default, which then reuses that base. It starts from the
random tiny Gemma 2 that `search_quality.build_model` saves (same tokenizer, same
architecture: soft-caps, sliding-window and global layers, tied embeddings), the model
`--random-base` searches on. It trains that model as a causal LM on
the training sentences of SST-2, without their labels, and saves it with `save_pretrained`
(model and tokenizer) in the work folder. The folder's name holds a cache key, a hash of the
settings, of `train.tsv` and of the random base's files: a later run with the same key
reuses it, and changed settings or data give a new folder.

A linear probe measures what the frozen base knows about sentiment. It mean-pools the last
hidden states of the real tokens of some training sentences, fits a logistic regression on
them (torch, L-BFGS, L2 penalty picked on a held-out fifth), and reports the accuracy on all
of `dev.tsv`. It runs on the random base and on the pretrained one. The figures are stored
with the model (`pretrain.json`), so a cached base reports them without recomputing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

META = "pretrain.json"


@dataclass(frozen=True)
class PretrainSettings:
    """Causal-LM pretraining: sentences packed as `<bos> text <eos>` into blocks."""

    steps: int
    batch_size: int  # blocks per step
    block_size: int  # tokens per block
    learning_rate: float
    warmup_steps: int
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    #: Train on the first this many (shuffled) training sentences; None: all of them.
    max_sentences: int | None = None
    #: Bump when the code changes what a given set of settings produces.
    version: int = 1


@dataclass(frozen=True)
class ProbeSettings:
    """The linear probe: how many training sentences it fits on (all of dev is scored)."""

    n_train: int
    seed: int = 0
    max_len: int = 64


#: 1.6 M tokens, 1.6 passes over SST-2's training text (1.05 M tokens packed). The cost is
#: mostly the 4096-token vocabulary's logits (soft-capped, then softmax), so it grows with
#: tokens; at the same tokens, 16-block steps learned more than 32-block ones.
FULL_PRETRAIN = PretrainSettings(steps=1600, batch_size=16, block_size=64,
                                 learning_rate=1e-2, warmup_steps=50)
FULL_PROBE = ProbeSettings(n_train=4000)
#: For `--quick` (a smoke test): seconds, not minutes; the base learns little.
QUICK_PRETRAIN = PretrainSettings(steps=30, batch_size=16, block_size=64,
                                  learning_rate=5e-3, warmup_steps=5, max_sentences=3000)
QUICK_PROBE = ProbeSettings(n_train=600)


def _log(message: str) -> None:
    print(message, flush=True)


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """(text, label) rows of a GLUE SST-2 file: a `label` column and one text column."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    li = header.index("label")
    ti = next(i for i, name in enumerate(header) if i != li)
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return [(r[ti], int(r[li])) for r in rows]


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(random_base: Path, data: Path, settings: PretrainSettings) -> str:
    """Changes when the settings, SST-2's train.tsv or the random base's files change."""
    base_files = sorted(p for p in random_base.iterdir()
                        if p.is_file() and p.suffix in (".json", ".safetensors"))
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    h.update(_sha256([data / "train.tsv"]).encode())
    h.update(_sha256(base_files).encode())
    return h.hexdigest()[:12]


def base_dir(random_base: Path, data: Path, work: Path, settings: PretrainSettings) -> Path:
    return work / f"{random_base.name}-pretrained-{cache_key(random_base, data, settings)}"


def _blocks(tokenizer: Any, texts: list[str], block_size: int) -> Any:
    """Every text as <bos> ... <eos>, concatenated and cut into blocks (the tail dropped)."""
    import torch

    ids: list[int] = []
    for row in tokenizer(texts)["input_ids"]:  # the tokenizer adds <bos>
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block_size
    return torch.tensor(ids[:n * block_size]).view(n, block_size)


def pretrain(random_base: Path, data: Path, out: Path, settings: PretrainSettings,
             log: Any = None, threads: int | None = 1) -> dict[str, Any]:
    """Train `random_base` as a causal LM on train.tsv's sentences; save it to `out`.

    `threads`: torch threads while training (None: leave them as they are). One by default:
    on a 2-core machine that others shared (load average 3-5), 2 threads took 4 to 7 times
    as long per step (docs/benchmarks.md).
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _pretrain(random_base, data, out, settings, log)
    finally:
        torch.set_num_threads(previous)


def _pretrain(random_base: Path, data: Path, out: Path, settings: PretrainSettings,
              log: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    log = log or _log
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(random_base)
    texts = [t for t, _ in read_tsv(data / "train.tsv")]
    random.Random(settings.seed).shuffle(texts)
    texts = texts[:settings.max_sentences]
    blocks = _blocks(tokenizer, texts, settings.block_size)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(random_base, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps,
                                                settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(blocks), generator=generator)
    pos, losses = 0, []
    for step in range(1, settings.steps + 1):
        if pos + settings.batch_size > len(order):
            order, pos = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[pos:pos + settings.batch_size]]
        pos += settings.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, settings.steps // 10) == 0 or step == settings.steps:
            recent = losses[-max(1, settings.steps // 10):]
            log(f"pretrain step {step}/{settings.steps}: train loss "
                f"{sum(recent) / len(recent):.3f} ({time.perf_counter() - started:.0f} s)")
    seconds = time.perf_counter() - started
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tail = losses[-max(1, settings.steps // 10):]
    meta = {
        "settings": dataclasses.asdict(settings),
        "random_base": str(random_base),
        "data": str(data),
        "train_sentences": len(texts),
        "tokens_per_pass": int(blocks.numel()),
        "tokens_trained": settings.steps * settings.batch_size * settings.block_size,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "final_train_loss": sum(tail) / len(tail),
        "date": date.today().isoformat(),
    }
    (tmp / META).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return meta


# --------------------------------------------------------------------------- linear probe


def _features(model: Any, tokenizer: Any, texts: list[str], max_len: int) -> Any:
    """Mean of the last hidden states (after the final norm) over each text's real tokens."""
    import torch

    feats = []
    with torch.no_grad():
        for i in range(0, len(texts), 128):
            enc = tokenizer(texts[i:i + 128], padding=True, truncation=True,
                            max_length=max_len, return_tensors="pt")
            hidden = model.model(input_ids=enc["input_ids"],
                                 attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            feats.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(feats)


def _fit_logistic(x: Any, y: Any, l2: float) -> tuple[Any, Any]:
    import torch

    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(x: Any, y: Any, wb: tuple[Any, Any]) -> float:
    return float(((x @ wb[0] + wb[1] > 0).float() == y).float().mean())


def linear_probe(model_dir: Path, data: Path, probe: ProbeSettings) -> dict[str, Any]:
    """Dev accuracy of a logistic regression on the frozen model's mean-pooled states."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    train = read_tsv(data / "train.tsv")
    train = random.Random(probe.seed).sample(train, min(probe.n_train, len(train)))
    dev = read_tsv(data / "dev.tsv")
    x = _features(model, tokenizer, [t for t, _ in train], probe.max_len)
    xd = _features(model, tokenizer, [t for t, _ in dev], probe.max_len)
    y = torch.tensor([lab for _, lab in train], dtype=torch.float32)
    yd = torch.tensor([lab for _, lab in dev], dtype=torch.float32)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xd = (x - mean) / std, (xd - mean) / std
    cut = len(x) * 4 // 5  # the penalty is chosen on the last fifth of the probe's train set
    held = {l2: _accuracy(x[cut:], y[cut:], _fit_logistic(x[:cut], y[:cut], l2))
            for l2 in (1e-4, 1e-3, 1e-2, 1e-1)}
    l2 = max(held, key=lambda k: (held[k], k))
    wb = _fit_logistic(x, y, l2)
    return {"dev_accuracy": _accuracy(xd, yd, wb), "train_accuracy": _accuracy(x, y, wb),
            "l2": l2, "n_train": len(train), "n_dev": len(dev),
            "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- cache


def ensure_base(random_base: Path, data: Path, work: Path, settings: PretrainSettings,
                probe: ProbeSettings, log: Any = None,
                threads: int | None = 1) -> dict[str, Any]:
    """The pretrained base for these settings and data: trained once, then reused.

    Returns `pretrain.json`'s content plus `path`, `key` and `reused` (False when this call
    trained it). The probes (`probe.random`, `probe.pretrained`) are computed on the first
    call and again only when the probe settings change.
    """
    log = log or _log
    key = cache_key(random_base, data, settings)
    out = work / f"{random_base.name}-pretrained-{key}"
    meta_path = out / META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    reused = meta is not None and meta.get("settings") == dataclasses.asdict(settings)
    if not reused:
        log(f"pretraining {random_base.name} on {data / 'train.tsv'} "
            f"({settings.steps} steps of {settings.batch_size} x {settings.block_size} tokens)")
        meta = pretrain(random_base, data, out, settings, log=log, threads=threads)
    assert meta is not None
    if meta.get("probe", {}).get("settings") != dataclasses.asdict(probe):
        meta["probe"] = {"settings": dataclasses.asdict(probe),
                         "random": linear_probe(random_base, data, probe),
                         "pretrained": linear_probe(out, data, probe)}
        meta_path.write_text(json.dumps(meta, indent=1))
    return {**meta, "path": str(out), "key": key, "reused": reused}


def random_probe(random_base: Path, data: Path, probe: ProbeSettings) -> dict[str, Any]:
    """The probe of the random base alone (for `--random-base`), cached next to it."""
    path = random_base / "probe.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if stored.get("settings") != dataclasses.asdict(probe):
        stored = {"settings": dataclasses.asdict(probe),
                  "random": linear_probe(random_base, data, probe)}
        path.write_text(json.dumps(stored, indent=1))
    return stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="folder holding SST-2's train.tsv and dev.tsv")
    parser.add_argument("--work", type=Path, required=True,
                        help="folder for the random and the pretrained base")
    parser.add_argument("--quick", action="store_true", help="the smoke test's settings")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while pretraining (default 1)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from search_quality import build_model

    data, work = args.data.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    random_base = build_model(data, work)
    settings, probe = (QUICK_PRETRAIN, QUICK_PROBE) if args.quick else (FULL_PRETRAIN,
                                                                         FULL_PROBE)
    base = ensure_base(random_base, data, work, settings, probe, threads=args.threads)
    p = base["probe"]
    print(json.dumps({k: base[k] for k in ("path", "key", "reused", "seconds", "threads",
                                           "tokens_trained", "final_train_loss")}, indent=1))
    print(f"linear probe, dev accuracy: random base {p['random']['dev_accuracy']:.3f}, "
          f"pretrained {p['pretrained']['dev_accuracy']:.3f} "
          f"(fit on {p['pretrained']['n_train']} training sentences)")
    if not math.isfinite(base["final_train_loss"]):
        sys.exit("pretraining diverged")


if __name__ == "__main__":
    main()
