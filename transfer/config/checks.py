"""Fail fast: check a command line and a composed config before anything heavy runs.

`check_command_line` composes the config of every job a command line would launch
(each combination of a sweep), so a typo in the last value of a sweep stops the
sweep at start-up, not an hour in. Hydra's and OmegaConf's multi-line errors are
turned into one line that names the bad key or value and what is allowed.
It also decides, before Hydra writes into an output folder, whether that folder may
be written: a finished run is never overwritten, a resumed one must be resumed under
the config it was made with.
This module must not import torch or transformers: it runs in well under a second.
"""

import dataclasses
import importlib.util
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    ValidationError,
)

from transfer.config import preflight, schema
from transfer.data.sources import PYTHON_DOCS_PARTS, label_fields
from transfer.errors import TransferError, first_line
from transfer.record import read_record
from transfer.sweep import search
from transfer.training import distributed

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MAX_SWEEP_JOBS_CHECKED = 512
# settings a resumed run may change: they do not alter what is trained (loss chunks change
# only the order of float sums, and runs from before their default changed must resume)
FREE_ON_RESUME = (
    "resume", "tables_after_sweep", "checkpoint", "dry_run", "eval_batch_size", "log_interval",
    "hardware.loss_chunk_tokens", "hardware.attention", "hardware.compile", "hardware.compile_mode", "hardware.kernels",
    "distributed", "search", "eval.cka", "eval.cka_blocks", "cache", "hardware.memory_check",
)  # fmt: skip
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# what strategy.modules_to_save may name, whatever the architecture calls them
MODULE_ROLES = ("head", "embeddings")
# Hydra's launcher plugins that install as extras of ours: launcher -> (extra, the modules it brings)
LAUNCHER_EXTRAS = {
    "ray": ("ray", ("hydra_plugins.hydra_ray_launcher", "ray")),
    "ray_aws": ("ray", ("hydra_plugins.hydra_ray_launcher", "ray")),
    "submitit_local": ("slurm", ("hydra_plugins.hydra_submitit_launcher", "submitit")),
    "submitit_slurm": ("slurm", ("hydra_plugins.hydra_submitit_launcher", "submitit")),
}
# launcher settings that are open dicts of keyword arguments (ray.init(), @ray.remote, sbatch options):
# Hydra adds a key there only when written +key=value, so a plain key=value is passed on as ++key=value
OPEN_LAUNCHER_DICTS = ("hydra.launcher.ray.init.", "hydra.launcher.ray.remote.", "hydra.launcher.additional_parameters.")  # fmt: skip
# the settings that seed a generator; numpy's take 0..2**32-1, the data stream's torch generator seed x 100,003
SEEDS = ("seed", "dataset.split_seed", "model.tiny.seed", "strategy.init_seed")
MAX_SEED = 2**32 - 1
# keys that were renamed: (option's schema class, old key) -> new key
RENAMED = {
    (schema.FreezeLowerConfig, "n_layers"): "frozen_blocks",
    (schema.AdapterConfig, "n_layers"): "trained_blocks",
}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@dataclass
class Plan:
    """What a checked command line will do: where it writes, and its jobs' configs (the first 512)."""

    out_dir: Path
    multirun: bool
    jobs: int
    configs: list[DictConfig]
    # the command line as Hydra should get it (see hydra_overrides)
    argv: list[str]
    # job N of the sweep goes to sub-folder N (Hydra's default hydra.sweep.subdir)
    by_number: bool = True

    @property
    def resume(self):
        return self.configs[0].resume

    def check_folder(self) -> None:
        """May the output folder be written? Call it holding the folder's lock (transfer.sweep.lock)."""
        if self.multirun:
            check_sweep_dir(self.out_dir, self.resume, self.configs if self.by_number else [])
        else:
            check_run_dir(self.out_dir, self.resume, self.configs[0])


