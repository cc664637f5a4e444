"""Fine-tuning strategies: each decides which parameters of a model train.

A strategy is a small function `(model, cfg) -> (model, trainable names)`: it may
wrap the model (peft does), sets `requires_grad`, and returns the names of the
parameters it made trainable, which the run checks against `requires_grad`.
"""

from transfer.errors import TransferError


def full(model, cfg):
    """Every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model, [name for name, _ in model.named_parameters()]


STRATEGIES = {"full": full}


def apply_strategy(model, cfg):
    if cfg.name not in STRATEGIES:
        raise TransferError(f"strategy.name={cfg.name!r} is not implemented; allowed: {', '.join(STRATEGIES)}")
    model, declared = STRATEGIES[cfg.name](model, cfg)
    actual = [name for name, p in model.named_parameters() if p.requires_grad]
    if sorted(declared) != sorted(actual):  # a strategy bug, not a user error
        raise RuntimeError(
            f"strategy {cfg.name} declared {len(declared)} trainable tensors but {len(actual)} require grad"
        )
    return model


def count_parameters(model) -> dict:
    """Element counts (not tensor counts); a matrix shared by two modules counts once."""
    total = trainable = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable, "trainable_pct": round(100.0 * trainable / total, 4)}
