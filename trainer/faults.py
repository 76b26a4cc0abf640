"""Fault injection for the crash tests: `FTTRAIN_FAULT=point:step[:rank[:action]]`.

Points: `micro_step` (inside gradient accumulation, before the last micro-step of `step`),
`after_engine_state` (a checkpoint's shards are written, nothing else), `before_marker`
(files and hashes done, no marker yet), `before_latest` (published, `latest` not yet updated).
Action `kill` (SIGKILL this process, the default), `raise` (an exception) or `hang` (sleep for
a day: a stuck rank).
`FTTRAIN_STEP_DELAY_S=S` makes every step S seconds slower (at the `micro_step` point), for
tests that must signal a run while it trains (Slurm time limits). Unset: no cost beyond two
environment lookups per step.
"""

from __future__ import annotations

import os
import signal
import time


class InjectedFault(RuntimeError):
    pass


def _parse(spec: str) -> tuple[str, int, int | None, str]:
    parts = spec.split(":")
    point, step = parts[0], int(parts[1])
    rank = int(parts[2]) if len(parts) > 2 and parts[2] != "*" else None
    action = parts[3] if len(parts) > 3 else "kill"
    return point, step, rank, action


def maybe_fail(point: str, step: int, rank: int) -> None:
    spec = os.environ.get("FTTRAIN_FAULT")  # read per call so a test can set it at any time
    delay = os.environ.get("FTTRAIN_STEP_DELAY_S")  # slow steps, for tests that need time
    if delay:
        time.sleep(float(delay))
    if not spec:
        return
    want_point, want_step, want_rank, action = _parse(spec)
    if point != want_point or step != want_step or want_rank not in (None, rank):
        return
    if action == "raise":
        raise InjectedFault(f"injected fault at {point}, step {step}, rank {rank}")
    if action == "hang":
        time.sleep(24 * 3600)  # the others wait in their next collective
        return
    os.kill(os.getpid(), signal.SIGKILL)
