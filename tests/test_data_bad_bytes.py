"""Bad bytes: a lone surrogate escape, invalid UTF-8 and a byte order mark, through data.prepare
(jsonl, json, csv), shard streams, map-style JSONL and the eval set. Lenient: a counted skip by
kind; strict: an error naming file and line; a BOM is simply accepted."""

from __future__ import annotations

import json
import logging

import pytest

from data.build import build_eval_dataset
from data.loader import DataError
from data.prepare import PrepareError, prepare
from data.shards import ShardSet, index_shards
from tests.data_fixtures import char_tokenizer, config, map_style, stream, take

BOM = b"\xef\xbb\xbf"


def good(i: int) -> dict[str, str]:
    return {"id": f"good-{i}", "instruction": f"{i}+1=", "response": str(i + 1)}


def line(i: int) -> bytes:
    return json.dumps(good(i)).encode()


# `\ud800` is valid JSON, but the str json.loads makes of it cannot be encoded as UTF-8.
SURROGATE = b'{"id": "bad-1", "instruction": "1+1=", "response": "a\\ud800b"}'
NOT_UTF8 = b'{"id": "bad-2", "instruction": "caf\xe9", "response": "x"}'

# Line 1 starts with a BOM (a Windows export), line 3 holds a lone surrogate, line 5 a byte that
# is not UTF-8. Rows 0, 1, 3 and 5 (0-based) are good.
JSONL = b"\n".join([BOM + line(0), line(1), SURROGATE, line(2), NOT_UTF8, line(3)]) + b"\n"
GOOD_IDS = [f"good-{i}" for i in range(4)]
KEPT_ROWS = [0, 1, 3, 5]


# ---------------------------------------------------------------------------------------------
# data.prepare


def write_input(tmp_path, fmt: str):
    """The same rows in `fmt`; returns (path, its 1-based line/element of the first bad row)."""
    if fmt == "jsonl":
        path = tmp_path / "in.jsonl"
        path.write_bytes(JSONL)
        return path, 3
    if fmt == "json":
        path = tmp_path / "in.json"
        elements = [line(0), line(1), SURROGATE, line(2), NOT_UTF8, line(3)]
        path.write_bytes(BOM + b"[" + b",\n".join(elements) + b"]")
        return path, 3
    path = tmp_path / "in.csv"  # csv has no escapes: only the invalid byte
    rows = [b"%s,%s,%s" % tuple(v.encode() for v in good(i).values()) for i in range(4)]
    rows.insert(2, b"bad-2,caf\xe9,x")
    path.write_bytes(BOM + b"id,instruction,response\r\n" + b"\r\n".join(rows) + b"\r\n")
    return path, 4  # header + 2 rows before it


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_prepare_counts_bad_bytes_by_kind_and_accepts_a_bom(tmp_path, fmt):
    src, _ = write_input(tmp_path, fmt)
    manifest = prepare(str(src), str(tmp_path / "out"))
    rows = [json.loads(d) for _, _, d in ShardSet(str(tmp_path / "out")).iter_rows()]
    assert [r["id"] for r in rows] == GOOD_IDS  # the BOM row included, field names intact
    assert rows[0] == good(0)
    counts = manifest["counts"]
    assert counts["skipped_invalid_utf8"] == 1
    assert counts.get("skipped_invalid_unicode", 0) == (0 if fmt == "csv" else 1)
    assert counts["invalid_input_rows"] == counts["input_rows"] - 4


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_prepare_strict_names_file_and_line_of_the_first_bad_row(tmp_path, fmt):
    src, first_bad = write_input(tmp_path, fmt)
    kind = "invalid UTF-8" if fmt == "csv" else "invalid Unicode"
    with pytest.raises(PrepareError) as e:
        prepare(str(src), str(tmp_path / "out"), strict=True)
    assert str(e.value).startswith(f"{src}:{first_bad}: {kind} (")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# shard streams


