"""torchrun for training runs, with endings a person can read:
`python -m launch.run [torchrun options] CONFIG [section.key=value ...]`.

It is torchrun (the same options and the same elastic agent, in this process) running
`-m launch.train CONFIG ...`, except for how a run ends. Stock torchrun ends every failed run,
and every run stopped with Ctrl-C or SIGTERM, with a Python traceback of its own launcher code
after the workers' output. Here:

- a worker failed: its one-line `error: ...` is already above; this adds one line naming the
  rank and exit code, and exits with that code (2 for a user error, see launch.failures);
- Ctrl-C / SIGTERM reached the launcher: the workers got the same signal and save a checkpoint
  at the end of the current step (a second Ctrl-C aborts them); this prints one line and exits
  with 128 + the signal number (130 for Ctrl-C), the shell's convention for a stopped job.
  Rerunning the same command resumes.
- SIGUSR1 / SIGUSR2 (a Slurm warning signal) reached the launcher: it passes the signal on to
  the workers and keeps waiting for them, however long their checkpoint takes; they save and
  exit 0 (and under Slurm, requeue the job: see trainer/slurm.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

EXIT_SIGNAL_BASE = 128


def parse(argv: list[str]):  # -> argparse.Namespace, typed loosely: torch's parser owns it
    """torchrun's own parser; the first positional argument is the run config."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(argv)
    config = args.training_script
    if args.module or args.no_python or not config.endswith((".yaml", ".yml")):
        raise SystemExit(
            "usage: python -m launch.run [torchrun options] CONFIG.yaml [section.key=value ...]"
            f" (got {config!r} where the run config goes)"
        )
    args.module = True
    args.training_script = "launch.train"
    args.training_script_args = [config, *args.training_script_args]
    return args


# Signals that this launcher passes on to its workers and otherwise ignores: a Slurm warning
# signal (sbatch --signal=USR1@T) or `scancel --signal=USR1` asks the workers to save and stop,
# which can take longer than torchrun's shutdown window. torchrun itself would die of them
# (their default action) or, when listed in --signals-to-handle, stop the workers after
# --shutdown-timeout (30 s) whether their checkpoint is written or not.
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2)


def _children() -> list[int]:
    """This process's child processes (the workers), from /proc (Linux)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == me:
            found.append(int(entry))
    return found


# A signal that came before the workers existed (the launcher still importing torch, or the
# workers not started yet) is passed on once they have run for WORKER_GRACE_S: long enough to
# have installed their own handler (launch.train does that before importing anything).
WORKER_GRACE_S = 2.0
_pending: list[int] = []
_pending_lock = threading.Lock()


def _send(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _forward_later() -> None:
    first_seen: dict[int, float] = {}
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        now = time.monotonic()
        children = _children()
        for pid in children:
            first_seen.setdefault(pid, now)
        ready = [pid for pid in children if now - first_seen[pid] >= WORKER_GRACE_S]
        if ready:
            with _pending_lock:
                signals, _pending[:] = list(_pending), []
            for signum in signals:
                _send(ready, signum)
            return
        time.sleep(0.2)


def _forward(signum: int, frame: object) -> None:
    children = _children()
    if children:
        _send(children, signum)
        return
    with _pending_lock:
        start = not _pending
        if signum not in _pending:
            _pending.append(signum)
    if start:
        threading.Thread(target=_forward_later, name="forward-signals", daemon=True).start()


def forward_stop_signals(handled: str) -> None:
    """Pass USR1/USR2 on to the workers, except those torchrun was told to handle itself."""
    names = {name.strip() for name in handled.split(",")}
    for sig in FORWARDED:
        if sig.name not in names:
            signal.signal(sig, _forward)


def main(argv: list[str] | None = None) -> int:
    forward_stop_signals("")  # first: importing torch below takes seconds
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    args = parse(sys.argv[1:] if argv is None else argv)
    forward_stop_signals(getattr(args, "signals_to_handle", "") or "")
    try:
        run(args)
    except ChildFailedError as e:
        # A worker that exited with an error code is the cause; ones killed by a signal are
        # usually torchrun stopping the rest.
        exited = {r: f for r, f in e.failures.items() if f.exitcode > 0}
        rank, failure = (
            min(exited.items(), key=lambda item: item[1].timestamp)
            if exited
            else e.get_first_failure()
        )
        code = failure.exitcode
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        print(
            f"launch.run: training failed (rank {rank} ended with {how}); the error is above",
            file=sys.stderr,
            flush=True,
        )
        return code if 0 < code < EXIT_SIGNAL_BASE else 1
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(
            f"launch.run: stopped by {name}; the workers saved a checkpoint at the end of their "
            "step unless an error is shown above. "
            + (
                "A job that Slurm requeues resumes from it by itself."
                if os.environ.get("SLURM_JOB_ID")
                else "Rerun the same command to resume."
            ),
            file=sys.stderr,
            flush=True,
        )
        return EXIT_SIGNAL_BASE + int(e.sigval)
    return 0


if __name__ == "__main__":
    exit_code = main()
    # The workers are gone: a late warning signal must not kill this process while it exits
    # (Python puts the default action back during shutdown, and USR1's kills).
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(exit_code)
