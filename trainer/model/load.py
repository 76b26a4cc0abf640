"""Build the model and tokenizer from `model:`. The model knows nothing of distribution.

Bad model input ends in one `ModelLoadError` line that names the key and the path, never a
library traceback: a local-looking path that does not exist fails at once (it is not tried as
a Hub id), a Hub that cannot be reached fails after one short request (not after the Hub
client's minute of retries), and a load that fails is followed by a look at the directory's
files to name the broken one (library errors rarely do).
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from trainer.config import ModelConfig

log = logging.getLogger("fttrain")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A directory holding none of these has no tokenizer; AutoTokenizer would then build an empty
# one from config.json's model_type (Qwen2: 1 token) and training would "succeed" on garbage.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# Files that carry a vocabulary (tokenizer_config.json alone does not).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Fewer tokens than this is an empty tokenizer built without its vocabulary, not a real one
# (even a character-level vocabulary has ~100).
MIN_TOKENIZER_SIZE = 16

# What from_pretrained raises for unusable files; anything else is translated only when a
# broken file can be named (see `_load`).
LOAD_ERRORS = (OSError, ValueError, ImportError, SafetensorError)


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """A parameter's real shape, also under ZeRO-3 (which leaves an empty placeholder in the
    module and keeps the shape as `ds_shape`)."""
    return tuple(getattr(p, "ds_shape", p.shape))


class ModelLoadError(RuntimeError):
    """The model or tokenizer at `model.name_or_path` could not be loaded."""


def build_tokenizer(cfg: ModelConfig, task: str = "causal_lm") -> Any:
    """Load the tokenizer (`model.tokenizer`, else `model.name_or_path`); for a causal LM every
    sample ends with its eos token, and padding falls back to it. A classifier's tokenizer
    (BERT's has no eos) needs a pad token, or an eos to pad with."""
    if cfg.tokenizer:
        key, source = "model.tokenizer", cfg.tokenizer
    else:
        key, source = "model.name_or_path", cfg.name_or_path
    local = _local_dir(key, source)
    if local is not None and not any((local / f).is_file() for f in TOKENIZER_FILES):
        hint = "" if cfg.tokenizer else "; set model.tokenizer"
        raise ModelLoadError(
            f"{key}={source!r}: no tokenizer files ({' / '.join(TOKENIZER_FILES)}) in {local}{hint}"
        )
    tok = _load(
        AutoTokenizer.from_pretrained,
        key,
        source,
        local,
        is_model=False,
        trust_remote_code=cfg.trust_remote_code,
    )
    if len(tok) < MIN_TOKENIZER_SIZE:
        raise ModelLoadError(
            f"{key}={source!r}: the tokenizer has only {len(tok)} token(s); its vocabulary file "
            f"({' / '.join(VOCAB_FILES[:3])}) is missing"
        )
    if task == "sequence_classification" and tok.pad_token_id is None is tok.eos_token_id:
        raise ModelLoadError(
            f"{key}={source!r}: the tokenizer has neither a pad nor an eos token to pad batches "
            "with; set pad_token in its tokenizer_config.json"
        )
    if tok.eos_token_id is None and task != "sequence_classification":
        raise ModelLoadError(
            f"{key}={source!r}: the tokenizer has no eos token (it ends every sample); set "
            "eos_token in its tokenizer_config.json"
        )
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        # Many causal LMs ship without a pad token; padding positions carry no loss anyway.
        tok.pad_token = tok.eos_token
    return tok


def build_model(
    cfg: ModelConfig,
    device: torch.device,
    *,
    deepspeed_config: dict[str, Any] | None = None,
    task: str = "causal_lm",
    labels: list[str] | None = None,
    **load_kwargs: Any,
) -> PreTrainedModel:
    """Load any HF causal LM onto `device` (weights in `model.dtype`; the engine then keeps the
    trainable ones in its precision policy's master dtype, see trainer/engine/precision.py).

    Attention: `model.attn_implementation=auto` lets transformers pick sdpa where the model
    supports it and eager where it does not (Gemma2); both keep packed samples apart (the mask
    is derived from position_ids). The choice is logged.

    With a ZeRO-3 `deepspeed_config` (resolved, no "auto" left) the model is built already
    partitioned over the process group (transformers runs `deepspeed.zero.Init` and loads each
    rank's shards), so no rank ever holds the full model.

    `load_kwargs` go to from_pretrained as they are (the method layer's quantization config
    and device map, trainer/model/methods.py).

    `task=sequence_classification`: AutoModelForSequenceClassification with one output per
    name of `labels` (id2label/label2id set, so the saved model names its classes). A head of
    another size in the checkpoint is replaced by a new one (logged by transformers), as is a
    missing one (a base model such as bert-base-uncased)."""
    zero3 = None
    if deepspeed_config and deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        # transformers only keeps a weak reference to it: it must outlive from_pretrained, and
        # the model's lifetime too (generate() and save paths ask is_deepspeed_zero3_enabled()).
        zero3 = HfDeepSpeedConfig(deepspeed_config)
    key, source = "model.name_or_path", cfg.name_or_path
    asked = cfg.attn_implementation
    loader = AutoModelForCausalLM.from_pretrained
    if task == "sequence_classification":
        assert labels, "data.labels is resolved before the model is built"
        loader = AutoModelForSequenceClassification.from_pretrained
        load_kwargs = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
            "ignore_mismatched_sizes": True,
            **load_kwargs,
        }
    try:
        model = _load(
            loader,
            key,
            source,
            _local_dir(key, source),
            is_model=True,
            dtype=DTYPES[cfg.dtype],
            attn_implementation=None if asked == "auto" else asked,
            trust_remote_code=cfg.trust_remote_code,
            **load_kwargs,
        )
    except ModelLoadError as e:
        if asked == "auto" or "attention" not in str(e).lower():
            raise
        raise ModelLoadError(
            f"{e}; model.attn_implementation={asked!r} is not supported by this model: set "
            "model.attn_implementation=auto"
        ) from None
    log.info(
        "attention: %s (model.attn_implementation=%s)",
        getattr(model.config, "_attn_implementation", "?"),
        asked,
    )
    if task == "sequence_classification":
        # A decoder classifier (Llama, Qwen: no pad id in their configs) pools its last non-pad
        # token, found by config.pad_token_id: batches of more than one row need it to be the id
        # the collators pad with, in training and in every model built from this config (the
        # merged model, the exports), so it is set here, where they all are built. A config
        # whose pad id is another token would pool a pad of every padded row.
        from data.loader import pad_token_id

        pad = pad_token_id(build_tokenizer(cfg, task))
        if model.config.pad_token_id not in (None, pad):
            log.warning(
                "model config pad_token_id=%s is not the tokenizer's padding id %s: set to %s "
                "(a classifier finds each row's end by it)",
                model.config.pad_token_id,
                pad,
                pad,
            )
        model.config.pad_token_id = pad
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP's no_sync and with frozen inputs (LoRA).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if zero3 is not None:
        model.hf_deepspeed_config = zero3  # keeps the weak reference above alive
        return model  # partitioned parameters are placed by DeepSpeed, not .to()
    if "device_map" in load_kwargs:
        return model  # placed at load (quantized weights cannot be moved by .to())
    return model.to(device)


