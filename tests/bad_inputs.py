"""A held-out style check: bad inputs through the real CLI, each judged as a user would see it.

Every case builds its bad input under a temp directory of its own (copying the shared tiny
assets before it breaks anything) and names the command to run and the culprit: the config key
and/or the file (and line) the error must name. A case passes when the command

- exits with a code other than 0,
- within `TIMEOUT_S` seconds (on timeout every process it started is killed),
- prints an `error:` message naming every culprit: the `error:` line itself, or for a config
  error (which lists its problems one per line, `  - key: ...`) that line and its list,
- prints no `Traceback` at all (multi-rank cases go through `launch.run`: stock torchrun prints
  one of its own on every failure), and leaves no process behind.

`python -m tests.bad_inputs [NAME ...]` runs the catalogue (or the named cases) two at a time and
prints a markdown table; tests/test_bad_inputs_cli.py runs it under pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.launcher import REPO, _descendants, free_port

TIMEOUT_S = 60.0
NUM_WORKERS = 2
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
# Other ranks and helper processes get this long to exit after the command itself has.
STRAGGLER_GRACE_S = 10.0
POLL_S = 0.2
ERROR_SHOWN_CHARS = 150


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    return env


# ---------------------------------------------------------------------------------------------
# Assets and each case's workspace


def build_assets(root: Path) -> Path:
    """The tiny model and data, exactly as tests/conftest.py's `tiny_assets` builds them."""
    from transformers.utils import logging as hf_logging

    from data.synthetic import generate, write_jsonl
    from launch.make_demo import build_tiny_model_dir

    hf_logging.disable_progress_bar()  # save_pretrained's bars, in the middle of the table
    build_tiny_model_dir(root / "model", seed=0, hidden=32, layers=2, heads=2)
    write_jsonl(generate(512, 0, "train"), root / "train.jsonl")
    write_jsonl(generate(64, 0, "eval"), root / "eval.jsonl")
    return root


class SetupError(RuntimeError):
    """Building a case's input failed (not the verdict on the CLI under test)."""


@dataclass
class Workspace:
    """What a case may use: the shared assets (read-only) and a directory of its own, which is
    also the working directory of its command."""

    assets: Path
    tmp: Path

    def copy(self, name: str) -> Path:
        """A private copy of an asset (`model`, `train.jsonl`, `eval.jsonl`), free to break."""
        src, dst = self.assets / name, self.tmp / name
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
        return dst

    def train_argv(self, *overrides: str, config: Path | str = TINY_CONFIG) -> list[str]:
        """`python -m launch.train` on configs/tiny.yaml pointed at the shared assets;
        `overrides` come last, so they win over the defaults here."""
        return [sys.executable, "-m", "launch.train", str(config), *self.tiny_overrides(*overrides)]

    def launch_run_argv(self, *overrides: str, nproc: int = 2) -> list[str]:
        return [
            sys.executable,
            "-m",
            "launch.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(TINY_CONFIG),
            *self.tiny_overrides(*overrides),
        ]

    def tiny_overrides(self, *overrides: str) -> list[str]:
        return [
            f"run_dir={self.tmp / 'run'}",
            f"model.name_or_path={self.assets / 'model'}",
            f"data.train_path={self.assets / 'train.jsonl'}",
            f"data.eval_path={self.assets / 'eval.jsonl'}",
            "logging.tensorboard=false",
            *overrides,
        ]

    def setup(self, argv: list[str], timeout: float = 300) -> None:
        """Run a command that prepares the input (shards, a checkpoint); it must succeed."""
        code, _, out, timed_out, _ = run_command(argv, self.tmp, timeout)
        if timed_out or code != 0:
            raise SetupError(f"{' '.join(argv[2:4])} ... exited {code}: {out[-1500:]}")


@dataclass
class Invocation:
    argv: list[str]
    culprits: list[str]  # every one must appear in one `error:` message


@dataclass(frozen=True)
class Case:
    name: str
    description: str  # the bad input, in one line
    build: Callable[[Workspace], Invocation]
    one_error_line: bool = False  # multi-rank: exactly one `error:` line for the whole job


