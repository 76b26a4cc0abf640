"""Warning signals that arrive while a training process starts (imports, model load: tens of
seconds on a big model) are remembered, not fatal: SIGUSR1/USR2 would otherwise kill the
process (their default action), and a Slurm warning signal can come at any time. `install()`
runs first thing in `python -m launch.train`, before torch is imported; the run's stop handler
(trainer/checkpoint/checkpointing.py) takes the remembered signals over and stops at the end of
the first step, with a checkpoint. Standard library only."""

from __future__ import annotations

import signal

_received: list[int] = []

# Not SIGTERM: a process that has not trained yet has nothing to save, and torchrun stops the
# other workers with SIGTERM when one fails; those must not linger until its SIGKILL.
EARLY = (signal.SIGUSR1, signal.SIGUSR2)


def _remember(signum: int, frame: object) -> None:
    if signum not in _received:
        _received.append(signum)


def install() -> None:
    """Remember EARLY signals; only in a process of its own (never on import)."""
    for sig in EARLY:
        signal.signal(sig, _remember)


def take() -> list[int]:
    """The signals received since `install()` (oldest first), to be handled by the caller,
    which has installed its own handlers first (so that none falls between the two). Those it
    did not replace stay remembered and ignored."""
    received = list(_received)
    _received.clear()
    return received


def ignore() -> None:
    """Ignore EARLY signals from now on: for a process whose run is over. A Slurm warning that
    comes while it exits must not kill it (the job would end FAILED after a complete run);
    Python resets its own handlers to the default action while the interpreter shuts down, but
    leaves an ignored signal ignored."""
    for sig in EARLY:
        signal.signal(sig, signal.SIG_IGN)
