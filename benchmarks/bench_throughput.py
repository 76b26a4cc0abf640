"""Training throughput against HF Trainer and TRL, in one invocation, runs alternating A B A B.

    .venv/bin/python benchmarks/bench_throughput.py [a] [b] [c] [--pairs 3] [--quick]

- (a) ours without packing vs HF `Trainer` padding each micro-batch to its longest sample;
- (b) ours with `data.packing=true` vs HF `Trainer` padding every sample to `seq_len`
  (`padding="max_length"`, the recipe of HF's tutorials);
- (c) ours with packing vs TRL `SFTTrainer(packing=True)` (best-fit-decreasing packing of the
  whole data set, which TRL runs padding-free) and, as a second TRL row,
  `SFTTrainer(padding_free=True)` without packing (each micro-batch flattened into one row).
  Without trl installed (`pip install -e .[bench]`) (c) is one row saying so.

Every run is 2 processes under torchrun (gloo, CPU, OMP_NUM_THREADS=1 each): ours through the
real CLI (`torchrun -m launch.train` with a generated config), the peers through this file's
`--worker` mode. Same random-init Llama (saved once in HF format), same locally trained BPE
tokenizer, same Alpaca-template rows with the loss on the response only, fp32, AdamW with the
same hyperparameters, same global batch and number of optimizer steps, no eval, no checkpoints.

The HF side gets the very samples ours puts in each micro-batch of each rank: their tokens are
made here the way an HF user would (`tokenizer(prompt + response)` + EOS, labels masked by
character offsets), checked equal to ours for every row, and written in the order that
accelerate's sequential sharding (batch i to rank i % world size) hands out as ours does. So
the first step's losses must agree; they are printed.

Timing: wall time on rank 0 between the end of step `--warmup-steps` and the end of the last
step (ours: the `time` of each step's record in metrics.jsonl, logged every step; peers: a
TrainerCallback's time.time() at `on_step_end`). Non-pad input tokens of those steps, over
all ranks (ours: `train/tokens_seen`; peers: a collator wrapper counting per rank and
micro-batch), / time / world size = tokens/s per device. Peak memory: the largest VmHWM
(/proc/PID/status) among the rank processes, polled while they run. On a shared machine wall
time mostly measures the other jobs, so the ranks' CPU time (utime + stime) over the same
steps is polled too: tok/CPU-s = the same tokens / the ranks' CPU seconds, which leaves out
every wait (for a core, for the other rank), a rough stand-in for an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
IGNORE_INDEX = -100
WORLD_SIZE = 2

# The Stanford Alpaca prompt, written out independently of data.templates: the bench checks
# that ours renders exactly this text.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Setup:
    """Everything both sides of a comparison share."""

    hidden: int = 384
    layers: int = 6
    heads: int = 6
    intermediate: int = 1024
    vocab: int = 8192
    seq_len: int = 512
    num_rows: int = 2000
    median_content_tokens: float = 50.0  # lognormal; the Alpaca template adds ~40 more
    sigma: float = 0.85
    micro_batch_size: int = 4
    grad_accum_steps: int = 2
    steps: int = 30
    warmup_steps: int = 5  # excluded from the timing
    lr: float = 1e-3
    lr_warmup_steps: int = 3
    num_workers: int = 0
    seed: int = 1234
    timeout_s: int = 900  # per run

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * WORLD_SIZE


QUICK = Setup(
    hidden=128,
    layers=2,
    heads=4,
    intermediate=256,
    num_rows=600,
    steps=8,
    warmup_steps=2,
    lr_warmup_steps=2,
    timeout_s=300,
)


# ---------------------------------------------------------------------------------------------
# Assets: rows, tokenizer, model, and the peers' tokenized data.

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
VERBS = ["Explain", "Summarize", "Describe", "List", "Rewrite", "Classify", "Write", "Compare"]


def make_lexicon(rng: random.Random, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


def make_text(rng: random.Random, lexicon: list[str], weights: list[float], n_words: int) -> str:
    """Sentences of Zipf-distributed pseudo-words, about `n_words` long."""
    sentences, left = [], max(1, n_words)
    while left > 0:
        k = min(left, rng.randint(5, 16))
        words = rng.choices(lexicon, weights, k=k)
        if k > 6 and rng.random() < 0.4:
            words[rng.randrange(2, k - 2)] += ","
        sentences.append(" ".join(words).capitalize() + rng.choice(".....?!"))
        left -= k
    return " ".join(sentences)


def make_rows(n: int, setup: Setup) -> list[dict[str, str]]:
    """Alpaca-style rows whose lengths are skewed like real instruction data: the content is
    lognormal (median `median_content_tokens` tokens), so most rows are far shorter than seq_len
    and a tail reaches it. Deterministic from the seed."""
    rng = random.Random(setup.seed)
    lexicon = make_lexicon(rng, 6000)
    weights = [1.0 / (i + 1) ** 1.05 for i in range(len(lexicon))]
    rows = []
    words_per_token = 0.85  # punctuation and rare words cost extra tokens
    max_content = setup.seq_len - 60  # leave room for the template
    for _ in range(n):
        content = min(
            max_content,
            max(8.0, rng.lognormvariate(math.log(setup.median_content_tokens), setup.sigma)),
        )
        words = content * words_per_token
        has_input = rng.random() < 0.4
        n_instr = max(3, round(words * rng.uniform(0.1, 0.3)))
        n_input = max(3, round(words * rng.uniform(0.2, 0.4))) if has_input else 0
        n_output = max(3, round(words) - n_instr - n_input)
        instruction = f"{rng.choice(VERBS)} {make_text(rng, lexicon, weights, n_instr - 1)}"
        rows.append(
            {
                "instruction": instruction,
                "input": make_text(rng, lexicon, weights, n_input) if has_input else "",
                "output": make_text(rng, lexicon, weights, n_output),
            }
        )
    return rows


def alpaca_prompt(row: dict[str, str]) -> str:
    template = ALPACA_WITH_INPUT if row["input"] else ALPACA_NO_INPUT
    return template.format(instruction=row["instruction"], input=row["input"])


def build_tokenizer(rows: list[dict[str, str]], vocab: int, out_dir: Path) -> Any:
    """A byte-level BPE trained here on the rows (nothing downloaded), adding BOS like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator((alpaca_prompt(r) + r["output"] for r in rows), trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tok.padding_side = "right"
    tok.save_pretrained(out_dir)
    return tok


def build_model(setup: Setup, tokenizer: Any, out_dir: Path) -> int:
    """A random-init Llama saved in HF format (fp32) beside the tokenizer; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(setup.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=setup.hidden,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.heads,
        intermediate_size=setup.intermediate,
        max_position_embeddings=setup.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def hf_tokenize(tokenizer: Any, row: dict[str, str], seq_len: int) -> tuple[list[int], list[int]]:
    """How an HF user tokenizes an Alpaca row for SFT: prompt + response as one text (BOS added
    by the tokenizer), EOS appended, loss only on tokens that end inside the response."""
    prompt = alpaca_prompt(row)
    enc = tokenizer(prompt + row["output"], return_offsets_mapping=True)
    ids = enc["input_ids"] + [tokenizer.eos_token_id]
    labels = [
        t if end > len(prompt) else IGNORE_INDEX
        for t, (_, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ] + [tokenizer.eos_token_id]
    return ids[:seq_len], labels[:seq_len]


def our_data_config(train_path: Path, setup: Setup, packing: bool) -> Any:
    from data.config import DataConfig

    return DataConfig(
        train_path=str(train_path),
        template="alpaca",
        context_field="input",
        response_field="output",
        seq_len=setup.seq_len,
        packing=packing,
        # The peers get the same samples per step: packing inside each micro-batch (the
        # token-budget default would change the samples and the batch size in samples).
        pack_scope="micro_batch",
        num_workers=setup.num_workers,
    )


def our_rank_slots(train_path: Path, tokenizer: Any, setup: Setup) -> tuple[Any, list[list[int]]]:
    """Our data set, and for each rank the row slots of its micro-batches, in order, for the
    run's steps: our loader's own plan and epoch order (data.loader), not a copy of them."""
    from data.loader import InstructionDataset, MapStyleStepBatches

    cfg = our_data_config(train_path, setup, packing=False)
    dataset = InstructionDataset(train_path, tokenizer, cfg)
    per_rank = []
    for rank in range(WORLD_SIZE):
        batches = MapStyleStepBatches(
            dataset,
            cfg,
            rank=rank,
            world_size=WORLD_SIZE,
            micro_batch_size=setup.micro_batch_size,
            grad_accum_steps=setup.grad_accum_steps,
            seed=setup.seed,
            pad_id=tokenizer.pad_token_id,
        )
        plan, order = batches.plan(), batches.epoch_order(0)
        if plan.num_steps < setup.steps:
            raise SystemExit(f"{setup.num_rows} rows give {plan.num_steps} steps < {setup.steps}")
        per_rank.append(
            [
                [order[p] for p in plan.positions(m)]
                for m in range(setup.steps * setup.grad_accum_steps)
            ]
        )
    return dataset, per_rank


@dataclass
class Assets:
    tmp: Path
    model_dir: Path
    train_jsonl: Path  # the rows, read by ours
    peer_ordered: Path  # tokenized, in the order accelerate hands ours' micro-batches out
    peer_all: Path  # tokenized, every row in file order (TRL packs the whole set)
    num_params: int
    vocab: int
    lengths: list[int]


def prepare_assets(setup: Setup, tmp: Path) -> Assets:
    from transformers import AutoTokenizer

    from data.templates import render_instruction_prompt

    rows = make_rows(setup.num_rows, setup)
    train_jsonl = tmp / "train.jsonl"
    train_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = tmp / "model"
    build_tokenizer(rows, setup.vocab, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    num_params = build_model(setup, tokenizer, model_dir)

    # Same text and the same tokens/labels on both sides, for every row.
    peer = [hf_tokenize(tokenizer, r, setup.seq_len) for r in rows]
    dataset, per_rank = our_rank_slots(train_jsonl, tokenizer, setup)
    for slot, (row, (ids, labels)) in enumerate(zip(rows, peer, strict=True)):
        ours_prompt = render_instruction_prompt(row["instruction"], row["input"] or None, "alpaca")
        sample = dataset[slot].sample
        if ours_prompt != alpaca_prompt(row) or (sample.input_ids, sample.labels) != (ids, labels):
            raise SystemExit(f"row {slot}: ours and the HF tokenization differ")

    def write(path: Path, slots: list[int]) -> None:
        with path.open("w") as f:
            for s in slots:
                ids, labels = peer[s]
                f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")

    # accelerate gives batch i of a sequential sampler to rank i % world size; ours gives rank r
    # its micro-batch a of step k. Interleave so that each rank's n-th batch is the same.
    ordered = [
        slot
        for micro in range(setup.steps * setup.grad_accum_steps)
        for rank in range(WORLD_SIZE)
        for slot in per_rank[rank][micro]
    ]
    write(tmp / "peer_ordered.jsonl", ordered)
    write(tmp / "peer_all.jsonl", list(range(len(rows))))
    return Assets(
        tmp=tmp,
        model_dir=model_dir,
        train_jsonl=train_jsonl,
        peer_ordered=tmp / "peer_ordered.jsonl",
        peer_all=tmp / "peer_all.jsonl",
        num_params=num_params,
        vocab=len(tokenizer),
        lengths=[len(ids) for ids, _ in peer],
    )


# ---------------------------------------------------------------------------------------------
# Running one side: a torchrun job in its own process group, its ranks watched (RSS, CPU).


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the parent pid follows the state.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_s(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RankMonitor(threading.Thread):
    """Polls the launcher's direct children (the ranks; DataLoader workers are theirs) until
    stopped: their VmHWM (it only grows, so the last reading is the peak up to then) and their
    CPU time, stamped with time.time() (the clock both sides stamp their steps with)."""

    def __init__(self, launcher_pid: int, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.launcher_pid, self.interval_s = launcher_pid, interval_s
        self.peaks_kb: dict[int, int] = {}
        self.cpu: dict[int, list[tuple[float, float]]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            for pid in _children(self.launcher_pid):
                now, kb, cpu = time.time(), _vm_hwm_kb(pid), _cpu_s(pid)
                if kb is not None:
                    self.peaks_kb[pid] = max(kb, self.peaks_kb.get(pid, 0))
                if cpu is not None:
                    self.cpu.setdefault(pid, []).append((now, cpu))

    def stop(self) -> None:
        self.done.set()
        self.join()

    @property
    def peak_mb(self) -> float:
        return max(self.peaks_kb.values(), default=0) / 1024

    def cpu_between(self, t0: float, t1: float) -> list[float]:
        """Each rank's CPU seconds between wall times t0 and t1 (interpolated samples)."""

        def at(samples: list[tuple[float, float]], t: float) -> float:
            for (ta, ca), (tb, cb) in itertools.pairwise(samples):
                if ta <= t <= tb:
                    return ca + (cb - ca) * (t - ta) / max(tb - ta, 1e-9)
            raise ValueError("the CPU samples do not cover the timed steps")

        return [at(v, t1) - at(v, t0) for v in self.cpu.values() if len(v) > 1]


def run_job(args: list[str], log_path: Path, timeout_s: int) -> RankMonitor:
    """Run `torchrun --nproc_per_node=2 ARGS` from the repo root; what was seen of its ranks.
    The whole process group is killed on timeout (or if this process is interrupted)."""
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(log_path.parent / "hf_datasets_cache"),
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD_SIZE}",
        *args,
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        monitor = RankMonitor(proc.pid)
        monitor.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            monitor.stop()
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"{' '.join(cmd)}\nkilled after {timeout_s} s; log tail:\n{tail}"
            ) from None
        except BaseException:  # Ctrl-C: leave no rank behind
            _kill_group(proc)
            monitor.stop()
            raise
        monitor.stop()
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(cmd)}\nexited with {rc}; log tail:\n{tail}")
    return monitor


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Run:
    """One run's numbers; ratios and tables are made of these."""

    comparison: str
    pair: int
    name: str
    tokens_per_s: float  # non-pad, per device, timed steps
    step_s: float  # median step time over the timed steps (rank 0)
    tokens_per_step: float  # non-pad, all ranks
    fill: float  # non-pad / all input positions of the timed steps
    peak_rss_mb: float
    tokens_per_cpu_s: float  # non-pad, over the ranks' CPU seconds in the timed steps
    cpu_s_per_step: float  # a rank's CPU seconds per timed step, mean over ranks
    first_loss: float
    load: float  # 1-minute load average when the run started
    wall_s: float


