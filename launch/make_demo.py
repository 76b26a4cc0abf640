"""Build the embedded default: a tiny random Llama + char tokenizer + synthetic task data.

`python -m launch.make_demo --output demo_assets` writes, with nothing downloaded:
  model/       a ~0.9M-parameter Llama in HF format (random init), with its tokenizer
  train.jsonl  synthetic instruction rows (2-digit addition, uppercasing)
  eval.jsonl   held-out rows of the same tasks
  qlora_base_train.jsonl, qlora_base_eval.jsonl
               the same two skills asked in other words ("what is 12 plus 34", "cat in
               capitals"): what `make demo-qlora` first trains the model on in full, to make
               the base its QLoRA run adapts (configs/demo_qlora_base.yaml)
The model is saved with `save_pretrained` and training loads it back through `from_pretrained`,
the same path a user's real checkpoint takes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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
    print(
        f"wrote {out}/model, {out}/train.jsonl ({args.num_train} rows), {out}/eval.jsonl, "
        f"{out}/qlora_base_train.jsonl, {out}/qlora_base_eval.jsonl"
    )


if __name__ == "__main__":
    main()
