"""The optimizer group (AdamW, SGD), the rate a run starts from, and the checks of the schedule's values."""

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING, DictConfig

from transfer.errors import TransferError


class Schedule(Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


@dataclass
class OptimizerConfig:
    name: str = MISSING
    # null: the strategy's strategy.lr (see learning_rate); a number: this rate, whatever the strategy
    lr: float | None = None
    weight_decay: float = 0.0
    # Warm-up as a number of optimizer steps, or as a fraction of them; not both.
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Schedule = Schedule.cosine
    # Cosine decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.0
    # Max global gradient norm; null disables clipping (the norm is still logged).
    grad_clip: float | None = 1.0


@dataclass
class AdamWConfig(OptimizerConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # torch's fused kernel (CUDA and CPU): one pass over all tensors per step, not one per tensor.
    fused: bool = True


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = 0.9
    nesterov: bool = False


# options of the group -> the schema class their YAML names (schema/optimizer/<option>)
SCHEMA = {"adamw": AdamWConfig, "sgd": SGDConfig}


def learning_rate(cfg) -> tuple[float, str]:
    """The rate a run's optimizer starts from, and where it comes from: "optimizer.lr" or "strategy".

    Takes a config or its plain-dict form (a record's, a checkpoint's); one written before strategies
    had rates of their own holds optimizer.lr, and gets it.
    """
    lr = cfg["optimizer"].get("lr")
    return (lr, "optimizer.lr") if lr is not None else (cfg["strategy"]["lr"], "strategy")


def check_optimizer(cfg: DictConfig) -> None:
    """The training's length, its rate (the optimizer's or the strategy's) and the schedule's values."""
    if cfg.max_steps is None and cfg.epochs is None:
        raise TransferError("max_steps and epochs are both null; set at least one")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise TransferError(f"max_steps={cfg.max_steps} must be at least 1 (or null to train by epochs)")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise TransferError(f"epochs={cfg.epochs} must be positive (or null to train by max_steps)")
    opt = cfg.optimizer
    if opt.lr is not None and opt.lr <= 0:
        raise TransferError(f"optimizer.lr={opt.lr} must be positive (or null: the strategy's strategy.lr)")
    if cfg.strategy.lr <= 0:
        raise TransferError(f"strategy.lr={cfg.strategy.lr} must be positive")
    if opt.weight_decay < 0:
        raise TransferError(f"optimizer.weight_decay={opt.weight_decay} must be 0 or more")
    if opt.warmup_steps < 0 or not 0 <= opt.warmup_ratio < 1:
        raise TransferError(
            f"optimizer.warmup_steps={opt.warmup_steps} / warmup_ratio={opt.warmup_ratio}: "
            "allowed are steps >= 0 and a ratio in [0, 1)"
        )
    if cfg.max_steps is not None and opt.warmup_steps >= cfg.max_steps:
        raise TransferError(f"optimizer.warmup_steps={opt.warmup_steps} must be below max_steps={cfg.max_steps}")
    if not 0 <= opt.min_lr_ratio <= 1:
        raise TransferError(f"optimizer.min_lr_ratio={opt.min_lr_ratio} must be in [0, 1]")
    if opt.grad_clip is not None and opt.grad_clip <= 0:
        raise TransferError(f"optimizer.grad_clip={opt.grad_clip} must be positive (or null for no clipping)")
    if "betas" in opt and (len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas)):
        raise TransferError(f"optimizer.betas={list(opt.betas)} must be two numbers in [0, 1)")
    if "eps" in opt and opt.eps <= 0:  # 0: a gradient of 0 (a padding token's embedding) divides 0 by 0
        raise TransferError(f"optimizer.eps={opt.eps} must be positive")
    if "momentum" in opt and opt.momentum < 0:
        raise TransferError(f"optimizer.momentum={opt.momentum} must be 0 or more")
    if opt.get("nesterov") and opt.momentum <= 0:
        raise TransferError(f"optimizer.nesterov=true needs optimizer.momentum > 0 (got {opt.momentum})")
