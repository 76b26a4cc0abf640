"""One object per `train.backend`: the only place that knows which backends exist.

Everything outside `trainer/engine/` asks the backend instead of comparing `train.backend`
with a name: how to check the config before any process starts, how to build the engine (the
model, its optimizer and schedule, wrapped), and how to load a checkpoint's weights into a
plain model for export. What an engine can do at run time (a background checkpoint write:
`Engine.supports_async_save`) is asked of the engine.

DeepSpeed is imported only inside its backend's methods: DDP runs never import it (it is slow
to import and probes for accelerators).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from torch import nn

if TYPE_CHECKING:
    from trainer.config import Derived, RunConfig
    from trainer.dist import DistContext
    from trainer.engine.base import Engine


class Backend(Protocol):
    name: str

    def check(self, cfg: RunConfig, derived: Derived) -> None:
        """Validate what this backend reads beyond the config schema (raise ConfigError)."""
        ...

    def build(self, cfg: RunConfig, derived: Derived, ctx: DistContext) -> Engine:
        """Model -> optimizer -> schedule -> this backend's engine. Collective."""
        ...

    def load_weights(self, engine_dir: Path, model: nn.Module) -> None:
        """Load a checkpoint's model weights (resharded to one process) into `model`; raise
        CheckpointError naming the first tensor that does not fit it."""
        ...


class DDPBackend:
    name = "ddp"

    def check(self, cfg: RunConfig, derived: Derived) -> None:
        pass  # everything it reads is in the config schema

    def build(self, cfg: RunConfig, derived: Derived, ctx: DistContext) -> Engine:
        from trainer.engine.ddp import DDPEngine
        from trainer.model.methods import load_model
        from trainer.optim import build_optimizer, build_scheduler

        assert derived.total_steps is not None and derived.warmup_steps is not None
        model = load_model(cfg, ctx.device)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(
            optimizer, cfg.schedule, derived.total_steps, derived.warmup_steps
        )
        return DDPEngine(
            model,
            optimizer,
            scheduler,
            ctx,
            precision=cfg.train.precision,
            loss_impl=cfg.train.loss_impl,
            loss_chunk_tokens=cfg.train.loss_chunk_tokens,
            grad_reduce_dtype=cfg.train.grad_reduce_dtype,
            compile_blocks=cfg.train.compile,
            packed_attention=cfg.train.packed_attention if cfg.data.packing else None,
        )

    def load_weights(self, engine_dir: Path, model: nn.Module) -> None:
        from trainer.checkpoint import dcp_io
        from trainer.checkpoint.files import CheckpointError

        saved = dcp_io.read_tensor_names(engine_dir)
        # Every name a parameter answers to: tied weights are in the checkpoint under both.
        expected = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        misfits = [n for n in saved if n not in expected or expected[n] != saved[n]]
        if misfits:
            raise CheckpointError(
                f"{engine_dir.parent}: checkpoint tensors do not fit the model at "
                f"model.name_or_path (first: {misfits[0]} {saved[misfits[0]]})"
            )
        # A checkpoint of the trainable parameters only (LoRA) holds fewer tensors.
        trainable_only = set(saved) != set(model.state_dict())
        dcp_io.load_into(model, None, engine_dir, trainable_only=trainable_only)


class DeepSpeedBackend:
    name = "deepspeed"

    def check(self, cfg: RunConfig, derived: Derived) -> None:
        from trainer.engine.deepspeed_config import validate_deepspeed_config

        validate_deepspeed_config(cfg, derived)  # a bad JSON fails before any rank waits

    def build(self, cfg: RunConfig, derived: Derived, ctx: DistContext) -> Engine:
        from trainer.engine.deepspeed_engine import build_deepspeed_engine

        return build_deepspeed_engine(cfg, derived, ctx)

    def load_weights(self, engine_dir: Path, model: nn.Module) -> None:
        from trainer.engine.deepspeed_engine import load_zero_weights_for_export

        load_zero_weights_for_export(engine_dir, model)


BACKENDS: dict[str, Backend] = {b.name: b for b in (DDPBackend(), DeepSpeedBackend())}


def backend_for(name: str) -> Backend:
    """The backend object for a `train.backend` value (the config schema lists the same names)."""
    return BACKENDS[name]
