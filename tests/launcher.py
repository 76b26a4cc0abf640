"""The one way tests start several ranks: real processes, gloo, a free port, a hard timeout.

`run_ranks(fn, world_size, *args)` spawns `world_size` processes with torchrun's environment
variables set and returns each rank's return value; `run_torchrun(argv, nproc)` runs the real CLI
under torchrun. A rank that fails raises with its traceback; a hang kills every rank and fails
the test instead of stalling CI.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class RanksFailed(AssertionError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)  # ranks share 2 cores; oversubscription makes runs crawl
    try:
        value = fn(*args)
        payload = ("ok", value)
    except BaseException:  # noqa: BLE001 - reported to the parent
        payload = ("error", traceback.format_exc())
    with open(out, "wb") as f:
        pickle.dump(payload, f)
    if payload[0] == "error":
        sys.exit(1)


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180) -> list[Any]:
    """Run `fn(*args)` on `world_size` spawned ranks; return their results in rank order."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world_size)]
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world_size, port, outs[r], args))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise RanksFailed(f"ranks {hung} still running after {timeout}s (hang?); killed")
        results, errors = [], []
        for r, out in enumerate(outs):
            if not os.path.exists(out):
                errors.append(f"rank {r}: died with exit code {procs[r].exitcode} and no result")
                continue
            with open(out, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r}:\n{value}")
            results.append(value)
        if errors:
            raise RanksFailed("\n".join(errors))
        return results


def torchrun_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun's workers sit in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run_torchrun(
    argv: list[str],
    nproc: int,
    *,
    timeout: float = 300,
    cwd: str | Path = REPO,
    env: dict | None = None,
    launcher: str = "torch.distributed.run",
    signal_when: Callable[[], bool] | None = None,
    signum: int = signal.SIGINT,
) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node=nproc <argv>` on a free port (or our `launch.run`, which
    takes the same options: `launcher="launch.run"`). On timeout every process it started is
    killed and the test fails; output goes through a file, so a straggler holding a pipe open
    can never block the test. `signal_when`: polled while the run goes on; the first time it
    returns True, `signum` is sent once to the launcher (as Ctrl-C or a scheduler would)."""
    cmd = [
        sys.executable,
        "-m",
        launcher,
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *argv,
    ]
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env or torchrun_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        timed_out = _wait(proc, timeout, signal_when, signum)
        stragglers = _descendants(proc.pid)
        deadline = time.monotonic() + 10
        while stragglers and not timed_out and time.monotonic() < deadline:
            time.sleep(0.2)  # a rank may still be exiting
            stragglers = _descendants(proc.pid)
        dumped_from = None
        if timed_out and stragglers:
            # A rank that registers a SIGQUIT stack dump (faulthandler) writes where it is stuck
            # into the log the failure shows; one without dies of it, as it would of SIGKILL.
            log.seek(0)
            dumped_from = len(log.read())  # in characters, as `out` is indexed
            for pid in stragglers:  # one at a time: stacks written at once interleave
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
                time.sleep(0.5)
        for pid in [*stragglers, proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        log.seek(0)
        out = log.read()
    if stragglers and not timed_out:
        raise RanksFailed(
            f"rank processes {stragglers} outlived torchrun (hang at exit)\n{out[-4000:]}"
        )
    if timed_out:
        # The log's tail before the stacks, then every stack whole (a rank has many threads).
        shown = out[-4000:] if dumped_from is None else out[max(0, dumped_from - 4000) :]
        raise RanksFailed(
            f"torchrun {' '.join(argv)} still running after {timeout}s; killed\n{shown}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _wait(
    proc: subprocess.Popen,
    timeout: float,
    signal_when: Callable[[], bool] | None,
    signum: int,
) -> bool:
    """Wait for `proc`; True if it timed out. Sends `signum` once when `signal_when()` holds."""
    deadline = time.monotonic() + timeout
    while signal_when is not None:
        if proc.poll() is not None:
            return False
        if signal_when():
            proc.send_signal(signum)
            break
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)  # polling a file the run writes; there is nothing to block on
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        return False
    except subprocess.TimeoutExpired:
        return True
