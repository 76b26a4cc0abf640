"""Map-style data for the training loop: a JSONL file, `DistributedSampler`, padded micro-batches.

The loop consumes a `StepBatches`: an iterator that yields, for each optimizer step, this rank's
list of `grad_accum_steps` micro-batches, and whose `state_dict()` is enough to continue exactly
where it stopped. A micro-batch is a dict of equally shaped [B, T] tensors:

- `input_ids` (long), `labels` (long, -100 where no loss, unshifted as in HF),
- `attention_mask` (long, 1 = real token) and/or `position_ids` (long; packing restarts them),
- `sample_index` (long [B], the dataset row of each sample; not passed to the model). Packed
  micro-batches (data.streaming with `data.packing`) have several samples per row: [B, K], -1
  where a row has fewer than K samples. Packed micro-batches also carry `num_tokens` (a scalar:
  real, non-pad tokens), since they have no attention_mask to count them from.

`metrics()` returns counters (dict of numbers) the loop logs; summed over ranks they are totals.
Streaming from shards (data.streaming) yields the same structure.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data.config import DataConfig
from data.templates import IGNORE_INDEX, RowError, TokenizedSample, encode_row

Batch = dict[str, torch.Tensor]
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


class StepBatches(Protocol):
    """What the training loop consumes; see the module docstring."""

    num_samples: int | None  # dataset size when known (map-style), None when streaming
    steps_per_epoch: int  # optimizer steps in one epoch, the same on every rank

    def __iter__(self) -> Iterator[list[Batch]]: ...
    def metrics(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; a bad line is an error naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


def tokenize_row(row: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> TokenizedSample:
    """Render one row in `cfg.format`; raise RowError (a ValueError) for an unusable row."""
    return encode_row(row, tokenizer, cfg)


class InstructionDataset(Dataset):
    """A JSONL file of instruction rows, tokenized once up front (small data; see data.streaming
    for data larger than memory)."""

    def __init__(
        self,
        path: str | Path,
        tokenizer: Any,
        cfg: DataConfig,
        rows: list[dict[str, Any]] | None = None,
    ):
        # `rows` given: already read elsewhere (e.g. from shards); `path` only names them.
        self.path = str(path)
        self.rows = read_jsonl(path) if rows is None else rows
        self.samples: list[TokenizedSample] = []
        self.num_truncated = 0
        for lineno, row in enumerate(self.rows, 1):
            try:
                sample = tokenize_row(row, tokenizer, cfg)
            except RowError as e:
                raise DataError(f"{path}: row {lineno}: {e}") from None
            if len(sample) > cfg.seq_len:
                self.num_truncated += 1
                sample = TokenizedSample(
                    sample.input_ids[: cfg.seq_len], sample.labels[: cfg.seq_len]
                )
            self.samples.append(sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, TokenizedSample]:
        return index, self.samples[index]


def collate_right_pad(items: list[tuple[int, TokenizedSample]], pad_id: int) -> Batch:
    """Pad to the longest sample in the micro-batch (right padding keeps causal outputs exact)."""
    width = max(len(s) for _, s in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (_, s) in enumerate(items):
        input_ids[i, : len(s)] = torch.tensor(s.input_ids)
        labels[i, : len(s)] = torch.tensor(s.labels)
        attention_mask[i, : len(s)] = 1
    sample_index = torch.tensor([idx for idx, _ in items], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "sample_index": sample_index,
    }


class _Collate:
    # A class, not a lambda, so DataLoader workers can pickle it.
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[int, TokenizedSample]]) -> Batch:
        return collate_right_pad(items, self.pad_id)


class _ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (for exact resume)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class MapStyleStepBatches:
    """`StepBatches` over a map-style dataset with `DistributedSampler` and `set_epoch`.

    Each epoch yields `steps_per_epoch = len(dataset) // global_batch` steps on every rank; the
    remainder of an epoch (fewer samples than a global batch) is not used, so every rank runs the
    same number of steps. Position = (epoch, steps done in the epoch).
    """

    def __init__(
        self,
        dataset: InstructionDataset,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        seed: int,
        pad_id: int,
        num_workers: int = 0,
    ):
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        global_batch = micro_batch_size * grad_accum_steps * world_size
        self.steps_per_epoch = len(dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{dataset.path}: {len(dataset)} samples are fewer than one global batch ({global_batch})"
            )
        # drop_last so no rank gets padded duplicates; the loop-level cut above evens out steps.
        self.sampler = _ResumableDistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.num_workers = num_workers
        self.collate = _Collate(pad_id)
        self.epoch = 0
        self.step_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "map", "epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def metrics(self) -> dict[str, float]:
        """Counters for the loop to log (summed over ranks they are dataset-wide)."""
        # The dataset is tokenized once; rank 0 reports it so a sum over ranks counts it once.
        if self.sampler.rank != 0:
            return {}
        return {"truncated": self.dataset.num_truncated, "rows_kept": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind", "map") != "map":
            raise DataError(
                "resume: the saved data state is from a shard stream (data.source changed?)"
            )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])

    def __iter__(self) -> Iterator[list[Batch]]:
        per_step = self.micro_batch_size * self.grad_accum_steps
        while True:
            self.sampler.set_epoch(self.epoch)
            self.sampler.start = self.step_in_epoch * per_step
            loader = DataLoader(
                self.dataset,
                batch_size=self.micro_batch_size,
                sampler=self.sampler,
                collate_fn=self.collate,
                num_workers=self.num_workers,
                drop_last=True,
            )
            micro: list[Batch] = []
            for batch in loader:
                micro.append(batch)
                if len(micro) == self.grad_accum_steps:
                    self.step_in_epoch += 1
                    yield micro
                    micro = []
                    if self.step_in_epoch >= self.steps_per_epoch:
                        break
            self.epoch += 1
            self.step_in_epoch = 0


def build_map_style(
    cfg: DataConfig,
    path: str,
    tokenizer: Any,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    seed: int,
) -> MapStyleStepBatches:
    dataset = InstructionDataset(path, tokenizer, cfg)
    return MapStyleStepBatches(
        dataset,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        seed=seed,
        pad_id=tokenizer.pad_token_id,
        num_workers=cfg.num_workers,
    )
