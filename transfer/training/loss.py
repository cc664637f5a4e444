"""The language-modelling loss, summed, so that callers can weight by tokens.

On a 151,936-token vocabulary the logits dominate memory: a micro-batch of 4 x 1024
tokens makes 2.3 GiB of float32 logits, and cross-entropy keeps a same-sized tensor
for the backward pass. With `chunk_tokens` set, the head and the loss run over chunks
of at most that many tokens, so at most one chunk of logits exists at a time.

A plain bias-free linear head (nearly every causal LM) gets its gradients computed
chunk by chunk in the forward pass, the way fused linear cross-entropy kernels do it:
softmax minus one-hot is the gradient of the logits, known as soon as they are, so
only the two gradients themselves are kept for the backward pass. That does less work
and holds less memory than autograd's path even in one chunk, so training takes it
whenever chunks are on (measured in docs/benchmarks.md). Any other head (a peft
wrapper, say) has each chunk recomputed in the backward pass instead, which costs time:
it is chunked only when the batch holds more tokens than a chunk. A model whose
forward() changes the head's output (scales or caps the logits) keeps autograd's path.
"""

import logging
import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from transfer.data.sequences import IGNORE
from transfer.models.anatomy import base_model
from transfer.training.hardware import uncompiled

log = logging.getLogger(__name__)

# what an out-of-memory message suggests when chunks are off or larger
SMALL_CHUNK_TOKENS = 1024
# per model: does forward() return the head's output as it is? (see _logits_are_the_head)
_HEAD_IS_LAST = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LossOptions:
    """How an objective computes its training loss, from the run's hardware settings (objective.loss takes it)."""

    chunk_tokens: int = 0  # hardware.loss_chunk_tokens: the head and the loss over at most this many tokens at a time
    liger: bool = False  # hardware.kernels=liger: Liger's fused linear cross-entropy, where the head is a plain one

    @classmethod
    def of(cls, hardware) -> "LossOptions":
        """A run's options (training.hardware.Hardware); Liger's kernels are in place by then (training/speed.py)."""
        return cls(hardware.loss_chunk_tokens, hardware.kernels == "liger")


def assume_plain_head(base) -> None:
    """Take `base`'s forward() as returning its head's output unchanged, without the probe that would ask it: for
    the memory estimate, whose fake tensors have no values to compare (the run asks its own model again)."""
    _HEAD_IS_LAST[base] = True


