"""Peak memory and step time of full fine-tuning vs LoRA vs QLoRA, one CPU process each.

    .venv/bin/python -m benchmarks.bench_methods [--hidden 1024 --layers 12 --steps 3]

A ~215M-parameter Llama (vocab 32000) is written once to a temp dir in fp32. Each method then
runs in a fresh process (tests.launcher, world size 1) through the real
`trainer.build.build_engine` (`method: full | lora | qlora`; LoRA r=16, alpha=32 on every
linear layer but the head; QLoRA: NF4 with double quantization) and the loop's own `train_step`
on the same synthetic batch, fp32 compute (train.precision=auto on CPU), no gradient
checkpointing.

Memory is the process's resident set, from /proc/self/status: the peak (VmHWM) while building
and, reset with /proc/self/clear_refs once built, while training. Part of it is file pages
(RssFile): shared libraries, and under QLoRA most of the fp32 checkpoint, because transformers
loads the weights it does not quantize (embeddings, norms) as views of the memory-mapped
safetensors file, which keeps the file mapped and the pages read while quantizing resident
(clean page cache the kernel may drop). They do not change while training, so "anonymous peak"
is the training peak minus them, and "above start" subtracts the anonymous memory the process
held after its imports, before the model was loaded. Weights, gradients and optimizer state are
also counted tensor by tensor.

Last, the weights alone: the model loaded in bf16 vs the same model quantized as QLoRA loads it
with bf16 compute (4-bit NF4 linear layers plus their quantization state; the embeddings, norms
and output head stay bf16), for the whole model and for the quantized linear layers alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = ["full", "lora", "qlora"]
MB = 2**20


def _proc_status_kb(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field))


def _peak_rss_mb(reset: bool = False) -> float:
    """This process's peak RSS; `reset` restarts the peak from the current RSS."""
    peak = _proc_status_kb("VmHWM") / 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return peak


def _nbytes(tensors) -> int:
    """Bytes of the tensors' storages, each storage counted once."""
    seen: set[int] = set()
    n = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        n += storage.nbytes()
    return n


def _quant_state_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """bitsandbytes' per-block scales of a 4-bit weight (nested ones too with double quant)."""
    qs = getattr(p, "quant_state", None)
    if qs is None:
        return []
    out = [qs.absmax, qs.code]
    if getattr(qs, "offset", None) is not None:
        out.append(qs.offset)
    if qs.state2 is not None:
        out += [qs.state2.absmax, qs.state2.code]
    return [t for t in out if torch.is_tensor(t)]


def weight_bytes(model: nn.Module) -> int:
    params = list(model.parameters())
    return _nbytes(params) + _nbytes(t for p in params for t in _quant_state_tensors(p))


def _run_method(method: str, model_dir: str, steps: int, seq_len: int, micro_batch: int) -> dict:
    """One method in this (fresh) process: build, then time `steps` steps after a first one."""
    torch.set_num_threads(os.cpu_count() or 1)  # one process: every core (the launcher sets 1)
    from trainer.build import build_engine, seed_everything
    from trainer.config import RunConfig, resolve_batch, with_total_steps
    from trainer.dist import init_distributed, shutdown
    from trainer.loop import train_step

    # Imported before the start is measured: what the libraries take is not the model's memory.
    if method != "full":
        import peft  # noqa: F401
    if method == "qlora":
        import bitsandbytes  # noqa: F401
    cfg = RunConfig.model_validate(
        {
            "model": {"name_or_path": model_dir, "dtype": "float32"},
            "data": {"train_path": "unused.jsonl"},
            "method": method,
            "train": {"micro_batch_size": micro_batch, "grad_accum_steps": 1, "max_steps": steps},
        }
    )
    ctx = init_distributed()
    try:
        derived = with_total_steps(cfg, resolve_batch(cfg, ctx.world_size), None)
        seed_everything(0)
        start_anon = _proc_status_kb("RssAnon") / 1024
        engine = build_engine(cfg, derived, ctx)
        build_peak = _peak_rss_mb(reset=True)
        engine.train()
        model = engine.unwrapped_model()
        vocab = model.config.vocab_size
        ids = torch.randint(
            0, vocab, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0)
        )
        from trainer.model.loss import next_token_targets

        mask = torch.ones_like(ids)
        batch = {"input_ids": ids, "attention_mask": mask, "targets": next_token_targets(ids)}
        times = []
        for step in range(steps + 1):  # the first step (allocations, optimizer state) untimed
            started = time.perf_counter()
            train_step(engine, [batch], cfg.train.max_grad_norm)
            if step:
                times.append(time.perf_counter() - started)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = engine.optimizer
        moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return {
            "trainable": sum(p.numel() for p in trainable),
            "start_anon_mb": start_anon,
            "build_rss_mb": build_peak,
            "rss_mb": _peak_rss_mb(),
            # Mapped file pages: shared libraries, and under QLoRA the checkpoint itself (see the
            # module docstring). They stay mapped through training, so the anonymous peak is
            # the peak minus them.
            "file_mb": _proc_status_kb("RssFile") / 1024,
            "weights_mb": weight_bytes(model) / MB,
            "grads_mb": _nbytes(p for p in trainable) / MB,  # fp32, one per trainable weight
            "optim_mb": _nbytes(moments) / MB,
            "step_s": statistics.median(times),
        }
    finally:
        shutdown(ctx)