def write_shard(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "a.jsonl").write_bytes(JSONL)
    index_shards(str(tmp_path))
    return tmp_path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_lenient_counts_bad_bytes_and_keeps_the_bom_row(tmp_path, num_workers):
    cfg = config(write_shard(tmp_path), max_bad_fraction=0.5, num_workers=num_workers)
    s = stream(cfg, micro_batch_size=2, grad_accum_steps=1)
    kept = [row for _, rows in take(s, s.steps_per_epoch) for row in rows]
    assert sorted(kept) == KEPT_ROWS
    m = s.metrics()
    assert m["skipped_invalid_unicode"] == 1 and m["skipped_invalid_utf8"] == 1
    assert m["rows_read"] == 6 and m["rows_kept"] == 4 and "skipped_invalid_json" not in m


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(
    ("bad", "kind"), [(SURROGATE, "invalid_unicode"), (NOT_UTF8, "invalid_utf8"), (None, "")]
)
def test_stream_strict_names_file_and_line_and_accepts_a_bom(tmp_path, num_workers, bad, kind):
    # One bad row at most: strict stops at the first in sampling order, which is shuffled.
    rows = [BOM + line(0), line(1)] + ([bad] if bad else []) + [line(2)]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    index_shards(str(tmp_path))
    cfg = config(tmp_path, bad_rows="strict", num_workers=num_workers)
    s = stream(cfg, micro_batch_size=len(rows), grad_accum_steps=1)
    if bad is None:
        assert sorted(take(s, 1)[0][1]) == [0, 1, 2]
        return
    with pytest.raises(DataError) as e:
        take(s, 1)
    assert str(e.value).startswith(f"{tmp_path}/a.jsonl:3: {kind}: ")
    assert str(e.value).endswith("(data.bad_rows=strict)") and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# map-style JSONL and the eval set


def write_jsonl_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(JSONL)
    return path


@pytest.mark.timeout(60)
def test_map_style_lenient_counts_bad_bytes_as_they_are_consumed(tmp_path, caplog):
    cfg = config(write_jsonl_file(tmp_path), max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        s = map_style(cfg, micro_batch_size=2, grad_accum_steps=1)
    assert f"{tmp_path}/train.jsonl:3: invalid_unicode" in caplog.text
    assert f"{tmp_path}/train.jsonl:5: invalid_utf8" in caplog.text
    assert s.metrics() == {}  # nothing consumed yet
    kept = [row for _, rows in take(s, s.steps_per_epoch) for row in rows]
    assert sorted(kept) == KEPT_ROWS
    m = s.metrics()
    assert m["skipped_invalid_unicode"] == 1 and m["skipped_invalid_utf8"] == 1
    assert m["rows_read"] == 6 == m["rows_kept"] + m["rows_skipped"]


def test_map_style_strict_names_file_and_line(tmp_path):
    path = write_jsonl_file(tmp_path)
    with pytest.raises(DataError) as e:
        map_style(config(path, bad_rows="strict"), micro_batch_size=1, grad_accum_steps=1)
    assert str(e.value).startswith(f"{path}:3: invalid_unicode: field 'response'")


def test_map_style_stops_above_max_bad_fraction(tmp_path):
    path = write_jsonl_file(tmp_path)
    with pytest.raises(DataError, match=r"2 of 6 rows of .*train\.jsonl were bad .*=0\.01"):
        map_style(config(path), micro_batch_size=1, grad_accum_steps=1)


def test_eval_set_skips_bad_bytes_leniently_and_names_them_strictly(tmp_path):
    tok = char_tokenizer()
    path = write_jsonl_file(tmp_path)
    shards = write_shard(tmp_path / "shards")
    for source, where in ((path, str(path)), (shards, f"{shards}/a.jsonl")):
        ev = build_eval_dataset(config("unused", eval_path=str(source), max_bad_fraction=0.5), tok)
        assert len(ev.samples) == 4
        assert ev.counts["skipped_invalid_unicode"] == ev.counts["skipped_invalid_utf8"] == 1
        strict = config("unused", eval_path=str(source), bad_rows="strict")
        with pytest.raises(DataError, match=rf"^{where}:3: invalid_unicode: "):
            build_eval_dataset(strict, tok)
