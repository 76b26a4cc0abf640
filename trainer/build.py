"""Small builders that turn a validated config into the parts the loop runs."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import Derived, RunConfig
from trainer.dist import DistContext
from trainer.engine.backends import backend_for
from trainer.engine.base import Engine
from trainer.model.load import DTYPES


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch (CPU and CUDA). Every rank uses the same seed so
    that models initialized in-process start identical; data order is seeded separately."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(cfg: RunConfig, derived: Derived, ctx: DistContext) -> Engine:
    """Model -> optimizer -> schedule -> the backend's engine (train.backend)."""
    assert derived.total_steps is not None and derived.warmup_steps is not None
    return backend_for(cfg.train.backend).build(cfg, derived, ctx)


def output_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype the final HF model is written in (`output.dtype`). "auto": the base model's, as
    its config.json records it: a bf16 base trained in fp32 (`model.dtype`) is handed back in
    bf16, at the size it came. The loaded model's own config cannot tell: from_pretrained
    overwrites its dtype with the one it loaded in."""
    if cfg.output.dtype != "auto":
        return DTYPES[cfg.output.dtype]
    from transformers import PretrainedConfig

    # The model was loaded from there: a local directory, or a Hub id already in the cache.
    raw, _ = PretrainedConfig.get_config_dict(cfg.model.name_or_path, local_files_only=True)
    name = raw.get("dtype") or raw.get("torch_dtype")  # `torch_dtype`: before transformers 4.56
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def write_hf_model(
    model: Any,
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    out_dir: Path,
    dtype: torch.dtype,
    stop_ids: tuple[int, ...] = (),
) -> None:
    """Write `state` (the full model state dict) with `model`'s config and generation config,
    and the tokenizer, as a model `from_pretrained` loads: safetensors in `dtype`, and
    config.json saying so. `stop_ids` join the generation config's `eos_token_id` (the chat
    template's end-of-turn token of a chat run: without it `generate()` runs past each turn)."""
    cast: dict[tuple, torch.Tensor] = {}
    weights = {}
    for name, tensor in state.items():
        # Tied weights (lm_head = embed_tokens) are one tensor under two names: keep them one,
        # so that save_pretrained still sees the tie and writes the weight once.
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tensor.shape,
            tensor.stride(),
        )
        if key not in cast:
            cast[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        weights[name] = cast[key]
    model.save_pretrained(out_dir, state_dict=weights, safe_serialization=True)
    # save_pretrained records the dtype the live model trained in; from_pretrained (dtype
    # "auto") would load the weights in that one. Rewrite it, leaving the live config alone.
    config = copy.deepcopy(model.config)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if stop_ids and generation is not None:
        generation = copy.deepcopy(generation)
        eos = generation.eos_token_id
        known = [eos] if isinstance(eos, int) else list(eos or [])
        generation.eos_token_id = [*known, *(i for i in stop_ids if i not in known)]
        generation.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def write_adapter(
    model: Any,
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    out_dir: Path,
    merged_dir: Path | None = None,
    cfg: RunConfig | None = None,
) -> None:
    """A LoRA/QLoRA run's model: the peft adapter (adapter_config.json and the adapter weights,
    which `PeftModel.from_pretrained(base, out_dir)` loads onto the base model) and the
    tokenizer. `state` is the full (gathered) state dict; peft keeps the adapter's entries.

    With `merged_dir` (and the run's `cfg`), also a full HF model there, the adapter merged into
    the base (trainer.model.methods.merged_model, from the adapter files just written), as
    write_hf_model writes one."""
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if merged_dir is None:
        return
    assert cfg is not None, "merging needs the run's config (the base model, the quantization)"
    from trainer.model.methods import merged_model

    merged = merged_model(cfg, out_dir)
    write_hf_model(
        merged,
        merged.state_dict(),
        tokenizer,
        merged_dir,
        output_dtype(cfg),
        chat_stop_ids(cfg, tokenizer),
    )


def chat_stop_ids(cfg: RunConfig, tokenizer: Any) -> tuple[int, ...]:
    """The end-of-turn token of a chat run's template (see write_hf_model), else nothing."""
    from data.chat import end_of_turn_id

    if cfg.data.format != "chat":
        return ()
    token_id = end_of_turn_id(tokenizer)
    return () if token_id is None else (token_id,)


def save_hf_model(
    engine: Engine, tokenizer: Any, out_dir: str, ctx: DistContext, cfg: RunConfig
) -> None:
    """Rank 0 writes safetensors (in `output.dtype`) + config + generation config + tokenizer
    that `from_pretrained` loads; a LoRA/QLoRA run writes its adapter instead (write_adapter),
    and with `output.merge_adapter` also a merged full model beside it, in `out_dir`-merged
    (RUN_DIR/model-merged). Collective: under ZeRO-3 the full weights are gathered from every
    rank first."""
    state = engine.full_state_dict_for_export()
    if ctx.is_main and cfg.method != "full":
        assert state is not None
        out = Path(out_dir)
        merged = out.with_name(f"{out.name}-merged") if cfg.output.merge_adapter else None
        write_adapter(engine.unwrapped_model(), state, tokenizer, out, merged, cfg)
    elif ctx.is_main:
        assert state is not None
        write_hf_model(
            engine.unwrapped_model(),
            state,
            tokenizer,
            Path(out_dir),
            output_dtype(cfg),
            chat_stop_ids(cfg, tokenizer),
        )
