"""Data that would train (or evaluate) on nothing stops with an error naming the cause: rows whose
fields do not match `data.*_field`, the wrong `data.format`, shards missing from disk, an empty or
all-bad eval set, missing files, a `seq_len` that leaves no target token."""

from __future__ import annotations

import pytest

from data.build import build_eval_dataset, build_train_batches
from data.config import DataConfig
from data.loader import DataError
from data.prepare import prepare
from data.rows import BadRows
from data.shards import index_shards
from data.synthetic import write_jsonl
from data.templates import RowError, encode_row
from tests.data_fixtures import char_tokenizer, config, make_shards, map_style, stream, take

PROMPT_COMPLETION = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(200)]
KEYS_HINT = (
    "likely cause: rows have keys ['completion', 'prompt'] but "
    "data.instruction_field='instruction' / data.response_field='response'"
)
CHAT_HINT = (
    "likely cause: data.format=chat needs data.messages_field='messages' (a list of messages), "
    "but rows have keys ['context', 'id', 'instruction', 'response', 'task'] "
    "(instruction rows? data.format=instruction)"
)


def prepared(tmp_path, rows):
    src = write_jsonl(rows, tmp_path / "train.jsonl")
    prepare(str(src), str(tmp_path / "shards"), shard_size="50rows")
    return src, tmp_path / "shards"


# ---------------------------------------------------------------------------------------------
# every row skipped


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_of_unmatched_fields_stops_at_the_first_step_naming_the_keys(tmp_path, num_workers):
    """configs/tiny.yaml's batches (4 x 2) and 6 steps: less than the 100 rows a worker read
    before the fraction was ever checked, so such a run used to finish on nothing."""
    _, shards = prepared(tmp_path, PROMPT_COMPLETION)
    s = stream(config(shards, num_workers=num_workers), micro_batch_size=4, grad_accum_steps=2)
    with pytest.raises(DataError) as e:
        next(iter(s))
    msg = str(e.value)
    assert msg.startswith("4 of 4 rows read by a data worker were bad (100.0% > ")
    assert f"missing_field 4; {KEYS_HINT}; last: {shards}/shard-0000" in msg
    assert "\n" not in msg


@pytest.mark.timeout(60)
def test_stream_with_chat_format_on_instruction_rows_names_the_format(tmp_path):
    shards = make_shards(tmp_path, 100, 50)
    s = stream(config(shards, format="chat"), micro_batch_size=4, grad_accum_steps=2)
    with pytest.raises(DataError, match=r"data\.max_bad_fraction=0\.01\): missing_field 4; ") as e:
        next(iter(s))
    assert CHAT_HINT in str(e.value)


def test_map_style_of_unmatched_fields_is_an_error_at_construction(tmp_path):
    src, _ = prepared(tmp_path, PROMPT_COMPLETION)
    with pytest.raises(DataError) as e:
        map_style(config(src, max_bad_fraction=1.0))
    assert str(e.value) == (
        f"data.train_path: none of the 200 rows of {src} can be used: missing_field 200; "
        + KEYS_HINT
    )
    mixed = write_jsonl(
        [{"instruction": "1+1=", "response": "2"}] * 150 + PROMPT_COMPLETION[:50],
        tmp_path / "mixed.jsonl",
    )
    with pytest.raises(DataError) as e:
        map_style(config(mixed))
    assert str(e.value).startswith(
        f"50 of 200 rows of {mixed} were bad (25.0% > data.max_bad_fraction=0.01): "
        f"missing_field 50; {KEYS_HINT}; last: {mixed}:200: missing_field: "
    )


def test_strict_error_names_the_keys_too(tmp_path):
    src, _ = prepared(tmp_path, PROMPT_COMPLETION)
    with pytest.raises(DataError) as e:
        map_style(config(src, bad_rows="strict"))
    assert str(e.value) == (
        f"{src}:1: missing_field: missing field 'instruction'; "
        + KEYS_HINT.removeprefix("likely cause: ")
        + " (data.bad_rows=strict)"
    )


@pytest.mark.parametrize(
    ("fraction", "rows_before_stop"), [(0.01, 4), (0.2, 9), (0.5, 20), (1.0, None)]
)
def test_all_bad_rows_stop_a_reader_once_implausible_for_max_bad_fraction(
    fraction, rows_before_stop
):
    import logging
    from collections import Counter

    bad = BadRows(
        DataConfig(train_path="x", max_bad_fraction=fraction), logging.getLogger("t"), "rows"
    )
    stats: Counter = Counter()
    for n in range(1, 100):
        bad.num_read += 1
        bad.skip(stats, "missing_field", f"f:{n}", "missing field 'x'")
        if rows_before_stop is None or n < rows_before_stop:
            bad.check(last=False)
        else:
            with pytest.raises(DataError, match=rf"^{n} of {n} rows were bad"):
                bad.check(last=False)
            break
    assert stats["skipped_missing_field"] == n


