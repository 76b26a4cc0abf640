"""QLoRA of an 8B Llama on one GPU: ours vs HF Trainer + peft + bitsandbytes, runs alternating
A B A B in one invocation (issue 12 item 6). Target: ours >= 1.3x non-pad tokens/s at no more
peak GPU memory.

    .venv/bin/python -m benchmarks.gpu_qlora_8b [--pairs 3] [--model-dir DIR]   # one GPU
    .venv/bin/python -m benchmarks.gpu_qlora_8b --quick     # tiny model on CPU: a smoke run

Model: Llama-3-8B's shapes (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336,
vocab 128256, rope theta 500000, untied head; 8.03B parameters), random init, written once in
bf16 as sharded safetensors (16 GB on disk, drawn tensor by tensor: it never exists in memory
whole). --model-dir keeps it for later invocations (a directory holding the same model is
reused). Tokenizer and data: bench_throughput's locally trained byte-level BPE and its Alpaca
rows with lognormal lengths (median ~405, mean ~535, p99 ~1940 tokens at seq_len 2048), the loss
on the responses.

Both sides, the same settings: the base loaded in 4-bit NF4 with double quantization, bf16
compute (`quantization.compute_dtype` / `bnb_4bit_compute_dtype`), the unquantized weights
loaded in bf16, then peft's `prepare_model_for_kbit_training` (it upcasts them to fp32) and
LoRA r=16, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down; bf16 autocast with fp32 adapters;
gradient checkpointing on, non-reentrant; AdamW lr 2e-4, betas (0.9, 0.999), no weight decay,
clipping at 0.3, 2 warmup steps, cosine to 0.1 x lr; micro batch 4 x accumulation 2; 20 steps
of which the first 5 are not timed; no eval, no checkpoints; attention flash_attention_2 when
flash_attn imports, else sdpa (--attn).

- Ours: `python -m launch.train CONFIG [--set key=value ...]`, one process, method qlora, a
  record in metrics.jsonl every step. By default with data.packing=true, which packs to a token
  budget: train.micro_batch_size then counts packed rows of seq_len, and the bench gives ours
  the rows that carry about the tokens of HF's micro-batch (round(4 x mean sample length /
  seq_len), at least 1; --ours-rows). --no-packing gives ours the very same 4 samples per
  micro-batch as HF, in the same order, and the first-step losses must then agree.
- HF: `Trainer` on the peft model in this file's --worker mode, each micro-batch padded to its
  longest sample (DataCollatorForSeq2Seq), the samples in ours' unpacked order
  (`train_sampling_strategy="sequential"` over a file written in that order); ours' and the HF
  tokenization are checked equal for every row first. HF's own defaults otherwise (its optim
  is printed).

Measured as bench_throughput does: wall time between the end of step --warmup-steps and the end
of the last step (ours: the `time` of each step's metrics record; HF: time.time() in a
TrainerCallback's on_step_end), non-pad input tokens of those steps (ours: train/tokens_seen;
HF: bench_throughput's CountingCollator) over that time; step time is the median of the timed
steps. Peak memory: torch.cuda.max_memory_allocated of each side's process from start to end,
loading included (ours logs it as train/memory_mb; the HF worker reads it at the end with the
same function). On a CPU (--quick) both report ru_maxrss instead.

Without CUDA and without --quick it prints one line saying a GPU is needed and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (the --worker mode is): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import gpu_common as gc  # noqa: E402

bt = gc.bt
TARGET_SPEEDUP = 1.3
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Setup:
    shape: gc.Shape
    seq_len: int = 2048
    median_content_tokens: float = 400.0  # lognormal; the template adds ~45 tokens
    sigma: float = 0.85
    micro_batch_size: int = 4  # HF's samples per micro-batch (and ours' without packing)
    ours_rows: int | None = None  # ours' packed rows per micro-batch; None: HF's tokens
    packing: bool = True
    grad_accum_steps: int = 2
    steps: int = 20
    warmup_steps: int = 5  # left out of the timing
    lr: float = 2e-4
    lr_warmup_steps: int = 2
    max_grad_norm: float = 0.3
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    targets: tuple[str, ...] = TARGETS
    gradient_checkpointing: bool = True
    attn: str = "sdpa"
    seed: int = 1234
    timeout_s: int = 3600  # per run


LLAMA3_8B = gc.Shape(
    hidden=4096,
    layers=32,
    heads=32,
    kv_heads=8,
    intermediate=14336,
    vocab=128256,
    rope_theta=500000.0,
)
FULL = Setup(shape=LLAMA3_8B)
QUICK = Setup(
    shape=gc.Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=1024),
    seq_len=256,
    median_content_tokens=60.0,
    steps=6,
    warmup_steps=2,
    timeout_s=600,
)


# ---------------------------------------------------------------------------------------------
# Assets.


@dataclass
class Assets:
    work: Path
    model_dir: Path
    train_jsonl: Path  # the rows, read by ours
    peer_jsonl: Path  # tokenized as an HF user would, in ours' unpacked order
    ours_rows: int  # ours' packed rows per micro-batch (packing)
    mean_len: float


def rows_needed(setup: Setup) -> int:
    """Rows for every step on both sides, with room to spare."""
    mean = setup.median_content_tokens * math.exp(setup.sigma**2 / 2) + 45
    samples = setup.steps * setup.micro_batch_size * setup.grad_accum_steps
    rows = setup.ours_rows or max(1, round(setup.micro_batch_size * mean / setup.seq_len))
    packed = setup.steps * rows * setup.grad_accum_steps * setup.seq_len / mean
    return int(1.5 * max(samples, packed)) + 64


def prepare(setup: Setup, work: Path, model_dir: Path) -> Assets:
    rows = rows_needed(setup)
    data = gc.data_setup(
        seq_len=setup.seq_len,
        num_rows=rows,
        median_content_tokens=setup.median_content_tokens,
        sigma=setup.sigma,
        micro_batch_size=setup.micro_batch_size,
        grad_accum_steps=setup.grad_accum_steps,
        steps=setup.steps,
        num_workers=0,
        seed=setup.seed,
    )
    train_jsonl = work / "train.jsonl"
    tokenizer, lengths = gc.make_data(data, setup.shape.vocab, train_jsonl, model_dir)
    train_rows = [json.loads(x) for x in train_jsonl.read_text().splitlines()]
    # The samples of ours' unpacked plan, micro-batch by micro-batch (one rank), and the HF
    # tokenization of each checked equal to ours'.
    dataset, (slots,) = bt.our_rank_slots(train_jsonl, tokenizer, data)
    peer = [bt.hf_tokenize(tokenizer, r, setup.seq_len) for r in train_rows]
    for slot, (ids, labels) in enumerate(peer):
        sample = dataset[slot].sample
        if (sample.input_ids, sample.labels) != (ids, labels):
            raise SystemExit(f"row {slot}: ours and the HF tokenization differ")
    peer_jsonl = work / "peer.jsonl"
    with peer_jsonl.open("w") as f:
        for micro in slots:
            for s in micro:
                f.write(json.dumps({"input_ids": peer[s][0], "labels": peer[s][1]}) + "\n")

    config = gc.llama_config(setup.shape, max_positions=setup.seq_len, tokenizer=tokenizer)
    t0 = time.time()
    n_params = gc.write_random_llama(config, model_dir, seed=setup.seed)
    mean = statistics.fmean(lengths)
    ours_rows = setup.ours_rows or max(1, round(setup.micro_batch_size * mean / setup.seq_len))
    print(
        f"model: {setup.shape.describe(n_params, config.vocab_size)}, random init, bf16 "
        f"sharded safetensors in {model_dir} ({time.time() - t0:.0f} s)"
    )
    print(
        f"data: {gc.length_line(lengths, setup.seq_len)}; tokenizer {len(tokenizer)} tokens; "
        "ours' and HF's tokens/labels identical for every row",
        flush=True,
    )
    return Assets(work, model_dir, train_jsonl, peer_jsonl, ours_rows, mean)


# ---------------------------------------------------------------------------------------------
# Ours.


def our_config(assets: Assets, setup: Setup, run_dir: Path) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "seed": setup.seed,
        "model": {
            "name_or_path": str(assets.model_dir),
            "dtype": "bfloat16",  # the unquantized weights: embeddings, norms, head
            "attn_implementation": setup.attn,
            "gradient_checkpointing": setup.gradient_checkpointing,
        },
        "method": "qlora",
        "lora": {
            "r": setup.lora_r,
            "alpha": setup.lora_alpha,
            "dropout": setup.lora_dropout,
            "target_modules": list(setup.targets),
        },
        "quantization": {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": "bfloat16",
        },
        "data": {
            "train_path": str(assets.train_jsonl),
            "format": "instruction",
            "template": "alpaca",
            "context_field": "input",
            "response_field": "output",
            "seq_len": setup.seq_len,
            "packing": setup.packing,
            "num_workers": 0,
        },
        "train": {
            "micro_batch_size": assets.ours_rows if setup.packing else setup.micro_batch_size,
            "grad_accum_steps": setup.grad_accum_steps,
            "max_steps": setup.steps,
            "precision": "bf16",  # what auto is on a GPU; explicit so that --quick on CPU matches
            "max_grad_norm": setup.max_grad_norm,
        },
        "optim": {"lr": setup.lr, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
        "schedule": {
            "warmup_steps": setup.lr_warmup_steps,
            "decay": "cosine",
            "min_lr_ratio": 0.1,
        },
        "logging": {"every_steps": 1, "tensorboard": False, "progress_bar": "off"},
        "checkpoint": {"save_at_end": False, "resume": "never"},
        "output": {"save_hf_model": False},
    }


def run_ours(assets: Assets, setup: Setup, tag: str, overrides: list[str]) -> dict[str, Any]:
    run_dir = assets.work / "runs" / tag
    config_path = assets.work / f"{tag}.yaml"
    gc.write_yaml(config_path, our_config(assets, setup, run_dir))
    log_path = assets.work / f"{tag}.log"
    wall = gc.run_process(gc.ours_command(config_path, overrides), log_path, setup.timeout_s)
    train = gc.train_records(run_dir)
    tokens = bt._per_step({s: r["train/tokens_seen"] for s, r in train.items()})
    if all("data/tokens_total" in r for r in train.values()):
        total = bt._per_step({s: r["data/tokens_total"] for s, r in train.items()})
    else:
        total = {s: float("nan") for s in train}
    return {
        "step_end": {s: r["time"] for s, r in train.items()},
        "tokens": tokens,
        "total": total,
        "loss": train[1]["train/loss"],
        "peak_mb": max(r["train/memory_mb"] for r in train.values()),
        "wall": wall,
        "notes": gc.chosen_lines(log_path),
    }


# ---------------------------------------------------------------------------------------------
# HF Trainer + peft + bitsandbytes: this file's --worker mode, one process.


def run_hf(assets: Assets, setup: Setup, tag: str) -> dict[str, Any]:
    out = assets.work / "runs" / tag
    out.mkdir(parents=True)
    spec = {
        "model_dir": str(assets.model_dir),
        "data": str(assets.peer_jsonl),
        "out": str(out),
        "setup": asdict(setup),
    }
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    wall = gc.run_process(cmd, assets.work / f"{tag}.log", setup.timeout_s)
    result = json.loads((out / "result.json").read_text())
    tokens: dict[int, float] = {}
    total: dict[int, float] = {}
    for f in out.glob("tokens-r*-w*.jsonl"):
        for line in f.read_text().splitlines():
            index, real, numel = json.loads(line)
            step = index // setup.grad_accum_steps + 1
            tokens[step] = tokens.get(step, 0.0) + real
            total[step] = total.get(step, 0.0) + numel
    return {
        "step_end": {int(k): v for k, v in result["step_end"].items()},
        "tokens": tokens,
        "total": total,
        "loss": result["loss_1"],
        "peak_mb": result["peak_mb"],
        "wall": wall,
        "notes": result["notes"],
    }


def hf_worker(spec_path: str) -> None:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from trainer.metrics import peak_memory_mb

    spec = json.loads(Path(spec_path).read_text())
    s = spec["setup"]
    out = Path(spec["out"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"],
        dtype=torch.bfloat16,
        quantization_config=quant,
        device_map={"": device},
        attn_implementation=s["attn"],
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=s["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=s["lora_r"],
            lora_alpha=s["lora_alpha"],
            lora_dropout=s["lora_dropout"],
            target_modules=list(s["targets"]),
            task_type="CAUSAL_LM",
        ),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    train = datasets.Dataset.from_list(rows)

    timer = gc.bt.step_times()
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=s["grad_accum_steps"],
        max_steps=s["steps"],
        learning_rate=s["lr"],
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=s["max_grad_norm"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=s["lr_warmup_steps"],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        dataloader_num_workers=0,
        seed=s["seed"],
        disable_tqdm=True,
        bf16=True,
        gradient_checkpointing=s["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # The file is in ours' order already: the same samples in each micro-batch.
        train_sampling_strategy="sequential",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=bt.CountingCollator(
            DataCollatorForSeq2Seq(tokenizer, padding="longest"),
            tokenizer.pad_token_id,
            str(out),
            0,
        ),
        callbacks=[timer],
    )
    trainer.train()
    notes = [
        f"optim {args.optim}, attention {model.config._attn_implementation}, "
        f"{trainable:,} trainable parameters, gradient checkpointing {args.gradient_checkpointing}"
    ]
    result = {
        "step_end": timer.step_end,
        "loss_1": timer.losses.get(1, float("nan")),
        "peak_mb": peak_memory_mb(device),
        "notes": notes,
    }
    (out / "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Pairs and reports.


@dataclass
class Run:
    pair: int
    name: str
    tokens_per_s: float  # non-pad, timed steps
    step_s: float  # median over the timed steps
    tokens_per_step: float  # non-pad
    fill: float  # non-pad share of the input positions
    peak_mb: float
    loss_1: float
    wall_s: float
    load: float  # 1-minute load average when the run started


def run_pairs(assets: Assets, setup: Setup, pairs: int, overrides: list[str]) -> list[Run]:
    runs, said = [], set()
    for pair in range(1, pairs + 1):
        order = ["ours", "hf"] if pair % 2 else ["hf", "ours"]  # flip who goes first
        for side in order:
            tag = f"{pair}-{side}"
            load = os.getloadavg()[0]
            raw = (
                run_ours(assets, setup, tag, overrides)
                if side == "ours"
                else run_hf(assets, setup, tag)
            )
            if side not in said:
                print("\n".join(f"  {side} at start: {x}" for x in raw["notes"]))
                said.add(side)
            tps, step_s, per_step, fill = bt._timed(
                raw["step_end"], raw["tokens"], raw["total"], setup
            )
            run = Run(
                pair=pair,
                name=ours_name(setup) if side == "ours" else HF_NAME,
                tokens_per_s=tps,
                step_s=step_s,
                tokens_per_step=per_step,
                fill=fill,
                peak_mb=raw["peak_mb"],
                loss_1=raw["loss"],
                wall_s=raw["wall"],
                load=load,
            )
            runs.append(run)
            print(
                f"  pair {pair}/{pairs} {run.name}: {tps:,.0f} non-pad tok/s, step "
                f"{step_s:.3f} s, {per_step:,.0f} tok/step, peak {run.peak_mb:,.0f} MB, "
                f"loss@1 {run.loss_1:.5f}, load {load:.1f}, {run.wall_s:.0f} s",
                flush=True,
            )
    return runs


HF_NAME = "HF Trainer + peft + bnb, pad to longest"


def ours_name(setup: Setup) -> str:
    return "ours, packing" if setup.packing else "ours, no packing"


def table(runs: list[Run], memory: str) -> str:
    lines = [
        f"| pair | run | non-pad tok/s | step s (median) | non-pad tok/step | non-pad share | "
        f"{memory} | loss step 1 | wall s | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.pair} | {r.name} | {r.tokens_per_s:,.0f} | {r.step_s:.3f} | "
            f"{r.tokens_per_step:,.0f} | {r.fill:.2f} | {r.peak_mb:,.0f} | {r.loss_1:.5f} | "
            f"{r.wall_s:.0f} | {r.load:.2f} |"
        )
    return "\n".join(lines)


def summary(runs: list[Run], setup: Setup, quick: bool) -> str:
    ours = {r.pair: r for r in runs if r.name == ours_name(setup)}
    hf = {r.pair: r for r in runs if r.name == HF_NAME}
    pairs = [(ours[p], hf[p]) for p in sorted(ours) if p in hf]
    speed = [o.tokens_per_s / h.tokens_per_s for o, h in pairs]
    step = [o.step_s / h.step_s for o, h in pairs]
    memory = [o.peak_mb / h.peak_mb for o, h in pairs]

    def cells(v: list[float]) -> str:
        med, lo, hi = gc.spread(v)
        return f"{med:.2f}x | {lo:.2f}x | {hi:.2f}x"

    loss = "n/a (packing: other batches)"
    if not setup.packing:
        loss = f"{max(abs(o.loss_1 - h.loss_1) for o, h in pairs):.2e}"
    lines = [
        "| ours / HF | median | min | max |",
        "|---|---|---|---|",
        f"| non-pad tokens/s | {cells(speed)} |",
        f"| step time | {cells(step)} |",
        f"| peak memory | {cells(memory)} |",
        "",
        f"loss at step 1, max |ours - HF|: {loss}",
    ]
    met = statistics.median(speed) >= TARGET_SPEEDUP and max(memory) <= 1.0
    verdict = "n/a (smoke run)" if quick else ("met" if met else "NOT met")
    lines.append(
        f"target: ours >= {TARGET_SPEEDUP}x non-pad tokens/s at no more peak memory: "
        f"tokens/s median {statistics.median(speed):.2f}x, peak memory at most "
        f"{max(memory):.2f}x -> {verdict}"
    )
    return "\n".join(lines)


def check_packages() -> None:
    import importlib.util

    missing = [m for m in ("peft", "bitsandbytes") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"benchmarks/gpu_qlora_8b.py: needs {' and '.join(missing)} (pip install them)")
        sys.exit(gc.GPU_NEEDED_EXIT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", "--smoke", action="store_true", help="tiny model: a smoke run")
    p.add_argument("--pairs", type=int, help="A/B pairs (3; --quick 1)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (20)")
    p.add_argument("--warmup-steps", type=int, help="first steps left out of the timing (5)")
    p.add_argument("--micro-batch-size", type=int, help="HF samples per micro-batch (4)")
    p.add_argument("--ours-rows", type=int, help="ours' packed rows per micro-batch")
    p.add_argument("--no-packing", action="store_true", help="ours on HF's very samples")
    p.add_argument("--grad-accum-steps", type=int, help="(2)")
    p.add_argument("--seq-len", type=int, help="(2048)")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--targets", help="comma-separated LoRA target modules")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--attn", default="auto", help="auto (flash_attention_2 if importable), sdpa")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for ours")
    p.add_argument("--model-dir", type=Path, help="build the model here and keep it (reused)")
    p.add_argument("--workdir", type=Path, help="where data and runs go (a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--timeout", type=int, help="seconds per run before it is killed")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        hf_worker(args.worker)
        return
    gc.require_gpu(args.quick, "benchmarks/gpu_qlora_8b.py")
    check_packages()

    setup = QUICK if args.quick else FULL
    for key, value in {
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "micro_batch_size": args.micro_batch_size,
        "ours_rows": args.ours_rows,
        "grad_accum_steps": args.grad_accum_steps,
        "seq_len": args.seq_len,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "targets": tuple(args.targets.split(",")) if args.targets else None,
        "timeout_s": args.timeout,
    }.items():
        if value is not None:
            setup = replace(setup, **{key: value})
    setup = replace(
        setup,
        packing=not args.no_packing,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        attn=gc.pick_attention(args.attn),
    )
    if not 0 < setup.warmup_steps < setup.steps:
        p.error("need 0 < --warmup-steps < --steps")
    pairs = args.pairs if args.pairs is not None else 1 if args.quick else 3

    import torch

    title = "gpu_qlora_8b: QLoRA 8B, ours vs HF Trainer + peft + bitsandbytes (issue 12 item 6)"
    if args.quick:
        title += " -- QUICK SMOKE RUN, not a performance figure"
    print(gc.header(title), flush=True)
    memory = "peak GPU MB (max_memory_allocated)" if torch.cuda.is_available() else "peak RSS MB"

    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-qlora-8b-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or work / "model"
    started = time.time()
    try:
        with gc.bench_world_size(1):
            assets = prepare(setup, work, model_dir)
            per_micro = (
                f"ours {assets.ours_rows} packed row(s) of {setup.seq_len} tokens (data.packing "
                f"to a token budget; HF's micro-batch holds {setup.micro_batch_size} x "
                f"{assets.mean_len:.0f} tokens on average)"
                if setup.packing
                else f"ours the same {setup.micro_batch_size} samples (no packing)"
            )
            print(
                f"run: micro batch: HF {setup.micro_batch_size} samples padded to the longest, "
                f"{per_micro}; accumulation {setup.grad_accum_steps}; {setup.steps} steps, the "
                f"first {setup.warmup_steps} untimed; LoRA r={setup.lora_r} alpha="
                f"{setup.lora_alpha:g} dropout {setup.lora_dropout} on {','.join(setup.targets)}; "
                f"NF4 + double quant, bf16 compute; gradient checkpointing "
                f"{'on' if setup.gradient_checkpointing else 'off'}; attention {setup.attn}; "
                f"{pairs} pair(s), order flipped every pair",
                flush=True,
            )
            if args.set:
                print(f"ours' extra overrides: {shlex.join(args.set)}")
            runs = run_pairs(assets, setup, pairs, args.set)
        print()
        print(table(runs, memory))
        print()
        print(summary(runs, setup, args.quick))
    finally:
        keep = args.keep or args.workdir
        kept = f"; work dir {work}" if keep else ""
        print(f"\ntotal {time.time() - started:.0f} s{kept}")
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
