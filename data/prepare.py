"""Write training shards: `python -m data.prepare --input PATH_OR_GLOB --output DIR`.

Reads JSONL, JSON (an array of objects), Parquet, CSV or a `datasets` dataset saved with
`save_to_disk` (`arrow`), optionally drops exact duplicates (sha256 of the normalized text) and rows
outside a character-length range, and writes JSONL shards with a byte-offset index each plus
`manifest.json` (see data.shards). Output bytes depend only on the input rows and the options, so
re-running on the same input gives byte-identical shards and manifest.

`--shard-size` is bytes (`64MB`, `1GiB`, `500000`) or rows (`10000rows`). `--index-only DIR`
indexes JSONL shards written by another tool instead.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from tqdm import tqdm

from data.rows import decode_row, unencodable
from data.shards import INDEX_SUFFIX, MANIFEST_NAME, ShardInfo, index_shards, write_manifest
from data.templates import RowError

log = logging.getLogger("data.prepare")

INPUT_FORMATS = ("jsonl", "json", "parquet", "csv", "arrow")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
LOG_EVERY_ROWS = 100_000


class PrepareError(ValueError):
    """Bad arguments or input; the message names the option or file (and line)."""


@dataclass(frozen=True)
class ShardSize:
    bytes: int | None = None
    rows: int | None = None


def parse_shard_size(text: str) -> ShardSize:
    """`64MB` / `1GiB` / `500000` (bytes) or `10000rows`."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m and unit in ("rows", "row"):
        size = ShardSize(rows=int(m.group(1)))
    elif m and unit in _UNITS:
        size = ShardSize(bytes=int(m.group(1)) * _UNITS[unit])
    else:
        raise PrepareError(f"--shard-size: {text!r} is not a size like 64MB, 1GiB or 10000rows")
    if (size.rows or size.bytes or 0) <= 0:
        raise PrepareError("--shard-size: must be positive")
    return size


# ---------------------------------------------------------------------------------------------
# Input


@dataclass
class InputRow:
    source: str
    line: int  # 1-based line (jsonl, csv: where the record starts) or element number (json)
    row: Any  # a dict when valid
    error: str | None = None
    kind: str = ""  # with error: invalid_utf8, invalid_json, invalid_unicode, not_object


# How an undecodable row's kind reads in messages.
_KIND_TEXT = {
    "invalid_utf8": "invalid UTF-8",
    "invalid_json": "invalid JSON",
    "invalid_unicode": "invalid Unicode",
    "not_object": "not a JSON object",
}


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _bad(source: str, line: int, kind: str, message: str) -> InputRow:
    return InputRow(source, line, None, f"{_KIND_TEXT[kind]} ({message})", kind)


