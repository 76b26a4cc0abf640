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

from data.loader import Batch, StepBatches
from data.templates import TokenizedSample
from trainer import faults
from trainer.config import Derived, RunConfig
from trainer.dist import DistContext, all_reduce_sum, sum_counters
from trainer.engine import Engine, count_target_tokens
from trainer.evaluate import eval_exact_match, eval_loss
from trainer.metrics import MetricsWriter, Progress, peak_memory_mb

log = logging.getLogger("fttrain")


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class TrainState:
    """Counters that advance with the run (and are saved with checkpoints)."""

    step: int = 0  # optimizer steps completed (skipped ones included)
    tokens_seen: int = 0  # input tokens (non-pad) consumed, over all ranks
    num_skipped_steps: int = 0  # steps skipped for a non-finite loss / grad norm
    consecutive_nonfinite: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    num_target_tokens: int
    num_input_tokens: int


@dataclass
class TrainResult:
    state: TrainState
    losses: list[float] = field(default_factory=list)  # per step, as logged (NaN where skipped)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    data_totals: dict[str, float] = field(default_factory=dict)  # summed over ranks, at the end
    stopped: bool = False  # True when a stop was requested (signal) before the last step


def num_real_tokens(batch: Batch) -> torch.Tensor | int:
    """Non-pad input tokens of a micro-batch (packed batches carry the count themselves)."""
    if "num_tokens" in batch:
        return batch["num_tokens"]
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return batch["input_ids"].numel()


def train_step(
    engine: Engine, micro_batches: list[Batch], max_grad_norm: float | None, step: int = 0
) -> StepResult:
    """One optimizer step (`step`, 1-based) over this rank's micro-batches, normalized by the
    global target-token count."""
    ctx = engine.ctx
    # Token counts come from CPU labels (no device sync); one all-reduce gives the global count
    # that every rank must divide by before its first backward.
    local = torch.zeros(2, dtype=torch.float64)
    for b in micro_batches:
        local[0] += count_target_tokens(b["labels"])
        local[1] += num_real_tokens(b)
    counts = all_reduce_sum(ctx, local.to(ctx.device))
    loss_scale = (ctx.world_size / counts[0].clamp(min=1.0)).float()

    loss_sum = torch.zeros((), dtype=torch.float32, device=ctx.device)
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        if i == last and i > 0:
            faults.maybe_fail("micro_step", step, ctx.rank)  # test seam; no-op unless set
        loss_sum += engine.forward_backward(batch, loss_scale, is_last_micro_step=i == last).float()
    grad_norm = engine.clip_grad_norm(max_norm=max_grad_norm)

    stats = torch.stack([loss_sum.double(), grad_norm.detach().double().to(ctx.device)])
    all_reduce_sum(ctx, stats[:1])  # NaN/inf on any rank makes the sum non-finite on all
    global_loss_sum, norm = stats.tolist()  # host sync: once per step, decides skip + logging
    num_target, num_input = counts.tolist()  # host sync: already complete after the line above
    loss = global_loss_sum / max(num_target, 1.0)
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    engine.optimizer_step(skip=skipped)
    return StepResult(loss, norm, skipped, int(num_target), int(num_input))


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

    def __call__(self, engine: Engine) -> dict[str, float]:
        engine.eval()
        model = engine.unwrapped_model()
        ev = self.cfg.eval
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
) -> TrainResult:
    """Run from `state.step` to `derived.total_steps`. `on_step_end` runs after every step on
    every rank (checkpointing plugs in there); it returns True to stop the run early."""
    assert derived.total_steps is not None
    total = derived.total_steps
    state = state or TrainState()
    result = TrainResult(state=state)
    writer = MetricsWriter(run_dir, enabled=ctx.is_main, tensorboard=cfg.logging.tensorboard)
    progress = Progress(
        total, state.step, ctx.is_main, cfg.logging.progress_bar, cfg.logging.every_steps
    )
    data_metrics = getattr(train_batches, "metrics", None)

    def run_eval() -> None:
        if evaluator is None:
            return
        scores = evaluator(engine)
        result.eval_history.append({"step": state.step, **scores})
        writer.write(state.step, scores)
        progress.write(
            f"eval @ step {state.step}: "
            + ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in scores.items())
        )

    if cfg.eval.at_start and state.step == 0:
        run_eval()
    engine.train()
    batches: Iterator[list[Batch]] = iter(train_batches)
    window_start, window_tokens = time.perf_counter(), 0
    try:
        while state.step < total:
            step_start = time.perf_counter()
            res = train_step(engine, next(batches), cfg.train.max_grad_norm, state.step + 1)
            step_time = time.perf_counter() - step_start
            state.step += 1
            state.tokens_seen += res.num_input_tokens
            window_tokens += res.num_input_tokens
            result.losses.append(res.loss if not res.skipped else float("nan"))
            if res.skipped:
                state.num_skipped_steps += 1
                state.consecutive_nonfinite += 1
                log.warning(
                    "step %d: non-finite loss (%s) or grad norm (%s); optimizer step skipped on "
                    "all ranks (%d skipped so far)",
                    state.step,
                    res.loss,
                    res.grad_norm,
                    state.num_skipped_steps,
                )
                if state.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{state.consecutive_nonfinite} consecutive steps had a non-finite loss or "
                        f"gradient norm (last at step {state.step}); stopping. Lower optim.lr, "
                        "check the data, or raise train.max_consecutive_nonfinite"
                    )
            else:
                state.consecutive_nonfinite = 0

            if state.step % cfg.logging.every_steps == 0 or state.step == total:
                elapsed = time.perf_counter() - window_start
                scalars = {
                    "train/loss": res.loss,
                    "train/lr": engine.current_lr(),
                    "train/grad_norm": res.grad_norm,
                    "train/tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "train/tokens_seen": float(state.tokens_seen),
                    "train/step_time_s": step_time,
                    "train/memory_mb": peak_memory_mb(ctx.device),
                    "train/skipped_steps": float(state.num_skipped_steps),
                }
                if data_metrics is not None:
                    scalars |= {f"data/{k}": v for k, v in data_totals(ctx, data_metrics()).items()}
                writer.write(state.step, scalars)
                window_start, window_tokens = time.perf_counter(), 0
                progress.update(
                    state.step,
                    {
                        "loss": f"{res.loss:.4f}",
                        "lr": f"{scalars['train/lr']:.2e}",
                        "tok/s": f"{scalars['train/tokens_per_s']:.0f}",
                    },
                )
            if (
                cfg.eval.every_steps
                and state.step % cfg.eval.every_steps == 0
                and state.step < total
            ):
                run_eval()
            if on_step_end is not None and on_step_end(state, res):
                result.stopped = True
                break
        else:
            run_eval()
        if data_metrics is not None:
            result.data_totals = data_totals(ctx, data_metrics())
    finally:
        progress.close()
        writer.close()
    return result
