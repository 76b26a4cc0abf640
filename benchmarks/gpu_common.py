"""What the GPU benchmarks (gpu_sft_mfu.py, gpu_qlora_8b.py) share.

Built on benchmarks/bench_throughput.py, imported rather than copied: its Alpaca-style rows
(lognormal lengths), its locally trained byte-level BPE tokenizer, the HF-user tokenization it
checks against ours, the slots of our loader's plan, its process-group kill and its code-state
line. What is new here: a random-init Llama written straight to sharded safetensors (an 8B model
never exists in memory at once), a one-process runner, the header every output starts with, and
reading our metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_throughput as bt  # noqa: E402

GPU_NEEDED_EXIT = 2
# Environment of every run, ours and the peers': nothing is fetched from the Hub.
OFFLINE_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


# ---------------------------------------------------------------------------------------------
# The header: date, device, versions, command, code.


@functools.cache
def cuda_info() -> dict[str, Any] | None:
    """The GPUs torch sees ({"name", "count", "gib"} of device 0), None without CUDA. Asked in
    a child process: a CUDA context here would hold GPU memory for the whole benchmark."""
    import torch

    if not torch.cuda.is_available():
        return None
    code = (
        "import json, torch; p = torch.cuda.get_device_properties(0); print(json.dumps("
        "{'name': torch.cuda.get_device_name(0), 'count': torch.cuda.device_count(), "
        "'gib': p.total_memory / 2**30}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def device_name() -> str:
    info = cuda_info()
    if info is not None:
        name = f"{info['name']} ({info['gib']:.0f} GiB)"
        return f"{info['count']} x {name}" if info["count"] > 1 else name
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"no CUDA device; CPU: {model}, {os.cpu_count()} cores"


def header(
    title: str,
    packages: tuple[str, ...] = ("torch", "transformers", "peft", "bitsandbytes", "accelerate"),
) -> str:
    """The lines every output starts with, ready to paste into RESULTS.md."""
    import torch

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    return "\n".join(
        [
            f"# {title}",
            f"date: {now}",
            f"device: {device_name()}",
            f"versions: {bt.versions(packages)}{cuda}; python {platform.python_version()}",
            f"command: {shlex.join(sys.orig_argv)}",
            f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)",
            bt.code_state(),
        ]
    )


def require_gpu(quick: bool, script: str) -> None:
    """Without --quick the benchmark is a GPU measurement: say so in one line and exit 2."""
    import torch

    if quick or torch.cuda.is_available():
        return
    print(
        f"{script}: a CUDA GPU is needed (torch {torch.__version__} sees none); run with "
        "--quick for a tiny CPU smoke run of the same path"
    )
    sys.exit(GPU_NEEDED_EXIT)


def pick_attention(asked: str) -> str:
    """`auto`: flash_attention_2 when CUDA is there and flash_attn imports, else sdpa."""
    if asked != "auto":
        return asked
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# ---------------------------------------------------------------------------------------------
# Assets: rows and tokenizer (bench_throughput's), a random-init Llama written shard by shard.


@dataclass(frozen=True)
class Shape:
    """A Llama's sizes."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float = 10000.0

    def describe(self, num_params: int, vocab: int) -> str:
        size = f"{num_params / 1e9:.2f}B" if num_params >= 1e9 else f"{num_params / 1e6:.2f}M"
        return (
            f"Llama {size} parameters (hidden {self.hidden}, {self.layers} layers, {self.heads} "
            f"heads, {self.kv_heads} KV heads, intermediate {self.intermediate}, vocab {vocab}, "
            "untied head)"
        )


def data_setup(**fields: Any) -> bt.Setup:
    """bench_throughput's Setup, used for what it describes of the data and the batch."""
    return bt.Setup(**fields)


