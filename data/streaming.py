"""Streaming training data from JSONL shards (see data.shards): sharded, shuffled, packed, resumable.

Order. Epoch e has one global order of the N manifest rows, the same on every rank and for every
world size: shards in a permutation seeded by (seed, e), and within consecutive windows of
`data.shuffle_window` rows of that sequence, a permutation seeded by (seed, e, window). Row p of
the order is found in O(1) (one window permutation, cached), so nothing is read to skip ahead.

Steps (data.plan). The trainer's global batch G is counted in samples (rows): step k of an epoch
takes the order's positions [start + k*G, start + (k+1)*G). Rank r takes the r-th contiguous
1/world_size of them, split into `grad_accum_steps` micro-batches of `micro_batch_size` positions;
micro-batch m of the rank goes to DataLoader worker m % num_workers. So every sample of an epoch
goes to exactly one (rank, worker), and the main process, which receives micro-batches in m order
from the workers' round robin, knows the exact position after every step.

Epoch end (`data.epoch_tail`). Every rank runs ceil(rows_left / G) steps (`pad`): positions past
the end are empty slots, so the last step's micro-batches are short (or one empty, loss-free row),
counted as `tail_empty_slots`; no sample is dropped or repeated. With `drop`, floor(rows_left / G)
steps run and the rest of the epoch is counted as `tail_dropped_rows` (on rank 0).

Bad rows occupy their slot and are skipped (data.rows: counted, or an error under
`data.bad_rows=strict`), so they never shift the order; a micro-batch then has fewer samples.
With packing, a micro-batch's samples are packed into as few `seq_len` rows as fit.

State = (epoch, position in the epoch's global order), plus this rank's counters. The position does
not depend on rank, world size or workers, so a run can continue with another world size (same or
different global batch): the next step starts at `position`, nothing before it is repeated,
nothing after it skipped.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.budget import (
    Cursor,
    RowSteps,
    Window,
    check_unit,
    explain_no_rows,
    num_windows,
    pack_settings,
    pack_window,
)
from data.config import DataConfig
from data.loader import DataError, pad_token_id, use_training_template
from data.packing import Batch, Item, collate
from data.plan import Plan
from data.rows import BadRows, decode_row
from data.shards import ShardSet, ShardUnreadable
from data.templates import RowError, encode_row, truncated

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _seed_words(*values: int) -> list[int]:
    return [v % (2**63) for v in values]


class EpochOrder:
    """The world-size-independent order of one epoch: position -> global row id."""

    def __init__(self, rows_per_shard: np.ndarray, seed: int, epoch: int, window: int):
        self.seed, self.epoch, self.window = seed, epoch, window
        rng = np.random.default_rng(_seed_words(seed, epoch))
        self.shard_perm = rng.permutation(len(rows_per_shard))
        counts = rows_per_shard[self.shard_perm]
        self.cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.first_row = np.concatenate([[0], np.cumsum(rows_per_shard)]).astype(np.int64)
        self.num_rows = int(self.cum[-1])
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def _window_perm(self, w: int) -> np.ndarray:
        perm = self._perms.get(w)
        if perm is None:
            size = min(self.window, self.num_rows - w * self.window)
            perm = np.random.default_rng(_seed_words(self.seed, self.epoch, w)).permutation(size)
            self._perms[w] = perm
            if len(self._perms) > 2:  # positions are visited in order: two windows suffice
                self._perms.popitem(last=False)
        return perm

    def row_id(self, position: int) -> int:
        w, j = divmod(position, self.window)
        q = w * self.window + int(self._window_perm(w)[j])
        k = int(np.searchsorted(self.cum, q, side="right")) - 1
        shard = int(self.shard_perm[k])
        return int(self.first_row[shard]) + q - int(self.cum[k])


class MicroBatches(IterableDataset):
    """This rank's micro-batches of one plan; in a DataLoader worker, only that worker's share."""

    def __init__(
        self, shards: ShardSet, tokenizer: Any, cfg: DataConfig, plan: Plan, seed: int, pad_id: int
    ):
        self.shards, self.tokenizer, self.cfg, self.plan = shards, tokenizer, cfg, plan
        self.seed, self.pad_id = seed, pad_id

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        order = EpochOrder(
            self.shards.rows_per_shard, self.seed, self.plan.epoch, self.cfg.shuffle_window
        )
        reader = _RowReader(self.shards, self.tokenizer, self.cfg)
        mine = range(worker, self.plan.num_micro, num_workers)
        for m in mine:
            try:
                items, stats = reader.read([order.row_id(p) for p in self.plan.positions(m)])
                reader.bad.check(last=m == mine[-1])
            except DataError as e:
                # Sent as data, not raised: the main process raises it with a one-line message
                # instead of DataLoader's wrapped worker traceback.
                yield {"_error": str(e), "_micro": m}
                return
            batch, counts = collate(items, self.cfg.seq_len, self.pad_id, packing=self.cfg.packing)
            stats.update(counts)
            yield {**batch, "_stats": dict(stats), "_micro": m}


class PackWindows(IterableDataset):
    """The packed windows (data.budget) of one epoch from window `first` on; in a DataLoader
    worker, every num_workers-th of them. Every rank reads every window: the rows must be the
    same everywhere, and a sample's length is known only once it is tokenized."""

    def __init__(
        self,
        shards: ShardSet,
        tokenizer: Any,
        cfg: DataConfig,
        *,
        seed: int,
        epoch: int,
        first: int,
        log_skips: bool,
    ):
        self.shards, self.tokenizer, self.cfg = shards, tokenizer, cfg
        self.seed, self.epoch, self.first, self.log_skips = seed, epoch, first, log_skips

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        order = EpochOrder(
            self.shards.rows_per_shard, self.seed, self.epoch, self.cfg.shuffle_window
        )
        reader = _RowReader(self.shards, self.tokenizer, self.cfg, log_skips=self.log_skips)
        size = self.cfg.pack_window
        mine = range(self.first + worker, num_windows(order.num_rows, size), num_workers)
        for w in mine:
            positions = range(w * size, min((w + 1) * size, order.num_rows))
            try:
                items, stats = reader.read([order.row_id(p) for p in positions])
                reader.bad.check(last=w == mine[-1])
            except DataError as e:
                yield {"_error": str(e), "_window": w}  # raised by the main process, one line
                return
            window = pack_window(w, items, stats, self.cfg.seq_len, self.seed, self.epoch)
            yield {"_window": w, "window": window}


