"""What the trainer reads from Slurm's environment (trainer/slurm.py, trainer/dist.py), without
a cluster: host lists, the world of an srun step, the GPU of each task, and requeueing through
`scontrol` (a stand-in on PATH that records its arguments)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from trainer import slurm
from trainer.dist import DistributedSetupError, cuda_index, world_from_env


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[1-2],b,c[9-10]", ["a1", "a2", "b", "c9", "c10"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("host-[001-002].example", ["host-001.example", "host-002.example"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert slurm.expand_hostlist(hostlist) == hosts


STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}


def test_an_srun_step_with_several_tasks_is_one_world():
    info = world_from_env(STEP)
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 4)
    assert info.slurm is not None
    assert info.slurm.master_addr == "gpu07" and info.slurm.local_world_size == 2
    # Every task of the step computes the same port; another step or job, another port.
    same = world_from_env({**STEP, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).slurm
    other = world_from_env({**STEP, "SLURM_STEP_ID": "1"}).slurm
    assert same.master_port == info.slurm.master_port != other.master_port
    assert 1024 < info.slurm.master_port < 32768
    # Explicit MASTER_ADDR/MASTER_PORT win.
    mine = world_from_env({**STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29999"}).slurm
    assert (mine.master_addr, mine.master_port) == ("10.0.0.1", 29999)


@pytest.mark.parametrize(
    "env",
    [
        # The batch script has SLURM_PROCID=0 and SLURM_NTASKS but is not a step's task.
        {k: v for k, v in STEP.items() if k not in ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID")},
        # A one-task step (python alone, or torchrun inside it) is not a Slurm world.
        {**STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"},
        {},
    ],
    ids=["batch-script", "one-task-step", "no-slurm"],
)
def test_not_an_srun_world(env):
    info = world_from_env(env)
    assert (info.rank, info.world_size, info.slurm) == (0, 1, None)


def test_torchrun_variables_win_over_slurm_ones():
    # torchrun inside an srun task: its RANK/WORLD_SIZE describe the run, not the task's.
    env = {**STEP, "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    info = world_from_env(env)
    assert (info.rank, info.world_size, info.slurm) == (5, 8, None)


def test_inconsistent_slurm_variables_are_a_setup_error():
    with pytest.raises(DistributedSetupError, match="SLURM_PROCID=7 is outside"):
        world_from_env({**STEP, "SLURM_PROCID": "7"})
    with pytest.raises(DistributedSetupError, match="SLURM_STEP_NUM_TASKS='x'"):
        world_from_env({**STEP, "SLURM_STEP_NUM_TASKS": "x"})


@pytest.mark.parametrize(
    "local_rank, visible, index",
    [(0, 1, 0), (3, 1, 0), (3, 4, 3), (0, 8, 0), (7, 8, 7)],
    ids=["own-gpu-0", "own-gpu-3", "all-4", "all-8-first", "all-8-last"],
)
def test_each_task_gets_its_gpu(local_rank, visible, index):
    """One GPU visible (--gpus-per-task, or CUDA_VISIBLE_DEVICES per task): GPU 0, whatever the
    local rank; all of the node's GPUs visible: the local rank."""
    assert cuda_index(local_rank, visible) == index


def test_a_task_without_a_gpu_of_its_own_is_named():
    with pytest.raises(DistributedSetupError, match="local rank 2 has no GPU of its own"):
        cuda_index(2, 2)


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch) -> Path:
    """An `scontrol` on PATH that records its arguments and fails for job 'refused'."""
    calls = tmp_path / "calls"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        'case "$2" in refused) echo "scontrol: error: Job is not requeueable" >&2; exit 1;; '
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_requeue_runs_scontrol_for_this_job_up_to_the_cap(fake_scontrol, caplog):
    assert slurm.requeue(3, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"})
    # An array task requeues itself, not the whole array.
    assert slurm.requeue(3, {"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "79",
                             "SLURM_ARRAY_TASK_ID": "1"})  # fmt: skip
    assert fake_scontrol.read_text().splitlines() == ["requeue 77", "requeue 79_1"]
    # At the cap: no scontrol call, and the log says why.
    assert not slurm.requeue(3, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "3"})
    assert "slurm.max_requeues=3" in caplog.text
    assert len(fake_scontrol.read_text().splitlines()) == 2
    # scontrol refusing is logged with its reason, not raised.
    assert not slurm.requeue(3, {"SLURM_JOB_ID": "refused"})
    assert "Job is not requeueable" in caplog.text
    # Outside Slurm: nothing to requeue.
    assert not slurm.requeue(3, {})


def _srun_like(assets: Path, run_dir: Path, port: int, *extra: str, env: dict[str, str]):
    """Two processes with the variables `srun --ntasks=2` gives its tasks (no torchrun)."""
    import subprocess
    import sys

    from tests.conftest import tiny_config_args
    from tests.launcher import REPO, torchrun_env

    procs = []
    for rank in range(2):
        task_env = torchrun_env(
            SLURM_JOB_ID="9001",
            SLURM_STEP_ID="0",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NODEID="0",
            SLURM_NTASKS="2",
            SLURM_STEP_NUM_TASKS="2",
            SLURM_STEP_NODELIST="127.0.0.1",
            SLURM_STEP_TASKS_PER_NODE="2",
            MASTER_PORT=str(port),
            **env,
        )
        log = open(run_dir.parent / f"task{rank}.log", "w")  # noqa: SIM115
        argv = [sys.executable, "-m", "launch.train", *tiny_config_args(assets, run_dir, *extra)]
        procs.append((subprocess.Popen(argv, cwd=REPO, env=task_env, stdout=log, stderr=log), log))
    return procs


