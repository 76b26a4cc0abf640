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
"""

from __future__ import annotations

import signal
import sys

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


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    args = parse(sys.argv[1:] if argv is None else argv)
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
            "step unless an error is shown above. Rerun the same command to resume.",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_SIGNAL_BASE + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
