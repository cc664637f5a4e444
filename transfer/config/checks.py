"""check_config: the checks the schema cannot express (ranges and combinations of values, and what the run
will read), each group's from its own module; and the chain of runs that init_from starts from.

Called for every job of a command line before anything runs (config.compose.check_command_line), and by
each job again. Torch-free, like the whole of config/.
"""

import math
import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from transfer.config import benchmarks, data, folders, hardware, objective, optimizer, preflight, strategy
from transfer.config.model import model_difference, model_shape
from transfer.config.objective import OBJECTIVES
from transfer.config.strategy import STRATEGIES
from transfer.errors import TransferError

# the settings that seed a generator; numpy's take 0..2**32-1, the data stream's torch generator seed x 100,003
SEEDS = ("seed", "dataset.split_seed", "model.tiny.seed", "strategy.init_seed")
MAX_SEED = 2**32 - 1


def torchrun_processes() -> int:
    """The processes torchrun started for this job (its WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_config(cfg: DictConfig, processes: int | None = None) -> None:
    """Checks the schema cannot express: ranges and combinations of values, and what the run will read.

    `processes`: how many processes share each job (config.compose.processes_per_job); None: torchrun's."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise TransferError(f"{missing[0]} must be set (it has no default for this choice)")
    check_finite(cfg)
    check_counts(cfg)
    check_processes(cfg, processes)
    optimizer.check_optimizer(cfg)
    data.check_dataset(cfg)
    check_evaluation(cfg)
    folders.check_resume(cfg.resume)
    hardware.check_hardware_values(cfg.hardware)
    objective.check_objective(cfg)
    check_init_from(cfg)
    check_cache_folders(cfg)
    hardware.check_hardware(cfg)
    check_inputs(cfg)
    check_trackers(cfg.logging)


# the trackers of logging.loggers that install as extras of ours: name -> the module it imports
TRACKER_EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(settings: DictConfig) -> None:
    """A tracker whose library is not installed is refused in one line naming its extra, before anything runs (it
    would fail only when the run opens its loggers, after the model loaded)."""
    for kind in settings.loggers:
        name = getattr(kind, "value", kind)  # an Enum of the schema
        if name in TRACKER_EXTRAS and not preflight.installed(TRACKER_EXTRAS[name]):
            raise TransferError(
                f'logging.loggers names {name}, which needs the {name} extra: pip install -e ".[{name}]"'
            )


def check_counts(cfg: DictConfig) -> None:
    """The run's own counts and seeds."""
    for key in ("micro_batch_size", "grad_accum_steps", "eval_batch_size", "log_interval"):
        if cfg[key] < 1:
            raise TransferError(f"{key}={cfg[key]} must be at least 1")
    if cfg.block_size < 2:
        raise TransferError(f"block_size={cfg.block_size} must be at least 2 (a token, and the next one to predict)")
    for key in SEEDS:
        seed = OmegaConf.select(cfg, key)
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise TransferError(f"{key}={seed}: allowed an integer 0..{MAX_SEED} (numpy's seeds)")
    if cfg.eval_interval < 0:
        raise TransferError(f"eval_interval={cfg.eval_interval} must be 0 (off) or a positive step count")


def check_processes(cfg: DictConfig, processes: int | None) -> None:
    """A job's processes share each step's micro-batches (torchrun's, or a submitit job's tasks); FSDP shards
    full fine-tuning, not a peft adapter."""
    if cfg.distributed.name == "fsdp" and STRATEGIES[cfg.strategy.name].peft:
        raise TransferError(
            f"distributed=fsdp shards full fine-tuning; strategy={cfg.strategy.name} trains small adapters: "
            "allowed: distributed=ddp or auto"
        )
    where = " (hydra.launcher.tasks_per_node x nodes)" if processes and processes != torchrun_processes() else ""
    processes = processes or torchrun_processes()
    if cfg.grad_accum_steps % processes:
        micro, accum = cfg.micro_batch_size, cfg.grad_accum_steps
        same = f", e.g. micro_batch_size={micro // processes} grad_accum_steps={accum * processes} for the same batch"
        raise TransferError(
            f"grad_accum_steps={accum} does not divide among {processes} processes{where}, which share each step's "
            f"micro-batches; allowed: a multiple of {processes}{same if micro % processes == 0 else ''}"
        )


