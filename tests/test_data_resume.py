"""Resume from `state_dict()`: the same samples in the same order, at any world size."""

from __future__ import annotations

import pytest

from data.loader import DataError
from data.shards import ShardSet
from tests.data_fixtures import config, make_shards, stream, take


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("resume"), 150, 22)  # 7 shards, 150 % 16 != 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "stop_after", [3, 10, 12]
)  # mid-epoch, 0 into epoch 2 (10 = 1 epoch), after it
def test_resume_matches_uninterrupted_run_per_rank(shards, stop_after):
    cfg = config(shards, num_workers=2, packing=True, pack_scope="micro_batch")
    steps_per_epoch = stream(cfg, world_size=2).steps_per_epoch
    assert steps_per_epoch == 10
    total = 16  # crosses the epoch boundary
    for rank in range(2):
        full = take(stream(cfg, rank=rank, world_size=2), total)
        first = stream(cfg, rank=rank, world_size=2)
        head = take(first, stop_after)
        state = first.state_dict()
        tail = take(stream(cfg, rank=rank, world_size=2, state=state), total - stop_after)
        assert head + tail == full


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("before", "after"),
    [
        (
            {"world_size": 2, "micro_batch_size": 2, "grad_accum_steps": 2},
            {"world_size": 1, "micro_batch_size": 2, "grad_accum_steps": 4},
        ),
        (
            {"world_size": 1, "micro_batch_size": 4, "grad_accum_steps": 2},
            {"world_size": 2, "micro_batch_size": 2, "grad_accum_steps": 2},
        ),
    ],
)
def test_resume_at_other_world_size_neither_repeats_nor_skips(shards, before, after):
    cfg = config(shards, num_workers=2)
    n_before = before["world_size"]
    runs = [stream(cfg, rank=r, **before) for r in range(n_before)]
    consumed = [row for s in runs for _, step in take(s, 6) for row in step]
    states = [{k: v for k, v in s.state_dict().items() if k != "counters"} for s in runs]
    assert all(st == states[0] for st in states), "the position must not depend on the rank"

    resumed = [stream(cfg, rank=r, state=states[0], **after) for r in range(after["world_size"])]
    steps = resumed[0].plan().num_steps
    assert steps == -(-(150 - 6 * 8) // 8)
    rest = [row for s in resumed for epoch, step in take(s, steps) for row in step if epoch == 0]
    assert all(s.state_dict()["epoch"] == 1 for s in resumed)
    assert len(consumed) + len(rest) == 150
    assert sorted(consumed + rest) == list(range(150))


@pytest.mark.timeout(60)
def test_resume_cost_does_not_grow_with_position(shards, monkeypatch):
    """Resuming late reads only the rows of the next step, no consumed prefix."""
    reads = []
    original = ShardSet.read_row
    monkeypatch.setattr(
        ShardSet, "read_row", lambda self, s, r: reads.append((s, r)) or original(self, s, r)
    )
    cfg = config(shards)  # num_workers=0: reads happen in this process and can be counted
    for position in (8, 136):
        reads.clear()
        s = stream(cfg, state={**stream(cfg).state_dict(), "position": position})
        next(iter(s))
        assert len(reads) == 8  # one global batch (world size 1): micro 4 x accum 2


def test_resume_refuses_a_state_for_other_data(shards):
    cfg = config(shards)
    state = stream(cfg).state_dict()
    with pytest.raises(DataError, match="num_rows=999"):
        stream(cfg, state={**state, "num_rows": 999})
    with pytest.raises(DataError, match="seed"):
        stream(cfg, seed=8, state=state)