def summed_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 0,
                   position_ids: torch.Tensor | None = None, liger: bool = False):  # fmt: skip
    """(sum of next-token cross-entropies, number of scored tokens) for one batch.

    `labels is input_ids` means every token is scored (training blocks): the count
    then needs no look at the device, which would wait for it once per micro-batch.
    Otherwise only the scored positions meet the head: a prompt's tokens cost nothing there.
    `position_ids` restarting within a row mark packed examples, which do not attend to each other.
    `liger` (LossOptions.liger): training's loss, where the head is plain, is Liger's fused one.
    """
    # Position t predicts token t + 1. The targets move left, not the logits: slicing the
    # logits would copy them (another 2.3 GiB in the example above); the last position
    # of each row gets no target.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).flatten()
    all_scored = labels is input_ids
    keep = None if all_scored else (targets != IGNORE).nonzero().squeeze(1)
    count = labels[:, 1:].numel() if all_scored else len(keep)
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    base = base_model(model)
    head = base.get_output_embeddings()
    fused = plain_head(head) and torch.is_grad_enabled()
    liger = liger and fused and count > 0  # it chunks by itself; it divides by the count
    one_chunk = (targets.numel() if all_scored else count) <= chunk_tokens
    if not (chunk_tokens or liger) or (one_chunk and not fused) or not _logits_are_the_head(model, base, input_ids):
        logits = model(**inputs).logits
        return _loss(logits.flatten(0, 1), targets), count
    hidden = base.get_decoder()(**inputs).last_hidden_state.flatten(0, 1)
    if keep is not None:
        hidden, targets = hidden[keep], targets[keep]
    if liger:
        return liger_head_loss(hidden, head.weight, targets), count
    if fused:
        return _FusedHeadLoss.apply(hidden, head.weight, targets, chunk_tokens), count
    # recomputed in the backward pass when there is one; plainly computed in evaluation
    chunk_loss = partial(checkpoint, _head_loss, use_reentrant=False) if torch.is_grad_enabled() else _head_loss
    total = 0
    for start in range(0, targets.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + chunk_loss(head, hidden[part], targets[part])
    return total, count


def plain_head(head) -> bool:
    """A bias-free torch.nn.Linear: the head the fused losses (ours, Liger's) compute with."""
    return type(head) is torch.nn.Linear and head.bias is None


def liger_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy, summed (hardware.kernels=liger): sum CE(hidden @ weight.T, targets)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    # the head's gradient summed in float32 over the chunks, as ours is, whatever the weights' dtype
    liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", accum_dtype=torch.float32)
    return liger(weight, hidden, targets)


def scored_head_inputs(model, input_ids: torch.Tensor, labels: torch.Tensor, position_ids=None):
    """What the head turns into the scored positions' logits: (inputs [scored, H], head, targets [scored], rows [scored]).

    The decoder's hidden states at the scored positions and the head module; for a model that
    changes the head's output in forward() (see _logits_are_the_head), its logits and the identity.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    base = base_model(model)
    if _logits_are_the_head(model, base, input_ids):
        return (
            base.get_decoder()(**inputs).last_hidden_state[rows, cols],
            base.get_output_embeddings(),
            targets[rows, cols],
            rows,
        )
    return model(**inputs).logits[rows, cols], torch.nn.Identity(), targets[rows, cols], rows


def sequence_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Each row's summed log-probability of its scored targets, [rows], in float32.

    Only the scored positions meet the head, in chunks of `chunk_tokens`: the logits of a
    151,936-token vocabulary never exist for a whole batch.
    """
    hidden, head, picked, rows = scored_head_inputs(model, input_ids, labels, position_ids)
    step = chunk_tokens or len(picked) or 1
    # with gradients, each chunk's logits are made again in the backward pass rather than kept
    chunk = partial(checkpoint, _picked_logprobs, use_reentrant=False) if torch.is_grad_enabled() else _picked_logprobs
    logp = [chunk(head, hidden[i : i + step], picked[i : i + step]) for i in range(0, len(picked), step)]
    total = torch.zeros(len(input_ids), dtype=torch.float32, device=input_ids.device)
    return total.index_add(0, rows, torch.cat(logp)) if logp else total


@torch.no_grad()
def logprobs_and_kl(policy: tuple, reference: tuple | None, picked: torch.Tensor, rows: torch.Tensor, n_rows: int,
                    chunk_tokens: int = 4096):  # fmt: skip
    """From the policy's and the reference's (head input, head) at the same scored positions: each row's summed
    log-probabilities under both, [n_rows], and the summed KL(policy || reference) between their next-token
    distributions over the positions. Exact over any vocabulary: the logits exist a chunk at a time."""
    (p_hidden, p_head), step = policy, chunk_tokens or len(picked) or 1
    p_logp, q_logp, kl = [], [], 0.0
    for i in range(0, len(picked), step):
        lp = torch.log_softmax(p_head(p_hidden[i : i + step]).float(), dim=-1)
        p_logp.append(lp.gather(1, picked[i : i + step, None]).squeeze(1))
        if reference is not None:
            lq = torch.log_softmax(reference[1](reference[0][i : i + step]).float(), dim=-1)
            q_logp.append(lq.gather(1, picked[i : i + step, None]).squeeze(1))
            kl += float((lp.exp() * (lp - lq)).sum())
    zeros = torch.zeros(n_rows, dtype=torch.float32, device=picked.device)
    per_row = lambda parts: zeros.index_add(0, rows, torch.cat(parts)) if parts else zeros  # noqa: E731
    return per_row(p_logp), per_row(q_logp) if reference is not None else None, kl


def _picked_logprobs(head, hidden: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(head(hidden).float(), dim=-1).gather(1, picked[:, None]).squeeze(1)


def smaller_chunks(chunk_tokens: int, batch_tokens: int) -> list[str]:
    """For an out-of-memory message: smaller chunks of logits, where that would make them smaller."""
    if batch_tokens <= SMALL_CHUNK_TOKENS or 0 < chunk_tokens <= SMALL_CHUNK_TOKENS:
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
        device = hidden.device.type
        # The logits and the hidden states' gradient are multiplied in autocast's dtype when it
        # is on, like the head's own forward. The head's gradient sums a token's rows over the
        # chunk before any loss scale applies, and a frequent token's sum can pass fp16's
        # 65,504, which GradScaler cannot undo: in fp16 it is multiplied in float32.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        weight_grad_dtype = torch.float32 if dtype == torch.float16 else dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):  # the dtypes above, not autocast's per-op choice
            for start in range(0, targets.numel(), chunk_tokens):
                part = slice(start, start + chunk_tokens)
                h, t = hidden[part].to(dtype), targets[part]
                logp = torch.log_softmax((h @ w.T).float(), dim=-1)  # float32 softmax, as in _loss
                scored = (t != IGNORE)[:, None]
                safe = t.masked_fill(~scored[:, 0], 0)[:, None]
                total -= logp.gather(1, safe).masked_fill_(~scored, 0).sum()
                grad = logp.exp_()  # softmax, in place of the log-probabilities
                grad.scatter_add_(1, safe, torch.full_like(grad[:, :1], -1.0))
                # Unscored rows are zeroed in the (tokens x hidden) tensors, the hidden states'
                # gradient and the hidden states that make the head's, rather than in this
                # (tokens x vocabulary) one: one pass over it fewer.
                g = grad.to(dtype) if grad_hidden is not None or weight_grad_dtype == dtype else grad
                if grad_hidden is not None:
                    grad_hidden[part] = (g @ w) * scored
                if not weight.requires_grad:
                    continue
                h = h * scored
                if weight_grad_dtype != dtype:
                    g, h = grad, h.to(weight_grad_dtype)
                if grad_weight is None:
                    grad_weight = (g.T @ h).float()
                elif g.dtype == torch.float32:
                    grad_weight.addmm_(g.T, h)
                else:  # a bf16 product, accumulated in float32
                    grad_weight += g.T @ h
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


def _logits_are_the_head(model, base, input_ids: torch.Tensor) -> bool:
    """Whether forward()'s logits are the head's output as it is, asked of the model itself once.

    Some architectures scale or cap the logits after the head, each under its own config key
    (Gemma 2's final_logit_softcapping, Granite's logits_scaling, Falcon-H1's
    lm_head_multiplier, ...): comparing the two on a few tokens finds them all.
    """
    known = _HEAD_IS_LAST.get(base)
    if known is None:
        known = _HEAD_IS_LAST[base] = _probe_head_is_last(model, base, input_ids[:1, :8])
        if not known:
            log.info("loss: %s changes the head's output in forward(): autograd's path, no chunks",
                     type(base).__name__)  # fmt: skip
    return known


def _probe_head_is_last(model, base, probe: torch.Tensor) -> bool:
    was_training = model.training
    model.eval()  # no dropout: the two passes must see the same network
    try:
        with torch.no_grad(), uncompiled():  # a one-off check: no compiled version of its own
            logits = model(input_ids=probe, use_cache=False).logits
            try:
                direct = base.get_output_embeddings()(
                    base.get_decoder()(input_ids=probe, use_cache=False).last_hidden_state
                )
            except torch.OutOfMemoryError:
                raise
            except Exception:  # a decoder that does not run on its own: autograd's path, as before chunks
                return False
    finally:
        model.train(was_training)
    # Exactly equal: the same modules on the same input. A cap that is nearly the identity on
    # small logits (a freshly initialised model) must not pass for none. Some models return
    # float32 logits from a half-precision head: the values are what count.
    return logits.shape == direct.shape and torch.equal(logits.float(), direct.float())


def _head_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _loss(head(hidden), targets)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # float32 softmax whatever the autocast dtype: bf16 logits lose the small probabilities
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