def check_command_line(argv: list[str]) -> Plan | None:
    """Raise TransferError if any job of this command line has a bad config; None for Hydra's own flags."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.cfg:
        return None
    if args.config_path or args.config_dir or args.config_name not in (None, "config"):
        return None  # a config tree of the user's own: Hydra reports on it
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(args.overrides)
    except Exception as e:  # Hydra's grammar errors
        raise TransferError(f"cannot parse overrides {args.overrides}: {first_line(e)}") from None
    for o in parsed:
        if "_target_" in o.input_line:
            raise TransferError(
                f"override {o.input_line!r} sets _target_, which would call any Python function; "
                "allowed: config group choices and values of known keys"
            )
        if o.key_or_group == "hydra/launcher" and isinstance(o.value(), str):
            check_launcher(o.value())
    opened = {o.input_line: f"++{o.input_line}" for o in parsed if _adds_launcher_key(o)}
    if opened:
        argv = [opened.get(a, a) for a in argv]
        args.overrides = [opened.get(a, a) for a in args.overrides]
        parsed = parser.parse_overrides(args.overrides)
    # One composition for what Hydra itself reads (output folders, a preset's sweep params).
    # It takes group choices and hydra settings only: a key of a group the command line sweeps
    # (strategy=lora,dora strategy.r=8) is judged in each job, against that job's option.
    preliminary = [o.input_line for o in parsed if not o.is_sweep_override() and _is_group_or_hydra(o)]
    run = compose_config(preliminary, with_hydra=True)
    check_ray_gpus(run)
    jobs = [list(args.overrides)]
    swept = []
    searching = search.is_search(run)
    if searching:  # hydra/sweeper=optuna draws the trials' values as it runs: every value it may draw is checked
        parsed, jobs, swept = search.check_command_line(run, parsed, args.multirun, compose_config, _is_group)
    elif args.multirun:  # sweeps set in a config (hydra.sweeper.params) count as much as the command line's
        given = {o.get_key_element() for o in parsed}
        params = run.hydra.sweeper.get("params") or {}
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items() if k not in given] + args.overrides)
        jobs = BasicSweeper.split_arguments(overrides, None)[0]
        swept = [o.key_or_group for o in overrides if o.is_sweep_override() and _is_group_or_hydra(o)]
    configs = [compose_config(overrides) for overrides in jobs[:MAX_SWEEP_JOBS_CHECKED]]
    processes = distributed.processes_per_job(run)
    for cfg in configs:
        check_config(cfg, processes)
    # the folder is pinned: a ${now:...} in its name must not move on to the next second before Hydra reads it
    key, out_dir = ("hydra.sweep.dir", run.hydra.sweep.dir) if args.multirun else ("hydra.run.dir", run.hydra.run.dir)
    pinned = "'" + str(out_dir).replace("\\", "\\\\").replace("'", "\\'") + "'"
    argv = [a for a in argv if a not in args.overrides] + hydra_overrides(parsed, swept) + [f"{key}={pinned}"]
    if args.multirun:
        by_number = OmegaConf.to_container(run.hydra.sweep, resolve=False).get("subdir") == "${hydra.job.num}"
        if searching:  # a trial's folder holds whatever values the study drew for it: each job checks itself
            return Plan(Path(out_dir), True, run.hydra.sweeper.n_trials, configs, argv, by_number=False)
        return Plan(Path(out_dir), True, len(jobs), configs, argv, by_number)
    return Plan(Path(out_dir), False, 1, configs, argv)


def hydra_overrides(parsed, swept_groups: list[str]) -> list[str]:
    """The overrides as Hydra must get them to run what check_command_line checked.

    Hydra composes a sweep-level config from the overrides that sweep nothing, with each swept
    group at its default: a key of a swept group (strategy=lora,dora strategy.r=8) fails there,
    against the default option. Every job was checked against its own option already, so such
    a key goes to Hydra as a sweep of one value (strategy.r=choice(8)), applied in each job.
    """
    prefixes = tuple(group.replace("/", ".") + "." for group in swept_groups)
    return [
        f"{o.get_key_element()}=choice({o.get_value_element_as_str()})"
        if not o.is_sweep_override() and o.key_or_group.startswith(prefixes) and not o.is_delete()
        else o.input_line
        for o in parsed
    ]


def check_launcher(name: str) -> None:
    """A launcher whose plugin is not installed is refused in one line, before anything runs."""
    missing = missing_launcher(name)
    if missing:
        raise TransferError(missing)


def missing_launcher(name: str) -> str | None:
    """The line naming the extra that brings launcher `name`, if it is one of those and not installed."""
    if name not in LAUNCHER_EXTRAS:
        return None  # Hydra's own, or unknown: composing the config names the ones there are
    extra, modules = LAUNCHER_EXTRAS[name]
    if all(preflight.installed(m) for m in modules):
        return None
    return f'hydra/launcher={name} needs the {extra} extra: pip install -e ".[{extra}]"'


def check_ray_gpus(run: DictConfig) -> None:
    """Ray's local cluster queues a job that asks for a GPU until one appears: on a machine without one, forever."""
    ray = run.hydra.launcher.get("ray")
    init = (ray or {}).get("init", {})
    if not ray or init.get("address") is not None or init.get("num_gpus") is not None:
        return  # not Ray, a cluster elsewhere with GPUs of its own, or GPUs declared to Ray by hand
    gpus = ray.get("remote", {}).get("num_gpus") or 0
    if gpus > 0 and preflight.cuda_available() is False:
        raise TransferError(
            f"hydra.launcher.ray.remote.num_gpus={gpus} but this machine has no CUDA GPU, and Ray's local cluster "
            "would queue every job forever; allowed here: 0, or hydra.launcher.ray.init.address=<a cluster with GPUs>"
        )


