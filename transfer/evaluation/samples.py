"""Greedy generations before and after training: what the model says, for people to read."""

import torch

from transfer.training.hardware import uncompiled


@torch.no_grad()
def generate_samples(model, tokenizer, inputs: list[dict], max_new_tokens: int, hardware) -> list[dict]:
    """Greedy continuations of each input's `input_ids`: deterministic, so before and after compare.

    Each input has the `prompt` shown to people and the `input_ids` the model reads (the prompt
    framed by the chat template, for instruction tuning); other keys (`reference`) are kept.
    """
    was_training = model.training
    model.eval()
    samples = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for item in inputs:
        ids = torch.tensor([item["input_ids"]], device=hardware.device)
        with hardware.autocast(), uncompiled():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)  # fmt: skip
        completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        samples.append({**{k: v for k, v in item.items() if k != "input_ids"}, "completion": completion})
    model.train(was_training)
    return samples
