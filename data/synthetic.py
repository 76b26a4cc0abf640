"""A deterministic synthetic instruction dataset: small arithmetic and string tasks.

Tasks: `add` (2-digit addition), `upper` (uppercase a word), `reverse` (reverse a word; not in
the default mix). `generate_paraphrased` asks for the same two skills in other words.

A tiny model learns these in minutes on a CPU, and exact-match accuracy of greedy generation
measures it plainly. Row `i` of a split depends only on (seed, split, i), so the data are the
same on every machine and eval never overlaps train.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

TASKS = ("add", "upper")
ALL_TASKS = ("add", "upper", "reverse")


def _held_out(a: int, b: int) -> bool:
    # One addition pair in ten is reserved for eval, so accuracy measures generalization.
    return (a + 7 * b) % 10 == 0


def _addends(rng: random.Random, split: str) -> tuple[int, int]:
    while True:
        a, b = rng.randrange(100), rng.randrange(100)
        if _held_out(a, b) == (split == "eval"):
            return a, b


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))


def make_row(rng: random.Random, task: str, split: str = "train") -> dict[str, str]:
    if task == "add":
        a, b = _addends(rng, split)
        return {"instruction": f"{a}+{b}=", "context": "", "response": str(a + b), "task": task}
    if task == "upper":
        word = _word(rng)
        return {
            "instruction": f"upper {word}",
            "context": "",
            "response": word.upper(),
            "task": task,
        }
    if task == "reverse":  # harder: a 0.9M model needs far longer than the demo's budget
        word = _word(rng)
        return {
            "instruction": f"reverse {word}",
            "context": "",
            "response": word[::-1],
            "task": task,
        }
    raise ValueError(f"unknown task {task!r}; expected one of {ALL_TASKS}")


def generate(
    num_rows: int, seed: int, split: str = "train", tasks: tuple[str, ...] = TASKS
) -> list[dict[str, str]]:
    """`num_rows` rows of `split` ("train" or "eval"), tasks interleaved, each with a unique `id`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for i in range(num_rows):
        row = make_row(rng, tasks[i % len(tasks)], split)
        row["id"] = f"{split}-{i}"
        rows.append(row)
    return rows


# The same two skills asked in other words than `make_row`'s ("12+34=", "upper cat"): the data
# of the base that the QLoRA demo adapts (launch/make_demo.py).
PARAPHRASES = {"add": "what is {a} plus {b}", "upper": "{word} in capitals"}


def generate_paraphrased(num_rows: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """`num_rows` instruction rows of `add` and `upper` asked as in PARAPHRASES ("what is 12 plus
    34" -> "46", "cat in capitals" -> "CAT"), two sums to each word (addition takes far longer to
    learn). The addition pairs `generate` holds out of its train split are held out here too, so
    a model trained on this train split has never seen a pair that `generate`'s eval asks about."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{seed}-{split}-base")
    rows = []
    for i in range(num_rows):
        if i % 3 != 2:
            a, b = _addends(rng, split)
            row = {"instruction": PARAPHRASES["add"].format(a=a, b=b), "response": str(a + b)}
            task = "add"
        else:
            word = _word(rng)
            row = {"instruction": PARAPHRASES["upper"].format(word=word), "response": word.upper()}
            task = "upper"
        rows.append({**row, "context": "", "task": task, "id": f"{split}-base-{i}"})
    return rows


def write_jsonl(rows: list[dict[str, str]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
