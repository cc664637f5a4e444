"""The language-modelling loss, summed, so that callers can weight by tokens.

On a 151,936-token vocabulary the logits dominate memory: a micro-batch of 4 x 1024
tokens makes 2.3 GiB of float32 logits, and cross-entropy keeps a same-sized tensor
for the backward pass. With `chunk_tokens` set, the head and the loss run over chunks
of at most that many tokens, so at most one chunk of logits exists at a time.

A plain bias-free linear head (nearly every causal LM) gets its gradients computed
chunk by chunk in the forward pass, the way fused linear cross-entropy kernels do it:
softmax minus one-hot is the gradient of the logits, known as soon as they are, so
nothing is kept for the backward pass but the two gradients themselves. That does less
work and holds less memory than autograd's path even in one chunk, so training takes it
whenever chunks are on (measured in docs/benchmarks.md). Any other head (a peft
wrapper, say) has each chunk recomputed in the backward pass instead, which costs time:
it is chunked only when the batch holds more tokens than a chunk.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from transfer.data import IGNORE

# what an out-of-memory message suggests when chunks are off or larger
SMALL_CHUNK_TOKENS = 1024


def summed_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 0):
    """(sum of next-token cross-entropies, number of scored tokens) for one batch.

    `labels is input_ids` means every token is scored (training blocks): the count
    then needs no look at the device, which would wait for it once per micro-batch.
    """
    # Position t predicts token t + 1. The targets move left, not the logits: slicing the
    # logits would copy them (another 2.3 GiB in the example above); the last position
    # of each row gets no target.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).flatten()
    count = labels[:, 1:].numel() if labels is input_ids else int((targets != IGNORE).sum())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    fused = type(head) is torch.nn.Linear and head.bias is None and torch.is_grad_enabled()
    one_chunk = targets.numel() <= chunk_tokens
    if not chunk_tokens or not _logits_are_the_head(base.config) or (one_chunk and not fused):
        logits = model(input_ids=input_ids).logits
        return _loss(logits.flatten(0, 1), targets), count
    hidden = base.get_decoder()(input_ids=input_ids).last_hidden_state.flatten(0, 1)
    if fused:
        return _FusedHeadLoss.apply(hidden, head.weight, targets, chunk_tokens), count
    # recomputed in the backward pass when there is one; plainly computed in evaluation
    chunk_loss = partial(checkpoint, _head_loss, use_reentrant=False) if torch.is_grad_enabled() else _head_loss
    total = 0
    for start in range(0, targets.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + chunk_loss(head, hidden[part], targets[part])
    return total, count


def smaller_chunks(chunk_tokens: int) -> list[str]:
    """For an out-of-memory message: smaller chunks of logits, unless they are small already."""
    if 0 < chunk_tokens <= SMALL_CHUNK_TOKENS:
        return []
    return [f"hardware.loss_chunk_tokens={SMALL_CHUNK_TOKENS}"]


class _FusedHeadLoss(torch.autograd.Function):
    """sum CE(hidden @ weight.T, targets), with both gradients made chunk by chunk in the forward pass.

    The gradient of the summed cross-entropy with respect to the logits is softmax minus
    one-hot, known as soon as a chunk's logits are; the backward pass only scales it.
    Passes over a head-sized tensor (136 M values for Qwen2-0.5B) are bound by memory
    bandwidth and add up: on the project's CPU zero-filling one took 124 ms, multiplying
    it with 512 tokens' hidden states 740 ms. So there are as few as can be: no
    zero-filled accumulator (the first chunk makes it), the later chunks add into it in
    place, and the backward pass scales it in place.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        # the matrix multiplies run in autocast's dtype when it is on, like the head's own forward
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), chunk_tokens):
            part = slice(start, start + chunk_tokens)
            h, t = hidden[part].to(dtype), targets[part]
            logp = torch.log_softmax((h @ w.T).float(), dim=-1)  # float32 softmax, as in _loss
            ignored = (t == IGNORE)[:, None]
            safe = t.masked_fill(ignored[:, 0], 0)[:, None]
            total -= logp.gather(1, safe).masked_fill_(ignored, 0).sum()
            grad = logp.exp_()  # softmax, in place of the log-probabilities
            grad.scatter_add_(1, safe, torch.full_like(grad[:, :1], -1.0)).masked_fill_(ignored, 0)
            grad = grad.to(dtype)
            if grad_hidden is not None:
                grad_hidden[part] = grad @ w
            if not weight.requires_grad:
                continue
            if grad_weight is None:
                grad_weight = (grad.T @ h).float()
            elif dtype == torch.float32:
                grad_weight.addmm_(grad.T, h)
            else:  # a half-precision product, accumulated in float32
                grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # in place: the trainer runs each graph's backward pass once
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden.mul_(grad_total),
            None if grad_weight is None else grad_weight.mul_(grad_total).to(ctx.weight_dtype),
            None,
            None,
        )


def _logits_are_the_head(config) -> bool:
    """Some architectures scale or cap the head's output inside forward(); those keep the plain path."""
    return not any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def _head_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _loss(head(hidden), targets)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # float32 softmax whatever the autocast dtype: bf16 logits lose the small probabilities
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