def resolve_inputs(pattern: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, path = fsspec.core.url_to_fs(pattern)
    paths = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
    paths = [p for p in paths if fs.exists(p)]
    if not paths:
        raise PrepareError(f"--input: nothing matches {pattern!r}")
    return fs, paths


def guess_format(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if fs.isdir(path):
        return "arrow"
    for ext, fmt in _EXTENSIONS.items():
        if path.endswith(ext):
            return fmt
    raise PrepareError(f"--format: cannot tell the format of {path}; pass one of {INPUT_FORMATS}")


def read_rows(fs: fsspec.AbstractFileSystem, path: str, fmt: str) -> Iterator[InputRow]:
    """Rows of one input file in file order; undecodable rows come with `error` set."""
    if fmt == "jsonl":
        with fs.open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = decode_row(line.rstrip(b"\n"))
                except RowError as e:
                    yield _bad(path, line_no, e.kind, str(e))
                    continue
                yield InputRow(path, line_no, row)
    elif fmt == "json":
        with fs.open(path, "rb") as f:
            raw = f.read()
        # Invalid bytes spoil the rows that hold them, not the document: decoded as surrogate
        # escapes, they are found per row below. A BOM is not part of the text (utf-8-sig).
        try:
            text, bad_bytes = raw.decode("utf-8-sig"), False
        except UnicodeDecodeError:
            text, bad_bytes = raw.decode("utf-8-sig", errors="surrogateescape"), True
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}: not a JSON document ({e})") from None
        if (
            isinstance(data, dict)
            and len(data) == 1
            and isinstance(next(iter(data.values())), list)
        ):
            data = next(iter(data.values()))  # {"data": [...]} style
        if not isinstance(data, list):
            raise PrepareError(f"{path}: expected a JSON array of objects")
        for i, row in enumerate(data, 1):
            # U+DC80..U+DCFF are what surrogateescape makes of invalid bytes (other lone
            # surrogates are escapes in the JSON text: invalid_unicode, found in prepare()).
            if bad_bytes and _ESCAPED_BYTE.search(json.dumps(row, ensure_ascii=False)):
                yield _bad(path, i, "invalid_utf8", "holds bytes that are not UTF-8")
            else:
                yield InputRow(path, i, row)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            line_no = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    line_no += 1
                    yield InputRow(path, line_no, row)
    elif fmt == "csv":
        with fs.open(path, "rb") as f:
            # utf-8-sig: a BOM would otherwise become part of the first column's name. Invalid
            # bytes become surrogate escapes, so only the rows holding them are lost.
            text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
            reader = csv.DictReader(text)
            if unencodable(list(reader.fieldnames or [])) is not None:
                raise PrepareError(f"{path}:1: the header is not UTF-8")
            start = reader.line_num + 1  # records may span lines; report where one starts
            for row in reader:
                where = unencodable(row)
                if where is not None:
                    yield _bad(
                        path, start, "invalid_utf8", f"{where} holds bytes that are not UTF-8"
                    )
                else:
                    yield InputRow(path, start, dict(row))
                start = reader.line_num + 1
    elif fmt == "arrow":
        import datasets

        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            raise PrepareError(
                f"{path}: a DatasetDict with splits {list(ds)}; pass one split's directory"
            )
        line_no = 0
        for batch in ds.iter(batch_size=4096):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                line_no += 1
                yield InputRow(path, line_no, dict(zip(columns, values, strict=True)))
    else:
        raise PrepareError(f"--format: {fmt!r} is not one of {INPUT_FORMATS}")


# ---------------------------------------------------------------------------------------------
# Filters


def row_text(row: dict[str, Any], fields: list[str] | None) -> str:
    """The text that de-dup and length filters look at: the named fields, or every field but
    `id` (ids are unique by design and would defeat de-dup)."""
    keys = fields if fields is not None else sorted(k for k in row if k != "id")
    parts = []
    for k in keys:
        v = row.get(k)
        if v is None:
            continue
        parts.append(v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False))
    return "\n".join(parts)


