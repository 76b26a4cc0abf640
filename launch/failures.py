"""How a failed or interrupted run ends: one line that names the culprit, printed once.

Three kinds of failure reach `report`:

- **Collective** errors: every rank raised the same error at the same point (a bad config before
  the process group, a data error agreed at a step boundary, a checkpoint save that failed
  somewhere, too many non-finite steps). Rank 0 prints it. With a live process group the other
  ranks wait at a barrier until it has, so torchrun (which tears the group down when the first
  worker exits) cannot cut it off. Before the group exists, they wait for torchrun's SIGTERM
  (which comes when rank 0 exits), bounded, and print it themselves if it never comes.
- **Local** user errors, raised on one rank only: that rank prints `error: ... (rank N)` at
  once. Its peers, stuck in a collective with a rank that left, then see a communication error;
  they print one line saying so (never a traceback), after the real error by construction.
- Anything else is a bug or a library failure: its traceback is the useful thing, and is kept.

Under torchrun each failing worker also writes its line to `TORCHELASTIC_ERROR_FILE`, so the
"Root Cause" section of torchrun's failure summary shows that line instead of a link.

Once its process group is up, a failed rank then ends its process at once (`exit_now`, from
`launch.train.main`), without the group's teardown and the interpreter's exit, and no wait here
lasts more than a minute: torchrun stops the job only once a worker has exited, so a rank that
cannot exit keeps the whole job waiting, for the collective timeout (30 minutes by default) or
for ever.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import sys
import time
from typing import Any, NoReturn

from trainer.dist import barrier_within, is_collective

# A pre-group error on rank != 0 waits at most this long for torchrun to stop it (rank 0 has
# the same error and prints it); if nothing comes, rank 0 did not fail and this rank prints.
PRE_GROUP_WAIT_S = 60.0
# Every rank reaches the report of a collective error right after the same collective; this
# bounds their wait for each other there should one of them be stuck elsewhere.
REPORT_WAIT_S = 30.0

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C

_COMM_ERROR_HINTS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "ECONNRESET",
    "Socket Timeout",
    "NCCL communicator was aborted",
)


def one_line(text: str) -> str:
    """Library messages often span lines; the user's error line must not."""
    return " ".join(str(text).split())


def is_comm_error(error: BaseException) -> bool:
    """A failed collective: a peer rank exited or the network broke (gloo/NCCL)."""
    import torch.distributed as dist

    backend_error = getattr(dist, "DistBackendError", ())
    if backend_error and isinstance(error, backend_error):
        return True
    return isinstance(error, RuntimeError) and any(h in str(error) for h in _COMM_ERROR_HINTS)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def write_error_file(line: str, *, consequence: bool = False) -> None:
    """torchrun's error-file protocol: its failure summary shows `line` as the root cause (the
    failure with the smallest timestamp, in whole seconds). A `consequence` of another rank's
    failure is dated a second later so that it never wins a tie against its cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            stamp = str(int(time.time()) + int(consequence))
            # The structured form (torchrun shows `py_callstack` as the failure's traceback).
            info = {"py_callstack": line, "timestamp": stamp}
            json.dump({"message": {"message": line, "extraInfo": info}}, f)
    except OSError:
        pass  # the line on stderr is what matters; the summary then just lacks it


def emit(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def wait_for_torchrun_teardown(timeout_s: float) -> bool:
    """Block until torchrun's SIGTERM arrives (True) or `timeout_s` passes (False)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return signal.sigtimedwait({signal.SIGTERM}, timeout_s) is not None
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def report_user_error(
    error: BaseException,
    *,
    rank: int,
    world_size: int,
    group_alive: bool,
    pre_group: bool,
    group: Any = None,
) -> None:
    """Print a user error the way the module docstring describes (may block briefly). `group`:
    the gloo group to meet on when `group_alive` (None = the default group)."""
    # A config error lists its problems one per line (each naming a key): keep that layout.
    message = str(error) if getattr(error, "problems", None) else one_line(str(error))
    if world_size == 1:
        line = f"error: {message}"
        write_error_file(line)
        emit(line)
        return
    if not (pre_group or is_collective(error)):
        line = f"error: {message} (rank {rank})"
        write_error_file(line)
        emit(line)
        return
    line = f"error: {message}"
    write_error_file(line)
    if rank == 0:
        emit(line)
    if group_alive:
        # Rank 0 has printed once everyone is past this point; only then may anyone exit. A
        # peer that already left (the line is out anyway), or that does not come, ends the wait.
        barrier_within(REPORT_WAIT_S, group)
        return
    if rank != 0:
        if under_torchrun() and wait_for_torchrun_teardown(PRE_GROUP_WAIT_S):
            return  # rank 0 exited with the same error; torchrun is stopping everyone
        emit(f"error: {message} (rank {rank})")


def report_comm_error(error: BaseException, *, rank: int) -> None:
    """This rank's collective failed because another rank is gone: say so in one line."""
    line = (
        f"error: rank {rank} stopped: lost contact with another rank, which failed or was "
        f"killed (see its error above) [{type(error).__name__}: {one_line(str(error))[:160]}]"
    )
    write_error_file(line, consequence=True)
    emit(line)


def exit_now(code: int) -> NoReturn:
    """End this rank's process with `code` at once, after its failure has been reported.

    Not through the interpreter's exit, which joins every non-daemon thread and runs the
    destructors of what the failed run left behind, and after a failure some of those wait for
    other ranks or deadlock:

    - a gloo process group freed on the main thread (by the DDP reducer that holds it, when
      the error's traceback goes) joins its worker threads while holding the GIL; a worker
      still finishing the last collective (the error agreement's all-gather) needs the GIL to
      drop that collective's tensors. Seen: rank 1 stuck in ~ProcessGroupGloo -> thread join,
      its gloo worker in ~AsyncAllgatherWork -> take_gil;
    - an async checkpoint save's writer (DCP's executor thread, joined at exit) waiting in a
      collective for a rank that is itself waiting at its exit.

    No process then exits, so torchrun, which stops the other workers only when one exits,
    never steps in. What the run must keep is on disk already: the error line (and the torchrun
    error file), metrics (closed by the loop), published checkpoints (a save in progress is
    left unfinished and removed at the next start). DataLoader workers are killed first: they
    hold this rank's sockets, so the other ranks would not see it go."""
    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.kill()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
