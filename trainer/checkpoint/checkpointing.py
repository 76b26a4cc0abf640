"""The run's side of checkpoints: what goes in, when to save, stop signals, restore."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from trainer.checkpoint.files import (
    FORMAT_VERSION,
    CheckpointError,
    agree,
    capture_rng,
    describe_error,
    restore_rng,
)
from trainer.checkpoint.manager import CheckpointManager, read_rank_state, read_trainer_state
from trainer.dist import DistContext, mark_collective

log = logging.getLogger("fttrain")

# 2: the manifest names its checksum ("hash": "xxh3_128"); 1: sha256, no "hash" key (still read).
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

    def __init__(self, names: list[str], announce: bool = True, requeue_signal: str = ""):
        import signal

        self.requested = 0
        # Whether this rank received the Slurm warning signal (slurm.signal) at any point: a
        # stop on it requeues the job, whichever signal came first.
        self.requeue_signum = int(getattr(signal, requeue_signal)) if requeue_signal else 0
        self.requeue_seen = False
        self.announce = announce  # one rank tells the user; the others would repeat it
        self.previous = {}
        # Ctrl-C always means "save and stop" (twice: abort), whatever stop_signals lists.
        from trainer import early_signals

        for name in dict.fromkeys(
            [*names, *([requeue_signal] if requeue_signal else []), "SIGINT"]
        ):
            sig = getattr(signal, name)
            self.previous[sig] = signal.signal(sig, self._handle)
        for sig in early_signals.take():  # received while the process was starting
            if sig in self.previous:  # a stop signal of this run: stop after the first step
                self._handle(sig, None)

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
        if signum == self.requeue_signum:
            self.requeue_seen = True
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
        self.stop = _StopRequest(
            c.stop_signals, announce=ctx.is_main, requeue_signal=cfg.slurm.signal
        )
        # Set when the run stops: whether any rank received slurm.signal (see launch.train).
        self.requeue_requested = False
        self.total_steps = total_steps
        self.blocked_seconds: list[float] = []

    def _fingerprint(self) -> dict:
        from trainer.engine.base import model_fingerprint

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
        errors = agree(self.ctx, error, self.manager.group)
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
        stop = torch.tensor([self.stop.requested, int(self.stop.requeue_seen)])
        if self.ctx.distributed:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=self.manager.group)
        if int(stop[0].item()):
            self.requeue_requested = bool(stop[1].item())
            if self.ctx.is_main:
                log.warning(
                    "stop requested (signal %d): saving at step %d and exiting",
                    int(stop[0].item()),
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
