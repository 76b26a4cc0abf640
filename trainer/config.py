"""Typed, documented run configuration: one YAML file plus `section.key=value` overrides.

Every field is declared once here with its type, default and meaning. `load_config` reports every
problem in one `ConfigError` whose lines each name a key; nothing distributed starts before it
passes. Derived numbers (accumulation, global batch, total and warmup steps) are computed once in
`resolve` and checked to divide.
"""

from __future__ import annotations

import difflib
import math
import os
import signal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from data.config import DataConfig
from data.config_base import Section
from trainer.method_config import FreezeSection, LoraSection, QuantizationSection, method_problems


class ConfigError(ValueError):
    """A run configuration is invalid. `problems` holds one line per problem, each naming a key."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        if len(problems) == 1:  # the usual case: the key and the fix on the one error line
            super().__init__(f"invalid configuration{where}: {problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration{where} ({len(problems)} problem(s)):\n{lines}")


class ModelConfig(Section):
    name_or_path: str = Field(
        ...,
        description="Hub id or local directory of any HF causal LM (AutoModelForCausalLM). A "
        "local path is stored absolute; `org/name` is read as a local path when `org/` is a "
        "directory here (so a typo fails at once instead of being looked up on the Hub).",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer hub id or directory (read as name_or_path is); defaults to "
        "`model.name_or_path`.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype the checkpoint is loaded in (frozen weights stay in it). Trainable "
        "weights are then kept in fp32 unless train.precision=bf16-pure; compute precision is "
        "`train.precision`.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel passed to from_pretrained. auto = sdpa where the model "
        "supports it, else eager (e.g. Gemma2); both keep packed samples apart. The choice is "
        "logged.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    trust_remote_code: bool = Field(
        False, description="Allow code shipped with the model repo to run. Off unless you say so."
    )


class TrainConfig(Section):
    backend: Literal["ddp", "deepspeed"] = Field(
        "ddp",
        description="How the model is distributed: DDP, or DeepSpeed ZeRO (see deepspeed_config).",
    )
    deepspeed_config: str | None = Field(
        None,
        description='DeepSpeed JSON (e.g. configs/deepspeed/zero2.json); its "auto" values are '
        "filled from this config. Required when train.backend is deepspeed.",
    )
    micro_batch_size: int = Field(8, ge=1, description="Samples per forward/backward per rank.")
    grad_accum_steps: int | None = Field(
        None, ge=1, description="Micro-steps per optimizer step. Give this or global_batch_size."
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Samples per optimizer step over all ranks; must equal micro batch x "
        "accumulation x world size.",
    )
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to run. Give this or num_epochs."
    )
    num_epochs: float | None = Field(None, gt=0, description="Epochs to run, if max_steps unset.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Global-norm clipping threshold; null disables clipping."
    )
    precision: Literal["auto", "bf16", "bf16-pure", "fp16", "fp32"] = Field(
        "auto",
        description="Trainable weights and optimizer state stay in fp32 (master weights) and "
        "the compute runs in: auto = bf16 on GPU, fp32 on CPU; bf16 = bf16 (also on CPU); fp16 "
        "= fp16 with a dynamic loss scale (ddp only); fp32 = fp32. bf16-pure keeps weights, "
        "gradients and optimizer state in bf16 too (needs model.dtype=bfloat16; ddp only; "
        "small updates round away). See trainer/engine/precision.py.",
    )
    loss_impl: Literal["auto", "naive", "chunked", "liger", "cce"] = Field(
        "auto",
        description="How the training loss is computed (trainer/model/loss.py). naive: from the "
        "model's full logits upcast to fp32 (batch x seq x vocab floats, kept until backward); "
        "chunked: from the final hidden states and the output head's weight, "
        "train.loss_chunk_tokens tokens at a time, with their gradients; auto: chunked "
        "where the model's head allows it (a plain Linear whose output the model returns "
        "unchanged), else naive, logged at start; liger / cce: the fused kernels of Liger "
        "Kernel / Cut Cross-Entropy (pip install liger-kernel / cut-cross-entropy; CUDA "
        "only). Evaluation always uses the logits.",
    )
    loss_chunk_tokens: int = Field(
        512,
        ge=1,
        description="train.loss_impl chunked: target tokens per chunk. One chunk's logits take "
        "chunk x vocab x 4 bytes (0.25 GB at 512 tokens and a 128k vocabulary); smaller "
        "saves memory, larger runs fewer, bigger matmuls.",
    )
    packed_attention: Literal["auto", "varlen", "mask"] = Field(
        "auto",
        description="How packed rows (data.packing) keep their samples apart "
        "(trainer/model/varlen.py). mask: a block-diagonal boolean mask over each row (sdpa "
        "then cannot use its flash kernel and computes every pair of the row); varlen: "
        "variable-length attention, each sample attending to itself only (torch's varlen flash "
        "kernel on CUDA with bf16/fp16 compute; a per-sample reference elsewhere); auto: varlen "
        "on CUDA when the kernel passes a self-check on the device and the model is a plain "
        "causal decoder under sdpa, else mask. Logged at start.",
    )
    max_consecutive_nonfinite: int = Field(
        5,
        ge=1,
        description="Stop the run after this many optimizer steps in a row were skipped for a "
        "non-finite loss or gradient norm.",
    )
    grad_reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="dtype DDP all-reduces the gradients in. bf16 halves the bytes sent (torch's "
        "bf16_compress_hook: each bucket is cast to bf16, averaged, and cast back) at the cost of "
        "rounding every averaged gradient to bf16 (8 significant bits); only used when "
        "distributed. ddp only: "
        "DeepSpeed sets its own (communication_data_type in its JSON).",
    )
    compile: bool = Field(
        False,
        description="torch.compile each transformer block of the model (its decoder layers), "
        "in place; the embedding, the output head and the loss stay eager "
        "(trainer/model/compile.py). The first step, and the first at a new sequence length, "
        "spend seconds to minutes compiling; fixed shapes (data.packing) compile least. ddp "
        "only.",
    )
    collective_timeout_s: float = Field(
        1800,
        gt=0,
        description="Seconds a rank waits in a collective (process group and checkpoint groups) "
        "for the others before the run fails instead of hanging. Raise it if one rank can be "
        "busy alone for longer (e.g. a resume on a slow filesystem).",
    )


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay; never applied to biases and norm weights."
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    fused: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch's fused AdamW kernel (one kernel for all parameters) instead of the "
        "multi-tensor foreach one. auto = fused where the parameters are on CUDA or the CPU, "
        "foreach elsewhere; on = fused on any device; off = foreach. Under DeepSpeed with the "
        "optimizer offloaded to the CPU, DeepSpeed's CPU Adam is used instead of either.",
    )

    @field_validator("fused", mode="before")
    @classmethod
    def _on_off_from_yaml(cls, value: Any) -> Any:
        # As logging.progress_bar: YAML 1.1 reads an unquoted on/off as a boolean.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value


class ScheduleConfig(Section):
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warmup from 0 to lr over this many steps."
    )
    warmup_ratio: float | None = Field(
        None, ge=0, le=1, description="Warmup as a share of the total steps (instead of steps)."
    )
    decay: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Shape of the decay after warmup."
    )
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="The floor the decay ends at, as a share of the peak lr."
    )


class EvalConfig(Section):
    every_steps: int | None = Field(
        None, ge=1, description="Evaluate every N optimizer steps (and always at the end)."
    )
    at_start: bool = Field(False, description="Also evaluate before the first step (a baseline).")
    max_batches: int | None = Field(None, ge=1, description="Cap eval batches per rank.")
    num_generate: int = Field(
        0, ge=0, description="Eval samples scored by greedy generation (exact-match accuracy)."
    )
    max_new_tokens: int = Field(16, ge=1, description="Generation length for the accuracy eval.")


class LoggingConfig(Section):
    every_steps: int = Field(10, ge=1, description="Log a line / write metrics every N steps.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files.")
    progress_bar: Literal["auto", "on", "off"] = Field(
        "auto", description="auto = a bar when stderr is a terminal, log lines otherwise."
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Peak TFLOP/s of one device, the denominator of train/mfu. null: the dense "
        "bf16 peak of a known NVIDIA GPU (trainer/flops.py); on CPU or another GPU MFU is not "
        "logged.",
    )

    @field_validator("progress_bar", mode="before")
    @classmethod
    def _on_off_from_yaml(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads an unquoted on/off (and yes/no) as a boolean, in the config
        # file and in `logging.progress_bar=off` alike; take it back to the word that was meant.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value


class CheckpointConfig(Section):
    dir: str | None = Field(None, description="Where checkpoints go; default RUN_DIR/checkpoints.")
    every_steps: int | None = Field(
        None, ge=1, description="Save every N optimizer steps (null: only at the end / on stop)."
    )
    save_at_end: bool = Field(True, description="Save after the last step.")
    resume: str = Field(
        "auto",
        description="auto = continue from the newest valid checkpoint if any; never; or a "
        "checkpoint directory path.",
    )
    keep_last: int | None = Field(
        None, ge=1, description="Keep only the newest N valid checkpoints (null: keep all)."
    )
    async_save: bool = Field(
        False,
        description="Write checkpoints in the background; training is blocked only while the "
        "state is copied (DDP backend; DeepSpeed saves synchronously).",
    )
    verify_checksums: bool = Field(
        True, description="On resume, check every file's checksum (else sizes only)."
    )
    stop_signals: list[str] = Field(
        ["SIGTERM", "SIGUSR1"],
        description="Signals that make the run save a checkpoint at the end of the current "
        "step and exit 0 (preemption, time limits). SIGINT (Ctrl-C) always does, and a second "
        "Ctrl-C aborts without saving. launch.run passes SIGUSR1/SIGUSR2 on to its workers; "
        "plain torchrun forwards them only with --signals-to-handle (and then stops the "
        "workers after its --shutdown-timeout, saved or not).",
    )


class OutputConfig(Section):
    save_hf_model: bool = Field(True, description="Save an HF-format model at the end.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the saved HF model (RUN_DIR/model and launch.export). auto: the "
        "base model's, as its config.json records it (`dtype` or `torch_dtype`; float32 if "
        "absent), whatever `model.dtype` training held the weights in.",
    )
    merge_adapter: bool = Field(
        False,
        description="method lora/qlora: beside the adapter in RUN_DIR/model, also write "
        "RUN_DIR/model-merged, a full HF model with the adapter merged into the base (qlora: "
        "into the dequantized 4-bit base it trained against; see launch.export --merge).",
    )


class SlurmConfig(Section):
    """How a run behaves as a Slurm job (launch.submit, slurm/train.sbatch, or srun)."""

    signal: str = Field(
        "SIGUSR1",
        description="The warning signal Slurm sends before the time limit or a preemption "
        "(sbatch --signal=USR1@SECONDS; launch.submit sets it). It stops the run like "
        "checkpoint.stop_signals (a checkpoint at the end of the step on every rank), and then "
        "the job requeues itself when slurm.requeue is true.",
    )
    requeue: bool = Field(
        True,
        description="Under Slurm, after a stop on slurm.signal, rank 0 runs `scontrol requeue` "
        "for its job; the requeued job resumes from that checkpoint. A stop on another signal "
        "(SIGTERM from scancel, or a preemption Slurm requeues by itself) never requeues.",
    )
    max_requeues: int = Field(
        20,
        ge=0,
        description="Requeue at most this many times (the job's SLURM_RESTART_COUNT); beyond "
        "it the job ends after its checkpoint, and submitting it again resumes.",
    )
    signal_delay_s: int = Field(
        300,
        ge=10,
        description="launch.submit: how long before the time limit Slurm sends slurm.signal. "
        "Leave enough for one step and a checkpoint save.",
    )


class RunConfig(Section):
    run_dir: str = Field("runs/default", description="Where logs, checkpoints and the model go.")
    seed: int = Field(1234, description="One seed for model init, data order and dropout.")
    task: Literal["causal_lm", "sequence_classification"] = Field(
        "causal_lm",
        description="causal_lm: next-token loss on the response/assistant tokens "
        "(AutoModelForCausalLM). sequence_classification: one label per row "
        "(AutoModelForSequenceClassification: encoders such as BERT, or decoders with a score "
        "head), data.format=classification, cross-entropy per example; eval reports accuracy, "
        "macro-F1 and a confusion matrix.",
    )
    model: ModelConfig
    data: DataConfig
    method: Literal["full", "lora", "qlora"] = Field(
        "full",
        description="full: every weight trains; lora: low-rank adapters on a frozen base "
        "(`lora:`); qlora: the same on a base quantized with bitsandbytes (`quantization:`).",
    )
    lora: LoraSection = LoraSection()
    quantization: QuantizationSection = QuantizationSection()
    freeze: FreezeSection = FreezeSection()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    output: OutputConfig = OutputConfig()
    slurm: SlurmConfig = SlurmConfig()


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> validated RunConfig, with every problem reported at once.


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, f"{full}."))
    return keys


# Names users bring from HF Trainer / TrainingArguments and axolotl, by leaf name: a key of
# that name anywhere is answered with ours.
ALIASES = {
    "learning_rate": "optim.lr",
    "save_total_limit": "checkpoint.keep_last",
    "save_steps": "checkpoint.every_steps",
    "resume_from_checkpoint": "checkpoint.resume",
    "max_seq_length": "data.seq_len",
    "sequence_len": "data.seq_len",
    "max_length": "data.seq_len",
    "sample_packing": "data.packing",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "num_train_epochs": "train.num_epochs",
    "warmup_ratio": "schedule.warmup_ratio",
    "warmup_steps": "schedule.warmup_steps",
    "lr_scheduler_type": "schedule.decay",
    "lr_scheduler": "schedule.decay",
    "output_dir": "run_dir",
    "logging_steps": "logging.every_steps",
    "eval_steps": "eval.every_steps",
    "base_model": "model.name_or_path",
    "model_name_or_path": "model.name_or_path",
    "bf16": "train.precision",
    "max_grad_norm": "train.max_grad_norm",
    "deepspeed": "train.deepspeed_config",
}


def _suggest(key: str) -> str:
    known = _known_keys(RunConfig)
    alias = ALIASES.get(key.rsplit(".", 1)[-1])
    if alias is not None and alias != key:
        return f" (did you mean '{alias}'?)"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        # Try the leaf name against leaves in the same section.
        leaf = key.rsplit(".", 1)[-1]
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        leaves = [k.rsplit(".", 1)[-1] for k in known if k.startswith(section) and k != section]
        leaf_close = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.6)
        close = [section + leaf_close[0]] if leaf_close else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key{_suggest(key)}")
        elif e["type"] == "missing":
            problems.append(f"{key}: required but not set")
        else:
            given = e.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            # A validator's own ValueError comes as "Value error, <its message>".
            message = e["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {message}{shown}")
    return problems


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([f"{dotted}: '{part}' is a value, not a section"])
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse `section.key=value` strings; values are read as YAML (so 3, 1e-4, true, [1,2])."""
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"{item!r}: an override must look like section.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    if problems:
        raise ConfigError(problems, "command-line overrides")
    return parsed


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read the YAML at `path`, apply overrides, validate. Raises ConfigError listing every problem."""
    tree: dict[str, Any] = {}
    source = str(path) if path else "overrides"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path}"], source)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else "unknown line"
            raise ConfigError([f"{path}:{where}: not valid YAML ({e})"], source) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of sections"], source)
        tree = loaded or {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err), source) from None
    _absolutize_model_paths(cfg)
    problems = check_consistency(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def task_problems(cfg: RunConfig) -> list[str]:
    """Settings that do not fit `task` (a classifier's rows have no response to learn, a causal
    LM's no label)."""
    d, problems = cfg.data, []
    classify = cfg.task == "sequence_classification"
    if classify and d.format != "classification":
        problems.append(
            f"data.format: task=sequence_classification reads labelled rows: set "
            f"data.format=classification (got {d.format})"
        )
    if not classify and d.format == "classification":
        problems.append("data.format=classification: needs task=sequence_classification")
    if classify and d.packing:
        problems.append(
            "data.packing: task=sequence_classification takes one row per example; set "
            "data.packing=false"
        )
    if classify and cfg.eval.num_generate:
        problems.append("eval.num_generate: a classifier does not generate; set it to 0")
    if cfg.freeze.encoder and not classify:
        problems.append("freeze.encoder: needs task=sequence_classification (the head trains)")
    return problems


def check_consistency(cfg: RunConfig) -> list[str]:
    """Cross-field rules that no single field's type can express."""
    problems = []
    t, s = cfg.train, cfg.schedule
    if t.max_steps is None and t.num_epochs is None:
        problems.append("train.max_steps / train.num_epochs: set one of them")
    if t.max_steps is not None and t.num_epochs is not None:
        problems.append("train.max_steps / train.num_epochs: set only one of them")
    if t.grad_accum_steps is None and t.global_batch_size is None:
        problems.append("train.grad_accum_steps / train.global_batch_size: set at least one")
    if t.backend == "deepspeed" and not t.deepspeed_config:
        problems.append("train.deepspeed_config: required when train.backend is deepspeed")
    from trainer.engine.precision import precision_problems  # here: it imports torch

    problems += precision_problems(t.precision, cfg.model.dtype, t.backend)
    if t.backend == "ddp" and t.deepspeed_config:
        problems.append("train.deepspeed_config: only used with train.backend=deepspeed")
    if t.backend == "deepspeed" and t.grad_reduce_dtype != "fp32":
        problems.append(
            f"train.grad_reduce_dtype={t.grad_reduce_dtype}: only with train.backend=ddp; under "
            'DeepSpeed set "communication_data_type" in train.deepspeed_config instead'
        )
    if t.backend == "deepspeed" and t.compile:
        problems.append(
            "train.compile=true: only with train.backend=ddp (DeepSpeed's ZeRO hooks on the "
            "parameters are not compiled here); remove it or use train.backend=ddp"
        )
    problems += method_problems(
        cfg.method,
        "lora" in cfg.model_fields_set,
        "quantization" in cfg.model_fields_set,
        cfg.freeze,
        cfg.output.merge_adapter,
    )
    if s.warmup_steps is not None and s.warmup_ratio is not None:
        problems.append("schedule.warmup_steps / schedule.warmup_ratio: set only one of them")
    if cfg.eval.num_generate and not cfg.data.eval_path:
        problems.append("eval.num_generate: needs data.eval_path")
    for name in cfg.checkpoint.stop_signals:
        if not isinstance(getattr(signal, name, None), signal.Signals):
            problems.append(f"checkpoint.stop_signals: {name!r} is not a signal name")
    if not isinstance(getattr(signal, cfg.slurm.signal, None), signal.Signals):
        problems.append(f"slurm.signal: {cfg.slurm.signal!r} is not a signal name (e.g. SIGUSR1)")
    elif cfg.slurm.signal in ("SIGINT", "SIGKILL", "SIGSTOP"):
        problems.append(f"slurm.signal: {cfg.slurm.signal} cannot be the warning signal")
    problems += task_problems(cfg)
    if cfg.eval.every_steps and not cfg.data.eval_path:
        problems.append("eval.every_steps: needs data.eval_path")
    run_dir_problem = directory_problem(Path(cfg.run_dir))
    if run_dir_problem:
        problems.append(f"run_dir: {run_dir_problem}")
    if cfg.checkpoint.dir or not run_dir_problem:  # the default lies inside run_dir
        checkpoint_dir = cfg.checkpoint.dir or str(Path(cfg.run_dir) / "checkpoints")
        checkpoint_problem = directory_problem(Path(checkpoint_dir))
        if checkpoint_problem:
            problems.append(f"checkpoint.dir: {checkpoint_problem}")
    return problems


def directory_problem(path: Path) -> str | None:
    """Why `path` cannot be used or created as an output directory, or None. Checked up front:
    otherwise it surfaces mid-run, on one rank, as a FileExistsError traceback."""
    try:
        if path.is_symlink() and not path.exists():
            return f"{path} is a broken symbolic link"
        if path.exists():
            if not path.is_dir():
                return f"{path} is a file, not a directory"
            return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
        # The nearest ancestor that exists is where mkdir(parents=True) will start.
        parent = next(p for p in path.absolute().parents if p.exists())
    except OSError as e:  # e.g. a parent directory we may not look into
        return f"{path}: cannot be checked ({e.strerror})"
    if not parent.is_dir():
        return f"{path}: its parent {parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be created: {parent} is not writable"
    return None


def _absolutize_model_paths(cfg: RunConfig) -> None:
    """Make `model.name_or_path` / `model.tokenizer` absolute when they name something local,
    so the config saved in the run directory and in every checkpoint still finds the model from
    another working directory (`launch.export`). Hub ids are left as they are."""
    m = cfg.model
    for field in ("name_or_path", "tokenizer"):
        value = getattr(m, field)
        if value is None:
            continue
        path = Path(value).expanduser()
        if path.exists():
            setattr(m, field, os.path.abspath(path))


# ---------------------------------------------------------------------------------------------
# Derived numbers, computed in one place.


class Derived(BaseModel):
    """Numbers that follow from the config and the world size; see `resolve`."""

    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    # Filled in once the dataset size is known (`with_total_steps`).
    total_steps: int | None = None
    warmup_steps: int | None = None
    steps_per_epoch: int | None = None


def resolve_batch(cfg: RunConfig, world_size: int) -> Derived:
    """Compute accumulation and global batch for `world_size`; raise ConfigError if they don't divide."""
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size is not None:
        if t.global_batch_size % per_step:
            raise ConfigError(
                [
                    f"train.global_batch_size={t.global_batch_size} is not divisible by "
                    f"train.micro_batch_size={t.micro_batch_size} x world size {world_size} "
                    f"= {per_step}; pick a global batch that is a multiple of {per_step}"
                ]
            )
        accum = t.global_batch_size // per_step
        if t.grad_accum_steps is not None and t.grad_accum_steps != accum:
            raise ConfigError(
                [
                    f"train.grad_accum_steps={t.grad_accum_steps} disagrees with "
                    f"train.global_batch_size={t.global_batch_size} at world size {world_size} "
                    f"(which needs {accum}); set only one of them"
                ]
            )
    else:
        assert t.grad_accum_steps is not None  # guaranteed by check_consistency
        accum = t.grad_accum_steps
    return Derived(
        world_size=world_size,
        micro_batch_size=t.micro_batch_size,
        grad_accum_steps=accum,
        global_batch_size=per_step * accum,
    )


def with_total_steps(cfg: RunConfig, derived: Derived, steps_per_epoch: int | None) -> Derived:
    """Fill total/warmup steps once the data's steps per epoch are known (None: unknown)."""
    if cfg.train.max_steps is not None:
        total = cfg.train.max_steps
    else:
        if steps_per_epoch is None:
            why = "a dataset of known size"
            if cfg.data.packing and cfg.data.pack_scope == "stream":
                # The shard manifest counts samples, not the packed rows they will make.
                why = (
                    "steps per epoch known in advance, and a shard stream packed to a token "
                    "budget (data.packing with data.pack_scope=stream) makes a number of rows "
                    "known only once read"
                )
                raise ConfigError(
                    [
                        f"train.num_epochs: needs {why}; set train.max_steps, or "
                        "data.pack_scope=micro_batch"
                    ]
                )
            raise ConfigError([f"train.num_epochs: needs {why}; set train.max_steps"])
        total = max(1, math.floor(cfg.train.num_epochs * steps_per_epoch))
    s = cfg.schedule
    if s.warmup_steps is not None:
        warmup = s.warmup_steps
    elif s.warmup_ratio is not None:
        warmup = round(s.warmup_ratio * total)
    else:
        warmup = 0
    if warmup > total:
        raise ConfigError([f"schedule.warmup_steps={warmup} exceeds the {total} total steps"])
    return derived.model_copy(
        update={"total_steps": total, "warmup_steps": warmup, "steps_per_epoch": steps_per_epoch}
    )


def dump_config(cfg: RunConfig, derived: Derived | None, path: str | Path) -> None:
    """Write the resolved config (and derived numbers) as YAML, for the run directory."""
    out = cfg.model_dump(mode="json")
    if derived is not None:
        out["derived"] = derived.model_dump()
    Path(path).write_text(yaml.safe_dump(out, sort_keys=False))