def _timed(
    step_end: dict[int, float], tokens: dict[int, float], total: dict[int, float], setup: Setup
) -> tuple[float, float, float, float]:
    """(tokens/s per device, median step s, tokens per step, fill) over steps warmup+1..last."""
    first, last = setup.warmup_steps, setup.steps
    elapsed = step_end[last] - step_end[first]
    steps = range(first + 1, last + 1)
    num_tokens = sum(tokens[s] for s in steps)
    num_total = sum(total[s] for s in steps)
    step_s = statistics.median(step_end[s] - step_end[s - 1] for s in steps)
    return (
        num_tokens / elapsed / WORLD_SIZE,
        step_s,
        num_tokens / len(steps),
        num_tokens / num_total if num_total else float("nan"),
    )


def our_config(assets: Assets, setup: Setup, packing: bool, run_dir: Path) -> dict[str, Any]:
    """The run config ours gets: the same settings as the peers' wherever both have them."""
    return {
        "run_dir": str(run_dir),
        "seed": setup.seed,
        "model": {"name_or_path": str(assets.model_dir)},
        "data": {
            "train_path": str(assets.train_jsonl),
            "format": "instruction",
            "template": "alpaca",
            "context_field": "input",
            "response_field": "output",
            "seq_len": setup.seq_len,
            "packing": packing,
            "pack_scope": "micro_batch",  # see our_data_config
            "num_workers": setup.num_workers,
        },
        "train": {
            "micro_batch_size": setup.micro_batch_size,
            "grad_accum_steps": setup.grad_accum_steps,
            "max_steps": setup.steps,
            "precision": "fp32",
            "max_grad_norm": 1.0,
        },
        "optim": {"lr": setup.lr, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8},
        "schedule": {
            "warmup_steps": setup.lr_warmup_steps,
            "decay": "cosine",
            "min_lr_ratio": 0.1,
        },
        "logging": {"every_steps": 1, "tensorboard": False, "progress_bar": "off"},
        "checkpoint": {"save_at_end": False, "resume": "never"},
        "output": {"save_hf_model": False},
    }