def make_data(
    setup: bt.Setup, vocab: int, train_jsonl: Path, tokenizer_dir: Path
) -> tuple[Any, list[int]]:
    """bench_throughput's rows written to `train_jsonl` and its BPE trained on them, saved in
    `tokenizer_dir` (the model's directory: ours reads both from model.name_or_path). Returns
    the tokenizer and each sample's tokens as the HF side makes them (and ours: checked)."""
    from transformers import AutoTokenizer

    rows = bt.make_rows(setup.num_rows, setup)
    train_jsonl.parent.mkdir(parents=True, exist_ok=True)
    train_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    bt.build_tokenizer(rows, vocab, tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lengths = [len(bt.hf_tokenize(tokenizer, r, setup.seq_len)[0]) for r in rows]
    return tokenizer, lengths


def length_line(lengths: list[int], seq_len: int) -> str:
    s = sorted(lengths)

    def q(f: float) -> int:
        return s[min(len(s) - 1, int(f * len(s)))]

    return (
        f"{len(s)} Alpaca rows, tokens per sample (template included) median {q(0.5)}, mean "
        f"{statistics.fmean(s):.0f}, p90 {q(0.9)}, p99 {q(0.99)}, max {s[-1]}; seq_len {seq_len}"
    )


def llama_config(shape: Shape, *, max_positions: int, tokenizer: Any) -> Any:
    """The LlamaConfig of `shape` (its vocab at least the tokenizer's), bf16."""
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=max(shape.vocab, len(tokenizer)),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=max_positions,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.dtype = torch.bfloat16
    return config


def llama_num_params(config: Any) -> int:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def _fill_normal(t: Any, std: float, seed: int, pool: Any, chunk: int = 1 << 24) -> None:
    """t ~ N(0, std), chunk by chunk on a thread pool (torch's CPU normal_ is single-threaded and
    lets go of the GIL); chunk i is drawn from its own generator seeded `seed + i`, so the values
    do not depend on the number of threads."""
    import torch

    flat = t.view(-1)

    def fill(i: int) -> None:
        gen = torch.Generator().manual_seed(seed + i)
        flat[i * chunk : (i + 1) * chunk].normal_(0.0, std, generator=gen)

    list(pool.map(fill, range((flat.numel() + chunk - 1) // chunk)))


def write_random_llama(config: Any, out_dir: Path, *, seed: int, shard_gb: float = 2.0) -> int:
    """A random-init Llama of `config` saved as HF sharded safetensors in bf16, without ever
    holding the model: shapes come from a meta-device model, each tensor is drawn on the CPU (on
    every core) and written with its shard, one shard in memory at a time. Linear and embedding
    weights are N(0, initializer_range) as HF's init draws them, norms 1. The CPU, not the GPU:
    this process must hold no CUDA context (its memory would be missing from the runs').
    Returns the parameter count. A directory already holding this very model is reused."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    stamp = out_dir / "bench_model.json"
    wanted = {"config": config.to_dict(), "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(wanted)):
        print(f"  reusing the model in {out_dir}", flush=True)
        return llama_num_params(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del model
    dtype, item = torch.bfloat16, 2
    limit = int(shard_gb * 2**30)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * item
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    weight_map, total = {}, 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                if name.endswith("norm.weight"):
                    t = torch.ones(shapes[name], dtype=dtype)
                else:
                    t = torch.empty(shapes[name], dtype=dtype)
                    _fill_normal(t, config.initializer_range, seed * 1_000_003 + total, pool)
                tensors[name] = t
                weight_map[name] = file
                total += t.numel()
            save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
            del tensors
    index = {"metadata": {"total_size": total * item}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out_dir)
    stamp.write_text(json.dumps(wanted))
    return total


# ---------------------------------------------------------------------------------------------
# Running one process (one GPU: no torchrun), reading what ours logged.


def run_process(cmd: list[str], log_path: Path, timeout_s: int) -> float:
    """Run `cmd` from the repo root in its own process group, output to `log_path`; its wall
    time. On timeout, failure or Ctrl-C the group is killed and the log's tail raised."""
    env = os.environ | OFFLINE_ENV | {"HF_DATASETS_CACHE": str(log_path.parent / "hf_cache")}
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            bt._kill_group(proc)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{shlex.join(cmd)}\nkilled after {timeout_s} s:\n{tail}") from None
        except BaseException:
            bt._kill_group(proc)
            raise
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{shlex.join(cmd)}\nexited with {rc}; log tail:\n{tail}")
    return time.perf_counter() - started


def ours_command(config_path: Path, overrides: list[str]) -> list[str]:
    """Our CLI, one process (world size 1: no torchrun, as launch.train allows)."""
    return [sys.executable, "-m", "launch.train", str(config_path), *overrides]


def write_yaml(path: Path, tree: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def train_records(run_dir: Path) -> dict[int, dict[str, float]]:
    """Our metrics.jsonl: the train records (those with train/loss), by step."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "train/loss" in r}


# Lines of ours' rank-0 log worth showing: what it chose at start.
CHOSEN = (
    "attention:",
    "loss:",
    "precision:",
    "optimizer:",
    "model FLOPs per token",
    "method ",
    "world size",
    "compil",
)


def chosen_lines(log_path: Path) -> list[str]:
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        if "[rank0] INFO " in line:
            text = line.split("INFO ", 1)[1]
            if text.startswith(CHOSEN):
                out.append(text)
    return out


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


@contextlib.contextmanager
def bench_world_size(n: int) -> Iterator[None]:
    """bench_throughput's data helpers read its module-level WORLD_SIZE (2 CPU ranks there);
    one GPU here is one rank."""
    saved = bt.WORLD_SIZE
    bt.WORLD_SIZE = n
    try:
        yield
    finally:
        bt.WORLD_SIZE = saved
