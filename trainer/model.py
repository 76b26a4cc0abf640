"""Build the model and tokenizer from `model:`. The model knows nothing of distribution."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from trainer.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """A parameter's real shape, also under ZeRO-3 (which leaves an empty placeholder in the
    module and keeps the shape as `ds_shape`)."""
    return tuple(getattr(p, "ds_shape", p.shape))


class ModelLoadError(RuntimeError):
    """The model or tokenizer at `model.name_or_path` could not be loaded."""


def build_tokenizer(cfg: ModelConfig) -> Any:
    source = cfg.tokenizer or cfg.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        raise ModelLoadError(f"{key}={source!r}: cannot load a tokenizer ({e})") from None
    if tok.pad_token_id is None:
        # Many causal LMs ship without a pad token; padding positions carry no loss anyway.
        tok.pad_token = tok.eos_token
    return tok


def build_model(
    cfg: ModelConfig, device: torch.device, *, deepspeed_config: dict[str, Any] | None = None
) -> PreTrainedModel:
    """Load any HF causal LM onto `device` (weights in `model.dtype`).

    With a ZeRO-3 `deepspeed_config` (resolved, no "auto" left) the model is built already
    partitioned over the process group (transformers runs `deepspeed.zero.Init` and loads each
    rank's shards), so no rank ever holds the full model."""
    zero3 = None
    if deepspeed_config and deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        # transformers only keeps a weak reference to it: it must outlive from_pretrained, and
        # the model's lifetime too (generate() and save paths ask is_deepspeed_zero3_enabled()).
        zero3 = HfDeepSpeedConfig(deepspeed_config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            dtype=DTYPES[cfg.dtype],
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(
            f"model.name_or_path={cfg.name_or_path!r}: cannot load ({e})"
        ) from None
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP's no_sync and with frozen inputs (LoRA).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if zero3 is not None:
        model.hf_deepspeed_config = zero3  # keeps the weak reference above alive
        return model  # partitioned parameters are placed by DeepSpeed, not .to()
    return model.to(device)