def _finish(procs, timeout: float = 180) -> list[str]:
    import subprocess

    outs = []
    try:
        for proc, _ in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for proc, _ in procs:
            proc.kill()
        raise
    finally:
        for _proc, log in procs:
            log.close()
            outs.append(Path(log.name).read_text())
    for (proc, _), out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    return outs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_srun_tasks_without_torchrun_form_one_run_and_a_signal_to_one_task_requeues(
    tiny_assets, tmp_path, fake_scontrol
):
    """The tasks of `srun --ntasks=2 python -m launch.train` (here: two processes with the
    variables srun sets) are one 2-rank run, not two 1-rank runs sharing a run dir. SIGUSR1 (the
    Slurm warning signal) sent to rank 1 alone: both ranks save the same step and exit 0, and
    rank 0, once, requeues the job through scontrol."""
    import json
    import signal
    import time

    from tests.launcher import free_port

    run_dir = tmp_path / "run"
    extra = ("train.max_steps=400", "checkpoint.every_steps=1000")
    procs = _srun_like(tiny_assets, run_dir, free_port(), *extra, env={})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("train/loss") >= 3):
        assert time.monotonic() < deadline and procs[1][0].poll() is None, "run did not start"
        time.sleep(0.05)
    procs[1][0].send_signal(signal.SIGUSR1)
    outs = _finish(procs)
    assert "world size 2," in outs[0], outs[0][-3000:]
    [ckpt] = (run_dir / "checkpoints").glob("step_*")
    # One checkpoint written by two ranks (two 1-rank runs would write one rank file each).
    assert sorted(p.name for p in ckpt.glob("rank_*.json")) == [
        "rank_00000.json",
        "rank_00001.json",
    ]
    assert 3 <= int(ckpt.name.split("_")[1]) < 400
    assert fake_scontrol.read_text().splitlines() == ["requeue 9001"]
    assert "requeueing Slurm job 9001" in outs[0]
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["slurm/restart_count"] for r in rows if "slurm/restart_count" in r] == [0.0]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_warning_signal_while_the_process_starts_stops_it_after_the_first_step(
    tiny_assets, tmp_path
):
    """SIGUSR1 half a second after start (torch is still being imported) used to kill the
    process: its default action. Now it is remembered; the run stops after its first step with a
    checkpoint and exits 0."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import tiny_config_args
    from tests.launcher import REPO, torchrun_env

    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "launch.train", *tiny_config_args(tiny_assets, run_dir)]
    proc = subprocess.Popen(
        argv, cwd=REPO, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=100)
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "SIGUSR1 received" in text
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000001"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_more_signals_during_the_save_change_nothing(tiny_assets, tmp_path, fake_scontrol):
    """A storm of SIGUSR1 and SIGTERM to both tasks, before and while they save: one stop, one
    checkpoint that verifies, one requeue, exit 0; resuming from it ends bitwise equal to a run
    that was never stopped."""
    import signal
    import time

    from tests.launcher import free_port

    extra = ("train.max_steps=40", "checkpoint.every_steps=1000")
    straight = tmp_path / "straight" / "run"
    straight.parent.mkdir()
    _finish(_srun_like(tiny_assets, straight, free_port(), *extra, env={}))

    run_dir = tmp_path / "stormy" / "run"
    run_dir.parent.mkdir()
    slow = {"FTTRAIN_STEP_DELAY_S": "0.1"}
    procs = _srun_like(tiny_assets, run_dir, free_port(), *extra, env=slow)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("train/loss") >= 5):
        assert time.monotonic() < deadline and procs[0][0].poll() is None, "run did not start"
        time.sleep(0.05)
    for sig in [signal.SIGUSR1, signal.SIGTERM] * 6:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(sig)
        time.sleep(0.03)
    outs = _finish(procs)
    assert outs[0].count("stopped at step") == 1, outs[0][-3000:]
    [ckpt] = (run_dir / "checkpoints").glob("step_*")
    assert (ckpt / "COMPLETE").is_file()
    assert fake_scontrol.read_text().splitlines() == ["requeue 9001"]

    outs = _finish(_srun_like(tiny_assets, run_dir, free_port(), *extra, env={}))
    assert f"resumed from {ckpt}" in outs[0], outs[0][-3000:]  # checksums verified on load
    losses = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in losses if "train/loss" in r] == [
        (r["step"], r["train/loss"]) for r in reference if "train/loss" in r
    ]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_warning_signals_while_a_finished_run_exits_do_not_fail_it(tiny_assets, tmp_path):
    """Slurm's time-limit warning can land after the last step, while the process exits. Python
    puts the default action (kill) back while it shuts down: the job used to end FAILED (signal
    SIGUSR1) after a complete run. SIGUSR1 sent every 5 ms from the final log line on: exit 0."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import tiny_config_args
    from tests.launcher import REPO, torchrun_env

    argv = [sys.executable, "-m", "launch.train", *tiny_config_args(tiny_assets, tmp_path / "r")]
    proc = subprocess.Popen(
        argv, cwd=REPO, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line.decode(errors="replace"))
        if " done: " in seen[-1]:
            break
    sent = 0
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGUSR1)
        sent += 1
        time.sleep(0.005)
    proc.stdout.read()
    proc.wait(timeout=30)
    assert sent > 0 and proc.returncode == 0, (proc.returncode, "".join(seen)[-2000:])
