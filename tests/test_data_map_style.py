"""Map-style JSONL data: packing and `overlong: drop` as in the shard stream, a world-size
independent order, exact resume at any world size or global batch, and counters that survive a
resume (for both readers)."""

from __future__ import annotations

import json

import pytest

from data.loader import DataError, MapStyleStepBatches
from data.synthetic import generate, write_jsonl
from data.templates import encode_row
from tests.data_fixtures import char_tokenizer, config, make_shards, map_style, stream, take
from tests.test_data_packing import assert_segments_match_alone, tiny_llama

NUM_ROWS = 150  # 150 % 8 != 0 and 150 % 16 != 0: every epoch leaves a tail


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    return write_jsonl(generate(NUM_ROWS, 0), tmp_path_factory.mktemp("map") / "train.jsonl")


def rows_of(path) -> list[dict]:
    return [json.loads(x) for x in open(path)]


# ---------------------------------------------------------------------------------------------
# packing and overlong


@pytest.mark.timeout(60)
def test_packed_micro_batches_hold_the_unpacked_samples_with_their_own_logits(jsonl):
    tok = char_tokenizer()
    packed_cfg = config(jsonl, packing=True, pack_scope="micro_batch", seq_len=128)
    rows = rows_of(jsonl)
    packed = next(iter(map_style(packed_cfg, micro_batch_size=8, grad_accum_steps=2)))
    plain = next(
        iter(map_style(config(jsonl, seq_len=128), micro_batch_size=8, grad_accum_steps=2))
    )
    model = tiny_llama()
    for p, u in zip(packed, plain, strict=True):
        assert set(p) == {"input_ids", "targets", "position_ids", "sample_index", "num_tokens"}
        assert p["sample_index"].dim() == 2 and p["sample_index"].shape[1] >= 2
        assert p["input_ids"].shape[0] < 8 and p["input_ids"].shape[1] <= 128
        ids = sorted(i for i in p["sample_index"].flatten().tolist() if i >= 0)
        assert ids == sorted(u["sample_index"].tolist()), "same samples as unpacked"
        assert int(p["num_tokens"]) == int(u["attention_mask"].sum())
        assert int((p["targets"] != -100).sum()) == int((u["targets"] != -100).sum())
        checked = assert_segments_match_alone(
            model, p, lambda i: encode_row(rows[i], tok, packed_cfg)
        )
        assert checked == 8


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_rows_are_truncated_or_dropped_and_counted(jsonl, overlong):
    tok = char_tokenizer()
    # synthetic rows are 11-20 tokens with the compact template: 15 splits them
    cfg = config(jsonl, seq_len=15, overlong=overlong)
    s = map_style(cfg)
    steps = take(s, s.steps_per_epoch)
    consumed = s.epoch_order(0)[: s.steps_per_epoch * 8]
    lengths = {i: len(encode_row(row, tok, cfg)) for i, row in enumerate(rows_of(jsonl))}
    long_rows = {i for i in consumed if lengths[i] > 15}
    assert long_rows, "the test needs rows longer than seq_len"
    kept = {row for _, rows in steps for row in rows}
    m = s.metrics()
    assert m["rows_read"] == len(consumed) == m["rows_kept"] + m.get("rows_skipped", 0)
    if overlong == "drop":
        assert kept == set(consumed) - long_rows
        assert m["skipped_too_long"] == len(long_rows) == m["rows_skipped"]
        assert "truncated" not in m
    else:
        assert kept == set(consumed)
        assert m["truncated"] == len(long_rows) and "skipped_too_long" not in m


def test_all_rows_too_long_is_an_error_naming_seq_len(jsonl):
    with pytest.raises(DataError, match=r"^data\.train_path: none of the 150 rows .*too_long 150"):
        map_style(config(jsonl, seq_len=8, overlong="drop"))


# ---------------------------------------------------------------------------------------------
# order and resume


@pytest.mark.timeout(60)
def test_steps_take_the_same_samples_at_any_world_size(jsonl):
    cfg = config(jsonl)
    one = take(map_style(cfg, micro_batch_size=4, grad_accum_steps=4), 5)
    two = [take(map_style(cfg, rank=r, world_size=2, micro_batch_size=4), 5) for r in range(2)]
    for k in range(5):
        # rank 0 then rank 1: the contiguous halves of the one-rank step, in order
        assert one[k][1] == two[0][k][1] + two[1][k][1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("stop_after", "num_workers"), [(3, 0), (18, 2), (20, 0)])
