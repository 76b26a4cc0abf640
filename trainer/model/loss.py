"""The causal-LM loss as a sum over target tokens (the loop normalizes by the global count).

Two ways to compute the same number:

- `token_loss_sum(logits, targets)`: from the model's logits, upcast to fp32. Simple, and what
  evaluation uses; but training keeps the B x T x V fp32 logits (and their log-softmax) alive
  until backward: ~7 GB per 4,096-token sequence at a 128k vocabulary.
- `chunked_token_loss_sum(hidden, weight, targets)`: from the final hidden states and the output
  head's weight, a few hundred tokens at a time, taking each chunk's gradients as soon as its
  logits exist instead of storing them. Only one chunk of logits exists at any time.

Training picks one per model (`build_train_loss`, `train.loss_impl`). The hidden states are taken
where the head receives them: for one forward, the head's `forward` is swapped for one that
computes the loss and returns it in place of the logits. The model's own forward (through DDP's
or DeepSpeed's wrapper) still runs, so DDP's gradient hooks and ZeRO-3's gather/release hooks
on the head module fire as they do for the logits, and a tied head (lm_head.weight IS
embed_tokens.weight) gets both contributions in one backward. Models that change the logits after
the head (Gemma2's softcapping, Cohere's logit scale, ...) or whose head is not a plain Linear
(a LoRA-wrapped or quantized head) keep the naive path.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from data.templates import IGNORE_INDEX
from trainer.config import ConfigError

LossImpl = Literal["auto", "naive", "chunked", "liger", "cce"]  # train.loss_impl

# Tokens per chunk of the chunked loss: at a 128k vocabulary one chunk's logits are 0.25 GB in
# fp32, below the head's own weight gradient (vocab x hidden) for any hidden size >= 512, and a
# [512, hidden] x [hidden, vocab] matmul is still large enough to keep a GPU busy.
DEFAULT_CHUNK_TOKENS = 512

# train.loss_impl -> (module to import, PyPI package)
_FUSED_LIBRARIES = {
    "liger": ("liger_kernel", "liger-kernel"),
    "cce": ("cut_cross_entropy", "cut-cross-entropy"),
}


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy of each position whose target is kept. `targets`
    [B, T]: the batch's, already shifted by the collator (data.loader), so no slice of the
    logits is copied here."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """The `targets` of rows whose every token is a label (plain text, no padding): position t
    is scored on token t + 1, the last position on nothing."""
    return F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)


def example_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy of each example of a classifier's [B, C] logits. `targets`: the
    batch's [B, T] targets, each row's class id at one position and -100 elsewhere (see
    data.templates.encode_classification), so an empty slot (all -100) adds nothing and the
    normalizing count (`count_target_tokens`) is the number of examples."""
    classes = class_targets(targets)
    return F.cross_entropy(logits.float(), classes, ignore_index=IGNORE_INDEX, reduction="sum")


def class_targets(targets: torch.Tensor) -> torch.Tensor:
    """Each row's class id ([B]), -100 for a row without one."""
    return targets.max(dim=1).values  # ids are >= 0, the rest of the row is -100