def _per_step(cumulative: dict[int, float]) -> dict[int, float]:
    return {s: v - cumulative.get(s - 1, 0.0) for s, v in cumulative.items()}


def run_ours(
    assets: Assets, setup: Setup, packing: bool, tag: str
) -> tuple[dict, RankMonitor, float]:
    import yaml

    run_dir = assets.tmp / "runs" / tag
    config = assets.tmp / f"{tag}.yaml"
    config.write_text(yaml.safe_dump(our_config(assets, setup, packing, run_dir), sort_keys=False))
    started = time.perf_counter()
    monitor = run_job(
        ["-m", "launch.train", str(config)], assets.tmp / f"{tag}.log", setup.timeout_s
    )
    wall = time.perf_counter() - started
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if "train/loss" in r}
    tokens = _per_step({s: r["train/tokens_seen"] for s, r in train.items()})
    # The data pipeline's counters (all ranks): positions of the tensors it made, pad included.
    if all("data/tokens_total" in r for r in train.values()):
        total = _per_step({s: r["data/tokens_total"] for s, r in train.items()})
    else:
        total = {s: float("nan") for s in train}
    # What ours chose at start (attention kernel, loss implementation), as its rank 0 logs it.
    log = (assets.tmp / f"{tag}.log").read_text(errors="replace").splitlines()
    chosen = [x.split("INFO ", 1)[1] for x in log if "[rank0] INFO attention:" in x]
    chosen += [x.split("INFO ", 1)[1] for x in log if "[rank0] INFO loss:" in x]
    raw = {
        "step_end": {s: r["time"] for s, r in train.items()},
        "tokens": tokens,
        "total": total,
        "loss": train[1]["train/loss"],
        "notes": chosen,
    }
    return raw, monitor, wall


