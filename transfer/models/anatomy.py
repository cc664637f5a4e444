"""The anatomy of a causal LM: its decoder blocks, embeddings, final norm and head, and the parameter counts
the record keeps of them.

Models are mapped through transformers' own accessors, not one model's parameter names: the
decoder blocks are the ModuleList of the classes the model lists in `_no_split_modules`, the
embeddings and head come from `get_input_embeddings()` / `get_output_embeddings()`, and the final
norm is what else the decoder holds. A peft-wrapped model is mapped through its base.

Tied embeddings (one matrix for the input embeddings and the LM head) are counted once, under
embeddings. Strategies, the loss, the speed options, the memory estimate, FSDP's sharding and the
diagnostics all ask this module, which asks nothing of them.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from transfer.errors import TransferError


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


LINEAR_TYPES = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear projections inside the blocks (what LoRA and IA3 can target)."""
    names = set()
    for block in model_parts(model).blocks:
        for name, module in block.named_modules():
            if type(module).__name__ in LINEAR_TYPES:
                names.add(name.split(".")[-1])
    return sorted(names)


def numel(p: torch.Tensor) -> int:
    """Logical element count: bitsandbytes packs two 4-bit weights into each stored byte."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return p.numel()


def parameter_report(model) -> dict:
    """Element counts (never tensor counts), trainable elements by part, tying, trainable blocks.

    A matrix shared by the embeddings and the head is counted once, under embeddings.
    Parameters that peft adds (LoRA matrices, IA3 vectors, DoRA magnitudes) count as `peft`
    (`adapter` in records before 2026-12, a name `strategy=adapter`'s top blocks never counted under).
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
    # peft names what it adds with its tuner's prefix: "lora_" (LoRA, DoRA), "ia3_", ...
    peft_prefix = getattr(model.base_model, "prefix", None) if hasattr(model, "peft_config") else None

    total = trainable = 0
    breakdown = dict.fromkeys(["embeddings", "blocks", "final_norm", "head", "peft"], 0)
    blocks_training = set()
    for name, p in model.named_parameters():
        n = numel(p)
        total += n
        if not p.requires_grad:
            continue
        trainable += n
        part = part_of.get(id(p), "other")
        if peft_prefix and peft_prefix in name:
            part = "peft"
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
