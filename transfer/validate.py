"""Fail fast: check a command line and a composed config before anything heavy runs.

`check_command_line` composes the config of every job a command line would launch
(each combination of a sweep), so a typo in the last value of a sweep stops the
sweep at start-up, not an hour in. Hydra's and OmegaConf's multi-line errors are
turned into one line that names the bad key or value and what is allowed.
This module must not import torch or transformers: it runs in well under a second.
"""

import dataclasses
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

from transfer import schema  # noqa: F401  (registers the schema that compose() validates against)
from transfer.errors import TransferError, first_line

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MAX_SWEEP_JOBS_CHECKED = 512


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_command_line(argv: list[str]) -> None:
    """Raise TransferError if any job of this command line has a bad config."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    if args.config_path or args.config_dir or args.config_name not in (None, "config"):
        return  # a config tree of the user's own: Hydra reports on it
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(args.overrides)
    except Exception as e:  # Hydra's grammar errors
        raise TransferError(f"cannot parse overrides {args.overrides}: {first_line(e)}") from None
    # one composition without the swept values tells where the output goes and what the config sweeps
    run = compose_config([o.input_line for o in parsed if not o.is_sweep_override()], with_hydra=True)
    jobs = [list(args.overrides)]
    if args.multirun:  # sweeps set in a config (hydra.sweeper.params) count as much as the command line's
        given = {o.get_key_element() for o in parsed}
        params = run.hydra.sweeper.get("params") or {}
        overrides = [f"{k}={v}" for k, v in params.items() if k not in given] + list(args.overrides)
        jobs = BasicSweeper.split_arguments(parser.parse_overrides(overrides), None)[0]
    for overrides in jobs[:MAX_SWEEP_JOBS_CHECKED]:
        check_config(compose_config(overrides))
    if args.multirun:
        _check_sweep_dir(Path(run.hydra.sweep.dir), run.resume)
    else:
        _check_run_dir(Path(run.hydra.run.dir), run.resume)


def compose_config(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """Compose the run config as `python -m transfer` would, with one-line errors."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            return compose("config", overrides=list(overrides), return_hydra_config=with_hydra)
        except Exception as e:
            raise TransferError(explain(e)) from None


class AlreadyDone(Exception):
    """The run asked for is complete: nothing to do (resume=true on a finished run)."""


def _check_run_dir(run_dir: Path, resume) -> None:
    """Hydra rewrites .hydra/ in the run folder before the job starts: decide here, not in the job."""
    from transfer.record import read_record

    previous = read_record(run_dir)
    if resume is True:
        if previous is None:
            raise TransferError(f"resume=true but {run_dir} holds no run; name it: hydra.run.dir=<the run folder>")
        if previous.get("status") == "completed":
            raise AlreadyDone(f"{run_dir} holds a completed run: nothing to resume")
    elif previous is not None:
        raise TransferError(
            f"{run_dir} already holds a run (status {previous.get('status')}); "
            "continue it with resume=true, or choose another output folder (hydra.run.dir)"
        )


def _check_sweep_dir(sweep_dir: Path, resume) -> None:
    if resume is True or not sweep_dir.is_dir():
        return
    if any((job / "metrics.json").is_file() for job in sweep_dir.iterdir() if job.is_dir()):
        raise TransferError(
            f"{sweep_dir} already holds a sweep; continue it with resume=true, or choose another hydra.sweep.dir"
        )


def explain(e: BaseException) -> str:
    """One line naming the bad key or value and what is allowed."""
    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not find '(.+)/([^/']+)'", str(e))
        if m and (CONF_DIR / m.group(1)).is_dir():
            group, value = m.groups()
            return f"unknown {group} '{value}'; allowed: {', '.join(group_options(group))}"
        return first_line(e)
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        allowed = _fields(getattr(cause, "object_type", None))
        hint = f"; allowed keys there: {', '.join(allowed)}" if allowed else ""
        return f"unknown key '{key}'{hint}"
    if isinstance(cause, (ValidationError, MissingMandatoryValue)) and key:
        return f"{key}: {first_line(cause)}"
    return first_line(e)


