"""DeepSpeed's CPU communication op: built once into the venv, never waited on forever.

On a CPU accelerator DeepSpeed's communication layer loads `deepspeed_shm_comm`, a C++ op it
compiles on first use with torch's JIT loader (`torch.utils.cpp_extension.load`) into
`$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/` (default `~/.cache/torch_extensions/py3X_cpu/...`,
shared by every venv of the user). The compile takes minutes and says nothing. Torch guards it
with a lock file, `<build dir>/lock`, created with O_EXCL and removed when the build ends; a
process that finds it there spins until it disappears. A builder killed mid-build (SIGKILL, OOM,
a test timeout) therefore leaves the file behind, and every later DeepSpeed run waits forever.

Here:
- `TORCH_EXTENSIONS_DIR` defaults to `<venv>/torch_extensions` (a value the user set is kept),
  so the op is owned by this project's venv and other venvs cannot rebuild it under us;
  `make install` builds it (`python -m trainer.engine.deepspeed_ops --build`).
- `load_comm_op()` loads it before DeepSpeed does (DeepSpeed then reuses the loaded module),
  announcing a build, waiting for another process's build with a bound and a message, and
  turning a stale lock into `DeepSpeedOpError`, one line naming the file to remove.

When is the lock stale? Torch's builder keeps the lock file open (the descriptor from its
O_EXCL create) until it has removed the file, and the kernel closes it when the process dies.
So: the lock exists and no process has it open, and that is still true a moment later for the
same file (the second look covers the instants between create and open-descriptor, and between
close and unlink). Open files are read from /proc/<pid>/fd. If a process that could be the
builder (one of the lock owner's uid) cannot be inspected, or /proc is missing, staleness
cannot be decided; that lock is treated as held and the wait ends at its bound with an error
that names the file. A builder in another PID namespace (another container sharing the
directory) is invisible too and would be taken for dead: one more reason for a per-venv dir.

Processes of this project also take turns with an flock (`<build dir>/build.flock`, released
by the kernel when its holder dies, so it cannot go stale): only one of them is inside torch's
loader at a time, and the others wait in a loop of ours that keeps checking the torch lock,
instead of in torch's loop that never gives up.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

log = logging.getLogger("fttrain")

OP_NAME = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME: also the name of its build dir
LOCK_NAME = "lock"  # torch's FileBaton file inside the build dir (cpp_extension._jit_compile)
TURN_NAME = "build.flock"  # ours: the turn among this project's processes
DEFAULT_WAIT_S = 1200.0  # a build takes 1-4 min on 2 busy cores; 20 min means something is wrong
CONFIRM_S = 1.0  # the second look before calling a lock without holders stale
POLL_S = 0.5
REPORT_AFTER_S = 5.0
REPORT_EVERY_S = 60.0

_loaded: ModuleType | None = None


class DeepSpeedOpError(RuntimeError):
    """DeepSpeed's CPU communication op cannot be built or loaded (stale lock, endless wait)."""


def project_extensions_dir() -> Path | None:
    """Where torch JIT-builds extensions for this project: `TORCH_EXTENSIONS_DIR` if the user
    set it, else `<venv>/torch_extensions`. None outside a virtual (or conda) environment, where
    torch's own default stays in force rather than writing under a system prefix."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    in_env = sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") == sys.prefix
    return Path(sys.prefix) / "torch_extensions" if in_env else None


def use_project_extensions_dir() -> Path | None:
    """Point `TORCH_EXTENSIONS_DIR` at `project_extensions_dir()` unless it is already set
    (child processes inherit it). Must run before anything JIT-loads an op; returns the dir."""
    root = project_extensions_dir()
    if root is not None:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(root))
    return root


def comm_op_build_dir() -> Path:
    """The directory torch builds the op in (and keeps its `lock` in), for the current env."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        # With the variable set, torch uses `$TORCH_EXTENSIONS_DIR/<name>` as is.
        return Path(root) / OP_NAME
    # Unset: torch adds a python/accelerator folder to its default root; ask torch itself.
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(OP_NAME, verbose=False))


def is_built(build_dir: Path) -> bool:
    """A compiled module is there (`<name>.so`, or `<name>_vN.so` after torch's rebuilds)."""
    return any(build_dir.glob(f"{OP_NAME}*.so"))


# -- who holds torch's lock ------------------------------------------------------------------


def lock_holders(lock: Path) -> tuple[list[int], bool] | None:
    """The pids that have `lock` open, and whether every process that might have been the
    builder could be inspected. None if the lock does not exist."""
    try:
        target = os.stat(lock)
    except FileNotFoundError:
        return None
    holders: list[int] = []
    complete = os.path.isdir("/proc/self/fd")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            fd_dir = f"/proc/{entry.name}/fd"
            try:
                fds = os.listdir(fd_dir)
            except PermissionError:
                # Only a process of the lock's owner can have created it.
                with contextlib.suppress(OSError):
                    if os.stat(entry.path).st_uid == target.st_uid:
                        complete = False
                continue
            except OSError:  # exited meanwhile
                continue
            for fd in fds:
                try:
                    st = os.stat(f"{fd_dir}/{fd}")  # follows the fd to the open file
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    holders.append(int(entry.name))
                    break
    return holders, complete


