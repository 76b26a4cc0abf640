"""The one place that knows rank, world size and device.

`world_from_env` reads what torchrun (or Slurm via our launchers) put in the environment, without
starting anything, so the config can be validated first. `init_distributed` then starts the
process group (nccl on GPU, gloo on CPU) or runs single-process, and checks that the environment
and the process group agree. Everything else receives a `DistContext` explicitly.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainer.slurm import SlurmSetupError, SlurmStep, step_from_env

# The default of `train.collective_timeout_s` (trainer/config.py): 30 minutes, torch's own.
DEFAULT_TIMEOUT_S = 1800.0


class DistributedSetupError(RuntimeError):
    """The launch environment is inconsistent (e.g. RANK without WORLD_SIZE)."""


def mark_collective(error: BaseException) -> BaseException:
    """Flag an exception that every rank raises at the same point, so that it is reported once
    (by rank 0) rather than once per rank; see launch.failures."""
    error.collective = True  # type: ignore[attr-defined]
    return error


def is_collective(error: BaseException) -> bool:
    return bool(getattr(error, "collective", False))


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    # Set when the ranks are the tasks of an `srun` step (no torchrun): where they meet.
    slurm: SlurmStep | None = None


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when single-process without a process group
    # A gloo group for small CPU-side collectives (token counts, flags, objects): on GPU the
    # default group is nccl, and a collective there would need a host-device sync to read.
    # None = the default group (already gloo on CPU).
    cpu_group: Any = None
    # How long any collective waits for the slowest rank before failing
    # (`train.collective_timeout_s`). Groups made later (the checkpoint manager's) take the same;
    # None = torch's default (30 minutes for gloo, also for a new group of a shorter-timeout world).
    timeout_s: float | None = None

    @property
    def timeout(self) -> datetime.timedelta | None:
        return None if self.timeout_s is None else datetime.timedelta(seconds=self.timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def world_from_env(env: dict[str, str] | None = None) -> WorldInfo:
    """Rank/world size from torchrun's variables, else from those of an `srun` step with
    several tasks (one rank per task, see trainer.slurm); world size 1 when neither is set."""
    env = dict(os.environ) if env is None else env
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    present = [n for n in names if n in env]
    if not present:
        try:
            step = step_from_env(env)
        except SlurmSetupError as e:
            raise DistributedSetupError(str(e)) from None
        if step is not None:
            return WorldInfo(step.rank, step.local_rank, step.world_size, slurm=step)
        return WorldInfo(rank=0, local_rank=0, world_size=1)
    missing = [n for n in names if n not in env]
    if missing:
        raise DistributedSetupError(
            f"launch environment has {', '.join(present)} but not {', '.join(missing)}; "
            "start with torchrun, or set all of RANK, WORLD_SIZE, LOCAL_RANK"
        )
    try:
        info = WorldInfo(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]))
    except ValueError as e:
        raise DistributedSetupError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers: {e}") from None
    if not 0 <= info.rank < info.world_size:
        raise DistributedSetupError(f"RANK={info.rank} is outside WORLD_SIZE={info.world_size}")
    return info


def cuda_index(local_rank: int, visible: int | None = None) -> int:
    """The GPU of the process with this local rank. When each process sees only its own GPU
    (Slurm's --gpus-per-task, or CUDA_VISIBLE_DEVICES set per process) that is GPU 0, whatever
    the local rank; when every process sees all of the node's GPUs, it is the local rank."""
    visible = torch.cuda.device_count() if visible is None else visible
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise DistributedSetupError(
            f"local rank {local_rank} has no GPU of its own: this process sees {visible} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start "
            "one process per GPU, or give each process its own GPU"
        )
    return local_rank


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Start the process group if launched with several ranks; pick the device. `timeout_s`
    (`train.collective_timeout_s`) bounds every collective of this run, the groups made later
    included: a rank that waits longer for the others fails instead of hanging."""
    info = world_from_env()
    if info.slurm is not None:
        # torch's env:// rendezvous (and DeepSpeed) read torchrun's variables: give them the
        # step's, so that the rest of the run cannot tell srun from torchrun.
        step = info.slurm
        os.environ.update(
            RANK=str(step.rank),
            WORLD_SIZE=str(step.world_size),
            LOCAL_RANK=str(step.local_rank),
            LOCAL_WORLD_SIZE=str(step.local_world_size),
            MASTER_ADDR=step.master_addr,
            MASTER_PORT=str(step.master_port),
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", cuda_index(info.local_rank))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if info.world_size == 1 and "MASTER_ADDR" not in os.environ:
        return DistContext(0, 0, 1, device, None, timeout_s=timeout_s)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            # Binding the device lets nccl set up eagerly; gloo ignores it.
            device_id=device if device.type == "cuda" else None,
        )
    if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
        raise DistributedSetupError(
            f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with "
            f"the environment (RANK={info.rank}, WORLD_SIZE={info.world_size})"
        )
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return DistContext(
        info.rank, info.local_rank, info.world_size, device, backend, cpu_group, timeout_s
    )


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` across ranks in place (no-op when single-process) and return it. A CPU
    tensor goes through the CPU group, so reading the result never waits on the device."""
    if ctx.distributed:
        group = ctx.cpu_group if tensor.device.type == "cpu" else None
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj, group=ctx.cpu_group)
    return gathered


def sum_counters(ctx: DistContext, counters: dict[str, float]) -> dict[str, float]:
    """Sum dicts of counters over ranks; keys may differ between ranks (a missing key is 0)."""
    if not ctx.distributed:
        return dict(counters)
    total: dict[str, float] = {}
    for part in gather_objects(ctx, counters):
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + float(value)
    return total


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def barrier_within(timeout_s: float, group: Any = None) -> bool:
    """A barrier on `group` (a gloo group; None = the default group) that gives up after
    `timeout_s`: False when a peer did not arrive in time or is gone. For a run that is ending,
    where waiting the whole collective timeout (30 minutes by default) for a rank that is not
    coming would be a hang. A barrier that timed out stays pending in the group: the caller must
    not tear the group down afterwards (its destructor would wait for it), only exit."""
    try:
        work = dist.barrier(group=group, async_op=True)
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 - timed out or a peer left: either way, stop waiting
        return False
    return True


def has_process_group() -> bool:
    """Whether this process has a process group (started, and not torn down)."""
    return dist.is_available() and dist.is_initialized()


def shutdown(ctx: DistContext, clean: bool = True) -> None:
    """Tear the process group down. On a clean exit every rank first meets at a barrier and
    frees what still references the group (a gloo group destroyed while a peer is still using
    it, or freed after destroy, can block this process from exiting). After a failure
    (`clean=False`) that can happen all the same: a process that exits right after a failure
    skips this and ends with `launch.failures.exit_now` instead."""
    if not (ctx.distributed and dist.is_initialized()):
        return
    if clean:
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()