def _fields(object_type) -> list[str]:
    return [f.name for f in dataclasses.fields(object_type)] if dataclasses.is_dataclass(object_type) else []


def check_config(cfg: DictConfig) -> None:
    """Checks the schema cannot express: ranges and combinations of values."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise TransferError(f"{missing[0]} must be set (it has no default for this choice)")
    positive = ["micro_batch_size", "grad_accum_steps", "block_size", "eval_batch_size", "log_interval"]
    for key in positive:
        if cfg[key] < 1:
            raise TransferError(f"{key}={cfg[key]} must be at least 1")
    if cfg.eval_interval < 0:
        raise TransferError(f"eval_interval={cfg.eval_interval} must be 0 (off) or a positive step count")
    if cfg.max_steps is None and cfg.epochs is None:
        raise TransferError("max_steps and epochs are both null; set at least one")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise TransferError(f"max_steps={cfg.max_steps} must be at least 1 (or null to train by epochs)")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise TransferError(f"epochs={cfg.epochs} must be positive (or null to train by max_steps)")
    opt = cfg.optimizer
    if opt.lr <= 0:
        raise TransferError(f"optimizer.lr={opt.lr} must be positive")
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
    if opt.get("nesterov") and opt.momentum <= 0:
        raise TransferError(f"optimizer.nesterov=true needs optimizer.momentum > 0 (got {opt.momentum})")
    if not 0 <= cfg.dataset.holdout_fraction < 1:
        raise TransferError(f"dataset.holdout_fraction={cfg.dataset.holdout_fraction} must be in [0, 1)")
    if cfg.eval.max_new_tokens < 1:
        raise TransferError(f"eval.max_new_tokens={cfg.eval.max_new_tokens} must be at least 1")
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
        ("eval.reference.max_tokens", cfg.eval.reference.get("max_tokens")),
    ):
        if cap is not None and cap < 2:
            raise TransferError(f"{key}={cap}: allowed 2 or more, or null for every token")
    if isinstance(cfg.resume, str) and not Path(cfg.resume).expanduser().exists():
        raise TransferError(
            f"resume={cfg.resume!r}: no such folder; allowed: true, or a run folder or checkpoint folder"
        )
    check_strategy(cfg.strategy)
    threads = cfg.hardware.num_threads
    if threads is not None and threads < 1:
        raise TransferError(f"hardware.num_threads={threads} must be at least 1 (or null for torch's default)")
    if cfg.hardware.loss_chunk_tokens < 0:
        raise TransferError(
            f"hardware.loss_chunk_tokens={cfg.hardware.loss_chunk_tokens}: allowed 0 (off) or a positive number of tokens"
        )


def check_strategy(cfg: DictConfig) -> None:
    """The strategy values that can be judged without the model (the rest is checked against it)."""
    if "n_layers" in cfg:
        n = cfg.n_layers
        if cfg.name == "adapter" and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise TransferError(f"strategy.n_layers={n!r} for adapter: allowed an integer from 1 to the model's depth")
        if cfg.name == "freeze_lower":
            if (
                isinstance(n, bool)
                or not isinstance(n, (int, float))
                or n < 0
                or (isinstance(n, float) and not 0 < n < 1)
            ):
                raise TransferError(
                    f"strategy.n_layers={n!r}: allowed an integer from 0 to the model's depth, or a fraction in (0, 1)"
                )
    if "r" in cfg and (cfg.r < 1 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1):
        raise TransferError(
            f"strategy r={cfg.r}, alpha={cfg.alpha}, dropout={cfg.dropout}: allowed r >= 1, alpha > 0, dropout in [0, 1)"
        )
    for role in cfg.get("modules_to_save") or []:
        if role not in ("head", "embeddings"):
            raise TransferError(f"strategy.modules_to_save: {role!r} is unknown; allowed: head, embeddings")
    if cfg.name == "qlora":  # only then is torch worth importing here
        import torch

        if not torch.cuda.is_available():
            raise TransferError(
                "strategy=qlora needs a CUDA GPU (bitsandbytes 4-bit weights) and there is none here; use strategy=lora"
            )