def check_evaluation(cfg: DictConfig) -> None:
    """What evaluation scores, when training stops early, and how checkpoints are kept."""
    if cfg.eval.max_new_tokens < 1:
        raise TransferError(f"eval.max_new_tokens={cfg.eval.max_new_tokens} must be at least 1")
    if cfg.eval.cka_blocks < 1:
        raise TransferError(f"eval.cka_blocks={cfg.eval.cka_blocks} must be at least 1")
    stop = cfg.early_stopping
    if stop.patience < 0 or stop.min_delta < 0:
        raise TransferError(
            f"early_stopping.patience={stop.patience}, min_delta={stop.min_delta}: allowed patience >= 0 (0: off), min_delta >= 0"
        )
    if stop.patience and not cfg.eval_interval:
        raise TransferError(
            f"early_stopping.patience={stop.patience} needs validation during training; set eval_interval > 0"
        )
    if cfg.checkpoint.interval < 0 or cfg.checkpoint.keep < 1:
        raise TransferError(
            f"checkpoint.interval={cfg.checkpoint.interval}, keep={cfg.checkpoint.keep}: allowed interval >= 0 (0: at the end), keep >= 1"
        )
    for key, cap in (
        ("eval.max_tokens", cfg.eval.max_tokens),
        *((f"eval.probes.{name}.max_tokens", probe.max_tokens) for name, probe in cfg.eval.probes.items()),
    ):
        if cap is not None and cap < 2:
            raise TransferError(f"{key}={cap}: allowed 2 or more, or null for every token")


def check_finite(node: DictConfig, prefix: str = "") -> None:
    """No setting means nan or infinity, and both pass the range checks (every comparison with nan is false):
    the run would fail hours later, or train on nonsense."""
    for key in node.keys():
        try:
            value = node[key]
            if isinstance(value, ListConfig):
                value = list(value)
        except InterpolationResolutionError:  # ${hydra:...} before Hydra runs: a path, not a number
            continue
        if isinstance(value, DictConfig) and not (prefix == "" and key == "hydra"):
            check_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise TransferError(f"{prefix}{key}={value}: allowed a finite number")
        elif isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise TransferError(f"{prefix}{key}={value}: allowed finite numbers")


def check_init_from(cfg: DictConfig) -> None:
    """init_from names a completed run of the same model, with its final weights on disk; so does every run it
    started from in turn (its own init_from): the chain is loaded oldest first (restore.load_parent)."""
    if cfg.init_from is None:
        return
    where = f"init_from={cfg.init_from!r}"
    for number, (folder, parent) in enumerate(init_from_chain(Path(cfg.init_from).expanduser(), where)):
        that = "that run" if number == 0 else f"its ancestor {folder}"
        difference = model_difference(parent.get("config") or {}, cfg)
        if difference:
            key, theirs, ours = difference
            if key == "model.name_or_path":
                raise TransferError(f"{where}: {that} trained model {theirs!r}, this one loads {ours!r}")
            raise TransferError(
                f"{where}: {that} trained {key}={theirs!r}, this one has {key}={ours!r}: its weights would fill only "
                "part of this model; allowed: a run of the same model"
            )
        row = STRATEGIES.get((parent.get("config") or {}).get("strategy", {}).get("name"))
        if row is not None and row.four_bit:
            raise TransferError(
                f"{where}: {that} is a QLoRA run, whose adapter cannot be merged into 4-bit weights here; "
                "allowed: other runs"
            )


def check_cache_folders(cfg: DictConfig) -> None:
    """The folders a job keeps shared work in can be written in: found now, not after the work is done."""
    if cfg.cache.enabled and cfg.cache.dir:
        preflight.check_writable_folder(Path(cfg.cache.dir), "cache.dir")
    if cfg.objective.get("precompute_reference"):
        preflight.check_writable_folder(Path(cfg.objective.reference_cache), "objective.reference_cache")


