"""Sharded, atomic, auto-resumed checkpoints.

Layout under `checkpoint.dir` (default RUN_DIR/checkpoints):

    step_00000100/              a published checkpoint
      engine/                   the engine's sharded state (DCP for DDP, DeepSpeed's own format)
      rank_00000.json ...       per rank: data-pipeline state and RNG states
      trainer.json              counters, format version, versions, world size, model fingerprint
      config.yaml               the resolved run config
      manifest.json             every file above with its size and checksum (xxh3_128)
      COMPLETE                  the completion marker, written after the manifest
    latest                      name of the newest published checkpoint, updated last
    .tmp-step_00000200/         a save in progress (or one that died): never chosen

Publishing: every rank writes its own part into the temporary directory; after all ranks are
done, the files are hashed in parallel (each rank a share of the bytes; during an async save in
the background, not on the training thread), rank 0 writes the manifest and the marker, renames
the directory to its final name (atomic on one filesystem) and then replaces `latest`. Any
failure on any rank makes every rank raise `CheckpointSaveError`; published checkpoints are
never touched, so the previous one stays intact.

Resume (`checkpoint.resume: auto`): the newest checkpoint whose marker, manifest, sizes and
checksums all check out, verified by all ranks together (each a share of the files); newer
ones that do not are reported with the reason.

Checksums: xxh3_128 (format 2, recorded as the manifest's "hash"); a manifest without "hash"
(format 1) holds sha256 checksums and is still read. The marker is always the sha256 of the
manifest (a few KB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.api import CheckpointException

from trainer.dist import DistContext, mark_collective

log = logging.getLogger("fttrain")

# 2: the manifest names its checksum ("hash": "xxh3_128"); 1: sha256, no "hash" key (still read).
FORMAT_VERSION = 2
MARKER = "COMPLETE"
MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the path and what is wrong."""


