"""Bad data: every kind is counted (lenient) or stops the run with file and line (strict)."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from data.loader import DataError
from data.shards import index_shards
from data.templates import RowError, encode_row
from tests.data_fixtures import char_tokenizer, config, stream, take


def good(i: int) -> bytes:
    return json.dumps(
        {"id": f"good-{i}", "instruction": f"{i}+1=", "response": str(i + 1)}
    ).encode()


# One row of each bad kind, between good rows; the counter each one must land in.
BAD_ROWS = [
    (b'{"instruction": "1+1=", "response": ', "invalid_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'{"instruction": "1+1="}', "missing_field"),
    (b'{"instruction": "1+1=", "response": 2}', "wrong_type"),
    (b'{"instruction": "1+1=", "response": "  "}', "empty_text"),
    (b'{"instruction": "caf\xe9", "response": "x"}', "invalid_utf8"),
]


def write_bad_set(root):
    """shard a: good and bad rows mixed; b: only invalid rows; c: empty; d: two good rows (the
    tests delete it once the stream is open: unreadable when read)."""
    lines = [good(0)]
    for i, (row, _) in enumerate(BAD_ROWS, 1):
        lines += [row, good(i)]
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "b.jsonl").write_bytes(b"not json\n{broken\n")
    (root / "c.jsonl").write_bytes(b"")
    (root / "d.jsonl").write_bytes(good(100) + b"\n" + good(101) + b"\n")
    return index_shards(str(root))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_lenient_mode_counts_each_kind_and_keeps_all_good_rows(tmp_path, caplog, num_workers):
    manifest = write_bad_set(tmp_path)
    assert [s["rows"] for s in manifest["shards"]] == [13, 2, 0, 2]
    cfg = config(tmp_path, max_bad_fraction=1.0, num_workers=num_workers)
    s = stream(cfg, micro_batch_size=2, grad_accum_steps=2)
    (tmp_path / "d.jsonl").unlink()  # after the open-time check: gone when its rows are read
    with caplog.at_level(logging.WARNING, logger="data.streaming"):
        steps = take(s, s.steps_per_epoch)
    kept = [row for _, rows in steps for row in rows]
    assert sorted(kept) == list(range(0, 13, 2)), "every good row of a.jsonl is yielded, once"
    m = s.metrics()
    for _, kind in BAD_ROWS:
        expected = 3 if kind == "invalid_json" else 1  # + the two lines of b.jsonl
        assert m[f"skipped_{kind}"] == expected, kind
    assert m["skipped_unreadable_file"] == 2  # d.jsonl's rows
    assert m["rows_read"] == 17 == m["rows_kept"] + m["rows_skipped"]
    assert m["rows_kept"] == 7
    assert m["empty_shards"] == 1 and m["all_invalid_shards"] == 1
    if num_workers == 0:  # worker processes log to their own stderr
        assert f"{tmp_path}/a.jsonl:2: invalid_json" in caplog.text
        assert f"{tmp_path}/a.jsonl:12: invalid_utf8" in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_strict_mode_error_names_file_and_line(tmp_path, num_workers):
    (tmp_path / "a.jsonl").write_bytes(
        good(0) + b"\n" + good(1) + b"\n" + b"[1]\n" + good(2) + b"\n"
    )
    index_shards(str(tmp_path))
    cfg = config(tmp_path, bad_rows="strict", num_workers=num_workers)
    s = stream(cfg, micro_batch_size=1, grad_accum_steps=1)
    with pytest.raises(DataError) as e:
        take(s, s.steps_per_epoch)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}/a.jsonl:3: not_object:")
    assert "\n" not in msg


@pytest.mark.timeout(60)
def test_strict_mode_file_gone_during_the_run(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(good(0) + b"\n")
    index_shards(str(tmp_path))
    s = stream(config(tmp_path, bad_rows="strict"), micro_batch_size=1, grad_accum_steps=1)
    (tmp_path / "a.jsonl").unlink()
    with pytest.raises(DataError, match=r"a\.jsonl:1: unreadable_file: file unreadable"):
        take(s, 1)


@pytest.mark.timeout(60)
def test_lenient_mode_stops_above_max_bad_fraction(tmp_path):
    write_bad_set(tmp_path)
    s = stream(config(tmp_path, max_bad_fraction=0.2), micro_batch_size=2, grad_accum_steps=2)
    with pytest.raises(
        DataError, match=r"rows read by a data worker were bad .*data\.max_bad_fraction=0\.2"
    ):
        take(s, s.steps_per_epoch)


@pytest.mark.timeout(60)
def test_a_chat_template_that_rejects_a_conversation_is_a_counted_bad_chat_row(tmp_path):
    tok = copy.deepcopy(char_tokenizer())
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    cfg = config("unused", format="chat")
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert encode_row(ok, tok, cfg).num_target_tokens > 0
    with pytest.raises(RowError, match="system messages are not supported") as e:
        encode_row({"messages": [{"role": "system", "content": "x"}, *ok["messages"]]}, tok, cfg)
    assert e.value.kind == "bad_chat"
