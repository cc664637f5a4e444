"""What each strategy is, in one table: the facts every other module asks for instead of its name.

Torch-free, like the whole of config/. A new strategy is a row here, its function in strategies/ and its
YAML in conf/strategy/; the checks, loading, the memory estimate, export and the diagnostics read the row.
"""

from __future__ import annotations

from dataclasses import dataclass


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


OBJECTIVES_NOTE = None  # keeps the module's shape parallel to config/objective.py; no per-objective facts here

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
