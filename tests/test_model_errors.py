"""Broken model and tokenizer input ends in one ModelLoadError line naming the key and the path
(never a library traceback, never a minute of Hub retries, never a silent empty tokenizer).

Each test corrupts a copy of the session's tiny model and calls the builders the CLI calls.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config_args
from tests.launcher import free_port
from tests.tiny_models import CPU1
from trainer.config import ModelConfig, load_config, resolve_batch, with_total_steps
from trainer.model.load import ModelLoadError, build_model, build_tokenizer, check_tokenizer_fits

CPU = torch.device("cpu")


@pytest.fixture
def model_dir(tiny_assets: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model directory, free to break."""
    return Path(shutil.copytree(tiny_assets / "model", tmp_path / "model"))


def load_model(name_or_path: str | Path) -> None:
    build_model(ModelConfig(name_or_path=str(name_or_path)), CPU)


def load_tokenizer(name_or_path: str | Path, tokenizer: str | Path | None = None) -> None:
    build_tokenizer(
        ModelConfig(name_or_path=str(name_or_path), tokenizer=tokenizer and str(tokenizer))
    )


def error_of(load, *args) -> str:
    """The ModelLoadError `load(*args)` raises; it must be one line."""
    with pytest.raises(ModelLoadError) as info:
        load(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _garbage_header(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[8:20] = b"not a header"
    f.write_bytes(bytes(data))


def _truncated(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _cut_inside_header(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:4])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_garbage_header, "invalid JSON in header"),
        (_truncated, "file not fully covered"),
        (_cut_inside_header, "header too small"),
    ],
)
def test_broken_safetensors_file_is_named(model_dir, damage, reason):
    weights = model_dir / "model.safetensors"
    damage(weights)
    message = error_of(load_model, model_dir)
    assert message.startswith(f"model.name_or_path='{model_dir}': {weights} is corrupted or ")
    assert reason in message


def test_missing_config_json_is_named(model_dir):
    (model_dir / "config.json").unlink()
    message = error_of(load_model, model_dir)
    assert message == (
        f"model.name_or_path='{model_dir}': no config.json in {model_dir} "
        "(not a Hugging Face model directory)"
    )


def test_config_json_that_is_not_json_is_named(model_dir):
    (model_dir / "config.json").write_text('{"model_type": "llama",\n')
    message = error_of(load_model, model_dir)
    assert message.startswith(
        f"model.name_or_path='{model_dir}': {model_dir / 'config.json'} is not valid JSON ("
    )


def test_missing_shard_of_a_sharded_model_is_named(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(sharded, max_shard_size="50KB")
    lost = sorted(sharded.glob("model-*.safetensors"))[1]
    lost.unlink()
    message = error_of(load_model, sharded)
    assert message == (
        f"model.name_or_path='{sharded}': {sharded / 'model.safetensors.index.json'} lists "
        f"{lost.name}, which is missing"
    )


@pytest.fixture
def no_hub(monkeypatch) -> list[str]:
    """Any Hub lookup is recorded and fails at once: nothing listens at the endpoint."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    asked: list[str] = []
    real = HfApi.model_info

    def model_info(self, repo_id, **kwargs):
        asked.append(repo_id)
        return real(self, repo_id, **kwargs)

    monkeypatch.setattr(HfApi, "model_info", model_info)
    return asked


@pytest.mark.parametrize("load", [load_model, load_tokenizer])
def test_mistyped_local_path_is_not_tried_on_the_hub(load, tmp_path, monkeypatch, no_hub):
    """`models/qwen2bpee` has the shape of a Hub id; `models/` existing here makes it local."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path, shown in [
        ("models/qwen2bpee", tmp_path / "models" / "qwen2bpee"),
        ("./qwen2bpee", tmp_path / "qwen2bpee"),
        (str(tmp_path / "nope"), tmp_path / "nope"),
    ]:
        message = error_of(load, path)
        assert message == f"model.name_or_path={path!r}: no such directory ({shown})"
    assert no_hub == []


def test_model_path_that_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    message = error_of(load_model, f)
    assert message == f"model.name_or_path='{f}': {f} is a file, not a model directory"


@pytest.mark.parametrize("load", [load_model, load_tokenizer])
def test_unreachable_hub_fails_fast(load, no_hub):
    """Without the Hub and without a cached copy: one request, no ~23 s of retries per file."""
    started = time.monotonic()
    message = error_of(load, "fttrain-tests/no-such-model")
    assert time.monotonic() - started < 10
    assert message.startswith(
        "model.name_or_path='fttrain-tests/no-such-model': not a local directory and could not "
        "be fetched from the Hugging Face Hub (cannot reach the Hub: "
    )
    assert no_hub == ["fttrain-tests/no-such-model"]


def test_offline_mode_names_it(monkeypatch, no_hub):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = error_of(load_model, "fttrain-tests/no-such-model")
    assert message.endswith(
        "could not be fetched from the Hugging Face Hub (HF_HUB_OFFLINE is set)"
    )
    assert no_hub == []