class CheckpointSaveError(RuntimeError):
    """Saving failed on some rank; the previous checkpoint is intact."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------
# Agreement between ranks: every phase ends with all ranks knowing whether any rank failed.


def _agree(ctx: DistContext, error: str | None, group: Any = None) -> list[str]:
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# Checksum algorithms by the name a manifest records. xxh3_128 runs at memory speed (reading
# the file is the cost) where sha256 runs at ~0.3-0.8 GB/s; both release the GIL while hashing.
CHECKSUM = "xxh3_128"  # what this code writes
LEGACY_CHECKSUM = "sha256"  # a manifest without "hash" (format 1)
_HASHERS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_CHUNK = 1 << 20  # fits in L2: 1 MB reads hashed ~20% faster than 8 MB ones here


def file_digest(path: Path, algorithm: str = CHECKSUM) -> str:
    """The hex checksum of a file, as a manifest records it."""
    h = _HASHERS[algorithm]()
    buf = memoryview(bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def _files_under(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, MARKER)
    )


def _share(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
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


def _hash_my_share(root: Path, rank: int, world_size: int, algorithm: str) -> dict[str, dict]:
    """Size and checksum of this rank's share of the files under `root` (a save's temp dir)."""
    sizes = {rel: (root / rel).stat().st_size for rel in _files_under(root)}
    return {
        rel: {"bytes": sizes[rel], algorithm: file_digest(root / rel, algorithm)}
        for rel in _share(sizes, rank, world_size)
    }


def _in_background(fn: Callable[..., Any], *args: Any) -> Future:
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
    return _validate_share(path, verify_checksums, rank=0, world_size=1)


def _validate_share(path: Path, verify_checksums: bool, rank: int, world_size: int) -> str | None:
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
    if algorithm not in _HASHERS:
        return f"{MANIFEST} uses checksum {algorithm!r}, unknown here (written by a newer fttrain?)"
    mine = _share(sizes, rank, world_size)
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
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def _pointer_notes(root: Path) -> list[str]:
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
    notes = _pointer_notes(root)
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


# ---------------------------------------------------------------------------------------------
# The manager.


@dataclass
class _Pending:
    step: int
    tmp: Path
    # An async save: resolves to this rank's share of the manifest once every rank's write is
    # done and this rank has hashed its share (in the background). None for a sync save.
    future: Future | None
    started: float


class CheckpointManager:
    """Saves and finds checkpoints for one run. Every method is collective (all ranks call it)."""

    def __init__(
        self,
        root: Path,
        ctx: DistContext,
        *,
        keep_last: int | None = None,
        verify_checksums: bool = True,
        async_save: bool = False,
        checksum: str = CHECKSUM,
        fault_hook: Callable[[str, int], None] | None = None,
    ):
        if checksum not in _HASHERS:
            raise ValueError(f"unknown checksum {checksum!r}; known: {sorted(_HASHERS)}")
        self.root = Path(root)
        self.ctx = ctx
        self.keep_last = keep_last
        self.verify_checksums = verify_checksums
        self.async_save = async_save
        self.checksum = checksum  # sha256 only to measure what xxh3_128 saves (the benchmark)
        self.pending: _Pending | None = None
        self.last_saved_step: int | None = None
        # Test seam: called with (point, step) at the phases of a save.
        self.fault_hook = fault_hook or (lambda point, step: None)
        # Checkpoint collectives run on their own gloo group so they never interleave with the
        # training loop's. The background writer of an async save gets a group of its own as
        # well: DCP's writer thread runs collectives (gather of write results) while the main
        # thread runs this manager's (`_agree`, `poll`); two threads issuing collectives on one
        # group deadlock (seen: every 2-rank async run hung at its first save). Both take the
        # run's collective timeout (a new group would otherwise get torch's 30 minutes).
        self.group = (
            dist.new_group(backend="gloo", timeout=ctx.timeout) if ctx.distributed else None
        )
        self.async_group = (
            dist.new_group(backend="gloo", timeout=ctx.timeout)
            if ctx.distributed and async_save
            else None
        )
        if ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{TMP_PREFIX}*"):
                log.warning(
                    "removing unfinished checkpoint %s (a save that did not complete)", stale
                )
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()

    def _barrier(self) -> None:
        if self.ctx.distributed:
            dist.barrier(group=self.group)

    def _raise_if_any(self, error: str | None, what: str) -> None:
        errors = _agree(self.ctx, error, self.group)
        if errors:
            raise mark_collective(
                CheckpointSaveError(
                    f"{what} failed; the previous checkpoint is intact. " + "; ".join(errors)
                )
            )

    # -- saving -------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        engine: Any,
        rank_state: dict[str, Any],
        trainer_state: dict[str, Any],
        config_yaml: str,
    ) -> float:
        """Save the state after optimizer step `step`; returns seconds the caller was blocked."""
        started = time.perf_counter()
        self.wait()  # a new save waits for the previous one to be published
        tmp = self.root / f"{TMP_PREFIX}{checkpoint_name(step)}"
        error = None
        if self.ctx.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "engine").mkdir(parents=True)
            except OSError as e:
                error = f"cannot create {tmp}: {e}"
        self._raise_if_any(error, f"checkpoint save at step {step}")

        written = None
        error = None
        try:
            if self.async_save and hasattr(engine, "save_state_async"):
                written = engine.save_state_async(tmp / "engine", self.async_group)
            else:
                engine.save_state(tmp / "engine")
            self.fault_hook("after_engine_state", step)
            _write_file(tmp / f"rank_{self.ctx.rank:05d}.json", json.dumps(rank_state))
            if self.ctx.is_main:
                trainer = {
                    **trainer_state,
                    "format_version": FORMAT_VERSION,
                    "versions": versions(),
                    "world_size": self.ctx.world_size,
                    "step": step,
                }
                _write_file(tmp / "trainer.json", json.dumps(trainer, indent=1))
                _write_file(tmp / "config.yaml", config_yaml)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must hear about it, then all raise
            error = describe_error(e)
        self._raise_if_any(error, f"checkpoint save at step {step} ({tmp})")
        # Only now, with every rank's side files written (the agreement above), may this rank's
        # background hashing list the directory: started earlier, it could miss a side file
        # when the engine write is quick, and ranks would split different lists.
        future = None if written is None else _in_background(self._hash_when_written, written, tmp)
        self.pending = _Pending(step, tmp, future, started)
        if future is None:
            self._publish()
        return time.perf_counter() - started

    def _hash_when_written(self, written: Future, tmp: Path) -> dict[str, dict]:
        """Background: wait for this rank's DCP write, then hash this rank's share of the files.
        Every file is there by then: DCP resolves a rank's future only after the coordinator has
        gathered every rank's write and written `.metadata`, and every rank's side files were
        written before this started."""
        written.result()
        return _hash_my_share(tmp, self.ctx.rank, self.ctx.world_size, self.checksum)

    def poll(self) -> None:
        """Publish a finished async save (cheap when none is pending). Call once per step. The
        hashing is done by then; what runs here is a gather, the manifest and the renames."""
        if self.pending is None or self.pending.future is None:
            return
        done = torch.tensor([1 if self.pending.future.done() else 0])
        if self.ctx.distributed:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.group)
        if int(done.item()):
            self._publish()

    def wait(self) -> None:
        """Block until a pending save is published."""
        if self.pending is not None:
            self._publish()

    def _publish(self) -> None:
        pending, self.pending = self.pending, None
        assert pending is not None
        step, tmp = pending.step, pending.tmp
        error = None
        mine: dict[str, dict] = {}
        if pending.future is not None:
            try:
                mine = pending.future.result()  # written and hashed in the background
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                error = describe_error(e)
            self._raise_if_any(error, f"checkpoint write at step {step} ({tmp})")
        else:
            self._barrier()  # every rank's files are on disk before anyone hashes them
            try:
                mine = _hash_my_share(tmp, self.ctx.rank, self.ctx.world_size, self.checksum)
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                error = describe_error(e)
            self._raise_if_any(error, f"checkpoint manifest at step {step} ({tmp})")
        manifest = self._gather_manifest(mine)
        self.fault_hook("before_marker", step)
        final = self.root / checkpoint_name(step)
        error = None
        if self.ctx.is_main:
            try:
                # A file no rank hashed: ranks listed the directory differently (a filesystem
                # that showed them different views). Never seen; hashed here, and said.
                for rel in _files_under(tmp):
                    if rel not in manifest:
                        log.warning("checkpoint %s: %s was hashed by no rank; hashing it", tmp, rel)
                        manifest[rel] = {
                            "bytes": (tmp / rel).stat().st_size,
                            self.checksum: file_digest(tmp / rel, self.checksum),
                        }
                record = {
                    "step": step,
                    "hash": self.checksum,
                    "files": dict(sorted(manifest.items())),
                }
                _write_file(tmp / MANIFEST, json.dumps(record, indent=1))
                _write_file(tmp / MARKER, file_digest(tmp / MANIFEST, "sha256"))
                if final.exists():  # a stale copy of this step (e.g. a rerun): replace it
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _fsync_dir(self.root)
                self.fault_hook("before_latest", step)
                pointer_tmp = self.root / f"{TMP_PREFIX}{LATEST}"
                _write_file(pointer_tmp, final.name)
                os.replace(pointer_tmp, self.root / LATEST)
                _fsync_dir(self.root)
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                error = describe_error(e)
        self._raise_if_any(error, f"checkpoint publish at step {step} ({final})")
        self.last_saved_step = step
        if self.ctx.is_main:
            log.info("checkpoint saved: %s (%.1fs)", final, time.perf_counter() - pending.started)
            self._prune()
        self._barrier()

    def _gather_manifest(self, mine: dict[str, dict]) -> dict[str, dict]:
        """Every rank's share of the manifest, merged (on every rank)."""
        if not self.ctx.distributed:
            return dict(mine)
        gathered: list[dict] = [{} for _ in range(self.ctx.world_size)]
        dist.all_gather_object(gathered, mine, group=self.group)
        merged: dict[str, dict] = {}
        for part in gathered:
            merged.update(part)
        return merged

    def _prune(self) -> None:
        """Keep the newest `keep_last` valid checkpoints (one rank deletes; never the newest)."""
        if not self.keep_last:
            return
        kept = 0
        for _, path in list_checkpoints(self.root):
            if kept < self.keep_last and validate(path, verify_checksums=False) is None:
                kept += 1
                continue
            if kept == 0:
                continue  # never delete anything newer than the newest valid checkpoint
            log.info("removing old checkpoint %s (checkpoint.keep_last=%d)", path, self.keep_last)
            shutil.rmtree(path, ignore_errors=True)

    # -- resuming -----------------------------------------------------------------------------

    def resolve_resume(self, resume: str) -> Path | None:
        """`never` -> None; `auto` -> newest valid or None; a path -> that checkpoint (or error).
        Rank 0 lists the candidates and moves other lines' checkpoints aside; every candidate is
        verified by all ranks together (each hashes a share of its files), so every rank makes
        the same choice and no rank waits long for the others."""
        if resume == "never":
            self._on_main(lambda: self._set_aside(newer_than=None, why="checkpoint.resume=never"))
            return None
        if resume == "auto":
            return self._latest_valid()
        path = Path(resume)
        if not self._on_main(path.exists):
            raise mark_collective(
                CheckpointError(f"checkpoint.resume={resume}: no such checkpoint")
            )
        reason = self.verify(path)
        if reason:
            raise mark_collective(
                CheckpointError(f"checkpoint.resume={resume}: not a usable checkpoint: {reason}")
            )
        inside = path.resolve().parent == self.root.resolve()
        m = _NAME.match(path.name)
        self._on_main(
            lambda: self._set_aside(
                newer_than=int(m.group(1)) if inside and m else None,
                why=f"checkpoint.resume={resume}",
            )
        )
        return path

    def verify(self, path: Path) -> str | None:
        """`validate(path)`, collectively: each rank checks the sizes and checksums of its share
        of the files (about 1/world of the bytes), and every rank gets the same answer: None, or
        every problem any rank found, each naming its file."""
        try:
            reason = _validate_share(
                path, self.verify_checksums, self.ctx.rank, self.ctx.world_size
            )
        except OSError as e:
            reason = f"cannot be read ({e})"
        if not self.ctx.distributed:
            return reason
        gathered: list[str | None] = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, reason, group=self.group)
        return "; ".join(dict.fromkeys(r for r in gathered if r)) or None

    def _latest_valid(self) -> Path | None:
        """`find_latest_valid`, collectively, logging its notes once."""
        notes, candidates = self._on_main(
            lambda: (_pointer_notes(self.root), [str(p) for _, p in list_checkpoints(self.root)])
        )
        chosen = None
        for candidate in map(Path, candidates):
            reason = self.verify(candidate)
            if reason is None:
                chosen = candidate
                break
            notes.append(f"skipping {candidate}: {reason}")
        if self.ctx.is_main:
            for note in notes:
                log.warning("resume: %s", note)
            if chosen is None:
                log.info("resume: no valid checkpoint under %s; starting from scratch", self.root)
            else:
                log.info("resume: continuing from %s", chosen)
        return chosen

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """`fn()` run on rank 0 (the filesystem's one reader or writer here), its result handed to
        every rank; an OSError there is raised on every rank as a CheckpointError."""
        box: list[Any] = [None]
        if self.ctx.is_main:
            try:
                box[0] = (None, fn())
            except OSError as e:
                box[0] = (f"{self.root}: {describe_error(e)}", None)
        if self.ctx.distributed:
            dist.broadcast_object_list(box, src=0, group=self.group)
        error, value = box[0]
        if error:
            raise mark_collective(CheckpointError(error))
        return value

    def _set_aside(self, newer_than: int | None, why: str) -> None:
        """Move this directory's checkpoints that belong to another line of training (all, or
        those past step `newer_than`) into `superseded-<time>/`: left in place they would be
        replaced by this run's saves of the same step, pruned in favour of them, or picked by
        a later auto-resume. Nothing is deleted."""
        moving = [
            p for step, p in list_checkpoints(self.root) if newer_than is None or step > newer_than
        ]
        if not moving:
            return
        aside = self.root / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(parents=True, exist_ok=True)
        for p in moving:
            os.rename(p, aside / p.name)
        (self.root / LATEST).unlink(missing_ok=True)  # it may name a moved checkpoint
        remaining = list_checkpoints(self.root)
        if remaining:
            _write_file(self.root / LATEST, remaining[0][1].name)
        _fsync_dir(self.root)
        log.warning(
            "%s: moved %d checkpoint(s) of another line of training (newest %s) to %s; "
            "they are not deleted",
            why,
            len(moving),
            moving[0].name,
            aside,
        )


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/trainer.json: unreadable ({e})") from None


