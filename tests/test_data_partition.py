"""Every sample of an epoch goes to exactly one (rank, DataLoader worker); ranks step in lockstep."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.data_fixtures import config, ids_by_row, make_shards, stream, take


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("num_rows", "rows_per_shard"),
    [
        (200, 25),  # 8 shards: divisible by 2 ranks x 2 workers
        (203, 29),  # 7 shards: not divisible; rows not a multiple of the global batch either
    ],
)
def test_two_ranks_two_workers_cover_each_epoch_once(tmp_path, num_rows, rows_per_shard):
    shards = make_shards(tmp_path, num_rows, rows_per_shard)
    cfg = config(shards, num_workers=2)
    ranks = [stream(cfg, rank=r, world_size=2) for r in range(2)]
    steps = ranks[0].steps_per_epoch
    assert steps == ranks[1].steps_per_epoch == -(-num_rows // 16)  # ceil(N / global batch)
    runs = [take(s, 2 * steps) for s in ranks]  # two full epochs on each rank
    ids = ids_by_row(shards)
    for s in ranks:
        assert s.state_dict()["epoch"] == 2 and s.state_dict()["position"] == 0

    orders = []
    for epoch in range(2):
        per_rank = [[row for e, rows in run if e == epoch for row in rows] for run in runs]
        assert [sum(1 for e, _ in run if e == epoch) for run in runs] == [steps, steps]
        seen = Counter(ids[row] for row in per_rank[0] + per_rank[1])
        assert set(seen) == {f"train-{i}" for i in range(num_rows)}, "an epoch covers the data"
        assert max(seen.values()) == 1, "no sample may reach two (rank, worker) streams"
        orders.append(per_rank[0])
    assert orders[0] != orders[1], "the order must be reshuffled per epoch (seed + epoch)"

    # The evening-out rule is counted: the last step's empty slots over both ranks.
    empty = sum(s.metrics().get("tail_empty_slots", 0) for s in ranks)
    assert empty == 2 * (steps * 16 - num_rows)
    read = sum(s.metrics()["rows_read"] for s in ranks)
    assert read == 2 * num_rows


@pytest.mark.timeout(60)
def test_drop_tail_runs_equal_full_steps_and_counts_the_rest(tmp_path):
    shards = make_shards(tmp_path, 203, 29)
    cfg = config(shards, epoch_tail="drop")
    ranks = [stream(cfg, rank=r, world_size=2) for r in range(2)]
    steps = ranks[0].steps_per_epoch
    assert steps == 203 // 16
    runs = [take(s, steps) for s in ranks]
    rows = [row for run in runs for _, step in run for row in step]
    assert len(rows) == len(set(rows)) == steps * 16
    assert all(len(step) == 8 for run in runs for _, step in run)  # every step full on each rank
    assert ranks[0].metrics()["tail_dropped_rows"] == 203 - steps * 16
    assert "tail_dropped_rows" not in ranks[1].metrics()  # counted once, on rank 0
    assert all(s.state_dict()["epoch"] == 1 for s in ranks)


@pytest.mark.timeout(60)
def test_same_seed_same_order_other_seed_other_order(tmp_path):
    shards = make_shards(tmp_path, 120, 20)
    cfg = config(shards)
    a = take(stream(cfg, seed=1), 5)
    assert a == take(stream(cfg, seed=1), 5)
    assert a != take(stream(cfg, seed=2), 5)