def normalize(text: str) -> str:
    """Case, Unicode form and whitespace runs do not make two texts different."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


# ---------------------------------------------------------------------------------------------
# Output


@dataclass
class ShardWriter:
    fs: fsspec.AbstractFileSystem
    root: str
    size: ShardSize
    shards: list[ShardInfo] = field(default_factory=list)
    _buf: bytearray = field(default_factory=bytearray)
    _offsets: list[int] = field(default_factory=list)

    def add(self, line: bytes) -> None:
        self._offsets.append(len(self._buf))
        self._buf += line
        full = (
            len(self._offsets) >= self.size.rows
            if self.size.rows
            else len(self._buf) >= (self.size.bytes or 0)
        )
        if full:
            self.flush()

    def flush(self) -> None:
        # A shard is buffered in memory until written: --shard-size bounds the memory use.
        if not self._offsets:
            return
        name = f"shard-{len(self.shards):05d}.jsonl"
        data = bytes(self._buf)
        offsets = np.array([*self._offsets, len(data)], dtype="<u8")
        self.fs.pipe_file(f"{self.root}/{name}", data)
        self.fs.pipe_file(f"{self.root}/{name}{INDEX_SUFFIX}", offsets.tobytes())
        self.shards.append(
            ShardInfo(name, len(self._offsets), len(data), hashlib.sha256(data).hexdigest(), 0)
        )
        self._buf = bytearray()
        self._offsets = []


def _json_type(value: Any) -> str:
    return {
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(value), "string")


def prepare(
    input_pattern: str,
    output: str,
    *,
    input_format: str | None = None,
    shard_size: str = "64MB",
    dedup: bool = False,
    text_fields: list[str] | None = None,
    min_chars: int | None = None,
    max_chars: int | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Convert the input into shards under `output`; return the manifest written."""
    size = parse_shard_size(shard_size)
    in_fs, paths = resolve_inputs(input_pattern)
    out_fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    out_fs.makedirs(root, exist_ok=True)
    # Old shards would otherwise survive next to a smaller new set.
    for old in out_fs.glob(f"{root}/shard-*.jsonl*") + out_fs.glob(f"{root}/{MANIFEST_NAME}"):
        out_fs.rm(old)
    writer = ShardWriter(out_fs, root, size)
    counts: Counter = Counter()
    schema: dict[str, set[str]] = {}
    seen: set[bytes] = set()
    interactive = sys.stderr.isatty()
    bar = tqdm(unit=" rows", desc="prepare", disable=not interactive)
    for path in paths:
        fmt = input_format or guess_format(in_fs, path)
        for item in read_rows(in_fs, path, fmt):
            counts["input_rows"] += 1
            bar.update()
            if not interactive and counts["input_rows"] % LOG_EVERY_ROWS == 0:
                log.info(
                    "prepare: %d rows read, %d shards written",
                    counts["input_rows"],
                    len(writer.shards),
                )
            if item.error is None and not isinstance(item.row, dict):
                item = _bad(item.source, item.line, "not_object", f"got {type(item.row).__name__}")
            row = item.row
            if item.error is None:
                # Serialized before the filters so that a row that cannot be written never
                # enters the de-dup set.
                line = json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str)
                try:
                    encoded = (line + "\n").encode("utf-8")
                except UnicodeEncodeError:
                    where = unencodable(row) or "a value"
                    message = f"{where} is a lone surrogate, which UTF-8 cannot encode"
                    item = _bad(item.source, item.line, "invalid_unicode", message)
            if item.error is not None:
                if strict:
                    raise PrepareError(f"{item.source}:{item.line}: {item.error}")
                counts["invalid_input_rows"] += 1
                counts[f"skipped_{item.kind}"] += 1
                log.warning("%s:%d: skipped: %s", item.source, item.line, item.error)
                continue
            if min_chars is not None or max_chars is not None or dedup:
                text = row_text(row, text_fields)
                if min_chars is not None and len(text) < min_chars:
                    counts["removed_too_short"] += 1
                    continue
                if max_chars is not None and len(text) > max_chars:
                    counts["removed_too_long"] += 1
                    continue
                if dedup:
                    digest = hashlib.sha256(normalize(text).encode()).digest()[:16]
                    if digest in seen:
                        counts["removed_duplicates"] += 1
                        continue
                    seen.add(digest)
            for k, v in row.items():
                schema.setdefault(k, set()).add(_json_type(v))
            writer.add(encoded)
            counts["written_rows"] += 1
    writer.flush()
    bar.close()
    for key in (
        "invalid_input_rows",
        "removed_duplicates",
        "removed_too_short",
        "removed_too_long",
    ):
        counts.setdefault(key, 0)
    manifest = write_manifest(
        out_fs,
        root,
        writer.shards,
        {
            "schema": {k: sorted(v) for k, v in sorted(schema.items())},
            "counts": dict(sorted(counts.items())),
            "options": {
                "dedup": dedup,
                "text_fields": text_fields,
                "min_chars": min_chars,
                "max_chars": max_chars,
                "shard_size": shard_size,
            },
        },
    )
    log.info(
        "prepare: %d rows -> %d rows in %d shards under %s (%s)",
        counts["input_rows"],
        counts["written_rows"],
        len(writer.shards),
        output,
        ", ".join(
            f"{k}={counts[k]}"
            for k in sorted(counts)
            if k.startswith(("removed", "invalid", "skipped"))
        ),
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--input", help="input file, glob or fsspec URL")
    p.add_argument("--output", help="shard directory (or fsspec URL) to write")
    p.add_argument("--format", choices=INPUT_FORMATS, help="input format (default: from extension)")
    p.add_argument("--shard-size", default="64MB", help="bytes (64MB, 1GiB) or rows (10000rows)")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicates of normalized text")
    p.add_argument(
        "--text-fields", help="comma-separated fields for de-dup/length (default: all but id)"
    )
    p.add_argument("--min-chars", type=int, help="drop rows whose text is shorter")
    p.add_argument("--max-chars", type=int, help="drop rows whose text is longer")
    p.add_argument("--strict", action="store_true", help="stop at the first undecodable input row")
    p.add_argument("--index-only", metavar="DIR", help="index existing *.jsonl shards in DIR")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.index_only:
            manifest = index_shards(args.index_only)
            log.info("indexed %d shards, %d rows", len(manifest["shards"]), manifest["total_rows"])
            return 0
        if not args.input or not args.output:
            p.error("--input and --output are required (or --index-only DIR)")
        prepare(
            args.input,
            args.output,
            input_format=args.format,
            shard_size=args.shard_size,
            dedup=args.dedup,
            text_fields=args.text_fields.split(",") if args.text_fields else None,
            min_chars=args.min_chars,
            max_chars=args.max_chars,
            strict=args.strict,
        )
    except (PrepareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
