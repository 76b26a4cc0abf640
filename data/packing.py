"""Turn a micro-batch's samples into tensors: padded rows, or several samples packed per row.

Packed rows carry `position_ids` that restart at 0 for every sample and NO `attention_mask`:
transformers (5.x, `masking_utils.find_packed_sequence_indices`) then derives a block-diagonal
causal mask from the position restarts, so with sdpa/eager attention each sample attends only to
itself and gets the logits it would get alone. That detection only runs without a KV cache:
the model must be called with `use_cache=False` (as the engines do); with a cache the
samples of a row would attend to each other. The padding at the end of a row restarts positions
too, so it forms its own block and never joins the last sample's.
"""

from __future__ import annotations

import bisect

import torch

from data.templates import IGNORE_INDEX, TokenizedSample

Batch = dict[str, torch.Tensor]
Item = tuple[int, TokenizedSample]  # (global row id, sample)


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Assign items (by index, in order) to the first row with room; deterministic."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Assign items (by index) to rows of `capacity`: longest first, each into the row with the
    least room that still fits it. Deterministic (ties broken by index); rows list their items in
    index order. Near-optimal for the many-short-few-long lengths of instruction data."""
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), kept sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect.bisect_left(rooms, (n, -1))
        if k == len(rooms):
            rows.append([i])
            bisect.insort(rooms, (capacity - n, len(rows) - 1))
        else:
            room, r = rooms.pop(k)
            rows[r].append(i)
            bisect.insort(rooms, (room - n, r))
    for row in rows:
        row.sort()
    return rows


def pack(items: list[Item], seq_len: int, pad_id: int) -> Batch:
    """Pack samples (each at most `seq_len` long) into rows of width <= seq_len, first fit in
    order (data.pack_scope=micro_batch)."""
    if not items:
        return empty_batch(pad_id, packed=True)
    groups = first_fit([len(s) for _, s in items], seq_len)
    return pack_rows([[items[i] for i in g] for g in groups], pad_id)


def pack_rows(rows: list[list[Item]], pad_id: int) -> Batch:
    """Tensors of packed `rows` (each a list of samples that fits one row).

    The width is the fullest row's length, not seq_len, so no compute is spent on a pad-only
    tail. `sample_index` is [B, K]: the row ids in each packed row, -1 where none.
    """
    if not rows:
        return empty_batch(pad_id, packed=True)
    width = max(sum(len(s) for _, s in row) for row in rows)
    k = max(len(row) for row in rows)
    # Rows are built as Python lists and converted once: a tensor per sample costs more than
    # the packing itself.
    input_ids, targets, position_ids, sample_index = [], [], [], []
    num_tokens = 0
    for row in rows:
        ids: list[int] = []
        lab: list[int] = []
        pos: list[int] = []
        for _, s in row:
            ids += s.input_ids
            lab += s.targets()
            pos += range(len(s))
        num_tokens += len(ids)
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        targets.append(lab + [IGNORE_INDEX] * pad)
        position_ids.append(pos + list(range(pad)))
        sample_index.append([row_id for row_id, _ in row] + [-1] * (k - len(row)))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        "sample_index": torch.tensor(sample_index, dtype=torch.long),
        # Real (non-pad) tokens: packed rows have no attention_mask to count them from.
        "num_tokens": torch.tensor(num_tokens, dtype=torch.long),
    }


def batch_stats(batch: Batch, num_samples: int) -> dict[str, int]:
    """The counters of one micro-batch (see `collate`)."""
    tokens_real = (
        int(batch["num_tokens"])
        if "num_tokens" in batch
        else int(batch["attention_mask"].sum())
        if num_samples
        else 0
    )
    return {
        "micro_batches": 1,
        "empty_micro_batches": int(not num_samples),
        "samples": num_samples,
        "rows": batch["input_ids"].shape[0],
        "tokens_real": tokens_real,
        "tokens_total": batch["input_ids"].numel(),
        "target_tokens": int((batch["targets"] != IGNORE_INDEX).sum()),
    }


def pad_right(items: list[Item], pad_id: int) -> Batch:
    """One sample per row, right-padded to the longest (right padding keeps causal outputs exact)."""
    if not items:
        return empty_batch(pad_id, packed=False)
    width = max(len(s) for _, s in items)
    pads = [width - len(s) for _, s in items]
    batch = {
        "input_ids": torch.tensor(
            [s.input_ids + [pad_id] * p for (_, s), p in zip(items, pads, strict=True)]
        ),
        "targets": torch.tensor(
            [s.targets() + [IGNORE_INDEX] * p for (_, s), p in zip(items, pads, strict=True)]
        ),
        "attention_mask": torch.tensor(
            [[1] * len(s) + [0] * p for (_, s), p in zip(items, pads, strict=True)]
        ),
        "sample_index": torch.tensor([i for i, _ in items], dtype=torch.long),
    }
    if any(s.token_type_ids is not None for _, s in items):  # sentence pairs: segment ids
        batch["token_type_ids"] = torch.tensor(
            [
                (s.token_type_ids or [0] * len(s)) + [0] * p
                for (_, s), p in zip(items, pads, strict=True)
            ]
        )
    return batch


def collate(
    items: list[Item], seq_len: int, pad_id: int, *, packing: bool
) -> tuple[Batch, dict[str, int]]:
    """A micro-batch of `items` (packed or padded) and its counters, as both readers report them:
    micro_batches, empty_micro_batches, samples, rows (tensor rows), tokens_real (sample tokens),
    tokens_total (tensor elements), target_tokens."""
    batch = pack(items, seq_len, pad_id) if packing else pad_right(items, pad_id)
    return batch, batch_stats(batch, len(items))


def empty_batch(pad_id: int, *, packed: bool, width: int = 2) -> Batch:
    """A micro-batch with no sample (all of its slots were past the epoch's end or bad rows):
    one pad row with no loss, so every rank still runs its forward/backward (collectives stay in
    step) and adds nothing to the loss or the token count. Its mask is all ones on purpose: a
    fully masked row can produce NaN attention weights."""
    batch = {
        "input_ids": torch.full((1, width), pad_id, dtype=torch.long),
        "targets": torch.full((1, width), IGNORE_INDEX, dtype=torch.long),
    }
    if packed:
        batch["position_ids"] = torch.arange(width).unsqueeze(0)
        batch["sample_index"] = torch.full((1, 1), -1, dtype=torch.long)
    else:
        batch["attention_mask"] = torch.ones((1, width), dtype=torch.long)
        batch["sample_index"] = torch.full((1,), -1, dtype=torch.long)
    return batch