def _adds_launcher_key(o) -> bool:
    return o.type == OverrideType.CHANGE and o.key_or_group.startswith(OPEN_LAUNCHER_DICTS)


def _is_group_or_hydra(o) -> bool:
    key = o.key_or_group
    return key.startswith("hydra") or _is_group(key)


def _is_group(key: str) -> bool:
    return (CONF_DIR / key.lstrip("+~")).is_dir()


def compose_config(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """Compose the run config as `python -m transfer` would, with one-line errors; every key must be in the schema."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose("config", overrides=list(overrides), return_hydra_config=with_hydra)
        except Exception as e:
            raise TransferError(explain(e)) from None
    check_keys(cfg)
    return cfg


def check_keys(node: DictConfig, prefix: str = "") -> None:
    """Every key is one the schema knows: `+key=value` adds keys Hydra does not check."""
    object_type = OmegaConf.get_type(node)
    allowed = _fields(object_type)
    for key in node.keys():
        if prefix == "" and key == "hydra":
            continue
        if allowed and key not in allowed:
            raise TransferError(unknown_key(f"{prefix}{key}", object_type))
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_keys(child, f"{prefix}{key}.")


class AlreadyDone(Exception):
    """The run asked for is complete: nothing to do (resume=true on a finished run)."""


def check_run_dir(run_dir: Path, resume, cfg: DictConfig) -> None:
    """Hydra rewrites .hydra/ in the run folder before the job starts: decide here, not in the job.

    The caller holds the folder's lock (transfer.sweep.lock), so no other process is writing in it.
    """
    previous = read_previous(run_dir)
    if resume is True:
        if previous is None and not (run_dir / "checkpoints").is_dir():
            raise TransferError(f"resume=true but {run_dir} holds no run; name it: hydra.run.dir=<the run folder>")
        if previous is None:  # checkpoints without their record: each checkpoint's config is compared (checkpoint.py)
            return
        if previous.get("status") == "completed":
            raise AlreadyDone(f"{run_dir} holds a completed run: nothing to resume")
        if isinstance(previous.get("config"), dict):
            refuse_differences(previous["config"], cfg, f"resume: {run_dir} was run with", "this run has")
    elif previous is not None:
        raise TransferError(
            f"{run_dir} already holds a run (status {previous.get('status')}); "
            "continue it with resume=true, or choose another output folder (hydra.run.dir)"
        )


def check_sweep_dir(sweep_dir: Path, resume, configs: list[DictConfig]) -> None:
    """A sweep folder holding jobs is resumed under the configs its jobs ran with, or not at all.

    `configs` are the new sweep's jobs in Hydra's order (job N in sub-folder N); empty when the
    sub-folders are named otherwise, and each job then checks itself (run.run_experiment).
    """
    if not sweep_dir.is_dir():
        return
    if resume is not True:
        if any((job / "metrics.json").is_file() for job in sweep_dir.iterdir() if job.is_dir()):
            raise TransferError(
                f"{sweep_dir} already holds a sweep; continue it with resume=true, or choose another hydra.sweep.dir"
            )
        return
    for number, cfg in enumerate(configs):
        previous = read_previous(sweep_dir / str(number))
        if previous and isinstance(previous.get("config"), dict):
            refuse_differences(
                previous["config"], cfg, f"resume: job {number} of {sweep_dir} ran with", "this sweep gives it"
            )


def read_previous(folder: Path) -> dict | None:
    try:
        return read_record(folder)
    except ValueError as e:
        raise TransferError(
            f"{folder / 'metrics.json'} is unreadable ({e}); move it away to run or resume in this folder"
        ) from None


def refuse_differences(saved: dict, cfg: DictConfig, then: str, now: str) -> None:
    differences = config_differences(saved, cfg)
    if differences:
        key, old, new = differences[0]
        raise TransferError(
            f"{then} {key}={old!r}, {now} {key}={new!r} ({len(differences)} difference(s)); "
            "repeat the interrupted command's overrides and add resume=true"
        )


def resumable_config(cfg) -> dict:
    """The run's config as far as it decides the training, for comparison on resume."""
    return _rate_used(_without_free_settings(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))


def config_differences(saved: dict, cfg) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for each setting that decides the training and differs."""
    # the saved config may hold settings made free on resume since it was written
    return _differences(_rate_used(_without_free_settings(saved)), resumable_config(cfg))


def _rate_used(config: dict) -> dict:
    """optimizer.lr as the rate used, strategy.lr dropped: the same training compares equal however its rate was
    given, and a config saved before strategies had rates of their own compares with today's."""
    if isinstance(config.get("optimizer"), dict) and isinstance(config.get("strategy"), dict):
        config["optimizer"]["lr"] = schema.learning_rate(config)[0]
        config["strategy"].pop("lr", None)
    return config


def _without_free_settings(config: dict) -> dict:
    for key in ("hydra", *FREE_ON_RESUME):
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return config


def _differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in dict.fromkeys([*a, *b]):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def explain(e: BaseException) -> str:
    """One line naming the bad key or value and what is allowed."""
    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not find '(.+)/([^/']+)'", str(e))
        if m and (CONF_DIR / m.group(1)).is_dir():
            group, value = m.groups()
            return f"unknown {group} '{value}'; allowed: {', '.join(group_options(group))}"
        if m and m.group(1) == "hydra/launcher" and missing_launcher(m.group(2)):  # chosen in a config file
            return missing_launcher(m.group(2))
        options = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)+)", str(e))
        if m and options:  # Hydra's own groups (hydra/launcher, hydra/sweeper, ...)
            return f"unknown {m.group(1)} '{m.group(2)}'; allowed: {', '.join(options.group(1).split())}"
        return first_line(e)
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return unknown_key(key, getattr(cause, "object_type", None))
    if isinstance(cause, (ValidationError, MissingMandatoryValue)) and key:
        return f"{key}: {first_line(cause)}"
    return first_line(e)


