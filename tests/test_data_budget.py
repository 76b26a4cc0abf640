"""Token-budget packing across the stream (data.budget): efficiency on realistic lengths, fixed rows
per micro-batch, every sample exactly once, the logits of each sample alone, and a resume that is
exact at any point and at any world size, for the shard stream and the map-style reader."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch

from data.budget import best_fit_decreasing
from data.loader import DataError
from data.prepare import prepare
from data.templates import encode_row
from tests.data_fixtures import char_tokenizer, config, map_style, step_rows, stream
from tests.test_data_packing import assert_segments_match_alone, tiny_llama

NUM_ROWS = 700
SEQ_LEN = 256


def realistic_rows(n: int, seed: int = 0) -> list[dict]:
    """Instruction rows whose lengths follow instruction data: lognormal, most far below
    seq_len, a few near it (median ~90 tokens with the compact template, p99 ~ 230)."""
    rng = random.Random(seed)

    def text(median: float) -> str:
        k = int(min(110, max(2, rng.lognormvariate(math.log(median), 0.8))))
        return "".join(rng.choice("abcdefghij klmnop") for _ in range(k))

    rows = [{"id": f"r{i}", "instruction": text(45), "response": text(25)} for i in range(n)]
    rows[5] = {"id": "bad"}  # a bad row: counted once, never in a row
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    rows = realistic_rows(NUM_ROWS)
    jsonl = root / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(str(jsonl), str(root / "shards"), shard_size="97rows")
    return {"map": jsonl, "shards": root / "shards"}


READERS = {"map": map_style, "shards": stream}


def budget(data, kind, **overrides):
    base = {"packing": True, "seq_len": SEQ_LEN, "pack_window": 200, "num_workers": 0}
    return config(data[kind], **{**base, **overrides})


def epoch_steps(reader) -> list[list[dict]]:
    """Every step of epoch 0 (the reader is fresh)."""
    steps = []
    for step in reader:
        steps.append(step)
        if reader.epoch != 0:
            return steps
    raise AssertionError("unreachable")


def test_best_fit_decreasing_fills_rows_and_keeps_every_item():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = best_fit_decreasing(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert len(rows) <= math.ceil(sum(lengths) / 100) * 1.05 + 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["map", "shards"])
def test_efficiency_fixed_rows_and_every_sample_once_per_epoch(data, kind):
    """Acceptance: packing efficiency >= 0.95 on a realistic length distribution. Two ranks
    together see every usable row exactly once per epoch, each micro-batch has exactly
    micro_batch_size rows (the token budget) but in the last step, and the counters summed over
    ranks are the epoch's."""
    cfg = budget(data, kind, epoch_tail="pad") if kind == "shards" else budget(data, kind)
    readers = [READERS[kind](cfg, rank=r, world_size=2, micro_batch_size=2) for r in range(2)]
    per_rank = [epoch_steps(r) for r in readers]
    assert len(per_rank[0]) == len(per_rank[1]) >= 5
    seen = Counter(row for steps in per_rank for step in steps for row in step_rows(step))
    assert all(n == 1 for n in seen.values()), "a sample twice in one epoch"
    for steps in per_rank:
        for step in steps[:-1]:
            assert [m["input_ids"].shape[0] for m in step] == [2, 2]
            assert all(m["input_ids"].shape[1] <= SEQ_LEN for m in step)
    totals = Counter()
    for r in readers:
        totals.update(r.metrics())
    efficiency = totals["tokens_real"] / totals["tokens_total"]
    print(f"{kind}: packing efficiency {efficiency:.3f} over {totals['rows']} rows")
    assert efficiency >= 0.95
    assert totals["rows_read"] == NUM_ROWS and totals["skipped_missing_field"] == 1
    used = len(seen) + totals.get("tail_dropped_rows", 0)
    assert totals["rows_kept"] == used == NUM_ROWS - 1
    # unpacked, the same data fills far less of its tensors
    plain = READERS[kind](config(data[kind], seq_len=SEQ_LEN), micro_batch_size=8)
    epoch_steps(plain)
    m = plain.metrics()
    assert m["tokens_real"] / m["tokens_total"] < 0.85