def _as_is(item: Any) -> Any:
    # Windows hold Python lists: DataLoader's default conversion would walk every token.
    return item


class _RowReader:
    """Reads, validates and tokenizes rows in one process, counting what it skips."""

    def __init__(self, shards: ShardSet, tokenizer: Any, cfg: DataConfig, log_skips: bool = True):
        self.shards, self.tokenizer, self.cfg = shards, tokenizer, cfg
        self.bad = BadRows(cfg, log, "rows read by a data worker", log_skips=log_skips)
        self.unreadable: dict[int, str] = {}

    def _skip(
        self, stats: Counter, kind: str, shard: int, row: int, message: str, hint: str = ""
    ) -> None:
        where = f"{self.shards.display_path(shard)}:{row + 1}"
        self.bad.skip(stats, kind, where, message, hint)

    def read(self, row_ids: list[int]) -> tuple[list[Item], Counter]:
        stats: Counter = Counter()
        located = [self.shards.locate(r) for r in row_ids]
        raw: dict[int, bytes | None] = {}
        # Read in file order (sequential within a shard), keep the sampling order for output.
        for i in sorted(range(len(row_ids)), key=lambda i: located[i]):
            shard, row = located[i]
            if shard in self.unreadable:
                raw[i] = None
                continue
            try:
                raw[i] = self.shards.read_row(shard, row)
            except ShardUnreadable as e:
                self.unreadable[shard] = str(e)
                raw[i] = None
        items: list[Item] = []
        for i, row_id in enumerate(row_ids):
            shard, row = located[i]
            stats["rows_read"] += 1
            self.bad.num_read += 1
            data = raw[i]
            if data is None:
                self._skip(stats, "unreadable_file", shard, row, self.unreadable[shard])
                continue
            try:
                sample = encode_row(decode_row(data), self.tokenizer, self.cfg)
            except RowError as e:
                self._skip(stats, e.kind, shard, row, str(e), e.hint)
                continue
            n = self.cfg.seq_len
            if len(sample) > n:
                if self.cfg.overlong == "drop":
                    hint = f"rows are longer than data.seq_len={n} (data.overlong=drop)"
                    self._skip(
                        stats, "too_long", shard, row, f"{len(sample)} tokens > data.seq_len", hint
                    )
                    continue
                sample = truncated(sample, n)
            if sample.cut:
                stats["truncated"] += 1
            stats["rows_kept"] += 1
            items.append((row_id, sample))
        return items, stats