def unknown_key(key: str, object_type) -> str:
    *parents, name = key.split(".")
    renamed = RENAMED.get((object_type, name))
    if renamed:
        new = ".".join([*parents, renamed])
        return f"{key} was renamed: write {new}= instead (it names what the number counts)"
    allowed = _fields(object_type)
    hint = f"; allowed keys there: {', '.join(allowed)}" if allowed else ""
    return f"unknown key '{key}'{hint}"


def _fields(object_type) -> list[str]:
    return [f.name for f in dataclasses.fields(object_type)] if dataclasses.is_dataclass(object_type) else []


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


def check_config(cfg: DictConfig, processes: int | None = None) -> None:
    """Checks the schema cannot express: ranges and combinations of values, and what the run will read."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise TransferError(f"{missing[0]} must be set (it has no default for this choice)")
    check_finite(cfg)
    positive = ["micro_batch_size", "grad_accum_steps", "eval_batch_size", "log_interval"]
    for key in positive:
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
    if cfg.distributed.name == "fsdp" and cfg.strategy.name in schema.PEFT_STRATEGIES:
        raise TransferError(
            f"distributed=fsdp shards full fine-tuning; strategy={cfg.strategy.name} trains small adapters: "
            "allowed: distributed=ddp or auto"
        )
    # a job's processes share each step's micro-batches: torchrun's, or a submitit job's tasks
    where = " (hydra.launcher.tasks_per_node x nodes)" if processes and processes != distributed.world_size() else ""
    processes = processes or distributed.world_size()
    if cfg.grad_accum_steps % processes:
        micro, accum = cfg.micro_batch_size, cfg.grad_accum_steps
        same = f", e.g. micro_batch_size={micro // processes} grad_accum_steps={accum * processes} for the same batch"
        raise TransferError(
            f"grad_accum_steps={accum} does not divide among {processes} processes{where}, which share each step's "
            f"micro-batches; allowed: a multiple of {processes}{same if micro % processes == 0 else ''}"
        )
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
    if not 0 <= cfg.dataset.holdout_fraction < 1:
        raise TransferError(f"dataset.holdout_fraction={cfg.dataset.holdout_fraction} must be in [0, 1)")
    check_replay(cfg)
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
    if not isinstance(cfg.resume, (bool, str)) and cfg.resume is not None:
        raise TransferError(f"resume={cfg.resume!r}: allowed true, false, or the path of a run folder or checkpoint")
    for key, cap in (
        ("eval.max_tokens", cfg.eval.max_tokens),
        *((f"eval.probes.{name}.max_tokens", probe.max_tokens) for name, probe in cfg.eval.probes.items()),
    ):
        if cap is not None and cap < 2:
            raise TransferError(f"{key}={cap}: allowed 2 or more, or null for every token")
    if isinstance(cfg.resume, str):
        path = Path(cfg.resume).expanduser()
        if not path.exists():
            raise TransferError(
                f"resume={cfg.resume!r}: no such folder; allowed: true, or a run folder or checkpoint folder"
            )
        # a checkpoint folder holds the trainer state (transfer.training.checkpoint.STATE_FILE); a run folder holds them
        if not (path / "trainer_state.pt").is_file() and not any(path.glob("checkpoints/step-*/trainer_state.pt")):
            raise TransferError(
                f"resume={cfg.resume!r}: no checkpoint there; allowed: true, a run folder with checkpoints/, "
                "or a checkpoint folder"
            )
    threads = cfg.hardware.num_threads
    if threads is not None and threads < 1:
        raise TransferError(f"hardware.num_threads={threads} must be at least 1 (or null for torch's default)")
    if cfg.hardware.loss_chunk_tokens < 0:
        raise TransferError(
            f"hardware.loss_chunk_tokens={cfg.hardware.loss_chunk_tokens}: allowed 0 (off) or a positive number of tokens"
        )
    limit = cfg.hardware.memory_limit
    if limit is not None and not limit > 0:
        raise TransferError(f"hardware.memory_limit={limit} must be a positive number of GiB (or null: what is free)")
    check_objective(cfg)
    check_init_from(cfg)
    check_cache_folders(cfg)
    check_hardware(cfg)
    check_inputs(cfg)


def check_replay(cfg: DictConfig) -> None:
    """dataset.replay: a fraction for objective lm; its source python_docs or files that no probe scores."""
    replay, source = cfg.dataset.replay, cfg.dataset.replay_source
    if not 0 <= replay < 1:
        raise TransferError(f"dataset.replay={replay}: allowed a fraction of the training rows in [0, 1)")
    if replay and cfg.objective.name != "lm":
        raise TransferError(
            f"dataset.replay={replay} mixes blocks of text into objective=lm's training; "
            f"objective={cfg.objective.name} allows only 0"
        )
    files = list(source) if OmegaConf.is_list(source) else None
    if source != "python_docs" and not (files and all(isinstance(f, str) for f in files)):
        raise TransferError(
            f"dataset.replay_source={source!r}: allowed python_docs, or a list of .txt/.jsonl/.json/.csv/.parquet files"
        )
    for name, probe in cfg.eval.probes.items() if replay else ():
        shared = sorted(_resolved(files or []) & _resolved(list(probe.files)))
        if shared:
            raise TransferError(
                f"dataset.replay_source holds {shared[0]}, which probe {name!r} scores; allowed: text that no probe scores"
            )
        if source == "python_docs" and probe.source.value == "python_docs" and probe.part != "heldout":
            raise TransferError(
                f"dataset.replay_source=python_docs trains on topics that probe {name!r} scores (part={probe.part}); "
                "allowed: that probe's part=heldout, or replay files"
            )


def _resolved(paths: list[str]) -> set[str]:
    return {str(Path(p).expanduser().resolve()) for p in paths}


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


def check_hardware(cfg: DictConfig) -> None:
    """A GPU where the config needs one, no fp16 on the CPU, what compiling and the attention kernel need,
    asked without importing torch."""
    hw = cfg.hardware
    device, precision, attention = hw.device.value, hw.precision.value, hw.attention.value
    check_compile(hw)
    flash = attention == "flash_attention_2"
    if flash and device == "cpu":
        raise TransferError(
            "hardware.attention=flash_attention_2 runs on a CUDA GPU, not hardware.device=cpu; allowed there: "
            "auto, sdpa, eager"
        )
    if flash and importlib.util.find_spec("flash_attn") is None:
        raise TransferError(
            "hardware.attention=flash_attention_2 needs the flash-attn package, which is not installed here "
            "(pip install flash-attn); allowed without it: auto, sdpa, eager"
        )
    if flash and precision == "fp32":
        raise TransferError(
            "hardware.attention=flash_attention_2 computes in half precision only; allowed with it: "
            "hardware.precision=auto, bf16 or fp16"
        )
    liger = hw.kernels.value == "liger"
    if liger and device == "cpu":
        raise TransferError("hardware.kernels=liger runs Triton kernels on a CUDA GPU, not hardware.device=cpu; "
                            "allowed there: torch")  # fmt: skip
    if liger and (importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None):
        raise TransferError(
            "hardware.kernels=liger needs the liger-kernel package (and triton), which is not installed here "
            "(pip install -e '.[liger]'); allowed without it: torch"
        )
    # the settings that run on a CUDA GPU only, and what is allowed instead
    gpu_only = [(setting, allowed) for setting, on, allowed in (
        ("hardware.attention=flash_attention_2", flash, "auto, sdpa, eager"),
        ("hardware.kernels=liger", liger, "torch"),
    ) if on]  # fmt: skip
    if gpu_only and hw.on_oom.value == "cpu":
        raise TransferError(
            f"hardware.on_oom=cpu would go on on the CPU, where {gpu_only[0][0]} cannot run; allowed with it: fail, "
            "halve"
        )
    if cfg.strategy.name == "qlora" and hw.on_oom.value == "cpu":  # the CPU computes in fp32 (transfer/oom.py)
        raise TransferError(
            "hardware.on_oom=cpu would cast the weights to fp32 on the CPU, and strategy=qlora's 4-bit weights "
            "cannot be cast; allowed with it: fail, halve"
        )
    needs_cuda = device == "cuda" or cfg.strategy.name == "qlora" or bool(gpu_only)
    cuda = preflight.cuda_available() if needs_cuda or device == "auto" else False
    if cuda is not False:
        return
    if gpu_only:
        setting, allowed = gpu_only[0]
        raise TransferError(f"{setting} needs a CUDA GPU and there is none here; allowed: {allowed}")
    if device == "cuda":
        raise TransferError(
            "hardware.device=cuda but no CUDA device is available here; allowed on this machine: auto, cpu"
        )
    if cfg.strategy.name == "qlora":
        raise TransferError(
            "strategy=qlora needs a CUDA GPU (bitsandbytes 4-bit weights) and there is none here; use strategy=lora"
        )
    if precision == "fp16":
        raise TransferError(
            f"hardware.precision=fp16 on the CPU (hardware.device={device}): allowed there fp32 or bf16; "
            "fp16 autocast is slow on CPUs and needs loss scaling"
        )


def check_compile(hw: DictConfig) -> None:
    if hw.compile_mode not in COMPILE_MODES:
        raise TransferError(f"hardware.compile_mode={hw.compile_mode!r}: allowed {', '.join(COMPILE_MODES)}")
    if hw.compile_mode != "default" and not hw.compile:
        raise TransferError(
            f"hardware.compile_mode={hw.compile_mode} has no effect without hardware.compile=true; set both"
        )
    # torch.compile's code generators build C++ (CPU), or Triton's kernel launchers (GPU), with the system's compiler
    compiler = os.environ.get("CXX") or "g++"
    if hw.compile and not any(shutil.which(c) for c in (compiler, "c++", "clang++")):
        raise TransferError(
            f"hardware.compile=true needs a C++ compiler ({compiler}, c++ or clang++, or $CXX) and none is on PATH; "
            "install one or set hardware.compile=false"
        )


def example_fields(dataset: DictConfig) -> list[tuple[str, ...]]:
    """The fields a row of examples must have, one alternative per format (`sft`)."""
    d = dataset
    formats = {
        "prompt_completion": [(d.prompt_field, d.completion_field)],
        "alpaca": [(d.instruction_field, d.output_field)],
        "messages": [(d.messages_field,), ("conversations",)],
    }
    chosen = d.format.value
    return [alt for name, alts in formats.items() if chosen in ("auto", name) for alt in alts]


def preference_fields(dataset: DictConfig, unpaired_allowed: bool) -> list[tuple[str, ...]]:
    """The fields a preference objective's rows must have: pairs, or for KTO unpaired rows too."""
    d = dataset
    pairs = [(d.prompt_field, d.chosen_field, d.rejected_field)]
    return pairs + ([(d.prompt_field, d.completion_field, d.label_field or "label")] if unpaired_allowed else [])


