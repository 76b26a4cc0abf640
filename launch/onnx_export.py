"""ONNX export of an HF model directory (what `launch.export --onnx` writes beside the HF model).

`export_onnx(model_dir)` writes MODEL_DIR/onnx/: model.onnx (fp32, from `torch.onnx.export`),
with `int8=True` also model.int8.onnx (ONNX Runtime's dynamic quantization, int8 weights), and
the model's config and tokenizer files, so that the folder alone is deployable. Two tasks, read
from config.json's `architectures`:

- causal LM (`...ForCausalLM`): inputs input_ids, attention_mask [batch, sequence]; output
  `logits` [batch, sequence, vocab] of a full forward, without a KV cache (use_cache=False).
- sequence classification (`...ForSequenceClassification`): inputs input_ids, attention_mask
  (+ token_type_ids when the model takes them, as BERT does); output `logits` [batch, num_labels].

Batch and sequence are dynamic axes. ONNX Runtime's logits are checked against PyTorch's on
inputs of other shapes than the export's sample (a mismatch is an error), and, given eval rows,
the PyTorch, ONNX and int8 models are scored side by side (accuracy for a classifier, mean token
loss for a causal LM); that scoring is optional: its failure is a warning. docs/export.md.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger("fttrain")

CAUSAL_LM = "causal_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
TASK_SUFFIXES = {"ForCausalLM": CAUSAL_LM, "ForSequenceClassification": SEQUENCE_CLASSIFICATION}
ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
# 18: the newest opset whose every op ONNX Runtime's CPU kernels have had for years (the dynamo
# exporter's default in torch 2.13); the graph needs nothing newer.
OPSET = 18
# Files of the HF directory that are weights (the ONNX file holds its own): everything else
# (config, generation config, tokenizer files, chat template) is copied next to the ONNX model.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
# The export's sample shape, and the other shapes the logits are compared at (odd sizes, none
# equal to the sample's: a dimension the exporter had frozen to the sample would fail there).
SAMPLE_SHAPE = (2, 8)
CHECK_SHAPES = ((1, 5), (3, 11), (4, 23))
# ONNX Runtime vs PyTorch (both fp32): the same math in another kernel order. A real export
# error (a wrong mask, a frozen shape) is off by the logits' own size, far above this.
LOGITS_RTOL = 1e-3
EVAL_MAX_ROWS = 256
EVAL_BATCH = 8


class OnnxExportError(RuntimeError):
    """The ONNX export cannot be made or is wrong; the message names the model and why."""


def task_of(architectures: list[str] | None, where: Path | str) -> str:
    """causal_lm or sequence_classification, from HF architecture names."""
    for name in architectures or []:
        for suffix, task in TASK_SUFFIXES.items():
            if name.endswith(suffix):
                return task
    shown = ", ".join(architectures or []) or "none recorded"
    raise OnnxExportError(
        f"{where}: architecture {shown} is neither a ...ForCausalLM nor a "
        "...ForSequenceClassification: --onnx exports only these two"
    )


@dataclass
class EvalData:
    """Rows to score the three models on: a JSONL file, read as the run read it.

    `data_cfg` is the run's `data:` section (trainer DataConfig): a causal LM's rows are
    encoded by data.templates.encode_row with it (format, template, fields); a classifier's
    text/pair/label fields come from it. None: plain rows, {"text": ...} (+ "label")."""

    path: Path
    data_cfg: Any = None


@dataclass
class OnnxReport:
    model_dir: Path
    architecture: str
    task: str
    input_names: list[str]
    fp32_path: Path
    int8_path: Path | None
    hf_bytes: int
    fp32_bytes: int
    int8_bytes: int | None
    checked_shapes: list[tuple[int, int]]
    max_abs_diff: float  # ONNX fp32 vs PyTorch
    int8_max_abs_diff: float | None  # int8 vs PyTorch: informative, not a check
    # "accuracy" (classifier) or "loss" (causal LM) of "hf", "onnx", "int8" on `eval_rows` rows
    eval_metric: str | None = None
    eval_rows: int = 0
    eval_scores: dict[str, float] = field(default_factory=dict)
    eval_warning: str | None = None

    @property
    def int8_ratio(self) -> float | None:
        return None if self.int8_bytes is None else self.int8_bytes / self.fp32_bytes

    def table(self) -> str:
        def mb(n: int) -> str:
            return f"{n / 2**20:9.2f} MB"

        lines = [
            f"ONNX export of {self.model_dir} ({self.architecture}, {self.task}, opset {OPSET})",
            f"  HF safetensors {mb(self.hf_bytes)}",
            f"  ONNX fp32      {mb(self.fp32_bytes)}  {self.fp32_path}",
        ]
        if self.int8_bytes is not None:
            lines.append(
                f"  ONNX int8      {mb(self.int8_bytes)}  {self.int8_path}"
                f"  (int8/fp32 {self.int8_ratio:.2f})"
            )
        shapes = ", ".join(f"{b}x{s}" for b, s in self.checked_shapes)
        lines.append(
            f"  logits check (ONNX Runtime vs PyTorch, batch x sequence {shapes}): "
            f"max abs diff fp32 {self.max_abs_diff:.2e} ok"
            + ("" if self.int8_max_abs_diff is None else f", int8 {self.int8_max_abs_diff:.2e}")
        )
        if self.eval_scores:
            name = "accuracy" if self.eval_metric == "accuracy" else "mean token loss"
            cells = "  ".join(f"{k} {v:.4f}" for k, v in self.eval_scores.items())
            lines.append(f"  eval {name} on {self.eval_rows} rows: {cells}")
        return "\n".join(lines)


class LogitsOnly(nn.Module):
    """The HF model as a function of its input tensors to its logits: the graph's one output.
    A causal LM runs without a cache (use_cache=False), so no past key values go in or out."""

    def __init__(self, model: nn.Module, causal: bool):
        super().__init__()
        self.model, self.causal = model, causal

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.causal:
            kwargs["use_cache"] = False
        return self.model(**kwargs, return_dict=True).logits


def load_fp32(model_dir: Path) -> tuple[nn.Module, str, str]:
    """The HF model at `model_dir` in fp32 (ONNX Runtime's CPU kernels are fp32: a bf16
    export's weights are upcast exactly), eager attention (every architecture has it); its
    architecture and task."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise OnnxExportError(f"{model_dir}: not an HF model directory ({first_line(e)})") from None
    architecture = (config.architectures or ["?"])[0]
    task = task_of(config.architectures, model_dir)
    auto = AutoModelForCausalLM if task == CAUSAL_LM else AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise OnnxExportError(f"{model_dir}: cannot load {architecture}: {first_line(e)}") from None
    model.eval()
    return model, architecture, task


def input_names_for(model: nn.Module) -> list[str]:
    names = ["input_ids", "attention_mask"]
    # Segment ids are an input only where there is a segment 1 to give: RoBERTa, XLM-R and
    # CamemBERT take the argument but have one segment (type_vocab_size 1), so any 1 would index
    # past their table.
    types = getattr(model.config, "type_vocab_size", 0) or 0
    if "token_type_ids" in inspect.signature(model.forward).parameters and types > 1:
        names.append("token_type_ids")
    return names


def pad_id_of(config: Any) -> int:
    pad = getattr(config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def sample_inputs(
    config: Any, names: list[str], batch: int, seq: int, seed: int
) -> list[torch.Tensor]:
    """Random ids; rows after the first right-padded (pad id, mask 0) to shorter lengths; for
    token_type_ids the second half of each row is segment 1, as in a sentence pair."""
    g = torch.Generator().manual_seed(seed)
    pad = pad_id_of(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    ids[ids == pad] = (pad + 1) % config.vocab_size  # a decoder classifier reads the last non-pad
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    for row in range(batch):
        length = max(1, seq - row * seq // (batch + 1))
        ids[row, length:], mask[row, length:] = pad, 0
        types[row, length // 2 : length] = 1
    by_name = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return [by_name[n] for n in names]


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """torch.onnx and onnxruntime's quantizer talk a lot through warnings and logging (missing
    torchvision ops, renamed axes, "consider pre-processing"): none of it is about this model."""

    class Drop(logging.Filter):  # the quantizer logs through the root logger itself
        def filter(self, record: logging.LogRecord) -> bool:
            return record.levelno >= logging.ERROR

    root, drop = logging.getLogger(), Drop()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    root.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        root.removeFilter(drop)


def export_graph(model: nn.Module, names: list[str], causal: bool, path: Path) -> None:
    """`torch.onnx.export` with the dynamo exporter (torch.export), not the TorchScript one.

    Why: on this stack (torch 2.13, transformers 5.23) the TorchScript tracer exported a tiny
    BertForSequenceClassification whose ONNX Runtime logits were off by 1e-2..3e-2, at the
    sample's own shape too, while the dynamo export matched PyTorch to 1e-7 for Llama (causal LM
    and classifier) and BERT at every shape. torch.export records the batch and sequence sizes
    as symbols with guards instead of tracing Python branches on one example, and the
    TorchScript exporter is deprecated. Its cost: ~10 s for a tiny model, where tracing takes 1.
    """
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    inputs = tuple(sample_inputs(model.config, names, *SAMPLE_SHAPE, seed=0))
    wrapped = LogitsOnly(model, causal).eval()
    with quiet_exporters(), torch.no_grad():
        program = torch.onnx.export(
            wrapped,
            inputs,
            input_names=names,
            output_names=["logits"],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes={n: {0: batch, 1: seq} for n in names},
            optimize=True,
            verbose=False,
        )
    assert program is not None
    # Each node carries its PyTorch stack trace and module path (debugging aids): for a small
    # model more bytes than the weights, and nothing a deployment reads.
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    # Weights inline below ONNX's 2 GB protobuf limit; above it model.onnx + model.onnx.data.
    program.save(path, external_data=None)


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantization: MatMul and Gather (embedding) weights stored as int8
    with a scale per tensor; activations quantized on the fly per batch. No calibration data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = Path(f"{src}.data").exists() or src.stat().st_size > 2**31 - 2**26
    with quiet_exporters():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, use_external_data_format=large)


def onnx_bytes(path: Path) -> int:
    """The model's bytes: the .onnx file and its external data files (written beside it)."""
    import onnx

    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    files = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return total + sum((path.parent / f).stat().st_size for f in files)


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess: Any, names: list[str], inputs: list[torch.Tensor]) -> np.ndarray:
    feed = {n: t.numpy().astype(np.int64) for n, t in zip(names, inputs, strict=True)}
    return sess.run(["logits"], feed)[0]


def torch_logits(model: nn.Module, names: list[str], inputs: list[torch.Tensor]) -> np.ndarray:
    kwargs = dict(zip(names, inputs, strict=True))
    with torch.no_grad():
        return model(**kwargs, return_dict=True).logits.float().numpy()


def copy_deploy_files(model_dir: Path, onnx_dir: Path) -> list[str]:
    """Config, generation config and tokenizer files (not the weights) next to the ONNX model."""
    copied = []
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and ".index." not in f.name:
            shutil.copy2(f, onnx_dir / f.name)
            copied.append(f.name)
    return copied


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (the exporters' run to pages)."""
    return next((line for line in str(e).splitlines() if line.strip()), "")[:300]


def check_logits(
    model: nn.Module, names: list[str], fp32: Any, quant: Any, fp32_path: Path
) -> tuple[float, float]:
    """Max abs difference of ONNX Runtime's logits (fp32, int8) from PyTorch's at CHECK_SHAPES.
    OnnxExportError when the fp32 one is above LOGITS_RTOL of the logits' size (or a shape
    differs): an unfaithful export is an error, not a number in a table."""
    diff, int8_diff = 0.0, 0.0
    for i, (batch, seq) in enumerate(CHECK_SHAPES):
        inputs = sample_inputs(model.config, names, batch, seq, seed=1 + i)
        want = torch_logits(model, names, inputs)
        got = run_session(fp32, names, inputs)
        if got.shape != want.shape:
            raise OnnxExportError(
                f"{fp32_path}: ONNX Runtime's logits have shape {got.shape}, PyTorch's "
                f"{want.shape} (inputs {batch}x{seq})"
            )
        d = float(np.abs(got - want).max())
        bound = LOGITS_RTOL * max(1.0, float(np.abs(want).max()))
        if not d <= bound:  # also NaN
            raise OnnxExportError(
                f"{fp32_path}: ONNX Runtime's logits differ from PyTorch's by {d:.3g} (> "
                f"{bound:.3g}) on {batch}x{seq} inputs: the export is not faithful"
            )
        diff = max(diff, d)
        if quant is not None:
            int8_diff = max(
                int8_diff, float(np.abs(run_session(quant, names, inputs) - want).max())
            )
    return diff, int8_diff


def export_onnx(
    model_dir: Path, *, int8: bool = False, eval_data: EvalData | None = None
) -> OnnxReport:
    """Write MODEL_DIR/onnx/ (see the module docstring) and check it; the report's `table()`
    is what `launch.export` prints. OnnxExportError: not a model, not one of the two tasks,
    the exporter failed, or its logits differ from PyTorch's."""
    model, architecture, task = load_fp32(model_dir)
    names = input_names_for(model)
    onnx_dir = model_dir / ONNX_DIR
    onnx_dir.mkdir(exist_ok=True)
    fp32_path = onnx_dir / FP32_FILE
    log.info("exporting %s (%s) to ONNX: %s", model_dir, architecture, fp32_path)
    try:
        export_graph(model, names, task == CAUSAL_LM, fp32_path)
    except Exception as e:  # the exporter's failures have no common type; one line of it
        raise OnnxExportError(
            f"{model_dir}: torch.onnx.export of {architecture} failed: {type(e).__name__}: "
            f"{first_line(e)}"
        ) from None
    copy_deploy_files(model_dir, onnx_dir)
    int8_path = None
    if int8:
        int8_path = onnx_dir / INT8_FILE
        log.info("quantizing to int8: %s", int8_path)
        try:
            quantize_int8(fp32_path, int8_path)
        except Exception as e:  # as above
            raise OnnxExportError(
                f"{fp32_path}: int8 quantization failed: {type(e).__name__}: {first_line(e)}"
            ) from None

    try:
        fp32 = session(fp32_path)
        quant = session(int8_path) if int8_path else None
        diff, int8_diff = check_logits(model, names, fp32, quant, fp32_path)
    except OnnxExportError:
        raise
    except Exception as e:  # ONNX Runtime refusing the graph: an exporter failure too
        raise OnnxExportError(
            f"{fp32_path}: ONNX Runtime cannot run the export of {architecture}: "
            f"{type(e).__name__}: {first_line(e)}"
        ) from None

    report = OnnxReport(
        model_dir=model_dir,
        architecture=architecture,
        task=task,
        input_names=names,
        fp32_path=fp32_path,
        int8_path=int8_path,
        hf_bytes=sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
        fp32_bytes=onnx_bytes(fp32_path),
        int8_bytes=onnx_bytes(int8_path) if int8_path else None,
        checked_shapes=list(CHECK_SHAPES),
        max_abs_diff=diff,
        int8_max_abs_diff=int8_diff if quant is not None else None,
    )
    if eval_data is not None:
        scorers = {"hf": lambda inputs: torch_logits(model, names, inputs)}
        scorers["onnx"] = lambda inputs: run_session(fp32, names, inputs)
        if quant is not None:
            scorers["int8"] = lambda inputs: run_session(quant, names, inputs)
        try:
            score_eval(report, model, task, eval_data, onnx_dir, scorers)
        except Exception as e:  # optional: the export stands without it
            report.eval_warning = (
                f"{eval_data.path}: eval not scored: {type(e).__name__}: {first_line(e)}"
            )
            report.eval_scores = {}
            log.warning("%s", report.eval_warning)
    return report


# Eval: the same rows through the PyTorch model and the ONNX sessions.

Scorer = Callable[[list[torch.Tensor]], np.ndarray]


def read_rows(path: Path, limit: int) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError("not a JSONL file (a shard directory is not read here)")
    rows = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if len(rows) >= limit:
                break
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def pad_batch(
    encoded: list[dict[str, list[int]]], names: list[str], pad: int
) -> list[torch.Tensor]:
    """Right-padded [batch, longest] tensors of `names` (the mask 0 on padding)."""
    width = max(len(e["input_ids"]) for e in encoded)
    out = []
    for name in names:
        fill = pad if name == "input_ids" else 0
        rows = []
        for e in encoded:
            n = len(e["input_ids"])
            values = e.get(name) or ([1] * n if name == "attention_mask" else [0] * n)
            rows.append(list(values) + [fill] * (width - n))
        out.append(torch.tensor(rows, dtype=torch.long))
    return out


def score_eval(
    report: OnnxReport,
    model: nn.Module,
    task: str,
    eval_data: EvalData,
    onnx_dir: Path,
    scorers: dict[str, Scorer],
) -> None:
    """Fill report.eval_*: accuracy (classifier, rows with a label) or mean token loss (causal
    LM) of each scorer on the first EVAL_MAX_ROWS rows, tokenized by the exported tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    rows = read_rows(eval_data.path, EVAL_MAX_ROWS)
    cfg = eval_data.data_cfg
    seq_len = getattr(cfg, "seq_len", None) or getattr(model.config, "max_position_embeddings", 512)
    names = report.input_names
    encoded: list[dict[str, list[int]]] = []
    targets: list[Any] = []
    if task == SEQUENCE_CLASSIFICATION:
        from data.templates import label_value

        text_key = getattr(cfg, "text_field", "text")
        pair_key = getattr(cfg, "text_pair_field", None)
        label_key = getattr(cfg, "label_field", "label")
        label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
        num_labels = model.config.num_labels
        for row in rows:
            text, label = row.get(text_key), label_value(row.get(label_key))
            pair = row.get(pair_key) if pair_key else None
            if not isinstance(text, str) or not isinstance(label, int | str):
                continue
            target = label if isinstance(label, int) else label2id.get(str(label))
            if target is None or not 0 <= target < num_labels:
                continue
            enc = tokenizer(text, pair, truncation=True, max_length=seq_len)
            encoded.append({k: list(v) for k, v in enc.items()})
            targets.append(target)
    else:
        from data.templates import IGNORE_INDEX, RowError, encode_row

        for row in rows:
            try:
                if cfg is not None:
                    sample = encode_row(row, tokenizer, cfg)
                    ids, labels = sample.input_ids, sample.labels
                elif isinstance(row.get("text"), str):
                    ids = tokenizer(row["text"])["input_ids"]
                    labels = list(ids)
                else:
                    continue
            except RowError:
                continue
            ids, labels = ids[:seq_len], labels[:seq_len]
            shifted = [*labels[1:], IGNORE_INDEX]  # what each position is scored on
            if any(x != IGNORE_INDEX for x in shifted):
                encoded.append({"input_ids": list(ids)})
                targets.append(shifted)
    if not encoded:
        raise ValueError(f"no usable rows among the first {len(rows)}")

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else pad_id_of(model.config)
    totals = dict.fromkeys(scorers, 0.0)
    count = 0
    for start in range(0, len(encoded), EVAL_BATCH):
        inputs = pad_batch(encoded[start : start + EVAL_BATCH], names, pad)
        batch_targets = targets[start : start + EVAL_BATCH]
        if task == SEQUENCE_CLASSIFICATION:
            want = np.asarray(batch_targets)
            for name, scorer in scorers.items():
                totals[name] += float((scorer(inputs).argmax(-1) == want).sum())
            count += len(batch_targets)
        else:
            from trainer.model.loss import token_loss_sum

            width = inputs[0].shape[1]
            shifted = torch.tensor(
                [t + [IGNORE_INDEX] * (width - len(t)) for t in batch_targets], dtype=torch.long
            )
            for name, scorer in scorers.items():
                totals[name] += float(token_loss_sum(torch.from_numpy(scorer(inputs)), shifted))
            count += int((shifted != IGNORE_INDEX).sum())
    report.eval_metric = "accuracy" if task == SEQUENCE_CLASSIFICATION else "loss"
    report.eval_rows = len(encoded)
    report.eval_scores = {k: v / count for k, v in totals.items()}
    if not all(math.isfinite(v) for v in report.eval_scores.values()):
        raise ValueError(f"non-finite scores {report.eval_scores}")
