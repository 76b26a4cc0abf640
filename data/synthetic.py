"""A deterministic synthetic instruction dataset: small arithmetic and string tasks.

Tasks: `add` (2-digit addition), `upper` (uppercase a word), `reverse` (reverse a word; not in
the default mix).

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


def make_row(rng: random.Random, task: str, split: str = "train") -> dict[str, str]:
    if task == "add":
        while True:
            a, b = rng.randrange(100), rng.randrange(100)
            if _held_out(a, b) == (split == "eval"):
                break
        return {"instruction": f"{a}+{b}=", "context": "", "response": str(a + b), "task": task}
    if task == "upper":
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
        return {
            "instruction": f"upper {word}",
            "context": "",
            "response": word.upper(),
            "task": task,
        }
    if task == "reverse":  # harder: a 0.9M model needs far longer than the demo's budget
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
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


def write_jsonl(rows: list[dict[str, str]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
