"""The strategies that train some of the model's own weights and freeze the rest: full, freeze_embeddings,
freeze_lower, adapter (top-block tuning: not a peft adapter) and scratch (fresh weights, the control).

Tied embeddings (one matrix for the input embeddings and the LM head) cannot be frozen on one
side and trained on the other: freezing the embeddings freezes the head. Each strategy's config
says whether the shared matrix trains, the record says what was done, and the matrix is counted once.
"""

from torch import nn

from transfer.config.strategy import check_block_count
from transfer.models.anatomy import Parts, model_parts


def full(model, cfg, seed: int):
    """Every parameter trains."""
    return model, _train_only(model, [model])


def freeze_embeddings(model, cfg, seed: int):
    """Train every block, the final norm and the head; the input embeddings stay frozen."""
    parts = model_parts(model)
    return model, _train_only(model, [*parts.blocks, *parts.final_norm, *_head(parts, train_tied=False)])


def freeze_lower(model, cfg, seed: int):
    """Freeze the embeddings and the lowest frozen_blocks blocks; train the blocks above, the final norm and the head."""
    parts = model_parts(model)
    n = check_block_count(cfg, len(parts.blocks))
    return model, _train_only(model, [*parts.blocks[n:], *parts.final_norm, *_head(parts, cfg.train_tied_embeddings)])


def adapter(model, cfg, seed: int):
    """Top-block tuning: the top trained_blocks blocks, the final norm and the head train; nothing else."""
    parts = model_parts(model)
    n = check_block_count(cfg, len(parts.blocks))
    top = parts.blocks[len(parts.blocks) - n :]
    return model, _train_only(model, [*top, *parts.final_norm, *_head(parts, cfg.train_tied_embeddings)])


def scratch(model, cfg, seed: int):
    """The no-transfer control: same architecture, fresh weights, everything trains."""
    from transfer.models.load import build_model

    fresh = build_model(model.config, seed=cfg.init_seed if cfg.init_seed is not None else seed, dtype=model.dtype)
    return fresh, _train_only(fresh, [fresh])


def _head(parts: Parts, train_tied: bool) -> list[nn.Module]:
    """The head, unless it is the (frozen) embedding matrix of a tied model."""
    if parts.head is None or (parts.tied and not train_tied):
        return []
    return [parts.head]


def _train_only(model, modules) -> list[str]:
    keep = {id(p) for m in modules for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [name for name, p in model.named_parameters() if id(p) in keep]


# the strategy options this module applies (transfer/strategies/__init__.py gathers them)
APPLY = {
    "full": full,
    "freeze_embeddings": freeze_embeddings,
    "freeze_lower": freeze_lower,
    "adapter": adapter,
    "scratch": scratch,
}
