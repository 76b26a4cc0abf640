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
from trainer.engine.base import autocast_context
from trainer.model.attention_inputs import attention_mode, model_inputs
from trainer.model.loss import (
    class_targets,
    count_target_tokens,
    example_loss_sum,
    token_loss_sum,
)


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
    attention = attention_mode(model)  # the training forward's attention inputs, no syncs
    for start in range(0, len(mine), batch_size):
        batch = collate_right_pad(mine[start : start + batch_size], pad_id)
        targets = batch["targets"].to(ctx.device, non_blocking=True)
        with autocast_context(ctx, precision):
            inputs = model_inputs(batch, ctx.device, attention)
            logits = model(**inputs, use_cache=False).logits
        totals[0] += token_loss_sum(logits, targets).double()
        totals[1] += count_target_tokens(targets)
    all_reduce_sum(ctx, totals)
    loss_sum, num_tokens = totals.tolist()  # host sync: once per evaluation
    loss = loss_sum / max(num_tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def eval_classification(
    model: torch.nn.Module,
    samples: list[TokenizedSample],
    ctx: DistContext,
    *,
    num_labels: int,
    batch_size: int,
    pad_id: int,
    precision: str,
    max_batches: int | None = None,
) -> tuple[dict[str, float], list[list[int]]]:
    """Loss (mean cross-entropy per example), accuracy and macro-F1 of a sequence classifier,
    and the confusion matrix (rows: true label, columns: predicted), over all ranks."""
    limit = None if max_batches is None else max_batches * batch_size * ctx.world_size
    mine = _my_share(samples, ctx, limit)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=ctx.device)
    confusion = torch.zeros(num_labels * num_labels, dtype=torch.float64, device=ctx.device)
    for start in range(0, len(mine), batch_size):
        batch = collate_right_pad(mine[start : start + batch_size], pad_id)
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        with autocast_context(ctx, precision):
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                token_type_ids=batch.get("token_type_ids"),  # sentence pairs
            ).logits
        target = class_targets(batch["targets"])
        loss_sum += example_loss_sum(logits, batch["targets"]).double()
        kept = target != IGNORE_INDEX  # the fillers of _my_share count for nothing
        cells = target[kept] * num_labels + logits.argmax(-1)[kept]
        confusion += torch.bincount(cells, minlength=num_labels * num_labels).double()
    totals = torch.cat([loss_sum, confusion])
    all_reduce_sum(ctx, totals)
    values = totals.tolist()  # host sync: once per evaluation
    counts = torch.tensor(values[1:], dtype=torch.float64).reshape(num_labels, num_labels)
    n = float(counts.sum())
    correct = counts.diagonal()
    # Macro-F1 over the labels that occur (as truth or prediction); an absent one would only
    # add an undefined 0/0.
    true, predicted = counts.sum(1), counts.sum(0)
    present = (true + predicted) > 0
    f1 = 2 * correct / (true + predicted).clamp(min=1)
    scores = {
        "eval/loss": values[0] / max(n, 1.0),
        "eval/accuracy": float(correct.sum()) / max(n, 1.0),
        "eval/macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
    }
    return scores, counts.long().tolist()


def split_prompt_reference(sample: TokenizedSample) -> tuple[list[int], list[int]]:
    """Prompt = everything before the sample's last answer (the last run of tokens with loss: the
    response of an instruction row, the last assistant turn of a conversation); reference = that
    answer without its end-of-turn (`sample.end_of_turn`: EOS, `<|im_end|>`, `<|eot_id|>`)."""
    labels = sample.labels
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    if not end:  # nothing to answer (an eval filler, see _my_share)
        return sample.input_ids, []
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    reference = sample.input_ids[start:end]
    eot = list(sample.end_of_turn)
    if eot and reference[-len(eot) :] == eot:
        reference = reference[: -len(eot)]
    return sample.input_ids[:start], reference


def model_stop_ids(model: Any, eos_id: int | None) -> set[int]:
    """The ids generation stops at: the tokenizer's EOS and every id of the model's
    `generation_config.eos_token_id` (Llama-3 lists `<|end_of_text|>` and `<|eot_id|>`)."""
    ids = {eos_id} if eos_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return ids


def cut_at_stop(tokens: list[int], stop_ids: set[int], end_of_turn: tuple[int, ...]) -> list[int]:
    """`tokens` up to the first stop id or the first occurrence of the `end_of_turn` sequence
    (a template whose end-of-turn marker is several tokens: generation does not stop at it)."""
    n = len(end_of_turn)
    for i, t in enumerate(tokens):
        if t in stop_ids or (n > 1 and tuple(tokens[i : i + n]) == end_of_turn):
            return tokens[:i]
    return tokens


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
    """Share of the first `num_samples` eval samples whose greedy continuation of the prompt
    equals the reference answer token for token (see `split_prompt_reference`): the answer of
    an instruction row, the last assistant turn of a chat row. Generation stops at any of the
    model's stop ids (`model_stop_ids`) and at each sample's end-of-turn token (a chat template's
    `<|im_end|>` even where the model's config does not list it); what follows is not compared."""
    mine = _my_share(samples, ctx, num_samples)
    base_stops = model_stop_ids(model, eos_id)
    counts = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for start in range(0, len(mine), batch_size):
        batch_items = mine[start : start + batch_size]
        chunk = [split_prompt_reference(s) for _, s in batch_items]
        stops = base_stops | {s.end_of_turn[0] for _, s in batch_items if len(s.end_of_turn) == 1}
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
                eos_token_id=sorted(stops),
            )
        generated = out[:, width:].tolist()  # host sync: once per generation batch
        for (index, sample), (_, reference), tokens in zip(
            batch_items, chunk, generated, strict=True
        ):
            if index < 0:
                continue  # a filler (see _my_share)
            tokens = cut_at_stop(tokens, stops, sample.end_of_turn)
            counts[0] += float(tokens == reference)
            counts[1] += 1
    all_reduce_sum(ctx, counts)
    correct, total = counts.tolist()
    return {"eval/accuracy": correct / max(total, 1.0)}
