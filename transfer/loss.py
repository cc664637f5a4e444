"""The language-modelling loss, summed, so that callers can weight by tokens.

On a 151,936-token vocabulary the logits dominate memory: a micro-batch of 4 x 1024
tokens makes 2.3 GiB of float32 logits, and cross-entropy keeps a same-sized tensor
for the backward pass. With `chunk_tokens` set and more tokens than that in the
batch, the head and the loss run over chunks of tokens, so at most one chunk of
logits exists at a time. A plain bias-free linear head (nearly every causal LM) gets
its gradients computed chunk by chunk in the forward pass, the way fused
linear cross-entropy kernels do it, so nothing is computed twice; any other head
(a peft wrapper, say) has each chunk recomputed in the backward pass instead.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from transfer.data import IGNORE


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
    if not chunk_tokens or targets.numel() <= chunk_tokens or not _logits_are_the_head(base.config):
        logits = model(input_ids=input_ids).logits
        return _loss(logits.flatten(0, 1), targets), count
    hidden = base.get_decoder()(input_ids=input_ids).last_hidden_state.flatten(0, 1)
    head = base.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None and torch.is_grad_enabled():
        return _FusedHeadLoss.apply(hidden, head.weight, targets, chunk_tokens), count
    # recomputed in the backward pass when there is one; plainly computed in evaluation
    chunk_loss = partial(checkpoint, _head_loss, use_reentrant=False) if torch.is_grad_enabled() else _head_loss
    total = 0
    for start in range(0, targets.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + chunk_loss(head, hidden[part], targets[part])
    return total, count


class _FusedHeadLoss(torch.autograd.Function):
    """sum CE(hidden @ weight.T, targets), with both gradients made chunk by chunk in the forward pass.

    The gradient of the summed cross-entropy with respect to the logits is softmax minus
    one-hot, known as soon as a chunk's logits are; the backward pass only scales it.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), chunk_tokens):
            h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits = (h @ weight.T).float()  # autocast, if on, runs the matmul in its dtype
            scored = t != IGNORE
            safe = t.clamp(min=0)
            lse = logits.logsumexp(-1)
            total += ((lse - logits.gather(1, safe[:, None]).squeeze(1)) * scored).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(t), device=t.device), safe] -= 1
            grad.mul_(scored[:, None])
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_tokens] = grad @ weight
            if grad_weight is not None:
                grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_total,
            None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype),
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
