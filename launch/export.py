"""Export a training checkpoint as an HF model: `python -m launch.export CHECKPOINT --output DIR`.

CHECKPOINT is a checkpoint directory (RUN_DIR/checkpoints/step_N) or a checkpoints root, whose
newest valid checkpoint is taken. The model is rebuilt from the checkpoint's own config
(`model.name_or_path`, `method`), its weights replaced by the checkpoint's, and saved with
safetensors (in the checkpoint's `output.dtype`: by default the base model's dtype), config,
generation config and tokenizer, ready for `AutoModelForCausalLM.from_pretrained`. Runs in one
process, no GPU needed.

A LoRA/QLoRA checkpoint holds the adapters only: its export is the peft adapter
(adapter_config.json, adapter_model.safetensors, tokenizer) that `PeftModel.from_pretrained(base,
DIR)` loads onto the base (for qlora: the base quantized as in training). With `--merge` it is a
full HF model instead, the adapter merged into the base (for qlora: into the dequantized 4-bit
base, see trainer/build.py write_adapter); a full fine-tune's export is a full model already,
and --merge changes nothing there.

With `--onnx` the full model is also exported to ONNX, in DIR/onnx/ (model.onnx, the config and
tokenizer files), and checked against PyTorch; `--int8` adds model.int8.onnx, ONNX Runtime's
dynamic int8 quantization. A table of sizes, the logits check and, when the run had eval data,
the eval scores of the three models is printed (launch/onnx_export.py, docs/export.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from data.loader import DataError, use_training_template
from launch.onnx_export import EvalData, OnnxExportError, export_onnx, task_of
from trainer.build import chat_stop_ids, output_dtype, write_adapter, write_hf_model
from trainer.checkpoint.dcp_io import UnsafeCheckpointError
from trainer.checkpoint.files import CheckpointError, describe_error, find_latest_valid, validate
from trainer.checkpoint.manager import read_trainer_state
from trainer.config import ConfigError, RunConfig, directory_problem
from trainer.engine.backends import backend_for
from trainer.engine.base import model_fingerprint
from trainer.model.load import ModelLoadError, build_tokenizer
from trainer.model.methods import MethodError, load_model

log = logging.getLogger("fttrain")


def resolve_checkpoint(path: Path) -> Path:
    if (path / "trainer.json").exists() or (path / "COMPLETE").exists():
        reason = validate(path)
        if reason:
            raise CheckpointError(f"{path}: not a usable checkpoint: {reason}")
        return path
    if path.is_dir():
        found, notes = find_latest_valid(path)
        for note in notes:
            log.warning("%s", note)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no valid checkpoint here")


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Parameters that are another parameter under a second name, e.g. `lm_head.weight` ->
    `model.embed_tokens.weight` in a model with tied input and output embeddings (Llama-3.2-1B,
    Qwen2.5-0.5B, Gemma). A state dict, and so a checkpoint, holds both names;
    `named_parameters()` only the first."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def check_ties(ckpt: Path, fingerprint: dict[str, list[int]], model: torch.nn.Module) -> None:
    """A weight that the model ties but the checkpoint trained as a parameter of its own (the
    base model at model.name_or_path changed since) would load twice into one tensor, the last
    one silently winning. `fingerprint` lists the checkpoint's parameters, tied ones once."""
    for alias, name in tied_names(model).items():
        if alias in fingerprint:
            raise CheckpointError(
                f"{ckpt}: the checkpoint's {alias} is a weight of its own, but the model at "
                f"model.name_or_path ties it to {name} (tie_word_embeddings)"
            )


def check_adapters(ckpt: Path, fingerprint: dict[str, list[int]], model: torch.nn.Module) -> None:
    """The adapters the checkpoint's config builds on the model at model.name_or_path must be
    the ones it trained, name for name and shape for shape: an adapter the checkpoint has no
    weights for (the base gained layers since) would be exported at its initial value, a
    silent no-op, and one it has weights for but the model lacks would be dropped."""
    ours = model_fingerprint(model)
    differ = sorted(n for n in set(fingerprint) | set(ours) if fingerprint.get(n) != ours.get(n))
    if fingerprint and differ:
        name = differ[0]
        raise CheckpointError(
            f"{ckpt}: the checkpoint's adapters do not fit the model at model.name_or_path "
            f"({len(differ)} differ, first: {name}: checkpoint {fingerprint.get(name)} vs "
            f"model {ours.get(name)})"
        )


def load_checkpoint_weights(ckpt: Path, model: torch.nn.Module, backend: str) -> None:
    """Replace `model`'s weights with the checkpoint's (resharded to one process)."""
    backend_for(backend).load_weights(ckpt / "engine", model)