def read_rank_state(path: Path, rank: int) -> dict[str, Any]:
    """This rank's saved state; on a larger world than the one that saved, rank 0's."""
    own = path / f"rank_{rank:05d}.json"
    source = own if own.exists() else path / "rank_00000.json"
    try:
        return json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{source}: unreadable ({e})") from None


# ---------------------------------------------------------------------------------------------
# The run's side: restore at start, save every N steps / at the end / when a stop is requested.


def check_compatible(
    saved: dict[str, Any], path: Path, *, fingerprint: dict, method: str, backend: str
) -> None:
    """Raise CheckpointError naming what differs between a checkpoint and this run."""
    fmt = int(saved.get("format_version", 0))
    if fmt > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by a newer format (version {fmt}; this code reads up to "
            f"{FORMAT_VERSION}); upgrade fttrain to resume it"
        )
    if saved.get("method") != method:
        raise CheckpointError(
            f"{path}: saved by a {saved.get('method')!r} run, this run is {method!r} training"
        )
    if saved.get("backend") != backend:
        raise CheckpointError(
            f"{path}: saved with train.backend={saved.get('backend')}, this run uses {backend}"
        )
    theirs = saved.get("model_fingerprint", {})
    if theirs != fingerprint:
        diffs = [
            f"{n}: checkpoint {theirs.get(n)} vs model {fingerprint.get(n)}"
            for n in sorted(set(theirs) | set(fingerprint))
            if theirs.get(n) != fingerprint.get(n)
        ]
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise CheckpointError(f"{path}: model shape differs from this run's model ({shown})")


