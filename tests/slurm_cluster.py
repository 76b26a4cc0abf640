"""A real single-node Slurm cluster for tests: the session fixture `slurm_cluster`.

slurm/testing/start_cluster.sh installs Slurm and munge where they are missing (root + apt) and
starts munged, slurmctld and slurmd with every file in a temp dir; it exits 3 where that cannot be
done, which skips the tests. Jobs reach the cluster through `SLURM_CONF` in `SlurmCluster.env`,
never through the process's own environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "slurm" / "testing"
SKIP_EXIT_CODE = 3
# Installing the packages on a fresh machine included; the script bounds each apt call itself.
START_TIMEOUT_S = 540
STOP_TIMEOUT_S = 120
COMMAND_TIMEOUT_S = 30
POLL_S = 0.2
# States a job does not leave. PREEMPTED and NODE_FAIL are left when the job is requeued, so
# `wait` takes them as final only once they have held for REQUEUE_GRACE_S.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)
MAYBE_REQUEUED_STATES = frozenset({"PREEMPTED", "NODE_FAIL"})
REQUEUE_GRACE_S = 3.0


def parse_show_job(line: str) -> dict[str, str]:
    """`scontrol show job -o` output as a dict; a value with spaces keeps them."""
    fields: dict[str, str] = {}
    key = None
    for token in line.strip().split(" "):
        name, sep, value = token.partition("=")
        if sep and name[:1].isalpha():
            key = name
            fields[key] = value
        elif key is not None:
            fields[key] += " " + token
    return fields


def _tail(path: str | None, num_lines: int = 40) -> str:
    if not path:
        return "(no StdOut)"
    try:
        return "".join(
            Path(path).read_text(errors="replace").splitlines(keepends=True)[-num_lines:]
        )
    except OSError as e:
        return f"({path}: {e})"


class SlurmCluster:
    """Handle on a running test cluster: its environment and helpers for its jobs."""

    def __init__(self, state_dir: Path, env: dict[str, str]) -> None:
        self.state_dir = state_dir
        self.env = env

    def run(
        self, args: Sequence[str], *, cwd: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster (bounded; raises on failure)."""
        proc = subprocess.run(
            list(args),
            env=self.env,
            cwd=cwd or self.state_dir,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def sbatch(self, args: Sequence[str], cwd: Path | None = None) -> int:
        """Submit with `sbatch --parsable ARGS` from cwd (default: the state dir); the job id."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def state(self, job_id: int) -> dict[str, str]:
        """The job's `scontrol show job -o` fields (JobState, Restarts, StdOut, ...)."""
        return parse_show_job(self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout)

    def cancel(self, job_id: int, *args: str) -> None:
        """`scancel ARGS JOB_ID`, e.g. cancel(job, "--signal=USR1")."""
        self.run(["scancel", *args, str(job_id)])

    def _fail(self, job_id: int, why: str) -> NoReturn:
        shown = self.run(["scontrol", "show", "job", str(job_id)], check=False)
        stdout = self.state(job_id).get("StdOut") if shown.returncode == 0 else None
        self.run(["scancel", str(job_id)], check=False)
        pytest.fail(
            f"job {job_id}: {why}\n--- scontrol show job ---\n{shown.stdout}{shown.stderr}"
            f"--- tail of {stdout} ---\n{_tail(stdout)}",
            pytrace=False,
        )

    def wait(self, job_id: int, timeout: float = 60.0) -> str:
        """Wait until the job ends for good (a requeued job runs again); its final JobState.

        On timeout the test fails with the job's details and its output, and the job is cancelled.
        """
        deadline = time.monotonic() + timeout
        since: tuple[str, float] | None = None
        while time.monotonic() < deadline:
            job_state = self.state(job_id).get("JobState", "")
            if job_state in FINAL_STATES:
                if job_state not in MAYBE_REQUEUED_STATES:
                    return job_state
                if since is None or since[0] != job_state:
                    since = (job_state, time.monotonic())
                elif time.monotonic() - since[1] >= REQUEUE_GRACE_S:
                    return job_state
            else:
                since = None
            time.sleep(POLL_S)
        self._fail(job_id, f"not finished after {timeout:.0f}s")

    def wait_running(self, job_id: int, timeout: float = 30.0) -> dict[str, str]:
        """Wait until the job is RUNNING; its fields. Fails the test if it ends or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.state(job_id)
            job_state = fields.get("JobState", "")
            if job_state == "RUNNING":
                return fields
            if job_state in FINAL_STATES - MAYBE_REQUEUED_STATES:
                self._fail(job_id, f"ended ({job_state}) before it was seen running")
            time.sleep(POLL_S)
        self._fail(job_id, f"not running after {timeout:.0f}s")


def _run_script(name: str, state_dir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run slurm/testing/NAME STATE_DIR in its own process group, killed whole on timeout."""
    with subprocess.Popen(
        ["bash", str(SCRIPTS / name), str(state_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return subprocess.CompletedProcess(proc.args, -1, out, err + f"\n{name} timed out\n")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stop(state_dir: Path) -> None:
    proc = _run_script("stop_cluster.sh", state_dir, STOP_TIMEOUT_S)
    if proc.returncode != 0:
        print(f"stop_cluster.sh exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A single-node Slurm cluster for the session, stopped at its end (also after errors)."""
    state_dir = tmp_path_factory.mktemp("slurm")
    try:
        proc = _run_script("start_cluster.sh", state_dir, START_TIMEOUT_S)
        if proc.returncode == SKIP_EXIT_CODE:
            reason = (proc.stderr.strip().splitlines() or ["start_cluster.sh exited 3"])[-1]
            pytest.skip(f"no Slurm test cluster: {reason}")
        if proc.returncode != 0:
            pytest.fail(
                f"start_cluster.sh exited {proc.returncode}:\n{proc.stdout}{proc.stderr}",
                pytrace=False,
            )
        # The caller's own Slurm job (if pytest runs inside one) must not leak into test jobs.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
        }
        env["SLURM_CONF"] = proc.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
        yield SlurmCluster(state_dir, env)
    finally:
        _stop(state_dir)