def is_sequence_classifier(model: nn.Module) -> bool:
    """Whether `model` (or the model a peft wrapper holds) is an HF sequence classifier."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner).__name__.endswith("ForSequenceClassification")


def count_target_tokens(targets: torch.Tensor) -> torch.Tensor:
    """Positions that carry loss in a micro-batch (`targets` are already shifted)."""
    return (targets != IGNORE_INDEX).sum()


# ---------------------------------------------------------------------------------------------
# The chunked loss


def chunked_token_loss_sum(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """`token_loss_sum(hidden @ W.T + b, targets)` without the [B, T, V] logits.

    `hidden` [B, T, H] are the final hidden states (the head's input), `lm_head_weight` [V, H].
    The logits are computed in the compute dtype (the autocast dtype under autocast, else the
    hidden states' dtype), one chunk of `chunk_tokens` target tokens at a time, upcast to fp32
    for the cross-entropy; with grad enabled, each chunk's gradients are taken in the same pass
    (in backward, from recomputed logits, under an fp16 compute dtype: see
    _ChunkedLinearCrossEntropy). Returns an fp32 (fp64 for fp64 inputs) scalar."""
    kept_hidden, kept_targets = _kept_positions(hidden, targets)
    compute_dtype = _compute_dtype(hidden)
    grad_enabled = torch.is_grad_enabled()
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly
        return _ChunkedLinearCrossEntropy.apply(
            kept_hidden,
            lm_head_weight,
            lm_head_bias,
            kept_targets,
            chunk_tokens,
            compute_dtype,
            grad_enabled,
        )


def _kept_positions(
    hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states of the positions that carry loss [N, H] and their targets [N]."""
    batch, seq, width = hidden.shape
    targets = targets.reshape(-1)
    # Dropping the ignored positions (prompt, padding) spares them both vocab-sized matmuls,
    # forward and backward. nonzero's size depends on the data: on a GPU tensor it would be a
    # host sync per micro-step, so it is taken on the CPU targets the batch arrives with, and the
    # indices go to the device without waiting (pinned, non-blocking).
    kept = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)
    targets = targets.index_select(0, kept)
    if kept.device != hidden.device:
        if hidden.device.type == "cuda":
            kept, targets = kept.pin_memory(), targets.pin_memory()
        kept = kept.to(hidden.device, non_blocking=True)
        targets = targets.to(hidden.device, non_blocking=True)
    return hidden.reshape(batch * seq, width).index_select(0, kept), targets


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul would run in: what autocast casts a Linear to, if it is on."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if bias is None:
        return hidden @ weight.T
    return torch.addmm(bias, hidden, weight.T)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W.T + b, target_i) over [N, H] hidden states with no ignored targets.

    Per chunk, the cross-entropy is computed as F.cross_entropy does (log-softmax: the row max m,
    s = sum(exp(x - m)), loss = log(s) - (x[target] - m)), in place in the chunk's fp32 logits,
    so that one chunk-sized buffer is all it needs. That buffer then becomes d loss / d logits =
    softmax - onehot (F.cross_entropy's backward), and the chunk's share of grad_hidden = g @ W
    and grad_W = g.T @ h is taken from it (`_add_chunk_grads`).

    When: in the forward, as soon as the chunk's logits exist (when a backward can follow), so
    the logits are computed once, not again in backward: one head-sized matmul fewer per token
    (7% of the FLOPs of a 17M-parameter Llama with an 8k vocabulary). The gradients wait for
    backward to scale them by the incoming gradient (the loop's 1 / token count): grad_W is the
    [V, H] tensor backward would have allocated anyway, at the same moment (the head is the
    forward's last op and backward's first), and grad_hidden replaces the hidden states a
    recompute would keep. Under an fp16 compute dtype they are taken in backward instead, from
    recomputed logits: the GradScaler's scale must reach g before its fp16 cast, so that an
    overflowing product is one the scaler can shrink (and a small one does not underflow)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_tokens: int,
        compute_dtype: torch.dtype,
        grad_enabled: bool,
    ) -> torch.Tensor:
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        # needs_input_grad says what requires grad, also under no_grad: grad_enabled (taken
        # before apply, as forward runs with grad mode off) says whether a backward can follow.
        needs = tuple(grad_enabled and n for n in ctx.needs_input_grad[:3])
        now = any(needs) and compute_dtype != torch.float16
        deferred = any(needs) and not now
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        grads = _new_grads(hidden, weight, bias, acc_dtype, needs) if now else None
        if deferred:
            # Per token m and log(s), for backward's softmax, kept apart, not as one lse: at
            # large logits m + log(s) rounds at m's scale, and exp((x - m) - log(s)) would lose
            # what log_softmax keeps.
            row_max = torch.empty(hidden.shape[0], dtype=acc_dtype, device=hidden.device)
            log_sum = torch.empty_like(row_max)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            h = hidden[start:end].to(compute_dtype)
            t = targets[start:end]
            # The upcast chunk (no copy when the compute dtype is fp32): clobbered below.
            x = _chunk_logits(h, w, b).to(acc_dtype)
            m = x.amax(dim=-1)
            shifted_target = x.gather(1, t[:, None]).squeeze(1).sub_(m)
            sums = x.sub_(m[:, None]).exp_().sum(dim=-1)
            log_s = sums.log()
            total += (log_s - shifted_target).sum()
            if now:
                x.div_(sums[:, None])  # softmax
                _add_chunk_grads(x, h, t, w, grads, start, compute_dtype)
            elif deferred:
                row_max[start:end] = m
                log_sum[start:end] = log_s
            del x  # before the next chunk's logits are allocated, not after
        ctx.chunk_tokens, ctx.compute_dtype = chunk_tokens, compute_dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # On ctx, not save_for_backward: they are neither inputs nor outputs, and backward
        # scales them in place and lets go of them (no second copy of grad_W).
        ctx.grads = grads
        if deferred:
            ctx.save_for_backward(hidden, weight, bias, targets, row_max, log_sum)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None and not ctx.saved_tensors:
            raise RuntimeError(
                "the chunked loss's backward ran twice on one forward (retain_graph): its "
                "gradients are taken in the forward and handed over once; use "
                "train.loss_impl=naive for a graph that is backpropagated more than once"
            )
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            for grad in grads:
                if grad is not None:
                    _scale_(grad, grad_loss)
        else:
            grads = _recomputed_grads(ctx, grad_loss)
        grad_hidden, grad_weight, grad_bias = grads
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


# [grad_hidden, grad_weight, grad_bias], None where not needed
GradBuffers = list[torch.Tensor | None]


def _new_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    acc_dtype: torch.dtype,
    needs: tuple[bool, ...],
) -> GradBuffers:
    need_hidden, need_weight, need_bias = needs
    return [
        torch.empty_like(hidden) if need_hidden else None,
        # In the weight's own dtype (what it receives anyway). With an fp32 master and a bf16
        # compute dtype (autocast) each chunk's product is added from a bf16 temporary;
        # otherwise it is accumulated in place.
        torch.zeros_like(weight) if need_weight else None,
        torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_bias else None,
    ]


