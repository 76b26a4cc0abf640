"""CheckpointManager: collective save (sync or async), publish, verify and resume."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from trainer.checkpoint.files import (
    CHECKSUM,
    FORMAT_VERSION,
    HASHERS,
    LATEST,
    MANIFEST,
    MARKER,
    STEP_DIR_NAME,
    TMP_PREFIX,
    CheckpointError,
    CheckpointSaveError,
    agree,
    checkpoint_name,
    describe_error,
    file_digest,
    files_under,
    fsync_dir,
    hash_my_share,
    in_background,
    list_checkpoints,
    pointer_notes,
    validate,
    validate_share,
    versions,
    write_file,
)
from trainer.dist import DistContext, mark_collective

log = logging.getLogger("fttrain")

# 2: the manifest names its checksum ("hash": "xxh3_128"); 1: sha256, no "hash" key (still read).
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
        if checksum not in HASHERS:
            raise ValueError(f"unknown checksum {checksum!r}; known: {sorted(HASHERS)}")
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
        # thread runs this manager's (`agree`, `poll`); two threads issuing collectives on one
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
        errors = agree(self.ctx, error, self.group)
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
            if self.async_save and engine.supports_async_save:
                written = engine.save_state_async(tmp / "engine", self.async_group)
            else:
                engine.save_state(tmp / "engine")
            self.fault_hook("after_engine_state", step)
            write_file(tmp / f"rank_{self.ctx.rank:05d}.json", json.dumps(rank_state))
            if self.ctx.is_main:
                trainer = {
                    **trainer_state,
                    "format_version": FORMAT_VERSION,
                    "versions": versions(),
                    "world_size": self.ctx.world_size,
                    "step": step,
                }
                write_file(tmp / "trainer.json", json.dumps(trainer, indent=1))
                write_file(tmp / "config.yaml", config_yaml)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must hear about it, then all raise
            error = describe_error(e)
        self._raise_if_any(error, f"checkpoint save at step {step} ({tmp})")
        # Only now, with every rank's side files written (the agreement above), may this rank's
        # background hashing list the directory: started earlier, it could miss a side file
        # when the engine write is quick, and ranks would split different lists.
        future = None if written is None else in_background(self._hash_when_written, written, tmp)
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
        return hash_my_share(tmp, self.ctx.rank, self.ctx.world_size, self.checksum)

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
                mine = hash_my_share(tmp, self.ctx.rank, self.ctx.world_size, self.checksum)
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
                for rel in files_under(tmp):
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
                write_file(tmp / MANIFEST, json.dumps(record, indent=1))
                write_file(tmp / MARKER, file_digest(tmp / MANIFEST, "sha256"))
                if final.exists():  # a stale copy of this step (e.g. a rerun): replace it
                    shutil.rmtree(final)
                os.rename(tmp, final)
                fsync_dir(self.root)
                self.fault_hook("before_latest", step)
                pointer_tmp = self.root / f"{TMP_PREFIX}{LATEST}"
                write_file(pointer_tmp, final.name)
                os.replace(pointer_tmp, self.root / LATEST)
                fsync_dir(self.root)
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
        m = STEP_DIR_NAME.match(path.name)
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
            reason = validate_share(path, self.verify_checksums, self.ctx.rank, self.ctx.world_size)
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
            lambda: (pointer_notes(self.root), [str(p) for _, p in list_checkpoints(self.root)])
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
            write_file(self.root / LATEST, remaining[0][1].name)
        fsync_dir(self.root)
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
