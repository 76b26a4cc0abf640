"""The tiny randomly initialized models that unit tests build in-process (no files involved)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

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


# The shape of the one-layer decoders the attention tests build (Mistral, Qwen2, Mixtral).
TINY_DECODER = dict(
    vocab_size=60,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
)


def tiny_mixtral(*, seed: int = 0, **extra) -> MixtralForCausalLM:
    """A seeded fp32 Mixtral (one layer, 2 experts, top-1); extra MixtralConfig fields pass
    through (output_router_logits, router_aux_loss_coef, ...)."""
    torch.manual_seed(seed)
    fields = {**TINY_DECODER, "num_local_experts": 2, "num_experts_per_tok": 1}
    return MixtralForCausalLM(MixtralConfig(**{**fields, **extra})).float()