def check_model_files(cfg: ModelConfig) -> None:
    """Before any process group: a local model directory whose files are missing or broken
    (config.json, safetensors headers and sizes, shard index) fails here, once, with the file
    named, instead of on every rank in the middle of loading. Reads headers only."""
    key, source = "model.name_or_path", cfg.name_or_path
    local = _local_dir(key, source)
    if local is None:
        return  # a Hub id: resolved (and reported) when loading
    broken = _broken_file(local, is_model=True)
    if broken is not None:
        raise ModelLoadError(f"{key}={source!r}: {broken}")


def check_tokenizer_fits(model: torch.nn.Module, tokenizer: Any, cfg: ModelConfig) -> None:
    """Raise ModelLoadError if the tokenizer has ids the model has no embedding row for (they
    would fail deep inside the forward). Fewer tokens than rows is normal (padded vocabularies).
    Works on a built engine's model under any backend: under ZeRO-3 it reads `ds_shape`."""
    tables = [model.get_input_embeddings(), model.get_output_embeddings()]
    rows = min(full_shape(t.weight)[0] for t in tables if t is not None)
    if len(tokenizer) > rows:
        where = f"model.name_or_path={cfg.name_or_path!r}"
        if cfg.tokenizer:
            where += f", model.tokenizer={cfg.tokenizer!r}"
        raise ModelLoadError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding table has "
            f"{rows} rows ({where})"
        )


def check_segment_ids(model: torch.nn.Module, tokenizer: Any, cfg: ModelConfig) -> None:
    """Raise ModelLoadError if the tokenizer gives a sentence pair's second text segment id 1
    while the model has one segment embedding (RoBERTa-family type_vocab_size=1): training on
    pairs would fail with an index error deep inside the forward."""
    config = getattr(model, "config", None)
    segments = getattr(config, "type_vocab_size", None)
    if segments is None or segments > 1:
        return
    try:
        types = tokenizer("a", "b").get("token_type_ids") or []
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode pairs is not this check's
        return
    if max(types, default=0) >= segments:
        where = f"model.name_or_path={cfg.name_or_path!r}"
        if cfg.tokenizer:
            where += f", model.tokenizer={cfg.tokenizer!r}"
        raise ModelLoadError(
            f"the tokenizer gives sentence pairs segment ids up to {max(types)} but the model "
            f"has type_vocab_size={segments} ({where}); use the model's own tokenizer"
        )


