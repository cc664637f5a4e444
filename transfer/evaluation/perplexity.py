"""Loss and perplexity over a whole split: exp of the token-weighted mean loss over its scored tokens."""

import math

import torch

from transfer.data.sequences import Sequences
from transfer.evaluation import my_batches
from transfer.training import distributed
from transfer.training.loss import smaller_chunks, summed_lm_loss


@torch.no_grad()
def perplexity(model, seqs: Sequences, batch_size: int, hardware, pad_id: int, desc: str = "eval") -> dict:
    """Deterministic: eval mode (no dropout), fixed sequences, fixed order, the run's precision.

    In several processes each scores its share of the batches (distributed.my_batches) and the sums are added."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    longest = int(seqs.lengths().max())
    fixes = (
        [f"eval_batch_size={batch_size // 2}"]
        if batch_size > 1
        else smaller_chunks(hardware.loss_chunk_tokens, longest)
    )
    with hardware.explain_out_of_memory(f"evaluating ({desc}) at eval_batch_size={batch_size}", fixes):
        for number, batch in my_batches(seqs, batch_size, pad_id, desc):
            batch = batch.to(hardware.device)
            with hardware.autocast():
                loss, n = summed_lm_loss(model, batch.input_ids, batch.labels, hardware.loss_chunk_tokens)
            if number is not None:
                total += loss.item()
                count += n
    model.train(was_training)
    total, count = distributed.summed_floats(total, count)
    count = int(count)
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean) if mean < 700 else math.inf, "tokens": count}