# ---------------------------------------------------------------------------------------------
# File surgery


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def train_rows_with(ws: Workspace, line_no: int, bad: bytes, name: str = "bad.jsonl") -> Path:
    """The tiny training rows (as bytes) with line `line_no` (1-based) replaced by `bad`."""
    lines = (ws.assets / "train.jsonl").read_bytes().splitlines()
    lines[line_no - 1] = bad
    return write_lines(ws.tmp / name, lines)


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def prepare_shards(ws: Workspace) -> Path:
    """The tiny training rows as shards of 100 rows each, written by `python -m data.prepare`."""
    out = ws.tmp / "shards"
    ws.setup(
        [
            sys.executable,
            "-m",
            "data.prepare",
            "--input",
            str(ws.assets / "train.jsonl"),
            "--output",
            str(out),
            "--shard-size",
            "100rows",
        ]
    )
    return out


def checkpoint_of_a_short_run(ws: Workspace, *overrides: str) -> Path:
    """Train the tiny model (no HF export) in `ws.tmp/run`; return its checkpoints directory."""
    ws.setup(ws.train_argv("output.save_hf_model=false", "eval.max_batches=1", *overrides))
    return ws.tmp / "run" / "checkpoints"


# ---------------------------------------------------------------------------------------------
# The cases: config


def _unknown_key(ws: Workspace) -> Invocation:
    return Invocation(
        ws.train_argv("train.micro_batchsize=4"),
        ["train.micro_batchsize", "did you mean 'train.micro_batch_size'"],
    )


def _wrong_type(ws: Workspace) -> Invocation:
    return Invocation(ws.train_argv("train.max_steps=many"), ["train.max_steps", "many"])


def _out_of_range(ws: Workspace) -> Invocation:
    return Invocation(ws.train_argv("optim.lr=-1"), ["optim.lr"])


def _yaml_syntax(ws: Workspace) -> Invocation:
    config = ws.tmp / "broken.yaml"
    text = TINY_CONFIG.read_text().splitlines()
    line = next(i for i, x in enumerate(text) if x.startswith("  seq_len:"))
    text[line] = "  seq_len: 48: 64"  # "mapping values are not allowed here"
    config.write_text("\n".join(text) + "\n")
    return Invocation(ws.train_argv(config=config), [f"{config}:line {line + 1}"])


def _missing_config(ws: Workspace) -> Invocation:
    config = ws.tmp / "no_such_config.yaml"
    return Invocation(ws.train_argv(config=config), [str(config)])


def _global_batch(ws: Workspace) -> Invocation:
    return Invocation(
        ws.train_argv("train.global_batch_size=7", "train.grad_accum_steps=null"),
        ["train.global_batch_size", "train.micro_batch_size"],
    )


def _unknown_signal(ws: Workspace) -> Invocation:
    return Invocation(
        ws.train_argv("checkpoint.stop_signals=[SIGTERM,SIGTREM]"),
        ["checkpoint.stop_signals", "SIGTREM"],
    )


def _deepspeed_without_config(ws: Workspace) -> Invocation:
    return Invocation(ws.train_argv("train.backend=deepspeed"), ["train.deepspeed_config"])


def _deepspeed_config_missing(ws: Workspace) -> Invocation:
    path = ws.tmp / "zero2.json"
    return Invocation(
        ws.train_argv("train.backend=deepspeed", f"train.deepspeed_config={path}"),
        ["train.deepspeed_config", str(path)],
    )


def _override_without_equals(ws: Workspace) -> Invocation:
    return Invocation(ws.train_argv("optim.lr"), ["optim.lr", "section.key=value"])


# ---------------------------------------------------------------------------------------------
# The cases: data


def _train_missing(ws: Workspace) -> Invocation:
    path = ws.tmp / "train.jsonl"
    return Invocation(ws.train_argv(f"data.train_path={path}"), ["data.train_path", str(path)])


def _train_dir_without_manifest(ws: Workspace) -> Invocation:
    path = ws.tmp / "data"
    path.mkdir()
    shutil.copyfile(ws.assets / "train.jsonl", path / "part-0.jsonl")
    return Invocation(ws.train_argv(f"data.train_path={path}"), ["data.train_path", str(path)])


