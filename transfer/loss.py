"""The language-modelling loss, summed, so that callers can weight by tokens."""

import torch
import torch.nn.functional as F

from transfer.data import IGNORE


def summed_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor):
    """(sum of next-token cross-entropies, number of scored tokens) for one batch."""
    logits = model(input_ids=input_ids).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())
