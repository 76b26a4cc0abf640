"""Training jobs on a real single-node Slurm cluster (tests/slurm_cluster.py): the sbatch
template (one node, and two tasks acting as two nodes), srun without torchrun, launch.submit
through submitit (a sweep), and preemption: `scancel --signal=USR1`, `scontrol requeue`, the
time limit's warning signal, and a signal that reaches one rank only. Every interrupted job
must requeue itself, resume and end with weights bitwise equal to the uninterrupted run.

Jobs that need to be interrupted run with FTTRAIN_STEP_DELAY_S (slower steps, same numbers).
Independent jobs are submitted together and waited for together: the waits (Slurm's 30 s
time-limit timer, the requeue delay) overlap instead of adding up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config_args

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "slurm" / "train.sbatch"
STEPS = 120


def job_args(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    return tiny_config_args(
        assets, run_dir, f"train.max_steps={STEPS}", "checkpoint.every_steps=1000", *extra
    )


def template_job(cluster, assets, run_dir: Path, *sbatch: str, nproc=2, delay=0.0, extra=()):
    env = [
        "ALL",
        f"NPROC_PER_NODE={nproc}",
        f"FTTRAIN_DIR={REPO}",
        f"PYTHON={sys.executable}",
        f"LOG_DIR={run_dir.parent / 'logs'}",
        "OMP_NUM_THREADS=1",
        f"FTTRAIN_STEP_DELAY_S={delay}",
    ]
    return cluster.sbatch(
        [
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            f"--export={','.join(env)}",
            *sbatch,
            str(TEMPLATE),
            *job_args(assets, run_dir, *extra),
        ],
        cwd=run_dir.parent,
    )


def steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count('"train/loss"') if metrics.exists() else 0


def scalars(run_dir: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def tensorboard_values(run_dir: Path, key: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(key)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def training_logs(run_dir: Path, job: int) -> str:
    return "".join(
        p.read_text(errors="replace")
        for p in sorted((run_dir.parent / "logs").glob(f"*-{job}-restart*.log"))
    )


def processes_of(run_dir: Path) -> list[int]:
    """Processes whose command line names the run dir (the job's launcher and workers)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(run_dir).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def worker_of_rank(run_dir: Path, rank: int) -> int | None:
    for pid in processes_of(run_dir):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"launch.train" in cmd:
                return pid
    return None


@pytest.fixture(scope="module")
def straight(slurm_cluster, tiny_assets, tmp_path_factory) -> Path:
    """Acceptance 1: the template trains the run to completion (1 node x 2 processes). Its
    weights are what every interrupted job must end with."""
    run_dir = tmp_path_factory.mktemp("slurm-straight") / "run"
    job = template_job(slurm_cluster, tiny_assets, run_dir)
    assert slurm_cluster.wait(job, timeout=180) == "COMPLETED", training_logs(run_dir, job)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    return run_dir


def test_sbatch_template_trains_to_completion(straight):
    logs = list((straight.parent / "logs").glob("*-restart0.log"))
    assert len(logs) == 1 and "world size 2," in logs[0].read_text()
    out = next(straight.parent.glob("fttrain-*.out")).read_text()
    assert "1 node(s) x 2 process(es)" in out and "training exited with 0" in out
    assert (straight / "model" / "model.safetensors").is_file()


def test_two_tasks_as_two_nodes_and_srun_without_torchrun(
    slurm_cluster, tiny_assets, tmp_path, straight
):
    """Acceptance 4: two Slurm tasks run the template's multi-node path (c10d rendezvous on
    the first node, one process each); `srun` with 2 tasks and no torchrun is one 2-rank run.
    Both train exactly the straight run's steps."""
    nodes_dir, srun_dir = tmp_path / "nodes" / "run", tmp_path / "srun" / "run"
    nodes_dir.parent.mkdir()
    srun_dir.parent.mkdir()
    two_nodes = template_job(
        slurm_cluster, tiny_assets, nodes_dir, "--ntasks=2", "--ntasks-per-node=2",
        "--cpus-per-task=1", nproc=1,
    )  # fmt: skip
    command = " ".join([sys.executable, "-m", "launch.train", *job_args(tiny_assets, srun_dir)])
    srun = slurm_cluster.sbatch(
        [
            "--ntasks=2",
            "--cpus-per-task=1",
            f"--chdir={REPO}",
            "--export=ALL,OMP_NUM_THREADS=1",
            f"--output={srun_dir.parent / 'srun.out'}",
            f"--wrap=srun {command}",
        ]  # fmt: skip
    )
    assert slurm_cluster.wait(two_nodes, timeout=180) == "COMPLETED"
    assert slurm_cluster.wait(srun, timeout=180) == "COMPLETED"
    assert "2 node(s) x 1 process(es)" in next(nodes_dir.parent.glob("fttrain-*.out")).read_text()
    srun_out = (srun_dir.parent / "srun.out").read_text()
    assert srun_out.count("world size 2,") == 1, srun_out[-3000:]  # one run, not two
    for run_dir in (nodes_dir, srun_dir):
        assert scalars(run_dir, "train/loss") == scalars(straight, "train/loss")
        assert same_weights(run_dir, straight)


# Preemptions: how each is delivered, and after how many logged steps.
CASES = {
    "scancel-usr1": 20,
    "scontrol-requeue": 35,
    "time-limit": None,  # the warning signal Slurm sends before --time=2 runs out
    "one-rank-only": 50,  # SIGUSR1 to rank 1's process alone
}


@pytest.fixture(scope="module")
def preempted(slurm_cluster, tiny_assets, tmp_path_factory, straight) -> dict[str, dict]:
    """Every case's job, submitted together; each interrupted once its run reaches its step."""
    root = tmp_path_factory.mktemp("slurm-preempt")
    jobs: dict[str, dict] = {}
    for case in CASES:
        run_dir = root / case / "run"
        run_dir.parent.mkdir()
        if case == "time-limit":
            # Slurm sends the warning once, at its first time-limit check (every 30 s) with at
            # most the warning time + 30 s left, to the job's steps as they are at that moment:
            # a check before `srun` has started the step sends it to no one, and the job runs
            # to its end unwarned (a batch script that starts its step 35 s late never gets it;
            # that is what failed this case in two full-suite runs). So the job starts with a
            # far limit and gets its 2 minutes once it is training (below): the warning is due
            # at once then, and comes at the next check, while the step runs.
            job = template_job(
                slurm_cluster, tiny_assets, run_dir, "--time=10", "--signal=USR1@100", delay=0.5
            )
        else:
            job = template_job(slurm_cluster, tiny_assets, run_dir, delay=0.1)
        jobs[case] = {"job": job, "run_dir": run_dir, "signalled": None}
    deadline = time.monotonic() + 240
    limited = jobs["time-limit"]
    while any(j["signalled"] is None for c, j in jobs.items() if CASES[c]) or not limited.get(
        "extended"
    ):
        assert time.monotonic() < deadline, {
            c: (steps_logged(j["run_dir"]), slurm_cluster.state(j["job"]).get("JobState"))
            for c, j in jobs.items()
        }
        limited_state = slurm_cluster.state(limited["job"])
        if not limited.get("limited") and steps_logged(limited["run_dir"]) >= 5:
            slurm_cluster.run(["scontrol", "update", f"JobId={limited['job']}", "TimeLimit=2"])
            limited["limited"] = True
        if not limited.get("extended") and limited_state.get("JobState") == "COMPLETED":
            # It ran to its end unwarned: no time-limit check came in the ~40 s of training
            # left after its limit was cut. Its test case says so as a skip; the other cases
            # go on.
            limited["extended"] = limited["no_warning"] = True
        if not limited.get("extended") and int(limited_state.get("Restarts", "0")):
            # Requeued by its time limit's warning: let the next attempt finish (else each
            # 1-minute attempt would be cut again).
            slurm_cluster.run(["scontrol", "update", f"JobId={limited['job']}", "TimeLimit=10"])
            limited["extended"] = True
        for case, j in jobs.items():
            at = CASES[case]
            if at is None or j["signalled"] is not None or steps_logged(j["run_dir"]) < at:
                continue
            if case == "scancel-usr1":
                slurm_cluster.cancel(j["job"], "--signal=USR1")
            elif case == "scontrol-requeue":
                slurm_cluster.run(["scontrol", "requeue", str(j["job"])])
            else:
                pid = worker_of_rank(j["run_dir"], 1)
                if pid is None:
                    continue
                os.kill(pid, signal.SIGUSR1)
            j["signalled"], j["signalled_at"] = time.monotonic(), time.time()
        time.sleep(0.1)
    for j in jobs.values():
        j["state"] = slurm_cluster.wait(j["job"], timeout=300)
        j["fields"] = slurm_cluster.state(j["job"])
        j["leftovers"] = processes_of(j["run_dir"])
    return jobs


@pytest.mark.parametrize("case", CASES)
def test_a_preempted_job_saves_requeues_resumes_and_ends_bitwise(preempted, straight, case):
    """Acceptance 3 and 5: the job wrote a checkpoint when interrupted, was requeued, resumed
    from it and completed; final weights and every logged loss equal the uninterrupted run's;
    the restart count is in TensorBoard's scalars; no process outlives the job."""
    j = preempted[case]
    if j.get("no_warning"):
        pytest.skip(
            "Slurm sent no time-limit warning while the job ran (no time-limit check came after "
            "its limit was cut to 2 minutes); "
            "the job completed unwarned, so there was no preemption to check"
        )
    run_dir, logs = j["run_dir"], training_logs(j["run_dir"], j["job"])
    assert j["state"] == "COMPLETED", logs[-4000:]
    restarts = int(j["fields"]["Restarts"])
    assert restarts >= 1, logs[-4000:]
    assert "resumed from" in logs
    stops = [int(s) for s in _stopped_steps(logs)]
    assert stops and all(0 < s < STEPS for s in stops), logs[-4000:]
    if CASES[case]:
        assert stops[0] >= CASES[case]  # each case stopped at its own step
    counts = [float(i) for i in range(restarts + 1)]
    assert [v for _, v in scalars(run_dir, "slurm/restart_count")] == counts
    assert tensorboard_values(run_dir, "slurm/restart_count") == counts
    assert scalars(run_dir, "train/loss") == scalars(straight, "train/loss")
    assert same_weights(run_dir, straight)
    assert not j["leftovers"], f"processes outlived the job: {j['leftovers']}"


def test_a_signal_to_one_rank_stops_every_rank_within_a_minute(preempted):
    """Acceptance 5: only rank 1 got SIGUSR1 (rank 0 never says it received one); both ranks
    stopped at the same step, and that attempt was over, requeued, within 60 s of the signal."""
    j = preempted["one-rank-only"]
    [first] = (j["run_dir"].parent / "logs").glob(f"*-{j['job']}-restart0.log")
    text = first.read_text()
    assert "SIGUSR1 received" not in text  # rank 0 announces only its own signals
    assert "stop requested (signal 10)" in text, text[-3000:]
    assert f"requeueing Slurm job {j['job']}" in text
    assert first.stat().st_mtime - j["signalled_at"] < 60


def _stopped_steps(logs: str) -> list[str]:
    return [
        line.split("stopped at step ")[1].split(" ")[0].rstrip(";")
        for line in logs.splitlines()
        if "stopped at step " in line
    ]


def submit(cluster, *args: str, delay: float = 0.0) -> list[str]:
    """`python -m launch.submit ARGS`; the ids of the jobs it printed."""
    proc = subprocess.run(
        [sys.executable, "-m", "launch.submit", *args],
        cwd=REPO,
        env={**cluster.env, "OMP_NUM_THREADS": "1", "FTTRAIN_STEP_DELAY_S": str(delay)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line.split()[2].rstrip(":") for line in proc.stdout.splitlines() if "submitted" in line]


def test_submit_runs_a_sweep_and_requeues_a_preempted_job(
    slurm_cluster, tiny_assets, tmp_path, straight
):
    """Acceptance 2: launch.submit submits through submitit; a two-value sweep is two jobs,
    each completing in its own run dir (the lr=1e-3 one is the straight run exactly). A submitit
    job sent SIGUSR1 saves, requeues itself, resumes and ends bitwise equal too."""
    base, preempt = tmp_path / "sweep", tmp_path / "preempt" / "run"
    ids = submit(
        slurm_cluster, *job_args(tiny_assets, base), "--tasks-per-node=2", "--time=10",
        "--sweep", "optim.lr=1e-3,3e-3",
    )  # fmt: skip
    assert len(ids) == 2
    [job] = submit(
        slurm_cluster, *job_args(tiny_assets, preempt), "--tasks-per-node=2", "--time=10",
        delay=0.1,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while steps_logged(preempt) < 20:
        assert time.monotonic() < deadline, "the submitit job did not start training"
        time.sleep(0.1)
    slurm_cluster.cancel(job, "--signal=USR1")
    for each in [*ids, job]:
        assert slurm_cluster.wait(each, timeout=180) == "COMPLETED"
    same, other = base / "optim.lr=1e-3", base / "optim.lr=3e-3"
    assert scalars(same, "train/loss") == scalars(straight, "train/loss")
    assert same_weights(same, straight)
    assert scalars(other, "train/loss")[0] == scalars(straight, "train/loss")[0]  # same start
    assert not same_weights(other, straight)  # another lr, another model
    assert int(slurm_cluster.state(job)["Restarts"]) == 1
    assert [v for _, v in scalars(preempt, "slurm/restart_count")] == [0.0, 1.0]
    assert scalars(preempt, "train/loss") == scalars(straight, "train/loss")
    assert same_weights(preempt, straight)
    log = next((preempt / "slurm").rglob("*_0_log.out")).read_text()
    assert "resumed from" in log and "Job completed successfully" in log
