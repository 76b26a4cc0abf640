"""The data side's one entry point for the training loop: config -> `StepBatches` / eval samples."""

from __future__ import annotations

from typing import Any

from data.config import DataConfig
from data.loader import InstructionDataset, StepBatches, build_map_style


def build_train_batches(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    seed: int,
) -> StepBatches:
    """The training stream for this rank."""
    return build_map_style(
        cfg,
        cfg.train_path,
        tokenizer,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        seed=seed,
    )


def build_eval_dataset(cfg: DataConfig, tokenizer: Any) -> InstructionDataset | None:
    """The (small, fully read) evaluation set, or None when `data.eval_path` is unset."""
    if not cfg.eval_path:
        return None
    return InstructionDataset(cfg.eval_path, tokenizer, cfg)
