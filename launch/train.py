"""Train: `torchrun --nproc_per_node=N -m launch.train CONFIG [section.key=value ...]`
(or `python -m launch.train CONFIG ...` for one process).

Reads and validates the config and the data before any process group starts, then builds the
parts and calls the one `train()`. It holds no training logic.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from trainer import early_signals

    early_signals.install()

import argparse
import contextlib
import faulthandler
import json
import logging
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.build import build_eval_dataset, build_train_batches, discover_labels
from data.loader import DataError
from launch import failures
from trainer import slurm
from trainer.build import build_engine, save_hf_model, seed_everything
from trainer.checkpoint.checkpointing import Checkpointing
from trainer.checkpoint.files import CheckpointError, CheckpointSaveError, saved_labels
from trainer.config import (
    ConfigError,
    Derived,
    RunConfig,
    dump_config,
    load_config,
    resolve_batch,
    with_total_steps,
)
from trainer.dist import (
    DistContext,
    DistributedSetupError,
    gather_objects,
    has_process_group,
    init_distributed,
    mark_collective,
    shutdown,
    world_from_env,
)
from trainer.engine.backends import backend_for
from trainer.engine.deepspeed_ops import DeepSpeedOpError
from trainer.loop import (
    Evaluator,
    NonFiniteLossError,
    NoTargetTokensError,
    TrainState,
    completed_result,
    train,
)
from trainer.model.load import (
    ModelLoadError,
    build_tokenizer,
    check_model_files,
    check_segment_ids,
    check_tokenizer_fits,
)
from trainer.model.methods import MethodError
from trainer.model.packing_probe import PackingNotExact, check_packing_exact

log = logging.getLogger("fttrain")

# Errors whose message is the whole story for the user: printed as is, no traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    ModelLoadError,
    DistributedSetupError,
    NonFiniteLossError,
    NoTargetTokensError,
    CheckpointError,
    CheckpointSaveError,
    DeepSpeedOpError,
    PackingNotExact,
    MethodError,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch.train", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4")
    return p.parse_args(argv)


def setup_logging(rank: int) -> None:
    # Other ranks stay quiet unless something goes wrong.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("transformers", "torch.distributed", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@dataclass
class Prepared:
    """Everything known before any process group starts: validated config and data."""

    cfg: RunConfig
    derived: Derived
    tokenizer: Any
    train_batches: Any
    eval_set: Any


def prepare(argv: list[str] | None = None) -> Prepared:
    """Parse and validate the config, build tokenizer and data; raises a user error (one clear
    message) on bad input, before anything distributed starts."""
    args = parse_args(argv)
    world = world_from_env()
    setup_logging(world.rank)
    cfg = load_config(args.config, args.overrides)
    derived = resolve_batch(cfg, world.world_size)
    backend_for(cfg.train.backend).check(cfg, derived)
    seed_everything(cfg.seed)
    check_model_files(cfg.model)
    tokenizer = build_tokenizer(cfg.model, cfg.task)
    if cfg.task == "sequence_classification" and cfg.data.labels is None:
        labels = classifier_labels(cfg, log if world.rank == 0 else None)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": labels})})
    train_batches = build_train_batches(
        cfg.data,
        tokenizer,
        rank=world.rank,
        world_size=world.world_size,
        micro_batch_size=derived.micro_batch_size,
        grad_accum_steps=derived.grad_accum_steps,
        seed=cfg.seed,
    )
    eval_set = build_eval_dataset(cfg.data, tokenizer)
    derived = with_total_steps(cfg, derived, train_batches.steps_per_epoch)
    return Prepared(cfg, derived, tokenizer, train_batches, eval_set)


def classifier_labels(cfg: RunConfig, log_to: logging.Logger | None) -> list[str]:
    """data.labels when the config does not set them. A resumed classifier keeps the label ids
    it was trained with (its checkpoint's config.yaml): discovery from data that gained or lost
    a label since would renumber them under the restored head, or refuse data that now holds
    one class. Rows of a label the checkpoint does not have are counted as unknown_label.
    Otherwise the labels are discovered from the training data (one pass)."""
    checkpoints = Path(cfg.checkpoint.dir or Path(cfg.run_dir) / "checkpoints")
    saved = saved_labels(checkpoints, cfg.checkpoint.resume)
    if saved is None:
        return discover_labels(cfg.data, log_to)
    if log_to is not None:
        log_to.info(
            "data.labels: the checkpoint's %d labels (%s%s), in its id order; a row with any "
            "other label is a bad row (unknown_label), as data.bad_rows says",
            len(saved),
            ", ".join(saved[:10]),
            ", ..." if len(saved) > 10 else "",
        )
    return saved


def run(argv: list[str] | None = None, *, own_process: bool = False) -> dict:
    """Everything `main` does, raising instead of exiting; returns the run summary. A user error
    is reported (printed once, see launch.failures) before it propagates. `own_process`: the
    caller ends this process right after a failure (`main`, see failures.exit_now), so the
    process group is left as it is: tearing it down after a failure can block."""
    world = world_from_env()
    try:
        p = prepare(argv)
    except USER_ERRORS as e:
        # Every rank reads the same config and data, so every rank fails here alike.
        _report(e, world.rank, world.world_size, group_alive=False, pre_group=True)
        raise
    ctx = init_distributed(p.cfg.train.collective_timeout_s)  # only now: the config is valid
    try:
        summary = _train(p.cfg, p.derived, ctx, p.tokenizer, p.train_batches, p.eval_set)
    except BaseException as e:
        if isinstance(e, USER_ERRORS):
            _report(
                e,
                ctx.rank,
                ctx.world_size,
                group_alive=ctx.distributed,
                pre_group=False,
                group=ctx.cpu_group,
            )
        elif failures.is_comm_error(e) and not getattr(e, "reported", False):
            if ctx.rank == 0:  # one line for the whole job; the other ranks' would repeat it
                failures.report_comm_error(e, rank=ctx.rank)
            else:
                failures.write_error_file(
                    f"error: rank {ctx.rank} lost contact with another rank", consequence=True
                )
            e.reported = True  # type: ignore[attr-defined]
        if not own_process:
            shutdown(ctx, clean=False)
        raise
    # Only after _train's objects (the DDP reducer holds the process group) are gone.
    shutdown(ctx, clean=True)
    if summary.get("requeue") and ctx.is_main:
        # Last: requeueing ends this job (Slurm stops its processes), and the checkpoint it
        # resumes from is complete on every rank by now.
        summary["requeued"] = slurm.requeue(p.cfg.slurm.max_requeues)
    return summary


def _report(
    e: BaseException,
    rank: int,
    world_size: int,
    *,
    group_alive: bool,
    pre_group: bool,
    group: Any = None,
) -> None:
    if getattr(e, "reported", False):
        return
    failures.report_user_error(
        e,
        rank=rank,
        world_size=world_size,
        group_alive=group_alive,
        pre_group=pre_group,
        group=group,
    )
    e.reported = True  # type: ignore[attr-defined]


def _train(
    cfg: RunConfig,
    derived: Derived,
    ctx: DistContext,
    tokenizer: Any,
    train_batches: Any,
    eval_set: Any,
) -> dict:
    """Build the engine, restore, train, save; everything that needs the process group."""
    run_dir = Path(cfg.run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, derived, run_dir / "config.yaml")
        budget = cfg.data.packing and cfg.data.pack_scope == "stream"
        log.info(
            "world size %d, micro batch %d x accumulation %d = global batch %d %s; %d steps "
            "(%d warmup); run dir %s",
            ctx.world_size,
            derived.micro_batch_size,
            derived.grad_accum_steps,
            derived.global_batch_size,
            f"packed rows of {cfg.data.seq_len} tokens" if budget else "samples",
            derived.total_steps,
            derived.warmup_steps,
            run_dir,
        )
    engine = build_engine(cfg, derived, ctx)
    try:
        check_tokenizer_fits(engine.unwrapped_model(), tokenizer, cfg.model)
        if cfg.task == "sequence_classification" and cfg.data.text_pair_field:
            check_segment_ids(engine.unwrapped_model(), tokenizer, cfg.model)
    except ModelLoadError as e:
        raise mark_collective(e) from None  # the same model and tokenizer on every rank
    if cfg.data.packing:
        try:
            check_packing_exact(engine.unwrapped_model(), ctx.device)
        except PackingNotExact as e:
            raise mark_collective(e) from None  # every rank probes the same model alike
    evaluator = Evaluator(cfg, ctx, eval_set.samples, tokenizer) if eval_set else None
    checkpointing = Checkpointing(
        cfg,
        ctx,
        engine,
        train_batches,
        run_dir,
        method=training_method(cfg),
        config_yaml=(run_dir / "config.yaml").read_text() if ctx.is_main else "",
        total_steps=derived.total_steps,
    )
    state = TrainState()
    started = time.time()
    total = derived.total_steps
    assert total is not None
    try:
        checkpointing.restore(state)
        if state.step >= total:
            result = completed_result(ctx, state, run_dir, train_batches)
        else:
            result = train(
                cfg,
                derived,
                ctx,
                engine,
                train_batches,
                run_dir=run_dir,
                evaluator=evaluator,
                state=state,
                on_step_end=checkpointing.on_step_end,
                start_scalars=_slurm_scalars(ctx),
            )
            if not result.stopped:
                checkpointing.finish(result.state)
    finally:
        checkpointing.close()
    summary = {
        "steps": result.state.step,
        "tokens_seen": result.state.tokens_seen,
        "skipped_steps": result.state.num_skipped_steps,
        "empty_steps": result.state.num_empty_steps,
        "final_loss": result.final_loss,
        "train_seconds": round(time.time() - started, 2),
        **result.throughput,  # tokens/s, TFLOP/s per device and MFU over the logged windows
        "eval": result.eval_history,
        "data": result.data_totals,
    }
    if result.stopped:
        summary["stopped"] = True
        # The Slurm warning signal (time limit, preemption) reached a rank: requeue the job.
        summary["requeue"] = bool(
            checkpointing.requeue_requested and cfg.slurm.requeue and slurm.job_id()
        )
        if ctx.is_main:
            log.warning(
                "stopped at step %d on request; %s",
                result.state.step,
                f"requeueing Slurm job {slurm.job_id()}, which resumes from this checkpoint"
                if summary["requeue"]
                else "rerun the same command to resume",
            )
        return summary
    summary_path, model_dir = run_dir / "summary.json", run_dir / "model"
    if not result.losses:  # nothing trained in this invocation: the run was already complete
        # Rank 0 looks at the files; every rank must agree (exporting is collective).
        done = gather_objects(ctx, summary_path.is_file() and model_dir.is_dir())[0]
        if done:
            if ctx.is_main:
                log.info(
                    "already complete at step %d (%s); nothing to train. To train further, "
                    "raise train.max_steps",
                    state.step,
                    summary_path,
                )
            return json.loads(summary_path.read_text()) if ctx.is_main else summary
    if cfg.output.save_hf_model:
        save_hf_model(engine, tokenizer, str(model_dir), ctx, cfg)
        summary["model_dir"] = str(model_dir)
    if ctx.is_main:
        summary_path.write_text(json.dumps(summary, indent=2))
        log.info("%s", describe_eval_change(result.eval_history))
        log.info(
            "done: %s",
            json.dumps({k: v for k, v in summary.items() if k not in ("eval", "data")}),
        )
    return summary


def _slurm_scalars(ctx: DistContext) -> dict[str, float] | None:
    """Under Slurm, how many times the job was requeued (in TensorBoard at each start)."""
    job = slurm.job_id()
    if job is None:
        return None
    if ctx.is_main:
        log.info("Slurm job %s, restart %d", job, slurm.restart_count())
    return {"slurm/restart_count": float(slurm.restart_count())}


def training_method(cfg: RunConfig) -> str:
    """What kind of training writes the checkpoints (`method`): a checkpoint of one method
    does not resume another (a LoRA checkpoint holds adapters, a full one every weight)."""
    return cfg.method


def describe_eval_change(history: list[dict[str, float]]) -> str:
    """One line comparing the first and last evaluation (the demo's before/after)."""
    if not history:
        return "no evaluation was configured"
    first, last = history[0], history[-1]
    if len(history) == 1:
        shown = [f"eval loss {last['eval/loss']:.3f} (step {last['step']})"]
        if "eval/accuracy" in last:
            kind = "accuracy" if "eval/macro_f1" in last else "exact-match accuracy"
            shown.insert(0, f"{kind} {100 * last['eval/accuracy']:.1f}%")
        return "; ".join(shown)
    parts = []
    if "eval/macro_f1" in last:  # a classifier
        parts.append(
            f"accuracy {100 * first['eval/accuracy']:.1f}% (step {first['step']}) -> "
            f"{100 * last['eval/accuracy']:.1f}% (step {last['step']}), macro-F1 "
            f"{first['eval/macro_f1']:.3f} -> {last['eval/macro_f1']:.3f}"
        )
    elif "eval/accuracy" in last:
        parts.append(
            f"exact-match accuracy {100 * first['eval/accuracy']:.1f}% (step {first['step']}) -> "
            f"{100 * last['eval/accuracy']:.1f}% (step {last['step']})"
        )
    parts.append(f"eval loss {first['eval/loss']:.3f} -> {last['eval/loss']:.3f}")
    return "; ".join(parts)


def main(argv: list[str] | None = None, summary_out: dict | None = None) -> int:
    """The CLI: train, and return the process exit code. `summary_out`, when given, receives
    the run summary (launch.submit reads whether the run stopped and requeued its job)."""

    # A rank that seems stuck can be asked where it is: `kill -QUIT PID` prints every thread's
    # Python stack to its stderr (the run goes on). The test launcher does it before it kills
    # a run that outlived its timeout. The process's own stderr: sys.stderr may be a stand-in
    # without a file descriptor (main() called in-process under a capturing test runner).
    with contextlib.suppress(AttributeError, OSError, ValueError, RuntimeError):
        faulthandler.register(signal.SIGQUIT, file=sys.__stderr__, all_threads=True)

    def end(code: int) -> int:
        # A run that failed with its process group up (run() leaves it so) ends its process
        # here and now (failures.exit_now): what the failure left behind (gloo worker threads,
        # a checkpoint writer inside a collective) could keep it, and so the job, from exiting.
        if has_process_group():
            failures.exit_now(code)
        return code

    try:
        summary = run(argv, own_process=True)
        if summary_out is not None:
            summary_out.update(summary)
    except KeyboardInterrupt:
        # The second Ctrl-C (the first one asks for a save at the next step boundary).
        if world_rank_or_zero() == 0:
            failures.emit(
                "error: interrupted: stopped at once without saving; rerun the same command "
                "to resume from the last checkpoint"
            )
        return end(failures.EXIT_INTERRUPTED)
    except USER_ERRORS as e:
        if not getattr(e, "reported", False):  # e.g. an inconsistent launch environment
            failures.report_user_error(e, rank=0, world_size=1, group_alive=False, pre_group=True)
        return end(failures.EXIT_USER_ERROR)
    except Exception as e:
        if getattr(e, "reported", False):  # a lost peer, already said in one line
            return end(1)
        if has_process_group():  # a bug: its traceback is the useful part
            traceback.print_exc()
            end(1)
        raise
    return 0


def world_rank_or_zero() -> int:
    try:
        return world_from_env().rank
    except DistributedSetupError:
        return 0


if __name__ == "__main__":
    exit_code = main()
    early_signals.ignore()  # the run is over: a late warning signal must not kill the exit
    sys.exit(exit_code)