PREFERENCE = ("dpo", "ipo", "kto", "cpo", "orpo", "simpo")
FORMATS = ("prompt_completion", "alpaca", "messages")  # instruction tuning's (data/chat.py)
REFERENCE_FREE = ("cpo", "orpo", "simpo")


def check_objective(cfg: DictConfig) -> None:
    objective, dataset = cfg.objective, cfg.dataset
    allowed = ["loss", "perplexity"]
    if objective.name == "sft" and dataset.choices:
        allowed += ["accuracy", "log_loss"] + (["auc"] if len(dataset.choices) == 2 else [])
    formats = ("auto", "pairs", "unpaired") if objective.name in PREFERENCE else ("auto", *FORMATS)
    if dataset.format.value not in formats:
        raise TransferError(
            f"dataset.format={dataset.format.value} is not for objective={objective.name}; allowed: {', '.join(formats)}"
        )
    if objective.name in PREFERENCE:
        allowed = ["loss"] if dataset.format.value == "unpaired" else ["loss", "reward_accuracy", "margin"]
        check_preference(objective)
    if objective.name == "kto" and cfg.micro_batch_size * cfg.grad_accum_steps == 1:
        raise TransferError(
            "objective=kto with micro_batch_size x grad_accum_steps = 1: its KL estimate pairs each prompt with "
            "another answer of the step, and with one answer a step it is that answer's own reward; allowed: 2 or "
            "more answers a step, e.g. grad_accum_steps=2"
        )
    if objective.select not in allowed:
        choices_hint = "; accuracy, auc and log_loss need dataset.choices" if objective.name == "sft" else ""
        raise TransferError(f"objective.select={objective.select!r}: allowed {', '.join(allowed)}{choices_hint}")
    if dataset.choices is not None:
        stripped = [c.strip() for c in dataset.choices]
        if len(stripped) < 2 or len(set(stripped)) != len(stripped) or not all(stripped):
            raise TransferError(f"dataset.choices={list(dataset.choices)}: allowed two or more different answers")
    if objective.get("samples") is not None and objective.samples < 0:
        raise TransferError(f"objective.samples={objective.samples} must be 0 or more")


