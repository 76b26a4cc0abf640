"""Evaluation: token-weighted loss and perplexity, and exact-match accuracy by greedy generation.

Each rank takes every world_size-th eval sample; sums are reduced over ranks. Eval runs on the
unwrapped model so that no rank waits on a collective inside a DDP forward (ranks may hold
different numbers of eval samples).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from data.loader import collate_right_pad
from data.templates import IGNORE_INDEX, TokenizedSample
from trainer.dist import DistContext, all_reduce_sum
from trainer.engine import autocast_context, count_target_tokens, token_loss_sum


def _my_share(samples: list[TokenizedSample], ctx: DistContext, limit: int | None) -> list:
    """This rank's (index, sample) pairs: every world_size-th sample. Every rank gets the same
    count (short ranks are topped up with index -1 fillers, which count for nothing) because
    under ZeRO-3 each forward is a collective that all ranks must join."""
    items = list(enumerate(samples))
    if limit is not None:
        items = items[:limit]
    mine = items[ctx.rank :: ctx.world_size]
    per_rank = -(-len(items) // ctx.world_size)
    filler = TokenizedSample(samples[0].input_ids, [IGNORE_INDEX] * len(samples[0]))
    return mine + [(-1, filler)] * (per_rank - len(mine))


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    samples: list[TokenizedSample],
    ctx: DistContext,
    *,
    batch_size: int,
    pad_id: int,
    precision: str,
    max_batches: int | None = None,
) -> dict[str, float]:
    limit = None if max_batches is None else max_batches * batch_size * ctx.world_size
    mine = _my_share(samples, ctx, limit)
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for start in range(0, len(mine), batch_size):
        batch = collate_right_pad(mine[start : start + batch_size], pad_id)
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        with autocast_context(ctx, precision):
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            ).logits
        totals[0] += token_loss_sum(logits, batch["labels"]).double()
        totals[1] += count_target_tokens(batch["labels"])
    all_reduce_sum(ctx, totals)
    loss_sum, num_tokens = totals.tolist()  # host sync: once per evaluation
    loss = loss_sum / max(num_tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def split_prompt_response(sample: TokenizedSample, eos_id: int) -> tuple[list[int], list[int]]:
    """Prompt = the leading tokens without loss; reference = the rest, EOS removed."""
    n_prompt = next((i for i, x in enumerate(sample.labels) if x != IGNORE_INDEX), len(sample))
    reference = [t for t in sample.input_ids[n_prompt:] if t != eos_id]
    return sample.input_ids[:n_prompt], reference


@torch.no_grad()
def eval_exact_match(
    model: Any,
    samples: list[TokenizedSample],
    ctx: DistContext,
    *,
    num_samples: int,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    batch_size: int = 64,
    precision: str = "auto",
) -> dict[str, float]:
    """Share of the first `num_samples` eval samples whose greedy continuation (up to EOS)
    equals the reference response token for token."""
    mine = _my_share(samples, ctx, num_samples)
    counts = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for start in range(0, len(mine), batch_size):
        batch_items = mine[start : start + batch_size]
        chunk = [split_prompt_response(s, eos_id) for _, s in batch_items]
        width = max(len(p) for p, _ in chunk)
        # Left padding, so every prompt ends at the same column and generation continues it.
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (prompt, _) in enumerate(chunk):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1
        with autocast_context(ctx, precision):
            out = model.generate(
                input_ids=input_ids.to(ctx.device),
                attention_mask=attention_mask.to(ctx.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
        generated = out[:, width:].tolist()  # host sync: once per generation batch
        for (index, _), (_, reference), tokens in zip(batch_items, chunk, generated, strict=True):
            if index < 0:
                continue  # a filler (see _my_share)
            if eos_id in tokens:
                tokens = tokens[: tokens.index(eos_id)]
            counts[0] += float(tokens == reference)
            counts[1] += 1
    all_reduce_sum(ctx, counts)
    correct, total = counts.tolist()
    return {"eval/accuracy": correct / max(total, 1.0)}
