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

from typing import Any, Literal

import torch
from torch import nn

from data.loader import MODEL_INPUT_KEYS
from trainer.model import varlen
from trainer.model.varlen import NAME as VARLEN
from trainer.model.varlen import cu_seqlens, stand_in_mask

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

# How the engines give a model its attention inputs (attention_mode): "transformers" builds the
# mask inside the forward; "mask" is the trainer-built 4D mask; "varlen" gives packed rows their
# samples' boundaries (trainer/model/varlen.py) and padded rows the 4D mask.
AttentionMode = Literal["transformers", "mask", "varlen"]


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
    # fttrain_varlen is sdpa with varlen attention for packed rows (trainer/model/varlen.py).
    if getattr(config, "_attn_implementation", None) not in ("sdpa", VARLEN):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    ):
        return False
    layer_types = getattr(config, "layer_types", None)
    return not layer_types or all(t == "full_attention" for t in layer_types)


def attention_mode(model: nn.Module) -> AttentionMode:
    """How the engines give `model` its attention inputs (AttentionMode), decided once per run."""
    if not plain_causal(model):
        return "transformers"
    config = _base(model).config
    return "varlen" if config._attn_implementation == VARLEN else "mask"


def describe_attention_inputs(mode: AttentionMode) -> str:
    """The start line that says who builds the attention mask."""
    if mode == "varlen":
        return (
            "attention inputs: packed rows by variable-length attention (torch's varlen "
            "kernel, per sample, no mask); padded rows with a trainer-built mask; no host sync "
            "in the forward"
        )
    if mode == "mask":
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
    batch: dict[str, Any], device: torch.device, mode: AttentionMode
) -> dict[str, Any]:
    """The micro-batch's model inputs on `device` (non-blocking copies from pinned memory).
    `mode`: attention_mode(model). "mask": the rows carry their 4D mask (causal with padding, or
    block-diagonal when packed), so the forward does not sync (see the module docstring).
    "varlen": packed rows carry their samples' boundaries instead (trainer/model/varlen.py),
    padded rows their 4D mask. "transformers": the batch's own mask, as it is."""
    inputs: dict[str, Any] = {
        k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUT_KEYS if k in batch
    }
    if mode not in ("mask", "varlen"):
        if mode != "transformers":
            raise ValueError(f"attention mode {mode!r}: not one of transformers, mask, varlen")
        return inputs
    if mode == "varlen" and "position_ids" in inputs:
        bounds = cu_seqlens(batch["position_ids"])  # from the CPU positions: no sync
        if device.type == "cuda":
            bounds = bounds.pin_memory()
        bounds = bounds.to(device, non_blocking=True)
        width = int(batch["position_ids"].shape[-1])  # an upper bound of every sample's length
        # A prepared-looking 4D mask: transformers passes it through untouched (and builds
        # none); the varlen attention function does not read it.
        inputs["attention_mask"] = stand_in_mask(device)
        inputs.update(
            cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=width, max_length_k=width
        )
        return inputs
    if "position_ids" in inputs:
        inputs["attention_mask"] = packed_causal_mask(inputs["position_ids"])
    elif "attention_mask" in inputs and inputs["attention_mask"].shape[0] > 1:
        inputs["attention_mask"] = padded_causal_mask(inputs["attention_mask"])
    return inputs


def choose_packed_attention(
    model: nn.Module, setting: str | None, device: torch.device, compute_dtype: torch.dtype
) -> str:
    """Apply train.packed_attention to `model` (the module the engine wraps): with varlen the
    model's attention implementation becomes fttrain_varlen (sdpa for every call but packed
    training micro-batches). `setting` None: the run packs nothing (data.packing off), so the
    model is left alone. Returns the reason for the start log. `varlen` on a model or a device
    that cannot take it is a ConfigError naming the key; `auto` keeps the mask, saying why."""
    from trainer.config import ConfigError

    if setting is None:
        return "no packed rows (data.packing=false)"
    key = f"train.packed_attention={setting}"
    if setting == "mask":
        return f"{key}: packed rows get the block-diagonal mask"
    config = _base(model).config
    problem = ""
    if not plain_causal(model):
        problem = (
            "it needs a plain causal decoder under sdpa (Llama, Mistral, Qwen2/3, ... with no "
            "sliding window)"
        )
    elif getattr(config, "attention_dropout", 0.0):
        problem = f"it applies no attention dropout (the model's is {config.attention_dropout})"
    elif setting == "auto" or device.type == "cuda":
        # On CUDA an explicit varlen is checked as auto is: the kernel must run, or the run
        # would fail at its first packed step.
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        problem = varlen.varlen_problem(device, compute_dtype, heads, kv_heads, head_dim)
    if problem:
        if setting == "varlen":
            raise ConfigError([f"{key}: {problem}; use train.packed_attention=auto or mask"])
        return f"{key}: packed rows get the block-diagonal mask, as varlen attention {problem}"
    varlen.register()
    _base(model).set_attn_implementation(varlen.NAME)
    if device.type == "cuda" and compute_dtype in (torch.bfloat16, torch.float16):
        return f"{key}: packed rows take torch's varlen flash kernel"
    return f"{key}: packed rows take the per-sample reference of varlen attention (no kernel here)"