def check_preference(o: DictConfig) -> None:
    if o.beta <= 0:
        raise TransferError(f"objective.beta={o.beta} must be positive")
    if not 0 <= o.label_smoothing < 0.5:
        raise TransferError(
            f"objective.label_smoothing={o.label_smoothing}: allowed [0, 0.5) (the share of flipped labels)"
        )
    for key in ("gamma", "lambda_or", "cpo_alpha"):
        if o[key] < 0:
            raise TransferError(f"objective.{key}={o[key]} must be 0 or more")
    if o.desirable_weight <= 0 or o.undesirable_weight <= 0:
        raise TransferError(
            f"objective.desirable_weight={o.desirable_weight}, undesirable_weight={o.undesirable_weight}: both must be positive"
        )
    if o.precompute_reference and o.name in REFERENCE_FREE:
        raise TransferError(f"objective.precompute_reference=true: {o.name} uses no reference model; allowed false")


def check_init_from(cfg: DictConfig) -> None:
    """init_from names a completed run of the same model, with its final weights on disk; so does every run it
    started from in turn (its own init_from): the chain is loaded oldest first (checkpoint.load_parent)."""
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
        if (parent.get("config") or {}).get("strategy", {}).get("name") == "qlora":
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


# what decides a model's weights' names and shapes; dtype, tokenizer and loading options do not
MODEL_IDENTITY = ("name_or_path", "revision", "tiny")


