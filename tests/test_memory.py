"""Memory: gradient checkpointing, halving on out-of-memory, the precision a GPU gets by default."""

import pytest
import torch
from conftest import loss_and_grads

from transfer.models import load_model_and_tokenizer
from transfer.strategies import apply_strategy
from transfer.transforms import apply_transforms
from transfer.validate import compose_config


def saved_for_backward(model, ids) -> int:
    """Bytes of the tensors autograd keeps from one forward pass for the backward pass."""
    from transfer.loss import summed_lm_loss

    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = summed_lm_loss(model, ids, ids, chunk_tokens=4096)
    loss.backward()
    return total


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_gradient_checkpointing_keeps_less_and_computes_the_same(strategy):
    ids = torch.randint(0, 257, (4, 128), generator=torch.Generator().manual_seed(0))
    results = {}
    for on in (False, True):
        cfg = compose_config([f"strategy={strategy}", "strategy.dropout=0" if strategy == "lora" else "seed=1234",
                              f"hardware.gradient_checkpointing={str(on).lower()}"])  # fmt: skip
        model, _ = load_model_and_tokenizer(cfg.model, 128)
        torch.manual_seed(0)  # LoRA's A matrices start random: the same in both, as a run's seed makes them
        model, _ = apply_strategy(model, cfg.strategy, seed=0)
        assert apply_transforms(model, cfg) == {"gradient_checkpointing": on}
        model.train()
        results[on] = (saved_for_backward(model, ids), loss_and_grads(model, ids, ids, 4096))
    (kept_plain, (loss_plain, _, grads_plain)), (kept_ckpt, (loss_ckpt, _, grads_ckpt)) = results[False], results[True]
    assert kept_ckpt < 0.5 * kept_plain  # each block keeps its input, not its insides
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=0)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_auto_precision_is_bf16_on_a_gpu_that_has_it_and_fp32_elsewhere(monkeypatch):
    from transfer import hardware

    cfg = compose_config([]).hardware
    assert hardware.resolve(cfg).precision == ("bf16" if torch.cuda.is_available() else "fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.resolve(cfg).precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # an older GPU: fp32, no loss scaling
    assert hardware.resolve(cfg).precision == "fp32"