def _add_chunk_grads(
    softmax: torch.Tensor,
    h: torch.Tensor,
    t: torch.Tensor,
    w: torch.Tensor,
    grads: GradBuffers,
    start: int,
    compute_dtype: torch.dtype,
    scale: torch.Tensor | None = None,
) -> None:
    """One chunk's share of the gradients, from its softmax (clobbered: it becomes g)."""
    grad_hidden, grad_weight, grad_bias = grads
    g = softmax
    g[torch.arange(t.shape[0], device=t.device), t] -= 1
    if scale is not None:
        g.mul_(scale)
    if grad_bias is not None:
        grad_bias += g.sum(0)
    g = g.to(compute_dtype)
    if grad_hidden is not None:
        grad_hidden[start : start + g.shape[0]] = g @ w
    if grad_weight is not None:
        if grad_weight.dtype == compute_dtype:
            grad_weight.addmm_(g.T, h)
        else:
            grad_weight += g.T @ h


def _recomputed_grads(ctx: Any, grad_loss: torch.Tensor) -> GradBuffers:
    """The fp16 path's gradients: each chunk's logits again, softmax from the kept m and
    log(s), scaled by the incoming gradient before the fp16 matmuls."""
    hidden, weight, bias, targets, row_max, log_sum = ctx.saved_tensors
    chunk, compute_dtype = ctx.chunk_tokens, ctx.compute_dtype
    needs = tuple(ctx.needs_input_grad[:3])
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        grads = _new_grads(hidden, weight, bias, log_sum.dtype, needs)
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            h = hidden[start:end].to(compute_dtype)
            # softmax = exp((x - m) - log(s)), in the upcast logits' own memory
            x = _chunk_logits(h, w, b).to(log_sum.dtype)
            x.sub_(row_max[start:end, None]).sub_(log_sum[start:end, None]).exp_()
            _add_chunk_grads(x, h, targets[start:end], w, grads, start, compute_dtype, grad_loss)
            del x  # before the next chunk's logits are allocated, not after
    return grads


def _scale_(grad: torch.Tensor, scale: torch.Tensor, rows: int = 1024) -> None:
    """grad *= scale (a 0-dim tensor), in place, the product taken in fp32 at least: a device
    scalar multiplying a bf16 tensor would be rounded to bf16 first, scaling every element by
    the same wrong factor (up to 2^-9 off). A low-precision tensor is scaled a block of rows at a
    time, so that no full-size fp32 copy of a [V, H] gradient is made."""
    if grad.dtype in (torch.float32, torch.float64):
        grad.mul_(scale.to(grad.dtype))
        return
    if grad.numel() == 0:  # a micro-batch with no target tokens: [0, H] hidden gradients
        return
    flat = grad.view(-1, grad.shape[-1])  # rows of the last dimension (a 1-D bias: one row)
    for start in range(0, flat.shape[0], rows):
        block = flat[start : start + rows]
        block.copy_(block.float().mul_(scale))


def _fused_loss_sum(
    impl: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
) -> torch.Tensor:
    """The same sum through Liger Kernel's or Cut Cross-Entropy's fused kernels (CUDA only)."""
    kept_hidden, kept = _kept_positions(hidden, targets)
    compute_dtype = _compute_dtype(hidden)
    # Their Triton kernels want one dtype; the casts are differentiable, so an fp32 master
    # weight still receives its gradient (as autocast's own cast would give it).
    h, w = kept_hidden.to(compute_dtype), weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        if impl == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
            loss = loss_fn(w, h, kept, b)
        else:
            from cut_cross_entropy import linear_cross_entropy

            loss = linear_cross_entropy(
                h, w, kept, bias=b, ignore_index=IGNORE_INDEX, reduction="sum"
            )
    return loss.float()


