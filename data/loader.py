"""Map-style data for the training loop: a JSONL file tokenized in memory, one global order per
epoch, padded or packed micro-batches.

The loop consumes a `StepBatches`: an iterator that yields, for each optimizer step, this rank's
list of `grad_accum_steps` micro-batches, and whose `state_dict()` is enough to continue exactly
where it stopped. A micro-batch is a dict of equally shaped [B, T] tensors:

- `input_ids` (long), `targets` (long): what each position is scored on, -100 where nothing.
  For a causal LM the labels shifted once, per sample, by the collator (`TokenizedSample.targets`):
  `targets[b, t]` is the label of token t + 1 of the same sample; the loss never shifts again.
  For a classifier, each row's class id at one position.
- `attention_mask` (long, 1 = real token) and/or `position_ids` (long; packing restarts them),
- `sample_index` (long [B], the dataset row of each sample; not passed to the model). Packed
  micro-batches (`data.packing`) have several samples per row: [B, K], -1 where a row has fewer
  than K samples. Packed micro-batches also carry `num_tokens` (a scalar: real, non-pad tokens),
  since they have no attention_mask to count them from.

`metrics()` returns this rank's counters (dict of numbers) as it consumed its samples; summed over
ranks they are totals. Streaming from shards (data.streaming) yields the same structure and
counter names.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from data.budget import (
    Cursor,
    RowSteps,
    Window,
    check_unit,
    num_windows,
    pack_settings,
    pack_window,
)
from data.chat import ChatTemplateError, use_chat_template
from data.config import DataConfig
from data.packing import collate
from data.plan import Plan
from data.rows import BadRows, DataError, decode_row
from data.templates import IGNORE_INDEX, RowError, TokenizedSample, encode_row, truncated

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
# 1: (epoch, step_in_epoch); 2: samples consumed (position), data identity, global batch, counters
STATE_VERSION = 2


class StepBatches(Protocol):
    """What the training loop consumes; see the module docstring."""

    num_samples: int | None  # dataset size when known (map-style), None when streaming
    steps_per_epoch: int  # optimizer steps in one epoch, the same on every rank

    def __iter__(self) -> Iterator[list[Batch]]: ...
    def metrics(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def pad_token_id(tokenizer: Any) -> int:
    """The id padding uses: the pad token, else EOS (many causal LM tokenizers have no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def use_training_template(cfg: DataConfig, tokenizer: Any) -> None:
    """For `data.format: chat`, install the chat template the data is rendered with (see
    data.chat.use_chat_template) on `tokenizer`, so that the model saved with it reproduces the
    training format at inference. A `data.chat_template` that cannot be used is a DataError."""
    if cfg.format != "chat":
        return
    try:
        use_chat_template(tokenizer, cfg.chat_template)
    except ChatTemplateError as e:
        raise DataError(f"data.chat_template: {e}") from None


def jsonl_records(path: str, key: str) -> Iterator[tuple[str, bytes]]:
    """("path:line", raw bytes) of every non-blank line of a JSONL file. A file that cannot be
    opened is a DataError naming the config `key` it came from."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; opening is what may fail
    except FileNotFoundError:
        raise DataError(f"{key}: {path}: no such file") from None
    except OSError as e:
        raise DataError(f"{key}: {path}: cannot open ({e.strerror or type(e).__name__})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if line.strip():  # blank lines separate nothing and are not rows
                yield f"{path}:{lineno}", line.rstrip(b"\n")


class Slot(NamedTuple):
    """One row of an InstructionDataset: its sample, or the kind it was skipped as."""

    index: int
    sample: TokenizedSample | None
    skipped: str  # the skip kind when sample is None
    truncated: bool


class InstructionDataset(Dataset):
    """A JSONL file's rows (or raw rows given as `records`), validated and tokenized up front:
    small data (data.streaming is for data larger than memory).

    Every non-blank line is a row and keeps its slot (its index, the `sample_index`) whether or
    not it can be used, so an epoch's order does not depend on which rows are bad. Unusable rows
    follow `data.bad_rows` (see data.rows), overlong ones `data.overlong`. No row at all, no
    usable row, too many bad rows, or no target token left after truncation is a DataError
    naming `key`. `samples` holds the usable samples in file order (what evaluation uses);
    `counts` what reading the whole file found.
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer: Any,
        cfg: DataConfig,
        records: Iterable[tuple[str, bytes]] | None = None,
        *,
        key: str = "data.train_path",
        log_skips: bool = True,
    ):
        self.path, self.key = str(path), key
        self.samples: list[TokenizedSample] = []
        self._sample_of: list[int] = []  # slot -> index in samples, -1 where skipped
        self._skipped: dict[int, str] = {}  # slot -> kind
        self._truncated: set[int] = set()
        self.counts: Counter = Counter()
        bad = BadRows(cfg, log, f"rows of {self.path}", log_skips=log_skips)
        for where, data in jsonl_records(self.path, key) if records is None else records:
            slot = len(self._sample_of)
            self.counts["rows_read"] += 1
            bad.num_read += 1
            try:
                sample = encode_row(decode_row(data), tokenizer, cfg)
            except RowError as e:
                bad.skip(self.counts, e.kind, where, str(e), e.hint)
                self._skip(slot, e.kind)
                continue
            if len(sample) > cfg.seq_len:
                if cfg.overlong == "drop":
                    bad.skip(
                        self.counts,
                        "too_long",
                        where,
                        f"{len(sample)} tokens > data.seq_len",
                        f"rows are longer than data.seq_len={cfg.seq_len} (data.overlong=drop)",
                    )
                    self._skip(slot, "too_long")
                    continue
                sample = truncated(sample, cfg.seq_len)
            if sample.cut:
                self.counts["truncated"] += 1
                self._truncated.add(slot)
            self.counts["rows_kept"] += 1
            self._sample_of.append(len(self.samples))
            self.samples.append(sample)
        self._judge(bad, cfg, log_skips)

    def _skip(self, slot: int, kind: str) -> None:
        self._sample_of.append(-1)
        self._skipped[slot] = kind

    def _judge(self, bad: BadRows, cfg: DataConfig, log_skips: bool) -> None:
        # The whole file is known here: a data set that cannot train (or evaluate) anything stops
        # before any process group starts, with its cause, instead of "finishing" on nothing.
        num_rows = len(self._sample_of)
        if num_rows == 0:
            raise DataError(f"{self.key}: {self.path} has no rows")
        if not self.samples:
            raise DataError(
                f"{self.key}: none of the {num_rows} rows of {self.path} can be used: "
                f"{bad.summary()}"
            )
        bad.check(last=True)
        if self.counts["truncated"] and not any(s.num_target_tokens for s in self.samples):
            raise DataError(
                f"{self.key}: no sample of {self.path} keeps a token with loss after truncation "
                f"to data.seq_len={cfg.seq_len}; raise data.seq_len"
            )
        if log_skips and self.counts["rows_skipped"]:
            log.warning(
                "%s: skipped %d of %d rows (%s)",
                self.path,
                self.counts["rows_skipped"],
                num_rows,
                bad.summary(),
            )

    def __len__(self) -> int:
        """Rows (slots), usable or not."""
        return len(self._sample_of)

    def __getitem__(self, slot: int) -> Slot:
        i = self._sample_of[slot]
        if i < 0:
            return Slot(slot, None, self._skipped[slot], False)
        return Slot(slot, self.samples[i], "", slot in self._truncated)


