"""One raw row -> a JSON object, and the bad-row policy (`data.bad_rows`, `data.max_bad_fraction`)
shared by every reader: shard streams, map-style JSONL files and the eval set.

A row that cannot be used is a `RowError` with a kind, counted as `skipped_<kind>`:
`invalid_utf8`, `invalid_json`, `invalid_unicode` (a `\\ud800`-style escape: a lone surrogate,
which JSON allows but UTF-8, and so every tokenizer, cannot encode), `not_object`, and the
kinds `data.templates.encode_row` finds (`missing_field`, `wrong_type`, `empty_text`,
`bad_chat`). A UTF-8 byte order mark at the start of a row is accepted (every Windows export
starts its file with one).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from typing import Any

from data.templates import RowError

BOM = "\ufeff"
# A worker checks `max_bad_fraction` once it has read this many rows (and at its last batch), so
# one bad row among the first few does not stop a run.
BAD_FRACTION_MIN_ROWS = 100
MAX_LOGGED_BAD_ROWS = 20
# Every row read so far bad stops a reader once that is this unlikely (1e-6) for data whose bad
# share is exactly `max_bad_fraction`: after 4 rows at the default 0.01, 20 at 0.5. Without it a
# short run on data that is all bad (wrong field names) finished "successfully" on nothing.
ALL_BAD_PROBABILITY = 1e-6
ALL_BAD_MIN_ROWS = 4

# `\uD800`..`\uDFFF` escapes: the only way a lone surrogate gets into a row decoded from valid
# UTF-8, so only rows whose text has one need the full check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class DataError(ValueError):
    """Bad input data or data settings; the message is one line naming the file and line or the
    config key. Importable as `data.loader.DataError`."""


def unencodable(value: Any, where: str = "row") -> str | None:
    """Where in `value` (a decoded JSON value) the first string UTF-8 cannot encode is, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{where} (U+{ord(value[e.start]):04X} at character {e.start})"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if unencodable(k) is not None:
                return f"a key of {where}"
            found = unencodable(v, f"field {k!r}" if where == "row" else f"{where}[{k!r}]")
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = unencodable(v, f"{where}[{i}]")
            if found:
                return found
    return None


def decode_row(data: bytes) -> dict[str, Any]:
    """One JSONL line (without its newline) -> a JSON object; RowError for anything else."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError("invalid_utf8", f"byte {e.start} is not UTF-8") from None
    if text.startswith(BOM):
        text = text[1:]
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError("invalid_json", e.msg) from None
    if not isinstance(row, dict):
        raise RowError("not_object", f"expected a JSON object, got {type(row).__name__}")
    if _SURROGATE_ESCAPE.search(text):
        where = unencodable(row)
        if where is not None:
            raise RowError(
                "invalid_unicode", f"{where} is a lone surrogate, which UTF-8 cannot encode"
            )
    return row


class BadRows:
    """Applies `data.bad_rows` to the rows one reader (a data worker, a JSONL file) reads.

    strict: the first bad row raises `DataError("path:line: kind: message (data.bad_rows=strict)")`.
    lenient: it is counted in the caller's `stats` (`rows_skipped`, `skipped_<kind>`), logged (the
    first MAX_LOGGED_BAD_ROWS), and `check()` stops the reader once more than `max_bad_fraction`
    of its rows were bad. `too_long` (overlong=drop) is counted the same way but is not bad data.
    """

    def __init__(self, cfg: Any, log: logging.Logger, what: str, *, log_skips: bool = True):
        self.strict = cfg.bad_rows == "strict"
        self.max_fraction = cfg.max_bad_fraction
        self.log, self.what, self.log_skips = log, what, log_skips
        self.num_read = 0
        self.num_bad = 0
        self.kinds: Counter = Counter()
        self.hints: dict[str, str] = {}  # kind -> likely cause (config keys), from its last row
        self.last = ""
        self.logged = 0
        f = self.max_fraction
        self.all_bad_min_rows = (
            ALL_BAD_MIN_ROWS
            if f <= 0
            else math.inf
            if f >= 1
            else max(ALL_BAD_MIN_ROWS, math.ceil(math.log(ALL_BAD_PROBABILITY) / math.log(f)))
        )

    def skip(self, stats: Counter, kind: str, where: str, message: str, hint: str = "") -> None:
        """Count (or, strict, raise for) one unusable row at `where` ("path:line")."""
        if self.strict and kind != "too_long":
            cause = f"; {hint}" if hint else ""
            raise DataError(f"{where}: {kind}: {message}{cause} (data.bad_rows=strict)")
        stats["rows_skipped"] += 1
        stats[f"skipped_{kind}"] += 1
        if kind != "too_long":
            self.num_bad += 1
            self.last = f"{where}: {kind}: {message}"
        self.kinds[kind] += 1
        if hint:
            self.hints[kind] = hint
        if self.log_skips and self.logged < MAX_LOGGED_BAD_ROWS:
            self.logged += 1
            self.log.warning("skipped %s: %s: %s", where, kind, message)
            if self.logged == MAX_LOGGED_BAD_ROWS:
                self.log.warning("further skipped %s are counted, not logged", self.what)

    def check(self, *, last: bool) -> None:
        """Raise DataError if too many rows were bad. Judged from BAD_FRACTION_MIN_ROWS rows on,
        at the reader's `last` batch, and as soon as every row so far was bad for long enough."""
        if self.strict or not self.num_read:
            return
        all_bad = self.num_bad == self.num_read >= self.all_bad_min_rows
        if not (last or all_bad or self.num_read >= BAD_FRACTION_MIN_ROWS):
            return
        fraction = self.num_bad / self.num_read
        if fraction > self.max_fraction:
            raise DataError(
                f"{self.num_bad} of {self.num_read} {self.what} were bad ({fraction:.1%} > "
                f"data.max_bad_fraction={self.max_fraction}): {self.summary()}; last: {self.last}"
            )

    def summary(self) -> str:
        """`kind n, ...` by count, and the likely cause of the commonest kind when known."""
        text = ", ".join(f"{k} {n}" for k, n in self.kinds.most_common())
        top = self.kinds.most_common(1)[0][0] if self.kinds else ""
        if top in self.hints:
            text += f"; likely cause: {self.hints[top]}"
        return text