def test_resume_matches_uninterrupted_run_per_rank(jsonl, stop_after, num_workers):
    """18 steps = 1 epoch (150 // 8): mid-epoch, exactly at the boundary, and after it."""
    cfg = config(jsonl, num_workers=num_workers, packing=True, pack_scope="micro_batch")
    assert map_style(cfg, world_size=2, micro_batch_size=2).steps_per_epoch == 18
    for rank in range(2):
        full = take(map_style(cfg, rank=rank, world_size=2, micro_batch_size=2), 24)
        first = map_style(cfg, rank=rank, world_size=2, micro_batch_size=2)
        head = take(first, stop_after)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = map_style(cfg, rank=rank, world_size=2, micro_batch_size=2, state=state)
        assert head + take(resumed, 24 - stop_after) == full


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("before", "after"),
    [
        (  # the case: global batch 8 -> 16
            {"world_size": 1, "micro_batch_size": 4, "grad_accum_steps": 2},
            {"world_size": 2, "micro_batch_size": 4, "grad_accum_steps": 2},
        ),
        (
            {"world_size": 2, "micro_batch_size": 2, "grad_accum_steps": 2},
            {"world_size": 1, "micro_batch_size": 2, "grad_accum_steps": 4},
        ),
        (
            {"world_size": 2, "micro_batch_size": 4, "grad_accum_steps": 2},
            {"world_size": 3, "micro_batch_size": 1, "grad_accum_steps": 1},
        ),
    ],
)
def test_resume_at_other_world_size_or_global_batch_neither_repeats_nor_skips(jsonl, before, after):
    cfg = config(jsonl)
    runs = [map_style(cfg, rank=r, **before) for r in range(before["world_size"])]
    consumed = [row for s in runs for _, step in take(s, 3) for row in step]
    states = [{k: v for k, v in s.state_dict().items() if k != "counters"} for s in runs]
    assert all(st == states[0] for st in states), "the position must not depend on the rank"
    assert states[0]["position"] == len(consumed)

    resumed = [map_style(cfg, rank=r, state=states[0], **after) for r in range(after["world_size"])]
    g = resumed[0].global_batch
    steps = (NUM_ROWS - len(consumed)) // g  # full steps left in the epoch
    rest = [row for s in resumed for epoch, step in take(s, steps) for row in step if epoch == 0]
    assert all(s.state_dict()["epoch"] == 1 and s.position == 0 for s in resumed)
    order = runs[0].epoch_order(0)
    assert len(set(consumed + rest)) == len(consumed) + len(rest), "no sample repeated"
    assert set(consumed + rest) == set(order[: len(consumed) + steps * g]), "none skipped"


def test_resume_refuses_a_state_for_other_data_or_seed(jsonl):
    cfg = config(jsonl)
    state = map_style(cfg).state_dict()
    with pytest.raises(DataError, match=r"num_rows=999, this run has 150.*data\.train_path"):
        map_style(cfg, state={**state, "num_rows": 999})
    with pytest.raises(DataError, match=r"seed=7, this run has 8"):
        map_style(cfg, seed=8, state=state)
    with pytest.raises(DataError, match="shard stream"):
        map_style(cfg, state={**state, "kind": "shards"})


def test_version_1_state_continues_at_the_same_samples(jsonl):
    """The old (epoch, step_in_epoch) state: the first k steps of DistributedSampler took the
    first k * G entries of the same permutation, so step k + 1 must follow them."""
    cfg = config(jsonl)
    s = map_style(cfg, state={"kind": "map", "epoch": 1, "step_in_epoch": 3})
    assert (s.epoch, s.position) == (1, 24)
    assert take(s, 1)[0][1] == s.epoch_order(1)[24:32]


# ---------------------------------------------------------------------------------------------
# counters across a resume


def build(kind: str, source, **kwargs) -> MapStyleStepBatches:
    return (
        map_style(config(source), **kwargs) if kind == "map" else stream(config(source), **kwargs)
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("counters"), NUM_ROWS, 40)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["map", "shards"])
def test_counters_survive_a_resume(jsonl, shards, kind):
    source = jsonl if kind == "map" else shards
    straight = build(kind, source)
    take(straight, 7)
    first = build(kind, source)
    take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["counters"]["rows_read"] == 32 and state["counters"]["micro_batches"] == 8
    resumed = build(kind, source, state=state)
    assert resumed.metrics() == first.metrics()
    take(resumed, 3)
    assert resumed.metrics() == straight.metrics()
    assert resumed.metrics()["rows_read"] == 56

    fresh = build(kind, source, state={k: v for k, v in state.items() if k != "counters"})
    assert "rows_read" not in fresh.metrics(), "no counters saved (an old checkpoint): from 0"
    other = build(kind, source)
    other.load_state_dict({**state, "counters": {}})  # what other ranks get in a new world
    assert "rows_read" not in other.metrics() and other.position == state["position"]