PEERS = {
    "hf_dynamic": "HF Trainer, pad to longest",
    "hf_max_length": "HF Trainer, padding=max_length",
    "trl_packed": "TRL SFTTrainer packing=True",
    "trl_padding_free": "TRL SFTTrainer padding_free=True",
}


def trl_rows_per_micro_batch(assets: Assets, setup: Setup) -> int:
    """Packed rows per TRL micro-batch carrying about the tokens of ours' micro-batch."""
    mean = statistics.fmean(assets.lengths)
    return max(1, round(setup.micro_batch_size * mean / setup.seq_len))


def run_peer(assets: Assets, setup: Setup, kind: str, tag: str) -> tuple[dict, RankMonitor, float]:
    out = assets.tmp / "runs" / tag
    out.mkdir(parents=True)
    spec = {
        "kind": kind,
        "model_dir": str(assets.model_dir),
        "data": str(assets.peer_all if kind == "trl_packed" else assets.peer_ordered),
        "out": str(out),
        "setup": asdict(setup),
        "trl_rows": trl_rows_per_micro_batch(assets, setup),
    }
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    monitor = run_job(
        [str(Path(__file__).resolve()), "--worker", str(spec_path)],
        assets.tmp / f"{tag}.log",
        setup.timeout_s,
    )
    wall = time.perf_counter() - started
    result = json.loads((out / "result.json").read_text())
    step_end = {int(k): v for k, v in result["step_end"].items()}
    tokens: dict[int, float] = {}
    total: dict[int, float] = {}
    for f in out.glob("tokens-r*-w*.jsonl"):
        for line in f.read_text().splitlines():
            index, real, numel = json.loads(line)
            step = index // setup.grad_accum_steps + 1
            tokens[step] = tokens.get(step, 0.0) + real
            total[step] = total.get(step, 0.0) + numel
    return (
        {"step_end": step_end, "tokens": tokens, "total": total, "loss": result["loss_1"]},
        monitor,
        wall,
    )


