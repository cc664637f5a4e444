"""The strategies that wrap a frozen base in peft adapters: lora, dora, qlora, ia3, loha.

Each is a peft config built from the strategy's options and handed to `get_peft_model`; only the
adapters (and the whole modules named in modules_to_save) train. What the rest of the project
needs to know of one (it is peft, it merges, it loads 4-bit, how the diagnostics read its update)
is its row in transfer/config/strategy.py, not its name. peft is imported when a strategy is applied.
"""

from transfer.errors import TransferError, first_line
from transfer.models.anatomy import LINEAR_TYPES, linear_module_names, model_parts


def lora(model, cfg, seed: int, use_dora: bool = False, four_bit: bool = False):
    """LoRA through peft on every linear projection of the blocks (or strategy.target_modules)."""
    from peft import LoraConfig

    targets = _check_targets(model, cfg.target_modules)
    if four_bit:
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and enables input gradients; checkpointing stays a separate choice.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _wrapped(model, cfg, lambda: LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets or "all-linear",
        use_rslora=cfg.use_rslora,
        use_dora=use_dora,
        modules_to_save=_module_names(model, cfg.modules_to_save),
        # A tied head and embedding stay one matrix: a saved copy of one is the other's too.
        ensure_weight_tying=model_parts(model).tied and bool(cfg.modules_to_save),
        task_type="CAUSAL_LM",
    ))  # fmt: skip


def dora(model, cfg, seed: int):
    """DoRA: LoRA with a learned magnitude per output feature (peft's use_dora)."""
    return lora(model, cfg, seed, use_dora=True)


def qlora(model, cfg, seed: int):
    """QLoRA: LoRA on a base loaded in 4-bit NF4 (strategies.loading_options), prepared for k-bit training."""
    return lora(model, cfg, seed, four_bit=True)


def ia3(model, cfg, seed: int):
    """IA3 through peft: learned scaling vectors; peft's per-architecture targets by default."""
    from peft import IA3Config

    targets = _check_targets(model, cfg.target_modules)
    feedforward = _check_targets(model, cfg.feedforward_modules, key="feedforward_modules")
    return _wrapped(model, cfg, lambda: IA3Config(
        target_modules=targets,
        feedforward_modules=feedforward,
        modules_to_save=_module_names(model, cfg.modules_to_save),
        task_type="CAUSAL_LM",
    ))  # fmt: skip


def loha(model, cfg, seed: int):
    """LoHa through peft (LyCORIS): the update is the Hadamard product of two rank-r products, on the linear
    projections of the blocks; its rank dropout is strategy.dropout."""
    from peft import LoHaConfig

    targets = _check_targets(model, cfg.target_modules)
    return _wrapped(model, cfg, lambda: LoHaConfig(
        r=cfg.r,
        alpha=cfg.alpha,
        rank_dropout=cfg.dropout,
        target_modules=targets or "all-linear",
        modules_to_save=_module_names(model, cfg.modules_to_save),
        task_type="CAUSAL_LM",
    ))  # fmt: skip


def _wrapped(model, cfg, peft_config):
    """The model under peft's wrapper with the config `peft_config()` makes; what peft refuses, in one line."""
    from peft import get_peft_model

    try:
        model = get_peft_model(model, peft_config())
    except ValueError as e:
        raise TransferError(f"strategy={cfg.name} on {model.config.model_type!r}: {first_line(e)}") from None
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


# the strategy options this module applies (transfer/strategies/__init__.py gathers them)
APPLY = {"lora": lora, "dora": dora, "qlora": qlora, "ia3": ia3, "loha": loha}
