"""The data side's one entry point for the training loop: config -> `StepBatches` / eval samples.

`data.train_path` is streamed from shards (data.streaming) when `data.source` is `shards`, or
`auto` and the path/URL holds a `manifest.json` (written by `python -m data.prepare`); otherwise
it is a JSONL file read map-style (data.loader).
"""

from __future__ import annotations

import os
from typing import Any

from data.config import DataConfig
from data.loader import (
    DataError,
    InstructionDataset,
    StepBatches,
    build_map_style,
    jsonl_records,
)
from data.shards import MANIFEST_NAME, ShardSet, ShardUnreadable, find_manifest
from data.streaming import build_streaming
from data.templates import label_value


def uses_shards(cfg: DataConfig, path: str, key: str = "data.train_path") -> bool:
    """Whether `path` is read as a shard directory under `cfg.source`."""
    if cfg.source == "shards":
        return True
    if cfg.source == "auto" and find_manifest(path, cfg.storage_options):
        return True
    if os.path.isdir(path):
        raise DataError(
            f"{key}: {path} is a directory without {MANIFEST_NAME}; write shards with "
            "`python -m data.prepare` (or index existing ones with --index-only)"
        )
    return False


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
    build = build_streaming if uses_shards(cfg, cfg.train_path) else build_map_style
    return build(
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
    """The (small, fully read) evaluation set, or None when `data.eval_path` is unset. A shard
    directory is read whole, in manifest order. Bad rows follow `data.bad_rows` as in training;
    an eval set with no usable row is a DataError naming `data.eval_path`."""
    if not cfg.eval_path:
        return None
    key = "data.eval_path"
    if not uses_shards(cfg, cfg.eval_path, key):
        return InstructionDataset(cfg.eval_path, tokenizer, cfg, key=key)
    try:
        shards = ShardSet(cfg.eval_path, cfg.storage_options)
        records = (
            (f"{shards.display_path(shard)}:{row + 1}", data)
            for shard, row, data in shards.iter_rows()
        )
        return InstructionDataset(cfg.eval_path, tokenizer, cfg, records, key=key)
    except ShardUnreadable as e:
        raise DataError(f"{key}: {e}") from None


def discover_labels(cfg: DataConfig, log_to: Any = None) -> list[str]:
    """data.labels when unset (format: classification): every label value of the training data,
    as names sorted, or for integer labels the ids 0..max as names "0".."max". One pass over the
    data (set data.labels to skip it). Rows that cannot be decoded or have no usable label are
    left to the training reader, which counts them."""
    import json

    path, key = cfg.train_path, cfg.label_field
    if uses_shards(cfg, path):
        try:
            rows = (data for _, _, data in ShardSet(path, cfg.storage_options).iter_rows())
        except ShardUnreadable as e:
            raise DataError(f"data.train_path: {e}") from None
    else:
        rows = (data for _, data in jsonl_records(path, "data.train_path"))
    names: set[str] = set()
    ids: set[int] = set()
    seen = 0
    for data in rows:
        seen += 1
        try:
            value = label_value(json.loads(data).get(key))
        except (ValueError, AttributeError):
            continue
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, str) and value.strip():
            names.add(value)
    if names and ids:
        raise DataError(
            f"data.labels: {path} mixes label names (strings, or booleans read as "
            f"'true'/'false') and integer ids in '{key}' "
            f"(e.g. {sorted(names)[0]!r} and {min(ids)}); set data.labels to the names in id order"
        )
    if ids:
        if min(ids) < 0:
            raise DataError(f"data.labels: {path} has the negative label {min(ids)} in '{key}'")
        labels = [str(i) for i in range(max(ids) + 1)]
    else:
        labels = sorted(names)
    if len(labels) < 2:
        raise DataError(
            f"data.labels: {seen} rows of {path} give {len(labels)} distinct value(s) of "
            f"data.label_field={key!r}; a classifier needs at least 2 (or set data.labels)"
        )
    if log_to is not None:
        shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
        log_to.info("data.labels: %d labels discovered in %s: %s", len(labels), path, shown)
    return labels