# ---------------------------------------------------------------------------------------------
# Choosing and running the training loss of one model


class TrainLoss:
    """The loss of a training micro-step for one model: naive (from the logits the model
    returns) or computed inside the output head (`impl` chunked, liger or cce)."""

    def __init__(
        self,
        impl: str,
        reason: str,
        head: nn.Linear | None,
        chunk_tokens: int,
        aux_coef: float = 0.0,
    ):
        self.impl = impl
        self.reason = reason
        self.head = head
        self.chunk_tokens = chunk_tokens
        # An MoE model returning its router logits: router_aux_loss_coef, else 0 (see __call__)
        self.aux_coef = aux_coef

    def describe(self) -> str:
        """One line for the log: which path, and why."""
        line = self._describe()
        if self.aux_coef:
            line += (
                f"; plus router_aux_loss_coef={self.aux_coef:g} x the router's load-balancing "
                "loss (output_router_logits), weighted by each micro-batch's target tokens"
            )
        return line

    def _describe(self) -> str:
        if self.impl == "classification":
            return "loss: cross-entropy per example over the classifier's logits (fp32)"
        if self.impl == "naive":
            return f"loss: naive (the full logits, upcast to fp32): {self.reason}"
        if self.impl == "chunked":
            what = f"chunked cross-entropy, {self.chunk_tokens} tokens per chunk"
        else:
            what = f"{self.impl} fused linear cross-entropy"
        return f"loss: {what}, from the final hidden states (no full logits kept): {self.reason}"

    def __call__(self, run_model: Callable[[], Any], targets: torch.Tensor) -> torch.Tensor:
        """Run the model's forward (`run_model()`, through whatever wraps it) and return the sum
        of the token losses, connected to the graph for backward. `targets` as the batch has
        them: on the CPU (the chunked loss picks its positions there without a device sync)."""
        if self.impl == "classification":
            logits = run_model().logits
            return example_loss_sum(logits, targets.to(logits.device, non_blocking=True))
        if self.head is None:
            out = run_model()
            logits = out.logits
            loss = token_loss_sum(logits, targets.to(logits.device, non_blocking=True))
            return self._with_router_loss(loss, out, targets)
        loss, out = self._head_loss(run_model, targets)
        return self._with_router_loss(loss, out, targets)

    def _with_router_loss(
        self, loss: torch.Tensor, out: Any, targets: torch.Tensor
    ) -> torch.Tensor:
        """`loss` (a sum over target tokens) plus, for an MoE model that returns its router
        logits, router_aux_loss_coef x its load-balancing loss x this micro-batch's target
        tokens. Divided by the step's target tokens (the loop's normalization) that is, over a
        step, the token-weighted mean of the micro-batches' router losses: with one
        micro-batch, HF's `loss + router_aux_loss_coef * aux_loss` exactly."""
        if not self.aux_coef:
            return loss
        aux = getattr(out, "aux_loss", None)
        if aux is None:
            return loss
        tokens = int(count_target_tokens(targets))  # the CPU targets: no sync
        return loss + (self.aux_coef * tokens) * aux.to(loss.dtype)

    def _head_loss(
        self, run_model: Callable[[], Any], targets: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """The loss computed inside the output head, and the model's output."""
        head = self.head
        assert head is not None

        def head_loss(hidden: torch.Tensor) -> torch.Tensor:
            if self.impl == "chunked":
                loss = chunked_token_loss_sum(
                    hidden, head.weight, targets, head.bias, self.chunk_tokens
                )
            else:
                loss = _fused_loss_sum(self.impl, hidden, head.weight, head.bias, targets)
            # Logit-shaped, so that a model slicing or upcasting its logits leaves it alone.
            return loss.reshape(1, 1, 1)

        with _head_forward(head, head_loss) as num_calls:
            out = run_model()
        logits = out.logits
        if num_calls[0] != 1 or tuple(logits.shape) != (1, 1, 1):
            raise RuntimeError(
                f"train.loss_impl={self.impl}: the model called its output head "
                f"{num_calls[0]} times and returned logits of shape {tuple(logits.shape)}; it "
                "does not compute its logits as one head call on the final hidden states. Use "
                "train.loss_impl=naive for this model"
            )
        # The tensor the model returned, not the one head_loss made: wrappers (ZeRO-3's
        # pre-backward hook, which gathers the head's weight again) sit between the two.
        return logits.reshape(()), out


@contextlib.contextmanager
def _head_forward(head: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> Iterator:
    """Make `forward` the head's forward for the duration; yields [number of calls]. Hooks on
    the module (ZeRO-3's, DDP has none) still run around it: only `forward` is replaced."""
    calls = [0]

    def counted(hidden: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return forward(hidden)

    head.forward = counted  # an instance attribute shadows the class's forward
    try:
        yield calls
    finally:
        del head.forward


def build_train_loss(
    model: nn.Module,
    loss_impl: LossImpl,
    chunk_tokens: int,
    device: torch.device,
) -> TrainLoss:
    """Choose the training loss for `model` (an HF causal LM, possibly wrapped by peft; the
    module DDP or DeepSpeed wraps, not the wrapper). `auto`: chunked where the head allows it,
    else naive. An explicit chunked/liger/cce that cannot run raises ConfigError naming
    train.loss_impl. Runs one tiny no-grad forward (collective under ZeRO-3: every rank builds).
    A sequence classifier gets the per-example cross-entropy whatever loss_impl says."""
    if is_sequence_classifier(model):
        return TrainLoss("classification", "task=sequence_classification", None, chunk_tokens)
    if loss_impl == "naive":
        return TrainLoss(
            "naive", "train.loss_impl=naive", None, chunk_tokens, router_aux_coef(model)
        )
    if loss_impl in _FUSED_LIBRARIES:
        problem = fused_library_problem(loss_impl, device.type)
        if problem:
            raise ConfigError([problem])
    head, why_not = _plain_head(model, device)
    if head is None:
        if loss_impl == "auto":
            return TrainLoss(
                "naive",
                f"train.loss_impl=auto, and {why_not}",
                None,
                chunk_tokens,
                router_aux_coef(model),
            )
        raise ConfigError(
            [f"train.loss_impl={loss_impl}: {why_not}; use train.loss_impl=auto or naive"]
        )
    impl = "chunked" if loss_impl == "auto" else loss_impl
    reason = f"train.loss_impl={loss_impl}; the output head is a plain Linear"
    return TrainLoss(impl, reason, head, chunk_tokens, router_aux_coef(model))


def router_aux_coef(model: nn.Module) -> float:
    """router_aux_loss_coef of an MoE model whose config asks for its router logits
    (output_router_logits; transformers then adds that times the router's load-balancing loss to
    the loss it computes from `labels`), else 0."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if not getattr(config, "output_router_logits", False):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def fused_library_problem(loss_impl: str, device_type: str) -> str | None:
    """Why train.loss_impl=liger/cce cannot run here (one line naming the key), or None."""
    module, package = _FUSED_LIBRARIES[loss_impl]
    if importlib.util.find_spec(module) is None:
        return (
            f"train.loss_impl={loss_impl}: needs the {package} package, which is not installed "
            f"(pip install {package}); or use train.loss_impl=auto (chunked, no extra package)"
        )
    if device_type != "cuda":
        return (
            f"train.loss_impl={loss_impl}: its Triton kernels need a CUDA device, and this run "
            f"is on {device_type}; use train.loss_impl=auto"
        )
    return None


def _plain_head(model: nn.Module, device: torch.device) -> tuple[nn.Linear | None, str]:
    """The output head if the loss can be computed from its input and weight, else (None, why)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None:
        return None, "the model has no output head (get_output_embeddings() is None)"
    if type(head) is not nn.Linear:
        # A LoRA-wrapped head (peft), a quantized one (bitsandbytes Linear4bit subclasses
        # Linear), modules_to_save: their forward is more than weight and bias.
        return None, f"the output head is a {type(head).__name__}, not a plain torch Linear"
    if "forward" in head.__dict__:
        return None, "the output head's forward is already wrapped (e.g. by accelerate's hooks)"
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        return None, f"the model softcaps its logits (config.final_logit_softcapping={softcap})"
    changed = _logits_changed_after_head(model, head, device)
    if changed:
        return None, changed
    return head, ""


def _logits_changed_after_head(model: nn.Module, head: nn.Linear, device: torch.device) -> str:
    """Run the model on a few tokens and compare the logits it returns with the head's output;
    a model that scales them (Cohere's logit_scale, Granite's logits_scaling, ...), slices or
    post-processes them in any way would not get that from the chunked loss. '' if unchanged."""
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: seen.append(output))
    was_training = model.training
    model.eval()  # no dropout: the probe draws nothing from the RNG
    try:
        ids = (torch.arange(1, 9, device=device) % head.out_features).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
        model.train(was_training)
    if len(seen) != 1:
        return f"the model calls its output head {len(seen)} times per forward"
    if logits.shape != seen[0].shape or not torch.equal(logits.float(), seen[0].float()):
        return "the model changes the logits after its output head (e.g. scales or caps them)"
    return ""
