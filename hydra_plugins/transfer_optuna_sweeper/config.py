"""The sweeper's settings, registered as `hydra/sweeper=optuna` (docs/scaling.md: "Hyper-parameter search (Optuna)")."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from transfer.config.search import SWEEPER_TARGET


@dataclass
class OptunaSweeperConf:
    _target_: str = SWEEPER_TARGET
    # The number the study optimises: a path into each job's record (metrics.json), and its direction.
    metric: str = "eval.final.validation.loss"
    direction: str = "minimize"
    # Trials in the study in all, those of earlier runs and other workers included.
    n_trials: int = 20
    # Trials launched together through hydra/launcher (in parallel where the launcher runs jobs so).
    n_jobs: int = 1
    # tpe or random; seeded from `seed`, or the run's seed when null.
    sampler: str = "tpe"
    seed: int | None = None
    # TPE draws this many trials at random before it models the results.
    startup_trials: int = 10
    # none, median (MedianPruner) or asha (SuccessiveHalvingPruner), on the validation metric at each eval_interval.
    pruner: str = "none"
    # median: trials finished before any is pruned, and training steps before a trial can be.
    pruner_startup_trials: int = 5
    pruner_warmup_steps: int = 0
    # asha: training steps before the first rung (null: Optuna's auto), and the fraction kept at each rung's 1/n.
    min_resource: int | None = None
    reduction_factor: int = 4
    # Where the study lives; null: sqlite:///<hydra.sweep.dir>/optuna.db. Workers that share a study name one URL.
    storage: str | None = None
    study_name: str = "transfer"
    # The search space in Hydra's sweep syntax: `optimizer.lr: tag(log, interval(1e-5, 1e-2))`, `strategy.r: choice(4, 8)`.
    params: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="transfer")
