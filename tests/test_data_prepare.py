"""`python -m data.prepare`: formats, shard sizes, manifest, determinism, de-dup and filters."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build import build_eval_dataset, build_train_batches
from data.loader import DataError, MapStyleStepBatches
from data.prepare import PrepareError, main, parse_shard_size, prepare
from data.shards import ShardSet
from data.streaming import StreamingStepBatches
from data.synthetic import generate, write_jsonl
from tests.data_fixtures import char_tokenizer, config, ids_by_row

ROWS = generate(120, 3)


def shard_rows(directory) -> list[dict]:
    return [json.loads(d) for _, _, d in ShardSet(str(directory)).iter_rows()]


def test_shard_size_parsing():
    assert parse_shard_size("64MB").bytes == 64 * 10**6
    assert parse_shard_size("1GiB").bytes == 2**30
    assert parse_shard_size("500").bytes == 500
    assert parse_shard_size("10000rows").rows == 10000
    with pytest.raises(PrepareError, match="--shard-size"):
        parse_shard_size("lots")


def test_rows_shards_manifest_and_checksums(tmp_path):
    src = write_jsonl(ROWS, tmp_path / "in.jsonl")
    manifest = prepare(str(src), str(tmp_path / "out"), shard_size="50rows")
    assert [s["rows"] for s in manifest["shards"]] == [50, 50, 20]
    for s in manifest["shards"]:
        data = (tmp_path / "out" / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    assert manifest["schema"]["instruction"] == ["string"]
    assert manifest["total_rows"] == 120 and manifest["counts"]["written_rows"] == 120
    assert shard_rows(tmp_path / "out") == ROWS


def test_byte_size_shards(tmp_path):
    src = write_jsonl(ROWS, tmp_path / "in.jsonl")
    manifest = prepare(str(src), str(tmp_path / "out"), shard_size="2000")
    sizes = [s["bytes"] for s in manifest["shards"]]
    assert len(sizes) > 2 and all(b >= 2000 for b in sizes[:-1])
    assert all(b - 2000 < 200 for b in sizes[:-1])  # closed at the first row past the target


@pytest.mark.timeout(60)
def test_rerun_is_byte_identical(tmp_path):
    src = write_jsonl(ROWS, tmp_path / "in.jsonl")
    for out in ("a", "b"):
        prepare(str(src), str(tmp_path / out), shard_size="1000", dedup=True)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # a re-run into the same directory replaces the old shards, leaving no stale ones
    prepare(str(src), str(tmp_path / "a"), shard_size="100rows")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "manifest.json",
        "shard-00000.jsonl",
        "shard-00000.jsonl.idx",
        "shard-00001.jsonl",
        "shard-00001.jsonl.idx",
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["json", "parquet", "csv", "arrow"])
def test_input_formats_give_the_same_rows(tmp_path, fmt):
    if fmt == "json":
        src = tmp_path / "in.json"
        src.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        src = tmp_path / "in.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), src, row_group_size=50)
    elif fmt == "csv":
        src = tmp_path / "in.csv"
        with open(src, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            w.writeheader()
            w.writerows(ROWS)
    else:
        import datasets

        src = tmp_path / "in_arrow"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(src))
    prepare(str(src), str(tmp_path / "out"), input_format=fmt, shard_size="50rows")
    assert shard_rows(tmp_path / "out") == ROWS


def test_glob_input_in_sorted_order(tmp_path):
    write_jsonl(ROWS[60:], tmp_path / "part-1.jsonl")
    write_jsonl(ROWS[:60], tmp_path / "part-0.jsonl")
    prepare(str(tmp_path / "part-*.jsonl"), str(tmp_path / "out"))
    assert shard_rows(tmp_path / "out") == ROWS


def test_dedup_and_length_filters_are_counted(tmp_path):
    rows = [
        {"id": "1", "instruction": "Say hi", "response": "hi"},
        {"id": "2", "instruction": "say   HI", "response": "hi"},  # duplicate once normalized
        {"id": "3", "instruction": "x", "response": ""},  # too short
        {"id": "4", "instruction": "y" * 100, "response": "z"},  # too long
        {"id": "5", "instruction": "Say bye", "response": "bye"},
    ]
    src = write_jsonl(rows, tmp_path / "in.jsonl")
    with open(src, "a") as f:
        f.write("{not json\n[1]\n")
    manifest = prepare(str(src), str(tmp_path / "out"), dedup=True, min_chars=3, max_chars=50)
    assert [r["id"] for r in shard_rows(tmp_path / "out")] == ["1", "5"]
    counts = manifest["counts"]
    assert counts["removed_duplicates"] == 1
    assert counts["removed_too_short"] == 1 and counts["removed_too_long"] == 1
    assert counts["invalid_input_rows"] == 2 and counts["input_rows"] == 7
    with pytest.raises(PrepareError, match=r"in\.jsonl:6: invalid JSON"):
        prepare(str(src), str(tmp_path / "out2"), strict=True)


@pytest.mark.timeout(60)
def test_cli_turns_synthetic_jsonl_into_shards_the_trainer_streams(tmp_path):
    src = write_jsonl(ROWS, tmp_path / "train.jsonl")
    eval_src = write_jsonl(generate(10, 3, "eval"), tmp_path / "eval.jsonl")
    out = tmp_path / "shards"
    cmd = [
        sys.executable,
        "-m",
        "data.prepare",
        "--input",
        str(src),
        "--output",
        str(out),
        "--shard-size",
        "40rows",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "120 rows -> 120 rows in 3 shards" in done.stderr
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output", str(out)]) == 1

    tok = char_tokenizer()
    kwargs = {"rank": 0, "world_size": 1, "micro_batch_size": 4, "grad_accum_steps": 1, "seed": 0}
    streamed = build_train_batches(config(out), tok, **kwargs)
    assert isinstance(streamed, StreamingStepBatches)
    step = next(iter(streamed))
    ids = ids_by_row(out)
    assert all(ids[i].startswith("train-") for i in step[0]["sample_index"].tolist())
    mapped = build_train_batches(config(src), tok, **kwargs)
    assert isinstance(mapped, MapStyleStepBatches)
    steps = iter(mapped)
    for _ in range(mapped.steps_per_epoch):
        next(steps)
    assert mapped.metrics()["rows_kept"] == 120  # counted as consumed: one epoch

    with pytest.raises(
        DataError, match=r"^data\.train_path: .* is a directory without manifest\.json"
    ):
        build_train_batches(config(tmp_path), tok, **kwargs)
    with pytest.raises(DataError, match=r"^data\.train_path: .*nowhere: no manifest\.json"):
        build_train_batches(config(tmp_path / "nowhere", source="shards"), tok, **kwargs)

    prepare(str(eval_src), str(tmp_path / "eval_shards"))
    from_shards = build_eval_dataset(config(out, eval_path=str(tmp_path / "eval_shards")), tok)
    from_jsonl = build_eval_dataset(config(out, eval_path=str(eval_src)), tok)
    assert len(from_shards.samples) == 10
    assert [s.input_ids for s in from_shards.samples] == [s.input_ids for s in from_jsonl.samples]