def test_unreachable_hub_uses_the_cached_copy(model_dir, tmp_path, monkeypatch, no_hub):
    """A model already in the Hub cache still loads (and fast) when the Hub cannot be reached."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--fttrain-tests--tiny"
    commit = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    started = time.monotonic()
    model = build_model(ModelConfig(name_or_path="fttrain-tests/tiny"), CPU)
    tokenizer = build_tokenizer(ModelConfig(name_or_path="fttrain-tests/tiny"))
    assert time.monotonic() - started < 10
    assert model.config.hidden_size == 32 and len(tokenizer) > 100
    assert no_hub == ["fttrain-tests/tiny", "fttrain-tests/tiny"]


def test_not_a_path_nor_a_hub_id(no_hub):
    message = error_of(load_model, "my model")
    assert (
        message
        == "model.name_or_path='my model': neither a local directory nor a Hugging Face Hub id"
    )


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_model_dir_without_tokenizer_files_says_set_model_tokenizer(model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    message = error_of(load_tokenizer, model_dir)
    assert message == (
        f"model.name_or_path='{model_dir}': no tokenizer files (tokenizer.json / tokenizer.model "
        f"/ tokenizer_config.json) in {model_dir}; set model.tokenizer"
    )


def test_tokenizer_dir_without_files_names_model_tokenizer(model_dir, tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    message = error_of(load_tokenizer, model_dir, empty)
    assert message.startswith(f"model.tokenizer='{empty}': no tokenizer files (")
    assert "set model.tokenizer" not in message


def test_tokenizer_config_without_vocabulary_is_not_an_empty_tokenizer(model_dir):
    """AutoTokenizer builds a 1-token Qwen2 tokenizer from a config alone; that must not train."""
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "Qwen2Tokenizer"})
    )
    message = error_of(load_tokenizer, model_dir)
    assert message.startswith(
        f"model.name_or_path='{model_dir}': the tokenizer has only 1 token(s)"
    )


def test_tokenizer_json_that_is_not_json_is_named(model_dir):
    (model_dir / "tokenizer.json").write_text("{")
    message = error_of(load_tokenizer, model_dir)
    assert message.startswith(
        f"model.name_or_path='{model_dir}': {model_dir / 'tokenizer.json'} is not valid JSON ("
    )


def test_tokenizer_without_eos_token(model_dir):
    """Without tokenizer_config.json the vocabulary loads but no token is eos (nor pad)."""
    (model_dir / "tokenizer_config.json").unlink()
    message = error_of(load_tokenizer, model_dir)
    assert message == (
        f"model.name_or_path='{model_dir}': the tokenizer has no eos token (it ends every "
        "sample); set eos_token in its tokenizer_config.json"
    )


@pytest.fixture
def wide_tokenizer(tmp_path: Path) -> Path:
    """The tiny model's tokenizer with 20 tokens more than its 104-row embedding table."""
    from data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.add_tokens([f"<extra_{i}>" for i in range(20)])
    tok.save_pretrained(tmp_path / "wide_tok")
    return tmp_path / "wide_tok"


def test_tokenizer_larger_than_embedding_table_after_build_engine(
    tiny_assets, wide_tokenizer, tmp_path
):
    """Checked on the engine's model, as launch.train does after build_engine (DDP backend)."""
    from trainer.build import build_engine

    args = tiny_config_args(tiny_assets, tmp_path / "run", f"model.tokenizer={wide_tokenizer}")
    cfg = load_config(args[0], args[1:])
    derived = with_total_steps(cfg, resolve_batch(cfg, 1), None)
    engine = build_engine(cfg, derived, CPU1)
    tokenizer = build_tokenizer(cfg.model)
    message = error_of(check_tokenizer_fits, engine.unwrapped_model(), tokenizer, cfg.model)
    assert message == (
        "the tokenizer has 124 tokens but the model's embedding table has 104 rows "
        f"(model.name_or_path='{tiny_assets / 'model'}', model.tokenizer='{wide_tokenizer}')"
    )


def test_tokenizer_size_is_read_from_zero3_shapes(model_dir, wide_tokenizer):
    """Under ZeRO-3 a module's weight is an empty placeholder; the real shape is `ds_shape`."""
    cfg = ModelConfig(name_or_path=str(model_dir), tokenizer=str(wide_tokenizer))
    model = build_model(cfg, CPU)
    for table in (model.get_input_embeddings(), model.get_output_embeddings()):
        table.weight.ds_shape = table.weight.shape
        table.weight.data = torch.empty(0)
    message = error_of(check_tokenizer_fits, model, build_tokenizer(cfg), cfg)
    assert "has 124 tokens but the model's embedding table has 104 rows" in message


def test_tokenizer_that_fits_the_embedding_table_passes(model_dir):
    """As many rows as tokens, or more (padded vocabularies), is fine."""
    cfg = ModelConfig(name_or_path=str(model_dir))
    model, tokenizer = build_model(cfg, CPU), build_tokenizer(cfg)
    check_tokenizer_fits(model, tokenizer, cfg)
    model.resize_token_embeddings(128)
    check_tokenizer_fits(model, tokenizer, cfg)
