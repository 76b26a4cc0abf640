"""The checkpoint format on disk: names, errors, checksums, validation, discovery, RNG state."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.api import CheckpointException

from trainer.dist import DistContext

log = logging.getLogger("fttrain")

# 2: the manifest names its checksum ("hash": "xxh3_128"); 1: sha256, no "hash" key (still read).
FORMAT_VERSION = 2
MARKER = "COMPLETE"
MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
STEP_DIR_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the path and what is wrong."""


class CheckpointSaveError(RuntimeError):
    """Saving failed on some rank; the previous checkpoint is intact."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------
# Agreement between ranks: every phase ends with all ranks knowing whether any rank failed.


def agree(ctx: DistContext, error: str | None, group: Any = None) -> list[str]:
    """All-gather each rank's error (or None); return the errors of all ranks."""
    if not ctx.distributed:
        return [error] if error else []
    gathered: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(gathered, error, group=group)
    return [f"rank {r}: {e}" for r, e in enumerate(gathered) if e]


def describe_error(e: BaseException) -> str:
    """One line: DCP's CheckpointException (a BaseException whose str is a multi-rank
    traceback dump) unwrapped to each failing rank's exception."""
    if isinstance(e, CheckpointException):
        return "; ".join(
            f"{type(exc).__name__}: {exc}" for _rank, (exc, _tb) in sorted(e.failures.items())
        )
    return f"{type(e).__name__}: {e}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# Checksum algorithms by the name a manifest records. xxh3_128 runs at memory speed (reading
# the file is the cost) where sha256 runs at ~0.3-0.8 GB/s; both release the GIL while hashing.
CHECKSUM = "xxh3_128"  # what this code writes
LEGACY_CHECKSUM = "sha256"  # a manifest without "hash" (format 1)
HASHERS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_CHUNK = 1 << 20  # fits in L2: 1 MB reads hashed ~20% faster than 8 MB ones here


def file_digest(path: Path, algorithm: str = CHECKSUM) -> str:
    """The hex checksum of a file, as a manifest records it."""
    h = HASHERS[algorithm]()
    buf = memoryview(bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def files_under(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, MARKER)
    )


def share_of(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """The files `rank` hashes: largest first, each to the rank with the fewest bytes so far,
    so every rank reads about 1/world of the bytes (a round robin over sorted names can give
    every big file to the same ranks: DeepSpeed's model/optim files alternate). Every rank
    computes the same split from the same sizes."""
    load = [0] * world_size
    mine = []
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        load[r] += sizes[rel]
        if r == rank:
            mine.append(rel)
    return mine


def hash_my_share(root: Path, rank: int, world_size: int, algorithm: str) -> dict[str, dict]:
    """Size and checksum of this rank's share of the files under `root` (a save's temp dir)."""
    sizes = {rel: (root / rel).stat().st_size for rel in files_under(root)}
    return {
        rel: {"bytes": sizes[rel], algorithm: file_digest(root / rel, algorithm)}
        for rel in share_of(sizes, rank, world_size)
    }


def in_background(fn: Callable[..., Any], *args: Any) -> Future:
    """Run `fn(*args)` in a daemon thread; its Future. (Not an executor: its worker would keep
    the process alive at exit while it waits on a write that will never finish.)"""
    future: Future = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - CheckpointException is one; handed over
            future.set_exception(e)

    threading.Thread(target=run, name="checkpoint-hash", daemon=True).start()
    return future


# ---------------------------------------------------------------------------------------------
# Validation and discovery.


def validate(path: Path, verify_checksums: bool = True) -> str | None:
    """None when `path` is a complete, intact checkpoint; otherwise the reason it is not. One
    process checks every file; `CheckpointManager` splits the files between its ranks."""
    return validate_share(path, verify_checksums, rank=0, world_size=1)


def validate_share(path: Path, verify_checksums: bool, rank: int, world_size: int) -> str | None:
    """The marker and manifest (every rank: a few KB), then the sizes and checksums of this
    rank's share of the files. None when all of that checks out, else the first problem."""
    if not path.is_dir():
        return "no such directory"
    if not (path / MARKER).is_file():
        return f"no {MARKER} marker (the save did not finish)"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        algorithm = manifest.get("hash", LEGACY_CHECKSUM)
        sizes = {rel: int(meta["bytes"]) for rel, meta in files.items()}
        marker_ok = (path / MARKER).read_text().strip() == file_digest(path / MANIFEST, "sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    if not marker_ok:
        return f"{MARKER} does not match {MANIFEST}"
    if algorithm not in HASHERS:
        return f"{MANIFEST} uses checksum {algorithm!r}, unknown here (written by a newer fttrain?)"
    mine = share_of(sizes, rank, world_size)
    for rel in mine:  # sizes first: a truncated file is found without hashing anything
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != sizes[rel]:
            return f"{rel} has {f.stat().st_size} bytes, manifest says {sizes[rel]} (truncated?)"
    if not verify_checksums:
        return None
    for rel in mine:
        expected = files[rel].get(algorithm)
        if expected is None:
            return f"{MANIFEST} has no {algorithm} checksum for {rel}"
        try:
            actual = file_digest(path / rel, algorithm)
        except OSError as e:
            return f"{rel} cannot be read ({e})"
        if actual != expected:
            return f"{rel} fails its {algorithm} checksum (corrupted)"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Published-name checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR_NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def pointer_notes(root: Path) -> list[str]:
    """What is wrong with `latest`, if anything (it is advisory: resume scans)."""
    pointer = root / LATEST
    if not pointer.exists():
        return []
    target = pointer.read_text().strip()
    if not target:
        return [f"{pointer} is empty; scanning {root}"]
    if not (root / target).is_dir():
        return [f"{pointer} names {target}, which does not exist; scanning {root}"]
    return []


def find_latest_valid(root: Path, verify_checksums: bool = True) -> tuple[Path | None, list[str]]:
    """The newest valid checkpoint under `root`, and a note per newer one passed over."""
    notes = pointer_notes(root)
    for _, path in list_checkpoints(root):
        reason = validate(path, verify_checksums)
        if reason is None:
            return path, notes
        notes.append(f"skipping {path}: {reason}")
    return None, notes


# ---------------------------------------------------------------------------------------------
# RNG state, as JSON (no pickles).


def capture_rng() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def versions() -> dict[str, str]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "format": str(FORMAT_VERSION),
    }


def saved_labels(checkpoints: Path, resume: str) -> list[str] | None:
    """The classifier labels (data.labels, in id order) of the checkpoint a run with
    `checkpoint.resume=resume` would start from: the newest one under `checkpoints` that has its
    config.yaml (auto), or the one named. None for a fresh start or a config without labels.
    Read before the checkpoint is validated: only the config file is looked at."""
    import yaml

    if resume == "never":
        return None
    if resume == "auto":
        candidates = [path for _, path in list_checkpoints(checkpoints)]
    else:
        candidates = [Path(resume)]
    for path in candidates:
        try:
            saved = yaml.safe_load((path / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(saved, dict) or not isinstance(saved.get("data"), dict | None):
            continue  # not a config this trainer wrote
        labels = (saved.get("data") or {}).get("labels")
        return [str(x) for x in labels] if labels else None
    return None