def collate_right_pad(items: list[tuple[int, TokenizedSample]], pad_id: int) -> Batch:
    """Pad to the longest sample in the micro-batch (right padding keeps causal outputs exact)."""
    width = max(len(s) for _, s in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (_, s) in enumerate(items):
        input_ids[i, : len(s)] = torch.tensor(s.input_ids)
        targets[i, : len(s)] = torch.tensor(s.targets())
        attention_mask[i, : len(s)] = 1
    sample_index = torch.tensor([idx for idx, _ in items], dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "targets": targets,
        "attention_mask": attention_mask,
        "sample_index": sample_index,
    }
    add_token_types(batch, items)
    return batch


def add_token_types(batch: Batch, items: list[tuple[int, TokenizedSample]]) -> None:
    """`token_type_ids` [B, width] when a sample of the micro-batch has segment ids (sentence
    pairs); 0 elsewhere, the pads included."""
    if all(s.token_type_ids is None for _, s in items):
        return
    types = torch.zeros_like(batch["input_ids"])
    for i, (_, s) in enumerate(items):
        if s.token_type_ids is not None:
            types[i, : len(s.token_type_ids)] = torch.tensor(s.token_type_ids)
    batch["token_type_ids"] = types


def kept_items(slots: Iterable[Slot], stats: Counter) -> list[tuple[int, TokenizedSample]]:
    """The samples of `slots` as (row id, sample), counting into `stats` what was read, skipped
    (by kind), kept and truncated."""
    items = []
    for slot in slots:
        stats["rows_read"] += 1
        if slot.sample is None:
            stats["rows_skipped"] += 1
            stats[f"skipped_{slot.skipped}"] += 1
            continue
        stats["rows_kept"] += 1
        if slot.truncated:
            stats["truncated"] += 1
        items.append((slot.index, slot.sample))
    return items


class _Collate:
    """Slots -> a micro-batch plus the counters of what it consumed (under `_stats`, which the
    main process pops). A class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, seq_len: int, pad_id: int, packing: bool):
        self.seq_len, self.pad_id, self.packing = seq_len, pad_id, packing

    def __call__(self, slots: list[Slot]) -> dict[str, Any]:
        stats: Counter = Counter()
        items = kept_items(slots, stats)
        batch, counts = collate(items, self.seq_len, self.pad_id, packing=self.packing)
        stats.update(counts)
        return {**batch, "_stats": dict(stats)}


class MapStyleStepBatches:
    """`StepBatches` over an InstructionDataset.

    Order: epoch e's global order is the permutation `torch.randperm(num_rows)` seeded with
    seed + e (the one DistributedSampler draws), the same for every world size; steps and ranks
    take contiguous positions of it as data.plan describes. An epoch runs
    floor(rows left / global batch) full steps on every rank; the rest of it is not used. A row
    that cannot be used keeps its slot and is skipped, so a micro-batch may be short (or one
    loss-free pad row).

    State: epoch and `position` (samples of the epoch's order consumed), with the dataset size,
    seed and global batch it was saved with, and this rank's counters. A run continues at
    `position` with any world size or global batch, neither repeating nor skipping a sample.
    """

    def __init__(
        self,
        dataset: InstructionDataset,
        cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        seed: int,
        pad_id: int,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset = dataset
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.num_rows = self.num_samples = len(dataset)
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.cfg = cfg
        # Token-budget packing (data.budget): steps count packed rows, not samples.
        self.budget = cfg.packing and cfg.pack_scope == "stream"
        self.cursor = Cursor()
        self.row_steps = RowSteps(
            rank=rank,
            world_size=world_size,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            pad_id=pad_id,
            drop_tail=True,
        )
        if self.budget:
            # Each epoch packs a little differently; the schedule counts epoch 0's rows.
            rows = sum(len(w.rows) for w in self._windows(0, 0))
            self.steps_per_epoch = rows // self.global_batch
            unit = f"packed rows ({rows} rows of data.seq_len={cfg.seq_len} from {self.num_rows})"
        else:
            self.steps_per_epoch = self.num_rows // self.global_batch
            unit = "rows"
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{dataset.key}: {dataset.path}: {unit} are fewer than one global batch "
                f"({self.global_batch})"
            )
        self.num_workers = cfg.workers()
        self.collate = _Collate(cfg.seq_len, pad_id, cfg.packing)
        self.epoch = 0
        self.position = 0
        self._counters: Counter = Counter()

    def plan(self) -> Plan:
        return Plan(
            epoch=self.epoch,
            start=self.position,
            num_rows=self.num_rows,
            rank=self.rank,
            world_size=self.world_size,
            micro_batch_size=self.micro_batch_size,
            grad_accum_steps=self.grad_accum_steps,
            drop_tail=True,
        )

    def epoch_order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s global order of row indices (any rank, any world size)."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def state_dict(self) -> dict[str, Any]:
        """Where the next step starts (the same on every rank), and this rank's counters."""
        state = {
            "kind": "map",
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "num_rows": self.num_rows,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "counters": dict(self._counters),
        }
        if self.budget:
            state |= self.cursor.state() | pack_settings(self.cfg)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind", "map") != "map":
            raise DataError(
                "resume: the saved data state is from a shard stream (data.source changed?)"
            )
        check_unit(state, pack_settings(self.cfg) if self.budget else {}, self.cfg)
        if self.budget:
            self.cursor = Cursor(
                int(state["epoch"]),
                int(state["position"]),
                int(state["window"]),
                int(state["window_start"]),
            )
        if "position" in state:
            for key, mine, cause in (
                ("num_rows", self.num_rows, "data.train_path"),
                ("seed", self.seed, "seed"),
            ):
                if state[key] != mine:
                    raise DataError(
                        f"resume: saved data state has {key}={state[key]}, this run has {mine}; "
                        f"the sample order would differ ({cause} changed?)"
                    )
            position = int(state["position"])
            if not 0 <= position <= self.num_rows and not self.budget:
                raise DataError(
                    f"resume: saved data position {position} is outside [0, {self.num_rows}]"
                )
            if state.get("global_batch") != self.global_batch and self.rank == 0:
                log.info(
                    "resume: data saved with global batch %s continues with %d at sample %d of "
                    "epoch %d",
                    state.get("global_batch"),
                    self.global_batch,
                    position,
                    state["epoch"],
                )
        else:
            # Version 1 saved (epoch, step_in_epoch) and no global batch: it was this run's unless
            # changed. Its first k steps took the first k * global batch entries of the same
            # epoch permutation (rank-interleaved), so the position carries over exactly.
            position = int(state["step_in_epoch"]) * self.global_batch
        self.epoch = int(state["epoch"])
        self.position = position
        if "counters" in state:
            self._counters = Counter(state["counters"])

    def metrics(self) -> dict[str, float]:
        """This rank's counters since the run started (restored on resume); see module doc."""
        m: dict[str, float] = dict(self._counters)
        if m.get("tokens_total"):
            m["packing_efficiency"] = m.get("tokens_real", 0) / m["tokens_total"]
        return m

    def _windows(self, epoch: int, first: int) -> Iterator[Window]:
        """Epoch `epoch`'s packed windows from `first` on (the samples are in memory)."""
        order = self.epoch_order(epoch)
        size, n = self.cfg.pack_window, self.num_rows
        for w in range(first, num_windows(n, size)):
            stats: Counter = Counter()
            slots = (self.dataset[order[p]] for p in range(w * size, min((w + 1) * size, n)))
            items = kept_items(slots, stats)
            yield pack_window(w, items, stats, self.cfg.seq_len, self.seed, epoch)

    def _budget_iter(self) -> Iterator[list[Batch]]:
        while True:
            c = self.cursor
            for step in self.row_steps.epoch(c, self._windows(c.epoch, c.window), self._counters):
                self.epoch, self.position = c.epoch, c.position
                yield step
            self.epoch, self.position = c.epoch, c.position

    def __iter__(self) -> Iterator[list[Batch]]:
        if self.budget:
            yield from self._budget_iter()
            return
        while True:
            plan = self.plan()
            if plan.num_steps == 0:  # resumed with a larger global batch near the epoch's end
                self.epoch, self.position = self.epoch + 1, 0
                continue
            order = self.epoch_order(plan.epoch)
            loader = DataLoader(
                self.dataset,
                batch_sampler=[
                    [order[p] for p in plan.positions(m)] for m in range(plan.num_micro)
                ],
                collate_fn=self.collate,
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),  # so the copies to the GPU are async
                # Its own generator: an iterator drawn from the global RNG would move the
                # training RNG (dropout) at a point that differs between a straight run and a
                # resumed one (here: a new epoch vs the resume), so resume would not be exact.
                generator=torch.Generator().manual_seed(self.seed + plan.epoch),
            )
            micro: list[Batch] = []
            steps = 0
            for batch in loader:
                self._counters.update(batch.pop("_stats"))
                micro.append(batch)
                if len(micro) == self.grad_accum_steps:
                    steps += 1
                    # Advance before yielding: state_dict() right after a step must describe the
                    # position after it.
                    self.position += self.global_batch
                    if steps == plan.num_steps:
                        self.epoch, self.position = self.epoch + 1, 0
                    yield micro
                    micro = []


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
    """Read and tokenize the JSONL file at `path` (data.train_path) and return this rank's
    batches. Every rank reads the whole file; rank 0 logs what it skips."""
    use_training_template(cfg, tokenizer)
    dataset = InstructionDataset(path, tokenizer, cfg, key="data.train_path", log_skips=rank == 0)
    return MapStyleStepBatches(
        dataset,
        cfg,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        seed=seed,
        pad_id=pad_token_id(tokenizer),
    )
