"""The demo: a real search on CPU with a tiny Gemma 2 and data the project writes itself.

`gemma-search demo` = write data -> build the tiny model -> create the study in SQLite ->
run 2 workers -> leaderboard -> export. Every step is the one a Gemma 2 9B study takes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["DEMO_LABELS", "demo_sentences", "write_demo_data"]

DEMO_LABELS = ("negative", "positive")

_SUBJECTS = ("the movie", "the film", "the plot", "the acting", "the script", "the ending",
             "the soundtrack", "the cast", "the director's work", "the dialogue")
_GOOD = ("great", "wonderful", "brilliant", "delightful", "moving", "superb", "charming",
         "funny", "gripping", "beautiful")
_BAD = ("dull", "boring", "awful", "clumsy", "tedious", "weak", "bland", "messy", "lifeless",
        "predictable")
_OPENERS = ("", "honestly, ", "i thought ", "to be fair, ", "overall ", "in the end ")


def demo_sentences(n: int, seed: int) -> list[dict[str, str]]:
    """`n` short movie-review sentences labelled negative/positive.

    Negation ("was not great") flips the label, so a bag of words does not solve the task:
    a model has to read word order, and settings that learn faster show it. 5% of labels
    are flipped, so no setting reaches zero loss.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        negated = rng.random() < 0.3
        word_is_good = positive != negated
        adj = rng.choice(_GOOD if word_is_good else _BAD)
        subject = rng.choice(_SUBJECTS)
        verb = rng.choice(("was", "is", "felt"))
        text = f"{rng.choice(_OPENERS)}{subject} {verb} {'not ' if negated else ''}{adj}"
        if rng.random() < 0.4:
            other = rng.choice(_GOOD if word_is_good else _BAD)
            text += f" and {'not ' if negated else ''}{other}" if other != adj else ""
        if rng.random() < 0.05:
            positive = not positive  # label noise: real reviews are not all clear-cut
        rows.append({"text": text, "label": DEMO_LABELS[int(positive)]})
    return rows


def write_demo_data(out_dir: str | Path, *, n_train: int = 800, n_validation: int = 160,
                    seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and validation.jsonl; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, s in (("train", n_train, seed), ("validation", n_validation, seed + 1)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in demo_sentences(n, s)))
        paths.append(path)
    return paths[0], paths[1]
