"""The model's attention inputs for a training micro-batch, built without a host-device sync.

transformers builds the attention mask inside the forward, and for sdpa it asks the device two
questions with a Python `if`: "is the padding mask all ones?" (to skip the mask and use the
causal kernel) and, for packed rows, "do the position_ids restart anywhere?" (to skip the
block-diagonal mask). Each answer is a blocking device-to-host copy, once per micro-batch: seen
on an H200 under `torch.cuda.set_sync_debug_mode("error")` (masking_utils.py, transformers 5.23).

For the decoders whose attention is plain causal (no sliding window, no bidirectional parts)
under sdpa, the engines answer both questions from what the collator already knows:

- padded rows (right-padded, data.packing.pad_right) get the causal mask with the pads' keys
  masked: the very boolean tensor transformers builds for a micro-batch with padding, built on
  the device. A micro-batch without padding would have taken sdpa's causal kernel instead;
  the real tokens' outputs are the same (bitwise on CPU: tests/test_attention_inputs.py). A
  single row has no padding and is left to transformers (the causal kernel, its one sync: a
  (1, 1, T, T) mask at a long seq_len would cost more than the sync);
- packed rows get the block-diagonal causal mask that transformers would derive from the
  position restarts, the same boolean tensor, built on the device.

transformers passes a prepared 4D mask through as it is (masking_utils, create_causal_mask).
Any other model (a sliding window, eager or flash attention, an encoder, an unknown
architecture) keeps transformers' own mask construction: correct, with its syncs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from data.loader import MODEL_INPUT_KEYS

# Architectures whose transformers implementation takes a prepared 4D mask as it is
# (create_causal_mask) and whose attention is causal over every layer unless the config turns on
# a sliding window (checked separately). Others keep transformers' mask construction.
PLAIN_CAUSAL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "olmo",
        "olmo2",
        "granite",
        "phi3",
    }
)


def _base(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)  # DDP
    get_base = getattr(inner, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else inner


def plain_causal(model: nn.Module) -> bool:
    """True when the engines may build this model's attention inputs themselves (see the module
    docstring): a causal LM of a known plain-causal architecture, under sdpa, with no sliding
    window on any layer."""
    base = _base(model)
    config = getattr(base, "config", None)
    if config is None or not type(base).__name__.endswith("ForCausalLM"):
        return False
    if getattr(config, "model_type", None) not in PLAIN_CAUSAL_TYPES:
        return False
    if not type(base).__module__.startswith("transformers.models."):
        # Remote code (trust_remote_code) under a known model_type: its attention may read the
        # mask another way (additive floats, 1 - mask); transformers' path is the safe one.
        return False
    if getattr(config, "output_router_logits", False):
        # An MoE model returning its router logits hands attention_mask to its load-balancing
        # loss, which wants the 2D [B, T] mask.
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    ):
        return False
    layer_types = getattr(config, "layer_types", None)
    return not layer_types or all(t == "full_attention" for t in layer_types)


def describe_attention_inputs(build_mask: bool) -> str:
    """The start line that says who builds the attention mask."""
    if build_mask:
        return (
            "attention mask: built by the trainer on the device (a plain causal decoder under "
            "sdpa): causal with the pads masked, or block-diagonal for packed rows; no host sync "
            "in the forward"
        )
    return "attention mask: built by transformers inside the forward (it reads the mask back: one host sync per forward)"


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The (rows, 1, T, T) boolean mask (True = attend) of right-padded rows: causal, and no
    query attends to a pad. A pad's own query still sees the real tokens before it (no fully
    masked row, which would give NaN attention weights)."""
    width = attention_mask.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()
    return (causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)).unsqueeze(1)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The (rows, 1, T, T) boolean mask (True = attend) of packed rows: causal within each run of
    positions counting up by one, nothing across runs. A new run starts wherever a position is
    not its predecessor + 1, as transformers' find_packed_sequence_indices reads it."""
    first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1
    sample = starts.cumsum(-1)  # (rows, T): which sample each position belongs to
    same = sample.unsqueeze(-1) == sample.unsqueeze(-2)
    width = position_ids.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal).unsqueeze(1)


def model_inputs(
    batch: dict[str, Any], device: torch.device, build_mask: bool
) -> dict[str, torch.Tensor]:
    """The micro-batch's model inputs on `device` (non-blocking copies from pinned memory).
    `build_mask`: plain_causal(model), decided once per run: then the rows carry their 4D mask
    (causal with padding, or block-diagonal when packed), so the forward does not sync (see the
    module docstring)."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUT_KEYS if k in batch}
    if not build_mask:
        return inputs
    if "position_ids" in inputs:
        inputs["attention_mask"] = packed_causal_mask(inputs["position_ids"])
    elif "attention_mask" in inputs and inputs["attention_mask"].shape[0] > 1:
        inputs["attention_mask"] = padded_causal_mask(inputs["attention_mask"])
    return inputs