def init_from_chain(folder: Path, where: str) -> list[tuple[Path, dict]]:
    """The completed run in `folder` and the runs it started from, newest first: [(folder, record), ...].

    A run's parent is the folder its record's `init_from.run` names (whole since records say so), else its config's
    init_from as it was given (relative to where that run was started: found from here only if the same)."""
    chain: list[tuple[Path, dict]] = []
    while folder is not None:
        if any(folder.resolve() == seen.resolve() for seen, _ in chain):
            raise TransferError(f"{where}: the runs' init_from lead back to {folder}; allowed: a chain without a loop")
        that = f"{chain[-1][0]} started from {folder} (its init_from), and that run" if chain else "that run"
        record = folders.read_previous(folder) if folder.is_dir() else None
        if record is None and chain:
            raise TransferError(
                f"{where}: {chain[-1][0]} started from {folder} (its init_from), which holds no run as seen from here; "
                "allowed: a chain of completed runs whose folders are where they were"
            )
        if record is None:
            raise TransferError(f"{where}: no run there (no metrics.json); allowed: the folder of a completed run")
        if record.get("status") != "completed":
            raise TransferError(f"{where}: {that} is {record.get('status')}, not completed; allowed: a completed run")
        chain.append((folder, record))
        linked = (record.get("init_from") or {}).get("run") or (record.get("config") or {}).get("init_from")
        folder = Path(linked).expanduser() if linked else None
    return chain


def check_pairs_for_select(cfg: DictConfig) -> None:
    """An unpaired objective's (KTO's) reward_accuracy and margin compare a pair's answers: the validation rows
    must be pairs.

    The files passed the check with unpaired rows allowed; failing it with pairs alone, they hold unpaired rows.
    Data from the hub is known only once read: the loop says so then (train.py)."""
    split = "validation" if cfg.dataset.validation_files else "train"  # no validation files: carved from training's
    where = f"dataset.{split}_files"
    try:
        pairs = OBJECTIVES[cfg.objective.name].fields(cfg.dataset, unpaired=False)
        preflight.check_data_files(cfg.dataset[f"{split}_files"], where, pairs)
    except TransferError:
        raise TransferError(
            f"objective.select={cfg.objective.select} compares the two answers of a pair, and {where} holds "
            "unpaired rows (prompt, completion, label); allowed with them: objective.select=loss"
        ) from None


def check_inputs(cfg: DictConfig) -> None:
    """The files the run will read, and the model's depth and context against the settings."""
    row = OBJECTIVES[cfg.objective.name]
    if "train_files" in cfg.dataset:
        needs = row.fields(cfg.dataset)
        for split in ("train", "validation", "test"):
            where = f"dataset.{split}_files"
            preflight.check_data_files(cfg.dataset[f"{split}_files"], where, needs, cfg.dataset.build_hint,
                                       labels=data.label_fields(cfg.dataset))  # fmt: skip
        if row.unpaired and cfg.objective.select != "loss":
            check_pairs_for_select(cfg)
    if cfg.dataset.replay and cfg.dataset.replay_source != "python_docs":
        preflight.check_data_files(
            list(cfg.dataset.replay_source), "dataset.replay_source", [(cfg.dataset.text_field,)]
        )
    data.check_probes(cfg.eval.probes)
    benchmarks.check_benchmarks(cfg.eval.benchmarks)
    # a dry run reads no weights; a 4-bit strategy's does (QLoRA's 4-bit layers come from real weights)
    weights = not cfg.dry_run or STRATEGIES[cfg.strategy.name].four_bit
    depth, context = model_shape(cfg.model, weights=weights)
    where = cfg.model.name_or_path or "tiny"
    if context is not None and cfg.block_size > context:
        raise TransferError(
            f"block_size={cfg.block_size} exceeds the context of {where} ({context} tokens); allowed: 1..{context}"
        )
    strategy.check_strategy(cfg.strategy, depth)
