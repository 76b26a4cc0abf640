"""DeepSpeed's JIT-built C++ ops: built once into the venv, never waited on forever.

Two ops are loaded here: on a CPU accelerator DeepSpeed's communication layer loads
`deepspeed_shm_comm`; with the optimizer offloaded to the CPU the trainer uses DeepSpeed's CPU
Adam, `cpu_adam` (trainer/engine/deepspeed_engine.py, any accelerator). DeepSpeed compiles each on
first use with torch's JIT loader (`torch.utils.cpp_extension.load`) into
`$TORCH_EXTENSIONS_DIR/<op name>/` (default `~/.cache/torch_extensions/py3X_cpu/...`, shared by
every venv of the user). The compile takes a minute or more and says nothing. Torch guards it
with a lock file, `<build dir>/lock`, created with O_EXCL and removed when the build ends; a
process that finds it there spins until it disappears. A builder killed mid-build (SIGKILL, OOM,
a test timeout) therefore leaves the file behind, and every later DeepSpeed run waits forever.

Here:
- `TORCH_EXTENSIONS_DIR` defaults to `<venv>/torch_extensions` (a value the user set is kept),
  so the ops are owned by this project's venv and other venvs cannot rebuild them under us;
  `make install` builds them (`python -m trainer.engine.deepspeed_ops --build`).
- `load_comm_op()` / `load_cpu_adam_op()` load an op before DeepSpeed does (DeepSpeed then
  reuses the loaded module),
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
CPU_ADAM_OP_NAME = "cpu_adam"  # CPUAdamBuilder.NAME
COMM_OP = "CPU communication op"  # how messages name each op
CPU_ADAM_OP = "CPU Adam op"
LOCK_NAME = "lock"  # torch's FileBaton file inside the build dir (cpp_extension._jit_compile)
TURN_NAME = "build.flock"  # ours: the turn among this project's processes
DEFAULT_WAIT_S = 1200.0  # a build takes 1-4 min on 2 busy cores; 20 min means something is wrong
CONFIRM_S = 1.0  # the second look before calling a lock without holders stale
POLL_S = 0.5
REPORT_AFTER_S = 5.0
REPORT_EVERY_S = 60.0

_loaded: dict[str, ModuleType] = {}  # builder class name -> loaded op


class DeepSpeedOpError(RuntimeError):
    """A DeepSpeed op cannot be built or loaded (stale lock, endless wait)."""


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


def op_build_dir(name: str) -> Path:
    """The directory torch builds op `name` in (and keeps its `lock` in), for the current env."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        # With the variable set, torch uses `$TORCH_EXTENSIONS_DIR/<name>` as is.
        return Path(root) / name
    # Unset: torch adds a python/accelerator folder to its default root; ask torch itself.
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def comm_op_build_dir() -> Path:
    return op_build_dir(OP_NAME)


def is_built(build_dir: Path) -> bool:
    """A compiled module is there (`<name>.so`, or `<name>_vN.so` after torch's rebuilds; the
    build dir is named for the op)."""
    return any(build_dir.glob(f"{build_dir.name}*.so"))


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


def stale_lock_error(lock: Path, what: str = COMM_OP) -> DeepSpeedOpError:
    return DeepSpeedOpError(
        f"{lock}: stale lock left by an interrupted build of DeepSpeed's {what}; "
        f"remove it and rerun (rm {lock})"
    )


def wait_for_lock(lock: Path, deadline: float, what: str = COMM_OP) -> None:
    """Return once torch's build lock is gone. Raise `DeepSpeedOpError` if it is stale, or if
    it is still there at `deadline` (time.monotonic())."""
    reported = -math.inf  # report at once: a held lock means a build is running
    while True:
        state, pids = lock_state(lock)
        if state == "absent":
            return
        if state == "stale":
            raise stale_lock_error(lock, what)
        now = time.monotonic()
        who = f"process {', '.join(map(str, pids))}" if pids else "a process that cannot be seen"
        if now >= deadline:
            raise DeepSpeedOpError(
                f"{lock}: DeepSpeed's {what} is still being built by {who}; "
                "wait for it, or stop it (or, if no build is running, rm the lock) and rerun"
            )
        if now - reported >= REPORT_EVERY_S:
            log.info(
                "waiting for %s, which is building DeepSpeed's %s into %s", who, what, lock.parent
            )
            reported = now
        time.sleep(POLL_S)