def _train_empty(ws: Workspace) -> Invocation:
    path = ws.tmp / "empty.jsonl"
    path.write_bytes(b"")
    return Invocation(ws.train_argv(f"data.train_path={path}"), ["data.train_path", str(path)])


def _strict(ws: Workspace, path: Path) -> list[str]:
    return ws.train_argv(f"data.train_path={path}", "data.bad_rows=strict")


def _invalid_json_strict(ws: Workspace) -> Invocation:
    path = train_rows_with(ws, 5, b'{"instruction": "1+1=", "response": ')
    return Invocation(_strict(ws, path), [f"{path}:5"])


def _lone_surrogate_strict(ws: Workspace) -> Invocation:
    path = train_rows_with(ws, 7, b'{"instruction": "x\\ud800y", "context": "", "response": "1"}')
    return Invocation(_strict(ws, path), [f"{path}:7"])


def _invalid_utf8_strict(ws: Workspace) -> Invocation:
    path = train_rows_with(
        ws, 3, b'{"instruction": "upper \xff\xfe", "context": "", "response": "A"}'
    )
    return Invocation(_strict(ws, path), [f"{path}:3"])


def _field_names_mismatch(ws: Workspace) -> Invocation:
    """Every row has prompt/completion, the config expects instruction/response (lenient)."""
    rows = [json.loads(x) for x in (ws.assets / "train.jsonl").read_text().splitlines()]
    path = ws.tmp / "prompt_completion.jsonl"
    lines = [
        json.dumps({"prompt": r["instruction"], "completion": r["response"]}).encode() for r in rows
    ]
    write_lines(path, lines)
    return Invocation(
        ws.train_argv(f"data.train_path={path}", "data.eval_path=null"),
        ["data.instruction_field", str(path)],
    )


def _chat_on_instruction_rows(ws: Workspace) -> Invocation:
    path = ws.assets / "train.jsonl"
    return Invocation(
        ws.train_argv("data.format=chat", "data.eval_path=null"),
        ["data.messages_field", str(path)],
    )


def _shard_deleted(ws: Workspace) -> Invocation:
    shards = prepare_shards(ws)
    lost = shards / "shard-00002.jsonl"
    lost.unlink()
    return Invocation(ws.train_argv(f"data.train_path={shards}"), [str(lost)])


def _shard_index_truncated(ws: Workspace) -> Invocation:
    shards = prepare_shards(ws)
    index = shards / "shard-00001.jsonl.idx"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    return Invocation(ws.train_argv(f"data.train_path={shards}"), [str(index)])


def _eval_empty(ws: Workspace) -> Invocation:
    path = ws.tmp / "eval.jsonl"
    path.write_bytes(b"")
    return Invocation(ws.train_argv(f"data.eval_path={path}"), ["data.eval_path", str(path)])


def _seq_len_no_eval(ws: Workspace) -> Invocation:
    return Invocation(ws.train_argv("data.seq_len=8", "data.eval_path=null"), ["data.seq_len"])


def _seq_len_with_eval(ws: Workspace) -> Invocation:
    return Invocation(ws.train_argv("data.seq_len=8"), ["data.seq_len"])


def _prepare_missing_input(ws: Workspace) -> Invocation:
    path = ws.tmp / "nope.jsonl"
    argv = [sys.executable, "-m", "data.prepare", "--input", str(path), "--output", "shards"]
    return Invocation(argv, ["--input", str(path)])


def _prepare_strict_bad_row(ws: Workspace) -> Invocation:
    path = train_rows_with(ws, 4, b"{not json")
    argv = [
        sys.executable,
        "-m",
        "data.prepare",
        "--input",
        str(path),
        "--output",
        "shards",
        "--strict",
    ]
    return Invocation(argv, [f"{path}:4"])


# ---------------------------------------------------------------------------------------------
# The cases: model files


def _model(ws: Workspace, name_or_path: Path | str) -> list[str]:
    return ws.train_argv(f"model.name_or_path={name_or_path}")


