"""A tiny BERT classifier directory and labelled JSONL rows for the classification tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = {
    "pos": ["good", "great", "fine", "happy", "nice"],
    "neg": ["bad", "awful", "sad", "poor", "ugly"],
    "neu": ["table", "chair", "window", "street", "paper"],
}
FILLER = ["the", "a", "it", "was", "very", "and", "so", "this", "that", "is"]


def write_tiny_bert(directory: Path, num_labels: int = 3, seed: int = 0) -> Path:
    """A BERT-architecture model (random init, a head of `num_labels`) + WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER]
    vocab += [w for ws in WORDS.values() for w in ws] + ["not"]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
        # No dropout: rank/accumulation equivalence compares runs whose dropout masks differ.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def labelled_rows(n: int, seed: int, *, labels=("pos", "neg", "neu")) -> list[dict]:
    """Rows whose label is the family of their (one or few) keywords, among filler words of
    very different lengths (3 to 60 words: padding matters)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(labels)
        words = [rng.choice(FILLER) for _ in range(rng.choice([2, 5, 20, 59]))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS[label]))
        rows.append({"id": i, "text": " ".join(words), "label": label})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