def _weights_bf16_vs_qlora(model_dir: str) -> dict:
    """Weight bytes of the model loaded in bf16 vs quantized as QLoRA loads it (bf16 compute);
    whole model and the quantized linear layers alone."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    head = bf16.get_output_embeddings()
    linear = [m for m in bf16.modules() if isinstance(m, nn.Linear) and m is not head]
    out = {"bf16": weight_bytes(bf16), "bf16_linear": sum(weight_bytes(m) for m in linear)}
    del bf16, head, linear
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    q = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, quantization_config=quant, device_map={"": "cpu"}
    )
    import bitsandbytes as bnb

    out["qlora"] = weight_bytes(q)
    out["qlora_linear"] = sum(
        weight_bytes(m) for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.launcher import run_ranks

    # Let glibc hand freed pages back at once (every method alike), so peak RSS follows live
    # memory rather than the allocator's retained free lists. The processes inherit it.
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    with tempfile.TemporaryDirectory() as tmp:
        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 8 // 3 // 64 * 64,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 64,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        print(
            f"Llama {n_params / 1e6:.0f}M params (hidden {args.hidden}, {args.layers} layers, "
            f"vocab {args.vocab}), 1 CPU process with {os.cpu_count()} threads, micro batch "
            f"{args.micro_batch} x {args.seq_len} tokens, fp32 compute, median of {args.steps} "
            "steps",
            flush=True,
        )
        rows = {}
        for method in args.methods.split(","):
            started = time.time()
            (rows[method],) = run_ranks(
                _run_method,
                1,
                method,
                tmp,
                args.steps,
                args.seq_len,
                args.micro_batch,
                timeout=1800,
            )
            print(f"  {method}: done in {time.time() - started:.0f}s", flush=True)
        weights = _weights_bf16_vs_qlora(tmp)

    print_table(rows, n_params)
    print_weights(weights)


def print_table(rows: dict[str, dict[str, float]], n_params: int) -> None:
    """One markdown table; memory and time also as a ratio to the first method's (full)."""
    for r in rows.values():
        r["anon_mb"] = r["rss_mb"] - r["file_mb"]
        r["above_mb"] = r["anon_mb"] - r["start_anon_mb"]
    base = next(iter(rows.values()))
    head = [
        "method",
        "trainable",
        "peak RSS building, MB",
        "peak RSS training, MB",
        "of it file pages, MB",
        "anonymous peak above start, MB",
        "x first",
        "step s",
        "x first",
        "weights / grads / optimizer state, MB",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows.items():
        cells = [
            name,
            f"{r['trainable'] / 1e6:.2f}M ({100 * r['trainable'] / n_params:.1f}%)",
            f"{r['build_rss_mb']:.0f}",
            f"{r['rss_mb']:.0f}",
            f"{r['file_mb']:.0f}",
            f"{r['above_mb']:.0f}",
            f"{r['above_mb'] / base['above_mb']:.2f}",
            f"{r['step_s']:.2f}",
            f"{r['step_s'] / base['step_s']:.2f}",
            f"{r['weights_mb']:.0f} / {r['grads_mb']:.0f} / {r['optim_mb']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


def print_weights(w: dict[str, int]) -> None:
    print()
    print("| weights | bf16, MB | QLoRA NF4 + double quant, MB | QLoRA / bf16 |")
    print("|---|---|---|---|")
    for label, key in (("whole model", ""), ("quantized linear layers", "_linear")):
        bf16, q = w[f"bf16{key}"], w[f"qlora{key}"]
        print(f"| {label} | {bf16 / MB:.1f} | {q / MB:.1f} | {q / bf16:.3f} |")


if __name__ == "__main__":
    main()
