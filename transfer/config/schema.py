"""The structured-config schema: every key, type and allowed value of a run.

Hydra merges each YAML file of `conf/` into these dataclasses, so an unknown key,
a wrong type or an unknown enum value fails while the config is composed, before
anything is loaded. Each group's classes live beside its checks (config/model.py,
strategy.py, objective.py, data.py, hardware.py, optimizer.py); options of one group
that need different keys (LoRA's rank, SGD's momentum) get their own subclass, listed
in the group's SCHEMA, stored under `schema/<group>/<option>` and named in the defaults
list of that option's YAML file. This module holds the run's own sections and the top Config.

Importing this module registers the schema and the `${corpus:...}` resolver; it
imports neither torch nor transformers, so the checks stay fast.
"""

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from transfer.config import data, hardware, model, objective, optimizer, strategy
from transfer.config.benchmarks import BenchmarkConfig
from transfer.config.data import DatasetConfig, ProbeConfig
from transfer.config.hardware import HardwareConfig
from transfer.config.model import ModelConfig
from transfer.config.objective import ObjectiveConfig
from transfer.config.optimizer import OptimizerConfig
from transfer.config.strategy import StrategyConfig

CORPORA_DIR = Path(__file__).resolve().parents[1] / "corpora"
GROUPS = ("model", "strategy", "objective", "dataset", "hardware", "optimizer")


class FinalWeights(Enum):
    best = "best"
    last = "last"


# ---------------------------------------------------------------- evaluation
@dataclass
class EvalConfig:
    # Forgetting probes by name, each scored before and after training: the group eval/probes, a list
    # (eval/probes=[python_docs,wikitext,instructions]); record and tables call each ref_<name>.
    probes: dict[str, ProbeConfig] = field(default_factory=dict)
    # Standard benchmarks by name, each scored before and after training through lm-evaluation-harness: the group
    # eval/benchmarks, a list (eval/benchmarks=[arc_easy,piqa]); record and tables call each bench_<name>.
    benchmarks: dict[str, BenchmarkConfig] = field(default_factory=dict)
    # Score only the first N tokens of the validation and test splits (the same ones before,
    # during and after training), for quick checks on big splits; null = every token.
    max_tokens: int | None = None
    # New tokens generated greedily for each of dataset.prompts.
    max_new_tokens: int = 32
    # Weights of the final evaluation: the best by objective.select on the validation split (its loss unless
    # set otherwise), or the last.
    weights: FinalWeights = FinalWeights.best
    # After training, linear CKA between the base and the tuned model at each block's output, on the
    # first cka_blocks validation sequences (record: diagnostics.cka; the weight change is always there).
    cka: bool = False
    cka_blocks: int = 4


@dataclass
class EarlyStoppingConfig:
    # Stop after this many validations without improvement (0: never stop early).
    patience: int = 0
    # An improvement must move objective.select's validation value (the loss unless set otherwise) by more than
    # this, in its better direction (loss falls, auc rises).
    min_delta: float = 0.0


@dataclass
class CheckpointConfig:
    enabled: bool = True
    # Save every N optimizer steps (0: only at the end).
    interval: int = 0
    # Step checkpoints kept on disk (the best weights are kept apart).
    keep: int = 2
    # Non-peft strategies save their trainable weights; true saves the whole model.
    full_model: bool = False


# ---------------------------------------------------------------- several processes
@dataclass
class DistributedConfig:
    # auto | ddp | fsdp: how torchrun's processes share one job (transfer/training/distributed.py)
    name: str = MISSING


# ---------------------------------------------------------------- search
@dataclass
class SearchConfig:
    """The Optuna trial a job is (hydra/sweeper=optuna sets all three for each job; null outside a search).

    The job reports its validation metric to the trial at every eval_interval and stops when
    the study's pruner says so (transfer/training/pruning.py).
    """

    trial: int | None = None  # the trial's number in the study
    study: str | None = None
    storage: str | None = None  # the study's database URL, e.g. sqlite:///<sweep>/optuna.db


# ---------------------------------------------------------------- cache
@dataclass
class CacheConfig:
    """A sweep's shared work: tokens and the untrained model's scores, done once (transfer/cache.py)."""

    enabled: bool = True
    dir: str | None = None  # null: <sweep>/.cache in a sweep, nothing for a single run


# ---------------------------------------------------------------- logging
class Logger(Enum):  # transfer.training.loggers.LOGGERS: the class of each
    tensorboard = "tensorboard"
    mlflow = "mlflow"  # the mlflow extra
    wandb = "wandb"  # the wandb extra


@dataclass
class MlflowConfig:
    # null: sqlite:///mlflow.db in the folder `python -m transfer` ran in (MLflow's own default, which `mlflow ui`
    # started there opens); or a server (http://host:5000) or another store
    tracking_uri: str | None = None
    experiment: str | None = None  # null: the sweep's folder for a sweep's jobs, "single runs" for the others


@dataclass
class WandbConfig:  # offline unless WANDB_MODE says otherwise; `wandb sync` uploads later
    project: str = "transfer"
    entity: str | None = None


@dataclass
class LoggingConfig:
    # Where curves and summaries go, rank 0 only: several at once, or [] for none (metrics.json is always written).
    loggers: list[Logger] = field(default_factory=lambda: [Logger.tensorboard])
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ---------------------------------------------------------------- the run
@dataclass
class Config:
    model: ModelConfig = MISSING
    strategy: StrategyConfig = MISSING
    objective: ObjectiveConfig = MISSING
    dataset: DatasetConfig = MISSING
    hardware: HardwareConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    distributed: DistributedConfig = MISSING

    seed: int = 1234
    # Training length: optimizer steps, epochs over the training blocks, or both
    # (whichever ends first).
    max_steps: int | None = 200
    epochs: float | None = None
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    block_size: int = 128
    # Validate every N optimizer steps (0: only before and after training).
    eval_interval: int = 50
    eval_batch_size: int = 16
    # Log the training loss to TensorBoard every N optimizer steps.
    log_interval: int = 10
    # Build the model on the meta device (shapes, no weights), apply the strategy,
    # write the record with the counts, stop.
    dry_run: bool = False

    eval: EvalConfig = field(default_factory=EvalConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Start from another run's final weights (its best or last, as it evaluated): a folder of a
    # completed run of the same model; a LoRA parent's adapter is merged into the base first.
    init_from: str | None = None
    # Continue a killed run: true = from the last checkpoint in the run's own folder
    # (a completed run is skipped), or the path of a run folder or checkpoint.
    resume: Any = False
    # After a sweep, write its comparison tables and plots into <sweep>/tables/.
    tables_after_sweep: bool = True
    search: SearchConfig = field(default_factory=SearchConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# the schema classes of each group's options (schema/<group>/<option>), named in the options' YAML files
NODES = {
    "model": model.SCHEMA,
    "strategy": strategy.SCHEMA,
    "objective": objective.SCHEMA,
    "dataset": data.SCHEMA,
    "hardware": hardware.SCHEMA,
    "distributed": {"base": DistributedConfig},
    "optimizer": optimizer.SCHEMA,
}


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, options in NODES.items():
        for option, node in options.items():
            cs.store(group=f"schema/{group}", name=option, node=node)
    if not OmegaConf.has_resolver("corpus"):
        # ${corpus:rust_concepts/train.jsonl} -> a file shipped inside the package
        OmegaConf.register_new_resolver("corpus", lambda rel: str(CORPORA_DIR / rel))


register()
