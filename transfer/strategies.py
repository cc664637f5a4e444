"""Fine-tuning strategies: each decides which parameters of a model train.

A strategy is a small function `(model, cfg) -> (model, trainable names)`: it may
replace or wrap the model (scratch and peft do), sets `requires_grad`, and returns
the names of the parameters it made trainable.

What a model's blocks, embeddings, final norm and head are is transfer/models/anatomy.py's
business; a strategy picks among them.

Tied embeddings (one matrix for the input embeddings and the LM head) cannot be
frozen on one side and trained on the other: freezing the embeddings freezes the
head. Each strategy's config says whether the shared matrix trains, the record says
what was done, and the matrix is counted once.
"""

import logging

import torch
from torch import nn

from transfer.config.checks import check_block_count, check_strategy
from transfer.errors import TransferError, first_line
from transfer.models.anatomy import LINEAR_TYPES, Parts, linear_module_names, model_parts

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- freezing strategies
def full(model, cfg):
    """Every parameter trains."""
    return model, _train_only(model, [model])


def freeze_embeddings(model, cfg):
    """Train every block, the final norm and the head; the input embeddings stay frozen."""
    parts = model_parts(model)
    return model, _train_only(model, [*parts.blocks, *parts.final_norm, *_head(parts, train_tied=False)])


def freeze_lower(model, cfg):
    """Freeze the embeddings and the lowest frozen_blocks blocks; train the blocks above, the final norm and the head."""
    parts = model_parts(model)
    n = check_block_count(cfg, len(parts.blocks))
    return model, _train_only(model, [*parts.blocks[n:], *parts.final_norm, *_head(parts, cfg.train_tied_embeddings)])


def adapter(model, cfg):
    """Top-block tuning: the top trained_blocks blocks, the final norm and the head train; nothing else."""
    parts = model_parts(model)
    n = check_block_count(cfg, len(parts.blocks))
    top = parts.blocks[len(parts.blocks) - n :]
    return model, _train_only(model, [*top, *parts.final_norm, *_head(parts, cfg.train_tied_embeddings)])


def scratch(model, cfg, seed: int = 0):
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


# ---------------------------------------------------------------- peft strategies
def lora(model, cfg):
    """LoRA (and DoRA, QLoRA) through peft; only the adapters and modules_to_save train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = _check_targets(model, cfg.target_modules)
    if cfg.name == "qlora":
        # Casts norms to fp32 and enables input gradients; checkpointing stays a separate choice.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets or "all-linear",
        use_rslora=cfg.use_rslora,
        use_dora=cfg.name == "dora",
        modules_to_save=_module_names(model, cfg.modules_to_save),
        # A tied head and embedding stay one matrix: a saved copy of one is the other's too.
        ensure_weight_tying=model_parts(model).tied and bool(cfg.modules_to_save),
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise TransferError(f"strategy={cfg.name} on {model.config.model_type!r}: {first_line(e)}") from None
    return model, [name for name, p in model.named_parameters() if p.requires_grad]


def ia3(model, cfg):
    """IA3 through peft: learned scaling vectors; peft's per-architecture targets by default."""
    from peft import IA3Config, get_peft_model

    targets = _check_targets(model, cfg.target_modules)
    feedforward = _check_targets(model, cfg.feedforward_modules, key="feedforward_modules")
    try:
        config = IA3Config(
            target_modules=targets,
            feedforward_modules=feedforward,
            modules_to_save=_module_names(model, cfg.modules_to_save),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    except ValueError as e:
        raise TransferError(f"strategy=ia3 on {model.config.model_type!r}: {first_line(e)}") from None
    return model, [name for name, p in model.named_parameters() if p.requires_grad]


def _check_targets(model, targets, key: str = "target_modules") -> list[str] | None:
    """Each name must match at least one linear projection (by its name or the end of its path)."""
    if targets is None:
        return None
    targets = list(targets)
    linear = [name for name, m in model.named_modules() if type(m).__name__ in LINEAR_TYPES]
    for t in targets:
        if not any(name == t or name.endswith("." + t) for name in linear):
            raise TransferError(
                f"strategy.{key}: {t!r} matches no linear projection of {type(model).__name__}; "
                f"allowed: {', '.join(linear_module_names(model))}"
            )
    return targets


def _module_names(model, roles) -> list[str] | None:
    """'head' / 'embeddings' -> the module names peft's modules_to_save expects for this architecture."""
    if not roles:
        return None
    wanted = {"head": model.get_output_embeddings(), "embeddings": model.get_input_embeddings()}
    names = []
    for role in roles:
        names += [name.split(".")[-1] for name, m in model.named_modules() if m is wanted[role]][:1]
    return names


# ---------------------------------------------------------------- the registry
STRATEGIES = {
    "full": full,
    "freeze_embeddings": freeze_embeddings,
    "freeze_lower": freeze_lower,
    "adapter": adapter,
    "lora": lora,
    "dora": lora,
    "qlora": lora,
    "ia3": ia3,
    "scratch": scratch,
}


def check_before_loading(cfg, depth: int | None = None) -> None:
    """What can be refused before a model is loaded: the values, and QLoRA without CUDA or bitsandbytes."""
    if cfg.name not in STRATEGIES:
        raise TransferError(f"strategy.name={cfg.name!r} is unknown; allowed: {', '.join(STRATEGIES)}")
    check_strategy(cfg, depth)
    if cfg.name == "qlora":
        if not torch.cuda.is_available():
            raise TransferError(
                "strategy=qlora needs a CUDA GPU (bitsandbytes 4-bit weights) and there is none here; use strategy=lora"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TransferError(
                "strategy=qlora needs bitsandbytes: pip install bitsandbytes; or use strategy=lora"
            ) from None


def loading_options(cfg) -> dict:
    """How a strategy wants its model loaded: QLoRA's base is quantized to 4-bit NF4 while it loads,
    which needs the real weights (even for a dry run) and places them on the GPU itself."""
    quantized = cfg.name == "qlora"
    return {"quantize_4bit": quantized, "needs_weights": quantized, "placed": quantized,
            "weights": "4-bit NF4" if quantized else None}  # fmt: skip


def apply_strategy(model, cfg, seed: int = 0):
    """Apply the strategy named by cfg.name; return (model, names of its trainable parameters)."""
    check_before_loading(cfg, depth=len(model_parts(model).blocks))
    fn = STRATEGIES[cfg.name]
    model, declared = fn(model, cfg, seed) if fn is scratch else fn(model, cfg)
    actual = [name for name, p in model.named_parameters() if p.requires_grad]
    if sorted(declared) != sorted(actual):  # a bug in a strategy, not a user error
        raise RuntimeError(
            f"strategy {cfg.name} declared {len(declared)} trainable tensors; {len(actual)} require grad"
        )
    return model, declared
