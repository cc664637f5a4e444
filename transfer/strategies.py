"""Fine-tuning strategies: each decides which parameters of a model train.

A strategy is a small function `(model, cfg) -> (model, trainable names)`: it may
replace or wrap the model (scratch and peft do), sets `requires_grad`, and returns
the names of the parameters it made trainable.

Models are mapped through transformers' own accessors, not one model's parameter
names: the decoder blocks are the ModuleList of the classes the model lists in
`_no_split_modules`, the embeddings and head come from `get_input_embeddings()` /
`get_output_embeddings()`, and the final norm is what else the decoder holds.

Tied embeddings (one matrix for the input embeddings and the LM head) cannot be
frozen on one side and trained on the other: freezing the embeddings freezes the
head. Each strategy's config says whether the shared matrix trains, the record says
what was done, and the matrix is counted once.
"""

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from transfer.config.strategy import check_block_count, check_strategy
from transfer.errors import TransferError, first_line

log = logging.getLogger(__name__)


@dataclass
class Parts:
    blocks: nn.ModuleList
    embeddings: list[nn.Module]  # token embeddings first, then position embeddings if any
    final_norm: list[nn.Module]
    head: nn.Module | None
    tied: bool


def base_model(model):
    """The transformers model itself: under peft's wrapper where there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_parts(model) -> Parts:
    """The blocks, embeddings, final norm and head of a causal LM (peft-wrapped or not)."""
    base = base_model(model)
    block_classes = set(getattr(base, "_no_split_modules", None) or [])
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    blocks = None
    if decoder is not None:
        for child in decoder.children():
            # the class's ancestors count: FSDP2's fully_shard swaps a block's class for a subclass (FSDPQwen2DecoderLayer)
            first = child[0] if isinstance(child, nn.ModuleList) and len(child) else None
            if first is not None and block_classes.intersection(c.__name__ for c in type(first).__mro__):
                blocks = child
    if blocks is None:
        raise TransferError(
            f"cannot map the architecture {type(base).__name__} (model_type {base.config.model_type!r}): "
            "no decoder block list found; supported: Qwen2, Qwen3, Llama, GPT-2, GPT-NeoX and others "
            "whose blocks transformers lists in _no_split_modules"
        )
    token_embeddings = base.get_input_embeddings()
    head = base.get_output_embeddings()
    embeddings = [token_embeddings] + [
        m for m in decoder.children() if isinstance(m, nn.Embedding) and m is not token_embeddings
    ]
    final_norm = [
        m
        for m in decoder.children()
        if m is not blocks and all(m is not e for e in embeddings) and any(True for _ in m.parameters())
    ]
    tied = head is not None and getattr(head, "weight", None) is token_embeddings.weight
    return Parts(blocks, embeddings, final_norm, head, tied)


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


LINEAR_TYPES = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear projections inside the blocks (what LoRA and IA3 can target)."""
    names = set()
    for block in model_parts(model).blocks:
        for name, module in block.named_modules():
            if type(module).__name__ in LINEAR_TYPES:
                names.add(name.split(".")[-1])
    return sorted(names)


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


# ---------------------------------------------------------------- the registry and accounting
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


def numel(p: torch.Tensor) -> int:
    """Logical element count: bitsandbytes packs two 4-bit weights into each stored byte."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return p.numel()


def parameter_report(model) -> dict:
    """Element counts (never tensor counts), trainable elements by part, tying, trainable blocks.

    A matrix shared by the embeddings and the head is counted once, under embeddings.
    Parameters that peft adds (LoRA matrices, IA3 vectors, DoRA magnitudes) count as adapter.
    """
    parts = model_parts(model)
    part_of = {}
    for p in parts.head.parameters() if parts.head is not None else []:
        part_of[id(p)] = "head"
    for module in parts.final_norm:
        for p in module.parameters():
            part_of[id(p)] = "final_norm"
    for i, block in enumerate(parts.blocks):
        for p in block.parameters():
            part_of[id(p)] = i
    for module in parts.embeddings:  # after the head: a tied matrix counts as embeddings
        for p in module.parameters():
            part_of[id(p)] = "embeddings"
    # peft names what it adds with its tuner's prefix: "lora_" (LoRA, DoRA), "ia3_"
    adapter_prefix = getattr(model.base_model, "prefix", None) if hasattr(model, "peft_config") else None

    total = trainable = 0
    breakdown = dict.fromkeys(["embeddings", "blocks", "final_norm", "head", "adapter"], 0)
    blocks_training = set()
    for name, p in model.named_parameters():
        n = numel(p)
        total += n
        if not p.requires_grad:
            continue
        trainable += n
        part = part_of.get(id(p), "other")
        if adapter_prefix and adapter_prefix in name:
            part = "adapter"
        elif isinstance(part, int):
            blocks_training.add(part)
            part = "blocks"
        breakdown[part] = breakdown.get(part, 0) + n
    shared = parts.embeddings[0].weight
    peft_config = model.peft_config["default"] if hasattr(model, "peft_config") else None
    return {
        "total": total,
        "trainable": trainable,
        "trainable_pct": round(100.0 * trainable / total, 4),
        "breakdown": breakdown,
        "trainable_blocks": sorted(blocks_training),
        "num_blocks": len(parts.blocks),
        "tied_embeddings": parts.tied,
        "shared_matrix_trains": bool(shared.requires_grad) if parts.tied else None,
        "peft_target_modules": sorted(peft_config.target_modules) if peft_config else None,
    }
