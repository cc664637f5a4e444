"""Compose a command line's configs as `python -m transfer` would, and check every job before anything runs.

`check_command_line` composes the config of every job a command line would launch
(each combination of a sweep, or every value an Optuna search may draw), so a typo in
the last value of a sweep stops the sweep at start-up, not an hour in. Hydra's and
OmegaConf's multi-line errors are turned into one line that names the bad key or value
and what is allowed. The Plan it returns says where the command writes (config.folders
decides whether it may). Torch-free: it runs in well under a second.
"""

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

from transfer.config import preflight, schema, search  # noqa: F401 (importing schema registers it with Hydra)
from transfer.config.checks import check_config, torchrun_processes
from transfer.config.folders import check_run_dir, check_sweep_dir
from transfer.config.strategy import RENAMED
from transfer.errors import TransferError, first_line

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MAX_SWEEP_JOBS_CHECKED = 512
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
    processes = processes_per_job(run)
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


def explain(e: BaseException) -> str:
    """One line naming the bad key or value and what is allowed."""
    if isinstance(e, MissingConfigException):
        # "find" for one option, "load" for one of a list (eval/probes=[...], eval/benchmarks=[...])
        m = re.search(r"Could not (?:find|load) '(.+)/([^/']+)'", str(e))
        if m and (CONF_DIR / m.group(1)).is_dir() and m.group(2) not in group_options(m.group(1)):
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


def processes_per_job(run: DictConfig) -> int:
    """How many processes run each job of a command: torchrun's, or a submitit job's tasks (`run`: the config with
    its hydra node; hydra.launcher.tasks_per_node x nodes)."""
    launcher = run.hydra.get("launcher") or {}
    tasks = int(launcher.get("tasks_per_node") or 1) * int(launcher.get("nodes") or 1)
    return max(torchrun_processes(), tasks)
