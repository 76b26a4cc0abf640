"""The training loop: one for every mode (DDP, single process, and the engines to come).

Per optimizer step: take this rank's `grad_accum_steps` micro-batches, count the target tokens
over all of them and all ranks, forward/backward each (gradients synced on the last only), clip,
then step -- or skip the step on every rank when the loss or the gradient norm is not finite.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.loader import Batch, DataError, StepBatches
from data.templates import TokenizedSample
from trainer import faults
from trainer.config import Derived, RunConfig
from trainer.dist import (
    DistContext,
    all_reduce_sum,
    gather_objects,
    mark_collective,
    sum_counters,
)
from trainer.engine.base import Engine
from trainer.evaluate import eval_classification, eval_exact_match, eval_loss
from trainer.flops import model_flops_per_token, num_attention_pairs, resolve_peak_tflops
from trainer.metrics import MetricsWriter, Progress, Throughput, peak_memory_mb
from trainer.model.loss import count_target_tokens

log = logging.getLogger("fttrain")


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class NoTargetTokensError(RuntimeError):
    """The data gives optimizer steps without any token to learn from."""


# A run stops once more than this share of its steps had no target token (or its first did).
MAX_EMPTY_STEP_FRACTION = 0.05


@dataclass
class TrainState:
    """Counters that advance with the run (and are saved with checkpoints)."""

    step: int = 0  # optimizer steps completed (skipped ones included)
    tokens_seen: int = 0  # input tokens (non-pad) consumed, over all ranks
    num_skipped_steps: int = 0  # steps skipped for a non-finite loss / grad norm
    consecutive_nonfinite: int = 0
    num_empty_steps: int = 0  # steps whose global batch had no target token (also skipped)

    # Set by the loop while steps decided on the device are not yet read back (see train()):
    # a checkpoint must count them, so reading the state reads them first.
    flush: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def state_dict(self) -> dict[str, int]:
        if self.flush is not None:
            self.flush()
        return {k: v for k, v in asdict(self).items() if k != "flush"}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool  # non-finite loss or gradient norm: the update was not applied
    num_target_tokens: int
    num_input_tokens: int  # non-pad, over all ranks
    empty: bool = False  # no target token in the global batch: the update was not applied
    num_total_tokens: int = 0  # every input position, padding included, over all ranks
    num_attention_pairs: int = 0  # query-key pairs of the real samples (trainer/flops.py)
    # A step decided on the device (loss, grad_norm and skipped not read yet): [loss, norm,
    # skipped] as a device tensor, read with the next logged step's sync.
    pending: torch.Tensor | None = None


@dataclass
class TrainResult:
    state: TrainState
    losses: list[float] = field(default_factory=list)  # per step, as logged (NaN where skipped)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    data_totals: dict[str, float] = field(default_factory=dict)  # summed over ranks, at the end
    stopped: bool = False  # True when a stop was requested (signal) before the last step
    throughput: dict[str, float] = field(default_factory=dict)  # this invocation's mean rates
    previous_loss: float | None = None  # the last loss logged before a resume (rank 0)

    @property
    def final_loss(self) -> float | None:
        if self.losses:
            return self.losses[-1]
        return self.previous_loss


def num_real_tokens(batch: Batch) -> torch.Tensor | int:
    """Non-pad input tokens of a micro-batch (packed batches carry the count themselves)."""
    if "num_tokens" in batch:
        return batch["num_tokens"]
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return batch["input_ids"].numel()


def train_step(
    engine: Engine,
    micro_batches: list[Batch],
    max_grad_norm: float | None,
    step: int = 0,
    data_error: str | None = None,
    *,
    read: bool = True,
) -> StepResult:
    """One optimizer step (`step`, 1-based) over this rank's micro-batches, normalized by the
    global target-token count. `data_error`: this rank could not read its micro-batches; every
    rank then raises the same DataError before any forward (a rank that left alone would leave
    the others hanging in a collective, and its message would be lost).

    `read=False` (a step that logs nothing), with an engine that can skip on the device
    (`skips_on_device`: fused AdamW's found_inf): the skip is decided on the device and nothing
    is read back; the result's `pending` holds [loss, norm, skipped] for later."""
    ctx = engine.ctx
    # Token counts come from the CPU targets; one all-reduce on the CPU group gives the global count
    # that every rank must divide by before its first backward (no device sync to read it).
    # The throughput counts (all tokens, attention pairs) ride on the same all-reduce.
    local = torch.zeros(5, dtype=torch.float64)
    for b in micro_batches:
        local[0] += count_target_tokens(b["targets"])
        local[1] += num_real_tokens(b)
        local[3] += b["input_ids"].numel()
        local[4] += num_attention_pairs(b)
    local[2] = 1.0 if data_error is not None else 0.0
    num_target, num_input, num_failed, num_total, num_pairs = all_reduce_sum(ctx, local).tolist()
    if num_failed:
        raise_agreed_data_error(ctx, data_error, int(num_failed))
    loss_scale = torch.tensor(ctx.world_size / max(num_target, 1.0), dtype=torch.float32).to(
        ctx.device, non_blocking=True
    )

    loss_sum = torch.zeros((), dtype=torch.float32, device=ctx.device)
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        if i == last and i > 0:
            faults.maybe_fail("micro_step", step, ctx.rank)  # test seam; no-op unless set
        loss_sum += engine.forward_backward(batch, loss_scale, is_last_micro_step=i == last).float()
    grad_norm = engine.clip_grad_norm(max_norm=max_grad_norm)

    stats = torch.stack([loss_sum.double(), grad_norm.detach().double().to(ctx.device)])
    all_reduce_sum(ctx, stats[:1])  # NaN/inf on any rank makes the sum non-finite on all
    # A step without a single target token carries no signal; AdamW would still move the
    # weights (momentum, weight decay), so it is skipped like a non-finite one, and counted.
    # The count is known on the host (CPU all-reduce above).
    empty = num_target == 0
    counts = {
        "num_target_tokens": int(num_target),
        "num_input_tokens": int(num_input),
        "num_total_tokens": int(num_total),
        "num_attention_pairs": int(num_pairs),
    }
    if not read and not empty and getattr(engine, "skips_on_device", False):
        found_inf = (~torch.isfinite(stats).all()).float()  # on the device, no sync
        engine.optimizer_step(skip=False, found_inf=found_inf)
        pending = torch.stack([stats[0] / max(num_target, 1.0), stats[1], found_inf.double()])
        nan = float("nan")
        return StepResult(nan, nan, False, empty=False, pending=pending, **counts)
    global_loss_sum, norm = stats.tolist()  # host sync: once per step, decides skip + logging
    loss = global_loss_sum / max(num_target, 1.0)
    nonfinite = not (math.isfinite(loss) and math.isfinite(norm))
    engine.optimizer_step(skip=nonfinite or empty)
    return StepResult(loss, norm, nonfinite, empty=empty, **counts)


def raise_agreed_data_error(ctx: DistContext, error: str | None, num_failed: int) -> None:
    """Raise, on every rank, the first failing rank's data error (naming that rank)."""
    errors = gather_objects(ctx, error)
    rank, first = next((r, e) for r, e in enumerate(errors) if e is not None)
    where = f" (rank {rank})" if ctx.world_size > 1 else ""
    others = f"; {num_failed - 1} other rank(s) failed too" if num_failed > 1 else ""
    raise mark_collective(DataError(f"{first}{where}{others}"))


def explain_empty_steps(cfg: RunConfig, totals: dict[str, float]) -> str:
    """The likeliest reason the data yields no target tokens, from the pipeline's counters."""
    d = cfg.data
    kept = totals.get("rows_kept", 0.0)
    skipped = {k[len("skipped_") :]: v for k, v in totals.items() if k.startswith("skipped_") and v}
    hints = []
    if skipped:
        shown = ", ".join(f"{k}={int(v)}" for k, v in sorted(skipped.items()))
        hints.append(f"rows skipped as bad: {shown}")
        if "missing_field" in skipped or "wrong_type" in skipped:
            fields = (
                f"data.messages_field={d.messages_field!r}"
                if d.format == "chat"
                else f"data.text_field={d.text_field!r}"
                if d.format == "text"
                else f"data.instruction_field={d.instruction_field!r}, "
                f"data.response_field={d.response_field!r}"
            )
            hints.append(
                f"check that the rows have the fields data.format={d.format} reads ({fields})"
            )
    if kept and totals.get("truncated", 0.0) >= kept / 2:
        hints.append(
            f"{int(totals['truncated'])} of {int(kept)} samples were cut at data.seq_len="
            f"{d.seq_len}, which can remove every response token: raise data.seq_len"
        )
    if not d.loss_on_prompt and not hints:
        hints.append(
            f"the loss is taken on responses only (data.format={d.format}); check that the rows "
            f"have non-empty responses and that data.seq_len={d.seq_len} leaves room for them"
        )
    return "; ".join(hints)


def data_totals(ctx: DistContext, counters: dict[str, float]) -> dict[str, float]:
    """The data pipeline's counters summed over ranks; ratios recomputed from the sums."""
    totals = sum_counters(ctx, {k: v for k, v in counters.items() if k != "packing_efficiency"})
    if totals.get("tokens_total"):
        totals["packing_efficiency"] = totals.get("tokens_real", 0.0) / totals["tokens_total"]
    return totals


class Evaluator:
    """Runs the configured evals on rank-sharded eval samples."""

    def __init__(
        self, cfg: RunConfig, ctx: DistContext, samples: list[TokenizedSample], tokenizer: Any
    ):
        self.cfg, self.ctx, self.samples = cfg, ctx, samples
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.confusion: list[list[int]] | None = None  # the last classification eval's

    def __call__(self, engine: Engine) -> dict[str, float]:
        engine.eval()
        model = engine.unwrapped_model()
        ev = self.cfg.eval
        if self.cfg.task == "sequence_classification":
            labels = self.cfg.data.labels or []
            out, self.confusion = eval_classification(
                model,
                self.samples,
                self.ctx,
                num_labels=len(labels),
                batch_size=self.cfg.train.micro_batch_size,
                pad_id=self.pad_id,
                precision=self.cfg.train.precision,
                max_batches=ev.max_batches,
            )
            engine.train()
            return out
        out = eval_loss(
            model,
            self.samples,
            self.ctx,
            batch_size=self.cfg.train.micro_batch_size,
            pad_id=self.pad_id,
            precision=self.cfg.train.precision,
            max_batches=ev.max_batches,
        )
        if ev.num_generate:
            out |= eval_exact_match(
                model,
                self.samples,
                self.ctx,
                num_samples=ev.num_generate,
                max_new_tokens=ev.max_new_tokens,
                pad_id=self.pad_id,
                eos_id=self.eos_id,
                precision=self.cfg.train.precision,
            )
        engine.train()
        return out


def check_empty_step(
    cfg: RunConfig,
    ctx: DistContext,
    state: TrainState,
    data_metrics: Callable[[], dict[str, float]] | None,
) -> None:
    """Count a step without target tokens; stop the run when the data evidently gives none.
    Called on every rank alike (the count is global), so the error is collective."""
    state.num_empty_steps += 1
    log.warning(
        "step %d: no target token in the global batch; update skipped (%d such steps so far)",
        state.step,
        state.num_empty_steps,
    )
    first = state.step == 1
    too_many = state.num_empty_steps > max(1, MAX_EMPTY_STEP_FRACTION * state.step)
    if not (first or too_many):
        return
    totals = data_totals(ctx, data_metrics()) if data_metrics is not None else {}
    what = (
        "the first step"
        if first
        else f"{state.num_empty_steps} of {state.step} steps (more than "
        f"{MAX_EMPTY_STEP_FRACTION:.0%})"
    )
    raise mark_collective(
        NoTargetTokensError(
            f"{what} had no target token to train on: {explain_empty_steps(cfg, totals)}"
        )
    )


def _carry_over(result: TrainResult, writer: MetricsWriter) -> None:
    """What the run logged before this invocation (kept in metrics.jsonl) counts too: its
    evals, and its last loss when this invocation trains no step."""
    result.eval_history = list(writer.previous_evals)
    if writer.previous_train is not None:
        result.previous_loss = writer.previous_train.get("train/loss")


def completed_result(
    ctx: DistContext, state: TrainState, run_dir: Path, train_batches: StepBatches
) -> TrainResult:
    """The result of a run restored at its last step (a rerun of a finished run): nothing to
    train; the loss and evals it reported come from its metrics.jsonl."""
    result = TrainResult(state=state)
    if ctx.is_main:
        writer = MetricsWriter(run_dir, enabled=True, tensorboard=False, start_step=state.step)
        writer.close()
        _carry_over(result, writer)
    result.data_totals = data_totals(ctx, train_batches.metrics())
    return result


def train(
    cfg: RunConfig,
    derived: Derived,
    ctx: DistContext,
    engine: Engine,
    train_batches: StepBatches,
    *,
    run_dir: Path,
    evaluator: Callable[[Engine], dict[str, float]] | None = None,
    state: TrainState | None = None,
    on_step_end: Callable[[TrainState, StepResult], bool] | None = None,
    start_scalars: dict[str, float] | None = None,
) -> TrainResult:
    """Run from `state.step` to `derived.total_steps`. `on_step_end` runs after every step on
    every rank (checkpointing plugs in there); it returns True to stop the run early.
    `start_scalars` are logged once at the starting step (e.g. the Slurm restart count)."""
    assert derived.total_steps is not None
    total = derived.total_steps
    state = state or TrainState()
    result = TrainResult(state=state)
    writer = MetricsWriter(
        run_dir, enabled=ctx.is_main, tensorboard=cfg.logging.tensorboard, start_step=state.step
    )
    _carry_over(result, writer)
    if start_scalars:
        writer.write(state.step, start_scalars)
    progress = Progress(
        total, state.step, ctx.is_main, cfg.logging.progress_bar, cfg.logging.every_steps
    )
    data_metrics = getattr(train_batches, "metrics", None)
    flops = model_flops_per_token(engine.unwrapped_model(), cfg.data.seq_len)
    peak, peak_source = resolve_peak_tflops(
        cfg.logging.peak_tflops, ctx.device, fp32_compute=cfg.train.precision == "fp32"
    )
    if ctx.is_main:
        log.info("%s; %s", flops.describe(), peak_source)
    throughput = Throughput(flops, peak, ctx.world_size)

    def run_eval() -> None:
        if evaluator is None:
            return
        eval_start = time.perf_counter()
        scores = evaluator(engine)
        throughput.exclude(time.perf_counter() - eval_start)  # rates are of training alone
        result.eval_history.append({"step": state.step, **scores})
        writer.write(state.step, scores)
        confusion = getattr(evaluator, "confusion", None)
        if confusion is not None:
            result.eval_history[-1]["confusion_matrix"] = confusion
            writer.write_confusion(state.step, confusion, cfg.data.labels or [])
        progress.write(
            f"eval @ step {state.step}: "
            + ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in scores.items())
        )

    if cfg.eval.at_start and state.step == 0:
        run_eval()
    engine.train()
    batches: Iterator[list[Batch]] = iter(train_batches)
    # Steps decided on the device (train_step with read=False), read back together at the next
    # logged step, or when a checkpoint reads the state.
    pending: list[tuple[int, StepResult]] = []
    too_many_at: list[int] = []  # the step where consecutive non-finite steps reached the limit

    def settle(step_no: int, res: StepResult) -> None:
        result.losses.append(res.loss if not (res.skipped or res.empty) else float("nan"))
        if not res.skipped:
            state.consecutive_nonfinite = 0
            return
        state.num_skipped_steps += 1
        state.consecutive_nonfinite += 1
        log.warning(
            "step %d: non-finite loss (%s) or grad norm (%s); optimizer step skipped on "
            "all ranks (%d skipped so far)",
            step_no,
            res.loss,
            res.grad_norm,
            state.num_skipped_steps,
        )
        if state.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite and not too_many_at:
            too_many_at.append(step_no)

    def flush() -> None:
        if not pending:
            return
        # host sync: the only one of the steps since the last logged step
        values = torch.stack([r.pending for _, r in pending]).tolist()
        for (step_no, res), (loss, norm, skipped) in zip(pending, values, strict=True):
            res.loss, res.grad_norm, res.skipped, res.pending = loss, norm, bool(skipped), None
            settle(step_no, res)
        pending.clear()

    def stop_if_too_many() -> None:
        if too_many_at:
            err = NonFiniteLossError(  # collective: decided from global sums
                f"{cfg.train.max_consecutive_nonfinite} consecutive steps had a non-finite loss "
                f"or gradient norm (last at step {too_many_at[0]}); stopping. Lower optim.lr, "
                "check the data, or raise train.max_consecutive_nonfinite"
            )
            mark_collective(err)
            raise err

    state.flush = flush
    try:
        while state.step < total:
            step_start = time.perf_counter()
            lr = engine.current_lr()  # the lr this step applies (the schedule moves after it)
            try:
                micro_batches, data_error = next(batches), None
            except DataError as e:
                # Agreed with the other ranks inside train_step, before any forward.
                micro_batches, data_error = [], " ".join(str(e).split())
            logged = (state.step + 1) % cfg.logging.every_steps == 0 or state.step + 1 == total
            res = train_step(
                engine,
                micro_batches,
                cfg.train.max_grad_norm,
                state.step + 1,
                data_error,
                read=logged,
            )
            step_time = time.perf_counter() - step_start
            state.step += 1
            state.tokens_seen += res.num_input_tokens
            throughput.add_step(res.num_input_tokens, res.num_total_tokens, res.num_attention_pairs)
            if res.empty:
                check_empty_step(cfg, ctx, state, data_metrics)
            if res.pending is not None:
                pending.append((state.step, res))
            else:
                flush()
                settle(state.step, res)
            stop_if_too_many()

            if logged:
                scalars = {
                    "train/loss": res.loss,
                    "train/lr": lr,
                    "train/grad_norm": res.grad_norm,
                    **throughput.scalars(),
                    "train/tokens_seen": float(state.tokens_seen),
                    "train/step_time_s": step_time,
                    "train/memory_mb": peak_memory_mb(ctx.device),
                    "train/skipped_steps": float(state.num_skipped_steps),
                    "train/empty_steps": float(state.num_empty_steps),
                }
                if data_metrics is not None:
                    scalars |= {f"data/{k}": v for k, v in data_totals(ctx, data_metrics()).items()}
                writer.write(state.step, scalars)
                shown = {
                    "loss": f"{res.loss:.4f}",
                    "lr": f"{scalars['train/lr']:.2e}",
                    "tok/s": f"{scalars['train/nonpad_tokens_per_s']:.0f}",  # per device
                }
                if "train/mfu" in scalars:
                    shown["mfu"] = f"{scalars['train/mfu']:.1%}"
                progress.update(state.step, shown)
            if (
                cfg.eval.every_steps
                and state.step % cfg.eval.every_steps == 0
                and state.step < total
            ):
                run_eval()
            if on_step_end is not None and on_step_end(state, res):
                result.stopped = True
                break
            stop_if_too_many()  # a checkpoint may have read pending steps
        else:
            run_eval()
        flush()
        if data_metrics is not None:
            result.data_totals = data_totals(ctx, data_metrics())
        result.throughput = throughput.summary()
    finally:
        state.flush = None
        progress.close()
        writer.close()
    return result
