"""Fine-tuning strategies: each decides which parameters of a model train.

A strategy is a function `(model, cfg, seed) -> (model, trainable names)`: it may replace or wrap
the model (scratch and peft do), sets `requires_grad`, and returns the names of the parameters it
made trainable. freeze.py holds those that train the model's own weights, peft.py those that add
peft adapters; each module lists its functions in its APPLY table, gathered here.

What a strategy *is* (peft or not, mergeable, loaded in 4-bit, how its update is read) is its row
in transfer/config/strategy.py: this package asks the row, never the name. A new strategy is a
function with its APPLY entry, its row and its conf/strategy/<name>.yaml.
"""

import torch

from transfer.config.strategy import STRATEGIES, check_strategy
from transfer.errors import TransferError
from transfer.models.anatomy import model_parts
from transfer.strategies import freeze, peft

APPLY = {**freeze.APPLY, **peft.APPLY}


def check_before_loading(cfg, depth: int | None = None) -> None:
    """What can be refused before a model is loaded: the values, and a 4-bit base without CUDA or bitsandbytes."""
    if cfg.name not in APPLY:
        raise TransferError(f"strategy.name={cfg.name!r} is unknown; allowed: {', '.join(APPLY)}")
    check_strategy(cfg, depth)
    spec = STRATEGIES[cfg.name]
    if spec.four_bit:
        instead = f"use strategy={spec.estimate_as}"  # the same adapter on a full-precision base
        if not torch.cuda.is_available():
            raise TransferError(
                f"strategy={cfg.name} needs a CUDA GPU (bitsandbytes 4-bit weights) and there is none here; {instead}"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TransferError(
                f"strategy={cfg.name} needs bitsandbytes: pip install bitsandbytes; or {instead}"
            ) from None


def loading_options(cfg) -> dict:
    """How a strategy wants its model loaded: a 4-bit base (QLoRA's) is quantized to NF4 while it loads,
    which needs the real weights (even for a dry run) and places them on the GPU itself."""
    quantized = STRATEGIES[cfg.name].four_bit
    return {"quantize_4bit": quantized, "needs_weights": quantized, "placed": quantized,
            "weights": "4-bit NF4" if quantized else None}  # fmt: skip


def apply_strategy(model, cfg, seed: int = 0):
    """Apply the strategy named by cfg.name; return (model, names of its trainable parameters)."""
    check_before_loading(cfg, depth=len(model_parts(model).blocks))
    model, declared = APPLY[cfg.name](model, cfg, seed)
    actual = [name for name, p in model.named_parameters() if p.requires_grad]
    if sorted(declared) != sorted(actual):  # a bug in a strategy, not a user error
        raise RuntimeError(
            f"strategy {cfg.name} declared {len(declared)} trainable tensors; {len(actual)} require grad"
        )
    return model, declared
