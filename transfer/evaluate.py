"""Perplexity over a whole split: exp of the token-weighted mean loss."""

import math

import torch
from tqdm.auto import tqdm

from transfer.data import Blocks
from transfer.loss import smaller_chunks, summed_lm_loss


@torch.no_grad()
def evaluate(model, blocks: Blocks, batch_size: int, hardware, desc: str = "eval") -> dict:
    """Deterministic: eval mode (no dropout), fixed blocks, fixed order, the run's precision."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    block = blocks.input_ids.shape[1]
    fixes = (
        [f"eval_batch_size={batch_size // 2}"] if batch_size > 1 else smaller_chunks(hardware.loss_chunk_tokens, block)
    )
    with hardware.explain_out_of_memory(f"evaluating ({desc}) at eval_batch_size={batch_size}", fixes):
        for start in tqdm(range(0, len(blocks), batch_size), desc=desc, leave=False, unit="batch", disable=None):
            ids = blocks.input_ids[start : start + batch_size].to(hardware.device)
            labels = blocks.labels[start : start + batch_size].to(hardware.device)
            with hardware.autocast():
                loss, n = summed_lm_loss(model, ids, labels, hardware.loss_chunk_tokens)
            total += loss.item()
            count += n
    model.train(was_training)
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean) if mean < 700 else math.inf, "tokens": count}


@torch.no_grad()
def generate_samples(model, tokenizer, prompts, max_new_tokens: int, hardware) -> list[dict]:
    """Greedy continuations of each prompt: deterministic, so before and after compare."""
    was_training = model.training
    model.eval()
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(hardware.device)
        with hardware.autocast():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        samples.append(
            {"prompt": prompt, "completion": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}
        )
    model.train(was_training)
    return samples
