"""The `data:` section of the run config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainer.config_base import Section


class DataConfig(Section):
    train_path: str = Field(..., description="Training data: a JSONL file of rows.")
    eval_path: str | None = Field(None, description="Evaluation data, same format; optional.")
    format: Literal["instruction"] = Field("instruction", description="How rows are rendered.")
    template: Literal["alpaca", "compact"] = Field(
        "alpaca", description="Prompt template for the instruction format."
    )
    instruction_field: str = Field("instruction", description="Row key of the instruction.")
    context_field: str = Field("context", description="Row key of the optional context/input.")
    response_field: str = Field("response", description="Row key of the response.")
    loss_on_prompt: bool = Field(False, description="Also take the loss on prompt tokens.")
    seq_len: int = Field(512, ge=8, description="Samples longer than this are truncated.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank.")