class _StopRequest:
    """Turns the configured signals into a flag checked at step boundaries. A second SIGINT
    (Ctrl-C pressed again while the save is pending) aborts at once with KeyboardInterrupt."""

    def __init__(self, names: list[str], announce: bool = True):
        import signal

        self.requested = 0
        self.announce = announce  # one rank tells the user; the others would repeat it
        self.previous = {}
        # Ctrl-C always means "save and stop" (twice: abort), whatever stop_signals lists.
        for name in dict.fromkeys([*names, "SIGINT"]):
            sig = getattr(signal, name)
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers that were there before (the run is over)."""
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = signum
            if not self.announce:
                return
            # Signal handlers run between bytecodes of the main thread: logging here is safe.
            log.warning(
                "%s received: saving a checkpoint at the end of this step, then exiting%s",
                signal.Signals(signum).name,
                " (press Ctrl-C again to abort without saving)" if signum == signal.SIGINT else "",
            )


class Checkpointing:
    """Ties a CheckpointManager to one run: what goes into a checkpoint and when."""

    def __init__(
        self,
        cfg: Any,
        ctx: DistContext,
        engine: Any,
        train_batches: Any,
        run_dir: Path,
        *,
        method: str,
        config_yaml: str,
        total_steps: int | None = None,
    ):
        from trainer import faults

        c = cfg.checkpoint
        self.cfg, self.ctx, self.engine, self.data = cfg, ctx, engine, train_batches
        self.method, self.config_yaml = method, config_yaml
        self.every = c.every_steps
        self.save_at_end = c.save_at_end
        self.manager = CheckpointManager(
            Path(c.dir) if c.dir else run_dir / "checkpoints",
            ctx,
            keep_last=c.keep_last,
            verify_checksums=c.verify_checksums,
            async_save=c.async_save,
            fault_hook=lambda point, step: faults.maybe_fail(point, step, ctx.rank),
        )
        self.stop = _StopRequest(c.stop_signals, announce=ctx.is_main)
        self.total_steps = total_steps
        self.blocked_seconds: list[float] = []

    def _fingerprint(self) -> dict:
        from trainer.engine import model_fingerprint

        return model_fingerprint(self.engine.unwrapped_model())

    def restore(self, state: Any) -> Path | None:
        """Load the checkpoint chosen by `checkpoint.resume` into engine, data, RNG and `state`.
        Collective; a problem on any rank is raised on every rank (one message)."""
        path = self.manager.resolve_resume(self.cfg.checkpoint.resume)
        if path is None:
            return None
        saved: dict[str, Any] = {}
        error = None
        try:
            saved = read_trainer_state(path)
            check_compatible(
                saved,
                path,
                fingerprint=self._fingerprint(),
                method=self.method,
                backend=self.cfg.train.backend,
            )
            self._check_progress(saved, path)
        except CheckpointError as e:
            error = str(e)
        self._agree_or_raise(error)
        try:
            self.engine.load_state(path / "engine")
            error = None
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a library error here is the checkpoint's fault
            error = f"{path}/engine: cannot load ({describe_error(e)})"
        self._agree_or_raise(error)
        state.load_state_dict(saved["train_state"])
        data_state = self._data_state(path, saved)
        error, error_cls = None, CheckpointError
        try:
            self.data.load_state_dict(data_state)
        except ValueError as e:  # DataError: the data changed in a way the order cannot follow
            error, error_cls = str(e), type(e)
        self._agree_or_raise(error, error_cls)
        if saved.get("world_size") == self.ctx.world_size:
            restore_rng(read_rank_state(path, self.ctx.rank)["rng"])
        self._apply_changed_settings(path)
        self.manager.last_saved_step = state.step
        if self.ctx.is_main:
            log.info(
                "resumed from %s at step %d (saved by %s ranks)",
                path,
                state.step,
                saved.get("world_size"),
            )
        return path

    def _agree_or_raise(self, error: str | None, cls: type[Exception] = CheckpointError) -> None:
        errors = _agree(self.ctx, error, self.manager.group)
        if errors:
            # All ranks raise the same message; a rank is named when not every rank failed.
            message = error if len(errors) == self.ctx.world_size and error else errors[0]
            raise mark_collective(cls(message))

    def _check_progress(self, saved: dict[str, Any], path: Path) -> None:
        """A checkpoint past this run's last step would silently train nothing."""
        step = int(saved.get("step", saved.get("train_state", {}).get("step", 0)))
        total = self.total_steps
        if total is not None and step > total:
            raise CheckpointError(
                f"{path} is at step {step}, past this run's {total} steps (train.max_steps / "
                f"train.num_epochs): raise train.max_steps above {step} to continue it, or pass "
                "checkpoint.resume=never and another run_dir to start over"
            )

    def _data_state(self, path: Path, saved: dict[str, Any]) -> dict[str, Any]:
        """This rank's data state. On another world size the position is global (every rank
        reads the same one) and the data counters, which are per rank, are handed to rank 0
        summed, so that the run's totals carry on unchanged."""
        state = dict(read_rank_state(path, self.ctx.rank)["data"])
        saved_world = int(saved.get("world_size", self.ctx.world_size))
        if saved_world == self.ctx.world_size:
            return state
        total: dict[str, float] = {}
        if self.ctx.is_main:
            for r in range(saved_world):
                for k, v in read_rank_state(path, r)["data"].get("counters", {}).items():
                    if isinstance(v, (int, float)):
                        total[k] = total.get(k, 0) + v
        state["counters"] = total
        return state

    def _apply_changed_settings(self, path: Path) -> None:
        """Optimizer and schedule settings of THIS run's config win over the checkpoint's (the
        Adam moments are kept); what changed is logged, so a resumed run is never silently
        trained with settings other than the ones its config.yaml records."""
        from trainer.optim import apply_optim_settings, describe_changes

        optimizer = getattr(self.engine, "client_optimizer", None) or self.engine.optimizer
        apply_optim_settings(optimizer, self.engine.scheduler, self.cfg.optim)
        if self.ctx.is_main:
            for change in describe_changes(path / "config.yaml", self.cfg):
                log.warning("resume: %s (the new value applies from here on)", change)

    def save(self, state: Any) -> None:
        blocked = self.manager.save(
            state.step,
            self.engine,
            rank_state={"data": self.data.state_dict(), "rng": capture_rng()},
            trainer_state={
                "train_state": state.state_dict(),
                "method": self.method,
                "backend": self.cfg.train.backend,
                "model_fingerprint": self._fingerprint(),
            },
            config_yaml=self.config_yaml,
        )
        self.blocked_seconds.append(blocked)

    def on_step_end(self, state: Any, result: Any) -> bool:
        """Per-step hook for the loop; returns True when the run should stop (signal)."""
        self.manager.poll()
        # A CPU tensor on the gloo checkpoint group: a small host-side collective per step, no
        # device sync. Any rank's signal stops every rank at the same step.
        stop = torch.tensor([self.stop.requested])
        if self.ctx.distributed:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=self.manager.group)
        if int(stop.item()):
            if self.ctx.is_main:
                log.warning(
                    "stop requested (signal %d): saving at step %d and exiting",
                    int(stop.item()),
                    state.step,
                )
            self.save(state)
            self.manager.wait()
            return True
        if self.every and state.step % self.every == 0:
            self.save(state)
        return False

    def close(self) -> None:
        """Stop listening for stop signals."""
        self.stop.restore()

    def finish(self, state: Any) -> None:
        """Save the final state (unless just saved) and wait for any background write."""
        self.manager.wait()  # an async save of this very step may still be in flight
        if self.save_at_end and self.manager.last_saved_step != state.step:
            self.save(state)
        self.manager.wait()