def _model_missing_dir(ws: Workspace) -> Invocation:
    # Nothing called `models` exists in the working directory.
    return Invocation(_model(ws, "./models/nope"), ["model.name_or_path", "models/nope"])


def _model_mistyped_relative(ws: Workspace) -> Invocation:
    (ws.tmp / "models").mkdir()
    shutil.copytree(ws.assets / "model", ws.tmp / "models" / "tiny")
    return Invocation(_model(ws, "models/tinyy"), ["model.name_or_path", "models/tinyy"])


def _safetensors_header(ws: Workspace) -> Invocation:
    model = ws.copy("model")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"not a header"
    weights.write_bytes(bytes(data))
    return Invocation(_model(ws, model), ["model.name_or_path", str(weights)])


def _safetensors_truncated(ws: Workspace) -> Invocation:
    model = ws.copy("model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return Invocation(_model(ws, model), ["model.name_or_path", str(weights)])


def _config_json_missing(ws: Workspace) -> Invocation:
    model = ws.copy("model")
    (model / "config.json").unlink()
    return Invocation(_model(ws, model), ["model.name_or_path", "config.json", str(model)])


def _config_json_not_json(ws: Workspace) -> Invocation:
    model = ws.copy("model")
    (model / "config.json").write_text('{"model_type": "llama",\n')
    return Invocation(_model(ws, model), ["model.name_or_path", str(model / "config.json")])


def _no_tokenizer_files(ws: Workspace) -> Invocation:
    model = ws.copy("model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    return Invocation(_model(ws, model), ["model.name_or_path", str(model), "model.tokenizer"])


def _tokenizer_larger_than_embeddings(ws: Workspace) -> Invocation:
    """The char tokenizer (104 tokens) with a model of 84 embedding rows."""
    import torch
    from transformers import LlamaForCausalLM

    from data.tokenizer import build_char_tokenizer
    from launch.make_demo import tiny_llama_config

    tokenizer = build_char_tokenizer()
    config = tiny_llama_config(tokenizer, hidden=32, layers=2, heads=2)
    config.vocab_size = len(tokenizer) - 20
    torch.manual_seed(0)
    model_dir = ws.tmp / "narrow_model"
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return Invocation(_model(ws, model_dir), ["model.name_or_path", str(model_dir)])


# ---------------------------------------------------------------------------------------------
# The cases: paths


def _run_dir_is_file(ws: Workspace) -> Invocation:
    path = ws.tmp / "run_file"
    path.write_text("")
    return Invocation(ws.train_argv(f"run_dir={path}"), ["run_dir", str(path)])


def _checkpoint_dir_is_file(ws: Workspace) -> Invocation:
    path = ws.tmp / "ckpt_file"
    path.write_text("")
    return Invocation(ws.train_argv(f"checkpoint.dir={path}"), ["checkpoint.dir", str(path)])


def _resume_missing(ws: Workspace) -> Invocation:
    path = ws.tmp / "no_such_checkpoint"
    return Invocation(ws.train_argv(f"checkpoint.resume={path}"), ["checkpoint.resume", str(path)])


def _resume_flipped_byte(ws: Workspace) -> Invocation:
    ckpts = checkpoint_of_a_short_run(ws, "train.max_steps=2", "checkpoint.every_steps=1")
    step = ckpts / "step_00000002"
    flip_byte(max((p for p in step.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size))
    return Invocation(
        ws.train_argv(f"checkpoint.resume={step}"),
        ["checkpoint.resume", str(step)],
    )


def _resume_past_max_steps(ws: Workspace) -> Invocation:
    ckpts = checkpoint_of_a_short_run(ws)  # configs/tiny.yaml: 6 steps
    if not (ckpts / "step_00000006").is_dir():
        raise SetupError(f"no step_00000006 in {ckpts}")
    return Invocation(
        ws.train_argv("train.max_steps=4", "output.save_hf_model=false"),
        ["train.max_steps", "step_00000006"],
    )


# ---------------------------------------------------------------------------------------------
# The cases: export


def _export_missing(ws: Workspace) -> Invocation:
    path = ws.tmp / "no_such_run" / "checkpoints"
    argv = [sys.executable, "-m", "launch.export", str(path), "--output", str(ws.tmp / "x")]
    return Invocation(argv, [str(path)])


def _export_output_is_file(ws: Workspace) -> Invocation:
    out = ws.tmp / "out"
    out.write_text("")
    argv = [sys.executable, "-m", "launch.export", str(ws.tmp), "--output", str(out)]
    return Invocation(argv, ["--output", str(out)])


# ---------------------------------------------------------------------------------------------
# The cases: two ranks under launch.run


def _two_ranks_config_error(ws: Workspace) -> Invocation:
    return Invocation(ws.launch_run_argv("optim.lr=-1"), ["optim.lr"])


def _two_ranks_strict_bad_row(ws: Workspace) -> Invocation:
    path = train_rows_with(ws, 5, b'{"instruction": "1+1=", "response": ')
    argv = ws.launch_run_argv(f"data.train_path={path}", "data.bad_rows=strict")
    return Invocation(argv, [f"{path}:5"])


CASES: list[Case] = [
    Case("config-unknown-key", "train.micro_batchsize=4 (typo)", _unknown_key),
    Case("config-wrong-type", "train.max_steps=many", _wrong_type),
    Case("config-out-of-range", "optim.lr=-1", _out_of_range),
    Case("config-yaml-syntax", "config YAML line `seq_len: 48: 64`", _yaml_syntax),
    Case("config-missing-file", "CONFIG path that does not exist", _missing_config),
    Case(
        "config-global-batch",
        "train.global_batch_size=7 with micro batch 4, 1 rank",
        _global_batch,
    ),
    Case("config-stop-signal", "checkpoint.stop_signals=[SIGTERM,SIGTREM]", _unknown_signal),
    Case(
        "config-deepspeed-no-json",
        "train.backend=deepspeed, no train.deepspeed_config",
        _deepspeed_without_config,
    ),
    Case(
        "config-deepspeed-json-missing",
        "train.deepspeed_config=<missing file>",
        _deepspeed_config_missing,
    ),
    Case("config-override-no-equals", "override `optim.lr` without `=`", _override_without_equals),
    Case("data-train-missing", "data.train_path=<missing file>", _train_missing),
    Case(
        "data-train-dir-no-manifest",
        "data.train_path=<dir of JSONL, no manifest.json>",
        _train_dir_without_manifest,
    ),
    Case("data-train-empty", "data.train_path=<empty JSONL>", _train_empty),
    Case("data-strict-invalid-json", "bad_rows=strict, line 5 not JSON", _invalid_json_strict),
    Case(
        "data-strict-lone-surrogate",
        'bad_rows=strict, line 7 holds "\\ud800"',
        _lone_surrogate_strict,
    ),
    Case(
        "data-strict-invalid-utf8",
        "bad_rows=strict, line 3 holds bytes ff fe",
        _invalid_utf8_strict,
    ),
    Case(
        "data-field-names",
        "every row prompt/completion, config expects instruction/response",
        _field_names_mismatch,
    ),
    Case(
        "data-chat-on-instruction",
        "data.format=chat on instruction rows",
        _chat_on_instruction_rows,
    ),
    Case(
        "data-shard-deleted", "shards (data.prepare) with shard-00002.jsonl deleted", _shard_deleted
    ),
    Case(
        "data-shard-idx-truncated",
        "shards with shard-00001.jsonl.idx cut in half",
        _shard_index_truncated,
    ),
    Case("data-eval-empty", "data.eval_path=<empty JSONL>", _eval_empty),
    Case(
        "data-seq-len-no-eval",
        "data.seq_len=8, no eval set: no response token fits",
        _seq_len_no_eval,
    ),
    Case(
        "data-seq-len-with-eval",
        "data.seq_len=8 with eval set: no response token fits",
        _seq_len_with_eval,
    ),
    Case("prepare-missing-input", "data.prepare --input <missing file>", _prepare_missing_input),
    Case(
        "prepare-strict-bad-row", "data.prepare --strict, line 4 not JSON", _prepare_strict_bad_row
    ),
    Case("model-missing-dir", "model.name_or_path=./models/nope (no models/)", _model_missing_dir),
    Case(
        "model-mistyped-relative",
        "model.name_or_path=models/tinyy (models/ exists)",
        _model_mistyped_relative,
    ),
    Case("model-safetensors-header", "model.safetensors header overwritten", _safetensors_header),
    Case("model-safetensors-truncated", "model.safetensors cut in half", _safetensors_truncated),
    Case("model-no-config-json", "model dir without config.json", _config_json_missing),
    Case("model-config-not-json", "config.json is not JSON", _config_json_not_json),
    Case("model-no-tokenizer", "model dir without tokenizer files", _no_tokenizer_files),
    Case(
        "model-tokenizer-too-big",
        "tokenizer of 104 tokens, model with 84 embedding rows",
        _tokenizer_larger_than_embeddings,
    ),
    Case("path-run-dir-file", "run_dir=<a file>", _run_dir_is_file),
    Case("path-checkpoint-dir-file", "checkpoint.dir=<a file>", _checkpoint_dir_is_file),
    Case("path-resume-missing", "checkpoint.resume=<missing path>", _resume_missing),
    Case(
        "path-resume-flipped-byte",
        "checkpoint.resume=<step 2 checkpoint, one byte flipped>",
        _resume_flipped_byte,
    ),
    Case(
        "path-resume-past-end",
        "rerun of a run finished at step 6 with train.max_steps=4",
        _resume_past_max_steps,
    ),
    Case("export-missing", "launch.export <missing dir> --output x", _export_missing),
    Case("export-output-file", "launch.export ... --output <a file>", _export_output_is_file),
    Case(
        "ranks2-config-error",
        "launch.run, 2 ranks: optim.lr=-1",
        _two_ranks_config_error,
        one_error_line=True,
    ),
    Case(
        "ranks2-strict-bad-row",
        "launch.run, 2 ranks: bad_rows=strict, line 5 not JSON",
        _two_ranks_strict_bad_row,
        one_error_line=True,
    ),
]


# ---------------------------------------------------------------------------------------------
# Running and judging


def _identity(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, or None if it is gone: a pid seen earlier is the same
    process only while its start time is the same (pids are reused)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def run_command(
    argv: list[str], cwd: Path, timeout: float | None = None
) -> tuple[int | None, float, str, bool, list[int]]:
    """Run `argv` with stdout and stderr combined. Returns (exit code or None on timeout,
    seconds, output, timed out, pids that outlived it). Every process it started is killed."""
    timeout = TIMEOUT_S if timeout is None else timeout
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        seen: dict[int, str] = {}  # every descendant, with its start time

        def note_descendants() -> None:
            # torchrun's workers sit in process groups of their own, and a process that outlives
            # its parent is re-parented away from this tree: note them while the command runs.
            for pid in _descendants(proc.pid):
                ident = _identity(pid)
                if ident is not None:
                    seen.setdefault(pid, ident[1])

        def still_running() -> list[int]:
            running = []
            for pid, since in seen.items():
                ident = _identity(pid)
                if ident is not None and ident[1] == since and ident[0] != "Z":
                    running.append(pid)
            return running

        code: int | None = None
        while code is None and (left := timeout - (time.monotonic() - started)) > 0:
            note_descendants()
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout=min(POLL_S, left))
        timed_out = code is None
        seconds = time.monotonic() - started
        if timed_out:
            note_descendants()
        stragglers = still_running()
        deadline = time.monotonic() + STRAGGLER_GRACE_S
        while stragglers and not timed_out and time.monotonic() < deadline:
            time.sleep(POLL_S)  # a rank may still be exiting; there is nothing to wait on
            stragglers = still_running()
        # The command's own process group (start_new_session: its pid is the group id, and not
        # yet reaped, that pid cannot have been reused), then what left it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        log.seek(0)
        return code, seconds, log.read(), timed_out, stragglers


def error_messages(output: str) -> list[str]:
    """Each line that starts with `error:` (the culprit must be on that line itself)."""
    return [line for line in output.splitlines() if line.startswith("error:")]


@dataclass
class Result:
    case: Case
    code: int | None = None
    seconds: float = 0.0
    output: str = ""
    message: str = ""  # the `error:` message naming the culprits, or the first one
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def judge(case: Case, inv: Invocation, code, seconds, output, timed_out, stragglers) -> Result:
    r = Result(case, code, seconds, output)
    if timed_out:
        r.problems.append(f"still running after {TIMEOUT_S:.0f}s")
    elif code == 0:
        r.problems.append("exit code 0")
    if "Traceback" in output:
        r.problems.append("Traceback")
    if stragglers and not timed_out:
        r.problems.append(f"{len(stragglers)} process(es) outlived the command")
    messages = error_messages(output)
    naming = [m for m in messages if all(c in m for c in inv.culprits)]
    r.message = (naming or messages or [""])[0]
    if not messages:
        r.problems.append("no `error:` line")
    elif not naming:
        best = max(messages, key=lambda m: sum(c in m for c in inv.culprits))
        missing = [c for c in inv.culprits if c not in best]
        r.problems.append(f"`error:` does not name {missing}")
    num_lines = sum(line.startswith("error:") for line in output.splitlines())
    if case.one_error_line and num_lines != 1:
        r.problems.append(f"{num_lines} `error:` lines, expected 1")
    return r


def run_case(case: Case, assets: Path, root: Path) -> Result:
    ws = Workspace(assets, root / case.name)
    ws.tmp.mkdir(parents=True)
    try:
        inv = case.build(ws)
    except Exception as e:  # noqa: BLE001 - a broken setup is reported in the table
        return Result(case, problems=[f"setup failed: {type(e).__name__}: {e}"])
    return judge(case, inv, *run_command(inv.argv, ws.tmp))


def run_cases(cases: list[Case], workers: int = NUM_WORKERS) -> list[Result]:
    """Build the assets once, run `cases` `workers` at a time; return the results in catalogue
    order, the temp root shortened to `$TMP` in what they show."""
    with tempfile.TemporaryDirectory(prefix="bad_inputs_") as tmp:
        root = Path(tmp)
        # Saving a model imports DeepSpeed, whose logger writes to stdout: keep it off the table.
        with contextlib.redirect_stdout(sys.stderr):
            assets = build_assets(root / "assets")
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda c: run_case(c, assets, root / "cases"), cases))
        for r in results:
            r.output = r.output.replace(tmp, "$TMP")
            r.message = r.message.replace(tmp, "$TMP")
            r.problems = [p.replace(tmp, "$TMP") for p in r.problems]
    return results


def _cell(text: str, limit: int | None = None) -> str:
    text = " ".join(text.split())
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def table(results: list[Result]) -> str:
    rows = [
        "| case | input | exit code | seconds | the `error:` line (shortened) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        verdict = "OK" if r.ok else "FAIL: " + "; ".join(r.problems)
        rows.append(
            f"| {r.case.name} | {_cell(r.case.description)} | "
            f"{'-' if r.code is None else r.code} | {r.seconds:.1f} | "
            f"{_cell(r.message, ERROR_SHOWN_CHARS)} | {_cell(verdict)} |"
        )
    return "\n".join(rows)


def failure_report(results: list[Result], tail_chars: int = 3000) -> str:
    """Each failing case with the end of its output."""
    parts = []
    for r in results:
        if not r.ok:
            parts.append(
                f"### {r.case.name}: {'; '.join(r.problems)}\n```\n{r.output[-tail_chars:]}\n```"
            )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.bad_inputs", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("names", nargs="*", help="run only these cases (default: all)")
    p.add_argument("--workers", type=int, default=NUM_WORKERS)
    p.add_argument("--show-failures", action="store_true", help="print failing cases' output")
    args = p.parse_args(argv)
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(by_name)}")
    cases = [by_name[n] for n in args.names] if args.names else CASES
    started = time.monotonic()
    results = run_cases(cases, args.workers)
    print(table(results))
    num_ok = sum(r.ok for r in results)
    print(
        f"\n{num_ok}/{len(results)} OK; wall time {time.monotonic() - started:.0f} s "
        f"({args.workers} at a time)"
    )
    if args.show_failures and num_ok < len(results):
        print("\n" + failure_report(results))
    return 0 if num_ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