# ---------------------------------------------------------------------------------------------
# The peers' rank process (torchrun runs this file with --worker SPEC).


class CountingCollator:
    """Wraps a collator: appends (micro-batch index on this rank, non-pad tokens, positions) of
    each batch to a file per rank and DataLoader worker. Batch i of a rank goes to worker
    i % num_workers, in order, so the index is recovered from the worker's call count."""

    def __init__(self, inner: Any, pad_id: int, out_dir: str, rank: int):
        self.inner, self.pad_id, self.out_dir, self.rank = inner, pad_id, out_dir, rank
        self.calls = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch.utils.data

        batch = self.inner(features)
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.calls * num_workers + worker
        self.calls += 1
        ids = batch["input_ids"]
        real = int((ids != self.pad_id).sum())
        path = Path(self.out_dir) / f"tokens-r{self.rank}-w{worker}.jsonl"
        with path.open("a") as f:
            f.write(json.dumps([index, real, ids.numel()]) + "\n")
        return batch


def peer_worker(spec_path: str) -> None:
    import datasets
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    spec = json.loads(Path(spec_path).read_text())
    setup, kind, out = Setup(**spec["setup"]), spec["kind"], Path(spec["out"])
    rank = int(os.environ["RANK"])
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa"
    )
    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    train = datasets.Dataset.from_list(rows)

    # The same settings as ours wherever both have them.
    common = {
        "output_dir": str(out / "trainer"),
        "per_device_train_batch_size": setup.micro_batch_size,
        "gradient_accumulation_steps": setup.grad_accum_steps,
        "max_steps": setup.steps,
        "learning_rate": setup.lr,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "warmup_steps": setup.lr_warmup_steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "ddp_backend": "gloo",
        # Ours never searches for unused parameters (every one is used); HF's default does.
        "ddp_find_unused_parameters": False,
        "dataloader_num_workers": setup.num_workers,
        "dataloader_pin_memory": False,
        "seed": setup.seed,
        "disable_tqdm": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        # Shuffled already, in ours' order: the same samples in each micro-batch of each rank.
        "train_sampling_strategy": "sequential",
    }
    timer = step_times()
    if kind in ("hf_dynamic", "hf_max_length"):
        if kind == "hf_max_length":
            # The tutorials' recipe: every sample padded to max_length when it is tokenized.
            def pad(row: dict[str, Any]) -> dict[str, Any]:
                n = setup.seq_len - len(row["input_ids"])
                return {
                    "input_ids": row["input_ids"] + [tokenizer.pad_token_id] * n,
                    "attention_mask": [1] * len(row["input_ids"]) + [0] * n,
                    "labels": row["labels"] + [IGNORE_INDEX] * n,
                }

            train = train.map(pad)
            collator = default_data_collator
        else:
            collator = DataCollatorForSeq2Seq(tokenizer, padding="longest")
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=train,
            data_collator=collator,
            callbacks=[timer],
        )
    else:
        from trl import SFTConfig, SFTTrainer

        if kind == "trl_packed":
            trl = {"packing": True, "max_length": setup.seq_len}
            common["per_device_train_batch_size"] = spec["trl_rows"]
            del common["train_sampling_strategy"]  # TRL's default order of packed rows
        else:  # rows already cut at seq_len; TRL needs max_length=None here
            trl = {"padding_free": True, "max_length": None}
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common, **trl),
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=[timer],
        )
    # After construction: TRL refuses a custom collator in padding-free mode.
    trainer.data_collator = CountingCollator(
        trainer.data_collator, tokenizer.pad_token_id, str(out), rank
    )
    trainer.train()
    if rank == 0:
        result = {"step_end": timer.step_end, "loss_1": timer.losses.get(1, float("nan"))}
        (out / "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Comparisons and reports.

COMPARISONS = {
    "a": ("ours, no packing", False, ["hf_dynamic"]),
    "b": ("ours, packing", True, ["hf_max_length"]),
    "c": ("ours, packing", True, ["trl_packed", "trl_padding_free"]),
}
LOSS_COMPARABLE = {"hf_dynamic", "hf_max_length", "trl_padding_free"}


def trl_status() -> tuple[list[str], list[str]]:
    """(TRL peers that can run, rows explaining those that cannot)."""
    if importlib.util.find_spec("trl") is None:
        return [], ["trl is not importable (install it: `pip install -e .[bench]`); (c) skipped"]
    version = importlib.metadata.version("trl")
    from trl import SFTConfig

    fields = SFTConfig.__dataclass_fields__
    peers, notes = [], []
    for kind, key in (("trl_packed", "packing"), ("trl_padding_free", "padding_free")):
        if key in fields:
            peers.append(kind)
        else:
            notes.append(f"trl {version}: SFTConfig has no `{key}`; {PEERS[kind]} skipped")
    return peers, notes


def run_comparison(
    letter: str, assets: Assets, setup: Setup, pairs: int, peers: list[str]
) -> list[Run]:
    ours_name, packing, _ = COMPARISONS[letter]
    runs = []
    said = False
    for pair in range(1, pairs + 1):
        order = ["ours", *peers]
        if pair % 2 == 0:  # flip which goes first
            order.reverse()
        for name in order:
            tag = f"{letter}-{pair}-{name}"
            load = os.getloadavg()[0]
            if name == "ours":
                raw, monitor, wall = run_ours(assets, setup, packing, tag)
                if not said:
                    print("\n".join(f"  ours at start: {x}" for x in raw["notes"]))
                    said = True
            else:
                raw, monitor, wall = run_peer(assets, setup, name, tag)
            tps, step_s, per_step, fill = _timed(
                raw["step_end"], raw["tokens"], raw["total"], setup
            )
            timed_steps = setup.steps - setup.warmup_steps
            cpu = monitor.cpu_between(
                raw["step_end"][setup.warmup_steps], raw["step_end"][setup.steps]
            )
            run = Run(
                comparison=letter,
                pair=pair,
                name=ours_name if name == "ours" else PEERS[name],
                tokens_per_s=tps,
                step_s=step_s,
                tokens_per_step=per_step,
                fill=fill,
                peak_rss_mb=monitor.peak_mb,
                tokens_per_cpu_s=per_step * timed_steps / sum(cpu),
                cpu_s_per_step=statistics.fmean(cpu) / timed_steps,
                first_loss=raw["loss"],
                load=load,
                wall_s=wall,
            )
            runs.append(run)
            print(
                f"  ({letter}) pair {pair}/{pairs} {run.name}: {tps:,.0f} tok/s/device, "
                f"step {step_s:.3f} s, {run.tokens_per_cpu_s:,.0f} tok/CPU-s, peak "
                f"{run.peak_rss_mb:,.0f} MB, loss@1 {raw['loss']:.6f}, load {load:.1f}, "
                f"{wall:.0f} s",
                flush=True,
            )
    return runs


def table(runs: list[Run]) -> str:
    lines = [
        "| pair | run | tok/s/device | step s (median) | non-pad tok/step | non-pad share | "
        "peak RSS MB (max rank) | tok/CPU-s | rank CPU s/step | loss step 1 | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.pair} | {r.name} | {r.tokens_per_s:,.0f} | {r.step_s:.3f} | "
            f"{r.tokens_per_step:,.0f} | {r.fill:.2f} | {r.peak_rss_mb:,.0f} | "
            f"{r.tokens_per_cpu_s:,.0f} | {r.cpu_s_per_step:.3f} | {r.first_loss:.6f} | "
            f"{r.load:.2f} |"
        )
    return "\n".join(lines)


def summary(runs: list[Run], ours_name: str) -> str:
    ours = {r.pair: r for r in runs if r.name == ours_name}
    lines = [
        "| ours / peer | tok/s median | min | max | peak RSS median | tok/CPU-s median (min-max) "
        "| loss step 1, max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for peer in dict.fromkeys(r.name for r in runs if r.name != ours_name):
        pairs = [(ours[r.pair], r) for r in runs if r.name == peer]
        speed = [o.tokens_per_s / p.tokens_per_s for o, p in pairs]
        memory = [o.peak_rss_mb / p.peak_rss_mb for o, p in pairs]
        per_cpu = [o.tokens_per_cpu_s / p.tokens_per_cpu_s for o, p in pairs]
        kind = next(k for k, v in PEERS.items() if v == peer)
        if kind in LOSS_COMPARABLE:
            diff = f"{max(abs(o.first_loss - p.first_loss) for o, p in pairs):.2e}"
        else:
            diff = "n/a (other batches: TRL packs the whole set)"
        lines.append(
            f"| {peer} | {statistics.median(speed):.2f}x | {min(speed):.2f}x | "
            f"{max(speed):.2f}x | {statistics.median(memory):.2f}x | "
            f"{statistics.median(per_cpu):.2f}x ({min(per_cpu):.2f}-{max(per_cpu):.2f}) | {diff} |"
        )
    return "\n".join(lines)


def code_state() -> str:
    """The commit, and whether the working tree differs from it (it is what ours runs)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        return done.stdout.rstrip("\n")  # keep the leading status column of `status`

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = git("status", "--porcelain", "--", "launch", "trainer", "data").splitlines()
    if not changed:
        return f"code: {head}, launch/ trainer/ data/ unchanged"
    return (
        f"code: {head} + uncommitted changes to {len(changed)} file(s) under launch/ trainer/ "
        f"data/: {' '.join(x[3:] for x in changed)}"
    )


def versions(
    names: tuple[str, ...] = ("torch", "transformers", "accelerate", "datasets", "trl"),
) -> str:
    """The installed versions of `names`, for a benchmark's header."""
    found = []
    for n in names:
        try:
            found.append(f"{n} {importlib.metadata.version(n)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{n} (not installed)")
    return ", ".join(found)


def step_times() -> Any:
    """A TrainerCallback (for the HF sides) that stamps each step's end with time.time(), as our
    metrics records are stamped, and keeps the logged losses by step."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.step_end: dict[int, float] = {}
            self.losses: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end[state.global_step] = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = logs["loss"]

    return StepTimes()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("comparisons", nargs="*", help="a, b and/or c (default: all three)")
    p.add_argument("--pairs", type=int, default=None, help="A/B pairs per comparison (3)")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, help="first steps left out of the timing")
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--grad-accum-steps", type=int)
    p.add_argument("--num-workers", type=int, help="DataLoader workers per rank, both sides")
    p.add_argument("--timeout", type=int, help="seconds per run before it is killed")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, run dirs)")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        peer_worker(args.worker)
        return
    sys.path.insert(0, str(REPO))
    setup = QUICK if args.quick else Setup()
    for key, value in {
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "micro_batch_size": args.micro_batch_size,
        "grad_accum_steps": args.grad_accum_steps,
        "num_workers": args.num_workers,
        "timeout_s": args.timeout,
    }.items():
        if value is not None:
            setup = replace(setup, **{key: value})
    if not 0 < setup.warmup_steps < setup.steps:
        p.error("need 0 < --warmup-steps < --steps")
    pairs = args.pairs if args.pairs is not None else 1 if args.quick else 3
    letters = args.comparisons or list(COMPARISONS)
    if unknown := [x for x in letters if x not in COMPARISONS]:
        p.error(f"unknown comparison(s) {unknown}; choose from {list(COMPARISONS)}")

    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    started = time.time()
    assets = prepare_assets(setup, tmp)
    lengths = sorted(assets.lengths)

    def q(f: float) -> int:
        return lengths[min(len(lengths) - 1, int(f * len(lengths)))]

    print(f"{versions()}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start")
    print(code_state())
    print(
        f"model: Llama {assets.num_params / 1e6:.1f}M parameters (hidden {setup.hidden}, "
        f"{setup.layers} layers, {setup.heads} heads, intermediate {setup.intermediate}, vocab "
        f"{assets.vocab}), random init, fp32; {WORLD_SIZE} processes x OMP_NUM_THREADS=1 (gloo)"
    )
    print(
        f"data: {setup.num_rows} Alpaca rows, tokens per sample (template included) median "
        f"{q(0.5)}, mean {statistics.fmean(lengths):.0f}, p90 {q(0.9)}, p99 {q(0.99)}, max "
        f"{lengths[-1]}; seq_len {setup.seq_len}; ours' and HF's tokens/labels identical for "
        f"every row"
    )
    print(
        f"batch: micro {setup.micro_batch_size} x accumulation {setup.grad_accum_steps} x "
        f"{WORLD_SIZE} ranks = {setup.global_batch} samples (TRL packed: "
        f"{trl_rows_per_micro_batch(assets, setup)} packed row(s) of <= {setup.seq_len} per "
        f"micro-batch); {setup.steps} steps, the first {setup.warmup_steps} untimed; "
        f"{setup.num_workers} DataLoader workers per rank; {pairs} pair(s), order flipped "
        f"every pair",
        flush=True,
    )
    trl_peers, trl_notes = trl_status()
    try:
        for letter in letters:
            ours_name, _, peers = COMPARISONS[letter]
            notes: list[str] = []
            if letter == "c":
                peers, notes = [k for k in peers if k in trl_peers], trl_notes
            print(f"\n### ({letter}) {ours_name} vs {', '.join(PEERS[k] for k in peers) or '-'}")
            runs = run_comparison(letter, assets, setup, pairs, peers) if peers else []
            print()
            print(table(runs))
            for note in notes:
                print(f"| - | {note} | | | | | | | | | |")
            if runs:
                print()
                print(summary(runs, ours_name))
    finally:
        kept = f"; logs and run dirs in {tmp}" if args.keep else ""
        print(f"\ntotal {time.time() - started:.0f} s{kept}")
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
