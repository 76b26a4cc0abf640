"""Small builders that turn a validated config into the parts the loop runs."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from trainer.config import Derived, RunConfig
from trainer.dist import DistContext
from trainer.engine import DDPEngine, Engine
from trainer.model import build_model
from trainer.optim import build_optimizer, build_scheduler


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch (CPU and CUDA). Every rank uses the same seed so
    that models initialized in-process start identical; data order is seeded separately."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(cfg: RunConfig, derived: Derived, ctx: DistContext) -> Engine:
    """Model -> optimizer -> schedule -> the backend's engine (train.backend)."""
    assert derived.total_steps is not None and derived.warmup_steps is not None
    if cfg.train.backend == "deepspeed":
        # Imported here so DDP runs never import DeepSpeed (slow, and it probes accelerators).
        from trainer.deepspeed_engine import build_deepspeed_engine

        return build_deepspeed_engine(cfg, derived, ctx)
    model = build_model(cfg.model, ctx.device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, derived.total_steps, derived.warmup_steps)
    return DDPEngine(model, optimizer, scheduler, ctx, precision=cfg.train.precision)


def save_hf_model(engine: Engine, tokenizer: Any, out_dir: str, ctx: DistContext) -> None:
    """Rank 0 writes safetensors + config + tokenizer that `from_pretrained` loads. Collective:
    under ZeRO-3 the full weights are gathered from every rank first."""
    state = engine.full_state_dict_for_export()
    if ctx.is_main:
        engine.unwrapped_model().save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
