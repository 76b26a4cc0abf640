"""The on-disk shard layout and random access to its rows, over any fsspec filesystem.

A shard directory holds

- `shard-NNNNN.jsonl`: one JSON object per line (UTF-8, `\\n`-terminated),
- `shard-NNNNN.jsonl.idx`: the byte offset of every line start plus the file size, as
  little-endian uint64 (rows + 1 numbers), so row r is bytes [idx[r], idx[r+1]) -- one seek, no
  scan, which is what makes resuming at a late position as cheap as at an early one,
- `manifest.json`: shards in order with rows, bytes, sha256 and rows that are not a JSON
  object, plus the schema and the counts of what `data.prepare` removed.

Rows are addressed by a global row id: the row's position when all shards are concatenated in
manifest order. It does not depend on epoch, rank or world size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from data.rows import decode_row
from data.templates import RowError

MANIFEST_NAME = "manifest.json"
INDEX_SUFFIX = ".idx"
MANIFEST_VERSION = 1

log = logging.getLogger(__name__)


class ShardUnreadable(OSError):
    """A shard (or its index) listed in the manifest cannot be read."""


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the shard directory
    rows: int
    bytes: int
    sha256: str
    invalid_rows: int  # lines that are not a UTF-8 JSON object (found when indexing)


def line_offsets(data: bytes) -> np.ndarray:
    """Start offset of every line plus len(data); a last line without `\\n` is a row too."""
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n")) + 1
    starts = np.concatenate([[0], ends]).astype("<u8")
    if len(data) and data[-1:] != b"\n":
        starts = np.concatenate([starts, [len(data)]]).astype("<u8")
    return starts


def _is_json_object(line: bytes) -> bool:
    try:
        decode_row(line)
    except RowError:
        return False
    return True


def index_shard(fs: fsspec.AbstractFileSystem, path: str) -> tuple[ShardInfo, bytes]:
    """Read one JSONL shard; return its manifest entry (file = basename) and its index bytes."""
    data = fs.cat_file(path)
    offsets = line_offsets(data)
    invalid = sum(
        not _is_json_object(data[offsets[i] : offsets[i + 1]]) for i in range(len(offsets) - 1)
    )
    info = ShardInfo(
        file=path.rstrip("/").rsplit("/", 1)[-1],
        rows=len(offsets) - 1,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        invalid_rows=int(invalid),
    )
    return info, offsets.tobytes()


def write_manifest(
    fs: fsspec.AbstractFileSystem,
    root: str,
    shards: Iterable[ShardInfo],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `manifest.json` under `root` (deterministic bytes: sorted keys, no timestamps)."""
    shards = list(shards)
    manifest = {
        "version": MANIFEST_VERSION,
        "format": "jsonl",
        "total_rows": sum(s.rows for s in shards),
        "total_bytes": sum(s.bytes for s in shards),
        "shards": [s.__dict__ for s in shards],
        **(extra or {}),
    }
    with fs.open(f"{root}/{MANIFEST_NAME}", "wb") as f:
        f.write((json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def index_shards(directory: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Index the `*.jsonl` files already in `directory` (sorted by name) and write their `.idx`
    files and a manifest. For shards written by other tools; `data.prepare` does this itself."""
    fs, root = fsspec.core.url_to_fs(directory, **(storage_options or {}))
    root = root.rstrip("/")
    infos = []
    for path in sorted(fs.glob(f"{root}/*.jsonl")):
        info, index = index_shard(fs, path)
        fs.pipe_file(path + INDEX_SUFFIX, index)
        infos.append(info)
    return write_manifest(fs, root, infos, {"source": "index_shards"})


def find_manifest(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether `url` is a shard directory (or a manifest.json) that can be streamed."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if path.endswith(MANIFEST_NAME):
            return fs.isfile(path)
        return fs.isfile(f"{path.rstrip('/')}/{MANIFEST_NAME}")
    except (OSError, ValueError, ImportError):
        return False


class ShardSet:
    """The shards of one manifest, with random access to raw row bytes.

    Picklable (DataLoader workers get a copy); open files and loaded indexes are per process and
    bounded in number, so memory does not grow with the dataset.
    """

    MAX_OPEN_FILES = 4
    MAX_INDEXES = 8

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        path = path.rstrip("/")
        if path.endswith(MANIFEST_NAME):
            path = path[: -len(MANIFEST_NAME)].rstrip("/")
        self.root = path
        manifest_path = f"{path}/{MANIFEST_NAME}"
        try:
            manifest = json.loads(self.fs.cat_file(manifest_path))
        except FileNotFoundError:
            raise ShardUnreadable(
                f"{url}: no {MANIFEST_NAME} (write one with data.prepare)"
            ) from None
        except (OSError, ValueError) as e:
            raise ShardUnreadable(f"{manifest_path}: unreadable manifest ({e})") from None
        if manifest.get("version") != MANIFEST_VERSION:
            raise ShardUnreadable(
                f"{manifest_path}: manifest version {manifest.get('version')!r}, "
                f"expected {MANIFEST_VERSION}"
            )
        self.manifest = manifest
        self.shards = [ShardInfo(**s) for s in manifest["shards"]]
        self.rows_per_shard = np.array([s.rows for s in self.shards], dtype=np.int64)
        # first global row id of each shard (manifest order)
        self.first_row = np.concatenate([[0], np.cumsum(self.rows_per_shard)]).astype(np.int64)
        self.num_rows = int(self.first_row[-1])
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._indexes: OrderedDict[int, np.ndarray] = OrderedDict()
        self._check_files()

    def _check_files(self) -> None:
        """Every shard and index the manifest lists must exist with the size it implies.

        A missing shard would otherwise show only when (and if) its rows come up, as skipped
        rows, and a run could quietly train on part of its data. One listing of the directory
        gives every size; a file it does not show (a listing some filesystems cannot give, a
        shard in a subdirectory) costs one `info` call. Sizes only: hashing is data.prepare's.
        """
        try:
            listing = {
                str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e.get("size")
                for e in self.fs.ls(self.root, detail=True)
            }
        except (OSError, ValueError, NotImplementedError):
            listing = {}
        for shard, info in enumerate(self.shards):
            for path, expected in (
                (self.path(shard), info.bytes),
                (self.path(shard) + INDEX_SUFFIX, 8 * (info.rows + 1)),
            ):
                name = info.file + path[len(self.path(shard)) :]
                size = listing.get(name) if "/" not in name else None
                if size is None:
                    size = self._size(path)
                if size is not None and size != expected:
                    raise ShardUnreadable(
                        f"{self._display(path)}: {size} bytes, {MANIFEST_NAME} says {expected} "
                        "(changed after it was written? re-run data.prepare)"
                    )

    def _size(self, path: str) -> int | None:
        try:
            return self.fs.info(path).get("size")
        except FileNotFoundError:
            raise ShardUnreadable(
                f"{self._display(path)}: listed in {MANIFEST_NAME} but missing"
            ) from None
        except OSError as e:
            raise ShardUnreadable(
                f"{self._display(path)}: unreadable ({type(e).__name__}: {e})"
            ) from None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        state["_indexes"] = OrderedDict()
        return state

    def path(self, shard: int) -> str:
        """The shard's full path, as error messages name it."""
        return f"{self.root}/{self.shards[shard].file}"

    def display_path(self, shard: int) -> str:
        return self._display(self.path(shard))

    def _display(self, path: str) -> str:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    def _index(self, shard: int) -> np.ndarray:
        idx = self._indexes.get(shard)
        if idx is None:
            try:
                idx = np.frombuffer(self.fs.cat_file(self.path(shard) + INDEX_SUFFIX), dtype="<u8")
            except OSError as e:
                raise ShardUnreadable(f"index unreadable ({type(e).__name__})") from None
            if len(idx) != self.shards[shard].rows + 1:
                raise ShardUnreadable(
                    f"index has {len(idx) - 1} rows, manifest says {self.shards[shard].rows}"
                )
            self._indexes[shard] = idx
            if len(self._indexes) > self.MAX_INDEXES:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(shard)
        return idx

    def _file(self, shard: int) -> Any:
        f = self._files.get(shard)
        if f is None:
            try:
                f = self.fs.open(self.path(shard), "rb")
            except OSError as e:
                raise ShardUnreadable(f"file unreadable ({type(e).__name__})") from None
            self._files[shard] = f
            if len(self._files) > self.MAX_OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return f

    def read_row(self, shard: int, row: int) -> bytes:
        """The raw bytes of one row (without the newline); ShardUnreadable if it can't be read."""
        idx = self._index(shard)
        start, end = int(idx[row]), int(idx[row + 1])
        f = self._file(shard)
        try:
            f.seek(start)
            data = f.read(end - start)
        except OSError as e:
            raise ShardUnreadable(f"read failed ({type(e).__name__})") from None
        if len(data) != end - start:
            raise ShardUnreadable("file is shorter than its index (changed after indexing?)")
        return data.rstrip(b"\n")

    def locate(self, row_id: int) -> tuple[int, int]:
        """Global row id -> (shard, row in shard)."""
        shard = int(np.searchsorted(self.first_row, row_id, side="right")) - 1
        return shard, row_id - int(self.first_row[shard])

    def iter_rows(self) -> Iterable[tuple[int, int, bytes]]:
        """All rows in manifest order as (shard, row, bytes), reading each shard whole; for small
        sets (eval) and tools. Unreadable shards raise ShardUnreadable."""
        for shard, info in enumerate(self.shards):
            if info.rows == 0:
                continue
            try:
                data = self.fs.cat_file(self.path(shard))
            except OSError as e:
                raise ShardUnreadable(f"{self.display_path(shard)}: unreadable ({e})") from None
            offsets = line_offsets(data)
            for r in range(len(offsets) - 1):
                yield shard, r, data[offsets[r] : offsets[r + 1]].rstrip(b"\n")
