"""What a run needs to know about Slurm, in one place: the world of an `srun` step (one task per
GPU, no torchrun), the rendezvous address, the restart count, and requeueing the job.

Everything here reads the environment Slurm gives each task; nothing runs `scontrol` except
`requeue`. See docs/slurm.md for how the launchers use it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import zlib
from dataclasses import dataclass

log = logging.getLogger("trainer")

# Ports for the process group of an srun step without torchrun: one per job and step, so two
# steps (or two jobs) on the same first node do not collide. Above the usual service ports and
# below Linux's default ephemeral range (32768+), which outgoing connections use.
_PORT_BASE, _PORT_SPAN = 20000, 12000


class SlurmSetupError(RuntimeError):
    """The Slurm environment is inconsistent (e.g. SLURM_PROCID without a task count)."""


@dataclass(frozen=True)
class SlurmStep:
    """One task of an `srun` step: its rank, its rank on this node, and the step's size."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list (`gpu[01-03,07],login1`) as host names, in order."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", hostlist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        # A suffix may hold another bracket (rack[1-2]-node[1-3]): expand it recursively.
        tails = expand_hostlist(suffix) if "[" in suffix else [suffix]
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not hi:
                heads = [lo]
            else:
                width = len(lo)  # zero padding, as in node[001-010]
                heads = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
            hosts.extend(prefix + head + tail for head in heads for tail in tails)
    return hosts


def _int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise SlurmSetupError(f"{name}={env[name]!r} is not an integer") from None


def _tasks_on_node(env: dict[str, str]) -> int:
    """Tasks of this step on this node. SLURM_STEP_TASKS_PER_NODE is `2(x3),1`: counts per
    node in node order; SLURM_NODEID indexes it (relative to the step's nodes)."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    counts: list[int] = []
    for item in filter(None, spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if not match:
            return 1
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return counts[node] if node < len(counts) else 1


def step_from_env(env: dict[str, str] | None = None) -> SlurmStep | None:
    """The world of an `srun` step with several tasks, or None when this process is not one
    (no Slurm, the batch script itself, or a one-task step: a single-process run, or torchrun
    inside it, which sets its own variables). SLURM_STEP_NUM_TASKS is only set inside a step;
    the batch script has SLURM_NTASKS and SLURM_PROCID too, and must not count as a rank."""
    env = dict(os.environ) if env is None else env
    if "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return None
    world_size = _int(env, "SLURM_STEP_NUM_TASKS")
    if world_size <= 1:
        return None
    rank = _int(env, "SLURM_PROCID")
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    if not 0 <= rank < world_size:
        raise SlurmSetupError(f"SLURM_PROCID={rank} is outside SLURM_STEP_NUM_TASKS={world_size}")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    hosts = expand_hostlist(nodelist)
    addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT")
    else:
        # Every task computes the same port from the job and step ids.
        key = f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}".encode()
        port = _PORT_BASE + zlib.crc32(key) % _PORT_SPAN
    return SlurmStep(rank, local_rank, world_size, _tasks_on_node(env), addr, port)


def restart_count(env: dict[str, str] | None = None) -> int:
    """How many times Slurm has requeued this job (0 on the first run or outside Slurm)."""
    env = dict(os.environ) if env is None else env
    try:
        return int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def job_id(env: dict[str, str] | None = None) -> str | None:
    """The job to requeue: for an array task its own id (`ARRAYJOB_TASK`), else SLURM_JOB_ID."""
    env = dict(os.environ) if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def requeue(max_requeues: int, env: dict[str, str] | None = None) -> bool:
    """Requeue this Slurm job (it restarts from its batch script and auto-resumes), unless it
    has already been requeued `max_requeues` times. Returns whether it was requeued; says why
    not in the log."""
    env = dict(os.environ) if env is None else env
    job = job_id(env)
    if job is None:
        return False
    restarts = restart_count(env)
    if restarts >= max_requeues:
        log.warning(
            "not requeueing job %s: it has restarted %d times (slurm.max_requeues=%d); "
            "submit it again to continue from the checkpoint",
            job,
            restarts,
            max_requeues,
        )
        return False
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("could not requeue job %s (%s); submit it again to resume", job, e)
        return False
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        log.error(
            "scontrol requeue %s failed: %s; submit the job again to resume (was it submitted "
            "with --requeue, and does the cluster allow requeueing?)",
            job,
            why[-1] if why else f"exit code {proc.returncode}",
        )
        return False
    log.warning("requeued job %s (restart %d of at most %d)", job, restarts + 1, max_requeues)
    return True