def test_seq_len_that_leaves_no_target_token_is_an_error(tmp_path):
    src = write_jsonl([{"instruction": "x" * 30, "response": "y"}] * 8, tmp_path / "t.jsonl")
    with pytest.raises(DataError, match=r"^data\.train_path: no sample .* data\.seq_len=16; raise"):
        map_style(config(src, seq_len=16), micro_batch_size=1, grad_accum_steps=1)


# ---------------------------------------------------------------------------------------------
# missing shards


@pytest.mark.parametrize("bad_rows", ["lenient", "strict"])
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("delete", "listed in manifest.json but missing"),
        ("delete_index", "listed in manifest.json but missing"),
        ("truncate", "bytes, manifest.json says"),
    ],
)
def test_a_listed_shard_missing_or_changed_is_an_error_at_open(tmp_path, bad_rows, damage, message):
    shards = make_shards(tmp_path, 30, 10)
    target = shards / "shard-00001.jsonl"
    if damage == "delete":
        target.unlink()
    elif damage == "delete_index":
        target = shards / "shard-00001.jsonl.idx"
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:-5])
    cfg = config(shards, bad_rows=bad_rows)
    with pytest.raises(DataError, match=rf"^data\.train_path: {target}: .*{message}"):
        stream(cfg)
    with pytest.raises(DataError, match=rf"^data\.eval_path: {target}: .*{message}"):
        build_eval_dataset(config("unused", eval_path=str(shards)), char_tokenizer())


# ---------------------------------------------------------------------------------------------
# empty eval sets, missing files


def test_empty_or_all_bad_eval_set_is_an_error_naming_eval_path(tmp_path):
    tok = char_tokenizer()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=rf"^data\.eval_path: {empty} has no rows$"):
        build_eval_dataset(config("unused", eval_path=str(empty)), tok)

    bad = write_jsonl(PROMPT_COMPLETION[:3], tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"^data\.eval_path: none of the 3 rows .*likely cause"):
        build_eval_dataset(config("unused", eval_path=str(bad), max_bad_fraction=1.0), tok)

    (tmp_path / "no_rows").mkdir()
    (tmp_path / "no_rows" / "a.jsonl").write_bytes(b"")
    index_shards(str(tmp_path / "no_rows"))
    with pytest.raises(DataError, match=r"^data\.eval_path: .*no_rows has no rows$"):
        build_eval_dataset(config("unused", eval_path=str(tmp_path / "no_rows")), tok)


def test_missing_jsonl_files_are_errors_naming_the_key(tmp_path):
    tok = char_tokenizer()
    kwargs = {"rank": 0, "world_size": 1, "micro_batch_size": 1, "grad_accum_steps": 1, "seed": 0}
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match=rf"^data\.train_path: {missing}: no such file$"):
        build_train_batches(config(missing), tok, **kwargs)
    with pytest.raises(DataError, match=rf"^data\.eval_path: {missing}: no such file$"):
        build_eval_dataset(config("unused", eval_path=str(missing)), tok)
    with pytest.raises(DataError, match=r"^data\.eval_path: .* is a directory without manifest"):
        build_eval_dataset(config("unused", eval_path=str(tmp_path)), tok)
    assert take(stream(config(make_shards(tmp_path, 8, 4))), 1)  # an intact set still opens


def test_field_hints_name_the_config_keys_and_the_format_rows_look_like():
    tok = char_tokenizer()
    cases = [
        ({"messages": [{"role": "user", "content": "hi"}]}, {}, "(chat rows? data.format=chat)"),
        (
            {"conv": [{"from": "human", "value": "hi"}]},
            {"format": "chat", "messages_field": "conv"},
            "messages have keys ['from', 'value'] but data.role_key='role' / "
            "data.content_key='content'",
        ),
        (
            {"instruction": "a", "response": "b"},
            {"format": "text"},
            "rows have keys ['instruction', 'response'] but data.text_field='text' "
            "(instruction rows? data.format=instruction)",
        ),
        ({"instruction": "a", "response": None}, {}, ""),  # keys match: the row's fault
    ]
    for row, overrides, hint in cases:
        with pytest.raises(RowError) as e:
            encode_row(row, tok, config("unused", **overrides))
        assert e.value.hint.endswith(hint) if hint else e.value.hint == ""
