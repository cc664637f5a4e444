"""The strategy group: its config classes, its checks, and what each strategy is, in one table.

Torch-free, like the whole of config/. A new strategy is a row of STRATEGIES, its function in strategies/
and its YAML in conf/strategy/; the checks, loading, the memory estimate, export and the diagnostics read
the row instead of the strategy's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig

from transfer.errors import TransferError


@dataclass(frozen=True)
class StrategySpec:
    peft: bool = False  # trains a peft adapter on a frozen base (saved as an adapter, replicated under FSDP)
    mergeable: bool = False  # the adapter folds exactly into the base weights (export --merge)
    four_bit: bool = False  # the base loads quantized to 4-bit NF4: needs CUDA, bitsandbytes and the real weights
    estimate_as: str | None = None  # the strategy whose memory stands in for this one's in the estimate
    # how the diagnostics read the weight change of its peft layers (evaluation/diagnostics.py READERS): "lora"
    # (B A scaled, DoRA merged), "ia3" (a scaling vector), "delta" (any tuner that merges by adding its
    # get_delta_weight); None where no peft layer is added, or where its change is not read ("not measured")
    update: str | None = None


STRATEGIES = {
    "full": StrategySpec(),
    "freeze_embeddings": StrategySpec(),
    "freeze_lower": StrategySpec(),
    "adapter": StrategySpec(),  # top-block tuning: the top strategy.trained_blocks blocks, not a peft adapter
    "scratch": StrategySpec(),
    "lora": StrategySpec(peft=True, mergeable=True, update="lora"),
    "dora": StrategySpec(peft=True, mergeable=True, update="lora"),
    "qlora": StrategySpec(peft=True, four_bit=True, estimate_as="lora", update="lora"),
    "ia3": StrategySpec(peft=True, mergeable=True, update="ia3"),
    "loha": StrategySpec(peft=True, mergeable=True, update="delta"),
}


def spec(name: str) -> StrategySpec:
    return STRATEGIES[name]


# ---------------------------------------------------------------- the config classes
@dataclass
class StrategyConfig:
    name: str = MISSING
    # AdamW's learning rate for this strategy, used when optimizer.lr is null (each option's YAML
    # says how it was chosen); optimizer.lr set on the command line or in a sweep overrides it.
    lr: float = 3e-4


@dataclass
class FreezeLowerConfig(StrategyConfig):
    # Frozen blocks, counted from the input: an integer count, or a fraction of the depth in (0, 1).
    frozen_blocks: Any = 0.5
    # With tied embeddings the input embedding is the LM head: freezing the
    # embeddings freezes the head too, unless this is true.
    train_tied_embeddings: bool = False


@dataclass
class AdapterConfig(StrategyConfig):
    """Top-block tuning: the top trained_blocks blocks, the final norm and the head train."""

    trained_blocks: int = 2
    train_tied_embeddings: bool = False


@dataclass
class LoraConfig(StrategyConfig):
    """LoRA, DoRA and QLoRA (the strategy's name picks the variant)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names to adapt; null = every linear projection of the blocks.
    target_modules: list[str] | None = None
    use_rslora: bool = False
    # Also train whole modules: "head" and/or "embeddings".
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class LoHaConfig(StrategyConfig):
    """LoHa (peft, LyCORIS): the weight update is (A1 B1) * (A2 B2), elementwise, each of rank r."""

    r: int = 8
    alpha: int = 16
    # peft's rank_dropout: drops ranks of the update while training
    dropout: float = 0.0
    # Module names to adapt; null = every linear projection of the blocks.
    target_modules: list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class IA3Config(StrategyConfig):
    # null = peft's per-architecture default (attention k/v or q/v, and the MLP down projection).
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class ScratchConfig(StrategyConfig):
    # Seed of the fresh initialisation; null = the run's seed.
    init_seed: int | None = None


# options of the group -> the schema class their YAML names (schema/strategy/<option>)
SCHEMA = {"base": StrategyConfig, "freeze_lower": FreezeLowerConfig, "adapter": AdapterConfig, "lora": LoraConfig,
          "ia3": IA3Config, "loha": LoHaConfig, "scratch": ScratchConfig}  # fmt: skip
# keys that were renamed: old key -> new key, by the option's schema class
RENAMED = {
    (FreezeLowerConfig, "n_layers"): "frozen_blocks",
    (AdapterConfig, "n_layers"): "trained_blocks",
}
# what strategy.modules_to_save may name, whatever the architecture calls them
MODULE_ROLES = ("head", "embeddings")


# ---------------------------------------------------------------- the checks
def check_strategy_choice(cfg: DictConfig) -> None:
    """The strategy's rate, and the process layout it allows (the values are checked with the model's depth)."""
    if cfg.strategy.lr <= 0:
        raise TransferError(f"strategy.lr={cfg.strategy.lr} must be positive")
    if cfg.distributed.name == "fsdp" and spec(cfg.strategy.name).peft:
        raise TransferError(
            f"distributed=fsdp shards full fine-tuning; strategy={cfg.strategy.name} trains small adapters: "
            "allowed: distributed=ddp or auto"
        )


def check_strategy(cfg: DictConfig, depth: int | None = None) -> None:
    """The strategy's values, and its block count against the model's depth when that is known."""
    check_block_count(cfg, depth)
    if "r" in cfg and (cfg.r < 1 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1):
        raise TransferError(
            f"strategy r={cfg.r}, alpha={cfg.alpha}, dropout={cfg.dropout}: allowed r >= 1, alpha > 0, dropout in [0, 1)"
        )
    for role in cfg.get("modules_to_save") or []:
        if role not in MODULE_ROLES:
            raise TransferError(f"strategy.modules_to_save: {role!r} is unknown; allowed: {', '.join(MODULE_ROLES)}")


def check_block_count(cfg: DictConfig, depth: int | None) -> int | None:
    """How many blocks freeze_lower freezes or adapter trains, checked against the depth when it is known.

    freeze_lower's frozen_blocks: a count from 0 to the depth, or a fraction of the depth in (0, 1);
    adapter's trained_blocks: a count from 1 to the depth. None for other strategies (or an unknown depth).
    """
    deep = f" (the model has {depth} blocks)" if depth is not None else ""
    top = depth if depth is not None else "the model's depth"
    if "frozen_blocks" in cfg:
        n = cfg.frozen_blocks
        if isinstance(n, float) and 0 < n < 1:
            return round(n * depth) if depth is not None else None
        if isinstance(n, int) and not isinstance(n, bool) and 0 <= n and (depth is None or n <= depth):
            return n
        raise TransferError(
            f"strategy.frozen_blocks={n!r}: allowed an integer 0..{top}, or a fraction of the depth in (0, 1){deep}"
        )
    if "trained_blocks" in cfg:
        n = cfg.trained_blocks
        if isinstance(n, int) and not isinstance(n, bool) and 1 <= n and (depth is None or n <= depth):
            return n
        raise TransferError(f"strategy.trained_blocks={n!r}: allowed an integer 1..{top}{deep}")
    return None
