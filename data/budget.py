"""Packing to a token budget across the stream (`data.packing` with `data.pack_scope: stream`).

Rows. Epoch e's global order (the reader's: a permutation, or the shard stream's order) is cut
into consecutive windows of `data.pack_window` positions. Window w's usable samples are packed
best-fit-decreasing into rows of at most `seq_len` tokens, and its rows are put in an order seeded
by (seed, e, w), so that a batch is not all long or all short samples. The epoch's packed rows are
the windows' rows one after another. They depend only on the data, the seed and the packing
settings: not on the rank, the world size, the workers or the batch size.

Steps. `micro_batch_size` counts rows: step k takes the rows [P, P + R) with
R = micro_batch_size x grad_accum_steps x world_size, rank r the r-th contiguous 1/world_size of
them, in `grad_accum_steps` micro-batches of `micro_batch_size` rows. Every micro-batch but an
epoch's last holds exactly micro_batch_size x (at most) seq_len tokens: memory per micro-batch is
fixed, whatever the length mix.

State = (epoch, P, the window holding row P and the row it starts at). It does not depend on the
world size either, so a run continues at any world size or global batch from row P; a resume
re-packs one window (the one holding row P) and skips its rows before P.

Counters. What reading window w found (rows read, kept, skipped by kind, truncated) is counted
once, by the rank that receives the window's first row (rank 0 when that row is past the epoch's
last step), so counters summed over ranks are the run's totals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data.packing import Batch, Item, batch_stats, best_fit_decreasing, pack_rows
from data.rows import DataError

STATE_UNIT = "packed_rows"


@dataclass
class Window:
    """One packing window: its rows (each a list of (row id, sample)) and what reading it found."""

    index: int
    rows: list[list[Item]]
    counters: Counter = field(default_factory=Counter)


def pack_window(
    index: int, items: list[Item], counters: Counter, seq_len: int, seed: int, epoch: int
) -> Window:
    """Window `index` of an epoch from its usable `items` (in order): packed, rows shuffled."""
    groups = best_fit_decreasing([len(s) for _, s in items], seq_len)
    perm = np.random.default_rng([seed % 2**63, epoch, index, 0x9ACC]).permutation(len(groups))
    return Window(index, [[items[i] for i in groups[int(j)]] for j in perm], counters)


def num_windows(num_positions: int, window: int) -> int:
    return -(-num_positions // window)


@dataclass
class Cursor:
    """Where the next step starts: row `position` of `epoch`, in window `window`, whose first
    row is `window_start` (so that a resume re-packs only that window)."""

    epoch: int = 0
    position: int = 0
    window: int = 0
    window_start: int = 0

    def state(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "window": self.window,
            "window_start": self.window_start,
        }


@dataclass
class _Loaded:
    index: int
    start: int  # global row index of the window's first row
    rows: list[list[Item]]
    counters: Counter
    counted: bool


class RowSteps:
    """This rank's steps of packed rows, from an epoch's windows (see the module docstring)."""

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        pad_id: int,
        drop_tail: bool,
    ):
        self.rank, self.world_size = rank, world_size
        self.micro, self.accum = micro_batch_size, grad_accum_steps
        self.per_rank = micro_batch_size * grad_accum_steps
        self.per_step = self.per_rank * world_size
        self.pad_id, self.drop_tail = pad_id, drop_tail
        self.pin = torch.cuda.is_available()

    def epoch(
        self, cursor: Cursor, windows: Iterator[Window], counters: Counter
    ) -> Iterator[list[Batch]]:
        """Steps from `cursor` to the end of its epoch. `windows` yields the epoch's windows from
        `cursor.window` on. `cursor` is advanced before each step is yielded (so a state saved
        right after a step describes the position after it), and `counters` updated."""
        loaded: list[_Loaded] = []
        end = cursor.window_start  # one past the last loaded row
        next_index = cursor.window
        exhausted = False

        def load(until: int) -> None:
            # Windows up to row `until` (exclusive); windows without rows that start before it
            # are loaded too (their counters belong to the step holding that row).
            nonlocal end, next_index, exhausted
            while not exhausted and end < until:
                window = next(windows, None)
                if window is None:
                    exhausted = True
                    return
                if window.index != next_index:
                    raise RuntimeError(
                        f"data: packing window {window.index} arrived, expected {next_index}"
                    )
                # A window whose first row precedes the cursor was counted before the save.
                start_counted = end < cursor.position
                loaded.append(
                    _Loaded(window.index, end, window.rows, window.counters, start_counted)
                )
                end += len(window.rows)
                next_index += 1

        r = self.per_step

        def over(p: int) -> bool:
            # No step left at row p: all rows used, or (drop) fewer than a step's worth.
            return exhausted and (end <= p or (self.drop_tail and end - p < r))

        while True:
            p = cursor.position
            load(p + r)
            if over(p):  # only when resumed at the very end of an epoch
                self._end_epoch(cursor, loaded, end, counters)
                return
            step = self._step(p, loaded, end, counters)
            cursor.position = p + r
            # Load the next step's rows now, so that the step that ends an epoch says so: the
            # state saved after it is the next epoch's start.
            load(p + 2 * r)
            if over(p + r):
                self._end_epoch(cursor, loaded, end, counters)
                yield step
                return
            loaded = [w for w in loaded if w.start + len(w.rows) > p + r or not w.counted]
            if loaded:
                cursor.window, cursor.window_start = loaded[0].index, loaded[0].start
            else:
                cursor.window, cursor.window_start = next_index, end
            yield step

    def _step(self, p: int, loaded: list[_Loaded], end: int, counters: Counter) -> list[Batch]:
        mine = p + self.rank * self.per_rank
        for w in loaded:
            if not w.counted and p <= w.start < p + self.per_step:
                w.counted = True
                if (w.start - p) // self.per_rank == self.rank:
                    counters.update(w.counters)
        micro: list[Batch] = []
        for a in range(self.accum):
            lo = mine + a * self.micro
            rows = [self._row(loaded, i) for i in range(lo, min(lo + self.micro, end))]
            batch = pack_rows(rows, self.pad_id)
            if self.pin:  # built here, not in a DataLoader: pinned so the copy to the GPU is async
                batch = {k: v.pin_memory() for k, v in batch.items()}
            counters.update(batch_stats(batch, sum(len(row) for row in rows)))
            if len(rows) < self.micro:
                counters["tail_empty_slots"] += self.micro - len(rows)
            micro.append(batch)
        return micro

    @staticmethod
    def _row(loaded: list[_Loaded], i: int) -> list[Item]:
        for w in loaded:
            if w.start <= i < w.start + len(w.rows):
                return w.rows[i - w.start]
        raise AssertionError(f"packed row {i} is not loaded")

    def _end_epoch(
        self, cursor: Cursor, loaded: list[_Loaded], end: int, counters: Counter
    ) -> None:
        if self.rank == 0:
            for w in loaded:
                if not w.counted:
                    counters.update(w.counters)
            if self.drop_tail and end > cursor.position:
                counters["tail_dropped_rows"] += sum(
                    len(self._row(loaded, i)) for i in range(cursor.position, end)
                )
        cursor.epoch += 1
        cursor.position = cursor.window = cursor.window_start = 0


def pack_settings(cfg: Any) -> dict[str, Any]:
    """What a saved data position of token-budget packing depends on (`data.*`), for the state
    and for check_unit."""
    return {"unit": STATE_UNIT, "seq_len": cfg.seq_len, "pack_window": cfg.pack_window}


def check_unit(state: dict[str, Any], mine: dict[str, Any], cfg: Any) -> None:
    """Raise DataError when a saved data position cannot be continued with these packing settings
    (`mine`: `unit`, seq_len and pack_window with token-budget packing, {} otherwise)."""
    saved_unit, unit = state.get("unit", "samples"), mine.get("unit", "samples")
    if saved_unit != unit:
        raise DataError(
            f"resume: the data position was saved counting {saved_unit.replace('_', ' ')} and "
            f"this run counts {unit.replace('_', ' ')} (data.packing={cfg.packing}, "
            f"data.pack_scope={cfg.pack_scope}); restore the run's data.packing/pack_scope or "
            "start a new run directory"
        )
    for key in ("seq_len", "pack_window"):
        if key in mine and state.get(key) != mine[key]:
            raise DataError(
                f"resume: the data was packed with data.{key}={state.get(key)}, this run has "
                f"{mine[key]}; the packed rows would differ (restore it or start a new run "
                "directory)"
            )


def explain_no_rows(counters: Counter, per_step: int) -> str:
    """Why an epoch gave no step of packed rows, for a DataError."""
    read, kept = counters.get("rows_read", 0), counters.get("rows_kept", 0)
    return (
        f"{kept} of the {read} rows seen were usable, fewer than one global batch of "
        f"{per_step} packed rows (train.micro_batch_size x accumulation x world size); lower "
        "the batch, add data or use data.epoch_tail=pad"
    )