# ---------------------------------------------------------------------------------------------
# Where a model comes from: a local directory or a Hub id, and what to say when neither works.


def _looks_local(source: str) -> bool:
    """Whether `source` can only be meant as a local path. A Hub id (`name` or `org/name`) has
    the shape of a relative path, so an `org/name` whose `org` is a directory here counts as
    local: `models/qwen2bpee` is a typo of `models/qwen2base`, not a Hub repository."""
    if source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1:
        return True
    return "/" in source and Path(source.split("/", 1)[0]).is_dir()


def _local_dir(key: str, source: str) -> Path | None:
    """The local directory `source` names, or None for a Hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{key}={source!r}: {path} is a file, not a model directory")
    if _looks_local(source):
        raise ModelLoadError(f"{key}={source!r}: no such directory ({path.absolute()})")
    return None


def _hub_unreachable(repo_id: str) -> str | None:
    """None if the Hub answers for `repo_id`; else why it cannot be used (one line). One request
    with the Hub client's etag timeout (HF_HUB_ETAG_TIMEOUT), no retries: from_pretrained would
    retry each file for ~23 s before giving up."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    try:
        HfApi().model_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError:
        return None  # reachable; from_pretrained says what access is missing
    except RepositoryNotFoundError:
        return "no such repository, or it is private: log in with `hf auth login`"
    except Exception as e:  # noqa: BLE001 - any network failure means: use the cache or stop
        return f"cannot reach the Hub: {_one_line(e, 120)}"
    return None


def _load(
    loader: Callable[..., Any],
    key: str,
    source: str,
    local: Path | None,
    *,
    is_model: bool,
    **kwargs: Any,
) -> Any:
    """`loader(source, **kwargs)` with every way it fails turned into one ModelLoadError line."""
    what = "the model" if is_model else "a tokenizer"
    if local is not None:
        try:
            return loader(str(local), **kwargs)
        except Exception as e:
            broken = _broken_file(local, is_model=is_model)
            if broken is None and not isinstance(e, LOAD_ERRORS):
                raise  # not a files problem we can name: keep the real traceback
            reason = broken or f"cannot load {what} ({_one_line(e)})"
            raise ModelLoadError(f"{key}={source!r}: {reason}") from None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ModelLoadError(
            f"{key}={source!r}: neither a local directory nor a Hugging Face Hub id"
        ) from None
    unreachable = _hub_unreachable(source)
    if unreachable is None:
        try:
            return loader(source, **kwargs)
        except LOAD_ERRORS as e:
            raise ModelLoadError(
                f"{key}={source!r}: cannot load {what} from the Hugging Face Hub ({_one_line(e)})"
            ) from None
    # No Hub: a copy in the local Hub cache still works. AutoModel's adapter lookup ignores
    # local_files_only unless it is passed again (it would retry the network for ~23 s).
    if is_model:
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        return loader(source, local_files_only=True, **kwargs)
    except LOAD_ERRORS:
        raise ModelLoadError(
            f"{key}={source!r}: not a local directory and could not be fetched from the "
            f"Hugging Face Hub ({unreachable})"
        ) from None


def _broken_file(directory: Path, *, is_model: bool) -> str | None:
    """After a load from `directory` failed: the broken or missing file, named, or None."""
    config = directory / "config.json"
    if is_model and not config.is_file():
        return f"no config.json in {directory} (not a Hugging Face model directory)"
    for f in sorted(directory.glob("*.json")):
        try:
            parsed = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return f"{f} is not valid JSON ({_one_line(e, 80)})"
        except OSError as e:
            return f"cannot read {f} ({e.strerror})"
        if is_model and f == config and not (isinstance(parsed, dict) and "model_type" in parsed):
            return f"{f} has no model_type (not a Hugging Face model config)"
    for f in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            reason = str(e).replace("Error while deserializing header: ", "header: ")
            return f"{f} is corrupted or truncated ({_one_line(reason, 120)})"
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        listing = json.loads(index.read_text(encoding="utf-8"))
        weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
        for shard in sorted(set(weight_map.values()) if isinstance(weight_map, dict) else ()):
            if not (directory / shard).is_file():
                return f"{index} lists {shard}, which is missing"
    for f in sorted(directory.glob("pytorch_model*.bin")):
        if not zipfile.is_zipfile(f):  # torch.save writes a zip archive
            return f"{f} is corrupted or truncated (not a torch zip archive)"
    if not is_model and not any((directory / f).is_file() for f in VOCAB_FILES):
        return f"no tokenizer vocabulary ({' / '.join(VOCAB_FILES)}) in {directory}"
    return None


def _one_line(e: BaseException | str, limit: int = 200) -> str:
    """A library message on one short line (they often span several)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