def export(
    checkpoint: Path, output: Path, merge: bool = False, onnx: bool = False, int8: bool = False
) -> Path:
    ckpt = resolve_checkpoint(checkpoint)
    trainer = read_trainer_state(ckpt)
    try:
        raw = yaml.safe_load((ckpt / "config.yaml").read_text())
        raw.pop("derived", None)  # derived numbers are recorded beside the config, not in it
        cfg = RunConfig.model_validate(raw)
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{ckpt}/config.yaml: unreadable ({e})") from None
    adapters = cfg.method != "full"
    if onnx and adapters and not merge:
        raise CheckpointError(
            f"{ckpt}: --onnx exports a full model, and this {cfg.method} checkpoint holds "
            "adapters: add --merge"
        )
    if merge and not adapters:
        log.info("--merge: %s is a full fine-tune (method: full), exported in full as it is", ckpt)
    cpu = torch.device("cpu")
    try:
        # The model training built: for LoRA/QLoRA the peft model (on the quantized base)
        # whose adapters the checkpoint holds; for a full run with `freeze:` the model whose
        # frozen layers the checkpoint leaves out (they come from the base unchanged).
        model = load_model(cfg, cpu)
        tokenizer = build_tokenizer(cfg.model, cfg.task)
    except ModelLoadError as e:
        # The model path was read from the checkpoint, not typed on this command line: say where.
        raise ModelLoadError(f"{ckpt / 'config.yaml'}: {e}") from None
    except MethodError as e:  # e.g. a qlora checkpoint where bitsandbytes cannot load
        raise CheckpointError(f"{ckpt / 'config.yaml'}: {e}") from None
    try:
        # The chat template the run trained with (its own, an override, or the fallback) goes
        # with the export, so apply_chat_template at inference renders the training format.
        use_training_template(cfg.data, tokenizer)
    except DataError as e:
        raise CheckpointError(f"{ckpt / 'config.yaml'}: {e}") from None
    if onnx:  # before anything is written: a model ONNX cannot take fails here, in a second
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        task_of([type(base).__name__], ckpt)
    fingerprint = trainer.get("model_fingerprint", {})
    check_ties(ckpt, fingerprint, model)
    if adapters:
        check_adapters(ckpt, fingerprint, model)
    load_checkpoint_weights(ckpt, model, trainer.get("backend", "ddp"))
    output.mkdir(parents=True, exist_ok=True)
    if adapters and merge:
        # The merge is built from adapter files, as a user's own would be (write_adapter).
        with tempfile.TemporaryDirectory(prefix="fttrain-adapter-") as adapter_dir:
            write_adapter(model, model.state_dict(), tokenizer, Path(adapter_dir), output, cfg)
        what = " (the adapter merged into the base)"
    elif adapters:
        write_adapter(model, model.state_dict(), tokenizer, output)
        what = " (the adapter)"
    else:
        stop_ids = chat_stop_ids(cfg, tokenizer)
        write_hf_model(model, model.state_dict(), tokenizer, output, output_dtype(cfg), stop_ids)
        what = ""
    log.info("exported %s (step %s) to %s%s", ckpt, trainer.get("step"), output, what)
    if onnx:
        del model  # the ONNX export loads the written model again, in fp32
        eval_data = EvalData(Path(cfg.data.eval_path), cfg.data) if cfg.data.eval_path else None
        report = export_onnx(output, int8=int8, eval_data=eval_data)
        print(report.table())
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="checkpoint directory or checkpoints root")
    p.add_argument("--output", type=Path, required=True, help="HF model directory to write")
    p.add_argument(
        "--merge",
        action="store_true",
        help="LoRA/QLoRA checkpoint: write a full model with the adapter merged into the base "
        "(QLoRA: the dequantized base) instead of the adapter; a full fine-tune is unchanged",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write DIR/onnx/model.onnx (+ config and tokenizer) and check its logits "
        "against PyTorch's; a causal LM or a sequence classifier",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="with --onnx: also DIR/onnx/model.int8.onnx (ONNX Runtime dynamic int8 quantization)",
    )
    args = p.parse_args(argv)
    if args.int8 and not args.onnx:
        p.error("--int8 quantizes the ONNX model: add --onnx")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    problem = directory_problem(args.output)
    if problem:  # before the slow part, and instead of mkdir's FileExistsError traceback
        print(f"error: --output: {problem}", file=sys.stderr)
        return 2
    try:
        export(args.checkpoint, args.output, merge=args.merge, onnx=args.onnx, int8=args.int8)
    except (
        CheckpointError,
        ConfigError,
        ModelLoadError,
        UnsafeCheckpointError,
        OnnxExportError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointException as e:  # DCP's read errors (a BaseException, one per rank)
        print(
            f"error: {args.checkpoint}: cannot read the checkpoint ({describe_error(e)})",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