def model_difference(saved: dict, cfg: DictConfig) -> tuple[str, object, object] | None:
    """(key, theirs, ours) of the first setting by which a run's model differs from this config's, or None."""
    ours = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    theirs = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    for key in MODEL_IDENTITY:
        differences = _differences(theirs.get(key), ours.get(key), f"model.{key}.")
        if differences:
            return differences[0]
    return None


def init_from_chain(folder: Path, where: str) -> list[tuple[Path, dict]]:
    """The completed run in `folder` and the runs it started from, newest first: [(folder, record), ...].

    A run's parent is the folder its record's `init_from.run` names (whole since records say so), else its config's
    init_from as it was given (relative to where that run was started: found from here only if the same)."""
    chain: list[tuple[Path, dict]] = []
    while folder is not None:
        if any(folder.resolve() == seen.resolve() for seen, _ in chain):
            raise TransferError(f"{where}: the runs' init_from lead back to {folder}; allowed: a chain without a loop")
        that = f"{chain[-1][0]} started from {folder} (its init_from), and that run" if chain else "that run"
        record = read_previous(folder) if folder.is_dir() else None
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
    """KTO's reward_accuracy and margin compare a pair's answers: the validation rows must be pairs.

    The files passed the check with unpaired rows allowed; failing it with pairs alone, they hold unpaired rows.
    Data from the hub is known only once read: the loop says so then (train.py)."""
    split = "validation" if cfg.dataset.validation_files else "train"  # no validation files: carved from training's
    where = f"dataset.{split}_files"
    try:
        preflight.check_data_files(cfg.dataset[f"{split}_files"], where, preference_fields(cfg.dataset, False))
    except TransferError:
        raise TransferError(
            f"objective.select={cfg.objective.select} compares the two answers of a pair, and {where} holds "
            "unpaired rows (prompt, completion, label); allowed with them: objective.select=loss"
        ) from None