@contextlib.contextmanager
def _build_turn(build_dir: Path, deadline: float, what: str = COMM_OP) -> Iterator[None]:
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
                raise stale_lock_error(lock, what)
            now = time.monotonic()
            turn.seek(0)
            holder = turn.read().strip() or "?"
            if now >= deadline:
                raise DeepSpeedOpError(
                    f"{build_dir}: process {holder} is still building or loading DeepSpeed's "
                    f"{what}; wait for it, or stop it and rerun"
                )
            if now - reported >= REPORT_EVERY_S:
                log.info(
                    "waiting for process %s, which is building DeepSpeed's %s into %s",
                    holder,
                    what,
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


def _op_builder(class_name: str):  # -> deepspeed OpBuilder | None
    """DeepSpeed's builder of an op for this accelerator, or None where DeepSpeed would not load
    it (no such op for this accelerator, a platform without it) - for the comm op the same test
    as deepspeed.comm.torch.build_shm_op."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(class_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def _load_op(class_name: str, what: str, wait_s: float) -> ModuleType | None:
    """Build if needed and load op `class_name` (a DeepSpeed OpBuilder), before DeepSpeed
    would: its op builders keep loaded ops, so its own load then returns this module. None where
    DeepSpeed does not have the op here. Raises `DeepSpeedOpError` on a stale lock or when
    another process's build has not finished within `wait_s`."""
    if class_name in _loaded:
        return _loaded[class_name]
    use_project_extensions_dir()
    builder = _op_builder(class_name)
    if builder is None:
        return None
    build_dir = op_build_dir(builder.NAME)
    deadline = time.monotonic() + wait_s
    with _build_turn(build_dir, deadline, what):
        # Our turn: a lock still there was left by a dead builder, or is held by a process
        # outside this project sharing the directory.
        wait_for_lock(build_dir / LOCK_NAME, deadline, what)
        fresh = not is_built(build_dir)
        if fresh:
            log.info(
                "building DeepSpeed's %s into %s (once; half a minute to a few minutes)...",
                what,
                build_dir,
            )
        started = time.monotonic()
        _loaded[class_name] = builder.load(verbose=False)
        if fresh:
            log.info("built DeepSpeed's %s in %.0fs", what, time.monotonic() - started)
    return _loaded[class_name]


def load_comm_op(wait_s: float = DEFAULT_WAIT_S) -> ModuleType | None:
    """DeepSpeed's CPU communication op (see `_load_op`); None on other accelerators."""
    return _load_op("ShareMemCommBuilder", COMM_OP, wait_s)


def load_cpu_adam_op(wait_s: float = DEFAULT_WAIT_S) -> ModuleType | None:
    """DeepSpeed's CPU Adam op, which DeepSpeedCPUAdam runs (see `_load_op`); None where
    DeepSpeed has none. A compiler error raises as DeepSpeed's loader raises it."""
    return _load_op("CPUAdamBuilder", CPU_ADAM_OP, wait_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.engine.deepspeed_ops",
        description="Build DeepSpeed's CPU communication op and CPU Adam op into this venv "
        "(TORCH_EXTENSIONS_DIR, default <venv>/torch_extensions).",
    )
    parser.add_argument("--build", action="store_true", required=True, help="build them now")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    use_project_extensions_dir()
    for what, load, name in (
        (COMM_OP, load_comm_op, OP_NAME),
        (CPU_ADAM_OP, load_cpu_adam_op, CPU_ADAM_OP_NAME),
    ):
        try:
            module = load()
        except Exception as e:  # noqa: BLE001 - a compiler error is reported, not a traceback
            print(f"error: {e}", file=sys.stderr)
            return 1
        if module is None:
            print(f"DeepSpeed does not use its {what} here; nothing to build")
        else:
            print(f"DeepSpeed's {what} is ready in {op_build_dir(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