def _worker_init(_: int) -> None:
    # Workers are many per machine; one intra-op thread each avoids oversubscribing the cores.
    torch.set_num_threads(1)


class StreamingStepBatches:
    """`StepBatches` over a shard directory/URL; see the module docstring for the semantics.

    `metrics()` returns this rank's counters since construction; summed over ranks they are the
    run's totals (`rows_read == rows_kept + rows_skipped`; `packing_efficiency` is
    tokens_real / tokens_total and should be recomputed from the summed counters).
    """

    num_samples: int | None = None

    def __init__(
        self,
        shards: ShardSet,
        tokenizer: Any,
        cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        seed: int,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shards, self.tokenizer, self.cfg = shards, tokenizer, cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.num_rows = shards.num_rows
        self.pad_id = pad_token_id(tokenizer)
        if self.num_rows == 0:
            raise DataError(f"{shards.url}: the manifest lists no rows")
        # Token-budget packing (data.budget): steps count packed rows, not samples.
        self.budget = cfg.packing and cfg.pack_scope == "stream"
        self.cursor = Cursor()
        self.row_steps = RowSteps(
            rank=rank,
            world_size=world_size,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            pad_id=self.pad_id,
            drop_tail=cfg.epoch_tail == "drop",
        )
        if cfg.epoch_tail == "drop" and self.num_rows < self.global_batch and not self.budget:
            raise DataError(
                f"{shards.url}: {self.num_rows} rows are fewer than one global batch "
                f"({self.global_batch}) with data.epoch_tail=drop"
            )
        self.epoch = 0
        self.position = 0
        self._counters: Counter = Counter()
        self._dataset_facts()
        if cfg.workers():
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def _dataset_facts(self) -> None:
        empty = [s.file for s in self.shards.shards if s.rows == 0]
        invalid = [s.file for s in self.shards.shards if s.rows and s.invalid_rows == s.rows]
        if self.rank == 0:  # facts about the data, counted once per run
            self._counters.update(empty_shards=len(empty), all_invalid_shards=len(invalid))
            for f in empty:
                log.warning("%s/%s: empty shard", self.shards.root, f)
            for f in invalid:
                log.warning("%s/%s: no row of this shard is a JSON object", self.shards.root, f)

    def plan(self) -> Plan:
        return Plan(
            epoch=self.epoch,
            start=self.position,
            num_rows=self.num_rows,
            rank=self.rank,
            world_size=self.world_size,
            micro_batch_size=self.micro_batch_size,
            grad_accum_steps=self.grad_accum_steps,
            drop_tail=self.cfg.epoch_tail == "drop",
        )

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps in a full epoch (the same on every rank); None with token-budget
        packing, where they are known only once the whole epoch is tokenized."""
        if self.budget:
            return None
        return Plan(
            0,
            0,
            self.num_rows,
            0,
            self.world_size,
            self.micro_batch_size,
            self.grad_accum_steps,
            self.cfg.epoch_tail == "drop",
        ).num_steps

    def state_dict(self) -> dict[str, Any]:
        """Where the next step starts in the global order (the same on every rank), and this
        rank's counters."""
        state = {
            "kind": "shards",
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "num_rows": self.num_rows,
            "seed": self.seed,
            "shuffle_window": self.cfg.shuffle_window,
            "counters": dict(self._counters),
        }
        if self.budget:
            state |= self.cursor.state() | pack_settings(self.cfg)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "shards":
            raise DataError(
                "resume: the saved data state is not from a shard stream (data.source changed?)"
            )
        for key, mine in (
            ("num_rows", self.num_rows),
            ("seed", self.seed),
            ("shuffle_window", self.cfg.shuffle_window),
        ):
            if state[key] != mine:
                raise DataError(
                    f"resume: saved data state has {key}={state[key]}, this run has {mine}; the "
                    "order would differ (same data, seed and data.shuffle_window are needed)"
                )
        check_unit(state, pack_settings(self.cfg) if self.budget else {}, self.cfg)
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if self.budget:
            self.cursor = Cursor(
                self.epoch, self.position, int(state["window"]), int(state["window_start"])
            )
        if "counters" in state:  # given as saved (or summed, or {} when the world size changed)
            self._counters = Counter(state["counters"])

    def metrics(self) -> dict[str, float]:
        m: dict[str, float] = dict(self._counters)
        if m.get("tokens_total"):
            m["packing_efficiency"] = m.get("tokens_real", 0) / m["tokens_total"]
        return m

    def _loader(self, plan: Plan) -> DataLoader:
        workers = self.cfg.workers()
        return DataLoader(
            MicroBatches(self.shards, self.tokenizer, self.cfg, plan, self.seed, self.pad_id),
            batch_size=None,
            num_workers=workers,
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=2 if workers else None,
            pin_memory=torch.cuda.is_available(),  # so the copies to the GPU are async
            # Not the global RNG: see data/loader.py (resume must leave dropout's RNG alone).
            generator=torch.Generator().manual_seed(self.seed + plan.epoch),
        )

    def _windows(self, epoch: int, first: int) -> Iterator[Window]:
        workers = self.cfg.workers()
        loader = DataLoader(
            PackWindows(
                self.shards,
                self.tokenizer,
                self.cfg,
                seed=self.seed,
                epoch=epoch,
                first=first,
                log_skips=self.rank == 0,
            ),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=workers,
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=2 if workers else None,
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )
        for item in loader:
            if "_error" in item:
                raise DataError(item["_error"])
            yield item["window"]

    def _budget_iter(self) -> Iterator[list[Batch]]:
        while True:
            c = self.cursor
            from_start = c.position == 0 and c.window == 0
            stepped = False
            for step in self.row_steps.epoch(c, self._windows(c.epoch, c.window), self._counters):
                stepped = True
                self.epoch, self.position = c.epoch, c.position
                yield step
            self.epoch, self.position = c.epoch, c.position
            if from_start and not stepped:
                raise DataError(
                    f"{self.shards.url}: no step of packed rows in a whole epoch: "
                    f"{explain_no_rows(self._counters, self.row_steps.per_step)}"
                )

    def __iter__(self) -> Iterator[list[Batch]]:
        if self.budget:
            yield from self._budget_iter()
            return
        while True:
            plan = self.plan()
            steps = plan.num_steps
            if steps == 0:
                self.epoch, self.position = self.epoch + 1, 0
                continue
            micro: list[Batch] = []
            expected = 0
            for item in self._loader(plan):
                if item.get("_micro") != expected:
                    raise RuntimeError(
                        f"data workers delivered micro-batch {item.get('_micro')}, expected "
                        f"{expected}"
                    )
                if "_error" in item:
                    raise DataError(item["_error"])
                expected += 1
                self._counters.update(item.pop("_stats"))
                del item["_micro"]
                micro.append(item)
                if len(micro) == self.grad_accum_steps:
                    # Advance before yielding: state_dict() right after a step must describe the
                    # position after it.
                    self.position = min(self.position + self.global_batch, self.num_rows)
                    if expected == plan.num_micro:
                        self._count_tail(plan)
                        self.epoch, self.position = self.epoch + 1, 0
                    yield micro
                    micro = []
            if expected != plan.num_micro:
                raise RuntimeError(
                    f"data workers delivered {expected} of {plan.num_micro} micro-batches"
                )

    def _count_tail(self, plan: Plan) -> None:
        if plan.drop_tail:
            if self.rank == 0:
                left = plan.num_rows - plan.start - plan.num_steps * plan.global_batch
                self._counters["tail_dropped_rows"] += left
            return
        last = plan.num_micro - plan.grad_accum_steps
        for m in range(last, plan.num_micro):
            self._counters["tail_empty_slots"] += plan.micro_batch_size - len(plan.positions(m))


def build_streaming(
    cfg: DataConfig,
    url: str,
    tokenizer: Any,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    seed: int,
) -> StreamingStepBatches:
    """Open the shard set at `url` (manifest read once) and return this rank's stream."""
    use_training_template(cfg, tokenizer)
    try:
        shards = ShardSet(url, cfg.storage_options)
    except ShardUnreadable as e:
        raise DataError(f"data.train_path: {e}") from None
    return StreamingStepBatches(
        shards,
        tokenizer,
        cfg,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        seed=seed,
    )
