"""The `data:` section of the run config."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from data.config_base import Section


class DataConfig(Section):
    train_path: str = Field(
        ...,
        description="Training data: a JSONL file of rows, or a shard directory/URL written by "
        "`python -m data.prepare` (one holding manifest.json; any fsspec URL).",
    )
    eval_path: str | None = Field(
        None, description="Evaluation data (JSONL file or shard directory); read fully; optional."
    )
    source: Literal["auto", "jsonl", "shards"] = Field(
        "auto",
        description="How train_path is read: `jsonl` map-style (whole file in memory), `shards` "
        "streamed, `auto` = shards when train_path holds a manifest.json.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options for shard URLs (e.g. s3 creds)."
    )
    format: Literal["instruction", "text", "chat", "classification"] = Field(
        "instruction",
        description="How rows are rendered: instruction, text or chat (causal LM); "
        "classification (task=sequence_classification): text_field (+ text_pair_field) and "
        "label_field.",
    )
    template: Literal["alpaca", "compact"] = Field(
        "alpaca", description="Prompt template for the instruction format."
    )
    instruction_field: str = Field("instruction", description="Row key of the instruction.")
    context_field: str = Field("context", description="Row key of the optional context/input.")
    response_field: str = Field("response", description="Row key of the response.")
    text_field: str = Field("text", description="Row key of the text (format: text).")
    messages_field: str = Field(
        "messages", description="Row key of the message list (format: chat)."
    )
    text_pair_field: str | None = Field(
        None,
        description="format: classification: row key of an optional second text (sentence "
        "pairs: NLI, question/passage), encoded as the tokenizer's pair.",
    )
    label_field: str = Field("label", description="Row key of the label (format: classification).")
    labels: list[str] | None = Field(
        None,
        description="format: classification: the label names, in id order. A string label in a "
        "row is a name of this list, an integer label its id. Unset: discovered from the "
        "training data (sorted names, or 0..max for integer labels) and saved with the run and "
        "the exported model (id2label). A label outside the list is a bad row.",
    )
    role_key: str = Field("role", description="Message key of the role (format: chat).")
    content_key: str = Field("content", description="Message key of the content (format: chat).")
    role_map: dict[str, str] = Field(
        default_factory=lambda: {"human": "user", "gpt": "assistant"},
        description="format: chat: roles renamed before rendering (ShareGPT's `human` and "
        "`gpt` by default). Roles not listed pass unchanged; after renaming every role must be "
        "system, user, assistant, tool or a value of this map.",
    )
    chat_template: str | None = Field(
        None,
        description="format: chat: the template conversations are rendered with, instead of the "
        "tokenizer's: a Jinja file, or a built-in (`fallback`, `chatml`, `llama3`). Unset: the "
        "tokenizer's own, else `fallback`. The one used is saved with the model.",
    )
    loss_on_prompt: bool = Field(
        False, description="Also take the loss on prompt / non-assistant tokens."
    )
    seq_len: int = Field(512, ge=8, description="Maximum tokens per sample (and per packed row).")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Samples longer than seq_len: cut to seq_len (counted as truncated), or skip "
        "(counted as skipped_too_long; not bad data).",
    )
    packing: bool = Field(
        False,
        description="Pack several samples into each row of at most seq_len tokens (position_ids "
        "restart per sample; attention stays inside each sample). See pack_scope.",
    )
    pack_scope: Literal["stream", "micro_batch"] = Field(
        "stream",
        description="With packing: `stream` packs consecutive windows of pack_window samples "
        "(best fit, decreasing) into seq_len rows, and micro_batch_size then counts rows: a "
        "token budget of micro_batch_size x seq_len per micro-batch, global batches in rows; "
        "`micro_batch` packs only the micro_batch_size samples of each micro-batch (global "
        "batches stay in samples).",
    )
    pack_window: int = Field(
        1024,
        ge=1,
        description="pack_scope=stream: samples packed together. Larger packs tighter; every rank "
        "tokenizes every sample of a shard stream (to agree on the rows without talking), and a "
        "resume re-reads up to one window.",
    )
    shuffle_window: int = Field(
        4096,
        ge=1,
        description="Shards only: rows per shuffle window; rows are shuffled within consecutive "
        "windows of the (shuffled) shard sequence. Memory and resume cost grow with it.",
    )
    epoch_tail: Literal["pad", "drop"] = Field(
        "pad",
        description="Shards only: the last, partial global batch of an epoch is used with empty "
        "slots (`pad`, counted as tail_empty_slots) or not used (`drop`, tail_dropped_rows).",
    )
    bad_rows: Literal["lenient", "strict"] = Field(
        "lenient",
        description="Rows that cannot be used (invalid UTF-8/JSON/Unicode, missing or mistyped "
        "fields, ...), in training and eval data: skip, count by kind and log (lenient), or stop "
        "at the first one with an error naming file and line (strict).",
    )
    max_bad_fraction: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Lenient mode: stop with an error once more than this share of the rows "
        "read by a data worker (shards) or of a JSONL file were bad; a worker whose every row so "
        "far was bad stops after a few rows.",
    )
    num_workers: int | Literal["auto"] = Field(
        "auto",
        description="DataLoader worker processes per rank (they read, tokenize and pack ahead of "
        "the step). auto = 2 when training on a GPU; 0 on CPU, where the ranks' compute needs "
        "the cores.",
    )

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError("a classifier needs at least 2 labels")
        blank = [name for name in v if not name.strip()]
        if blank:
            raise ValueError("label names must not be blank")
        repeated = sorted({name for name in v if v.count(name) > 1})
        if repeated:
            raise ValueError(f"each label must be named once; repeated: {', '.join(repeated)}")
        return v

    @field_validator("num_workers")
    @classmethod
    def _workers_not_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0 or auto")
        return v

    def workers(self) -> int:
        """`num_workers` as a number (auto resolved for this machine)."""
        if self.num_workers == "auto":
            return AUTO_GPU_WORKERS if torch.cuda.is_available() else 0
        return self.num_workers


# Two workers keep a GPU fed with chat rows at ~4.6 ms each (templating + tokenizing) for the
# batch sizes that fit one GPU, with a window or micro-batch prefetched each.
AUTO_GPU_WORKERS = 2