def lock_state(lock: Path, confirm_s: float = CONFIRM_S) -> tuple[str, list[int]]:
    """("absent" | "held" | "unknown" | "stale", holder pids) for torch's build lock; see the
    module docstring for the rule. May take `confirm_s` to decide "stale"."""
    while True:
        seen = lock_holders(lock)
        if seen is None:
            return "absent", []
        holders, complete = seen
        if holders:
            return "held", holders
        if not complete:
            return "unknown", []
        try:
            first = os.stat(lock)
        except FileNotFoundError:
            return "absent", []
        time.sleep(confirm_s)
        again = lock_holders(lock)
        if again is None:
            return "absent", []
        try:
            second = os.stat(lock)
        except FileNotFoundError:
            return "absent", []
        if (first.st_ino, first.st_mtime_ns) != (second.st_ino, second.st_mtime_ns):
            continue  # a new lock by a new builder: judge that one
        if again[0]:
            return "held", again[0]
        return ("stale", []) if again[1] else ("unknown", [])


def stale_lock_error(lock: Path) -> DeepSpeedOpError:
    return DeepSpeedOpError(
        f"{lock}: stale lock left by an interrupted build of DeepSpeed's CPU communication op; "
        f"remove it and rerun (rm {lock})"
    )


def wait_for_lock(lock: Path, deadline: float) -> None:
    """Return once torch's build lock is gone. Raise `DeepSpeedOpError` if it is stale, or if
    it is still there at `deadline` (time.monotonic())."""
    reported = -math.inf  # report at once: a held lock means a build is running
    while True:
        state, pids = lock_state(lock)
        if state == "absent":
            return
        if state == "stale":
            raise stale_lock_error(lock)
        now = time.monotonic()
        who = f"process {', '.join(map(str, pids))}" if pids else "a process that cannot be seen"
        if now >= deadline:
            raise DeepSpeedOpError(
                f"{lock}: DeepSpeed's CPU communication op is still being built by {who}; "
                "wait for it, or stop it (or, if no build is running, rm the lock) and rerun"
            )
        if now - reported >= REPORT_EVERY_S:
            log.info(
                "waiting for %s, which is building DeepSpeed's CPU communication op into %s",
                who,
                lock.parent,
            )
            reported = now
        time.sleep(POLL_S)


@contextlib.contextmanager
def _build_turn(build_dir: Path, deadline: float) -> Iterator[None]:
    """Hold this project's build turn. While waiting for it, watch torch's lock: a holder
    stuck on a stale lock must not keep the others waiting on it."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / TURN_NAME, "a+") as turn:
        # The first report only after a few seconds: a turn held for a load of the built op
        # (torch still runs ninja then, a no-op) is over by then.
        reported = time.monotonic() - REPORT_EVERY_S + REPORT_AFTER_S
        while True:
            try:
                fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            lock = build_dir / LOCK_NAME
            if lock_state(lock)[0] == "stale":
                raise stale_lock_error(lock)
            now = time.monotonic()
            turn.seek(0)
            holder = turn.read().strip() or "?"
            if now >= deadline:
                raise DeepSpeedOpError(
                    f"{build_dir}: process {holder} is still building or loading DeepSpeed's "
                    "CPU communication op; wait for it, or stop it and rerun"
                )
            if now - reported >= REPORT_EVERY_S:
                log.info(
                    "waiting for process %s, which is building DeepSpeed's CPU communication op "
                    "into %s",
                    holder,
                    build_dir,
                )
                reported = now
            time.sleep(POLL_S)
        try:
            turn.seek(0)
            turn.truncate()
            turn.write(str(os.getpid()))  # only for the waiters' messages
            turn.flush()
            yield
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)


def _comm_op_builder():  # -> deepspeed OpBuilder | None
    """DeepSpeed's builder for the op, or None where DeepSpeed would not load it (another
    accelerator, a platform without it) - the same test as deepspeed.comm.torch.build_shm_op."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def load_comm_op(wait_s: float = DEFAULT_WAIT_S) -> ModuleType | None:
    """Build if needed and load DeepSpeed's CPU communication op, before DeepSpeed would:
    DeepSpeed's op builders keep loaded ops, so its own load then returns this module. None
    where DeepSpeed does not use the op. Raises `DeepSpeedOpError` on a stale lock or when
    another process's build has not finished within `wait_s`."""
    global _loaded
    if _loaded is not None:
        return _loaded
    use_project_extensions_dir()
    builder = _comm_op_builder()
    if builder is None:
        return None
    build_dir = comm_op_build_dir()
    deadline = time.monotonic() + wait_s
    with _build_turn(build_dir, deadline):
        # Our turn: a lock still there was left by a dead builder, or is held by a process
        # outside this project sharing the directory.
        wait_for_lock(build_dir / LOCK_NAME, deadline)
        fresh = not is_built(build_dir)
        if fresh:
            log.info(
                "building DeepSpeed's CPU communication op into %s "
                "(once; half a minute to a few minutes)...",
                build_dir,
            )
        started = time.monotonic()
        _loaded = builder.load(verbose=False)
        if fresh:
            log.info("built DeepSpeed's CPU communication op in %.0fs", time.monotonic() - started)
    return _loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.engine.deepspeed_ops",
        description="Build DeepSpeed's CPU communication op into this venv "
        "(TORCH_EXTENSIONS_DIR, default <venv>/torch_extensions).",
    )
    parser.add_argument("--build", action="store_true", required=True, help="build it now")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    use_project_extensions_dir()
    try:
        module = load_comm_op()
    except Exception as e:  # noqa: BLE001 - a compiler error is reported, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    if module is None:
        print("DeepSpeed does not use its CPU communication op here; nothing to build")
    else:
        print(f"DeepSpeed's CPU communication op is ready in {comm_op_build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
