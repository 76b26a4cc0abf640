"""What the trainer relies on from Slurm, checked on a real single-node cluster.

Which SLURM_* variables the batch shell sees and which only a step sees; that `scancel --signal`
reaches every process of a step (torchrun's workers included) but not the batch shell; that a job
requeued from inside itself runs again, with SLURM_RESTART_COUNT=1, a few seconds later.
"""

from __future__ import annotations

import shlex
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm

VARIABLES = (
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NODEID",
    "SLURM_JOB_NUM_NODES",
    "SLURM_RESTART_COUNT",
)
UNSET = "<unset>"
PYTHON = shlex.quote(sys.executable)


def wait_for_files(*paths: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [str(p) for p in paths if not p.exists()]
            pytest.fail(f"not written after {timeout:.0f}s: {missing}")
        time.sleep(0.1)


def parse_variables(line: str) -> dict[str, str]:
    return dict(field.split("=", 1) for field in line.split()[1:])


def test_variables_of_batch_shell_and_of_step(slurm_cluster: SlurmCluster, tmp_path: Path):
    # The same one-liner in the batch shell (sbatch --wrap runs /bin/sh) and in each task.
    show = (
        "import os, sys; print(sys.argv[1], "
        f"*[k + '=' + os.environ.get(k, '{UNSET}') for k in {VARIABLES!r}])"
    )
    wrap = f"{PYTHON} -c {shlex.quote(show)} batch\nsrun {PYTHON} -c {shlex.quote(show)} step"
    job = slurm_cluster.sbatch(
        ["--ntasks=2", f"--output={tmp_path}/%j.out", "--wrap", wrap], cwd=tmp_path
    )
    final = slurm_cluster.wait(job, timeout=30)
    lines = (tmp_path / f"{job}.out").read_text().splitlines()
    assert final == "COMPLETED", lines

    batch = [parse_variables(line) for line in lines if line.startswith("batch ")]
    steps = [parse_variables(line) for line in lines if line.startswith("step ")]
    print("\n".join(lines))
    node = slurm_cluster.state(job)["NodeList"]
    # The batch shell looks like rank 0 of 2 tasks: only the STEP_ variables tell it from a task.
    assert batch == [
        {
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_NUM_TASKS": UNSET,
            "SLURM_STEP_ID": UNSET,
            "SLURM_STEP_NODELIST": UNSET,
            "SLURM_NODEID": "0",
            "SLURM_JOB_NUM_NODES": "1",
            "SLURM_RESTART_COUNT": UNSET,
        }
    ]
    assert sorted(steps, key=lambda s: s["SLURM_PROCID"]) == [
        {
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_ID": "0",
            "SLURM_STEP_NODELIST": node,
            "SLURM_NODEID": "0",
            "SLURM_JOB_NUM_NODES": "1",
            # Unset before the first requeue, not "0".
            "SLURM_RESTART_COUNT": UNSET,
        }
        for rank in (0, 1)
    ]


STEP_WAITS_FOR_USR1 = """
import pathlib, signal, sys, time
marks = pathlib.Path(sys.argv[1])
def on_usr1(signum, frame):
    (marks / "step_usr1").write_text("")
    sys.exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
(marks / "step_ready").write_text("")
time.sleep(30)
sys.exit(5)
"""


def test_usr1_reaches_step_not_batch_and_requeue_runs_again(
    slurm_cluster: SlurmCluster, tmp_path: Path
):
    (tmp_path / "step.py").write_text(STEP_WAITS_FOR_USR1)
    script = tmp_path / "job.sh"
    script.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --requeue
        #SBATCH --ntasks=1
        #SBATCH --open-mode=append
        #SBATCH --output={tmp_path}/%j.out
        restart=${{SLURM_RESTART_COUNT:-0}}
        date +%s.%N > {tmp_path}/start_$restart
        echo "${{SLURM_RESTART_COUNT-{UNSET}}}" > {tmp_path}/restart_count_$restart
        trap 'touch {tmp_path}/batch_usr1' USR1
        if [ "$restart" = 0 ]; then
            srun {PYTHON} {tmp_path}/step.py {tmp_path} &
            wait $!
            echo $? > {tmp_path}/step_rc
            sleep 1  # room for a USR1 to the batch shell, had there been one, to run its trap
            date +%s.%N > {tmp_path}/requeued_at
            scontrol requeue "$SLURM_JOB_ID"
            sleep 60  # ended by the requeue
            exit 7
        fi
        """)
    )
    job = slurm_cluster.sbatch([str(script)], cwd=tmp_path)
    slurm_cluster.wait_running(job, timeout=30)
    wait_for_files(tmp_path / "step_ready")

    # No --batch/--full: every step's processes get it, the batch shell does not.
    slurm_cluster.cancel(job, "--signal=USR1")
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"

    assert (tmp_path / "step_usr1").exists()
    assert (tmp_path / "step_rc").read_text().strip() == "0"
    assert not (tmp_path / "batch_usr1").exists()
    assert slurm_cluster.state(job)["Restarts"] == "1"
    assert (tmp_path / "restart_count_0").read_text().strip() == UNSET
    assert (tmp_path / "restart_count_1").read_text().strip() == "1"
    # A requeued job is held for AuthInfo cred_expire + 1 s (120 s by default; the cluster sets
    # the minimum, 5).
    delay = float((tmp_path / "start_1").read_text()) - float(
        (tmp_path / "requeued_at").read_text()
    )
    print(f"requeued job started again after {delay:.1f}s")
    assert 5 <= delay < 20


LAUNCHER_WITH_CHILDREN = """
import pathlib, signal, subprocess, sys, time
marks, role = pathlib.Path(sys.argv[1]), sys.argv[2]
def on_usr1(signum, frame):
    (marks / f"{role}_usr1").write_text("")
    if role != "launcher":
        sys.exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
if role == "launcher":
    # Like torchrun: workers are child processes, the second one in a session of its own.
    children = [
        subprocess.Popen([sys.executable, __file__, str(marks), "child"]),
        subprocess.Popen([sys.executable, __file__, str(marks), "child_new_session"],
                         start_new_session=True),
    ]
    sys.exit(max(child.wait() for child in children))
(marks / f"{role}_ready").write_text("")
time.sleep(30)
sys.exit(5)
"""


def test_usr1_reaches_children_of_step_process(slurm_cluster: SlurmCluster, tmp_path: Path):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER_WITH_CHILDREN)
    job = slurm_cluster.sbatch(
        [f"--output={tmp_path}/%j.out", "--wrap", f"srun {PYTHON} {launcher} {tmp_path} launcher"],
        cwd=tmp_path,
    )
    wait_for_files(tmp_path / "child_ready", tmp_path / "child_new_session_ready")

    slurm_cluster.cancel(job, "--signal=USR1")
    assert slurm_cluster.wait(job, timeout=30) == "COMPLETED"
    # proctrack/linuxproc signals every descendant of slurmstepd (proctrack/pgid would miss the
    # child in its own session). So torchrun's workers get USR1 straight from Slurm, besides any
    # copy torchrun forwards.
    for role in ("launcher", "child", "child_new_session"):
        assert (tmp_path / f"{role}_usr1").exists(), role
