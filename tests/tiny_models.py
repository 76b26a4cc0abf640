"""The tiny randomly initialized Llama that unit tests build in-process (no files involved)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.dist import DistContext

CPU1 = DistContext(0, 0, 1, torch.device("cpu"), None)  # a single CPU process, no group


def tiny_llama(
    *, vocab: int = 60, hidden: int = 32, heads: int = 4, layers: int = 2, seed: int = 0, **extra
) -> LlamaForCausalLM:
    """A seeded fp32 Llama with `hidden` width; extra LlamaConfig fields pass through."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        **{"num_key_value_heads": heads, **extra},
    )
    return LlamaForCausalLM(cfg).float()