@pytest.mark.timeout(60)
def test_budget_rows_give_each_sample_the_logits_it_gets_alone(data):
    """Acceptance: packed vs unpacked logits equal (<= 1e-5) for every sample of a packed step."""
    cfg = budget(data, "map", seq_len=128)
    tok = char_tokenizer()
    rows = [json.loads(line) for line in data["map"].read_text().splitlines()]
    step = next(iter(map_style(cfg, micro_batch_size=3, grad_accum_steps=1)))
    batch = step[0]
    assert batch["sample_index"].shape[1] >= 2
    checked = assert_segments_match_alone(
        tiny_llama(), batch, lambda i: encode_row(rows[i], tok, cfg)
    )
    assert checked == int((batch["sample_index"] >= 0).sum()) > 3


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["map", "shards"])
@pytest.mark.parametrize("stop_after", [1, 4, 7, 9])
def test_resume_anywhere_gives_the_uninterrupted_steps(data, kind, stop_after):
    """Acceptance: exact resume. Steps of 2 ranks x 2 x 2 rows; an epoch is ~8 steps and a window
    ~2.5, so the stops fall inside windows, at window ends and in the next epoch."""
    cfg = budget(data, kind, num_workers=2 if kind == "shards" else 0)
    total = 12
    for rank in range(2):
        kw = {"rank": rank, "world_size": 2, "micro_batch_size": 2}
        full = [step_rows(s) for s in _take(READERS[kind](cfg, **kw), total)]
        first = READERS[kind](cfg, **kw)
        head = [step_rows(s) for s in _take(first, stop_after)]
        state = first.state_dict()
        assert state["unit"] == "packed_rows"
        tail = [
            step_rows(s) for s in _take(READERS[kind](cfg, state=state, **kw), total - stop_after)
        ]
        assert head + tail == full


def _take(reader, n):
    it = iter(reader)
    return [next(it) for _ in range(n)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["map", "shards"])
def test_resume_at_another_world_size_neither_repeats_nor_skips(data, kind):
    """Elastic: 2 ranks x 2 x 2 rows for 3 steps, then 1 rank x 3 x 1 rows to the epoch's end:
    every usable row exactly once, and the rows after the stop are the same packed rows."""
    cfg = budget(data, kind)
    before = [READERS[kind](cfg, rank=r, world_size=2, micro_batch_size=2) for r in range(2)]
    head = [row for b in before for s in _take(b, 3) for row in step_rows(s)]
    states = [{k: v for k, v in b.state_dict().items() if k != "counters"} for b in before]
    assert states[0] == states[1], "the position must not depend on the rank"
    after = READERS[kind](cfg, state=states[0], micro_batch_size=3, grad_accum_steps=1)
    tail = [row for s in epoch_steps_from(after) for row in step_rows(s)]
    seen = Counter(head + tail)
    assert all(n == 1 for n in seen.values())
    if kind == "shards":  # epoch_tail=pad: nothing is dropped
        assert len(seen) == NUM_ROWS - 1


def epoch_steps_from(reader) -> list[list[dict]]:
    steps = []
    epoch = reader.epoch
    for step in reader:
        steps.append(step)
        if reader.epoch != epoch:
            return steps
    raise AssertionError("unreachable")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("saved", "now", "culprit"),
    [
        ({}, {"pack_scope": "micro_batch"}, "counting packed rows"),
        ({"pack_scope": "micro_batch"}, {}, "counting samples"),
        ({}, {"pack_window": 100}, "data.pack_window=200"),
        ({}, {"seq_len": 200}, "data.seq_len=256"),
    ],
)
def test_resume_with_other_packing_settings_is_a_one_line_error(data, saved, now, culprit):
    first = stream(budget(data, "shards", **saved))
    _take(first, 1)
    with pytest.raises(DataError) as e:
        stream(budget(data, "shards", **now), state=first.state_dict())
    assert culprit in str(e.value) and "\n" not in str(e.value)


@pytest.mark.timeout(60)
def test_too_little_data_for_one_step_is_a_data_error(data):
    cfg = budget(data, "map")
    with pytest.raises(DataError, match="fewer than one global batch"):
        map_style(cfg, micro_batch_size=200)
    s = stream(budget(data, "shards", epoch_tail="drop"), micro_batch_size=200)
    assert s.steps_per_epoch is None
    with pytest.raises(DataError, match="no step of packed rows"):
        next(iter(s))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkilled_packed_run_resumes_bitwise(tiny_assets, tmp_path):
    """Acceptance: with token-budget packing on a shard stream (2 ranks, a data worker each), a
    run SIGKILLed mid-accumulation and one killed inside a save resume to the uninterrupted
    run's losses and weights, bit for bit."""
    from safetensors.torch import load_file

    from tests.test_checkpoint_resume import last_losses, torchrun_train

    shards = tmp_path / "shards"
    prepare(str(tiny_assets / "train.jsonl"), str(shards), shard_size="60rows")
    overrides = (
        f"data.train_path={shards}",
        "data.packing=true",
        "data.pack_window=96",
        "data.num_workers=1",
        "train.micro_batch_size=2",
        "train.max_steps=9",
        "checkpoint.every_steps=2",
    )
    straight = tmp_path / "straight"
    proc = torchrun_train(tiny_assets, straight, *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["data"]["packing_efficiency"] > 0.9

    crashy = tmp_path / "crashy"
    for fault in ("micro_step:5:1", "before_marker:8:0"):
        proc = torchrun_train(tiny_assets, crashy, *overrides, fault=fault)
        assert proc.returncode != 0, f"{fault}: the injected kill did not happen"
    proc = torchrun_train(tiny_assets, crashy, *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resume: continuing from" in proc.stdout

    assert last_losses(crashy) == last_losses(straight)
    assert sorted(last_losses(straight)) == list(range(1, 10))
    a = load_file(crashy / "model" / "model.safetensors")
    b = load_file(straight / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