def check_inputs(cfg: DictConfig) -> None:
    """The files the run will read, and the model's depth and context against the settings."""
    if "train_files" in cfg.dataset:
        name = cfg.objective.name
        needs = (
            example_fields(cfg.dataset) if name == "sft"
            else preference_fields(cfg.dataset, unpaired_allowed=name == "kto") if name in PREFERENCE
            else [(cfg.dataset.text_field,)]
        )  # fmt: skip
        for split in ("train", "validation", "test"):
            where = f"dataset.{split}_files"
            preflight.check_data_files(cfg.dataset[f"{split}_files"], where, needs, cfg.dataset.build_hint,
                                    labels=label_fields(cfg.dataset))  # fmt: skip
        if name == "kto" and cfg.objective.select != "loss":
            check_pairs_for_select(cfg)
    if cfg.dataset.replay and cfg.dataset.replay_source != "python_docs":
        preflight.check_data_files(
            list(cfg.dataset.replay_source), "dataset.replay_source", [(cfg.dataset.text_field,)]
        )
    for name, probe in cfg.eval.probes.items():
        if probe.source.value == "files" and not probe.files:
            raise TransferError(
                f"eval.probes.{name}.files is empty; allowed: a list of .txt/.jsonl/.json/.csv/.parquet files"
            )
        if probe.source.value == "hub" and not probe.path:
            raise TransferError(f"eval.probes.{name}.path is not set; allowed: a hub dataset name")
        if probe.source.value == "python_docs" and probe.kind.value != "text":
            raise TransferError(f"eval.probes.{name}.kind={probe.kind.value!r} with source=python_docs; allowed: text")
        if probe.source.value == "python_docs" and probe.part not in PYTHON_DOCS_PARTS:
            raise TransferError(f"eval.probes.{name}.part={probe.part!r}; allowed: {', '.join(PYTHON_DOCS_PARTS)}")
        if probe.source.value == "files":
            needs = example_fields(probe) if probe.kind.value == "instructions" else [(probe.text_field,)]
            preflight.check_data_files(list(probe.files), f"eval.probes.{name}.files", needs)
    # a dry run reads no weights; QLoRA's dry run does (its 4-bit layers come from real weights)
    weights = not cfg.dry_run or cfg.strategy.name == "qlora"
    depth, context = preflight.model_shape(cfg.model, weights=weights)
    where = cfg.model.name_or_path or "tiny"
    if context is not None and cfg.block_size > context:
        raise TransferError(
            f"block_size={cfg.block_size} exceeds the context of {where} ({context} tokens); allowed: 1..{context}"
        )
    check_strategy(cfg.strategy, depth)
