"""Build the embedded default: a tiny random Llama + char tokenizer + synthetic task data.

`python -m launch.make_demo --output demo_assets` writes, with nothing downloaded:
  model/       a ~0.9M-parameter Llama in HF format (random init), with its tokenizer
  train.jsonl  synthetic instruction rows (2-digit addition, uppercasing)
  eval.jsonl   held-out rows of the same tasks
  qlora_base_train.jsonl, qlora_base_eval.jsonl
               the same two skills asked in other words ("what is 12 plus 34", "cat in
               capitals"): what `make demo-qlora` first trains the model on in full, to make
               the base its QLoRA run adapts (configs/demo_qlora_base.yaml)
  classify/    the sequence-classification demo (`make demo-classify`): model/, a ~0.46M-parameter
               BERT classifier (random init) with a WordPiece tokenizer of the synthetic
               vocabulary, and train.jsonl / eval.jsonl of synthetic reviews labelled
               negative / neutral / positive (data/synthetic_classify.py)
The model is saved with `save_pretrained` and training loads it back through `from_pretrained`,
the same path a user's real checkpoint takes.
"""

from __future__ import annotations

import argparse
import string
import tempfile
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
)

from data import synthetic_classify
from data.synthetic import generate, generate_paraphrased, write_jsonl
from data.tokenizer import build_char_tokenizer


def tiny_llama_config(
    tokenizer,
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    tie_word_embeddings: bool = False,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_model_dir(
    out: Path,
    seed: int = 0,
    *,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    **size: int,
) -> Path:
    """Save a randomly initialized tiny Llama and the char tokenizer under `out`, its weights
    in `dtype`; with `tie_word_embeddings`, lm_head is the input embedding (Llama-3.2-1B's
    layout)."""
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, tie_word_embeddings=tie_word_embeddings, **size)
    model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_POSITIONS = 128  # the tiny BERT's longest input, in tokens


def build_wordpiece_tokenizer(words: list[str]) -> BertTokenizerFast:
    """A lowercasing BERT WordPiece tokenizer whose vocabulary is `words` whole, plus the
    special tokens, punctuation, and single letters and digits as word starts and `##` pieces:
    a word outside the vocabulary is spelled in pieces instead of becoming [UNK]."""
    chars = string.ascii_lowercase + string.digits
    vocab = [
        *BERT_SPECIAL_TOKENS,
        *string.punctuation,
        *words,
        *(c for c in chars if c not in words),
        *(f"##{c}" for c in chars),
    ]
    vocab = list(dict.fromkeys(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("".join(f"{token}\n" for token in vocab))
        return BertTokenizerFast(
            vocab=str(vocab_file), do_lower_case=True, model_max_length=MAX_POSITIONS
        )


def tiny_bert_config(
    tokenizer,
    labels: tuple[str, ...],
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        # No dropout: 20,000 synthetic reviews seen ~5 times leave little to overfit, and with
        # BERT's 0.1 this model, trained from scratch, learned negation later (91% vs 93% eval
        # accuracy after 2,500 steps, plain-PyTorch check).
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def build_tiny_classifier_dir(out: Path, seed: int = 0, **size: int) -> Path:
    """Save a randomly initialized tiny BertForSequenceClassification for the labels of
    data/synthetic_classify.py, with a WordPiece tokenizer of its vocabulary, under `out`."""
    tokenizer = build_wordpiece_tokenizer(synthetic_classify.vocabulary())
    torch.manual_seed(seed)
    config = tiny_bert_config(tokenizer, synthetic_classify.LABELS, **size)
    model = BertForSequenceClassification(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_classify_demo(
    out: Path, seed: int = 0, num_train: int = 20000, num_eval: int = 500
) -> None:
    """The classification demo's assets under `out`: model/, train.jsonl, eval.jsonl."""
    build_tiny_classifier_dir(out / "model", seed=seed)
    reviews = synthetic_classify.generate_classification
    write_jsonl(reviews(num_train, seed, "train"), out / "train.jsonl")
    write_jsonl(reviews(num_eval, seed, "eval"), out / "eval.jsonl")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="demo_assets", help="directory to write into")
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-eval", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.output)
    build_tiny_model_dir(out / "model", seed=args.seed)
    write_jsonl(generate(args.num_train, args.seed, "train"), out / "train.jsonl")
    write_jsonl(generate(args.num_eval, args.seed, "eval"), out / "eval.jsonl")
    # The base of the QLoRA demo: its 1000 steps of 64 rows see no row twice.
    write_jsonl(generate_paraphrased(80000, args.seed, "train"), out / "qlora_base_train.jsonl")
    write_jsonl(
        generate_paraphrased(args.num_eval, args.seed, "eval"), out / "qlora_base_eval.jsonl"
    )
    write_classify_demo(out / "classify", seed=args.seed)
    print(
        f"wrote {out}/model, {out}/train.jsonl ({args.num_train} rows), {out}/eval.jsonl, "
        f"{out}/qlora_base_train.jsonl, {out}/qlora_base_eval.jsonl, "
        f"{out}/classify/{{model,train.jsonl,eval.jsonl}}"
    )


if __name__ == "__main__":
    main()
