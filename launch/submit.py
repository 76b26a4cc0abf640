"""Submit a training run to Slurm through submitit:

    python -m launch.submit CONFIG --nodes N --gpus-per-node G [--partition P] [--time T]
        [--account A] [--qos Q] [--mem M] [--constraint C] [--dry-run] [--sweep key=v1,v2]
        [section.key=value ...]

Each job runs one task per GPU (`srun`, no torchrun): the tasks form one run from Slurm's
variables (trainer/slurm.py). Slurm sends `slurm.signal` (SIGUSR1) `slurm.signal_delay_s` before
the time limit; every rank saves a checkpoint at the end of its step, and rank 0 requeues the
job (at most `slurm.max_requeues` times), which resumes from that checkpoint. The config is
validated here, for the job's world size, before anything is submitted.

Logs go to RUN_DIR/slurm/JOBID/ (one file per task; rank 0's is printed). `--sweep key=v1,v2`
submits a job array, one job per value, each with its own run dir RUN_DIR/key=value.
See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import ConfigError, load_config, resolve_batch

EXIT_USER_ERROR = 2


@dataclass
class TrainJob:
    """What each Slurm task runs: `launch.train` in this process, as one rank of the job."""

    config: str
    overrides: list[str] = field(default_factory=list)
    workdir: str = "."

    def __call__(self) -> dict:
        from launch import train

        os.chdir(self.workdir)
        summary: dict = {}
        code = train.main([self.config, *self.overrides], summary_out=summary)
        # The run is over: a warning signal now would start submitit's handler (put back by the
        # run), which requeues the job, or kill the process as it exits.
        from trainer import early_signals

        early_signals.ignore()
        if code != 0:
            raise RuntimeError(f"training failed (exit code {code}); the error is in the log")
        if summary.get("requeue") and summary.get("requeued", True):
            # Stopped on the warning signal and the job is requeued (rank 0 did it; the other
            # ranks leave it to rank 0): leave without a result, so that submitit does not
            # report this attempt as the job's end. The requeued job resumes.
            raise SystemExit(0)
        return summary

    def checkpoint(self):  # -> submitit.helpers.DelayedSubmission
        """submitit's preemption hook, for a signal that arrives before the trainer listens
        for it (while the model loads): requeue the same job; it resumes by itself."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


# launch.submit: --time must exceed slurm.signal_delay_s by this much (Slurm's 30-s check, the
# job's start).
START_MARGIN_S = 120


def minutes(time: str) -> int:
    """Slurm's time formats (`90`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`) in
    whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", time.strip())
    if not match:
        raise ValueError(f"--time {time!r}: not a Slurm time (MINUTES, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = match.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + a * 3600 + b * 60 + c
    elif c or match.group(4) is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif match.group(3) is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # MINUTES
        seconds = a * 60
    return max(1, math.ceil(seconds / 60))


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    key, sep, values = spec.partition("=")
    parts = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not parts:
        raise ValueError(f"--sweep {spec!r}: expected section.key=value1,value2")
    return key.strip(), parts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch.submit",
        description="Submit a training run to Slurm (submitit); see docs/slurm.md.",
    )
    p.add_argument("config", help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument(
        "--gpus-per-node", type=int, default=0, help="GPUs per node; one task each (default 0)"
    )
    p.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="processes per node (default: --gpus-per-node, or 1 without GPUs)",
    )
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per process")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--qos", help="quality of service")
    p.add_argument("--mem", help="memory per node, e.g. 200G")
    p.add_argument("--constraint", help="node features, e.g. h100")
    p.add_argument("--job-name", default="fttrain", help="job name (default fttrain)")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a job array, one job per value (run dirs RUN_DIR/KEY=VALUE); repeatable: the "
        "product of the values",
    )
    p.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    return p.parse_intermixed_args(argv)


def variants(run_dir: str, sweeps: list[tuple[str, list[str]]]) -> list[list[str]]:
    """The overrides of each job of a sweep (one empty list without a sweep)."""
    jobs: list[list[str]] = [[]]
    for key, values in sweeps:
        jobs = [[*job, f"{key}={v}"] for job in jobs for v in values]
    if not sweeps:
        return jobs
    for job in jobs:
        job.append("run_dir=" + str(Path(run_dir) / ",".join(job)))
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    world_size = args.nodes * tasks
    config = str(Path(args.config).resolve())
    try:
        sweeps = [parse_sweep(s) for s in args.sweep]
        time_min = minutes(args.time)
        cfg = load_config(config, args.overrides)
        jobs = variants(cfg.run_dir, sweeps)
        for extra in jobs:  # every job's config, at the job's world size, before submitting
            resolve_batch(load_config(config, [*args.overrides, *extra]), world_size)
        # Slurm sends the warning once, at a 30-s check, to the processes started by then: a
        # warning due within the job's first minute or so could reach none of them.
        if cfg.slurm.signal_delay_s + START_MARGIN_S > time_min * 60:
            raise ConfigError(
                [
                    f"slurm.signal_delay_s: {cfg.slurm.signal_delay_s} s leaves less than "
                    f"{START_MARGIN_S} s of --time {args.time} before the warning is due; Slurm "
                    "may send it (once) before the training processes exist, and then it is lost"
                ]
            )
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR

    # submitit reads the warning signal's name when it is imported (SUBMITIT_PREEMPT_SIGNAL),
    # for sbatch's --signal; the jobs inherit it.
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = cfg.slurm.signal.removeprefix("SIG")
    import submitit

    folder = Path(cfg.run_dir).resolve() / "slurm" / "%j"
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.slurm.max_requeues)
    params: dict = {
        "job_name": args.job_name,
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "time": time_min,
        "signal_delay_s": cfg.slurm.signal_delay_s,
        "additional_parameters": {"requeue": True},
        "stderr_to_stdout": True,
    }
    optional = {
        "gpus_per_node": args.gpus_per_node or None,
        "cpus_per_task": args.cpus_per_task,
        "partition": args.partition,
        "account": args.account,
        "qos": args.qos,
        "mem": args.mem,
        "constraint": args.constraint,
    }
    params |= {k: v for k, v in optional.items() if v is not None}
    executor.update_parameters(**params)
    workdir = os.getcwd()
    submissions = [TrainJob(config, [*args.overrides, *extra], workdir) for extra in jobs]

    if args.dry_run:
        if len(jobs) > 1:
            executor.parameters["map_count"] = len(jobs)  # as submitit does for an array
        print(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))
        for job in submissions:
            print(f"# task: python -m launch.train {' '.join([job.config, *job.overrides])}")
        print(f"# dry run: nothing submitted ({len(jobs)} job(s), {world_size} ranks each)")
        return 0

    try:
        if len(submissions) == 1:
            submitted = [executor.submit(submissions[0])]
        else:
            with executor.batch():
                submitted = [executor.submit(job) for job in submissions]
    except (submitit.core.utils.FailedJobError, OSError) as e:
        first = str(e).strip().splitlines()
        print(f"error: sbatch failed: {first[-1] if first else e}", file=sys.stderr)
        return 1
    for job, sub in zip(submitted, submissions, strict=True):
        run_dir = next(
            (o.split("=", 1)[1] for o in reversed(sub.overrides) if o.startswith("run_dir=")),
            cfg.run_dir,
        )
        print(
            f"submitted job {job.job_id}: {args.nodes} node(s) x {tasks} task(s), run dir {run_dir}"
        )
        print(f"  log (rank 0): {job.paths.stdout}".replace("%t", "0"))
        print(f"  watch: squeue -j {job.job_id}; tensorboard --logdir {run_dir}/tensorboard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
